"""Properties of the frame-index samplers (seqvision.sampling)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqvision import sampling

clip_lengths = st.integers(min_value=1, max_value=400)
frame_counts = st.integers(min_value=1, max_value=48)
strides = st.integers(min_value=1, max_value=6)
methods = st.sampled_from(sampling.METHODS)
ids = st.text(min_size=0, max_size=12)

FAST = settings(max_examples=150, deadline=None)


def _check_sample(s: sampling.Sample, n: int, t: int) -> None:
    assert s.indices.dtype == np.int64
    assert s.indices.shape == (t,)
    assert 1 <= s.num_valid <= t
    assert s.indices.min() >= 0 and s.indices.max() < n
    assert np.all(np.diff(s.indices) >= 0), "indices must be sorted"
    # the real samples are distinct; the padding repeats the last real one
    real = s.indices[: s.num_valid]
    assert np.all(np.diff(real) > 0)
    assert np.all(s.indices[s.num_valid :] == real[-1])


@FAST
@given(n=clip_lengths, t=frame_counts, stride=strides, method=methods, train=st.booleans(), key=ids)
def test_indices_in_range_sorted_and_fixed_length(n, t, stride, method, train, key):
    s = sampling.sample(n, method=method, num_frames=t, frame_stride=stride, train=train, seed=3, key=key)
    _check_sample(s, n, t)


@FAST
@given(n=clip_lengths, t=frame_counts, stride=strides, method=methods, train=st.booleans(), key=ids)
def test_deterministic_given_seed_and_id(n, t, stride, method, train, key):
    kw = dict(method=method, num_frames=t, frame_stride=stride, train=train, key=key)
    a = sampling.sample(n, seed=7, **kw)
    b = sampling.sample(n, seed=7, **kw)
    assert np.array_equal(a.indices, b.indices) and a.num_valid == b.num_valid


@FAST
@given(n=clip_lengths, t=frame_counts)
def test_uniform_spans_the_clip_evenly(n, t):
    s = sampling.uniform(n, t)
    if n >= t:
        assert s.num_valid == t
        if t > 1:
            assert s.indices[0] == 0 and s.indices[-1] == n - 1
            gaps = np.diff(s.indices)
            assert gaps.max() - gaps.min() <= 1  # as even as integer positions allow
    # uniform ignores train/seed/key entirely
    other = sampling.sample(n, method="uniform", num_frames=t, train=True, seed=99, key="x")
    assert np.array_equal(s.indices, other.indices)


@FAST
@given(n=clip_lengths, t=frame_counts, train=st.booleans(), seed=st.integers(0, 2**31), key=ids)
def test_segment_draws_one_index_per_segment(n, t, train, seed, key):
    s = sampling.sample(n, method="segment", num_frames=t, train=train, seed=seed, key=key)
    if n < t:
        return  # short clip: covered by test_short_clip_rule
    bounds = sampling.segment_bounds(n, t)
    assert np.all(bounds[1:] - bounds[:-1] >= 1)
    for i, index in enumerate(s.indices):
        assert bounds[i] <= index < bounds[i + 1], (i, index, bounds)
    if not train:  # eval: the centre of each segment
        assert np.array_equal(s.indices, (bounds[:-1] + bounds[1:]) // 2)


def test_segment_train_is_random_across_ids_but_not_across_runs():
    draws = {tuple(sampling.sample(300, method="segment", num_frames=8, train=True, key=f"v{i}").indices)
             for i in range(20)}
    assert len(draws) > 1, "different ids should get different segment draws"
    a = sampling.sample(300, method="segment", num_frames=8, train=True, seed=0, key="v1")
    b = sampling.sample(300, method="segment", num_frames=8, train=True, seed=1, key="v1")
    assert not np.array_equal(a.indices, b.indices), "the seed must matter"


@FAST
@given(n=clip_lengths, t=frame_counts, stride=strides, train=st.booleans(), key=ids)
def test_dense_is_consecutive_with_stride(n, t, stride, train, key):
    s = sampling.sample(n, method="dense", num_frames=t, frame_stride=stride, train=train, key=key)
    real = s.indices[: s.num_valid]
    assert np.all(np.diff(real) == stride)
    span = (t - 1) * stride + 1
    if n >= span:
        assert s.num_valid == t
        if not train:  # centred window
            assert abs(real[0] - (n - 1 - real[-1])) <= 1


@FAST
@given(n=st.integers(1, 47), t=st.integers(2, 48), method=methods, train=st.booleans(), key=ids)
def test_short_clip_rule(n, t, method, train, key):
    """Fewer source frames than needed: every real frame once, then the last real frame repeated."""
    if n >= t:
        n, t = t - 1, t
    if n < 1:
        return
    stride = 1
    s = sampling.sample(n, method=method, num_frames=t, frame_stride=stride, train=train, key=key)
    assert s.num_valid == n
    assert np.array_equal(s.indices, np.concatenate([np.arange(n), np.full(t - n, n - 1)]))


def test_short_clip_rule_dense_keeps_stride():
    s = sampling.dense(7, 5, frame_stride=2, train=False)  # needs 9 frames, has 7
    assert s.indices.tolist() == [0, 2, 4, 6, 6] and s.num_valid == 4


def test_empty_clip_and_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="at least one frame"):
        sampling.uniform(0, 4)
    with pytest.raises(ValueError, match="needs an rng"):
        sampling.segment(10, 4, train=True)
    with pytest.raises(ValueError, match="unknown sampling method"):
        sampling.sample(10, method="random", num_frames=4)  # type: ignore[arg-type]
