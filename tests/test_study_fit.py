"""Power-law fits recover known exponents with honest intervals; verdicts follow from the fits."""

from __future__ import annotations

import numpy as np
import pytest

from seqvision.study.fit import PowerFit, combine, fit_power_law, verdict

LADDER = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def synthetic(exponent: float, *, seed: int, noise: float = 0.08, repeats: int = 5, constant: float = 0.0):
    """Timings c * N^k (+ a constant) with multiplicative log-normal noise, ``repeats`` per N."""
    rng = np.random.default_rng(seed)
    return [list((1e-6 * n**exponent + constant) * np.exp(rng.normal(0, noise, repeats))) for n in LADDER]


@pytest.mark.parametrize("exponent", [1.0, 2.0])
def test_recovers_a_known_exponent_within_its_interval(exponent):
    fit = fit_power_law(LADDER, synthetic(exponent, seed=1), min_n=256)
    assert fit.low <= exponent <= fit.high
    assert abs(fit.exponent - exponent) < 0.05
    assert fit.high - fit.low < 0.2, "five points with 8% noise should pin the exponent down"
    assert fit.n_fitted == (256, 512, 1024, 2048, 4096) and fit.method == "repeats+residuals"
    other = 2.0 if exponent == 1.0 else 1.0
    assert not fit.low <= other <= fit.high


@pytest.mark.parametrize("exponent", [1.0, 2.0])
def test_interval_covers_the_truth_in_most_repetitions(exponent):
    covered = sum(
        fit.low <= exponent <= fit.high
        for fit in (fit_power_law(LADDER, synthetic(exponent, seed=s), min_n=256, resamples=500) for s in range(40))
    )
    # A nominal 95% percentile bootstrap over 5 repeats under-covers somewhat; it must not be far off.
    assert covered >= 32, f"covered {covered}/40"


def test_single_values_per_n_use_the_residual_bootstrap():
    values = [[v[0]] for v in synthetic(1.0, seed=3)]
    fit = fit_power_law(LADDER, values, min_n=128)
    assert fit.method == "residuals" and fit.low <= 1.0 <= fit.high


def test_identical_repeats_still_get_an_interval_from_the_lack_of_fit():
    """Memory is deterministic: no spread between repeats, but points off the line must widen the interval."""
    rng = np.random.default_rng(4)
    values = [[1e3 * n * float(np.exp(rng.normal(0, 0.1)))] * 5 for n in LADDER]
    fit = fit_power_law(LADDER, values, min_n=256)
    assert fit.high - fit.low > 0.02 and fit.low <= 1.0 <= fit.high
    exact = fit_power_law(LADDER, [[1e3 * n] * 5 for n in LADDER], min_n=256)
    assert abs(exact.exponent - 1) < 1e-9 and exact.high - exact.low < 1e-9


def test_rejects_what_cannot_be_fitted():
    with pytest.raises(ValueError, match=">= 2 values of N"):
        fit_power_law([16, 32], [[1.0, 1.1], [2.0, 2.1]], min_n=32)
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([16, 32, 64], [[1.0], [0.0], [2.0]])
    # Failed cells (no repeats) are skipped, not treated as zeros.
    fit = fit_power_law([16, 32, 64, 128], [[1.0, 1.0], [], [4.0, 4.0], [8.0, 8.0]])
    assert fit.n_fitted == (16, 64, 128) and abs(fit.exponent - 1.0) < 1e-9


def test_local_slopes_show_the_bend_of_a_quadratic_with_a_linear_term():
    n = np.array(LADDER, dtype=float)
    values = [[v] * 3 for v in 1e-3 * n + 1e-6 * n**2]  # quadratic overtakes linear at N = 1000
    fit = fit_power_law(LADDER, values)
    slopes = [s for _, s in fit.local_slopes]
    assert slopes == sorted(slopes) and slopes[0] < 1.05 and slopes[-1] > 1.7


def _fit(exponent, low, high, slopes=((512, 1.0), (1024, 1.0), (2048, 1.0), (4096, 1.0))):
    return PowerFit(exponent, low, high, 0.0, (256, 512, 1024, 2048, 4096), slopes, 0.95, 100, "repeats")


def test_verdicts():
    assert verdict(_fit(1.02, 0.95, 1.08), 1).label == "agrees"
    assert verdict(_fit(2.0, 1.95, 2.05), 1).label == "disagrees"  # naive attention memory vs "O(N)"
    assert verdict(_fit(1.0, 0.97, 1.03), 2).label == "disagrees"  # no bend towards N^2
    bending = _fit(1.4, 1.35, 1.45, ((512, 1.1), (1024, 1.3), (2048, 1.5), (4096, 1.7)))
    v = verdict(bending, 2)
    assert v.label == "depends on N" and "1.10 to 1.70" in v.reason
    assert verdict(_fit(1.0, 0.6, 1.5), 1).label == "inconclusive"
    assert v.claim == "O(N^2)" and v.measured.startswith("N^1.40 [1.35, 1.45]")


def test_combine_names_what_a_mixed_cell_depends_on():
    agree, disagree = verdict(_fit(1.0, 0.98, 1.02), 1), verdict(_fit(2.0, 1.98, 2.02), 1)
    assert combine({"fused": agree, "naive": agree}, depends_on="kernel") == "agrees"
    assert combine({"fused": agree, "naive": disagree}, depends_on="the attention kernel") == (
        "depends on the attention kernel: fused agrees, naive disagrees"
    )


def test_fit_from_real_synthetic_data_feeds_a_verdict_end_to_end():
    fit = fit_power_law(LADDER, synthetic(2.0, seed=5, constant=0.0), min_n=256)
    assert verdict(fit, 2).label == "agrees"
    fit = fit_power_law(LADDER, synthetic(1.0, seed=5), min_n=256)
    assert verdict(fit, 2).label == "disagrees"
    assert fit.to_json()["local_slopes"][0][0] == 32
