"""scripts/lr_sweep.py: cells read back from their workers' summaries, the mean over seeds, the choice rule, the
table and the params.yaml rewrite (the training itself is the train stage's worker, tested with the training)."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lr_sweep", REPO / "scripts" / "lr_sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def write_summary(out: Path, task: str, family: str, lr: float, seed: int, val: float, converged: bool = True):
    folder = sweep.cell_dir(out, task, family, lr) / "train" / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "best_val_metric": val, "metric": "accuracy" if task == "activity" else "cider_d", "best_epoch": 3,
        "epochs_run": 6, "converged": converged, "num_parameters": 1000}))


def test_a_family_gets_the_lr_with_the_best_seed_mean_over_tasks(tmp_path):
    # rnn: lr 0.004 wins one seed by far on activity, but its mean over seeds is below 0.002's.
    scores = {("activity", "rnn", 0.002): [0.70, 0.72, 0.74], ("activity", "rnn", 0.004): [0.90, 0.40, 0.50],
              ("image_captioning", "rnn", 0.002): [2.0, 2.0, 2.0], ("image_captioning", "rnn", 0.004): [2.0, 2.0, 2.0],
              ("activity", "gru", 0.002): [0.50, 0.50, 0.50], ("activity", "gru", 0.004): [0.60, 0.60, 0.60],
              ("image_captioning", "gru", 0.002): [1.0, 1.0, 1.0], ("image_captioning", "gru", 0.004): [4.0, 4.0, 4.0]}
    for (task, family, lr), values in scores.items():
        for seed, value in enumerate(values):
            write_summary(tmp_path, task, family, lr, seed, value, converged=seed != 1)
    cells = [sweep.read_cell(tmp_path, t, f, lr, seed) for (t, f, lr), v in scores.items() for seed in range(3)]
    table = sweep.summarise(cells)
    assert table["activity", "rnn", 0.002]["mean"] == pytest.approx(0.72)
    assert table["activity", "rnn", 0.002]["sd"] == pytest.approx(0.02)
    assert table["activity", "rnn", 0.002]["capped"] == 1  # seed 1 hit the epoch cap while improving
    tasks, lrs = ["activity", "image_captioning"], [0.002, 0.004]
    chosen = sweep.choose(cells, ["rnn", "gru"], tasks, lrs)
    assert chosen["rnn"][0] == 0.002  # mean 0.72 against 0.60; equal on images
    # gru at 0.004: (0.60 / 0.72 + 4.0 / 4.0) / 2, each task normalised by its best seed mean
    assert chosen["gru"] == (0.004, pytest.approx((0.60 / 0.72 + 1.0) / 2))
    text = sweep.markdown(cells, chosen, tasks, lrs, epochs=6, commit="abc1234")
    assert "| rnn | 0.720 ± 0.020 *1 | 0.600 ± 0.265 *1 |" in text
    assert "seeds 0, 1, 2" in text
    with pytest.raises(FileNotFoundError):
        sweep.read_cell(tmp_path, "activity", "rnn", 0.008, 0)


def test_exact_ties_go_to_the_lr_nearest_0_002_and_apply_rewrites_only_lr_lines(tmp_path):
    cells = [{"task": "activity", "family": "lstm", "lr": lr, "seed": 0, "val": 0.5, "converged": True}
             for lr in (0.001, 0.004, 0.016)]
    assert sweep.choose(cells, ["lstm"], ["activity"], [0.001, 0.004, 0.016])["lstm"][0] == 0.001
    params = tmp_path / "params.yaml"
    params.write_text("models:\n  lstm:\n    hidden_size: 128\n    lr: 0.002  # tuned\n  gru:\n    lr: 0.002\n",
                      encoding="utf-8")
    sweep.apply(params, {"lstm": (0.008, 1.0)})
    assert yaml.safe_load(params.read_text(encoding="utf-8"))["models"] == {
        "lstm": {"hidden_size": 128, "lr": 0.008}, "gru": {"lr": 0.002}}
