"""Pure frame-index samplers: which ``num_frames`` source frames represent a clip.

Every sampler maps ``num_source_frames`` (N) to a :class:`Sample`: ``indices`` is an int64 array of exactly
``num_frames`` (T) source-frame positions, sorted (non-decreasing) and in ``[0, N)``; ``num_valid`` counts
the leading indices that are real, distinct samples.

- ``uniform``  T positions evenly spaced over the whole clip, first and last frame included
  (``round(i * (N - 1) / (T - 1))``). No randomness.
- ``segment``  TSN (Wang et al., 2016, "Temporal Segment Networks", arXiv:1608.00859): the clip is cut
  into T equal segments ``[i*N//T, (i+1)*N//T)`` and one frame is drawn from each, uniformly at random when
  ``train`` is true, the segment centre otherwise.
- ``dense``    T consecutive frames ``frame_stride`` apart (a SlowFast-style window spanning
  ``(T - 1) * frame_stride + 1`` frames), starting at a random offset when ``train`` is true and centred
  otherwise.

Short-clip rule (a clip with fewer source frames than the sampler needs: N < T for ``uniform`` and
``segment``, N < ``(T - 1) * frame_stride + 1`` for ``dense``): the sampler takes every position it can
(``0, 1, .., N-1``; for ``dense`` ``0, s, 2s, ..`` while < N), sets ``num_valid`` to their count, and fills
the remaining ``T - num_valid`` slots by repeating the last real index. Downstream code therefore sees a
fixed T and uses ``num_valid`` as the clip length (``ClipBatch.lengths``). For N >= what is needed,
``num_valid == T``. An empty clip (N = 0) is an error: there is nothing to repeat.

Randomness (``segment``/``dense`` in train) comes from :func:`rng_for`, seeded by the run seed and a stable
hash of the record id, so a given (seed, id) always yields the same indices, independent of order,
process or ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import hashlib
from typing import Literal, NamedTuple

import numpy as np

Method = Literal["uniform", "segment", "dense"]
METHODS: tuple[Method, ...] = ("uniform", "segment", "dense")


class Sample(NamedTuple):
    indices: np.ndarray  # int64 (T,), sorted, each in [0, num_source_frames)
    num_valid: int  # leading real samples; indices[num_valid:] repeat indices[num_valid - 1]


def rng_for(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``key`` (e.g. a record id)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


def _check(num_source_frames: int, num_frames: int) -> None:
    if num_source_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got num_source_frames={num_source_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")


def _pad(real: np.ndarray, num_frames: int) -> Sample:
    """The short-clip rule: keep the real indices, repeat the last one up to ``num_frames``."""
    num_valid = len(real)
    pad = np.full(num_frames - num_valid, real[-1], dtype=np.int64)
    return Sample(np.concatenate([real.astype(np.int64), pad]), num_valid)


def uniform(num_source_frames: int, num_frames: int) -> Sample:
    """``num_frames`` evenly spaced indices over the clip, first and last included."""
    _check(num_source_frames, num_frames)
    n, t = num_source_frames, num_frames
    if n < t:
        return _pad(np.arange(n), t)
    if t == 1:
        return Sample(np.array([(n - 1) // 2], dtype=np.int64), 1)
    # floor(x + 0.5) rather than np.round: banker's rounding could map two neighbours to one frame.
    positions = np.arange(t, dtype=np.int64) * (n - 1)
    return Sample((2 * positions + (t - 1)) // (2 * (t - 1)), t)  # == floor(i*(n-1)/(t-1) + 1/2)


def segment_bounds(num_source_frames: int, num_frames: int) -> np.ndarray:
    """int64 (T + 1,): segment i is ``[bounds[i], bounds[i + 1])``; each holds >= 1 frame when N >= T."""
    return np.arange(num_frames + 1, dtype=np.int64) * num_source_frames // num_frames


def segment(
    num_source_frames: int, num_frames: int, *, train: bool, rng: np.random.Generator | None = None
) -> Sample:
    """TSN sampling: one index per equal segment; random within it if ``train`` (needs ``rng``), else centre."""
    _check(num_source_frames, num_frames)
    n, t = num_source_frames, num_frames
    if n < t:
        return _pad(np.arange(n), t)
    bounds = segment_bounds(n, t)
    low, high = bounds[:-1], bounds[1:]
    if train:
        if rng is None:
            raise ValueError("segment sampling in train mode needs an rng (see rng_for)")
        return Sample(rng.integers(low, high).astype(np.int64), t)
    return Sample((low + high) // 2, t)  # <= high - 1 because every segment is non-empty


def dense(
    num_source_frames: int,
    num_frames: int,
    *,
    frame_stride: int,
    train: bool,
    rng: np.random.Generator | None = None,
) -> Sample:
    """``num_frames`` indices ``frame_stride`` apart; random start if ``train`` (needs ``rng``), else centred."""
    _check(num_source_frames, num_frames)
    if frame_stride < 1:
        raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
    n, t = num_source_frames, num_frames
    span = (t - 1) * frame_stride + 1
    if n < span:
        return _pad(np.arange(0, n, frame_stride), t)
    if train:
        if rng is None:
            raise ValueError("dense sampling in train mode needs an rng (see rng_for)")
        start = int(rng.integers(0, n - span + 1))
    else:
        start = (n - span) // 2
    return Sample(start + np.arange(t, dtype=np.int64) * frame_stride, t)


def sample(
    num_source_frames: int,
    *,
    method: Method,
    num_frames: int,
    frame_stride: int = 1,
    train: bool = False,
    seed: int = 0,
    key: str = "",
) -> Sample:
    """Dispatch to one sampler; randomness (train only) is drawn from ``rng_for(seed, key)``."""
    if method == "uniform":
        return uniform(num_source_frames, num_frames)
    rng = rng_for(seed, key) if train else None
    if method == "segment":
        return segment(num_source_frames, num_frames, train=train, rng=rng)
    if method == "dense":
        return dense(num_source_frames, num_frames, frame_stride=frame_stride, train=train, rng=rng)
    raise ValueError(f"unknown sampling method {method!r}; expected one of {', '.join(METHODS)}")
