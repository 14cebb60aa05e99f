"""Event (activity) classes, their state updates, and clip timelines.

A clip plays 1..max_events events one after another; each event changes one object's state from
``before`` to ``after`` over its frames ``[start, end)``. The clip's label is its *main event*, the longest
one: it gets more than half of the frames, so every other event is strictly shorter (see ``sample_clip``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..config import SynthConfig
from .scene import (
    COLORS,
    MAX_RADIUS_FRACTION,
    MIN_RADIUS_FRACTION,
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

MOVE_FRACTION = (0.25, 0.40)  # of the frame width (left/right) or height (up/down)
GROW_FACTOR = 1.7
SHRINK_FACTOR = 0.6
ROTATE_DEGREES = (40.0, 60.0)  # never near 90: a square turned by 90 degrees looks unchanged
HOP_FRACTION = (0.20, 0.30)  # bounce height, of the frame height
MIN_EVENT_FRAMES = 3
JITTER_FRACTION = 0.03  # long-range distractor: offsets stay within +-3% of min(height, width)
JITTER_STEP = 0.4  # pixels, std of one random-walk step


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
        the last shows ``after``, so each event's own frames hold its whole change."""
        t = (frame - self.start) / max(1, self.end - self.start - 1)
        state = lerp_state(self.before, self.after, t)
        if self.hop:
            state = state._replace(y=state.y - self.hop * math.sin(math.pi * t))
        return state


class ClipSpec(NamedTuple):
    """Everything needed to render a clip and to describe it."""

    num_frames: int
    objects: tuple[ObjectSpec, ...]
    initial: tuple[ObjectState, ...]
    events: tuple[Event, ...]  # in temporal order, back to back
    main: int  # index into events of the labelled event
    background: Background
    distractor_start: int | None  # long-range: first frame of the jitter tail
    jitter: np.ndarray | None  # long-range: (num_frames - distractor_start, num_objects, 2) pixel offsets

    @property
    def label(self) -> int:
        return EVENT_CLASSES.index(self.events[self.main].cls)

    @property
    def jittered_objects(self) -> tuple[int, ...]:
        if self.jitter is None:
            return ()
        return tuple(int(j) for j in np.flatnonzero(np.abs(self.jitter).sum(axis=(0, 2)) > 0))


def _room(state: ObjectState, *, height: int, width: int) -> dict[str, float]:
    """Free pixels between the object's circumcircle (plus margin) and each frame border."""
    m = margin(height=height, width=width)
    return {
        "move_left": state.x - state.radius - m,
        "move_right": width - m - state.radius - state.x,
        "move_up": state.y - state.radius - m,
        "move_down": height - m - state.radius - state.y,
    }


def valid_classes(
    state: ObjectState, shape: str, *, visible: bool, had_event: bool, height: int, width: int
) -> list[str]:
    """Classes that can happen to an object now, in EVENT_CLASSES order.

    Only ``appear`` may touch an invisible object, and only one with no earlier event (it is then hidden
    from the first frame); ``rotate`` skips circles; moves, grow and bounce need room to stay in frame.
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
            r = state.radius * GROW_FACTOR
            ok = r <= MAX_RADIUS_FRACTION * min(height, width) and inside(
                state.x, state.y, r, height=height, width=width
            )
        elif cls == "shrink":
            ok = state.radius * SHRINK_FACTOR >= MIN_RADIUS_FRACTION * min(height, width)
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
        after = state._replace(radius=state.radius * GROW_FACTOR)
    elif cls == "shrink":
        after = state._replace(radius=state.radius * SHRINK_FACTOR)
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


def sample_clip(rng: np.random.Generator, config: SynthConfig, *, attempts: int = 1000) -> ClipSpec:
    """A clip whose label is drawn uniformly from EVENT_CLASSES, then a scene and timeline that make it
    valid (redrawn until every event is valid for the state it starts from)."""
    main_cls = EVENT_CLASSES[int(rng.integers(len(EVENT_CLASSES)))]
    for _ in range(attempts):
        spec = _try_clip(rng, config, main_cls)
        if spec is not None:
            return spec
    raise RuntimeError(f"could not build a valid {main_cls} clip in {attempts} attempts")


def _try_clip(rng: np.random.Generator, config: SynthConfig, main_cls: str) -> ClipSpec | None:
    height, width = config.height, config.width
    if config.long_range:
        num_frames = config.long_range_frames
        # At least two objects when allowed, so the tail always has something to jitter besides the main one.
        count = int(rng.integers(min(2, config.max_objects), config.max_objects + 1))
        durations, main = [config.main_event_frames], 0
    else:
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
    visible = [True] * count
    had_event = [False] * count
    events: list[Event] = []
    start = 0
    for i, length in enumerate(durations):
        options = {
            j: valid_classes(
                states[j], objects[j].shape, visible=visible[j], had_event=had_event[j], height=height, width=width
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
        states[obj], colors[obj] = after, new_color
        visible[obj] = after.alpha > 0
        had_event[obj] = True
        start += length

    distractor_start, jitter = None, None
    if config.long_range:
        distractor_start = start
        main_obj = events[0].obj
        movers = [j for j in range(count) if j != main_obj] or ([main_obj] if visible[main_obj] else [])
        jitter = _jitter(rng, states, movers, frames=num_frames - start, height=height, width=width)
    return ClipSpec(
        num_frames=num_frames,
        objects=tuple(objects),
        initial=tuple(initial),
        events=tuple(events),
        main=main,
        background=sample_background(rng),
        distractor_start=distractor_start,
        jitter=jitter,
    )


def _jitter(
    rng: np.random.Generator, states: list[ObjectState], movers: list[int], *, frames: int, height: int, width: int
) -> np.ndarray:
    """Small bounded random walks (not an event class): offsets within +-JITTER_FRACTION of the frame and
    clamped so every object stays inside it. Returns (frames, num_objects, 2) offsets (dx, dy) in pixels."""
    limit = JITTER_FRACTION * min(height, width)
    m = margin(height=height, width=width)
    out = np.zeros((frames, len(states), 2))
    for j in movers:
        s = states[j]
        low = np.maximum(-limit, [m + s.radius - s.x, m + s.radius - s.y])
        high = np.minimum(limit, [width - m - s.radius - s.x, height - m - s.radius - s.y])
        offset = np.zeros(2)
        for t in range(frames):
            offset = np.clip(offset + rng.normal(0.0, JITTER_STEP, 2), low, high)
            out[t, j] = offset
    return out


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
        if spec.distractor_start is not None and t >= spec.distractor_start and spec.jitter is not None:
            dx_dy = spec.jitter[t - spec.distractor_start]
            row = [s._replace(x=s.x + dx_dy[j, 0], y=s.y + dx_dy[j, 1]) for j, s in enumerate(row)]
        frames.append(row)
    return frames
