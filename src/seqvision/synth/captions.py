"""Reference captions: a small grammar with paraphrases, drawn deterministically from the item's RNG.

Video captions list the events in temporal order under five sentence templates ("then"-chain, "first ...
and finally", "after ...", gerund list, "the clip shows ..."), each with its own synonym draws, so the
references differ in words, order and length.

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

# (present tense, gerund) paraphrases per class; change_color phrases take {old} and {new} colours.
VERB_PHRASES: dict[str, tuple[tuple[str, str], ...]] = {
    "move_left": (
        ("moves left", "moving left"),
        ("moves to the left", "moving to the left"),
        ("slides to the left", "sliding to the left"),
        ("goes left", "going left"),
    ),
    "move_right": (
        ("moves right", "moving right"),
        ("moves to the right", "moving to the right"),
        ("slides to the right", "sliding to the right"),
        ("goes right", "going right"),
    ),
    "move_up": (
        ("moves up", "moving up"),
        ("rises", "rising"),
        ("goes up", "going up"),
        ("slides upward", "sliding upward"),
    ),
    "move_down": (
        ("moves down", "moving down"),
        ("drops", "dropping"),
        ("goes down", "going down"),
        ("slides downward", "sliding downward"),
    ),
    "grow": (
        ("grows", "growing"),
        ("gets bigger", "getting bigger"),
        ("expands", "expanding"),
        ("grows larger", "growing larger"),
    ),
    "shrink": (
        ("shrinks", "shrinking"),
        ("gets smaller", "getting smaller"),
        ("contracts", "contracting"),
        ("becomes smaller", "becoming smaller"),
    ),
    "rotate": (
        ("rotates", "rotating"),
        ("spins", "spinning"),
        ("rotates in place", "rotating in place"),
        ("twists around", "twisting around"),
    ),
    "appear": (
        ("appears", "appearing"),
        ("fades in", "fading in"),
        ("shows up", "showing up"),
        ("comes into view", "coming into view"),
    ),
    "disappear": (
        ("disappears", "disappearing"),
        ("fades out", "fading out"),
        ("vanishes", "vanishing"),
        ("fades away", "fading away"),
    ),
    "change_color": (
        ("turns {new}", "turning {new}"),
        ("changes color to {new}", "changing color to {new}"),
        ("becomes {new}", "becoming {new}"),
        ("changes from {old} to {new}", "changing from {old} to {new}"),
    ),
    "bounce": (
        ("bounces", "bouncing"),
        ("jumps", "jumping"),
        ("hops up and down", "hopping up and down"),
        ("bounces up and down", "bouncing up and down"),
    ),
    "stay_still": (
        ("stays still", "staying still"),
        ("does not move", "not moving"),
        ("remains still", "remaining still"),
        ("stays in place", "staying in place"),
    ),
}

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
    """One event as a caption sees it: who (attributes at the event's start) and what."""

    obj: int
    shape: str
    color: str  # colour at the start of the event
    size: str  # size at the start of the clip
    cls: str
    new_color: str  # change_color only


def _a(phrase: str) -> str:
    """Indefinite article: "an orange circle", "a large square"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _noun(m: Mention, rng: np.random.Generator, *, size: bool | None = None) -> str:
    """ "red circle" or "small red circle" (size mentioned about half of the time unless forced)."""
    with_size = bool(rng.random() < 0.5) if size is None else size
    return f"{m.size} {m.color} {m.shape}" if with_size else f"{m.color} {m.shape}"


def _verb(m: Mention, rng: np.random.Generator, *, gerund: bool = False) -> str:
    present, ing = VERB_PHRASES[m.cls][int(rng.integers(len(VERB_PHRASES[m.cls])))]
    return (ing if gerund else present).format(old=m.color, new=m.new_color)


def _subjects(
    mentions: list[Mention],
    rng: np.random.Generator,
    *,
    first: str,
    size: bool | None = None,
    pronoun: bool = True,
) -> list[str]:
    """Noun phrases: ``first`` article on a first mention, "it" right after the same object (when
    ``pronoun``), else "the"."""
    out, seen = [], set()
    for i, m in enumerate(mentions):
        if pronoun and i > 0 and mentions[i - 1].obj == m.obj:
            out.append("it")
        elif m.obj in seen:
            out.append(f"the {_noun(m, rng, size=False)}")
        else:
            noun = _noun(m, rng, size=size)
            out.append(_a(noun) if first == "a" else f"{first} {noun}")
        seen.add(m.obj)
    return out


def video_captions(mentions: list[Mention], rng: np.random.Generator) -> list[str]:
    """At least three different references describing ``mentions`` in order."""
    k = len(mentions)
    refs = []

    # 1. "the red circle moves left, then the blue square grows"
    subj = _subjects(mentions, rng, first="the")
    refs.append(", then ".join(f"{s} {_verb(m, rng)}" for s, m in zip(subj, mentions)))

    # 2. "first a small red circle slides to the left and then a small blue square gets bigger"
    subj = _subjects(mentions, rng, first="a", size=True)
    parts = [f"{s} {_verb(m, rng)}" for s, m in zip(subj, mentions)]
    if k == 1:
        refs.append(parts[0])
    elif k == 2:
        refs.append(f"first {parts[0]} and then {parts[1]}")
    else:
        refs.append(f"first {parts[0]}, then {', then '.join(parts[1:-1])}, and finally {parts[-1]}")

    # 3. "after the red circle goes left, the blue square grows"
    subj = _subjects(mentions, rng, first="the")
    parts = [f"{s} {_verb(m, rng)}" for s, m in zip(subj, mentions)]
    if k == 1:
        refs.append(f"in this clip {parts[0]}")
    else:
        refs.append(f"after {' and '.join(parts[:-1])}, {parts[-1]}")

    # 4. "a red circle moving left, then a blue square growing"
    subj = _subjects(mentions, rng, first="a", pronoun=False)
    refs.append(", then ".join(f"{s} {_verb(m, rng, gerund=True)}" for s, m in zip(subj, mentions)))

    # 5. "the clip shows a small red circle moving left and then a blue square growing"
    subj = _subjects(mentions, rng, first="a", pronoun=False)
    parts = [f"{s} {_verb(m, rng, gerund=True)}" for s, m in zip(subj, mentions)]
    refs.append("the clip shows " + (parts[0] if k == 1 else ", ".join(parts[:-1]) + " and then " + parts[-1]))

    return _distinct(refs)


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

