"""Event (activity) classes, their state updates, and clip timelines.

A clip plays 1..max_events events one after another; each event changes one object's state from
``before`` to ``after`` over its frames ``[start, end)``. The clip's label is its *main event*, the longest
one: it gets more than half of the frames, so every other event is strictly shorter (see ``sample_clip``).

Reversal pairs are exact: a clip of one class of a pair is a clip of the other played backwards. Clips are
generated forward for the first class of a pair (or for a class that is its own reverse), then the whole clip
is reversed (``reverse_clip``) for the partner class (and for half of the self-reverse clips), so every
statistic that ignores frame order has the same distribution in both classes of a pair.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..config import SynthConfig
from .scene import (
    COLORS,
    RADIUS_FRACTION,
    Background,
    ObjectSpec,
    ObjectState,
    inside,
    lerp_state,
    margin,
    place_objects,
    sample_background,
    sample_objects,
)

# The label order: a clip's label is EVENT_CLASSES.index(main event class) (0-based; UCF lists add 1).
EVENT_CLASSES: tuple[str, ...] = (
    "move_left",
    "move_right",
    "move_up",
    "move_down",
    "grow",
    "shrink",
    "rotate",
    "appear",
    "disappear",
    "change_color",
    "bounce",
    "stay_still",
)

# Classes that are each other played backwards: an order-blind model cannot tell them apart.
REVERSAL_PAIRS: tuple[tuple[str, str], ...] = (
    ("move_left", "move_right"),
    ("move_up", "move_down"),
    ("grow", "shrink"),
    ("appear", "disappear"),
)

class GenerationError(RuntimeError):
    """The configuration leaves no valid item to draw (e.g. frames too small for a move, or too few distinct
    scenes for val/test images unlike every train image). The message names the knob to change."""


# Each class played backwards: the partner of a reversal pair, or the class itself.
REVERSE: dict[str, str] = {
    **{cls: cls for cls in EVENT_CLASSES},
    **{a: b for a, b in REVERSAL_PAIRS},
    **{b: a for a, b in REVERSAL_PAIRS},
}
# Clips are generated forward for these classes only; every other label is reached by reversal.
FORWARD_CLASSES: tuple[str, ...] = tuple(c for c in EVENT_CLASSES if c not in {b for _, b in REVERSAL_PAIRS})
# Long-range labels: the reversal pairs whose change is visible while the object is (moves, size). appear and
# disappear are left out because the labelled object fades in and out around its event anyway.
LONG_RANGE_CLASSES: tuple[str, ...] = ("move_left", "move_right", "move_up", "move_down", "grow", "shrink")

MOVE_FRACTION = (0.25, 0.40)  # of the frame width (left/right) or height (up/down)
ROTATE_DEGREES = (40.0, 60.0)  # never near 90: a square turned by 90 degrees looks unchanged
HOP_FRACTION = (0.20, 0.30)  # bounce height, of the frame height
MIN_EVENT_FRAMES = 3
# Long-range mode: the labelled object fades in and out over FADE_FRAMES frames; distractors follow
# stationary AR(1) walks around their centres (std WALK_FRACTION of min(height, width), lag-one correlation
# WALK_CORRELATION: a step of about 2 px at 64x64, slow next to a move event's 16-26 px in 12 frames).
FADE_FRAMES = 4
WALK_FRACTION = 0.12
WALK_CORRELATION = 0.97


class Event(NamedTuple):
    """One object changing from ``before`` to ``after`` over frames ``[start, end)``."""

    obj: int
    cls: str
    start: int
    end: int  # exclusive
    before: ObjectState
    after: ObjectState
    color_before: str
    color_after: str
    hop: float = 0.0  # bounce only: peak height in pixels

    def state_at(self, frame: int) -> ObjectState:
        """The object's state at ``frame`` (``start <= frame < end``): the first frame shows ``before``,
        the last shows ``after``, so each event's own frames hold its whole change.

        Interpolation starts from the nearer end (and the midpoint is exact), so the reversed event
        (``reverse_event``) gives the same floats at the mirrored frame: a reversed clip renders to exactly
        the forward pixels in reverse order.
        """
        i, n = frame - self.start, max(1, self.end - self.start - 1)
        if 2 * i <= n:
            state = lerp_state(self.before, self.after, 0.5 if 2 * i == n else i / n)
        else:
            state = lerp_state(self.after, self.before, (n - i) / n)
        if self.hop:
            state = state._replace(y=state.y - self.hop * math.sin(math.pi * min(i, n - i) / n))
        return state


class ClipSpec(NamedTuple):
    """Everything needed to render a clip and to describe it."""

    num_frames: int
    objects: tuple[ObjectSpec, ...]  # attributes at the start of the clip
    initial: tuple[ObjectState, ...]
    events: tuple[Event, ...]  # in temporal order
    main: int  # index into events of the labelled event
    background: Background
    # Long-range distractors: float64 (num_frames, num_objects, 2) pixel offsets (dx, dy) added to every
    # state (zero for objects that do not walk); None in ordinary clips.
    walk: np.ndarray | None = None
    long_range_distance: int | None = None  # frames after the labelled object was last visible

    @property
    def label(self) -> int:
        return EVENT_CLASSES.index(self.events[self.main].cls)

    @property
    def walking_objects(self) -> tuple[int, ...]:
        if self.walk is None:
            return ()
        return tuple(int(j) for j in np.flatnonzero(np.abs(self.walk).sum(axis=(0, 2)) > 0))


def _room(state: ObjectState, *, height: int, width: int) -> dict[str, float]:
    """Free pixels between the object's circumcircle (plus margin) and each frame border."""
    m = margin(height=height, width=width)
    return {
        "move_left": state.x - state.radius - m,
        "move_right": width - m - state.radius - state.x,
        "move_up": state.y - state.radius - m,
        "move_down": height - m - state.radius - state.y,
    }


def large_radius(*, height: int, width: int) -> float:
    return RADIUS_FRACTION["large"] * min(height, width)


def small_radius(*, height: int, width: int) -> float:
    return RADIUS_FRACTION["small"] * min(height, width)


def valid_classes(
    state: ObjectState,
    shape: str,
    size: str,
    *,
    visible: bool,
    had_event: bool,
    height: int,
    width: int,
) -> list[str]:
    """Classes that can happen to an object now, in EVENT_CLASSES order.

    Only ``appear`` may touch an invisible object, and only one with no earlier event (it is then hidden
    from the first frame); ``rotate`` skips circles; ``grow`` needs a small object that fits when large,
    ``shrink`` a large one; moves and bounce need room to stay in frame.
    """
    if not visible:
        return []
    out = []
    room = _room(state, height=height, width=width)
    for cls in EVENT_CLASSES:
        if cls in room:
            span = width if cls in ("move_left", "move_right") else height
            ok = room[cls] >= MOVE_FRACTION[0] * span
        elif cls == "grow":
            ok = size == "small" and inside(
                state.x, state.y, large_radius(height=height, width=width), height=height, width=width
            )
        elif cls == "shrink":
            ok = size == "large"
        elif cls == "rotate":
            ok = shape != "circle"
        elif cls == "appear":
            ok = not had_event
        elif cls == "bounce":
            ok = room["move_up"] >= HOP_FRACTION[0] * height
        else:  # disappear, change_color, stay_still
            ok = True
        if ok:
            out.append(cls)
    return out


def apply_event(
    rng: np.random.Generator,
    cls: str,
    state: ObjectState,
    color: str,
    *,
    taken_colors: set[str],
    height: int,
    width: int,
) -> tuple[ObjectState, ObjectState, str, float]:
    """Draw the parameters of one event. Returns (before, after, colour name after, bounce height)."""
    room = _room(state, height=height, width=width)
    before, after, hop, new_color = state, state, 0.0, color
    if cls in ("move_left", "move_right", "move_up", "move_down"):
        horizontal = cls in ("move_left", "move_right")
        span = width if horizontal else height
        distance = rng.uniform(MOVE_FRACTION[0] * span, min(MOVE_FRACTION[1] * span, room[cls]))
        sign = -1.0 if cls in ("move_left", "move_up") else 1.0
        after = state._replace(x=state.x + sign * distance) if horizontal else state._replace(y=state.y + sign * distance)
    elif cls == "grow":
        after = state._replace(radius=large_radius(height=height, width=width))
    elif cls == "shrink":
        after = state._replace(radius=small_radius(height=height, width=width))
    elif cls == "rotate":
        turn = rng.uniform(*ROTATE_DEGREES) * (1.0 if rng.random() < 0.5 else -1.0)
        after = state._replace(angle=state.angle + turn)
    elif cls == "appear":
        before = state._replace(alpha=0.0)
        after = state._replace(alpha=1.0)
    elif cls == "disappear":
        after = state._replace(alpha=0.0)
    elif cls == "change_color":
        free = [c for c in COLORS if c not in taken_colors]
        new_color = free[int(rng.integers(len(free)))]
        after = state._replace(rgb=tuple(float(c) for c in COLORS[new_color]))
    elif cls == "bounce":
        hop = float(rng.uniform(HOP_FRACTION[0] * height, min(HOP_FRACTION[1] * height, room["move_up"])))
    elif cls != "stay_still":
        raise ValueError(f"unknown event class {cls!r}")
    return before, after, new_color, hop


def _size_after(size: str, cls: str) -> str:
    return {"grow": "large", "shrink": "small"}.get(cls, size)


def _durations(rng: np.random.Generator, num_frames: int, max_events: int) -> tuple[list[int], int]:
    """Event lengths summing to ``num_frames`` and the index of the main (longest) event.

    The main event gets ``floor(T/2) + 1 .. T - (k-1) * MIN_EVENT_FRAMES`` frames, so it is strictly longer
    than every other event; the rest is split among the others (each at least MIN_EVENT_FRAMES).
    """
    main_min = num_frames // 2 + 1
    fit = 1 + (num_frames - main_min) // MIN_EVENT_FRAMES
    count = min(int(rng.integers(1, max_events + 1)), fit)
    if count == 1:
        return [num_frames], 0
    main_len = int(rng.integers(main_min, num_frames - (count - 1) * MIN_EVENT_FRAMES + 1))
    rest = num_frames - main_len - (count - 1) * MIN_EVENT_FRAMES
    others = [MIN_EVENT_FRAMES + int(n) for n in rng.multinomial(rest, [1.0 / (count - 1)] * (count - 1))]
    main = int(rng.integers(count))
    return others[:main] + [main_len] + others[main:], main


def long_range_frames(config: SynthConfig) -> int:
    """Length of every long-range clip: ``2 D + 2 FADE_FRAMES + E - 2`` (layout: ``sample_clip``)."""
    return 2 * config.long_range_distance + 2 * FADE_FRAMES + config.main_event_frames - 2


def sample_clip(rng: np.random.Generator, config: SynthConfig, *, attempts: int = 1000) -> ClipSpec:
    """A clip whose label is drawn uniformly (from EVENT_CLASSES, or LONG_RANGE_CLASSES in long-range mode).

    The clip is built forward for ``FORWARD_CLASSES[...]`` (scene and timeline redrawn until every event is
    valid for the state it starts from), then reversed as a whole when the label is the second class of a
    reversal pair, and with probability 1/2 when the label is its own reverse.

    Long-range layout (D = ``long_range_distance``, E = ``main_event_frames``, F = FADE_FRAMES): the labelled
    object is hidden in frames ``[0, D)``, fades in (appear, frames ``[D-1, D-1+F)``), does the labelled event
    (``E`` frames), fades out (disappear, ``F`` frames) and is hidden in the last ``D`` frames; every other
    object walks (``WALK_*``) for the whole clip. The layout is symmetric, so reversal keeps it.
    """
    classes = LONG_RANGE_CLASSES if config.long_range else EVENT_CLASSES
    label = classes[int(rng.integers(len(classes)))]
    flip = bool(rng.random() < 0.5)
    reverse = flip if REVERSE[label] == label else label not in FORWARD_CLASSES
    forward = REVERSE[label] if reverse else label
    build = _try_long_range_clip if config.long_range else _try_clip
    for _ in range(attempts):
        spec = build(rng, config, forward)
        if spec is not None:
            return reverse_clip(spec) if reverse else spec
    raise GenerationError(
        f"could not build a valid {forward} clip in {attempts} attempts; the frame is too small for its events "
        f"at synth.height {config.height} x synth.width {config.width}: raise them"
    )


def _try_clip(rng: np.random.Generator, config: SynthConfig, main_cls: str) -> ClipSpec | None:
    height, width = config.height, config.width
    num_frames = int(rng.integers(config.min_frames, config.max_frames + 1))
    count = int(rng.integers(1, config.max_objects + 1))
    durations, main = _durations(rng, num_frames, config.max_events)
    objects = sample_objects(rng, count)
    placed = place_objects(rng, objects, height=height, width=width, random_angle=True, separated=False)
    if placed is None:
        return None
    initial = list(placed)
    states = list(placed)
    colors = [o.color for o in objects]
    sizes = [o.size for o in objects]
    visible = [True] * count
    had_event = [False] * count
    events: list[Event] = []
    start = 0
    for i, length in enumerate(durations):
        options = {
            j: valid_classes(
                states[j], objects[j].shape, sizes[j], visible=visible[j], had_event=had_event[j],
                height=height, width=width,
            )
            for j in range(count)
        }
        if i == main:
            candidates = [j for j in range(count) if main_cls in options[j]]
            if not candidates:
                return None
            obj = candidates[int(rng.integers(len(candidates)))]
            cls = main_cls
        else:
            candidates = [j for j in range(count) if options[j]]
            if not candidates:
                return None
            obj = candidates[int(rng.integers(len(candidates)))]
            cls = options[obj][int(rng.integers(len(options[obj])))]
        before, after, new_color, hop = apply_event(
            rng, cls, states[obj], colors[obj], taken_colors=set(colors), height=height, width=width
        )
        if cls == "appear":  # hidden from the first frame until it fades in
            initial[obj] = initial[obj]._replace(alpha=0.0)
        events.append(Event(obj, cls, start, start + length, before, after, colors[obj], new_color, hop))
        states[obj], colors[obj], sizes[obj] = after, new_color, _size_after(sizes[obj], cls)
        visible[obj] = after.alpha > 0
        had_event[obj] = True
        start += length
    return ClipSpec(
        num_frames=num_frames,
        objects=tuple(objects),
        initial=tuple(initial),
        events=tuple(events),
        main=main,
        background=sample_background(rng),
    )


def _try_long_range_clip(rng: np.random.Generator, config: SynthConfig, main_cls: str) -> ClipSpec | None:
    """The long-range layout of ``sample_clip``, forward. The labelled object is the last one (drawn on top);
    the distractors are placed and walk independently of it, so nothing they do depends on the label."""
    height, width = config.height, config.width
    distance, length = config.long_range_distance, config.main_event_frames
    num_frames = long_range_frames(config)
    count = int(rng.integers(min(2, config.max_objects), config.max_objects + 1))
    objects = sample_objects(rng, count)
    if main_cls == "grow":  # grow takes a small object to large (shrink is only ever reached by reversal)
        objects[-1] = objects[-1]._replace(size="small")
    target = objects[-1]
    placed = place_objects(rng, [target], height=height, width=width, random_angle=True, separated=False)
    if placed is None or main_cls not in valid_classes(
        placed[0], target.shape, target.size, visible=True, had_event=False, height=height, width=width
    ):
        return None
    # Distractors: placed among themselves only (not avoiding the labelled object, which would tie where
    # they are to where it starts and ends, i.e. to the label).
    others = place_objects(rng, objects[:-1], height=height, width=width, random_angle=True, separated=False)
    if others is None:
        return None
    before, after, new_color, hop = apply_event(
        rng, main_cls, placed[0], target.color, taken_colors={o.color for o in objects}, height=height, width=width
    )
    obj, first = count - 1, distance - 1
    shown = before._replace(alpha=1.0)
    events = (
        Event(obj, "appear", first, first + FADE_FRAMES, shown._replace(alpha=0.0), shown, target.color, target.color),
        Event(obj, main_cls, first + FADE_FRAMES, first + FADE_FRAMES + length, before, after, target.color,
              new_color, hop),
        Event(obj, "disappear", first + FADE_FRAMES + length, first + 2 * FADE_FRAMES + length, after,
              after._replace(alpha=0.0), new_color, new_color),
    )
    walk = np.zeros((num_frames, count, 2))
    for j, state in enumerate(others):
        walk[:, j] = _walk(rng, state, frames=num_frames, height=height, width=width)
    return ClipSpec(
        num_frames=num_frames,
        objects=tuple(objects),
        initial=(*others, shown._replace(alpha=0.0)),
        events=events,
        main=1,
        background=sample_background(rng),
        walk=walk,
        long_range_distance=distance,
    )


def _walk(rng: np.random.Generator, centre: ObjectState, *, frames: int, height: int, width: int) -> np.ndarray:
    """A stationary AR(1) walk around ``centre``, folded back at the borders so the object stays inside the
    frame (it bounces off a border instead of sticking to it).

    Started from its stationary law, a Gaussian AR(1) process is time-reversible (its law is fixed by a
    symmetric autocovariance), and the fold is applied frame by frame, so the walk played backwards has the
    same law: the first and the last frames of a long-range clip look alike. Returns (frames, 2) offsets.
    """
    sigma = WALK_FRACTION * min(height, width)
    m = margin(height=height, width=width)
    low = np.array([m + centre.radius - centre.x, m + centre.radius - centre.y])
    span = np.array([width, height]) - 2 * (m + centre.radius)
    innovation = sigma * math.sqrt(1.0 - WALK_CORRELATION**2)
    raw = np.empty((frames, 2))
    raw[0] = rng.normal(0.0, sigma, 2)
    for t in range(1, frames):
        raw[t] = WALK_CORRELATION * raw[t - 1] + rng.normal(0.0, innovation, 2)
    folded = np.mod(raw - low, 2 * span)  # (frames, 2), in [0, 2 span)
    return low + np.where(folded <= span, folded, 2 * span - folded)


def reverse_event(event: Event, num_frames: int) -> Event:
    """``event`` played backwards in a clip of ``num_frames`` frames: mirrored frames, swapped end states and
    colours, the reverse class (``REVERSE``). ``state_at`` of the result at ``num_frames - 1 - t`` equals
    ``state_at`` of ``event`` at ``t``, float for float."""
    return Event(
        obj=event.obj,
        cls=REVERSE[event.cls],
        start=num_frames - event.end,
        end=num_frames - event.start,
        before=event.after,
        after=event.before,
        color_before=event.color_after,
        color_after=event.color_before,
        hop=event.hop,
    )


def final_states(spec: ClipSpec) -> tuple[tuple[ObjectState, ...], tuple[ObjectSpec, ...]]:
    """Every object's state and attributes (colour, size) after the last event, walk offsets left out."""
    states, objects = list(spec.initial), list(spec.objects)
    for e in spec.events:
        states[e.obj] = e.after
        o = objects[e.obj]
        objects[e.obj] = o._replace(color=e.color_after, size=_size_after(o.size, e.cls))
    return tuple(states), tuple(objects)


def reverse_clip(spec: ClipSpec) -> ClipSpec:
    """The whole clip played backwards: events in reverse order, each reversed (``reverse_event``), the
    initial state and attributes taken from the forward clip's end, the walk reversed. Durations and the
    labelled event are kept. ``clip_states(reverse_clip(s))[t] == clip_states(s)[T - 1 - t]``."""
    states, objects = final_states(spec)
    k = len(spec.events)
    return spec._replace(
        objects=objects,
        initial=states,
        events=tuple(reverse_event(e, spec.num_frames) for e in reversed(spec.events)),
        main=k - 1 - spec.main,
        walk=None if spec.walk is None else spec.walk[::-1].copy(),
    )


def clip_states(spec: ClipSpec) -> list[list[ObjectState]]:
    """Per frame, every object's state: ``states[t][j]``."""
    current = list(spec.initial)
    by_frame = {t: e for e in spec.events for t in range(e.start, e.end)}
    frames = []
    for t in range(spec.num_frames):
        event = by_frame.get(t)
        if event is not None:
            current[event.obj] = event.state_at(t)
        row = list(current)
        if spec.walk is not None:
            row = [s._replace(x=s.x + spec.walk[t, j, 0], y=s.y + spec.walk[t, j, 1]) for j, s in enumerate(row)]
        frames.append(row)
    return frames
