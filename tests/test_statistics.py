"""Seed-level statistics (seqvision.metrics): t-intervals over seeds, the paired two-level bootstrap, Holm, verdicts.

Every number is checked against a known answer: a statistics table, a hand-worked example, or the coverage of the
interval on fabricated data whose true difference is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from seqvision import content, metrics

# --------------------------------------------------------------------------------------------------------
# Student's t and the interval over seeds


@pytest.mark.parametrize(("probability", "df", "table"), [
    (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 4, 2.776), (0.975, 9, 2.262), (0.975, 30, 2.042),
    (0.995, 10, 3.169), (0.95, 3, 2.353), (0.025, 2, -4.303), (0.975, math.inf, 1.960),
])
def test_t_quantiles_match_the_statistics_table(probability, df, table):
    assert metrics.t_quantile(probability, df) == pytest.approx(table, abs=5e-4)
    assert metrics.student_t_cdf(metrics.t_quantile(probability, df), df) == pytest.approx(probability, abs=1e-9)


def test_t_cdf_closed_forms():
    # df = 1 is the Cauchy distribution, df = 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    for t in (-7.0, -1.0, 0.0, 0.3, 2.5, 40.0):
        assert metrics.student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert metrics.student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    with pytest.raises(ValueError, match="degrees of freedom"):
        metrics.student_t_cdf(1.0, 0)


def test_seed_summary_is_the_mean_and_its_t_interval():
    summary = metrics.seed_summary([1.0, 2.0, 3.0])
    half = 4.302653 * 1.0 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(n), s = 1
    assert summary["mean"] == 2.0 and summary["std"] == pytest.approx(1.0) and summary["seeds"] == [1.0, 2.0, 3.0]
    assert summary["ci95"] == pytest.approx([2.0 - half, 2.0 + half], abs=1e-5)
    # A single seed: the mean, and no interval (no spread to estimate from).
    assert metrics.seed_summary([0.7]) == {"mean": 0.7, "std": None, "ci95": None, "seeds": [0.7]}
    # A seed without a value (an undefined metric): nothing to summarise.
    assert metrics.seed_summary([0.5, None])["mean"] is None
    assert metrics.seed_summary([0.4, 0.4, 0.4])["ci95"] == pytest.approx([0.4, 0.4])


def test_t_interval_over_seeds_covers_the_true_mean_at_its_nominal_rate():
    rng = np.random.default_rng(0)
    hits = [metrics.seed_summary(list(rng.normal(0.6, 0.05, 3)))["ci95"] for _ in range(2000)]
    coverage = np.mean([low <= 0.6 <= high for low, high in hits])
    assert 0.935 <= coverage <= 0.965


def test_holm_adjusts_step_down_and_stays_monotone():
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06.
    assert metrics.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert metrics.holm([0.5]) == [0.5] and metrics.holm([]) == []
    assert metrics.holm([0.3, 0.4, 0.9]) == pytest.approx([0.9, 0.9, 0.9])


# --------------------------------------------------------------------------------------------------------
# The paired two-level bootstrap


def compare(a, b, *, resamples=2000, seed=0):
    """A - B as report._compare computes it: one item draw for both systems, then metrics.compare_resampled."""
    num_items = len(a[0])
    weights = metrics.item_weights(num_items, resamples=resamples, seed=seed)
    return metrics.compare_resampled(metrics.resampled_values(a, weights), metrics.resampled_values(b, weights),
                                     num_items=num_items, seed=seed)


def fabricate(rng, *, seeds=3, items=60, seed_sd=0.0, item_sd=0.0, noise_sd=0.0, shift=0.0, seeds_b=None):
    """Per-item scores of systems A and B on the same items: a difficulty shared by both (the pairing), a
    system x item interaction (``item_sd``), a per-seed offset (``seed_sd``: training variance) and seed x item
    noise. The true difference of their expected corpus means is ``shift``. Tables are (items, 2): score, 1."""
    difficulty = rng.normal(0, 1, items)
    interaction = rng.normal(0, item_sd, items)

    def system(mean, sign, n):
        x = (mean + difficulty + sign * interaction / 2 + rng.normal(0, seed_sd, (n, 1))
             + rng.normal(0, noise_sd, (n, items)))
        return [np.stack([row, np.ones(items)], axis=1) for row in x]

    return system(shift, 1, seeds), system(0.0, -1, seeds if seeds_b is None else seeds_b)


REGIMES = {  # where the variance comes from
    "training seeds": {"seed_sd": 0.2, "item_sd": 0.1, "noise_sd": 0.2},
    "test items": {"seed_sd": 0.0, "item_sd": 0.6, "noise_sd": 0.8},
    "both": {"seed_sd": 0.05, "item_sd": 0.3, "noise_sd": 0.5},
}


@pytest.mark.parametrize("regime", list(REGIMES))
def test_bootstrap_interval_covers_the_true_difference_near_its_nominal_rate(regime):
    """200 fabricated comparisons of 3 seeds x 60 items each; the true difference is 0.1. The interval must cover
    it 0.90-0.99 of the time whether training seeds or test items dominate the variance. A plain percentile
    interval of the same resampling does not: with 3 seeds it covers ~0.8 when seeds dominate."""
    rng = np.random.default_rng(list(REGIMES).index(regime))
    covered = percentile_covered = 0
    variances = []
    for rep in range(200):
        a, b = fabricate(rng, shift=0.1, **REGIMES[regime])
        comparison = compare(a, b, resamples=400, seed=rep)
        covered += comparison.interval[0] <= 0.1 <= comparison.interval[1]
        low, high = comparison.percentile_interval
        percentile_covered += low <= 0.1 <= high
        variances.append(comparison.std_error ** 2)
    assert 0.90 <= covered / 200 <= 0.99
    # The variance of the difference of two 3-seed means over 60 items: seed offsets, the interaction (the item
    # effect that does not cancel in the pair), seed x item noise; each counted once.
    spec = REGIMES[regime]
    expected = spec["seed_sd"] ** 2 * 2 / 3 + spec["item_sd"] ** 2 / 60 + spec["noise_sd"] ** 2 / 60 * 2 / 3
    assert np.mean(variances) == pytest.approx(expected, rel=0.2)
    if regime == "training seeds":
        assert percentile_covered / 200 < 0.88


def test_a_fabricated_tie_is_no_significant_difference():
    rng = np.random.default_rng(5)
    a, b = fabricate(rng, items=150, seed_sd=0.03, item_sd=0.3, noise_sd=0.4, shift=0.0)
    comparison = compare(a, b, seed=0)
    assert comparison.interval[0] < 0 < comparison.interval[1]
    assert comparison.p_value > 0.05
    assert metrics.verdict_symbol(comparison) == "~"
    # Over many ties the verdict says "significant" about 5% of the time (two-sided), not more.
    false = sum(metrics.verdict_symbol(compare(*fabricate(rng, **REGIMES["both"]), resamples=300, seed=i)) != "~"
                for i in range(200))
    assert false / 200 <= 0.08


def test_a_fabricated_clear_difference_is_significant_both_ways():
    rng = np.random.default_rng(6)
    a, b = fabricate(rng, items=150, seed_sd=0.02, item_sd=0.2, noise_sd=0.3, shift=0.3)
    ahead = compare(a, b, seed=0)
    assert ahead.interval[0] > 0 and ahead.p_value < 0.001
    assert metrics.verdict_symbol(ahead) == ">"
    behind = compare(b, a, seed=0)
    assert behind.difference == pytest.approx(-ahead.difference)
    assert behind.interval == pytest.approx((-ahead.interval[1], -ahead.interval[0]))
    assert metrics.verdict_symbol(behind) == "<"
    # A correction can take the significance away, never the interval.
    assert metrics.verdict_symbol(ahead, adjusted_p=0.2) == "~"


def test_pairing_cancels_the_shared_item_difficulty():
    """B is A with 10% of its items one point lower, on every seed: a certain difference although each system's own
    score varies a lot from item to item. Unpaired resampling would drown it."""
    rng = np.random.default_rng(7)
    scores = rng.normal(0, 2.0, 100) + rng.normal(0, 0.01, (3, 1))  # (3 seeds, 100 items): items differ, seeds barely
    drop = np.zeros(100)
    drop[rng.choice(100, 10, replace=False)] = 1.0
    a = [np.stack([row, np.ones(100)], axis=1) for row in scores]
    b = [np.stack([row - drop, np.ones(100)], axis=1) for row in scores]
    comparison = compare(a, b, seed=0)
    assert comparison.difference == pytest.approx(0.1)
    assert comparison.interval[0] > 0.03 and metrics.verdict_symbol(comparison) == ">"
    unpaired_se = math.sqrt(2 * 4.0 / 100)  # each system's item spread, if the items were not shared
    assert comparison.std_error < unpaired_se / 5


def test_identical_systems_and_a_constant_difference():
    rng = np.random.default_rng(8)
    a, _ = fabricate(rng, item_sd=0.5, noise_sd=0.5, seed_sd=0.1)
    same = compare(a, a, seed=0)
    assert same.difference == 0 and same.p_value == 1.0 and metrics.verdict_symbol(same) == "~"
    # One seed each, B exactly 1 below A on every item: no variation at all, the difference is certain.
    one = [np.stack([np.arange(10.0), np.ones(10)], axis=1)]
    lower = [np.stack([np.arange(10.0) - 1, np.ones(10)], axis=1)]
    certain = compare(one, lower, seed=0)
    assert certain.difference == pytest.approx(1.0) and certain.std_error < 1e-12 and certain.p_value < 1e-12
    assert metrics.verdict_symbol(certain) == ">"


def test_single_seed_systems_contribute_no_seed_variance():
    rng = np.random.default_rng(9)
    a, b = fabricate(rng, seed_sd=0.3, item_sd=0.3, noise_sd=0.3, shift=0.2, seeds_b=1)
    comparison = compare(a, b, seed=0)
    assert comparison.seeds == (3, 1) and comparison.seed_variance[1] == 0.0
    assert comparison.seed_variance[0] == pytest.approx(np.var([t[:, 0].mean() for t in a], ddof=1) / 3)


def test_bootstrap_is_deterministic_given_its_seed():
    rng = np.random.default_rng(10)
    a, b = fabricate(rng, **REGIMES["both"])
    assert compare(a, b, seed=3) == compare(a, b, seed=3)
    assert (compare(a, b, seed=3).percentile_interval
            != compare(a, b, seed=4).percentile_interval)
    assert np.array_equal(metrics.item_weights(50, resamples=20, seed=1), metrics.item_weights(50, resamples=20, seed=1))
    assert metrics.item_weights(50, resamples=20, seed=1).sum(axis=1).tolist() == [50] * 20


def test_bootstrap_rejects_what_it_cannot_pair():
    weights = metrics.item_weights(10, resamples=20, seed=0)
    with pytest.raises(ValueError, match="N = 10 items each"):  # not the test items the weights draw from
        metrics.resampled_values([np.ones((9, 2))], weights)
    with pytest.raises(ValueError, match="at least one seed"):
        metrics.resampled_values([], weights)
    with pytest.raises(ValueError, match="at least 2 items"):
        metrics.item_weights(1, resamples=20, seed=0)
    empty = [np.stack([np.zeros(10), np.zeros(10)], axis=1)]  # 0 / 0: the metric is undefined
    with pytest.raises(ValueError, match="undefined"):
        compare(empty, empty)


# --------------------------------------------------------------------------------------------------------
# Ratio metrics: the corpus value is recomputed from resampled sums


def test_ratio_metrics_are_recomputed_from_the_resampled_counts():
    """Content object F1 is a function of summed counts: a resample's value must equal content.summarize over the
    resampled per-item records, not a mean of per-item F1s."""
    meta = {"objects": [{"color": "red", "shape": "circle", "size": "small"},
                        {"color": "blue", "shape": "square", "size": "large"}],
            "relations": [{"subject": 0, "relation": "left of", "object": 1}]}
    records = [content.image_item_scores(text, meta) for text in (
        "a small red circle is left of a large blue square",  # everything right
        "a red circle",  # one of two objects
        "a green triangle and a blue square",  # one wrong, one right
        "nothing here",  # names nothing
    )]
    keys = sorted(k for k, v in records[0].items() if k in content._COUNT_KEYS)
    table = np.array([[r[k] for k in keys] for r in records], dtype=np.float64)  # (4 items, K counts)

    def object_f1(totals: np.ndarray) -> np.ndarray:
        rows = [content.summarize([dict(zip(keys, row))])["object_f1"] for row in np.atleast_2d(totals)]
        return np.array([np.nan if v is None else v for v in rows])

    weights = np.array([[2, 0, 1, 1], [0, 3, 0, 1], [4, 0, 0, 0]])
    observed, values = metrics.resampled_values([table], weights, statistic=object_f1)
    assert observed[0] == pytest.approx(content.summarize(records)["object_f1"])
    for row, w in zip(values[:, 0], weights):
        resampled = [r for r, count in zip(records, w) for _ in range(count)]
        assert row == pytest.approx(content.summarize(resampled)["object_f1"])
    mean_of_items = np.mean([r["object_f1"] for r in records if r["object_f1"] is not None])
    assert observed[0] != pytest.approx(mean_of_items)  # the corpus F1 is not the mean of item F1s


def test_ratio_of_sums_is_nan_where_the_denominator_is_empty():
    totals = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 2.0]])
    out = metrics.ratio_of_sums(totals)
    assert out[0] == 0.75 and math.isnan(out[1]) and out[2] == 0.5


def test_comparison_serialises_to_json():
    import json

    a = [np.stack([np.linspace(0, 1, 20), np.ones(20)], axis=1)] * 2
    data = compare(a, a, resamples=50).to_json()
    assert json.loads(json.dumps(data))["seeds"] == [2, 2]
