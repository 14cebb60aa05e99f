"""evaluate + baselines: tiny fake artifacts (features, frames, tokens, UCF-style labels, checkpoints) in tmp."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seqvision import baselines as bl
from seqvision import evaluate as ev
from seqvision import io, metrics
from seqvision.config import EvaluateConfig
from seqvision.datasets import VisualStore
from seqvision.tasks import task_spec
from seqvision.decode import beam_search
from seqvision.results import load_activity_labels, reversal_pairs_for, write_activity_outputs, write_caption_outputs
from seqvision.vocab import Vocab, load_references

from tests.tiny import TINY_CLASSES, TINY_IMAGE_IDS, TINY_VIDEO_IDS, TinyArtifacts, tiny_label, train_tiny

torch.set_num_threads(1)

CLASSES = list(TINY_CLASSES)
VIDEO_IDS, IMAGE_IDS = TINY_VIDEO_IDS, TINY_IMAGE_IDS
CONFIG = EvaluateConfig(beam_size=2, length_penalty=0.0, max_length=6, batch_size=3)
label_of = tiny_label


@pytest.fixture
def art(tiny_artifacts) -> dict[str, Path]:
    return tiny_artifacts._asdict()


def save_checkpoint(path: Path, task: str, family: str, *, art: dict[str, Path], seed: int = 0) -> Path:
    """A real best.pt of the train stage's code (one epoch on the tiny artifacts, seeded)."""
    return train_tiny(TinyArtifacts(**art), task, family, path.parent, epochs=1, seed=seed)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------------------
# Scoring paths


def test_caption_metrics_from_the_jsonl_equal_caption_scores_on_the_same_strings(tmp_path):
    records = [
        {"id": "a", "hypothesis": "a man is riding a horse", "references": ["A man rides a horse.", "a person on a horse"],
         "score": -1.5},
        {"id": "b", "hypothesis": "two dogs play", "references": ["Two dogs are playing in the snow", "dogs playing"],
         "score": -2.0},
        {"id": "c", "hypothesis": "", "references": ["a cat sleeps on a sofa"], "score": -9.0},
        {"id": "d", "hypothesis": "a woman | slices onions", "references": ["a woman is slicing an onion"],
         "score": -3.0},
    ]
    written = write_caption_outputs(tmp_path, records, meteor="never", seconds=2.0)
    direct = metrics.caption_scores({r["id"]: r["hypothesis"] for r in records},
                                    {r["id"]: r["references"] for r in records}, meteor="never")
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for key in metrics.CAPTION_METRICS:
        assert on_disk[key] == direct[key], key
    # The decoding time is a measurement of this run: runinfo.json, never the hashed metrics.json.
    assert written == {**on_disk, **io.read_runinfo(tmp_path)} and "items_per_s" not in on_disk
    assert on_disk["num_items"] == 4 and written["items_per_s"] == pytest.approx(2.0)
    assert on_disk["meteor"] is None and 0 < on_disk["bleu_1"] <= 1 and on_disk["cider_d"] > 0
    assert "not x100" in json.loads((tmp_path / "details.json").read_text())["scale"]
    assert read_jsonl(tmp_path / "predictions.jsonl") == records
    assert (tmp_path / "plots").is_dir() and not any((tmp_path / "plots").iterdir())


def test_accuracy_confusion_and_reversal_metrics_are_consistent(tmp_path):
    names = ["move_left", "move_right", "grow", "shrink", "rotate"]
    pairs = reversal_pairs_for(names)
    assert pairs == [("move_left", "move_right"), ("grow", "shrink")]
    rows = [("move_left", "move_left"), ("move_left", "move_right"), ("move_right", "move_right"),
            ("grow", "shrink"), ("rotate", "rotate"), ("rotate", "grow")]  # (label, predicted)
    records = []
    for k, (label, predicted) in enumerate(rows):
        others = [n for n in names if n != predicted]
        records.append({"id": f"c{k}", "label": label, "predicted": predicted, "score": 0.5,
                        "topk": [predicted, *others[:4]]})
    result = write_activity_outputs(tmp_path, records, class_names=names, reversal_pairs=pairs)
    assert result["top_1"] == pytest.approx(3 / 6)
    assert result["top_5"] == 1.0  # 5 classes: every label is in the top 5
    assert result["reversal_pair_accuracy"] == pytest.approx(2 / 4)  # labels in pairs: c0..c3
    assert result["reversal_swap_rate"] == pytest.approx(2 / 4)  # c1 and c3 took the partner class
    # mean of per-class recall over present classes: left 1/2, right 1, grow 0, rotate 1/2
    assert result["mean_class_accuracy"] == pytest.approx((0.5 + 1 + 0 + 0.5) / 4)
    details = json.loads((tmp_path / "details.json").read_text())
    confusion = np.asarray(details["confusion"])
    assert confusion.sum() == 6 and np.trace(confusion) / 6 == result["top_1"]
    assert confusion[names.index("grow"), names.index("shrink")] == 1
    assert details["per_class_accuracy"]["shrink"] is None
    with open(tmp_path / "plots" / "confusion.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["actual"], r["predicted"]) for r in table] == rows
    assert {**json.loads((tmp_path / "metrics.json").read_text()), **io.read_runinfo(tmp_path)} == result


# --------------------------------------------------------------------------------------------------------
# Evaluating checkpoints


@pytest.mark.parametrize("task,family", [("video_captioning", "gru"), ("image_captioning", "transformer"),
                                         ("video_captioning", "meanpool")])
def test_captioner_evaluation_writes_beam_search_predictions_and_metrics(tmp_path, art, task, family):
    ckpt = save_checkpoint(tmp_path / "best.pt", task, family, art=art)
    out = tmp_path / "eval"
    result = ev.evaluate_checkpoint(task, checkpoint_path=ckpt, family=family, features_dir=art["features"],
                                    tokens_dir=art["tokens"], out_dir=out, config=CONFIG, device="cpu")
    records = read_jsonl(out / "predictions.jsonl")
    assert all(set(r) == {"id", "hypothesis", "references", "score"} for r in records)
    kind = "images" if task == "image_captioning" else "videos"
    ids = (IMAGE_IDS if kind == "images" else VIDEO_IDS)["test"]
    assert [r["id"] for r in records] == ids
    refs = load_references(art["tokens"] / task_spec(task).corpus, "test")
    assert all(r["references"] == refs[r["id"]] for r in records)

    # Same captions as a direct beam search over the same features (no teacher forcing anywhere).
    from seqvision.models import build_from_checkpoint
    from seqvision.checkpoint import load as load_checkpoint

    model = build_from_checkpoint(load_checkpoint(ckpt)).eval()
    store = VisualStore(art["features"], kind=kind, split="test")
    visual = torch.stack([torch.from_numpy(store.load(i)).float() for i in ids])
    lengths = torch.tensor([store.length(i) for i in ids])
    decoded = beam_search(model, visual, lengths, beam_size=CONFIG.beam_size, max_length=CONFIG.max_length)
    vocab = Vocab.load(art["tokens"] / task_spec(task).corpus / "vocab.json")
    assert [r["hypothesis"] for r in records] == [vocab.decode(t) for t in decoded.tokens.tolist()]
    assert [r["score"] for r in records] == pytest.approx(decoded.score.tolist(), abs=1e-5)

    on_disk = json.loads((out / "metrics.json").read_text())
    assert set(on_disk) == {*metrics.CAPTION_METRICS, "num_items"}
    assert result == {**on_disk, **io.read_runinfo(out)} and on_disk["num_items"] == len(ids)
    assert set(io.read_runinfo(out)) == {"decode_time_s", "items_per_s"}
    assert on_disk == metrics.score_predictions_jsonl(out / "predictions.jsonl", meteor="never")
    details = json.loads((out / "details.json").read_text())
    assert (details["beam_size"], details["max_length"], details["family"]) == (2, 6, family)
    assert "CIDEr-D as coco-caption reports it" in details["scale"]
    assert (out / "plots").is_dir() and not (out / "plots" / "confusion.csv").exists()


@pytest.mark.parametrize("family", ["gru", "meanpool"])
def test_activity_evaluation_writes_predictions_metrics_and_confusion(tmp_path, art, family):
    ckpt = save_checkpoint(tmp_path / "best.pt", "activity", family, art=art, seed=3)
    out = tmp_path / "eval"
    labels = load_activity_labels(art["labels"], 1)
    assert labels.class_names == CLASSES and labels.labels["test"]["v21"] == 1
    ev.evaluate_checkpoint("activity", checkpoint_path=ckpt, features_dir=art["features"], activity=labels,
                           out_dir=out, config=CONFIG, device="cpu")
    records = read_jsonl(out / "predictions.jsonl")
    assert all(set(r) == {"id", "predicted", "label", "score", "topk"} for r in records)
    assert [r["id"] for r in records] == VIDEO_IDS["test"]
    assert all(r["label"] == CLASSES[label_of(r["id"])] for r in records)
    assert all(len(r["topk"]) == 4 and r["topk"][0] == r["predicted"] for r in records)  # min(5, classes)

    from seqvision.models import build_from_checkpoint
    from seqvision.checkpoint import load as load_checkpoint

    model = build_from_checkpoint(load_checkpoint(ckpt)).eval()
    store = VisualStore(art["features"], kind="videos", split="test")
    visual = torch.stack([torch.from_numpy(store.load(i)).float() for i in VIDEO_IDS["test"]])
    with torch.no_grad():
        logits, _ = model(visual, torch.tensor([store.length(i) for i in VIDEO_IDS["test"]]))
    probs = logits.softmax(-1)
    assert [r["predicted"] for r in records] == [CLASSES[i] for i in probs.argmax(-1).tolist()]
    assert [r["score"] for r in records] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-6)

    result = json.loads((out / "metrics.json").read_text())
    assert set(result) == {"top_1", "top_5", "mean_class_accuracy", "reversal_pair_accuracy",
                           "reversal_swap_rate", "num_items"}
    correct = sum(r["predicted"] == r["label"] for r in records)
    assert result["top_1"] == pytest.approx(correct / len(records)) and result["top_5"] == 1.0
    in_pair = [r for r in records if r["label"] in ("move_left", "move_right")]
    assert result["reversal_pair_accuracy"] == pytest.approx(
        sum(r["predicted"] == r["label"] for r in in_pair) / len(in_pair))
    with open(out / "plots" / "confusion.csv", newline="") as f:
        assert [(r["actual"], r["predicted"]) for r in csv.DictReader(f)] == [
            (r["label"], r["predicted"]) for r in records]
    details = json.loads((out / "details.json").read_text())
    assert details["class_names"] == CLASSES and details["reversal_pairs"] == [["move_left", "move_right"]]
    assert np.trace(np.asarray(details["confusion"])) == correct


def test_checkpoint_that_does_not_fit_is_refused(tmp_path, art):
    ckpt = save_checkpoint(tmp_path / "best.pt", "video_captioning", "gru", art=art)
    kwargs = dict(checkpoint_path=ckpt, features_dir=art["features"], tokens_dir=art["tokens"], out_dir=tmp_path / "o",
                  config=CONFIG, device="cpu")
    with pytest.raises(ValueError, match="not 'image_captioning'"):
        ev.evaluate_checkpoint("image_captioning", **kwargs)
    with pytest.raises(ValueError, match="not 'lstm'"):
        ev.evaluate_checkpoint("video_captioning", family="lstm", **kwargs)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------------
# Baselines


def test_majority_class_ranks_by_training_frequency():
    order, freq = bl.class_ranking([2, 2, 0, 2, 1, 0], 4)
    assert order.tolist() == [2, 0, 1, 3] and freq.tolist() == pytest.approx([2 / 6, 1 / 6, 3 / 6, 0])
    records = bl.majority_records(["x", "y"], [2, 3], [2, 2, 0, 2, 1, 0], ["a", "b", "c", "d"])
    assert [r["predicted"] for r in records] == ["c", "c"] and records[0]["topk"] == ["c", "a", "b", "d"]
    assert records[0]["score"] == pytest.approx(0.5) and records[1]["label"] == "d"


def test_most_frequent_caption_counts_normalised_captions():
    captions = ["A dog runs.", "a cat sleeps", "a dog runs", "A DOG RUNS!", "a cat sleeps", "", "zebra"]
    assert bl.most_frequent_caption(captions) == ("a dog runs", pytest.approx(3 / 6))
    assert bl.most_frequent_caption(["b b", "a a"])[0] == "a a"  # ties: alphabetical


def test_nearest_neighbour_retrieval_picks_the_obvious_neighbour():
    gallery = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    queries = np.array([[0.1, 0.0, 3.0], [2.0, 0.2, 0.0], [0.0, 9.0, 1.0]])
    best, sims = bl.cosine_neighbours(queries, gallery)
    assert best.tolist() == [2, 0, 1] and sims[1] == pytest.approx(2 / np.hypot(2, 0.2))
    refs = {"q0": ["r"], "q1": ["r"], "q2": ["r"]}
    captions = [["a dog runs", "a dog is running"], ["a cat"], ["a red car", "a car", "a red car drives"]]
    records = bl.nearest_neighbour_caption_records(refs, queries, captions, gallery)
    assert [r["hypothesis"] for r in records] == ["a red car", "a dog runs", "a cat"]
    nn = bl.nearest_neighbour_activity_records(["q0", "q1", "q2"], [0, 1, 2], queries, [2, 1, 0], gallery,
                                               ["x", "y", "z"])
    assert [r["predicted"] for r in nn] == ["x", "z", "y"] and nn[0]["topk"][0] == "x"


def test_consensus_caption_is_the_one_that_agrees_most():
    assert bl.consensus_caption(["a cat", "a dog runs on grass", "a dog runs", "the dog runs fast"]) == "a dog runs"
    assert bl.consensus_caption(["Only one."]) == "only one"


def test_baselines_stage_scores_every_baseline_like_the_models(tmp_path, art):
    labels = load_activity_labels(art["labels"], 1)
    results = bl.run_baselines(list(bl.BASELINES), features_dir=art["features"], tokens_dir=art["tokens"],
                               activity=labels, out_root=tmp_path)
    assert {(r.task, r.name) for r in results} == {(t, n) for t, names in bl.BASELINES.items() for n in names}
    by = {(r.task, r.name): r.metrics for r in results}
    # Train labels are balanced (3 per class): ties go to the lowest index; test has 2 per class.
    assert by["activity", "majority"]["top_1"] == pytest.approx(2 / 8)
    # 1-NN on mean-pooled features: move_left and move_right have identical means (one is the other reversed),
    # the other classes are clean, so exactly the two reversal classes get confused.
    nn = read_jsonl(tmp_path / "activity" / "baseline_nearest_neighbour" / "predictions.jsonl")
    assert all(r["predicted"] == r["label"] for r in nn if r["label"] in ("grow", "stay_still"))
    assert by["activity", "nearest_neighbour"]["reversal_swap_rate"] > 0
    for task in ("image_captioning", "video_captioning"):
        recs = read_jsonl(tmp_path / task / "baseline_frequent_caption" / "predictions.jsonl")
        assert len({r["hypothesis"] for r in recs}) == 1
        nn = read_jsonl(tmp_path / task / "baseline_nearest_neighbour" / "predictions.jsonl")
        assert all(set(r) == {"id", "hypothesis", "references", "score"} for r in nn)
        # Identical class features: the neighbour's captions are the item's own references (normalised).
        if task == "image_captioning":
            assert by[task, "nearest_neighbour"]["cider_d"] > by[task, "frequent_caption"]["cider_d"]
        assert (tmp_path / task / "baseline_nearest_neighbour" / "metrics.json").is_file()


# --------------------------------------------------------------------------------------------------------
# CLIs and flows


def test_cli_help_and_one_line_errors(tmp_path, capsys):
    from pipelines import baselines as baselines_cli
    from pipelines import evaluate as evaluate_cli

    for cli in (evaluate_cli, baselines_cli):
        with pytest.raises(SystemExit) as exc:
            cli.parse_args(["--help"])
        assert exc.value.code == 0
    capsys.readouterr()
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  beam_size: 2\n")
    code = evaluate_cli.main(["--params", str(params), "--task", "activity", "--model", "gru",
                              "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("evaluate: error: ") and "missing.pt" in err and err.count("\n") == 1
    params.write_text("evaluate:\n  beam_size: 0\n")
    code = baselines_cli.main(["--params", str(params), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "evaluate.beam_size" in err and err.count("\n") == 1


@pytest.mark.slow
def test_evaluate_and_baselines_flows_end_to_end(tmp_path, art, prefect_harness, capsys):
    from pipelines import baselines as baselines_cli
    from pipelines import evaluate as evaluate_cli

    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  beam_size: 2\n  max_length: 5\nreport:\n  compute_meteor: never\n")
    ckpt = save_checkpoint(tmp_path / "train" / "best.pt", "activity", "transformer", art=art)
    out = tmp_path / "eval" / "activity" / "transformer"
    code = evaluate_cli.main(["--params", str(params), "--task", "activity", "--model", "transformer",
                              "--checkpoint", str(ckpt), "--features", str(art["features"]),
                              "--activity-dir", str(art["labels"]), "--device", "cpu", "--out", str(out)])
    assert code == 0 and "top_1" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"predictions.jsonl", "metrics.json", "details.json", "plots",
                                               "runinfo.json"}
    code = baselines_cli.main(["--params", str(params), "--tasks", "video_captioning", "--features",
                               str(art["features"]), "--tokens", str(art["tokens"]), "--out", str(tmp_path / "eval")])
    assert code == 0
    assert json.loads((tmp_path / "eval/video_captioning/baseline_frequent_caption/metrics.json").read_text())[
        "num_items"] == len(VIDEO_IDS["test"])
