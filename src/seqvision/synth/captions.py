"""Reference captions: a small grammar in which every reference names all of the item's content.

Video captions name every event in temporal order, each as ``the {size} {colour} {shape} {verb phrase}`` (size
and colour at the event's start; ``change_color`` also says the new colour), joined by ", then ". The five video
templates differ only in a one-word opening (``VIDEO_OPENINGS``), and each class has one verb phrase
(``VERB_PHRASES``), so a clip's five references agree on every content n-gram and no template earns a CIDEr-D
bonus (issue #11 measured 1.65-2.55 across the previous video templates; docs/data.md).

Image captions name every object with its size, colour and shape, and every pairwise relation (or, for one
object, its place in a 3x3 grid), in every reference. The five image templates differ only in an opening of
function words (``IMAGE_OPENINGS``: two words, none shared); which object comes first and the
relation synonyms are drawn per reference, independently of the template. So no template omits content, and
none shares more n-grams with the others than any other does: the CIDEr-D of a perfect caption barely
depends on its template (issue #11 measured 1.69-3.53 across the previous templates; docs/data.md).
Everything is lower case without a final period.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .scene import ObjectSpec

# The one verb phrase (present tense) the generator writes per class; change_color's takes the new colour. Not
# synonyms drawn per reference: then a clip's references agree on a verb only by chance, which spread the
# per-template CIDEr-D again and made the verbs a smaller share of it (docs/data.md). ``seqvision.content`` still
# reads the synonyms and gerunds of earlier versions.
VERB_PHRASES: dict[str, str] = {
    "move_left": "moves left",
    "move_right": "moves right",
    "move_up": "moves up",
    "move_down": "moves down",
    "grow": "grows",
    "shrink": "shrinks",
    "rotate": "rotates",
    "appear": "appears",
    "disappear": "disappears",
    "change_color": "turns {new}",
    "bounce": "bounces",
    "stay_still": "stays still",
}

# One opening per video template: one word each, no word shared with another opening, with the join "then" or
# with the content grammar. So the templates hold the same number of n-grams no other reference holds, and
# every other n-gram is the same in all five.
VIDEO_OPENINGS: tuple[str, ...] = ("first", "initially", "here", "now", "onscreen")
VIDEO_JOIN = ", then "

# At most two words each, so a three-object caption (three relations) stays within tokenize.max_length.
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of",),
    "right of": ("right of",),
    "above": ("above", "higher than"),
    "below": ("below", "under"),
}

# One opening per image template: two words each, no word shared with another opening or with the content
# grammar. So every template has the same number of n-grams that no other reference holds (which CIDEr-D weighs
# by idf when a template's own reference is left out) and none matches another template's words.
IMAGE_OPENINGS: tuple[str, ...] = ("there is", "we see", "this shows", "you spot", "one notices")

REGION_PHRASES: dict[str, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}


class Mention(NamedTuple):
    """One event as a caption names it: the object's attributes at the event's start, and what it does."""

    obj: int
    shape: str
    color: str  # colour at the start of the event
    size: str  # size at the start of the event (grow and shrink change it)
    cls: str
    new_color: str  # change_color only


def _a(phrase: str) -> str:
    """Indefinite article: "an orange circle", "a large square"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def event_phrase(m: Mention) -> str:
    """ "the small red circle turns green": the whole content of one event."""
    return f"the {m.size} {m.color} {m.shape} " + VERB_PHRASES[m.cls].format(new=m.new_color)


def video_captions(mentions: list[Mention]) -> list[str]:
    """Five references for the events ``mentions`` (temporal order), reference k in template k
    (``VIDEO_OPENINGS[k]``): "first the small red circle moves left, then the large blue square grows".

    Every reference names every event with the same words; the templates differ only in their opening. No
    pronouns: a repeated object is named again with its size and colour at that event's start.
    """
    if not mentions:
        raise ValueError("a clip has at least one event to describe")
    body = VIDEO_JOIN.join(event_phrase(m) for m in mentions)
    return _distinct([f"{opening} {body}" for opening in VIDEO_OPENINGS])


def image_captions(
    objects: list[ObjectSpec],
    relations: dict[tuple[int, int], str],
    regions: list[str],
    rng: np.random.Generator,
) -> list[str]:
    """Five references for a still scene, reference k in template k (``IMAGE_OPENINGS[k]``).

    ``relations[(i, j)]`` is where object i is relative to object j (every ordered pair);
    ``regions[i]`` is object i's 3x3 grid cell. Every reference names each object once with size, colour
    and shape ("a small red circle") and then as "the red circle"; one object: its region; two: their
    relation; three: all three relations, ``a A r(a, b) a B and r(a, c) a C, with the B r(b, c) the C``.
    """
    n = len(objects)
    full = lambda i: _a(f"{objects[i].size} {objects[i].color} {objects[i].shape}")  # noqa: E731
    short = lambda i: f"the {objects[i].color} {objects[i].shape}"  # noqa: E731
    rel = lambda i, j: _pick(rng, RELATION_PHRASES[relations[(i, j)]])  # noqa: E731
    refs = []
    for opening in IMAGE_OPENINGS:
        order = [int(i) for i in rng.permutation(n)]  # which object comes first: per reference, not per template
        if n == 1:
            body = f"{full(0)} {REGION_PHRASES[regions[0]]}"
        elif n == 2:
            a, b = order
            body = f"{full(a)} {rel(a, b)} {full(b)}"
        else:
            a, b, c = order[:3]
            body = f"{full(a)} {rel(a, b)} {full(b)} and {rel(a, c)} {full(c)}, with {short(b)} {rel(b, c)} {short(c)}"
        refs.append(f"{opening} {body}")
    return _distinct(refs)


def _distinct(refs: list[str]) -> list[str]:
    out = list(dict.fromkeys(refs))
    if len(out) < 3:  # cannot happen with the templates above; guard the contract anyway
        raise AssertionError(f"fewer than three distinct references: {out}")
    return out

