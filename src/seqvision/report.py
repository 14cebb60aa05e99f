"""The comparison report: per task, every metric as a mean and 95% interval over seeds, parameter counts against
the budget, the convergence of every run, pairwise verdicts from a paired two-level bootstrap, figures and examples
-> ``report.html``, ``report.md`` and ``summary.json``, which depend on the runs' results only (DVC hashes them
the same on every run), and ``runinfo.md``: the trainings' wall-clock time, throughput and peak memory and their
MLflow runs, read from the ``runinfo.json`` files (``io.write_runinfo``), which DVC ignores.

Inputs (paths supplied by the caller; layout in docs/design.md):

- ``{runs_dir}/{task}/{model}/``: the train stage's ``metrics.json`` (per metric ``{"mean", "std", "ci95",
  "seeds"}``, ``num_seeds``, ``num_parameters``, ``converged``), ``summary.json`` (``num_parameters``, ``budget``,
  ``seeds``: every seed's summary with ``seed``, ``converged``, ``best_epoch``, ``epochs_run``, ...),
  ``runinfo.json`` (times, the MLflow run ids; optional), ``learning_curve.json`` (rows with ``seed``) and per seed ``test/seed{k}/`` (or ``seed{k}/``) with
  ``predictions.jsonl``, ``metrics.json`` and ``details.json`` (``"per_item"``: ``cider_d`` / ``rouge_l``
  ``{id: value}`` and ``content`` ``{id: record}`` of ``seqvision.content``);
- ``{baselines_dir}/{task}/baseline_{name}/``: the baselines in ``results.py``'s layout, one "seed" each;
- optionally ``{frames_dir}`` (example frames) and the synthetic benchmark's ``metadata.json`` (the per-template
  oracle ceiling of CIDEr-D beside the image captioning table);
- optionally ``{features_dir}`` and ``{tokens_dir}`` (``artifacts/features``, ``artifacts/tokens``): with the seed's
  ``train/seed{k}/best.pt``, where the best captioner looked for each word of the examples it shows
  (:func:`attention_examples`).

A run whose files are absent or unreadable is shown as *missing* or *failed* with the reason; it never stops the
report. A training whose ``summary.json`` has a ``"status"`` other than ok (the compare flow writes ``{"status":
"failed", "error": ...}``) is *failed*, whatever files an earlier run left.

Verdicts (``metrics.compare_resampled``): for every verdict metric of a task, each pair of model families, and the
best model against the best baseline, is compared by a paired two-level bootstrap (test items resampled alike
for both, seeds per system), which gives the difference's 95% interval and p-value. Holm's correction runs over
the comparisons of one task and metric. "A > B" only when the Holm-adjusted p < 0.05 (so the interval excludes
0); otherwise "~", no significant difference. ``summary.json`` holds every number the summary states.

Scale: caption metrics are coco-caption's raw values (BLEU-n, METEOR, ROUGE-L in [0, 1]; CIDEr-D not x100, it
can exceed 1); accuracies and content metrics are fractions in [0, 1].
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from seqvision import content
from seqvision.config import MODEL_FAMILIES, TASKS
from seqvision.io import load_metadata, read_runinfo, write_bytes, write_json, write_text
from seqvision.metrics import (
    item_cider_d,
    compare_resampled,
    holm,
    item_weights,
    meteor_scores,
    ratio_of_sums,
    read_jsonl,
    resampled_values,
    seed_summary,
    tokenized_corpus,
    verdict_symbol,
)
from seqvision.results import BASELINES, CAPTION_SCALE, DETAILS, HEADLINE, METRICS, PREDICTIONS, PREFIX

ORDER_BLIND = "meanpool"
# Tasks where time order matters: only there is mean-pool "order-blind" (on image captioning it pools grid cells).
ORDERED_TASKS = ("activity", "video_captioning")
ALPHA = 0.05
RESAMPLES = 2000
BUDGET_TOLERANCE = 0.10  # a family more than 10% from the task's parameter budget is flagged (issue #11)

TITLES = {"activity": "Activity recognition", "image_captioning": "Image captioning",
          "video_captioning": "Video captioning"}
METRIC_LABELS = {
    "top_1": "Top-1", "top_5": "Top-5", "mean_class_accuracy": "Mean-class acc.",
    "reversal_pair_accuracy": "Reversal-pair acc.", "reversal_swap_rate": "Reversal swap rate",
    "bleu_1": "BLEU-1", "bleu_2": "BLEU-2", "bleu_3": "BLEU-3", "bleu_4": "BLEU-4", "meteor": "METEOR",
    "rouge_l": "ROUGE-L", "cider_d": "CIDEr-D",
    "content_object_f1": "Object F1", "content_size_accuracy": "Size acc.", "content_relation_f1": "Relation F1",
    "content_object_f1/compositional": "Object F1 (compositional)",
    "content_relation_f1/compositional": "Relation F1 (compositional)",
    "content_event_f1": "Event F1", "content_order_accuracy": "Order acc. (multi-event)",
    "content_main_event_recall": "Main-event recall",
}
# The tables' columns. Content metrics (synthetic benchmark only) are the headline there; coco-caption stays for
# comparability and real data.
CONTENT_METRICS = {
    "image_captioning": ("content_object_f1", "content_size_accuracy", "content_relation_f1",
                         "content_object_f1/compositional", "content_relation_f1/compositional"),
    "video_captioning": ("content_event_f1", "content_order_accuracy", "content_main_event_recall"),
}
COCO_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d")
TASK_METRICS = {
    "activity": ("top_1", "top_5", "mean_class_accuracy", "reversal_pair_accuracy", "reversal_swap_rate"),
    "image_captioning": (*CONTENT_METRICS["image_captioning"], *COCO_METRICS),
    "video_captioning": (*CONTENT_METRICS["video_captioning"], *COCO_METRICS),
}
# Metrics with a verdict between every pair of families; the first one available is the task's primary metric
# (content metrics are absent on real data, so CIDEr-D is primary there).
VERDICT_METRICS = {
    "activity": ("top_1",),
    "image_captioning": ("content_object_f1", "content_relation_f1", "cider_d"),
    "video_captioning": ("content_event_f1", "cider_d"),
}
# The metric that needs time order: each order-aware family against the order-blind one.
ORDER_METRICS = {"activity": "reversal_pair_accuracy", "video_captioning": "content_order_accuracy"}
# Metrics that are a ratio of two per-item sums (a mean: the denominator is 1 per item).
RATIO_COLUMNS = {
    "top_1": ("correct", "items"), "reversal_pair_accuracy": ("correct_in_pair", "in_pair"),
    "reversal_swap_rate": ("swapped", "in_pair"), "cider_d": ("cider_d", "items"), "rouge_l": ("rouge_l", "items"),
}
# The content subsets a record flags: (task, subset) -> record key.
SUBSETS = {"compositional": "compositional", "multi_event": "multi_event"}
# Short names of metrics on the MLflow parent run: "{task}.{model}.{name}".
PARENT_METRIC = {"top_1": "top1", "cider_d": "cider_d", "reversal_pair_accuracy": "reversal_pair_acc"}

# Keys read from the train stage's summaries, with the spellings accepted for each.
SUMMARY_KEYS = {
    "parameters": ("num_parameters", "parameters", "parameter_count", "param_count", "num_params", "n_params"),
    "budget": ("budget", "parameter_budget", "param_budget"),
    "train_time_s": ("train_time_s", "train_wall_time_s", "wall_time_s", "train_seconds", "training_time_s"),
    "samples_per_s": ("samples_per_s", "train_samples_per_s", "throughput_samples_per_s", "throughput"),
    "peak_memory_mb": ("peak_memory_mb", "train_peak_memory_mb"),
    "epochs": ("epochs_run", "epochs", "num_epochs", "epochs_trained"),
    "best_epoch": ("best_epoch",),
    "converged": ("converged",),
    "best_val_metric": ("best_val_metric", "best_metric", "best_val"),
    "val_metric_name": ("metric", "val_metric_name", "metric_name"),
    "device": ("device",),
    "run_id": ("mlflow_run_id", "run_id", "child_run_id"),
    "parent_run_id": ("mlflow_parent_run_id", "parent_run_id"),
    "status": ("status",),
    "error": ("error", "message", "reason"),
}
_OK_STATUSES = {"ok", "finished", "success", "succeeded", "completed", "done"}


class ItemData(NamedTuple):
    """One seed's per-item test scores, what the bootstrap resamples."""

    columns: dict[str, dict[str, float]]  # RATIO_COLUMNS' columns: {"correct": {id: 0/1}, "items": {id: 1}, ...}
    content: dict[str, dict[str, Any]]  # seqvision.content's per-item records by id ({} without)


class SeedResult(NamedTuple):
    """One seed of a trained model (or a baseline, one "seed"): its test outputs."""

    index: int  # k of seed{k}
    seed: int | None  # the seed value (train.seed + k), when the summary says
    folder: Path  # predictions.jsonl, metrics.json, details.json
    metrics: dict[str, Any]  # the seed's test metrics (numbers)
    details: dict[str, Any]
    summary: dict[str, Any]  # the seed's training summary ({} for a baseline)
    items: ItemData


class Run(NamedTuple):
    """One row of a task's tables: a trained model family (every seed) or a baseline."""

    task: str
    name: str  # model family, or "baseline_{name}"
    kind: str  # "model" | "baseline"
    status: str  # "ok" | "missing" | "failed"
    note: str  # why it is missing or failed ("" when ok)
    metrics: dict[str, dict[str, Any]]  # metric -> metrics.seed_summary ({"mean", "std", "ci95", "seeds"})
    summary: dict[str, Any]  # the stage's summary.json ({} for baselines)
    curve: list[dict[str, Any]]  # learning-curve rows, with "seed"
    seeds: tuple[SeedResult, ...]
    folder: Path

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def value(self, key: str) -> float | None:
        """The mean over seeds of a metric (None when absent)."""
        return _number((self.metrics.get(key) or {}).get("mean"))

    def interval(self, key: str) -> tuple[float, float] | None:
        ci = (self.metrics.get(key) or {}).get("ci95")
        return (float(ci[0]), float(ci[1])) if isinstance(ci, (list, tuple)) and len(ci) == 2 else None

    def info(self, key: str) -> Any:
        return find_key(self.summary, SUMMARY_KEYS[key])

    def seed_info(self, key: str) -> list[Any]:
        """``key`` of every seed's training summary (missing ones as None)."""
        return [find_key(s.summary, SUMMARY_KEYS[key]) for s in self.seeds]

    def checkpoint(self, index: int) -> Path:
        """The ``best.pt`` of seed ``index`` (k of seed{k}): the checkpoint its test outputs come from."""
        return self.folder / "train" / f"seed{index}" / "best.pt"


# --------------------------------------------------------------------------------------------------------
# Loading


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def find_key(data: Any, names: Sequence[str], *, depth: int = 2) -> Any:
    """The value of the first of ``names`` found in ``data``, searching nested mappings breadth first."""
    level = [data]
    for _ in range(depth + 1):
        for node in level:
            if isinstance(node, Mapping):
                for name in names:
                    if name in node and not isinstance(node[name], Mapping):
                        return node[name]
        level = [v for node in level if isinstance(node, Mapping) for v in node.values() if isinstance(v, Mapping)]
    return None


def _read_json(path: Path) -> tuple[Any, str]:
    """(content, "") or (None, reason)."""
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        return json.loads(path.read_text(encoding="utf-8")), ""
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"unreadable {path.name}: {str(err).splitlines()[0]}"


def _curve(folder: Path) -> list[dict[str, Any]]:
    data, _ = _read_json(folder / "learning_curve.json")
    if isinstance(data, Mapping):  # e.g. {"epochs": [...]}
        data = next((v for v in data.values() if isinstance(v, list)), None)
    if isinstance(data, list) and data and all(isinstance(e, Mapping) for e in data):
        return [dict(e) for e in data]
    return []


def _read_predictions(folder: Path) -> dict[str, dict[str, Any]]:
    try:
        return {str(r["id"]): r for r in read_jsonl(folder / PREDICTIONS)}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def item_data(task: str, folder: Path, details: Mapping[str, Any]) -> ItemData:
    """The per-item scores of one seed's test outputs in ``folder``.

    Activity: from predictions.jsonl (``correct``, and for the time-reversed class pairs of details.json
    ``in_pair``, ``correct_in_pair``, ``swapped``: predicted as the partner class). Captioning: details.json's
    ``per_item`` ``cider_d`` / ``rouge_l`` and ``content`` records; without them CIDEr-D is scored per item
    from predictions.jsonl."""
    predictions = _read_predictions(folder)
    per_item = details.get("per_item") if isinstance(details.get("per_item"), Mapping) else {}
    columns: dict[str, dict[str, float]] = {}
    if not predictions:
        return ItemData(columns, {})
    columns["items"] = {i: 1.0 for i in predictions}
    if task == "activity":
        partner: dict[str, str] = {}
        for pair in details.get("reversal_pairs") or ():
            if isinstance(pair, (list, tuple)) and len(pair) == 2:
                partner[str(pair[0])], partner[str(pair[1])] = str(pair[1]), str(pair[0])
        columns["correct"] = {i: float(r.get("predicted") == r.get("label")) for i, r in predictions.items()}
        if partner:
            columns["in_pair"] = {i: float(str(r.get("label")) in partner) for i, r in predictions.items()}
            columns["correct_in_pair"] = {i: columns["correct"][i] * columns["in_pair"][i] for i in predictions}
            columns["swapped"] = {i: float(partner.get(str(r.get("label"))) == str(r.get("predicted")))
                                  for i, r in predictions.items()}
        return ItemData(columns, {})
    for key in ("cider_d", "rouge_l"):
        scores = per_item.get(key)
        if isinstance(scores, Mapping) and set(map(str, scores)) >= set(predictions):
            columns[key] = {str(i): float(v) for i, v in scores.items() if str(i) in predictions}
    if "cider_d" not in columns:
        columns["cider_d"] = item_cider_d(predictions)
    records = per_item.get("content")
    found = {str(i): dict(r) for i, r in records.items() if isinstance(r, Mapping)} if isinstance(records, Mapping) else {}
    return ItemData(columns, found)


def _test_folders(folder: Path) -> dict[int, Path]:
    """``{k: folder}`` of every seed's test outputs: ``test/seed{k}`` (else ``seed{k}``) under a run's folder."""
    found: dict[int, Path] = {}
    for pattern in ("seed*", "test/seed*"):  # test/seed{k} wins where both exist
        for path in folder.glob(pattern):
            k = path.name.removeprefix("seed")
            if path.is_dir() and k.isdigit() and (path / METRICS).is_file():
                found[int(k)] = path
    return dict(sorted(found.items()))


def _seed_result(task: str, index: int, folder: Path, summary: Mapping[str, Any]) -> SeedResult:
    metrics, _ = _read_json(folder / METRICS)
    details, _ = _read_json(folder / DETAILS)
    details = dict(details) if isinstance(details, Mapping) else {}
    seed = _number(summary.get("seed"))
    return SeedResult(index=index, seed=None if seed is None else int(seed), folder=folder,
                      metrics=dict(metrics) if isinstance(metrics, Mapping) else {}, details=details,
                      summary={**read_runinfo(folder), **summary}, items=item_data(task, folder, details))


def _content_metrics(task: str, seeds: Sequence[SeedResult]) -> dict[str, dict[str, Any]]:
    """Content metrics (and their subsets) over seeds, from the per-item records (every seed must have them)."""
    if task not in CONTENT_METRICS or not seeds or not all(s.items.content for s in seeds):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for key in CONTENT_METRICS[task]:
        name, _, subset = key.removeprefix("content_").partition("/")
        values = []
        for s in seeds:
            records = [r for r in s.items.content.values() if not subset or r.get(SUBSETS.get(subset, subset))]
            values.append(content.summarize(records).get(name) if records else None)
        out[key] = seed_summary(values)
    return out


def _metric_summaries(task: str, metrics: Mapping[str, Any], seeds: Sequence[SeedResult]) -> dict[str, dict[str, Any]]:
    """Every metric as a seed summary: the stage's own (``{"mean", ...}`` entries of its metrics.json), else one
    built from the seeds' metrics.json (a baseline: one seed), plus content metrics from per-item records."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping) and "mean" in value:
            out[key] = {"mean": value.get("mean"), "std": value.get("std"), "ci95": value.get("ci95"),
                        "seeds": list(value.get("seeds") or [])}
    keys = {k for s in seeds for k, v in s.metrics.items() if v is None or isinstance(v, (int, float))}
    for key in sorted(keys - set(out) - {"num_items"}):
        out[key] = seed_summary([_number(s.metrics.get(key)) for s in seeds])
    for key, value in _content_metrics(task, seeds).items():
        out.setdefault(key, value)
    return out


def load_model_run(task: str, name: str, *, runs_dir: Path) -> Run:
    """A trained model family (every seed) from ``{runs_dir}/{task}/{name}/``, with its status."""
    folder = runs_dir / task / name
    summary: dict[str, Any] = {}
    status, note = "ok", ""
    runinfo = read_runinfo(folder)
    data, reason = _read_json(folder / "summary.json")
    if isinstance(data, Mapping):
        summary = {**runinfo, **data}
    elif data is not None or reason.startswith("unreadable"):
        status, note = "failed", f"train: {reason or 'summary.json is not an object'}"
    train_status = find_key(summary, SUMMARY_KEYS["status"])
    if isinstance(train_status, str) and train_status.lower() not in _OK_STATUSES:
        error = find_key(summary, SUMMARY_KEYS["error"])
        status, note = "failed", f"train {train_status}" + (f": {error}" if error else "")
    metrics, reason = _read_json(folder / METRICS)
    if status == "ok" and not isinstance(metrics, Mapping):
        if metrics is not None or reason.startswith("unreadable"):
            status, note = "failed", f"train: {reason or 'metrics.json is not an object'}"
        elif not folder.is_dir() or not any(folder.iterdir()):
            status, note = "missing", "not trained (no run folder)"
        else:
            status, note = "missing", "not finished (no metrics.json over seeds)"
    seed_summaries = summary.get("seeds") if isinstance(summary.get("seeds"), list) else []
    measured = runinfo["seeds"] if isinstance(runinfo.get("seeds"), list) else []
    seeds: list[SeedResult] = []
    if status == "ok":
        for k, path in _test_folders(folder).items():
            own = seed_summaries[k] if k < len(seed_summaries) and isinstance(seed_summaries[k], Mapping) else {}
            if not own:
                own_data, _ = _read_json(folder / "train" / f"seed{k}" / "summary.json")
                own = own_data if isinstance(own_data, Mapping) else {}
            trained = measured[k] if k < len(measured) and isinstance(measured[k], Mapping) else {
                key: v for key, v in read_runinfo(folder / "train" / f"seed{k}").items() if key != "epochs"}
            seeds.append(_seed_result(task, k, path, {**trained, **own}))
        expected = _number(metrics.get("num_seeds")) if isinstance(metrics, Mapping) else None
        if expected is not None and len(seeds) < expected:
            note = f"test outputs of {len(seeds)} of {int(expected)} seeds (comparisons use those)"
    return Run(
        task=task, name=name, kind="model", status=status, note=note,
        metrics=_metric_summaries(task, metrics, seeds) if status == "ok" else {},
        summary=summary, curve=_curve(folder) if status == "ok" else [], seeds=tuple(seeds), folder=folder,
    )


def load_baseline_run(task: str, name: str, *, baselines_dir: Path) -> Run:
    """A baseline from ``{baselines_dir}/{task}/{name}/`` (results.py's layout) as a run of one seed."""
    folder = baselines_dir / task / name
    metrics, reason = _read_json(folder / METRICS)
    if not isinstance(metrics, Mapping):
        failed = metrics is not None or reason.startswith("unreadable")
        status, note = ("failed", f"baselines: {reason or 'metrics.json is not an object'}") if failed else (
            "missing", "not evaluated (no metrics.json)")
        return Run(task, name, "baseline", status, note, {}, {}, [], (), folder)
    seed = _seed_result(task, 0, folder, {})
    return Run(task, name, "baseline", "ok", "", _metric_summaries(task, {}, [seed]), {}, [], (seed,), folder)


def load_runs(
    *, runs_dir: str | Path, baselines_dir: str | Path | None, tasks: Sequence[str] = TASKS,
    models: Sequence[str] = MODEL_FAMILIES,
) -> dict[str, list[Run]]:
    """``{task: [runs]}``: every expected model family, then every expected or present baseline (none when
    ``baselines_dir`` is None)."""
    runs_path = Path(runs_dir)
    out: dict[str, list[Run]] = {}
    for task in tasks:
        task_runs = [load_model_run(task, m, runs_dir=runs_path) for m in models]
        if baselines_dir is not None:
            base = Path(baselines_dir)
            expected = [f"{PREFIX}{b}" for b in BASELINES.get(task, ())]
            present = sorted(p.name for p in (base / task).glob(f"{PREFIX}*") if p.is_dir())
            task_runs += [load_baseline_run(task, name, baselines_dir=base)
                          for name in expected + [p for p in present if p not in expected]]
        out[task] = task_runs
    return out


def add_meteor(runs: Mapping[str, list[Run]], *, mode: str = "auto") -> tuple[dict[str, list[Run]], str]:
    """Every captioning seed's METEOR, scored with one Java process for all of them, then over seeds: (runs, note).

    The train and baselines stages leave METEOR out (``null``): each would start the JVM and load METEOR's
    paraphrase table again (10-25 s each here), while one process scores every corpus in about a second each.
    ``mode``: ``auto`` scores when Java is on PATH (the table says "unavailable" otherwise), ``always`` raises
    without Java, ``never`` skips. The note says which happened, for the log.
    """
    from seqvision.metrics import java_available

    out = {task: list(task_runs) for task, task_runs in runs.items()}
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"meteor mode must be auto, always or never, got {mode!r}")
    if mode == "never":
        return out, "METEOR not computed (compute_meteor: never)"
    if not java_available():
        if mode == "always":
            raise RuntimeError("compute_meteor is 'always' but there is no Java runtime ('java' on PATH)")
        return out, "METEOR unavailable: no Java runtime ('java' on PATH)"
    corpora = {}
    for task, task_runs in out.items():
        if task == "activity":
            continue
        for i, run in enumerate(task_runs):
            for s in run.seeds if run.ok else ():
                records = list(_read_predictions(s.folder).values())
                if records and all(r.get("references") for r in records):
                    corpora[f"{task}/{i}/{s.index}"] = tokenized_corpus(records)
    if not corpora:
        return out, "METEOR: no captioning predictions to score"
    scores = meteor_scores(corpora)
    for task, task_runs in out.items():
        for i, run in enumerate(task_runs):
            values = [scores.get(f"{task}/{i}/{s.index}") for s in run.seeds]
            if run.seeds and all(v is not None for v in values):
                seeds = tuple(s._replace(metrics={**s.metrics, "meteor": v}) for s, v in zip(run.seeds, values))
                task_runs[i] = run._replace(seeds=seeds, metrics={**run.metrics, "meteor": seed_summary(values)})
    return out, f"METEOR scored for {len(corpora)} captioning test sets (every seed) in one Java process"


def read_predictions(run: Run) -> dict[str, dict[str, Any]]:
    """``{id: record}`` of a run's first seed's predictions.jsonl ({} when absent or unreadable)."""
    return _read_predictions(run.seeds[0].folder) if run.seeds else {}


# --------------------------------------------------------------------------------------------------------
# Statistics: pairwise comparisons and their verdicts


class Compared(NamedTuple):
    """One comparison ``a`` - ``b`` on ``metric`` and its verdict after Holm's correction over its family."""

    metric: str
    a: str
    b: str
    family: str  # "pairs" (every pair of families, and the best model vs the best baseline) | "order"
    comparison: Any  # metrics.Comparison
    p_holm: float
    symbol: str  # ">" | "<" | "~"

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "a": self.a, "b": self.b, "family": self.family, "symbol": self.symbol,
                "verdict": self.sentence(), "p_holm": self.p_holm, **self.comparison.to_json()}

    def sentence(self) -> str:
        return f"{self.a} {self.symbol} {self.b}" if self.symbol != "~" else f"{self.a} ~ {self.b}"


class TaskStats(NamedTuple):
    task: str
    primary: str | None  # the first verdict metric some model has (content metrics exist on synthetic data only)
    comparisons: list[Compared]
    notes: list[str]  # comparisons that could not be made, and why


def _content_statistic(metric: str, keys: Sequence[str]) -> Callable[[np.ndarray], np.ndarray]:
    """Summed content counts (M, K) -> the rate ``metric`` names, through ``content.summarize`` (micro averages)."""
    name = metric.removeprefix("content_").partition("/")[0]

    def statistic(totals: np.ndarray) -> np.ndarray:
        rows = np.atleast_2d(totals)
        values = [content.summarize([dict(zip(keys, row))]).get(name) for row in rows]
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)

    return statistic


def item_tables(run: Run, metric: str, ids: Sequence[str] | None = None
                ) -> tuple[list[str], list[np.ndarray], Callable[[np.ndarray], np.ndarray]] | None:
    """(item ids, per-seed (N, K) tables, statistic) of ``metric`` for ``run``, or None without per-item data.
    ``ids``: the items to use, in this order (default: those every seed has)."""
    if not run.seeds:
        return None
    if metric.startswith("content_"):
        if not all(s.items.content for s in run.seeds):
            return None
        subset = metric.partition("/")[2]
        first = next(iter(run.seeds[0].items.content.values()))
        keys = sorted(k for k, v in first.items() if isinstance(v, int) and not isinstance(v, bool))
        common = ids if ids is not None else sorted(set.intersection(*(set(s.items.content) for s in run.seeds)))
        tables = []
        for s in run.seeds:
            if not set(common) <= set(s.items.content):
                return None
            rows = [[float(s.items.content[i].get(k, 0)) for k in keys] for i in common]
            table = np.asarray(rows, dtype=np.float64).reshape(len(common), len(keys))  # (N, K)
            if subset:
                flag = SUBSETS.get(subset, subset)
                table = table * np.array([[bool(s.items.content[i].get(flag))] for i in common], dtype=np.float64)
            tables.append(table)
        return list(common), tables, _content_statistic(metric, keys)
    if metric not in RATIO_COLUMNS:
        return None  # e.g. BLEU and METEOR: corpus statistics that are not sums over items
    columns, statistic = list(RATIO_COLUMNS[metric]), ratio_of_sums
    if not all(all(c in s.items.columns for c in columns) for s in run.seeds):
        return None
    common = ids if ids is not None else sorted(set.intersection(
        *(set(s.items.columns[c]) for s in run.seeds for c in columns)))
    tables = []
    for s in run.seeds:
        if not all(set(common) <= set(s.items.columns[c]) for c in columns):
            return None
        tables.append(np.array([[s.items.columns[c][i] for c in columns] for i in common], dtype=np.float64))
    return list(common), tables, statistic


def _compare(metric: str, pairs: Sequence[tuple[Run, Run]], *, resamples: int, seed: int,
             notes: list[str]) -> list[tuple[str, str, str, Any]]:
    """Raw comparisons (metric, a, b, Comparison) of ``pairs`` on the items every system involved has."""
    systems = {r.name: r for pair in pairs for r in pair}
    usable = {}
    for name, run in systems.items():
        if item_tables(run, metric) is None:
            notes.append(f"{METRIC_LABELS.get(metric, metric)}: {name} has no per-item scores, so it is not compared")
        else:
            usable[name] = run
    pairs = [(a, b) for a, b in pairs if a.name in usable and b.name in usable]
    if not pairs:
        return []
    own = {name: set(item_tables(run, metric)[0]) for name, run in usable.items()}  # type: ignore[index]
    ids = sorted(set.intersection(*own.values()))
    larger = sorted(name for name, items in own.items() if len(items) > len(ids))
    if larger and ids:
        notes.append(f"{METRIC_LABELS.get(metric, metric)}: compared on the {len(ids)} test items every system has "
                     f"({', '.join(larger)} scored more)")
    if len(ids) < 2:
        notes.append(f"{METRIC_LABELS.get(metric, metric)}: fewer than 2 test items shared by the systems")
        return []
    weights = item_weights(len(ids), resamples=resamples, seed=seed)  # one draw for every system: the pairing
    values = {}
    for name, run in usable.items():
        _, tables, statistic = item_tables(run, metric, ids)  # type: ignore[misc]
        values[name] = resampled_values(tables, weights, statistic=statistic)
    out = []
    for a, b in pairs:
        try:
            out.append((metric, a.name, b.name, compare_resampled(values[a.name], values[b.name], num_items=len(ids),
                                                                  confidence=1 - ALPHA, seed=seed)))
        except ValueError as err:
            notes.append(f"{METRIC_LABELS.get(metric, metric)}: {a.name} vs {b.name} not compared: {err}")
    return out


def _ranked(runs: Sequence[Run], key: str) -> list[Run]:
    return sorted((r for r in runs if r.ok and r.value(key) is not None), key=lambda r: (-r.value(key), r.name))


def task_statistics(task: str, runs: Sequence[Run], *, resamples: int = RESAMPLES, seed: int = 0) -> TaskStats:
    """Every comparison of a task: on each verdict metric every pair of model families (the higher mean as ``a``)
    and the best model against the best baseline (on the primary metric); on the order metric each order-aware
    family against the order-blind one. Holm's correction over each metric's comparisons."""
    models = [r for r in runs if r.kind == "model" and r.ok]
    baselines = [r for r in runs if r.kind == "baseline" and r.ok]
    notes: list[str] = []
    comparisons: list[Compared] = []
    available = [m for m in VERDICT_METRICS.get(task, ()) if any(r.value(m) is not None for r in models)]
    primary = available[0] if available else None
    families: list[tuple[str, str, list[tuple[Run, Run]]]] = []
    for metric in available:
        ranked = _ranked(models, metric)
        undefined = [r.name for r in models if r.value(metric) is None]
        if undefined:
            notes.append(f"{METRIC_LABELS.get(metric, metric)}: undefined for {', '.join(undefined)} (e.g. a rate "
                         "whose denominator is 0 on some seed: nothing of that kind named)")
        pairs = [(ranked[i], ranked[j]) for i in range(len(ranked)) for j in range(i + 1, len(ranked))]
        best_baseline = _ranked(baselines, metric)
        if metric == primary and ranked and best_baseline:
            top, base = ranked[0], best_baseline[0]
            pairs.append((top, base) if top.value(metric) >= base.value(metric) else (base, top))  # type: ignore[operator]
        families.append((metric, "pairs", pairs))
    order = ORDER_METRICS.get(task)
    blind = next((r for r in models if r.name == ORDER_BLIND), None)
    if order and blind is not None and blind.value(order) is not None:
        aware = [r for r in _ranked(models, order) if r.name != ORDER_BLIND]
        families.append((order, "order", [(r, blind) for r in aware]))
    for metric, family, pairs in families:
        raw = _compare(metric, pairs, resamples=resamples, seed=seed, notes=notes)
        adjusted = holm([c.p_value for *_, c in raw])
        for (m, a, b, comparison), p in zip(raw, adjusted):
            comparisons.append(Compared(m, a, b, family, comparison, p,
                                        verdict_symbol(comparison, adjusted_p=p, alpha=ALPHA)))
    return TaskStats(task, primary, comparisons, list(dict.fromkeys(notes)))


def _find(stats: TaskStats, metric: str, a: str, b: str, family: str | None = None) -> Compared | None:
    """The comparison of ``a`` and ``b`` on ``metric``, oriented as ``a`` - ``b``."""
    for c in stats.comparisons:
        if c.metric != metric or (family and c.family != family):
            continue
        if (c.a, c.b) == (a, b):
            return c
        if (c.b, c.a) == (a, b):
            flipped = c.comparison._replace(difference=-c.comparison.difference,
                                            interval=(-c.comparison.interval[1], -c.comparison.interval[0]),
                                            percentile_interval=(-c.comparison.percentile_interval[1],
                                                                 -c.comparison.percentile_interval[0]),
                                            seed_variance=c.comparison.seed_variance[::-1],
                                            seeds=c.comparison.seeds[::-1])
            return c._replace(a=a, b=b, comparison=flipped, symbol={">": "<", "<": ">"}.get(c.symbol, "~"))
    return None


# --------------------------------------------------------------------------------------------------------
# Runs: convergence and size


def convergence(run: Run) -> str:
    """"3/3 converged", "not converged: 1/3 seeds hit train.epochs while still improving (best epoch 5 of 5)", or
    what is known; "—" for a baseline."""
    if run.kind == "baseline" or not run.ok:
        return "—"
    flags = run.seed_info("converged") if run.seeds else []
    if not flags or any(not isinstance(f, bool) for f in flags):
        listed = run.summary.get("seeds") if isinstance(run.summary.get("seeds"), list) else []
        flags = [s.get("converged") if isinstance(s, Mapping) else None for s in listed]
    if not flags or any(not isinstance(f, bool) for f in flags):
        return "convergence unknown"
    n, done = len(flags), sum(flags)
    if done == n:
        return f"{done}/{n} converged"
    idle = [(s, b, e) for s, f, b, e in zip(run.seeds, flags, run.seed_info("best_epoch"), run.seed_info("epochs"))
            if not f]
    at_cap = [f"{int(b)} of {int(e)}" for _, b, e in idle if _number(b) is not None and _number(e) is not None]
    still = all(_number(b) is not None and b == e for _, b, e in idle) and idle
    why = "hit train.epochs while still improving" if still else (
        "hit train.epochs without train.patience epochs of no improvement")
    return f"not converged: {n - done}/{n} seeds {why}" + (f" (best epoch {', '.join(at_cap)})" if at_cap else "")


def parameter_note(run: Run) -> tuple[str, bool]:
    """(how the parameter count compares with the task's budget, whether it is more than 10% off)."""
    params, budget = _number(run.info("parameters")), _number(run.info("budget"))
    if run.kind == "baseline" or params is None:
        return "—", False
    if budget is None or budget <= 0:
        return "no budget", False
    deviation = params / budget - 1
    flagged = abs(deviation) > BUDGET_TOLERANCE
    return f"{'⚠ ' if flagged else ''}{deviation:+.1%} of {int(budget):,}", flagged


def size_note(task: str, runs: Sequence[Run]) -> str | None:
    """A sentence about parameter counts: families off budget, or the spread when no budget is set."""
    models = [r for r in runs if r.kind == "model" and r.ok and _number(r.info("parameters")) is not None]
    if not models:
        return None
    flagged = [(r, parameter_note(r)[0]) for r in models if parameter_note(r)[1]]
    if flagged:
        return ("Parameter counts more than 10% from the budget: " + "; ".join(
            f"{r.name} {int(r.info('parameters')):,} ({note.removeprefix('⚠ ')})" for r, note in flagged)
            + ". Its comparisons are not size-matched.")
    if all(parameter_note(r)[0] == "no budget" for r in models):
        sizes = sorted(int(r.info("parameters")) for r in models)
        return (f"No parameter budget (models.match_params off): sizes range {sizes[0]:,}-{sizes[-1]:,} "
                f"({sizes[-1] / max(sizes[0], 1):.1f}x), so the comparisons are not size-matched.")
    return None


# --------------------------------------------------------------------------------------------------------
# Verdicts: sentences that follow from the comparisons


def _ci(interval: Any, digits: int = 3) -> str:
    if not interval:
        return "no interval (1 seed)"
    return f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def _signed_ci(interval: Sequence[float]) -> str:
    return f"[{interval[0]:+.3f}, {interval[1]:+.3f}]"


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def _describe(run: Run, metric: str) -> str:
    ci = run.interval(metric)
    seeds = len((run.metrics.get(metric) or {}).get("seeds") or [])
    return f"{run.name} {run.value(metric):.3f} " + (_ci(ci) if ci else f"({seeds} seed{'s' if seeds != 1 else ''}, no interval)")


def _difference(c: Compared) -> str:
    return (f"{c.a} - {c.b} = {c.comparison.difference:+.3f} {_signed_ci(c.comparison.interval)}, "
            f"Holm p {_p(c.p_holm)}")


def headline_verdict(task: str, runs: Sequence[Run], stats: TaskStats) -> str:
    """The task's verdict on its primary metric, with its uncertainty; never a winner without significance."""
    metric = stats.primary
    if metric is None:
        return "No model finished evaluation, so there is no verdict."
    label = METRIC_LABELS.get(metric, metric)
    models = _ranked([r for r in runs if r.kind == "model"], metric)
    best = models[0]
    if len(models) == 1:
        return f"{best.name} is the only model evaluated on {label}: {_describe(best, metric)}; nothing to compare."
    versus = [(r, _find(stats, metric, best.name, r.name, "pairs")) for r in models[1:]]
    tested = [(r, c) for r, c in versus if c is not None]
    if not tested:
        return (f"No verdict on {label}: the comparisons could not be made ({'; '.join(stats.notes) or 'no data'}). "
                f"Means: " + ", ".join(_describe(r, metric) for r in models) + ".")
    runner, closest = tested[0]
    tied = [r.name for r, c in tested if c.symbol != ">"]
    if not tied and len(tested) == len(models) - 1:
        return (f"{best.name} is best on {label}: {_describe(best, metric)}, significantly ahead of every other family; "
                f"closest {_difference(closest)}.")
    beaten = [r.name for r, c in tested if c.symbol == ">"]
    line = (f"No significant winner on {label}: {_describe(best, metric)} ~ "
            + ", ".join(_describe(r, metric) for r in models[1:] if r.name in tied)
            + f"; {_difference(closest)}")
    if beaten:
        line += f"; significantly below {best.name}: {', '.join(beaten)}"
    return line + "."


def ranking(metric: str, runs: Sequence[Run], stats: TaskStats) -> str | None:
    """"a 0.512 > b 0.498 ~ c 0.480": models by mean, each symbol the verdict of that adjacent pair."""
    models = _ranked([r for r in runs if r.kind == "model"], metric)
    if len(models) < 2:
        return None
    text = f"{models[0].name} {models[0].value(metric):.3f}"
    for prev, run in zip(models, models[1:]):
        c = _find(stats, metric, prev.name, run.name, "pairs")
        text += f" {c.symbol if c else '?'} {run.name} {run.value(metric):.3f}"
    return f"Ranking on {METRIC_LABELS.get(metric, metric)} (adjacent pairs): {text}."


def baseline_verdict(runs: Sequence[Run], stats: TaskStats, *, unless_above: bool = False) -> str | None:
    """The best model against the best baseline on the primary metric. With ``unless_above`` (the summary), None
    when the model is significantly above it (without per-item scores to test: when its mean is higher), so the
    summary names a baseline only when it is not beaten."""
    metric = stats.primary
    if metric is None:
        return None
    models = _ranked([r for r in runs if r.kind == "model"], metric)
    baselines = _ranked([r for r in runs if r.kind == "baseline"], metric)
    if not models or not baselines:
        return None
    best, base = models[0], baselines[0]
    label = METRIC_LABELS.get(metric, metric)
    c = _find(stats, metric, best.name, base.name, "pairs")
    if unless_above and (c.symbol == ">" if c is not None else best.value(metric) > base.value(metric)):
        return None
    if c is None:
        return f"Best baseline on {label}: {base.name} {base.value(metric):.3f} (not compared: no per-item scores)."
    if c.symbol == "<":
        return f"The best baseline, {base.name} ({base.value(metric):.3f}), beats the best model on {label}: {_difference(c)}."
    word = "above" if c.symbol == ">" else "not significantly different from"
    return f"The best model is {word} the best baseline on {label}: {base.name} {base.value(metric):.3f}; {_difference(c)}."


def order_blind_verdict(task: str, runs: Sequence[Run], stats: TaskStats) -> str | None:
    """Only for tasks with time order: how the order-aware families fare against the order-blind mean-pool."""
    if task not in ORDERED_TASKS or stats.primary is None:
        return None
    models = [r for r in runs if r.kind == "model" and r.ok]
    blind = next((r for r in models if r.name == ORDER_BLIND), None)
    if blind is None:
        return None
    # Video captioning: order accuracy of the events told, where the content metrics exist (the synthetic
    # benchmark); else (and for activity, whose order test is the reversal verdict) the primary metric.
    metric, family = ORDER_METRICS["video_captioning"], "order"
    if task != "video_captioning" or blind.value(metric) is None:
        metric, family = stats.primary, "pairs"
    if blind.value(metric) is None:
        return None
    aware = [r for r in _ranked(models, metric) if r.name != ORDER_BLIND]
    found = [(r, _find(stats, metric, r.name, ORDER_BLIND, family)) for r in aware]
    found = [(r, c) for r, c in found if c is not None]
    if not found:
        return None
    above = [r.name for r, c in found if c.symbol == ">"]
    below = [r.name for r, c in found if c.symbol == "<"]
    tied = [r.name for r, c in found if c.symbol == "~"]
    label = METRIC_LABELS.get(metric, metric)
    parts = [f"significantly above it: {', '.join(above) if above else 'none'}"]
    if tied:
        parts.append(f"~: {', '.join(tied)}")
    if below:
        parts.append(f"significantly below it: {', '.join(below)}")
    return (f"Order-blind {ORDER_BLIND} ({_describe(blind, metric)}) against the order-aware families on {label} "
            f"({len(found)} compared): " + "; ".join(parts) + ".")


def reversal_verdict(runs: Sequence[Run], stats: TaskStats) -> str:
    """Activity: within-pair accuracy on time-reversed class pairs, each order-aware family against mean-pool
    (which sees a clip and its reversal alike, so it cannot beat ~0.5 within a pair), with swap rates."""
    metric = ORDER_METRICS["activity"]
    models = [r for r in runs if r.kind == "model" and r.ok]
    if not models:
        return "Reversal pairs: no model finished evaluation."
    if all(r.value(metric) is None for r in models):
        return "Reversal pairs: not available (no time-reversed class pairs among these classes)."
    blind = next((r for r in models if r.name == ORDER_BLIND), None)
    if blind is None or blind.value(metric) is None:
        return f"Reversal pairs: the order-blind {ORDER_BLIND} model is not available, so there is nothing to compare."
    found = [(r, _find(stats, metric, r.name, ORDER_BLIND, "order"))
             for r in _ranked(models, metric) if r.name != ORDER_BLIND]
    found = [(r, c) for r, c in found if c is not None]
    if not found:
        return "Reversal pairs: no order-aware family could be compared with mean-pool."
    swap = blind.value("reversal_swap_rate")
    where = _describe(blind, metric) + (
        f", swap rate {swap:.3f} {_ci(blind.interval('reversal_swap_rate'))}" if swap is not None else "")
    above = [r.name for r, c in found if c.symbol == ">"]
    detail = "; ".join(f"{r.name} {c.comparison.difference:+.3f} {_signed_ci(c.comparison.interval)}"
                       + (f" (swap rate {r.value('reversal_swap_rate'):.3f})" if r.value("reversal_swap_rate") is not None
                          else "") for r, c in found)
    if len(above) == len(found):
        head = "Reversal pairs separate every order-aware family from mean-pool"
    elif above:
        head = f"Reversal pairs separate {len(above)} of {len(found)} order-aware families ({', '.join(above)}) from mean-pool"
    else:
        head = "Reversal pairs do not separate any order-aware family from mean-pool"
    holm_over = f"{len(found)} comparison{'s' if len(found) != 1 else ''}"
    return f"{head} (within-pair accuracy, Holm over {holm_over}): {where}; differences: {detail}."


def convergence_verdict(runs: Sequence[Run]) -> str | None:
    unconverged = [f"{r.name}, {convergence(r).removeprefix('not converged: ')}" for r in runs
                   if r.kind == "model" and r.ok and convergence(r).startswith("not converged")]
    unknown = [r.name for r in runs if r.kind == "model" and r.ok and convergence(r) == "convergence unknown"]
    parts = []
    if unconverged:
        parts.append("Not converged: " + "; ".join(unconverged) + "; their numbers may still move with more epochs")
    if unknown:
        parts.append(f"convergence not recorded for {', '.join(unknown)}")
    return (". ".join(parts) + ".") if parts else None


def verdict(task: str, runs: Sequence[Run], stats: TaskStats) -> list[str]:
    """Every sentence of a task's verdict, first the headline (the summary repeats it)."""
    lines = [headline_verdict(task, runs, stats)]
    for metric in VERDICT_METRICS.get(task, ()):
        line = ranking(metric, runs, stats)
        if line:
            lines.append(line)
    for line in (baseline_verdict(runs, stats), order_blind_verdict(task, runs, stats),
                 reversal_verdict(runs, stats) if task == "activity" else None,
                 size_note(task, runs), convergence_verdict(runs)):
        if line:
            lines.append(line)
    single = [r.name for r in runs if r.kind == "model" and r.ok and len(r.seeds) == 1]
    if single:
        lines.append(f"One seed only: {', '.join(single)}; their intervals cover test-item sampling, not training "
                     "variance.")
    lines += [f"Not compared: {n}." for n in stats.notes]
    absent = [r for r in runs if not r.ok]
    if absent:
        lines.append("Not available: " + "; ".join(f"{r.name} ({r.status}: {r.note})" for r in absent) + ".")
    return lines


# --------------------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg) -> PNG bytes


class Figure(NamedTuple):
    name: str  # file name under figures/
    caption: str
    png: bytes


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    return buffer.getvalue()


def learning_curves_figure(task: str, runs: Sequence[Run]) -> bytes | None:
    """Train loss, validation loss and validation metric per epoch: one colour per family, one line per seed."""
    with_curves = [r for r in runs if r.kind == "model" and r.curve]
    if not with_curves:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, run in enumerate(with_curves):
        by_seed: dict[Any, list[Mapping[str, Any]]] = {}
        for row in run.curve:
            by_seed.setdefault(row.get("seed"), []).append(row)
        for m, rows in enumerate(by_seed.values()):
            epochs = [e.get("epoch", i + 1) for i, e in enumerate(rows)]
            for ax, key in zip(axes, ("train_loss", "val_loss", "val_metric")):
                values = [_number(e.get(key)) for e in rows]
                if any(v is not None for v in values):
                    ax.plot(epochs, [np.nan if v is None else v for v in values], marker=".", alpha=0.75,
                            color=colors[n % len(colors)],
                            label=f"{run.name} ({len(by_seed)} seed{'s' if len(by_seed) != 1 else ''})" if m == 0 else None)
    metric_name = next((str(r.info("val_metric_name")) for r in with_curves if r.info("val_metric_name")), "metric")
    from matplotlib.ticker import MaxNLocator

    for ax, title in zip(axes, ("training loss", "validation loss", f"validation {metric_name}")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{TITLES.get(task, task)}: learning curves, one line per seed")
    fig.tight_layout()
    return _png(fig)


def headline_figure(task: str, runs: Sequence[Run], metric: str | None = None) -> bytes | None:
    """Horizontal bars of the primary metric's mean over seeds with its 95% interval, each seed as a dot (activity:
    also reversal-pair accuracy)."""
    key = metric or HEADLINE[task]
    shown = [r for r in runs if r.ok and r.value(key) is not None]
    if not shown:
        return None
    plt = _pyplot()
    keys = [key] + (["reversal_pair_accuracy"] if task == "activity" and any(
        r.value("reversal_pair_accuracy") is not None for r in shown) else [])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(shown) * len(keys) + 1.2))
    height = 0.8 / len(keys)
    y = np.arange(len(shown))
    for j, k in enumerate(keys):
        values = [r.value(k) or 0.0 for r in shown]
        colors = [("#9e9e9e", "#cfcfcf")[j] if r.kind == "baseline" else ("#4c72b0", "#dd8452")[j] for r in shown]
        errors = np.array([[v - (r.interval(k) or (v, v))[0], (r.interval(k) or (v, v))[1] - v]
                           for r, v in zip(shown, values)]).T  # (2, runs)
        bars = ax.barh(y + j * height, values, height=height, color=colors, label=METRIC_LABELS.get(k, k),
                       xerr=errors, error_kw={"elinewidth": 1, "capsize": 2})
        for i, r in enumerate(shown):
            seeds = [v for v in (r.metrics.get(k) or {}).get("seeds") or [] if _number(v) is not None]
            ax.plot(seeds, [y[i] + j * height] * len(seeds), "k.", markersize=3)
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=8, padding=4)
    ax.set_yticks(y + height * (len(keys) - 1) / 2, [r.name for r in shown])
    ax.invert_yaxis()
    ax.set_xlabel(f"{METRIC_LABELS.get(key, key)}: mean over seeds, 95% interval, dots = seeds")
    if len(keys) > 1:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{TITLES.get(task, task)}: {' and '.join(METRIC_LABELS.get(k, k) for k in keys)} (grey: baselines)")
    ax.margins(x=0.15)
    return _png(fig)


def confusion_figure(runs: Sequence[Run]) -> bytes | None:
    """Row-normalised confusion matrices (rows = true class) of the activity models, summed over seeds."""
    shown = [r for r in runs if r.ok and r.kind == "model" and any(s.details.get("confusion") for s in r.seeds)]
    if not shown:
        return None
    plt = _pyplot()
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 4.3 * rows), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, run in zip(axes.flat, shown):
        matrices = [np.asarray(s.details["confusion"], dtype=np.float64) for s in run.seeds if s.details.get("confusion")]
        matrix = np.sum([m for m in matrices if m.shape == matrices[0].shape], axis=0)  # (C, C)
        normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        names = run.seeds[0].details.get("class_names") or [str(i) for i in range(len(matrix))]
        ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("actual", fontsize=8)
        ax.set_title(f"{run.name} (top-1 {run.value('top_1') or 0:.3f}, {len(matrices)} seeds)", fontsize=9)
    fig.suptitle("Activity: confusion matrices over every seed, rows normalised")
    fig.tight_layout()
    return _png(fig)


def frame_strip(store: Any, item_id: str, *, num_frames: int = 4) -> bytes | None:
    """PNG of a few evenly spaced real frames of a clip side by side, or of the image itself."""
    from PIL import Image

    if store is None or item_id not in store:
        return None
    row = np.asarray(store.row(item_id))
    if row.ndim == 4:  # (T, H, W, 3) clip
        valid = max(1, store.length(item_id))
        picks = sorted(set(np.linspace(0, valid - 1, num=min(num_frames, valid)).round().astype(int).tolist()))
        gap = np.full((row.shape[1], 2, 3), 255, dtype=np.uint8)
        parts: list[np.ndarray] = []
        for i in picks:
            parts += [row[i], gap]
        row = np.concatenate(parts[:-1], axis=1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(row, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def attention_figure(task: str, words: Sequence[str], weights: np.ndarray, *, image: np.ndarray | None = None,
                     title: str = "") -> bytes:
    """Where each word of a caption looked: weights (L, S), one row per word, on one colour scale (0 to the
    largest weight). Image captioning: a small heatmap of the side x side grid per word (side = sqrt(S), cells in
    row-major order, as the encoders pool them), blended over the image (H, W, 3) uint8 when given, so the image
    shows through where little attention goes. Video captioning, or a grid that is not square: one words x
    positions heatmap."""
    plt = _pyplot()
    L, S = weights.shape
    side = math.isqrt(S)
    vmax = float(weights.max()) or 1.0
    cmap = plt.get_cmap("inferno")
    if task == "image_captioning" and side * side == S:
        # One mosaic in one Axes: an Axes per word made the figure ~5x slower to draw.
        cell = max(1, 64 // side)
        size, label, gap = cell * side, 14, 6  # panel, word label above it and gap beside it, in pixels
        cols = min(L, 8)
        rows = math.ceil(L / cols)
        canvas = np.ones((rows * (size + label), cols * (size + gap) - gap, 3))
        base = None
        if image is not None:
            from PIL import Image

            base = np.asarray(Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).resize((size, size)),
                              dtype=np.float64)[..., :3] / 255.0  # (size, size, 3)
        for t, row in enumerate(weights):
            heat = np.kron(row.reshape(side, side) / vmax, np.ones((cell, cell)))  # (size, size) in [0, 1]
            panel = cmap(heat)[..., :3]
            if base is not None:
                alpha = 0.85 * heat[..., None]
                panel = base * (1 - alpha) + panel * alpha
            y, x = (t // cols) * (size + label) + label, (t % cols) * (size + gap)
            canvas[y : y + size, x : x + size] = panel
        fig, ax = plt.subplots(figsize=(canvas.shape[1] / 60, canvas.shape[0] / 60 + (0.3 if title else 0)))
        ax.imshow(canvas, interpolation="nearest")
        for t, word in enumerate(words):
            ax.text((t % cols) * (size + gap) + size / 2, (t // cols) * (size + label) + label - 3, word,
                    ha="center", va="bottom", fontsize=8)
        ax.axis("off")
    else:
        fig, ax = plt.subplots(figsize=(min(1.5 + 0.3 * S, 10), 0.8 + 0.22 * L))
        shown = ax.imshow(weights, cmap=cmap, vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(L), list(words), fontsize=8)
        ax.set_xticks(range(S), [str(i) for i in range(S)], fontsize=7)
        ax.set_xlabel("frame" if task == "video_captioning" else "grid cell", fontsize=8)
        fig.colorbar(shown, ax=ax, fraction=0.04)
    if title:
        fig.suptitle(title, fontsize=9)
    return _png(fig)


# --------------------------------------------------------------------------------------------------------
# Examples


class Example(NamedTuple):
    item_id: str
    verdict: str  # "correct" | "failed"
    truth: list[str]  # the label, or the references
    outputs: list[tuple[str, str, bool | None, float | None]]  # (system, output, correct?, item score)
    image: bytes | None
    attention: Figure | None = None  # captioning: where the best model looked for each word (attention_examples)


def pick_examples(task: str, runs: Sequence[Run], *, store: Any, count: int,
                  metric: str | None = None) -> tuple[str | None, list[Example]]:
    """(best model, examples): ``count`` correct and ``count`` failed test items of the best model by ``metric``
    (default: the task's headline), as its first seed predicted them, with every available system's first seed.
    Activity: correct clips the order-blind model got wrong come first; failures are the most confident ones.
    Captioning: per-item CIDEr-D, best and worst."""
    key = metric or HEADLINE[task]
    models = _ranked([r for r in runs if r.kind == "model"], key) or _ranked(
        [r for r in runs if r.kind == "model"], HEADLINE[task])
    if not models or count <= 0:
        return None, []
    best = models[0]
    systems = [r for r in runs if r.ok and r.seeds]
    predictions = {r.name: read_predictions(r) for r in systems}
    main = predictions.get(best.name, {})
    if not main:
        return best.name, []
    if task == "activity":
        blind = predictions.get(ORDER_BLIND, {})
        right = [i for i, r in main.items() if r.get("predicted") == r.get("label")]
        wrong = [i for i, r in main.items() if r.get("predicted") != r.get("label")]

        def confidence(i: str) -> float:
            return _number(main[i].get("score")) or 0.0

        # Correct clips the order-blind model got wrong first (False sorts before True), then by confidence.
        right.sort(key=lambda i: (blind.get(i, {}).get("predicted") == main[i].get("label"), -confidence(i), i))
        wrong.sort(key=lambda i: (-confidence(i), i))

        def outputs(i: str) -> list[tuple[str, str, bool | None, float | None]]:
            rows = []
            for name, preds in predictions.items():
                if i in preds:
                    rec = preds[i]
                    rows.append((name, str(rec.get("predicted")), rec.get("predicted") == rec.get("label"),
                                 _number(rec.get("score"))))
            return rows

        truth = {i: [str(main[i].get("label"))] for i in main}
    else:
        scores = {}
        for run in systems:
            own = run.seeds[0].items.columns.get("cider_d")
            scores[run.name] = dict(own) if own else item_cider_d(predictions[run.name])
        own = scores.get(best.name, {})
        ordered = sorted(own, key=lambda i: (-own[i], i))
        right = ordered[:count]
        wrong = [i for i in reversed(ordered) if i not in set(right)]

        def outputs(i: str) -> list[tuple[str, str, bool | None, float | None]]:
            return [(name, str(preds[i].get("hypothesis", "")), None, scores.get(name, {}).get(i))
                    for name, preds in predictions.items() if i in preds]

        truth = {i: [str(c) for c in main[i].get("references", [])] for i in main}
    examples = [
        Example(i, label, truth[i], outputs(i), frame_strip(store, i))
        for label, ids in (("correct", right[:count]), ("failed", wrong[:count]))
        for i in ids
    ]
    return best.name, examples


def attention_examples(task: str, run: Run | None, examples: Sequence[Example], *, features_dir: str | Path | None,
                       tokens_dir: str | Path | None, store: Any) -> list[Example]:
    """``examples`` with ``attention`` set: the attention of ``run``'s first seed (the checkpoint whose captions the
    examples show), replayed on the caption shown (``seqvision.attention.caption_attention``), as
    :func:`attention_figure`. ``store``: the frames (image thumbnails; a fine-tuned encoder's input). Unchanged for
    activity, a family without attention, or when the checkpoint, the features or the vocabulary are absent."""
    examples = list(examples)
    if task == "activity" or run is None or not run.ok or not run.seeds or not examples:
        return examples
    loaded = _attention_model(task, run.checkpoint(run.seeds[0].index), features_dir=features_dir,
                              tokens_dir=tokens_dir, store=store)
    if loaded is None:
        return examples
    import torch

    from seqvision.attention import caption_attention

    model, visual, vocab = loaded
    replayed: dict[str, tuple[list[int], np.ndarray]] = {}  # item id -> (caption ids, weights (L, positions))
    threads = torch.get_num_threads()
    # One caption at a time is a chain of tiny ops, where a second thread only adds waiting: a Transformer caption
    # took 10 ms on one thread and 215 ms on two on a loaded 2-core machine.
    torch.set_num_threads(1)
    try:
        for ex in examples:
            text = next((t for name, t, _, _ in ex.outputs if name == run.name), None)
            if text is not None and ex.item_id in visual:
                ids = vocab.encode(text)[1:]  # the caption shown, <eos> last (an <unk> it had is not shown)
                weights = caption_attention(model, torch.from_numpy(visual.load(ex.item_id)),
                                            visual.length(ex.item_id), torch.tensor(ids))
                assert weights is not None  # _attention_model keeps the models with attention only
                replayed[ex.item_id] = ids, weights.numpy()
    finally:
        torch.set_num_threads(threads)
    what = ("cross-attention of the last decoder layer, mean over heads" if run.name == "transformer"
            else "soft attention of the decoder")
    over = "image grid cells" if task == "image_captioning" else "frames"
    out = []
    for ex in examples:
        if ex.item_id not in replayed:
            out.append(ex)
            continue
        ids, weights = replayed[ex.item_id]
        image = None
        if task == "image_captioning" and store is not None and ex.item_id in store:
            image = np.asarray(store.row(ex.item_id))
        png = attention_figure(task, [vocab.itos[i] for i in ids], weights, image=image,
                               title=f"{run.name}, seed {run.seeds[0].index}: {ex.item_id}")
        name = f"{task}_attention_{re.sub(r'[^A-Za-z0-9_.-]', '_', ex.item_id)}.png"
        caption = (f"Attention of {run.name} (seed {run.seeds[0].index}) over the {over} for each word of its "
                   f"caption of {ex.item_id} ({what}; one colour scale per figure)")
        out.append(ex._replace(attention=Figure(name, caption, png)))
    return out


def _attention_model(task: str, path: Path, *, features_dir: str | Path | None, tokens_dir: str | Path | None,
                     store: Any) -> tuple[Any, Any, Any] | None:
    """(model in eval mode, its test inputs, vocabulary) for ``attention_examples``; None when the model has no
    attention or an input is absent or unreadable (the report goes on without the figures)."""
    from seqvision import checkpoint
    from seqvision.attention import word_attention_module
    from seqvision.datasets import VisualStore
    from seqvision.tasks import task_spec
    from seqvision.models import build_from_checkpoint
    from seqvision.vocab import Vocab

    if tokens_dir is None or not path.is_file():
        return None
    spec = task_spec(task)
    try:
        state = checkpoint.load(path)
        model = build_from_checkpoint(state).eval()
        if word_attention_module(model) is None:
            return None
        if "encoder" in state["spec"]:  # a fine-tuned encoder reads pixels: the frames
            visual = store
        else:
            visual = None if features_dir is None else VisualStore(features_dir, kind=spec.kind, split="test")
        vocab = Vocab.load(Path(tokens_dir) / str(spec.corpus) / "vocab.json")
    except (OSError, ValueError):
        return None
    return (model, visual, vocab) if visual is not None else None


# --------------------------------------------------------------------------------------------------------
# Tables


def _fmt(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals (thousands separators for large integers); "—" when absent."""
    number = _number(value)
    if number is None:
        return str(value) if isinstance(value, str) else "—"
    if number.is_integer() and abs(number) >= 1000:
        return f"{int(number):,}"
    return f"{number:.{digits}f}"


def _duration(seconds: Any) -> str:
    s = _number(seconds)
    if s is None:
        return "—"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def mean_ci(run: Run, key: str) -> str:
    """"0.512 ± 0.031" (mean and half-width of the 95% t-interval over seeds), "0.512 (1 seed)", or "—"."""
    summary = run.metrics.get(key)
    if not run.ok or summary is None:
        return "—"
    mean = _number(summary.get("mean"))
    if mean is None:
        if key == "meteor" and summary.get("seeds") and all(v is None for v in summary["seeds"]):
            return "unavailable"
        return "—"
    ci = run.interval(key)
    if ci is None:
        n = len(summary.get("seeds") or [])
        return f"{mean:.3f}" + (" (1 seed)" if n == 1 and run.kind == "model" else "")
    return f"{mean:.3f} ± {(ci[1] - ci[0]) / 2:.3f}"


def _mean_of(values: Sequence[Any]) -> float | None:
    numbers = [v for v in map(_number, values) if v is not None]
    return float(np.mean(numbers)) if numbers else None


def runs_table(task: str, runs: Sequence[Run]) -> tuple[list[str], list[tuple[Run, list[str]]]]:
    """(header, [(run, cells)]) of a task's runs: status, seeds, convergence, size (their times: runinfo_table)."""
    header = ["Model", "Status", "Seeds", "Convergence", "Params", "vs budget", "Epochs", "Best val", "Device"]
    rows = []
    for run in runs:
        status = ("ok" + (f" ({run.note})" if run.note else "")) if run.ok else f"{run.status}: {run.note}"
        params = run.info("parameters")
        seeds = [s.seed for s in run.seeds if s.seed is not None]
        cells = [
            run.name + (" (baseline)" if run.kind == "baseline" else ""),
            status,
            "—" if not run.ok or run.kind == "baseline" else (
                f"{len(run.seeds)}" + (f" ({', '.join(map(str, seeds))})" if seeds else "")),
            convergence(run),
            f"{int(params):,}" if _number(params) is not None else "—",
            parameter_note(run)[0],
            _fmt(_mean_of(run.seed_info("epochs")), 1),
            _fmt(_mean_of(run.seed_info("best_val_metric"))),
            str(next((d for d in run.seed_info("device") if d), None) or "—"),
        ]
        rows.append((run, cells))
    return header, rows


def runinfo_table(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of what the trainings and test decodes of a task cost, from the runinfo.json files: "—" where
    there is none (a run pulled from a DVC remote: its measurements stayed on the machine that ran it)."""
    header = ["Model", "Train time (all seeds)", "Train samples/s", "Peak memory", "Test items/s", "MLflow run"]
    rows = []
    for run in runs:
        if not run.ok or run.kind != "model":
            continue
        memory = max((m for m in map(_number, run.seed_info("peak_memory_mb")) if m is not None), default=None)
        decode = _mean_of([s.summary.get("items_per_s") for s in run.seeds])
        rows.append([run.name, _duration(run.info("train_time_s")), _fmt(_mean_of(run.seed_info("samples_per_s")), 0),
                     "—" if memory is None else f"{memory:.0f} MB", _fmt(decode, 0), str(run.info("run_id") or "—")])
    return header, rows


def render_runinfo(sections: Sequence[TaskSection]) -> str:
    """``runinfo.md``: per task, :func:`runinfo_table`."""
    out = ["# What the runs cost", "",
           "Wall-clock time, throughput and peak memory of the trainings behind `report.md`, measured on the machine "
           "that ran them (means over seeds; peak memory: the largest seed's, CPU: peak RSS of its process). They "
           "differ on every run, so they live here and in `runinfo.json` files, which DVC does not hash: the report "
           "itself is the same bytes wherever its inputs are.", ""]
    for s in sections:
        header, rows = runinfo_table(s.runs)
        if rows:
            out += [f"## {TITLES.get(s.task, s.task)}", "", *md_table(header, rows), ""]
    return "\n".join(out) + "\n"


def metric_table(task: str, runs: Sequence[Run], keys: Sequence[str]) -> tuple[list[str], list[tuple[Run, list[str]]]]:
    """(header, [(run, cells)]): ``keys`` as mean ± half-width of the 95% interval over seeds, for the runs that
    are ok."""
    header = ["Model", *(METRIC_LABELS.get(k, k) for k in keys)]
    rows = [(run, [run.name + (" (baseline)" if run.kind == "baseline" else ""), *(mean_ci(run, k) for k in keys)])
            for run in runs if run.ok]
    return header, rows


def metric_tables(task: str, runs: Sequence[Run]) -> list[tuple[str, list[str], list[tuple[Run, list[str]]]]]:
    """(title, header, rows) of every metric table of a task: content metrics (when any run has them) and
    coco-caption for captioning, one table for activity."""
    if task == "activity":
        return [("Test metrics", *metric_table(task, runs, TASK_METRICS[task]))]
    out = []
    shown = [k for k in CONTENT_METRICS.get(task, ()) if any(r.value(k) is not None for r in runs)]
    if shown:
        out.append(("Content metrics (the headline on the synthetic benchmark)", *metric_table(task, runs, shown)))
    out.append(("coco-caption metrics", *metric_table(task, runs, COCO_METRICS)))
    return out


def comparison_rows(stats: TaskStats) -> tuple[list[str], list[list[str]]]:
    header = ["Metric", "A", "B", "A - B", "95% interval", "p", "p (Holm)", "Verdict"]
    rows = [[METRIC_LABELS.get(c.metric, c.metric), c.a, c.b, f"{c.comparison.difference:+.3f}",
             _signed_ci(c.comparison.interval), f"{c.comparison.p_value:.3f}", f"{c.p_holm:.3f}", c.sentence()]
            for c in stats.comparisons]
    return header, rows


# --------------------------------------------------------------------------------------------------------
# The sections and their rendering

METHOD = (
    "Numbers are means over training seeds ± the half-width of their 95% t-interval (n - 1 degrees of freedom; one "
    "seed: no interval). Verdicts: a paired two-level bootstrap of the difference of two systems ({resamples:,} "
    "resamples of the test items, the same for both systems; seeds per system), with a Student-t interval whose "
    "variance adds each system's between-seed variance and the item variance of the paired difference "
    "(Welch-Satterthwaite degrees of freedom; seqvision.metrics.compare_resampled). Multiple comparisons: Holm's "
    "correction over the comparisons of each task and metric (every pair of families, plus the best model against "
    "the best baseline; the order metric: each order-aware family against mean-pool). \"A > B\" only when the "
    "Holm-adjusted p < {alpha}; otherwise \"~\", no significant difference."
)


class TaskSection(NamedTuple):
    task: str
    runs: list[Run]
    stats: TaskStats
    verdict: list[str]
    figures: list[Figure]
    best: str | None
    examples: list[Example]
    ceilings: dict[str, float] | None  # image captioning: CIDEr-D of perfect content per template


def attention_figures(section: TaskSection) -> list[Figure]:
    """The attention figures of a section's examples (written to figures/ beside the section's figures)."""
    return [ex.attention for ex in section.examples if ex.attention is not None]


def template_ceilings(runs: Sequence[Run], metadata_path: str | Path | None) -> dict[str, float] | None:
    """CIDEr-D of captions with perfect content in each sentence template (``content.template_ceilings``) on the
    image test set, whose references come from any evaluated system's predictions; None without metadata."""
    if not metadata_path:
        return None
    records = next((p for p in (read_predictions(r) for r in runs if r.ok) if p), {})
    references = {i: list(r["references"]) for i, r in records.items() if r.get("references")}
    if not references:
        return None
    metadata = load_metadata(metadata_path)["images"]
    missing = sorted(set(references) - set(metadata))
    if missing:
        raise ValueError(f"{metadata_path}: no metadata for test image {missing[0]!r} ({len(missing)} missing); pass "
                         "the metadata.json generated with this data")
    return content.template_ceilings(metadata, references)


def build_sections(
    runs: Mapping[str, list[Run]], *, frames_dir: str | Path | None = None, examples: int = 3,
    metadata: str | Path | None = None, features_dir: str | Path | None = None,
    tokens_dir: str | Path | None = None, resamples: int = RESAMPLES, seed: int = 0,
) -> list[TaskSection]:
    """Statistics, verdicts, figures and examples for every task; with ``features_dir`` and ``tokens_dir``
    (``artifacts/features``, ``artifacts/tokens``) the captioning examples get the best model's attention."""
    sections = []
    for task, task_runs in runs.items():
        stats = task_statistics(task, task_runs, resamples=resamples, seed=seed)
        figures = []
        primary = stats.primary or HEADLINE[task]
        for name, caption, png in (
            (f"{task}_headline.png", f"{METRIC_LABELS.get(primary, primary)} on the test split: mean over seeds and "
             "its 95% interval", headline_figure(task, task_runs, primary)),
            (f"{task}_learning_curves.png", "Learning curves, one line per seed (validation metric as chosen by the "
             "train stage)", learning_curves_figure(task, task_runs)),
            (f"{task}_confusion.png", "Confusion matrices of the activity models, every seed (rows = true class)",
             confusion_figure(task_runs) if task == "activity" else None),
        ):
            if png is not None:
                figures.append(Figure(name, caption, png))
        store = _frame_store(frames_dir, task)
        best, picked = pick_examples(task, task_runs, store=store, count=examples, metric=stats.primary)
        picked = attention_examples(task, next((r for r in task_runs if r.name == best), None), picked,
                                    features_dir=features_dir, tokens_dir=tokens_dir, store=store)
        ceilings = template_ceilings(task_runs, metadata) if task == "image_captioning" else None
        sections.append(TaskSection(task, list(task_runs), stats, verdict(task, task_runs, stats), figures, best,
                                    picked, ceilings))
    return sections


def _frame_store(frames_dir: str | Path | None, task: str) -> Any:
    if frames_dir is None or not (Path(frames_dir) / "index.json").is_file():
        return None
    from seqvision.datasets import VisualStore
    from seqvision.tasks import task_spec

    try:
        return VisualStore(frames_dir, kind=task_spec(task).kind, split="test")
    except (OSError, ValueError):
        return None  # examples then show text only


def summary_lines(sections: Sequence[TaskSection]) -> list[tuple[str, str]]:
    """(task, sentence) of the report's summary: each task's headline verdict, then its caveats (a baseline the
    best model does not significantly beat, sizes off the budget, runs not converged)."""
    out = []
    for s in sections:
        out.append((s.task, s.verdict[0]))
        for line in (baseline_verdict(s.runs, s.stats, unless_above=True), size_note(s.task, s.runs),
                     convergence_verdict(s.runs)):
            if line:
                out.append((s.task, line))
        if s.task == "activity" and s.stats.primary:
            out.append((s.task, reversal_verdict(s.runs, s.stats)))
        absent = [r.name for r in s.runs if not r.ok and r.kind == "model"]
        if absent:
            out.append((s.task, f"Missing or failed models: {', '.join(absent)}."))
    return out


def summary_json(sections: Sequence[TaskSection], *, resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Every number the summary and the verdicts state, machine-readable (``reports/summary.json``)."""
    tasks = {}
    for s in sections:
        tasks[s.task] = {
            "title": TITLES.get(s.task, s.task),
            "primary_metric": s.stats.primary,
            "verdict_metrics": [m for m in VERDICT_METRICS.get(s.task, ()) if any(r.value(m) is not None for r in s.runs)],
            "order_metric": ORDER_METRICS.get(s.task),
            "order_matters": s.task in ORDERED_TASKS,
            "headline": s.verdict[0],
            "verdict": s.verdict,
            "runs": {r.name: {
                "kind": r.kind, "status": r.status, "note": r.note,
                "num_seeds": len(r.seeds), "seeds": [x.seed for x in r.seeds],
                "convergence": convergence(r),
                "converged_seeds": sum(bool(f) for f in r.seed_info("converged")) if r.seeds else None,
                "num_parameters": _number(r.info("parameters")), "budget": _number(r.info("budget")),
                "budget_note": parameter_note(r)[0], "over_budget": parameter_note(r)[1],
                "training": [{"seed": x.seed, **{key: find_key(x.summary, SUMMARY_KEYS[key]) for key in (
                    "converged", "best_epoch", "epochs", "best_val_metric")}} for x in r.seeds]
                if r.kind == "model" else [],
                "metrics": r.metrics,
            } for r in s.runs},
            "comparisons": [c.to_json() for c in s.stats.comparisons],
            "not_compared": s.stats.notes,
            "template_ceilings": s.ceilings,
        }
    return {
        "schema": 1,
        "summary": [{"task": task, "text": text} for task, text in summary_lines(sections)],
        "method": {"interval": "t-interval over seeds (95%)", "comparison": "paired two-level bootstrap, Student-t "
                   "interval with Welch-Satterthwaite df (seqvision.metrics.compare_resampled)",
                   "correction": "holm (per task and metric)", "alpha": ALPHA, "resamples": resamples,
                   "bootstrap_seed": seed},
        "tasks": tasks,
    }


def render_html(sections: Sequence[TaskSection], *, title: str = "seqvision: RNN or Transformer?",
                resamples: int = RESAMPLES) -> str:
    out = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>",
           f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    out.append('<nav><ul><li><a href="#summary">Summary</a></li>')
    for s in sections:
        out.append(f'<li><a href="#task-{s.task}">{esc(TITLES.get(s.task, s.task))}</a> — '
                   f'<a href="#{s.task}-table">tables</a>, <a href="#{s.task}-comparisons">comparisons</a>, '
                   f'<a href="#{s.task}-figures">figures</a>, <a href="#{s.task}-examples">examples</a></li>')
    out.append("</ul></nav>")
    out.append('<section id="summary"><h2>Summary</h2><ul>')
    for task, line in summary_lines(sections):
        out.append(f'<li><a href="#task-{task}">{esc(TITLES.get(task, task))}</a>: {esc(line)}</li>')
    out.append(f'</ul><p class="scale">{esc(METHOD.format(resamples=resamples, alpha=ALPHA))}</p>'
               f'<p class="scale">Scale: accuracies and content metrics are fractions in [0, 1]; caption metrics are '
               f'{esc(CAPTION_SCALE)}. All numbers are on the test split. What the trainings cost (time, '
               f'throughput, memory): <code>runinfo.md</code> beside this file.</p>'
               '<p>The seed\'s table, measured: <code>study.html</code> beside this file — <code>make study</code> '
               '(docs/study.md).</p></section>')
    for s in sections:
        out += _html_task(s)
    out.append("</body></html>\n")
    return "\n".join(out)


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, row_attrs: Sequence[str] | None = None) -> list[str]:
    out = ["<table><thead><tr>", *(f"<th>{esc(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for n, cells in enumerate(rows):
        attrs = row_attrs[n] if row_attrs else ""
        out.append(f"<tr{attrs}>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return out


def _html_task(s: TaskSection) -> list[str]:
    out = [f'<section id="task-{s.task}"><h2>{esc(TITLES.get(s.task, s.task))}</h2>', '<ul class="verdict">']
    out += [f"<li>{esc(line)}</li>" for line in s.verdict]
    out.append("</ul>")
    header, rows = runs_table(s.task, s.runs)
    out.append(f'<h3 id="{s.task}-table">Runs</h3>')
    attrs = []
    for run, _ in rows:
        classes = [run.status if not run.ok else "", "baseline" if run.kind == "baseline" else "",
                   "flagged" if parameter_note(run)[1] or convergence(run).startswith("not") else ""]
        attrs.append(f' class="{" ".join(c for c in classes if c)}" data-run="{esc(run.name)}" '
                     f'data-status="{esc(run.status)}"')
    out += html_table(header, [cells for _, cells in rows], row_attrs=attrs)
    for title, header, rows in metric_tables(s.task, s.runs):
        out.append(f"<h3>{esc(title)}</h3>")
        out += html_table(header, [cells for _, cells in rows],
                           row_attrs=[' class="baseline"' if r.kind == "baseline" else "" for r, _ in rows])
    if s.ceilings:
        out.append("<h3>Per-template oracle ceiling of CIDEr-D</h3><p>CIDEr-D of captions with perfect content, "
                   "written in one sentence template each: the part of a CIDEr-D difference that the template alone "
                   "can make.</p>")
        out += html_table(["Template", "CIDEr-D"], [[k, f"{v:.3f}"] for k, v in s.ceilings.items()])
    out.append(f'<h3 id="{s.task}-comparisons">Comparisons</h3>')
    header, rows = comparison_rows(s.stats)
    if rows:
        out += html_table(header, rows, row_attrs=[f' data-verdict="{esc(r[-1])}"' for r in rows])
    else:
        out.append("<p>No comparisons: fewer than two systems with per-item test scores.</p>")
    out.append(f'<h3 id="{s.task}-figures">Figures</h3>')
    if not s.figures:
        out.append("<p>No figures: no run has the data they need.</p>")
    for fig in s.figures:
        out.append(f'<figure><img src="{data_uri(fig.png)}" alt="{esc(fig.caption)}">'
                   f"<figcaption>{esc(fig.caption)}</figcaption></figure>")
    out.append(f'<h3 id="{s.task}-examples">Examples</h3>')
    if not s.examples:
        out.append("<p>No examples: no model has test predictions.</p>")
    else:
        out.append(f"<p>Test items the best model (<b>{esc(s.best)}</b>, first seed) got right and wrong"
                   + (" (by per-item CIDEr-D)" if s.task != "activity" else "")
                   + ", with every system's output (first seed).</p>")
        out.append('<div class="examples">')
        for ex in s.examples:
            out.append(f'<div class="example {ex.verdict}"><b>{esc(ex.item_id)}</b> — {ex.verdict}')
            if ex.image is not None:
                out.append(f'<img src="{data_uri(ex.image)}" alt="frames of {esc(ex.item_id)}">')
            if s.task == "activity":
                out.append(f"<div>true class: <b>{esc(ex.truth[0])}</b></div>")
            else:
                refs = "".join(f"<li>{esc(r)}</li>" for r in ex.truth[:3])
                more = f"<li>… and {len(ex.truth) - 3} more</li>" if len(ex.truth) > 3 else ""
                out.append(f"<div>references:<ul>{refs}{more}</ul></div>")
            out.append("<table>")
            for name, text, correct, score in ex.outputs:
                mark = "" if correct is None else ('<span class="ok">✓</span> ' if correct else '<span class="bad">✗</span> ')
                score_text = "" if score is None else f"{score:.2f}"
                out.append(f"<tr><td>{esc(name)}</td><td>{mark}{esc(text)}</td><td>{score_text}</td></tr>")
            out.append("</table>")
            if ex.attention is not None:
                out.append(f'<figure class="attention"><img src="{data_uri(ex.attention.png)}" '
                           f'alt="{esc(ex.attention.caption)}"><figcaption>{esc(ex.attention.caption)}</figcaption>'
                           "</figure>")
            out.append("</div>")
        out.append("</div>")
    out.append("</section>")
    return out


def md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(md_cell(c) if not c.startswith("**") else c for c in cells) + " |" for cells in rows)]


def render_markdown(sections: Sequence[TaskSection], *, title: str = "seqvision: RNN or Transformer?",
                    resamples: int = RESAMPLES) -> str:
    out = [f"# {title}", "", "## Summary", ""]
    for task, line in summary_lines(sections):
        out.append(f"- **{TITLES.get(task, task)}**: {line}")
    out += ["", METHOD.format(resamples=resamples, alpha=ALPHA), "",
            f"Scale: accuracies and content metrics are fractions in [0, 1]; caption metrics are {CAPTION_SCALE}. "
            "All numbers are on the test split. Frames and examples with images: `report.html`; every number: "
            "`summary.json`; what the trainings cost (time, throughput, memory): `runinfo.md`.", "",
            "The seed's table, measured: [study.md](study.md) — `make study` (docs/study.md).", ""]
    for s in sections:
        out += [f"## {TITLES.get(s.task, s.task)}", ""]
        out += [f"- {line}" for line in s.verdict]
        header, rows = runs_table(s.task, s.runs)
        out += ["", "### Runs", ""]
        out += md_table(header, [[f"**{md_cell(c[0])}**", f"**{md_cell(c[1])}**", *c[2:]] if not r.ok else c
                                  for r, c in rows])
        for title_text, header, rows in metric_tables(s.task, s.runs):
            out += ["", f"### {title_text}", ""]
            out += md_table(header, [cells for _, cells in rows])
        if s.ceilings:
            out += ["", "### Per-template oracle ceiling of CIDEr-D", "",
                    "CIDEr-D of captions with perfect content, written in one sentence template each.", ""]
            out += md_table(["Template", "CIDEr-D"], [[k, f"{v:.3f}"] for k, v in s.ceilings.items()])
        header, rows = comparison_rows(s.stats)
        if rows:
            out += ["", "### Comparisons", ""]
            out += md_table(header, rows)
        out.append("")
        for fig in s.figures:
            out += [f"![{fig.caption}](figures/{fig.name})", ""]
        if s.examples:
            out += [f"### Examples (best model: {s.best}, first seed)", ""]
            for ex in s.examples:
                truth = ex.truth[0] if s.task == "activity" else " / ".join(ex.truth[:3])
                out.append(f"- `{ex.item_id}` ({ex.verdict}) — {'true class' if s.task == 'activity' else 'references'}: "
                           f"{md_cell(truth)}")
                for name, text, correct, score in ex.outputs:
                    mark = "" if correct is None else ("✓ " if correct else "✗ ")
                    score_text = "" if score is None else f" ({score:.2f})"
                    out.append(f"  - {name}: {mark}{md_cell(text)}{score_text}")
                if ex.attention is not None:
                    out.append(f"  - attention of {s.best}: ![{ex.attention.caption}](figures/{ex.attention.name})")
            out.append("")
    return "\n".join(out) + "\n"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;color:#222}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
nav ul{columns:2}table{border-collapse:collapse;margin:.5em 0 1em;font-size:12.5px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;vertical-align:top}th{background:#f3f3f3}
td:first-child,td:nth-child(2),th:first-child{text-align:left}
tr.missing td{background:#fff6d6;color:#6b5800}tr.failed td{background:#fde2e1;color:#8a1c13}
tr.flagged td{background:#fff3e0}tr.baseline td:first-child{font-style:italic}
figure{margin:1em 0}figure img{max-width:100%}figcaption{color:#555;font-size:12px}
.verdict{background:#eef4fb;border-left:4px solid #4c72b0;padding:.5em 1em}.verdict li{margin:.2em 0}
.examples{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:12px}
.example{border:1px solid #ddd;border-radius:6px;padding:8px}.example.failed{border-color:#e5a5a0}
.example.correct{border-color:#9fd0a0}.example img{image-rendering:pixelated;height:96px;display:block;margin-bottom:6px}
.example figure.attention img{image-rendering:auto;height:auto;max-width:100%}
.example table{width:100%;font-size:12px}.example td{text-align:left}.ok{color:#1b7a1f}.bad{color:#b3261e}
.scale{color:#555;font-size:12px}
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def write_report(sections: Sequence[TaskSection], out_dir: str | Path, *, resamples: int = RESAMPLES,
                 seed: int = 0) -> dict[str, Path]:
    """Write ``report.html``, ``report.md``, ``summary.json``, ``figures/*.png`` and ``runinfo.md`` (atomically).
    Returns their paths."""
    out_dir = Path(out_dir)
    paths = {"html": out_dir / "report.html", "md": out_dir / "report.md", "summary": out_dir / "summary.json",
             "figures": out_dir / "figures", "runinfo": out_dir / "runinfo.md"}
    paths["figures"].mkdir(parents=True, exist_ok=True)
    figures = [fig for s in sections for fig in [*s.figures, *attention_figures(s)]]
    wanted = {fig.name for fig in figures}
    for stale in paths["figures"].glob("*.png"):
        if stale.name not in wanted:
            stale.unlink()
    for fig in figures:
        write_bytes(paths["figures"] / fig.name, fig.png)
    write_json(paths["summary"], summary_json(sections, resamples=resamples, seed=seed))
    write_text(paths["md"], render_markdown(sections, resamples=resamples))
    write_text(paths["html"], render_html(sections, resamples=resamples))
    write_text(paths["runinfo"], render_runinfo(sections))
    return paths


# --------------------------------------------------------------------------------------------------------
# MLflow


def parent_metrics(runs: Mapping[str, Sequence[Run]]) -> dict[str, float]:
    """``{"{task}.{model}.{metric}": mean over seeds}`` of the headline metric (``activity.lstm.top1``), the verdict
    metrics and, for activity, reversal-pair accuracy; with ``.ci95_low`` / ``.ci95_high`` where there is an
    interval, so MLflow's compare view lines them up."""
    out: dict[str, float] = {}
    for task, task_runs in runs.items():
        keys = dict.fromkeys([HEADLINE[task], *VERDICT_METRICS.get(task, ()), *(
            ["reversal_pair_accuracy"] if task == "activity" else [])])
        for run in task_runs:
            for key in keys:
                value = run.value(key) if run.ok else None
                if value is None:
                    continue
                name = f"{task}.{run.name}.{PARENT_METRIC.get(key, key)}"
                out[name] = value
                ci = run.interval(key)
                if ci is not None:
                    out[f"{name}.ci95_low"], out[f"{name}.ci95_high"] = ci
    return out


def parent_run_ids(runs: Mapping[str, Sequence[Run]]) -> list[str]:
    """Parent run ids named by the train summaries, most frequent first."""
    counts = Counter(
        str(pid) for task_runs in runs.values() for r in task_runs if (pid := r.info("parent_run_id"))
    )
    return [pid for pid, _ in counts.most_common()]


class BestModel(NamedTuple):
    """The model a task's comparison recommends: what the registry gets as ``seqvision-{task}@best``."""

    task: str
    family: str
    metric: str  # the task's primary metric
    mean: float  # its mean over seeds on the test split
    seed: int  # k of seed{k}, the seed with the best validation metric
    checkpoint: Path  # that seed's best.pt
    run_id: str | None  # the family's MLflow child run


def best_models(sections: Sequence[TaskSection]) -> list[BestModel]:
    """Per task, the model family ranked first on the primary metric (the report's ranking: mean over seeds on the
    test split) and, of its seeds, the one with the best validation metric: picking the seed on test as well would
    use the test split twice. Tasks without a ranked family are left out."""
    out = []
    for section in sections:
        metric = section.stats.primary
        ranked = _ranked([r for r in section.runs if r.kind == "model"], metric) if metric else []
        if not ranked or not ranked[0].seeds:
            continue
        run = ranked[0]
        validation = [_number(v) for v in run.seed_info("best_val_metric")]
        best = max(range(len(run.seeds)), key=lambda i: (validation[i] is not None, validation[i] or 0.0, -i))
        seed = run.seeds[best].index
        child = run.info("run_id")
        out.append(BestModel(section.task, run.name, str(metric), float(run.value(metric)),  # type: ignore[arg-type]
                             seed, run.checkpoint(seed), str(child) if child else None))
    return out


# The test metrics scored by this stage rather than by the train stage (which logs the others on each child run).
SCORED_HERE = ("meteor",)


def child_metrics(runs: Mapping[str, Sequence[Run]], *, parent_run_id: str) -> dict[str, dict[str, float]]:
    """``{child run id: {"test/meteor": mean, "test/meteor/ci95_low": ..., "test/meteor/seed<k>": value}}``: the
    test metrics scored here (:data:`SCORED_HERE`), named as the train stage names the others on its child run."""
    out: dict[str, dict[str, float]] = {}
    for task_runs in runs.values():
        for run in task_runs:
            child = run.info("run_id")
            if not run.ok or not child or str(child) == parent_run_id:
                continue
            values: dict[str, float] = {}
            for name in SCORED_HERE:
                summary = run.metrics.get(name) or {}
                if _number(summary.get("mean")) is not None:
                    values[f"test/{name}"] = float(summary["mean"])
                if summary.get("ci95"):
                    values[f"test/{name}/ci95_low"], values[f"test/{name}/ci95_high"] = map(float, summary["ci95"])
                for k, v in enumerate(summary.get("seeds") or []):
                    if _number(v) is not None:
                        values[f"test/{name}/seed{k}"] = float(v)
            if values:
                out[str(child)] = values
    return out


def child_artifacts(sections: Sequence[TaskSection], figures_dir: str | Path, *,
                    parent_run_id: str) -> dict[str, dict[str, list[Path]]]:
    """``{child run id: {"attention": [figure paths]}}``: each task's attention figures (as :func:`write_report`
    wrote them to ``figures_dir``) for the MLflow child run of the family they show."""
    out: dict[str, dict[str, list[Path]]] = {}
    for section in sections:
        run = next((r for r in section.runs if r.name == section.best), None)
        child = run.info("run_id") if run is not None else None
        figures = attention_figures(section)
        if not figures or not child or str(child) == parent_run_id:
            continue
        files = out.setdefault(str(child), {}).setdefault("attention", [])
        files += [Path(figures_dir) / fig.name for fig in figures]
    return out
