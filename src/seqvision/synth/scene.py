"""Objects, their attributes and per-frame state; backgrounds; scene placement.

Positions and sizes are in pixels of the final frame (``x`` to the right, ``y`` downwards). An object's
*radius* is its circumradius: the whole shape lies inside the circle of that radius at any rotation, so
"inside the frame" is one check that holds for every shape and angle.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

# Saturated, well-separated colours; backgrounds are low-saturation and darker (see sample_background), so
# each object stays distinguishable from the background by hue even where their brightness is equal.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 235),
    "yellow": (240, 220, 40),
    "cyan": (40, 210, 220),
    "magenta": (215, 50, 215),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
}

SIZES: tuple[str, ...] = ("small", "large")
# Circumradius as a fraction of min(height, width). Sizes are categorical at every still moment: grow takes a
# small object exactly to large and shrink a large one exactly to small, so the size words stay true when a
# clip is played backwards, and the radii seen in a clip do not tell grow from shrink (issue #11).
RADIUS_FRACTION: dict[str, float] = {"small": 0.10, "large": 0.16}
# Gap kept between an object's circumcircle and the frame border, as a fraction of min(height, width).
MARGIN_FRACTION = 0.02


class ObjectSpec(NamedTuple):
    """What an object *is*: its attributes at the start of the clip (captions name objects by these)."""

    shape: str
    color: str
    size: str


class ObjectState(NamedTuple):
    """Where and how an object is drawn in one frame."""

    x: float  # centre, pixels from the left edge
    y: float  # centre, pixels from the top edge
    radius: float  # circumradius in pixels
    angle: float  # degrees, counter-clockwise on screen
    rgb: tuple[float, float, float]  # 0..255
    alpha: float  # 0 (invisible) .. 1 (opaque)


def lerp_state(a: ObjectState, b: ObjectState, t: float) -> ObjectState:
    """Linear interpolation between two states; ``t`` in [0, 1]. At ``t == 0.5`` it returns the exact midpoint
    ``(a + b) / 2``, which is symmetric in ``a`` and ``b`` bit for bit (see ``events.Event.state_at``)."""
    mix = (lambda u, v: (u + v) * 0.5) if t == 0.5 else (lambda u, v: u + (v - u) * t)  # noqa: E731
    return ObjectState(
        x=mix(a.x, b.x),
        y=mix(a.y, b.y),
        radius=mix(a.radius, b.radius),
        angle=mix(a.angle, b.angle),
        rgb=tuple(mix(u, v) for u, v in zip(a.rgb, b.rgb)),  # type: ignore[arg-type]
        alpha=mix(a.alpha, b.alpha),
    )


class Background(NamedTuple):
    """A base colour plus a smooth texture: a few low-frequency plane waves added to every channel."""

    rgb: tuple[float, float, float]
    waves: tuple[tuple[float, float, float, float], ...]  # (cycles across x, cycles across y, phase, amplitude)


def sample_background(rng: np.random.Generator) -> Background:
    """Low saturation, mid-dark brightness (max channel about 65-140), so no global threshold separates
    objects from it (blue objects are darker than bright backgrounds), yet every object colour differs in hue."""
    hue = rng.uniform(0.0, 1.0)
    saturation = rng.uniform(0.0, 0.2)
    value = rng.uniform(0.25, 0.55)
    rgb = tuple(255.0 * c for c in _hsv_to_rgb(hue, saturation, value))
    waves = tuple(
        (rng.uniform(0.3, 1.5), rng.uniform(0.3, 1.5), rng.uniform(0, 2 * math.pi), rng.uniform(3.0, 6.0))
        for _ in range(3)
    )
    return Background(rgb=rgb, waves=waves)  # type: ignore[arg-type]


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def sample_objects(rng: np.random.Generator, count: int) -> list[ObjectSpec]:
    """``count`` objects with pairwise different colours, so "the red circle" always names one object."""
    colors = rng.choice(len(COLORS), size=count, replace=False)
    names = list(COLORS)
    return [
        ObjectSpec(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            color=names[int(c)],
            size=SIZES[int(rng.integers(len(SIZES)))],
        )
        for c in colors
    ]


def base_radius(size: str, *, height: int, width: int) -> float:
    return RADIUS_FRACTION[size] * min(height, width)


def margin(*, height: int, width: int) -> float:
    return MARGIN_FRACTION * min(height, width)


def inside(x: float, y: float, radius: float, *, height: int, width: int) -> bool:
    """True when the circumcircle lies inside the frame, margin included."""
    m = margin(height=height, width=width)
    return m + radius <= x <= width - m - radius and m + radius <= y <= height - m - radius


def place_objects(
    rng: np.random.Generator,
    objects: list[ObjectSpec],
    *,
    height: int,
    width: int,
    random_angle: bool,
    separated: bool,
    attempts: int = 200,
) -> list[ObjectState] | None:
    """Initial states inside the frame.

    ``separated`` asks for scenes whose spatial relations are clear (still images): no two circumcircles
    touch, and for every pair one axis dominates (``max(|dx|, |dy|) >= 1.5 min(|dx|, |dy|)``). Without it,
    objects only avoid heavy overlap. Returns None when no placement was found in ``attempts`` tries.
    """
    m = margin(height=height, width=width)
    radii = [base_radius(o.size, height=height, width=width) for o in objects]
    for _ in range(attempts):
        xs = [rng.uniform(m + r, width - m - r) for r in radii]
        ys = [rng.uniform(m + r, height - m - r) for r in radii]
        ok = True
        for i in range(len(objects)):
            for j in range(i + 1, len(objects)):
                dx, dy = abs(xs[i] - xs[j]), abs(ys[i] - ys[j])
                dist = math.hypot(dx, dy)
                if separated:
                    ok &= dist >= radii[i] + radii[j] + 2 and max(dx, dy) >= 1.5 * min(dx, dy)
                else:
                    ok &= dist >= 0.8 * (radii[i] + radii[j])
        if ok:
            return [
                ObjectState(
                    x=float(x),
                    y=float(y),
                    radius=r,
                    angle=float(rng.uniform(0.0, 360.0)) if random_angle and o.shape != "circle" else 0.0,
                    rgb=tuple(float(c) for c in COLORS[o.color]),  # type: ignore[arg-type]
                    alpha=1.0,
                )
                for o, x, y, r in zip(objects, xs, ys, radii)
            ]
    return None


def relation(a: ObjectState, b: ObjectState) -> str:
    """Where ``a`` is relative to ``b`` along the dominant axis of their centroids: one of
    "left of", "right of", "above", "below"."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def region(state: ObjectState, *, height: int, width: int) -> str:
    """The cell of a 3x3 grid holding the centre: "top left", "top", ..., "center", ..., "bottom right"."""
    col = min(2, int(3 * state.x / width))
    row = min(2, int(3 * state.y / height))
    names = [["top left", "top", "top right"], ["left", "center", "right"], ["bottom left", "bottom", "bottom right"]]
    return names[row][col]
