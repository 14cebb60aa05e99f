"""Row 4 of the study (inductive bias): nested stratified subsets, the equal-steps schedule, crossovers, samples to a
target and verdicts on fabricated curves with known answers, and a tiny end-to-end row through the CLI."""

from __future__ import annotations

import collections
import json
import math
import random
import tarfile

import numpy as np
import pytest
import torch
import yaml

from seqvision import checkpoint
from seqvision.config import TrainConfig
from seqvision.study.__main__ import main
from seqvision.study.bias import (
    SizePoint,
    analyse,
    bias_verdict,
    crossover,
    nested_subsets,
    points_from_cells,
    samples_to_reach,
    scaled_schedule,
    table_cells,
)
from seqvision.study.complexity import RowResult
from seqvision.study.figures import plot_inductive_bias
from seqvision.study.fit import VERDICTS
from tests.tiny import TINY_CLASSES, TINY_MODELS, TINY_TRAIN, TINY_UNMATCHED, TINY_VIDEO_IDS, train_tiny

# --------------------------------------------------------------------------------------------------------
# Subsets and schedules


def test_subsets_are_nested_stratified_and_deterministic():
    sizes = {0: 40, 1: 20, 2: 7}
    labels = {f"c{c}-{k:02d}": c for c, n in sizes.items() for k in range(n)}
    fractions = (1 / 8, 1 / 4, 1 / 2, 1.0)
    subsets = nested_subsets(labels, fractions, seed=3)
    assert list(subsets) == sorted(fractions) and subsets[1.0] == sorted(labels)
    for small, large in zip(fractions, fractions[1:]):
        assert set(subsets[small]) < set(subsets[large]), f"{small} is not inside {large}"
    for f, ids in subsets.items():
        counts = collections.Counter(labels[i] for i in ids)
        # every class keeps its share (rounded half up), and none disappears
        assert counts == {c: max(1, math.floor(f * n + 0.5)) for c, n in sizes.items()}, f
    assert collections.Counter(labels[i] for i in subsets[1 / 8]) == {0: 5, 1: 3, 2: 1}

    shuffled = list(labels.items())
    random.Random(0).shuffle(shuffled)
    assert nested_subsets(dict(shuffled), fractions, seed=3) == subsets, "the draw depends on the ids, not their order"
    assert nested_subsets(labels, fractions, seed=4)[1 / 4] != subsets[1 / 4], "the seed draws the subset"
    with pytest.raises(ValueError, match="fractions"):
        nested_subsets(labels, (0.0, 1.0), seed=0)


def test_equal_steps_scales_epochs_and_patience_by_steps_per_epoch():
    train = TrainConfig(epochs=15, patience=3, batch_size=64)
    # 1200 clips: 19 steps per epoch; 36 clips: 1 step, so 19x the epochs and the patience
    small = scaled_schedule(train, items=36, full_items=1200, equal_steps=True)
    assert (small.epochs, small.patience) == (285, 57)
    assert small.epochs * math.ceil(36 / 64) >= train.epochs * math.ceil(1200 / 64)
    half = scaled_schedule(train, items=600, full_items=1200, equal_steps=True)  # 10 steps per epoch
    assert (half.epochs, half.patience) == (29, 6)
    assert scaled_schedule(train, items=1200, full_items=1200, equal_steps=True) == train
    assert scaled_schedule(train, items=36, full_items=1200, equal_steps=False) == train
    assert {k: v for k, v in vars(small).items() if k not in ("epochs", "patience")} == \
        {k: v for k, v in vars(train).items() if k not in ("epochs", "patience")}


# --------------------------------------------------------------------------------------------------------
# Fabricated curves with known answers

SIZES = (32, 64, 128, 256, 512, 1024)
TEST_ITEMS = 200


def fabricate(family: str, accuracies: dict[int, tuple[float, ...]], *, seed: int) -> list[SizePoint]:
    """Points whose seeds get round(accuracy * 200) random test items right."""
    rng = np.random.default_rng(seed)
    points = []
    for items, per_seed in accuracies.items():
        correct = []
        for acc in per_seed:
            c = np.zeros(TEST_ITEMS, dtype=np.uint8)
            c[rng.permutation(TEST_ITEMS)[:round(acc * TEST_ITEMS)]] = 1
            correct.append(c)
        points.append(SizePoint(family, items / SIZES[-1], items, tuple(float(c.mean()) for c in correct),
                                tuple(correct)))
    return points


def spread(means: tuple[float, ...], width: float = 0.02) -> dict[int, tuple[float, ...]]:
    """Three seeds per size: mean - width, mean, mean + width."""
    return {n: (m - width, m, m + width) for n, m in zip(SIZES, means)}


def symbols(result: dict, family: str) -> list[str]:
    return [row["symbol"] for row in result["comparisons"][family]]


def test_a_significant_crossover_is_found_at_the_right_size():
    points = {
        "transformer": fabricate("transformer", spread((0.20, 0.35, 0.55, 0.80, 0.88, 0.92)), seed=1),
        "gru": fabricate("gru", spread((0.50, 0.60, 0.70, 0.75, 0.78, 0.80)), seed=2),
    }
    result = analyse(points, target_fraction=0.9, num_classes=12)
    assert symbols(result, "gru") == ["<", "<", "<", ">", ">", ">"]  # transformer vs gru
    assert result["crossovers"]["gru"] == {"status": "crossover", "train_items": 256, "other_ahead_before": True}
    verdict = result["verdicts"]["gru"]
    assert verdict.label == "agrees" and "at 32 items" in verdict.measured and "at 1024 items" in verdict.measured
    assert table_cells(result["verdicts"]) == [{
        "column": "RNNs", "quantity": "inductive bias", "claim": verdict.claim, "measured": verdict.measured,
        "verdict": "agrees"}]
    curve = result["curves"]["gru"][0]
    assert curve["train_items"] == 32 and curve["mean"] == pytest.approx(0.50) and curve["ci95"][0] < 0.5
    # target: 0.9 x the best mean at the largest size (transformer, 0.92) = 0.828, above the gru's best (0.80)
    assert result["target"] == {"fraction": 0.9, "accuracy": pytest.approx(0.828), "best_family": "transformer"}
    assert result["samples_to_target"]["gru"] == {"items": None, "how": "not reached"}
    t = (0.828 - 0.80) / (0.88 - 0.80)
    assert result["samples_to_target"]["transformer"]["items"] == pytest.approx(256 * 2**t)
    assert result["chance"] == pytest.approx(1 / 12)


def test_a_tie_reports_no_crossover():
    transformer = fabricate("transformer", spread((0.3, 0.4, 0.5, 0.6, 0.7, 0.8), width=0.1), seed=5)
    tied = [p._replace(family="lstm") for p in transformer]  # the very same predictions
    result = analyse({"transformer": transformer, "lstm": tied}, target_fraction=0.9, num_classes=12)
    assert symbols(result, "lstm") == ["~"] * 6
    assert result["crossovers"]["lstm"]["status"] == "none"
    assert result["verdicts"]["lstm"].label == "inconclusive"


def test_a_lead_that_is_not_significant_is_no_crossover():
    lstm = fabricate("lstm", spread((0.3, 0.4, 0.5, 0.6, 0.7, 0.8), width=0.1), seed=6)
    transformer = []
    for p in lstm:  # the same predictions, plus two more test items right per seed at the two largest sizes
        extra = 2 if p.train_items >= 512 else 0
        correct = tuple(np.where(np.cumsum(1 - c) <= extra, 1, c).astype(np.uint8) for c in p.correct)
        transformer.append(p._replace(family="transformer", correct=correct,
                                      accuracy=tuple(float(c.mean()) for c in correct)))
    assert [np.mean(t.accuracy) > np.mean(o.accuracy) for t, o in zip(transformer, lstm)] == [False] * 4 + [True] * 2
    result = analyse({"transformer": transformer, "lstm": lstm}, target_fraction=0.9, num_classes=12)
    assert symbols(result, "lstm")[-2:] == ["~", "~"]
    assert result["crossovers"]["lstm"]["status"] == "none"


def test_a_transformer_ahead_throughout_disagrees():
    points = {
        "transformer": fabricate("transformer", spread((0.5, 0.6, 0.7, 0.8, 0.85, 0.9)), seed=7),
        "rnn": fabricate("rnn", spread((0.2, 0.3, 0.4, 0.5, 0.6, 0.7)), seed=8),
        "mingru": fabricate("mingru", spread((0.2, 0.3, 0.4, 0.5, 0.6, 0.7)), seed=9),
    }
    result = analyse(points, target_fraction=0.9, num_classes=12)
    assert result["crossovers"]["rnn"] == {"status": "reference ahead throughout", "train_items": None,
                                           "other_ahead_before": False}
    assert {f: v.label for f, v in result["verdicts"].items()} == {"rnn": "disagrees", "mingru": "disagrees"}
    assert [c["column"] for c in table_cells(result["verdicts"])] == ["RNNs", "minGRU"]


def test_crossover_needs_the_lead_to_hold_to_the_largest_size():
    reference = fabricate("transformer", spread((0.2, 0.8, 0.2)), seed=1)
    other = fabricate("gru", spread((0.5, 0.5, 0.5)), seed=2)
    assert crossover(reference, other, ["<", ">", "<"])["status"] == "none"
    assert crossover(reference[:2], other[:2], ["<", ">"]) == {"status": "crossover", "train_items": 64,
                                                               "other_ahead_before": True}


@pytest.mark.parametrize(("small", "large", "label"), [
    (">", "~", "agrees"), (">", "<", "agrees"), (">", ">", "inconclusive"),
    ("~", "~", "inconclusive"), ("~", ">", "disagrees"), ("~", "<", "disagrees"),
    ("<", "~", "disagrees"), ("<", "<", "disagrees"), ("<", ">", "disagrees"),
])
def test_verdict_rule(small, large, label):
    verdict = bias_verdict(small, large, measured="m")
    assert verdict.label == label and verdict.label in VERDICTS and verdict.reason


def test_samples_to_reach_interpolates_in_log_items():
    assert samples_to_reach([100, 400], [0.5, 0.7], 0.6) == {"items": pytest.approx(200.0), "how": "interpolated"}
    assert samples_to_reach([100, 400, 1600], [0.5, 0.4, 0.8], 0.6)["items"] == pytest.approx(800.0)
    assert samples_to_reach([100, 400], [0.65, 0.7], 0.6) == {"items": 100.0, "how": "at or below the smallest size"}
    assert samples_to_reach([100, 400], [0.5, 0.55], 0.6) == {"items": None, "how": "not reached"}


# --------------------------------------------------------------------------------------------------------
# End to end on the tiny artifacts


@pytest.fixture
def tiny_params(tiny_artifacts, tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": TINY_TRAIN, "models": TINY_MODELS | TINY_UNMATCHED,
                                    "data": {"activity_dir": str(tiny_artifacts.labels)}}))
    return path


@pytest.mark.slow
@pytest.mark.integration
def test_a_tiny_row_writes_json_and_figure(tiny_artifacts, tiny_params, tmp_path, capsys):
    out = tmp_path / "study"
    stale = out / "inductive_bias" / "lstm" / "f0.5" / "seed0" / "test" / "metrics.json"  # an earlier run's cell
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    families = ("gru", "transformer", "mingru")  # three of the ci preset's six: half the trainings
    code = main(["--out", str(out), "--preset", "ci", "--rows", "inductive_bias", "--quiet", "--params",
                 str(tiny_params), "--bias-features", str(tiny_artifacts.features), "--bias-families", *families])
    assert code == 0
    # The trainings went into one tar (the earlier run's cell did not); only their measurements stay in the folder.
    left = {p.name for p in (out / "inductive_bias").rglob("*") if p.is_file()}
    assert left == {"runinfo.json"} and not stale.parent.exists()
    with tarfile.open(out / "inductive_bias.tar") as tar:
        names = tar.getnames()
        assert not any("runinfo" in n or "/lstm/" in n for n in names) and names == sorted(names)
        tar.extractall(tmp_path / "unpacked", filter="data")
    trainings = tmp_path / "unpacked"
    assert (out / "inductive_bias.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "inductive_bias.png").stat().st_size > 10_000
    row = json.loads((out / "inductive_bias.json").read_text())
    assert row["config"]["bias_fractions"] == [0.5, 1.0] and row["extra"]["full_train_items"] == 12
    cells = {(c["variant"], c["key"]["fraction"]): c for c in row["cells"]}
    assert set(cells) == {(f, x) for f in families for x in (0.5, 1.0)}
    for (family, fraction), cell in cells.items():
        assert not cell["errors"] and len(cell["metrics"]["top_1"]) == 1 and cell["settings"]["seeds"] == [0]
        # 12 clips, 3 per class: half is 2 per class; at batch 4 that is 2 steps per epoch against 3, so the
        # ci preset's 2 epochs become 3 (equal steps)
        assert cell["key"]["train_items"] == {0.5: 8, 1.0: 12}[fraction]
        assert cell["settings"]["epochs_cap"] == {0.5: 3, 1.0: 2}[fraction]
        assert cell["metrics"]["epochs_run"] == [cell["settings"]["epochs_cap"]]  # patience 0: every epoch runs
        assert len(cell["settings"]["test_correct"][0]) == len(TINY_VIDEO_IDS["test"])
        trained = json.loads((trainings / "inductive_bias" / family / f"f{fraction:g}" / "seed0" / "train" /
                              "summary.json").read_text())
        assert trained["train_items"] == cell["key"]["train_items"] and trained["family"] == family
        tested = json.loads((trainings / "inductive_bias" / family / f"f{fraction:g}" / "seed0" / "test" /
                             "metrics.json").read_text())
        assert tested["top_1"] == cell["metrics"]["top_1"][0] == cell["settings"]["test_correct"][0].count("1") / 8
    assert row["extra"]["chance"] == 1 / len(TINY_CLASSES) and row["extra"]["test_ids"] == sorted(
        TINY_VIDEO_IDS["test"])
    assert set(row["extra"]["comparisons"]) == set(families) - {"transformer"}
    assert {t["column"] for t in row["table"]} == {"RNNs", "minGRU"}
    assert set(row["extra"]["samples_to_target"]) == set(families)
    assert all(t["verdict"].split(":")[0] in (*VERDICTS, "depends on the cell") for t in row["table"])

    # The whole training set under the ci preset's 2 epochs is the comparison's own training (tests/tiny.py's
    # TINY_TRAIN): the same weights, bit for bit.
    reference = checkpoint.load(train_tiny(tiny_artifacts, "activity", "gru", tmp_path / "reference"))
    ours = checkpoint.load(trainings / "inductive_bias" / "gru" / "f1" / "seed0" / "train" / "best.pt")
    assert ours["epoch"] == reference["epoch"] and ours["model"].keys() == reference["model"].keys()
    assert all(torch.equal(ours["model"][k], reference["model"][k]) for k in ours["model"])

    again = RowResult.from_json(row)  # the analysis and the figure follow from the JSON alone
    redone = analyse(points_from_cells(again.cells), target_fraction=0.9, num_classes=len(TINY_CLASSES))
    assert json.loads(json.dumps(redone["comparisons"])) == row["extra"]["comparisons"]
    plot_inductive_bias(again, tmp_path / "replotted.png")
    printed = capsys.readouterr().out
    assert "RNNs inductive bias: claim strong" in printed and "study: inductive_bias in" in printed


def test_missing_inputs_and_bad_families_are_one_clear_line(tiny_params, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--rows", "inductive_bias", "--params", str(tiny_params),
              "--bias-features", str(tmp_path / "nowhere")])
    assert "index.json: missing; the inductive_bias row needs the features" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--rows", "inductive_bias", "--bias-families", "lstm", "gru"])
    assert "must include transformer" in capsys.readouterr().err
