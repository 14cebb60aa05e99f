"""A small numpy renderer: anti-aliased shapes over a textured, noisy background.

Anti-aliasing is 2x2 supersampling: each shape's inside-test runs on a grid twice as fine in both axes,
and the four samples of a pixel are averaged into its coverage in [0, 1].
"""

from __future__ import annotations

import math

import numpy as np

from .scene import Background, ObjectSpec, ObjectState

SUPERSAMPLE = 2

# Shape geometry in units of the circumradius R (the shape fits the circle of radius R at every angle).
CIRCLE_RADIUS = 0.9
SQUARE_HALF_SIDE = 0.7  # circumradius 0.99 R
DIAMOND_HALF_WIDTH = 0.5  # an elongated rhombus (2:1), never mistaken for a square turned by 45 degrees
DIAMOND_HALF_HEIGHT = 1.0


def _sample_grid(rows: range, cols: range) -> tuple[np.ndarray, np.ndarray]:
    """Sample-point coordinates in pixel units of the pixels ``rows`` x ``cols``: (len(rows)*S, len(cols)*S) each."""
    s = SUPERSAMPLE
    ys = (np.arange(rows.start * s, rows.stop * s) + 0.5) / s
    xs = (np.arange(cols.start * s, cols.stop * s) + 0.5) / s
    return np.meshgrid(ys, xs, indexing="ij")


def coverage(shape: str, state: ObjectState, *, height: int, width: int) -> np.ndarray:
    """Fraction of each pixel the shape covers: float64 (H, W) in [0, 1], alpha not applied.

    Only the pixels of the circumcircle's bounding box (plus one) are sampled: every shape lies inside its
    circumcircle, and each sample's value is computed exactly as on the full grid.
    """
    out = np.zeros((height, width))
    rows = range(max(0, math.floor(state.y - state.radius) - 1), min(height, math.ceil(state.y + state.radius) + 2))
    cols = range(max(0, math.floor(state.x - state.radius) - 1), min(width, math.ceil(state.x + state.radius) + 2))
    if not rows or not cols:
        return out
    gy, gx = _sample_grid(rows, cols)
    # Object-local coordinates, unrotated: screen y points down, so a positive angle turns counter-clockwise.
    theta = math.radians(state.angle)
    dx, dy = gx - state.x, state.y - gy  # (h*S, w*S), dy upwards
    u = (dx * math.cos(theta) + dy * math.sin(theta)) / state.radius
    v = (-dx * math.sin(theta) + dy * math.cos(theta)) / state.radius
    if shape == "circle":
        inside = u * u + v * v <= CIRCLE_RADIUS**2
    elif shape == "square":
        inside = (np.abs(u) <= SQUARE_HALF_SIDE) & (np.abs(v) <= SQUARE_HALF_SIDE)
    elif shape == "diamond":
        inside = np.abs(u) / DIAMOND_HALF_WIDTH + np.abs(v) / DIAMOND_HALF_HEIGHT <= 1.0
    elif shape == "triangle":
        # Equilateral, circumradius 1, apex up: inside all three edges (each at distance 1/2 from the centre).
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            phi = math.radians(90.0 + 120.0 * k) + math.pi  # outward normal of the edge opposite vertex k
            inside &= u * math.cos(phi) + v * math.sin(phi) <= 0.5
    else:
        raise ValueError(f"unknown shape {shape!r}")
    s = SUPERSAMPLE
    out[rows.start : rows.stop, cols.start : cols.stop] = inside.reshape(len(rows), s, len(cols), s).mean(axis=(1, 3))
    return out


def background_image(background: Background, *, height: int, width: int) -> np.ndarray:
    """Base colour plus smooth texture: float64 (H, W, 3), 0..255 scale."""
    ys, xs = np.meshgrid(np.arange(height) / height, np.arange(width) / width, indexing="ij")
    texture = np.zeros((height, width))
    for fx, fy, phase, amplitude in background.waves:
        texture += amplitude * np.sin(2 * math.pi * (fx * xs + fy * ys) + phase)
    return np.asarray(background.rgb, dtype=np.float64)[None, None, :] + texture[:, :, None]


def compose(
    base: np.ndarray,
    objects: tuple[ObjectSpec, ...] | list[ObjectSpec],
    states: list[ObjectState],
    *,
    cache: dict | None = None,
) -> np.ndarray:
    """Paint objects (in index order, later ones on top) over ``base`` (H, W, 3) float; returns a new array.

    ``cache`` maps (shape, x, y, radius, angle) -> coverage, so objects that did not move are not redrawn.
    """
    height, width = base.shape[:2]
    image = base.copy()
    for spec, state in zip(objects, states):
        if state.alpha <= 0.0:
            continue
        key = (spec.shape, state.x, state.y, state.radius, state.angle)
        cov = cache.get(key) if cache is not None else None
        if cov is None:
            cov = coverage(spec.shape, state, height=height, width=width)
            if cache is not None:
                cache[key] = cov
        weight = (state.alpha * cov)[:, :, None]
        image = image * (1.0 - weight) + np.asarray(state.rgb)[None, None, :] * weight
    return image


def finish(image: np.ndarray, rng: np.random.Generator, *, noise_std: float) -> np.ndarray:
    """Add per-pixel Gaussian noise and quantise: uint8 (H, W, 3)."""
    if noise_std > 0:
        image = image + rng.normal(0.0, noise_std, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_frames(
    objects: tuple[ObjectSpec, ...] | list[ObjectSpec],
    states_per_frame: list[list[ObjectState]],
    background: Background,
    rng: np.random.Generator,
    *,
    height: int,
    width: int,
    noise_std: float,
) -> np.ndarray:
    """Render a clip: uint8 (T, H, W, 3) RGB. ``rng`` draws the per-frame noise only."""
    base = background_image(background, height=height, width=width)
    cache: dict = {}
    out = np.empty((len(states_per_frame), height, width, 3), dtype=np.uint8)
    for t, states in enumerate(states_per_frame):
        out[t] = finish(compose(base, objects, states, cache=cache), rng, noise_std=noise_std)
        if len(cache) > 64:  # moving objects never repeat a key; keep the cache small
            cache.clear()
    return out


def bounding_box(cov: np.ndarray) -> list[int]:
    """COCO box ``[x, y, width, height]`` (pixels) of every pixel with non-zero coverage."""
    rows = np.flatnonzero(cov.any(axis=1))
    cols = np.flatnonzero(cov.any(axis=0))
    if rows.size == 0:
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
