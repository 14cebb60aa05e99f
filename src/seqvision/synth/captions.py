"""Reference captions: a small grammar with paraphrases, drawn deterministically from the item's RNG.

Video captions list the events in temporal order under five sentence templates ("then"-chain, "first ...
and finally", "after ...", gerund list, "the clip shows ..."), each with its own synonym draws, so the
references differ in words, order and length. Image captions describe the objects and their spatial
relations (or, for one object, its place in a 3x3 grid). Everything is lower case without a final period.
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

RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "higher than"),
    "below": ("below", "under", "beneath"),
}

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
    """At least three different references for a still scene.

    ``relations[(i, j)]`` is where object i is relative to object j (every ordered pair);
    ``regions[i]`` is object i's 3x3 grid cell.
    """
    n = len(objects)
    order = [int(i) for i in rng.permutation(n)]  # mention order varies across images
    full = lambda i: f"{objects[i].size} {objects[i].color} {objects[i].shape}"  # noqa: E731
    short = lambda i: f"{objects[i].color} {objects[i].shape}"  # noqa: E731
    rel = lambda i, j, canonical=False: (  # noqa: E731
        RELATION_PHRASES[relations[(i, j)]][0] if canonical else _pick(rng, RELATION_PHRASES[relations[(i, j)]])
    )
    refs = []
    if n == 1:
        where = REGION_PHRASES[regions[0]]
        refs.append(f"a {full(0)} {where}")
        refs.append(f"there is {_a(short(0))} {where} of the image")
        refs.append(f"a single {short(0)}")
        refs.append(f"{where} there is a {full(0)}")
        refs.append(f"only one {short(0)} is in the picture")
    elif n == 2:
        a, b = order
        refs.append(f"a {full(a)} {rel(a, b, True)} a {full(b)}")
        refs.append(f"a {full(b)} {rel(b, a, True)} a {full(a)}")
        refs.append(f"there is {_a(short(a))} and {_a(short(b))}")
        refs.append(f"the {short(a)} is {rel(a, b)} the {short(b)}")
        refs.append(f"two shapes: a {full(b)} and a {full(a)}")
    else:
        a, b, c = order[:3]
        refs.append(f"a {full(a)} {rel(a, b, True)} a {full(b)}, and a {full(c)} {rel(c, b, True)} the {short(b)}")
        refs.append(f"a {full(b)} {rel(b, a, True)} a {full(a)}, with {_a(short(c))} {rel(c, a)} the {short(a)}")
        refs.append(f"there is {_a(short(a))}, {_a(short(b))} and {_a(short(c))}")
        refs.append(f"the {short(c)} is {rel(c, a)} the {short(a)} and {rel(c, b)} the {short(b)}")
        refs.append(f"three shapes: a {full(c)}, a {full(b)} and a {full(a)}")
    return _distinct(refs)


def _distinct(refs: list[str]) -> list[str]:
    out = list(dict.fromkeys(refs))
    if len(out) < 3:  # cannot happen with the templates above; guard the contract anyway
        raise AssertionError(f"fewer than three distinct references: {out}")
    return out

