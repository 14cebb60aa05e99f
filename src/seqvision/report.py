"""The comparison report: per-task tables, figures, examples and a verdict -> ``report.html`` + ``report.md``.

Inputs (paths supplied by the caller):

- ``{train_dir}/{task}/{model}/summary.json`` and ``learning_curve.json`` (``history.json`` as a fallback)
  from the train stage;
- ``{eval_dir}/{task}/{model}/`` and ``{eval_dir}/{task}/baseline_{name}/`` from the evaluate and baselines
  stages (layout in ``evaluate.py``);
- ``{frames_dir}`` (``artifacts/frames``) for the example frames; optional.

A run whose files are absent or unreadable is shown as *missing* or *failed* with the reason; it never stops
the report. A training whose ``summary.json`` has a ``"status"`` other than ok (the compare flow writes
``{"status": "failed", "error": ...}`` for a training that failed) is *failed*, whatever evaluation files
an earlier run left. ``report.html`` is self-contained (CSS inline, figures and frames as base64 PNG ``data:`` URIs)
and opens offline; ``report.md`` has the same tables and verdicts and links the figures in ``figures/``.

Scale: caption metrics are coco-caption's raw values (BLEU-n, METEOR, ROUGE-L in [0, 1]; CIDEr-D not x100,
it can exceed 1); accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from seqvision.config import MODEL_FAMILIES, TASKS
from seqvision.io import write_bytes, write_text
from seqvision.metrics import meteor_scores, read_jsonl, tokenized_corpus
from seqvision.ptb import ptb_tokenize
from seqvision.results import BASELINES, CAPTION_SCALE, DETAILS, HEADLINE, METRICS, PREDICTIONS, PREFIX

ORDER_BLIND = "meanpool"
# Reversal-pair accuracy "separates" an order-aware family from mean-pool when it is higher by at least this
# much (absolute). Mean pooling maps a clip and its time reversal to the same input, so within a balanced
# pair it cannot beat ~0.5; an order-aware model that uses time should be far above.
SEPARATION_MARGIN = 0.05

TITLES = {"activity": "Activity recognition", "image_captioning": "Image captioning",
          "video_captioning": "Video captioning"}
METRIC_LABELS = {
    "top_1": "Top-1", "top_5": "Top-5", "mean_class_accuracy": "Mean-class acc.",
    "reversal_pair_accuracy": "Reversal-pair acc.", "reversal_swap_rate": "Reversal swap rate",
    "bleu_1": "BLEU-1", "bleu_2": "BLEU-2", "bleu_3": "BLEU-3", "bleu_4": "BLEU-4", "meteor": "METEOR",
    "rouge_l": "ROUGE-L", "cider_d": "CIDEr-D",
}
TASK_METRICS = {
    "activity": ("top_1", "top_5", "mean_class_accuracy", "reversal_pair_accuracy", "reversal_swap_rate"),
    "image_captioning": ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d"),
    "video_captioning": ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d"),
}
# Short names of the headline metric on the MLflow parent run: "{task}.{model}.{name}".
PARENT_METRIC = {"top_1": "top1", "cider_d": "cider_d"}

# Keys read from the train stage's summary.json, with the spellings accepted for each.
SUMMARY_KEYS = {
    "parameters": ("num_parameters", "parameters", "parameter_count", "param_count", "num_params", "n_params"),
    "train_time_s": ("train_time_s", "train_wall_time_s", "wall_time_s", "train_seconds", "training_time_s"),
    "samples_per_s": ("samples_per_s", "train_samples_per_s", "throughput_samples_per_s", "throughput"),
    "peak_memory_mb": ("peak_memory_mb", "peak_mem_mb", "peak_memory_mib", "max_memory_mb"),
    "epochs": ("epochs", "epochs_run", "num_epochs", "epochs_trained"),
    "best_val_metric": ("best_val_metric", "best_metric", "best_val"),
    "val_metric_name": ("metric", "val_metric_name", "metric_name"),
    "device": ("device",),
    "run_id": ("run_id", "mlflow_run_id", "child_run_id"),
    "parent_run_id": ("parent_run_id", "mlflow_parent_run_id"),
    "status": ("status",),
    "error": ("error", "message", "reason"),
}
_OK_STATUSES = {"ok", "finished", "success", "succeeded", "completed", "done"}


class Run(NamedTuple):
    """One row of a task's table: a trained model or a baseline."""

    task: str
    name: str  # model family, or "baseline_{name}"
    kind: str  # "model" | "baseline"
    status: str  # "ok" | "missing" | "failed"
    note: str  # why it is missing or failed ("" when ok)
    metrics: dict[str, Any]
    details: dict[str, Any]
    summary: dict[str, Any]  # the train summary, {} for baselines
    curve: list[dict[str, Any]]
    eval_dir: Path

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def value(self, key: str) -> float | None:
        return _number(self.metrics.get(key))

    def info(self, key: str) -> Any:
        return find_key(self.summary, SUMMARY_KEYS[key])


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
    for name in ("learning_curve.json", "history.json"):
        data, _ = _read_json(folder / name)
        if isinstance(data, Mapping):  # e.g. {"epochs": [...]}
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if isinstance(data, list) and all(isinstance(e, Mapping) for e in data) and data:
            return [dict(e) for e in data]
    return []


def load_run(task: str, name: str, *, train_dir: Path | None, eval_dir: Path) -> Run:
    """Everything known about one (task, model or baseline), with its status."""
    kind = "baseline" if name.startswith(PREFIX) else "model"
    folder = eval_dir / task / name
    summary: dict[str, Any] = {}
    curve: list[dict[str, Any]] = []
    status, note = "ok", ""
    train_folder = train_dir / task / name if (train_dir is not None and kind == "model") else None
    if train_folder is not None:
        data, reason = _read_json(train_folder / "summary.json")
        if isinstance(data, Mapping):
            summary = dict(data)
        elif data is not None or reason.startswith("unreadable"):
            status, note = "failed", f"train: {reason or 'summary.json is not an object'}"
        curve = _curve(train_folder)
        train_status = find_key(summary, SUMMARY_KEYS["status"])
        if isinstance(train_status, str) and train_status.lower() not in _OK_STATUSES:
            error = find_key(summary, SUMMARY_KEYS["error"])
            status, note = "failed", f"train {train_status}" + (f": {error}" if error else "")

    metrics, reason = _read_json(folder / METRICS)
    if status == "ok" and not isinstance(metrics, Mapping):
        if metrics is not None or reason.startswith("unreadable"):
            status, note = "failed", f"evaluate: {reason or 'metrics.json is not an object'}"
        elif train_folder is not None and not (train_folder / "best.pt").is_file() and not summary:
            status, note = "missing", "not trained (no best.pt or summary.json)"
        else:
            status, note = "missing", "not evaluated (no metrics.json)"
    details, _ = _read_json(folder / DETAILS)
    return Run(
        task=task, name=name, kind=kind, status=status, note=note,
        metrics=dict(metrics) if isinstance(metrics, Mapping) and status == "ok" else {},
        details=dict(details) if isinstance(details, Mapping) else {},
        summary=summary, curve=curve, eval_dir=folder,
    )


def load_runs(
    *, train_dir: str | Path | None, eval_dir: str | Path, tasks: Sequence[str] = TASKS,
    models: Sequence[str] = MODEL_FAMILIES,
) -> dict[str, list[Run]]:
    """``{task: [runs]}``: every expected model, then every expected or present baseline."""
    eval_dir = Path(eval_dir)
    train = Path(train_dir) if train_dir is not None else None
    out: dict[str, list[Run]] = {}
    for task in tasks:
        names = [m for m in models]
        expected = [f"{PREFIX}{b}" for b in BASELINES.get(task, ())]
        present = sorted(p.name for p in (eval_dir / task).glob(f"{PREFIX}*") if p.is_dir())
        names += expected + [p for p in present if p not in expected]
        out[task] = [load_run(task, name, train_dir=train, eval_dir=eval_dir) for name in names]
    return out


def add_meteor(runs: Mapping[str, list[Run]], *, mode: str = "auto") -> tuple[dict[str, list[Run]], str]:
    """Every captioning run's METEOR, scored with one Java process for all of them: (runs, note).

    The evaluate and baselines stages leave METEOR out (``null``): each would start the JVM and load METEOR's
    paraphrase table again (10-25 s each here), while one process scores every run in about a second each.
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
            records = list(read_predictions(run).values()) if run.ok else []
            if records and all(r.get("references") for r in records):
                corpora[f"{task}/{i}"] = tokenized_corpus(records)
    if not corpora:
        return out, "METEOR: no captioning predictions to score"
    for key, score in meteor_scores(corpora).items():
        task, i = key.rsplit("/", 1)
        run = out[task][int(i)]
        out[task][int(i)] = run._replace(metrics={**run.metrics, "meteor": score})
    return out, f"METEOR scored for {len(corpora)} captioning runs in one Java process"


def read_predictions(run: Run) -> dict[str, dict[str, Any]]:
    """``{id: record}`` of a run's predictions.jsonl ({} when absent or unreadable)."""
    try:
        return {str(r["id"]): r for r in read_jsonl(run.eval_dir / PREDICTIONS)}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def item_cider(records: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Per-item CIDEr-D of caption records (coco-caption's scorer; idf from these items' references)."""
    from pycocoevalcap.cider.cider import Cider

    keys = [k for k, r in records.items() if r.get("references")]
    if not keys:
        return {}
    gts = {k: [ptb_tokenize(str(c)) for c in records[k]["references"]] for k in keys}
    res = {k: [ptb_tokenize(str(records[k].get("hypothesis", "")))] for k in keys}
    _, scores = Cider().compute_score(gts, res)
    return {k: float(s) for k, s in zip(keys, scores)}


# --------------------------------------------------------------------------------------------------------
# Verdicts computed from the numbers


def _ranked(runs: Sequence[Run], key: str) -> list[Run]:
    return sorted((r for r in runs if r.ok and r.value(key) is not None), key=lambda r: (-r.value(key), r.name))


def verdict(task: str, runs: Sequence[Run]) -> list[str]:
    """Short sentences: who won the headline metric and by how much, against the runner-up, the best
    baseline and the order-blind mean-pool model; for activity whether reversal-pair accuracy separates
    order-aware families from mean-pool."""
    key = HEADLINE[task]
    label = METRIC_LABELS[key]
    models = _ranked([r for r in runs if r.kind == "model"], key)
    baselines = _ranked([r for r in runs if r.kind == "baseline"], key)
    lines: list[str] = []
    if not models:
        lines.append(f"No model finished evaluation, so there is no winner on {label}.")
    else:
        best = models[0]
        value = best.value(key)
        if len(models) == 1:
            lines.append(f"{best.name} is the only model evaluated: {label} {value:.3f}.")
        else:
            second = models[1]
            runner = second.value(key)
            gap = value - runner
            if gap <= 1e-12:
                line = f"{best.name} and {second.name} tie on {label} at {value:.3f}"
            else:
                line = f"{best.name} wins on {label} with {value:.3f}, {gap:.3f} ahead of {second.name} ({runner:.3f}"
                if runner > 0:
                    ratio = value / runner
                    line += f", {ratio:.1f}x" if ratio >= 2 else f", {gap / runner:+.1%} relative"
                if task == "activity" and best.metrics.get("num_items"):
                    line += f"; {round(gap * best.metrics['num_items'])} of {best.metrics['num_items']} test clips"
                line += ")"
            lines.append(line + ".")
            test = paired_comparison(task, best, second)
            if test:
                lines.append(f"Paired test, {best.name} vs {second.name}: {test}.")
        if baselines:
            top = baselines[0]
            if top.value(key) > value:
                lines.append(f"The best baseline, {top.name} at {top.value(key):.3f}, beats every model "
                             f"({top.value(key) - value:+.3f} over {best.name}).")
            else:
                lines.append(f"Best baseline: {top.name} at {top.value(key):.3f} "
                             f"({value - top.value(key):+.3f} for {best.name}).")
        blind = next((r for r in models if r.name == ORDER_BLIND), None)
        if blind is not None and blind is not best:
            aware = [r for r in models if r.name != ORDER_BLIND]
            lines.append(f"Order-blind {ORDER_BLIND}: {blind.value(key):.3f}, "
                         f"{value - blind.value(key):+.3f} for {best.name}; ranked {models.index(blind) + 1} of "
                         f"{len(models)} (order-aware families above it: "
                         f"{sum(r.value(key) > blind.value(key) for r in aware)} of {len(aware)}).")
        ranking = f"{models[0].name} ({models[0].value(key):.3f})"
        for prev, run in zip(models, models[1:]):
            ranking += f" {'=' if run.value(key) == prev.value(key) else '>'} {run.name} ({run.value(key):.3f})"
        lines.append(f"Ranking: {ranking}.")
    if task == "activity":
        lines.append(reversal_verdict(runs))
    absent = [r for r in runs if not r.ok]
    if absent:
        lines.append("Not available: " + "; ".join(f"{r.name} ({r.status}: {r.note})" for r in absent) + ".")
    return lines


def mcnemar_p(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> tuple[float, int]:
    """Exact two-sided McNemar test of two classifiers on the same items (McNemar 1947; the binomial form
    recommended by Dietterich 1998 for small counts). Returns (p-value, number of discordant items)."""
    a_only = sum(bool(a) and not bool(b) for a, b in zip(a_correct, b_correct))
    b_only = sum(bool(b) and not bool(a) for a, b in zip(a_correct, b_correct))
    n = a_only + b_only
    if n == 0:
        return 1.0, 0
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n
    return min(1.0, 2 * tail), n


def bootstrap_interval(differences: Sequence[float], *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of paired per-item differences, resampling items (Efron 1979;
    Koehn 2004 uses the same paired bootstrap for MT metrics)."""
    diffs = np.asarray(differences, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def paired_comparison(task: str, a: Run, b: Run) -> str | None:
    """How sure the ranking of ``a`` over ``b`` is, from their per-item test predictions: exact McNemar for
    activity; for captioning a paired bootstrap interval of the CIDEr-D difference (CIDEr-D is the mean of
    its per-item scores). ``None`` when the predictions cannot be paired."""
    pa, pb = read_predictions(a), read_predictions(b)
    common = sorted(set(pa) & set(pb))
    if not common:
        return None
    if task == "activity":
        p, discordant = mcnemar_p([pa[i].get("predicted") == pa[i].get("label") for i in common],
                                  [pb[i].get("predicted") == pb[i].get("label") for i in common])
        verdict_text = "significant" if p < 0.05 else "not significant"
        return f"McNemar exact p = {p:.3g} ({verdict_text} at the 5% level; {discordant} discordant clips)"
    ca, cb = item_cider({i: pa[i] for i in common}), item_cider({i: pb[i] for i in common})
    keys = [i for i in common if i in ca and i in cb]
    if not keys:
        return None
    low, high = bootstrap_interval([ca[i] - cb[i] for i in keys])
    inside = "includes" if low <= 0 <= high else "excludes"
    return (f"95% paired-bootstrap interval of the CIDEr-D difference [{low:+.3f}, {high:+.3f}] over "
            f"{len(keys)} items ({inside} 0)")


def reversal_verdict(runs: Sequence[Run]) -> str:
    models = [r for r in runs if r.kind == "model" and r.ok]
    if not models:
        return "Reversal-pair accuracy: no model finished evaluation."
    if all(r.value("reversal_pair_accuracy") is None for r in models):
        return "Reversal-pair accuracy is not available: no time-reversed class pairs among these classes."
    blind = next((r for r in models if r.name == ORDER_BLIND), None)
    aware = [r for r in models if r.name != ORDER_BLIND and r.value("reversal_pair_accuracy") is not None]
    if blind is None or blind.value("reversal_pair_accuracy") is None:
        return f"The order-blind {ORDER_BLIND} model is not available, so reversal-pair accuracy cannot be compared."
    if not aware:
        return "No order-aware model finished evaluation, so reversal-pair accuracy cannot be compared."
    base = blind.value("reversal_pair_accuracy")
    swap = blind.value("reversal_swap_rate")
    gaps = {r.name: r.value("reversal_pair_accuracy") - base for r in aware}
    ahead = [n for n, g in gaps.items() if g >= SEPARATION_MARGIN]
    lo, hi = min(gaps, key=gaps.get), max(gaps, key=gaps.get)  # type: ignore[arg-type]
    spread = f"{gaps[lo]:+.3f} ({lo})" if lo == hi else f"from {gaps[lo]:+.3f} ({lo}) to {gaps[hi]:+.3f} ({hi})"
    where = f"{ORDER_BLIND} {base:.3f}" + (f", swap rate {swap:.3f}" if swap is not None else "")
    if len(ahead) == len(aware):
        verdict_text = (f"separates order-aware models from mean-pool: every order-aware family beats {where} "
                        f"by at least {SEPARATION_MARGIN}: {spread}")
    elif ahead:
        verdict_text = (f"partly separates them: {len(ahead)} of {len(aware)} order-aware families "
                        f"({', '.join(sorted(ahead))}) beat {where} by at least {SEPARATION_MARGIN}; "
                        f"the weakest is {lo} at {gaps[lo]:+.3f}")
    else:
        verdict_text = (f"does not separate them: the best order-aware family ({hi}) is only {gaps[hi]:+.3f} "
                        f"from {where}")
    return f"Reversal-pair accuracy {verdict_text}."


# --------------------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg) -> PNG bytes


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
    """Train loss, validation loss and validation metric per epoch, one line per model."""
    with_curves = [r for r in runs if r.kind == "model" and r.curve]
    if not with_curves:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for run in with_curves:
        epochs = [e.get("epoch", i + 1) for i, e in enumerate(run.curve)]
        for ax, key in zip(axes, ("train_loss", "val_loss", "val_metric")):
            values = [_number(e.get(key)) for e in run.curve]
            if any(v is not None for v in values):
                ax.plot(epochs, [np.nan if v is None else v for v in values], marker=".", label=run.name)
    metric_name = next((str(r.info("val_metric_name")) for r in with_curves if r.info("val_metric_name")), "metric")
    from matplotlib.ticker import MaxNLocator

    for ax, title in zip(axes, ("training loss", "validation loss", f"validation {metric_name}")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{TITLES.get(task, task)}: learning curves")
    fig.tight_layout()
    return _png(fig)


def headline_figure(task: str, runs: Sequence[Run]) -> bytes | None:
    """Horizontal bars of the headline metric (activity: and reversal-pair accuracy) for every run."""
    key = HEADLINE[task]
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
        bars = ax.barh(y + j * height, values, height=height, color=colors, label=METRIC_LABELS[k])
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=8, padding=2)
    ax.set_yticks(y + height * (len(keys) - 1) / 2, [r.name for r in shown])
    ax.invert_yaxis()
    ax.set_xlabel("fraction of test items" if task == "activity" else f"{METRIC_LABELS[key]} (raw coco-caption value)")
    if len(keys) > 1:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{TITLES.get(task, task)}: {' and '.join(METRIC_LABELS[k] for k in keys)} (grey: baselines)")
    ax.margins(x=0.15)
    return _png(fig)


def confusion_figure(runs: Sequence[Run]) -> bytes | None:
    """Row-normalised confusion matrices (rows = true class) of the activity models."""
    shown = [r for r in runs if r.ok and r.kind == "model" and r.details.get("confusion")]
    if not shown:
        return None
    plt = _pyplot()
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 4.3 * rows), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, run in zip(axes.flat, shown):
        matrix = np.asarray(run.details["confusion"], dtype=np.float64)
        normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        names = run.details.get("class_names") or [str(i) for i in range(len(matrix))]
        ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("actual", fontsize=8)
        ax.set_title(f"{run.name} (top-1 {run.value('top_1') or 0:.3f})", fontsize=9)
    fig.suptitle("Activity: confusion matrices, rows normalised")
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


# --------------------------------------------------------------------------------------------------------
# Examples


class Example(NamedTuple):
    item_id: str
    verdict: str  # "correct" | "failed"
    truth: list[str]  # the label, or the references
    outputs: list[tuple[str, str, bool | None, float | None]]  # (system, output, correct?, item score)
    image: bytes | None


def pick_examples(task: str, runs: Sequence[Run], *, store: Any, count: int) -> tuple[str | None, list[Example]]:
    """(best model, examples): ``count`` correct and ``count`` failed test items of the best model by the
    headline metric, with every available system's output. Activity: correct clips the order-blind model
    got wrong come first; failures are the most confident ones. Captioning: per-item CIDEr-D, best and worst."""
    key = HEADLINE[task]
    models = _ranked([r for r in runs if r.kind == "model"], key)
    if not models or count <= 0:
        return None, []
    best = models[0]
    systems = [r for r in runs if r.ok]
    predictions = {r.name: read_predictions(r) for r in systems}
    main = predictions[best.name]
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
        scores = {name: item_cider(preds) for name, preds in predictions.items() if preds}
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


def table(task: str, runs: Sequence[Run]) -> tuple[list[str], list[tuple[Run, list[str]]]]:
    """(header, [(run, cells)]) of a task's comparison table; cells are plain text."""
    keys = TASK_METRICS[task]
    header = ["Model", "Status", *(METRIC_LABELS[k] for k in keys), "Params", "Train time", "Samples/s",
              "Peak mem (MB)", "Epochs", "Best val", "Device", "Test items", "Eval time"]
    rows = []
    for run in runs:
        status = "ok" if run.ok else f"{run.status}: {run.note}"
        params = run.info("parameters")
        cells = [
            run.name + (" (baseline)" if run.kind == "baseline" else ""),
            status,
            *("unavailable" if k == "meteor" and run.ok and run.metrics.get(k) is None else _fmt(run.metrics.get(k))
              for k in keys),
            f"{int(params):,}" if _number(params) is not None else "—",
            _duration(run.info("train_time_s")),
            _fmt(run.info("samples_per_s"), 0),
            _fmt(run.info("peak_memory_mb"), 0),
            _fmt(run.info("epochs"), 0),
            _fmt(run.info("best_val_metric")),
            str(run.info("device") or "—"),
            _fmt(run.metrics.get("num_items"), 0),
            _duration(run.metrics.get("decode_time_s")),
        ]
        rows.append((run, cells))
    return header, rows


# --------------------------------------------------------------------------------------------------------
# Rendering

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;color:#222}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
nav ul{columns:2}table{border-collapse:collapse;margin:.5em 0 1em;font-size:12.5px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;vertical-align:top}th{background:#f3f3f3}
td:first-child,td:nth-child(2),th:first-child{text-align:left}
tr.missing td{background:#fff6d6;color:#6b5800}tr.failed td{background:#fde2e1;color:#8a1c13}
tr.baseline td:first-child{font-style:italic}.winner td:first-child{font-weight:bold}
figure{margin:1em 0}figure img{max-width:100%}figcaption{color:#555;font-size:12px}
.verdict{background:#eef4fb;border-left:4px solid #4c72b0;padding:.5em 1em}.verdict li{margin:.2em 0}
.examples{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:12px}
.example{border:1px solid #ddd;border-radius:6px;padding:8px}.example.failed{border-color:#e5a5a0}
.example.correct{border-color:#9fd0a0}.example img{image-rendering:pixelated;height:96px;display:block;margin-bottom:6px}
.example table{width:100%;font-size:12px}.example td{text-align:left}.ok{color:#1b7a1f}.bad{color:#b3261e}
.scale{color:#555;font-size:12px}
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


class Figure(NamedTuple):
    name: str  # file name under figures/
    caption: str
    png: bytes


class TaskSection(NamedTuple):
    task: str
    runs: list[Run]
    verdict: list[str]
    figures: list[Figure]
    best: str | None
    examples: list[Example]


def build_sections(
    runs: Mapping[str, list[Run]], *, frames_dir: str | Path | None = None, examples: int = 3
) -> list[TaskSection]:
    """Verdicts, figures and examples for every task."""
    sections = []
    for task, task_runs in runs.items():
        figures = []
        for name, caption, png in (
            (f"{task}_headline.png", f"{METRIC_LABELS[HEADLINE[task]]} on the test split", headline_figure(task, task_runs)),
            (f"{task}_learning_curves.png", "Learning curves (validation metric as chosen by the train stage)",
             learning_curves_figure(task, task_runs)),
            (f"{task}_confusion.png", "Confusion matrices of the activity models (rows = true class)",
             confusion_figure(task_runs) if task == "activity" else None),
        ):
            if png is not None:
                figures.append(Figure(name, caption, png))
        store = _frame_store(frames_dir, "images" if task == "image_captioning" else "videos")
        best, picked = pick_examples(task, task_runs, store=store, count=examples)
        sections.append(TaskSection(task, list(task_runs), verdict(task, task_runs), figures, best, picked))
    return sections


def _frame_store(frames_dir: str | Path | None, kind: str) -> Any:
    if frames_dir is None or not (Path(frames_dir) / "index.json").is_file():
        return None
    from seqvision.datasets import VisualStore

    try:
        return VisualStore(frames_dir, kind=kind, split="test")  # type: ignore[arg-type]
    except (OSError, ValueError):
        return None  # examples then show text only


def render_html(sections: Sequence[TaskSection], *, title: str = "seqvision: RNN or Transformer?") -> str:
    out = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_esc(title)}</title>",
           f"<style>{CSS}</style></head><body>", f"<h1>{_esc(title)}</h1>"]
    out.append('<nav><ul><li><a href="#summary">Summary</a></li>')
    for s in sections:
        out.append(f'<li><a href="#task-{s.task}">{_esc(TITLES.get(s.task, s.task))}</a> — '
                   f'<a href="#{s.task}-table">table</a>, <a href="#{s.task}-figures">figures</a>, '
                   f'<a href="#{s.task}-examples">examples</a></li>')
    out.append("</ul></nav>")
    out.append('<section id="summary"><h2>Summary</h2><ul>')
    for s in sections:
        out.append(f'<li><a href="#task-{s.task}">{_esc(TITLES.get(s.task, s.task))}</a>: {_esc(s.verdict[0])}</li>')
    out.append(f'</ul><p class="scale">Scale: accuracies are fractions in [0, 1]; caption metrics are '
               f'{_esc(CAPTION_SCALE)}. All numbers are on the test split.</p></section>')
    for s in sections:
        out += _html_task(s)
    out.append("</body></html>\n")
    return "\n".join(out)


def _html_task(s: TaskSection) -> list[str]:
    out = [f'<section id="task-{s.task}"><h2>{_esc(TITLES.get(s.task, s.task))}</h2>', '<ul class="verdict">']
    out += [f"<li>{_esc(line)}</li>" for line in s.verdict]
    out.append("</ul>")
    header, rows = table(s.task, s.runs)
    best = _ranked([r for r in s.runs if r.kind == "model"], HEADLINE[s.task])
    winner = best[0].name if best else None
    out.append(f'<h3 id="{s.task}-table">Comparison</h3><table><thead><tr>')
    out += [f"<th>{_esc(h)}</th>" for h in header]
    out.append("</tr></thead><tbody>")
    for run, cells in rows:
        classes = [run.status if not run.ok else "", "baseline" if run.kind == "baseline" else "",
                   "winner" if run.name == winner else ""]
        cls = " ".join(c for c in classes if c)
        out.append(f'<tr class="{cls}" data-run="{_esc(run.name)}" data-status="{_esc(run.status)}">'
                   + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    out.append(f'<h3 id="{s.task}-figures">Figures</h3>')
    if not s.figures:
        out.append("<p>No figures: no run has the data they need.</p>")
    for fig in s.figures:
        out.append(f'<figure><img src="{_data_uri(fig.png)}" alt="{_esc(fig.caption)}">'
                   f"<figcaption>{_esc(fig.caption)}</figcaption></figure>")
    out.append(f'<h3 id="{s.task}-examples">Examples</h3>')
    if not s.examples:
        out.append("<p>No examples: no model has test predictions.</p>")
    else:
        out.append(f"<p>Test items the best model (<b>{_esc(s.best)}</b>) got right and wrong"
                   + (" (by per-item CIDEr-D)" if s.task != "activity" else "") + ", with every system's output.</p>")
        out.append('<div class="examples">')
        for ex in s.examples:
            out.append(f'<div class="example {ex.verdict}"><b>{_esc(ex.item_id)}</b> — {ex.verdict}')
            if ex.image is not None:
                out.append(f'<img src="{_data_uri(ex.image)}" alt="frames of {_esc(ex.item_id)}">')
            if s.task == "activity":
                out.append(f"<div>true class: <b>{_esc(ex.truth[0])}</b></div>")
            else:
                refs = "".join(f"<li>{_esc(r)}</li>" for r in ex.truth[:3])
                more = f"<li>… and {len(ex.truth) - 3} more</li>" if len(ex.truth) > 3 else ""
                out.append(f"<div>references:<ul>{refs}{more}</ul></div>")
            out.append("<table>")
            for name, text, correct, score in ex.outputs:
                mark = "" if correct is None else ('<span class="ok">✓</span> ' if correct else '<span class="bad">✗</span> ')
                score_text = "" if score is None else f"{score:.2f}"
                out.append(f"<tr><td>{_esc(name)}</td><td>{mark}{_esc(text)}</td><td>{score_text}</td></tr>")
            out.append("</table></div>")
        out.append("</div>")
    out.append("</section>")
    return out


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(sections: Sequence[TaskSection], *, title: str = "seqvision: RNN or Transformer?") -> str:
    out = [f"# {title}", "", "## Summary", ""]
    for s in sections:
        out.append(f"- **{TITLES.get(s.task, s.task)}**: {s.verdict[0]}")
    out += ["", f"Scale: accuracies are fractions in [0, 1]; caption metrics are {CAPTION_SCALE}. "
            "All numbers are on the test split. Frames and examples with images: `report.html`.", ""]
    for s in sections:
        out += [f"## {TITLES.get(s.task, s.task)}", ""]
        out += [f"- {line}" for line in s.verdict]
        header, rows = table(s.task, s.runs)
        out += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for run, cells in rows:
            if not run.ok:
                cells = [f"**{cells[0]}**", f"**{cells[1]}**", *cells[2:]]
            out.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
        out.append("")
        for fig in s.figures:
            out += [f"![{fig.caption}](figures/{fig.name})", ""]
        if s.examples:
            out += [f"### Examples (best model: {s.best})", ""]
            for ex in s.examples:
                truth = ex.truth[0] if s.task == "activity" else " / ".join(ex.truth[:3])
                out.append(f"- `{ex.item_id}` ({ex.verdict}) — {'true class' if s.task == 'activity' else 'references'}: "
                           f"{_md_cell(truth)}")
                for name, text, correct, score in ex.outputs:
                    mark = "" if correct is None else ("✓ " if correct else "✗ ")
                    score_text = "" if score is None else f" ({score:.2f})"
                    out.append(f"  - {name}: {mark}{_md_cell(text)}{score_text}")
            out.append("")
    return "\n".join(out) + "\n"


def write_report(sections: Sequence[TaskSection], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.html``, ``report.md`` and ``figures/*.png`` (atomically). Returns their paths."""
    out_dir = Path(out_dir)
    paths = {"html": out_dir / "report.html", "md": out_dir / "report.md", "figures": out_dir / "figures"}
    paths["figures"].mkdir(parents=True, exist_ok=True)
    wanted = {fig.name for s in sections for fig in s.figures}
    for stale in paths["figures"].glob("*.png"):
        if stale.name not in wanted:
            stale.unlink()
    for s in sections:
        for fig in s.figures:
            write_bytes(paths["figures"] / fig.name, fig.png)
    write_text(paths["md"], render_markdown(sections))
    write_text(paths["html"], render_html(sections))
    return paths


# --------------------------------------------------------------------------------------------------------
# MLflow


def parent_metrics(runs: Mapping[str, Sequence[Run]]) -> dict[str, float]:
    """``{"{task}.{model}.{headline}": value}`` for every evaluated run (e.g. ``activity.lstm.top1``),
    plus ``{task}.{model}.reversal_pair_acc`` for activity, so MLflow's compare view lines them up."""
    out: dict[str, float] = {}
    for task, task_runs in runs.items():
        key = HEADLINE[task]
        for run in task_runs:
            if run.ok and run.value(key) is not None:
                out[f"{task}.{run.name}.{PARENT_METRIC.get(key, key)}"] = run.value(key)  # type: ignore[assignment]
            if task == "activity" and run.ok and run.value("reversal_pair_accuracy") is not None:
                out[f"{task}.{run.name}.reversal_pair_acc"] = run.value("reversal_pair_accuracy")  # type: ignore[assignment]
    return out


def parent_run_ids(runs: Mapping[str, Sequence[Run]]) -> list[str]:
    """Parent run ids named by the train summaries, most frequent first."""
    counts = Counter(
        str(pid) for task_runs in runs.values() for r in task_runs if (pid := r.info("parent_run_id"))
    )
    return [pid for pid, _ in counts.most_common()]


def child_metrics(runs: Mapping[str, Sequence[Run]], *, parent_run_id: str) -> dict[str, dict[str, float]]:
    """``{child run id: {"test_<metric>": value}}``: each model's test metrics, for its own MLflow child run (when
    its train summary names one)."""
    out: dict[str, dict[str, float]] = {}
    for task_runs in runs.values():
        for run in task_runs:
            child = run.info("run_id")
            if run.ok and child and str(child) != parent_run_id:
                out[str(child)] = {f"test_{k}": float(v) for k, v in run.metrics.items() if _number(v) is not None}
    return out
