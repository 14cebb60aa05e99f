"""Power laws fitted to measurements, with bootstrap intervals, and the verdicts that follow from them.

:func:`fit_power_law` fits y = c * N^k by least squares on log y vs log N (medians of the repeats, large-N points
only: at small N fixed costs dominate and the slope says nothing about the asymptote). The 95% interval of k is the
union of two bootstrap intervals (Efron & Tibshirani 1993, ch. 6 and 9): one resamples the repeats within each N
(measurement noise; stratified, so every resample keeps the ladder), the other the residuals of the fitted line
(lack of fit; deterministic measurements such as memory have no spread between repeats). Neither says where a
curve still bending towards its asymptote will end; :attr:`PowerFit.local_slopes` shows the bend, and
:func:`verdict` calls that "depends on N".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

VERDICTS = ("agrees", "disagrees", "depends on N", "inconclusive")


@dataclass(frozen=True)
class PowerFit:
    """y ~ exp(intercept) * N^exponent on the points ``n_fitted``; [low, high] its bootstrap interval.

    ``local_slopes``: log-log slope between each pair of consecutive N over the whole ladder (medians), keyed by
    the upper N of the pair. ``method``: which bootstrap intervals were joined: "repeats" (within each N),
    "residuals" (of the fit; needs >= 3 points), or both ("repeats+residuals").
    """

    exponent: float
    low: float
    high: float
    intercept: float
    n_fitted: tuple[float, ...]
    local_slopes: tuple[tuple[float, float], ...]
    confidence: float
    resamples: int
    method: str

    def to_json(self) -> dict[str, Any]:
        return {k: (list(map(list, v)) if k == "local_slopes" else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PowerFit:
        return cls(**{**data, "n_fitted": tuple(data["n_fitted"]),
                      "local_slopes": tuple(tuple(p) for p in data["local_slopes"])})


def _slope_intercept(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope and intercept along the last axis: x (P,), y (..., P)."""
    xc = x - x.mean()
    slope = (y * xc).sum(-1) / (xc**2).sum()
    return slope, y.mean(-1) - slope * x.mean()


def fit_power_law(
    n: Sequence[float],
    values: Sequence[Sequence[float]],
    *,
    min_n: float = 0.0,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PowerFit:
    """Fit y = c N^k to ``values[i]`` (the repeats measured at ``n[i]``) over the points with n >= ``min_n``.

    Needs at least two fitted points with positive values; points whose repeats all failed (empty) are skipped.
    Raises ValueError otherwise.
    """
    points = [(float(x), np.asarray(v, dtype=float)) for x, v in zip(n, values) if len(v) > 0]
    points.sort(key=lambda p: p[0])
    if any(bool((v <= 0).any()) for _, v in points):
        raise ValueError("a power law needs positive values; got zero or negative measurements")
    medians = np.array([np.median(v) for _, v in points])
    xs_all = np.log([x for x, _ in points])
    local = tuple(
        (points[i + 1][0], float((math.log(medians[i + 1]) - math.log(medians[i])) / (xs_all[i + 1] - xs_all[i])))
        for i in range(len(points) - 1)
    )
    fitted = [(x, v) for x, v in points if x >= min_n]
    if len({x for x, _ in fitted}) < 2:
        raise ValueError(f"need measurements at >= 2 values of N >= {min_n:g} to fit an exponent, got {len(fitted)}")
    x = np.log([p[0] for p in fitted])
    y = np.log([np.median(p[1]) for p in fitted])
    slope, intercept = _slope_intercept(x, y)

    rng = np.random.default_rng(seed)
    tail = (1 - confidence) / 2
    intervals, methods = [], []
    if all(len(v) >= 2 for _, v in fitted):  # measurement noise: resample the repeats within each N
        boot_y = np.stack([
            np.log(np.median(v[rng.integers(0, len(v), size=(resamples, len(v)))], axis=1)) for _, v in fitted
        ], axis=-1)  # (R, P)
        intervals.append(np.quantile(_slope_intercept(x, boot_y)[0], [tail, 1 - tail]))
        methods.append("repeats")
    if len(fitted) >= 3:  # lack of fit: resample the residuals of the fitted line
        residuals = y - (slope * x + intercept)
        residuals = residuals * math.sqrt(len(x) / (len(x) - 2))  # unbiased scale for 2 fitted parameters
        boot_y = slope * x + intercept + residuals[rng.integers(0, len(x), size=(resamples, len(x)))]
        intervals.append(np.quantile(_slope_intercept(x, boot_y)[0], [tail, 1 - tail]))
        methods.append("residuals")
    if not intervals:
        raise ValueError("with one value per N, need >= 3 values of N to bootstrap an interval")
    low, high = min(i[0] for i in intervals), max(i[1] for i in intervals)
    method = "+".join(methods)
    return PowerFit(
        exponent=float(slope), low=float(low), high=float(high), intercept=float(intercept),
        n_fitted=tuple(p[0] for p in fitted), local_slopes=local, confidence=confidence, resamples=resamples,
        method=method,
    )


@dataclass(frozen=True)
class Verdict:
    """A cell of the seed's table: the claim, what was measured, and whether the measurement bears it out."""

    label: str  # one of VERDICTS
    claim: str  # e.g. "O(N^2)"
    measured: str  # e.g. "N^1.93 [1.88, 1.97] (N >= 256)"
    reason: str  # one sentence

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def big_o(exponent: float) -> str:
    return "O(1)" if exponent == 0 else "O(N)" if exponent == 1 else f"O(N^{exponent:g})"


def verdict(fit: PowerFit, claimed: float, *, tolerance: float = 0.25) -> Verdict:
    """Compare a fitted exponent with the claimed one (``claimed`` = 1 for O(N), 2 for O(N^2), 0 for O(1)).

    - "agrees": the whole interval lies within ``claimed +- tolerance``;
    - "depends on N": the interval lies below that band but the local slope over the fitted range rose by at least
      ``tolerance`` towards the claim (lower-order costs still dominate; the claimed regime starts at larger N);
    - "disagrees": the interval lies entirely outside the band otherwise;
    - "inconclusive": the interval straddles an edge of the band (too noisy to say).
    """
    measured = f"N^{fit.exponent:.2f} [{fit.low:.2f}, {fit.high:.2f}] (N {min(fit.n_fitted):g}-{max(fit.n_fitted):g})"
    lo_band, hi_band = claimed - tolerance, claimed + tolerance
    claim = big_o(claimed)
    in_range = [s for upper, s in fit.local_slopes if upper > min(fit.n_fitted) and upper <= max(fit.n_fitted)]
    if fit.low >= lo_band and fit.high <= hi_band:
        return Verdict("agrees", claim, measured, f"the fitted exponent is within {tolerance:g} of {claimed:g}")
    if fit.high < lo_band:
        if len(in_range) >= 2 and in_range[-1] - in_range[0] >= tolerance and in_range[-1] > fit.exponent:
            return Verdict(
                "depends on N", claim, measured,
                f"grows slower than claimed over the measured range, but the local slope rises from "
                f"{in_range[0]:.2f} to {in_range[-1]:.2f}: lower-order costs dominate up to N={max(fit.n_fitted):g}",
            )
        return Verdict("disagrees", claim, measured, f"grows slower than {claim} with no sign of bending towards it")
    if fit.low > hi_band:
        return Verdict("disagrees", claim, measured, f"grows faster than {claim}")
    return Verdict("inconclusive", claim, measured, "the interval straddles the claim's tolerance band")


def combine(verdicts: Mapping[str, Verdict], *, depends_on: str) -> str:
    """One table cell from several variants' verdicts: their common label, or "depends on <depends_on>"."""
    labels = {v.label for v in verdicts.values()}
    if len(labels) == 1:
        return labels.pop()
    return f"depends on {depends_on}: " + ", ".join(f"{name} {v.label}" for name, v in verdicts.items())


def ratio_interval(numerator: Sequence[float], denominator: Sequence[float], *, resamples: int = 2000,
                   confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """median(numerator) / median(denominator) and its bootstrap interval (repeats resampled on both sides).

    Returns (ratio, low, high); NaNs when either side has no values.
    """
    a, b = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    if a.size == 0 or b.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    boot = (np.median(a[rng.integers(0, a.size, size=(resamples, a.size))], axis=1)
            / np.median(b[rng.integers(0, b.size, size=(resamples, b.size))], axis=1))
    tail = (1 - confidence) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    return float(np.median(a) / np.median(b)), float(low), float(high)
