"""The evaluation output layout, shared by the models' evaluation (``evaluate.py``), the non-learned baselines
(``baselines.py``) and the report: predictions, metrics and details of one system on the test split; and a
training stage's outputs over its seeds (:func:`aggregate`). Torch-free: the train stage's main process uses it.

Output folder (``artifacts/eval/{task}/{model}/``, ``artifacts/eval/{task}/baseline_{name}/``)::

    predictions.jsonl   captioning: {"id", "hypothesis", "references": [...], "score"}
                        activity:   {"id", "predicted", "label", "score", "topk": [5 class names, best first]}
    metrics.json        captioning: bleu_1..bleu_4, meteor (null: the report stage scores it), rouge_l, cider_d,
                        num_items (numbers only, so ``dvc metrics show`` stays readable); activity: top_1,
                        top_5, mean_class_accuracy, reversal_pair_accuracy, reversal_swap_rate, num_items
    details.json        captioning: decoding settings and ``scale`` (the sentence below);
                        activity: class_names, reversal_pairs, confusion (rows = true class, columns =
                        predicted), per_class_accuracy
    runinfo.json        decode_time_s, items_per_s: measurements of this run (``io.write_runinfo``: DVC
                        ignores the file, so the hashed outputs depend on the inputs only)
    plots/confusion.csv activity only: one row per clip, ``actual,predicted`` (the ``dvc plots`` confusion
                        template); ``plots/`` exists, empty, for captioning so every evaluation has the same outs

Scale: every caption metric is coco-caption's raw value, never x100. BLEU-n, METEOR and ROUGE-L lie in
[0, 1]; CIDEr-D is reported as coco-caption returns it (it can exceed 1; papers print 100x these numbers).
Accuracies are fractions in [0, 1]. ``score`` is the system's own confidence.

The metrics are always computed from the written ``predictions.jsonl`` (``metrics.score_predictions_jsonl``
/ ``metrics.score_activity_jsonl``), so the file on disk and the numbers cannot disagree.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from seqvision import annotations, metrics
from seqvision.io import RUNINFO, read_runinfo, write_json, write_runinfo, write_text
from seqvision.synth.events import REVERSAL_PAIRS

PREDICTIONS, METRICS, DETAILS, PLOTS, CONFUSION_CSV = (
    "predictions.jsonl", "metrics.json", "details.json", "plots", "confusion.csv",
)
TOPK = 5
# The metric each task is ranked by in the report and on the MLflow parent run.
HEADLINE = {"activity": "top_1", "image_captioning": "cider_d", "video_captioning": "cider_d"}
CAPTION_SCALE = (
    "raw coco-caption values, not x100: BLEU-n, METEOR, ROUGE-L in [0, 1]; CIDEr-D as coco-caption reports it "
    "(can exceed 1)"
)
SPLIT = "test"


class ActivityLabels(NamedTuple):
    class_names: list[str]  # names[label], 0-based
    labels: dict[str, dict[str, int]]  # split -> {clip id: label}


def load_activity_labels(activity_dir: str | Path, activity_split: int = 1) -> ActivityLabels:
    """Class names and per-split labels from a UCF101-layout folder (``annotations.load_video_records``)."""
    class_names = annotations.load_class_names(activity_dir)
    # video_dir only fills in record paths, which evaluation never opens.
    records = annotations.load_video_records(
        video_dir=activity_dir, activity_dir=activity_dir, activity_split=activity_split
    )
    return ActivityLabels(class_names, {s: annotations.activity_labels(records, s) for s in annotations.SPLITS})


def reversal_pairs_for(class_names: Sequence[str]) -> list[tuple[str, str]]:
    """The time-reversed class pairs of the synthetic benchmark whose two classes both exist here
    (none for a real dataset such as UCF101, whose reversal metrics are then null)."""
    present = set(class_names)
    return [(a, b) for a, b in REVERSAL_PAIRS if a in present and b in present]


# --------------------------------------------------------------------------------------------------------
# Writing predictions and scoring them


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line (keys sorted, UTF-8), written atomically."""
    text = "".join(json.dumps(dict(r), sort_keys=True, ensure_ascii=False) + "\n" for r in records)
    write_text(path, text)


def _write_timing(out_dir: Path, num_items: int, seconds: float) -> dict[str, float]:
    timing = {"decode_time_s": float(seconds), "items_per_s": float(num_items / seconds) if seconds > 0 else 0.0}
    write_runinfo(out_dir, **timing)
    return timing


def write_caption_outputs(
    out_dir: str | Path,
    records: Sequence[Mapping[str, Any]],
    *,
    meteor: metrics.MeteorMode = "auto",
    seconds: float = 0.0,
    details: Mapping[str, Any] | None = None,
    content: Any = None,
) -> dict[str, Any]:
    """Write ``predictions.jsonl``, score it, write ``metrics.json`` / ``details.json`` and an empty ``plots/``.
    Returns the metrics, plus ``decode_time_s`` and ``items_per_s`` (written to runinfo.json).

    ``content`` (the synthetic benchmark only): ``(kind, metadata)`` with kind ``"images"`` or ``"videos"`` and
    ``metadata`` the matching part of ``metadata.json`` by id: the content metrics (``seqvision.content``) are added
    as ``content_<name>`` and their subsets and per-item records to details.json."""
    out_dir = Path(out_dir)
    write_jsonl(out_dir / PREDICTIONS, records)
    per_item: dict[str, Any] = {}
    scores = metrics.score_predictions_jsonl(out_dir / PREDICTIONS, meteor=meteor, per_item=per_item)
    extra: dict[str, Any] = {}
    if content is not None:
        from seqvision import content as content_metrics

        kind, metadata = content
        score = (content_metrics.image_content_scores if kind == "images" else content_metrics.video_content_scores)
        found = score({str(r["id"]): str(r["hypothesis"]) for r in records}, metadata)
        scores.update({f"content_{k}": v for k, v in found.mean.items()})
        per_item["content"] = found.per_item
        extra["content_subsets"] = found.subsets
    metrics.write_metrics(out_dir / METRICS, scores)
    result = {**scores, **_write_timing(out_dir, len(records), seconds)}
    write_json(out_dir / DETAILS, {**dict(details or {}), **extra, "scale": CAPTION_SCALE, "per_item": per_item})
    _reset_plots(out_dir)
    return result


def write_activity_outputs(
    out_dir: str | Path,
    records: Sequence[Mapping[str, Any]],
    *,
    class_names: Sequence[str],
    reversal_pairs: Sequence[tuple[str, str]],
    seconds: float = 0.0,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``predictions.jsonl``, score it, write ``metrics.json``, ``details.json`` (confusion, per-class
    accuracy) and ``plots/confusion.csv``. Returns the metrics, plus the timing (runinfo.json)."""
    out_dir = Path(out_dir)
    write_jsonl(out_dir / PREDICTIONS, records)
    report = metrics.score_activity_jsonl(
        out_dir / PREDICTIONS, class_names=class_names, reversal_pairs=reversal_pairs
    )
    result = {
        key: report[key]
        for key in ("top_1", "top_5", "mean_class_accuracy", "reversal_pair_accuracy", "reversal_swap_rate",
                    "num_items")
    }
    metrics.write_metrics(out_dir / METRICS, result)
    result.update(_write_timing(out_dir, len(records), seconds))
    write_json(out_dir / DETAILS, {
        **dict(details or {}),
        "class_names": list(class_names),
        "reversal_pairs": [list(p) for p in reversal_pairs],
        "confusion": report["confusion"],
        "per_class_accuracy": report["per_class_accuracy"],
        # What a bootstrap resamples: 0/1 per clip, and whether the clip belongs to a reversal pair.
        "per_item": {"correct": {str(r["id"]): int(r["predicted"] == r["label"]) for r in records},
                     "in_reversal_pair": {str(r["id"]): int(any(r["label"] in p for p in reversal_pairs))
                                          for r in records},
                     "swapped": {str(r["id"]): int(any(r["label"] in p and r["predicted"] in p and
                                                       r["predicted"] != r["label"] for p in reversal_pairs))
                                 for r in records}},
    })
    _reset_plots(out_dir)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows([r["label"], r["predicted"]] for r in records)
    write_text(out_dir / PLOTS / CONFUSION_CSV, buffer.getvalue())
    return result


def _reset_plots(out_dir: Path) -> None:
    plots = out_dir / PLOTS
    plots.mkdir(parents=True, exist_ok=True)
    stale = plots / CONFUSION_CSV
    stale.unlink(missing_ok=True)


def train_dir(run_dir: str | Path, seed_index: int) -> Path:
    """Where seed ``seed_index`` of a training (``artifacts/runs/{task}/{model}``) keeps its checkpoints, history
    and summary: ``{run_dir}/train/seed{k}`` (DVC keeps them across reruns, so a killed seed resumes)."""
    return Path(run_dir) / "train" / f"seed{seed_index}"


def test_dir(run_dir: str | Path, seed_index: int) -> Path:
    """Where seed ``seed_index``'s test evaluation goes: ``{run_dir}/test/seed{k}`` (this module's layout)."""
    return Path(run_dir) / "test" / f"seed{seed_index}"


# The non-learned reference systems of each task (``baselines.py``), evaluated into ``{task}/{PREFIX}{name}``.
BASELINES: dict[str, tuple[str, ...]] = {
    "activity": ("majority", "nearest_neighbour"),
    "image_captioning": ("frequent_caption", "nearest_neighbour"),
    "video_captioning": ("frequent_caption", "nearest_neighbour"),
}
PREFIX = "baseline_"


# --------------------------------------------------------------------------------------------------------
# A training stage's outputs over its seeds


# Per-seed numbers that describe the run, not its quality: not aggregated into metrics.json.
_NOT_METRICS = frozenset({"num_items"})


def seed_folders(out_dir: str | Path, seeds: int) -> list[tuple[Path, Path]]:
    """(train folder, test folder) of every seed k < ``seeds`` (``results.train_dir`` / ``results.test_dir``)."""
    return [(train_dir(out_dir, k), test_dir(out_dir, k)) for k in range(seeds)]


def aggregate(out_dir: str | Path, *, seeds: int, budget: int | None) -> dict[str, Any]:
    """The stage's outputs from its seed folders (every seed must have trained and been evaluated). Seed folders of
    an earlier run with more seeds are removed first, so the stage's outputs hold exactly these seeds.

    ``metrics.json``        every numeric test metric as ``metrics.seed_summary`` (mean, std, 95% t-interval, the
                            values), plus ``num_seeds``, ``num_parameters`` and ``converged`` (seeds that converged)
    ``summary.json``        task, family, parameters and budget, model config, every seed's summary
    ``runinfo.json``        every seed's runinfo.json (less its epochs) and their total ``train_time_s``
    ``learning_curve.json`` every seed's rows, with a ``seed`` column (``dvc plots``)
    ``plots/confusion.csv`` activity: every seed's test predictions (``dvc plots`` confusion)

    Returns metrics.json's content."""
    out_dir = Path(out_dir)
    for part in ("train", "test"):
        for stale in (out_dir / part).glob("seed*"):
            if stale.name.removeprefix("seed").isdigit() and int(stale.name.removeprefix("seed")) >= seeds:
                shutil.rmtree(stale)
    folders = seed_folders(out_dir, seeds)
    for trained, tested in folders:
        for path in (trained / "summary.json", trained / "learning_curve.json", tested / "metrics.json"):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; that seed did not finish")
    summaries = [json.loads((t / "summary.json").read_text(encoding="utf-8")) for t, _ in folders]
    tests = [json.loads((e / "metrics.json").read_text(encoding="utf-8")) for _, e in folders]
    keys = [k for k, v in tests[0].items() if k not in _NOT_METRICS and (v is None or isinstance(v, (int, float)))]
    stats: dict[str, Any] = {k: metrics.seed_summary([t.get(k) for t in tests]) for k in keys}
    first = summaries[0]
    stats.update({"num_seeds": seeds, "num_parameters": first["num_parameters"],
                  "converged": sum(bool(s["converged"]) for s in summaries)})
    summary = {
        "task": first["task"], "family": first["family"], "num_parameters": first["num_parameters"],
        "budget": budget, "model_config": first["model_config"], "metric": first["metric"],
        "seeds": summaries, "converged_seeds": stats["converged"], "num_seeds": seeds,
    }
    write_json(out_dir / "metrics.json", stats)
    write_json(out_dir / "summary.json", summary)
    measured = [{k: v for k, v in read_runinfo(t).items() if k != "epochs"} for t, _ in folders]
    # Replaced, not merged: the file outlives the stage's outputs (it is none), so it may hold an older run's ids.
    write_json(out_dir / RUNINFO, {"seeds": measured,
                                   "train_time_s": round(sum(m.get("train_time_s") or 0.0 for m in measured), 3)})
    curve = [{"seed": s["seed"], **row} for (t, _), s in zip(folders, summaries)
             for row in json.loads((t / "learning_curve.json").read_text(encoding="utf-8"))]
    write_json(out_dir / "learning_curve.json", curve)
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    confusion = [(e / "plots" / "confusion.csv") for _, e in folders]
    if all(p.is_file() for p in confusion):
        rows = [line for p in confusion for line in p.read_text(encoding="utf-8").splitlines()[1:]]
        write_text(plots / "confusion.csv", "actual,predicted\n" + "".join(f"{r}\n" for r in rows))
    return stats
