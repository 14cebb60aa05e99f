"""Test-split evaluation of one trained model: predictions JSONL, metrics JSON, confusion for ``dvc plots``.

Captioners decode with :func:`seqvision.decode.decode` (beam search, or greedy for ``beam_size == 1``),
batched, feeding back their own tokens (never teacher forcing). Activity models classify each clip once.

Output folder (``artifacts/eval/{task}/{model}/``; baselines use the same layout, see ``baselines_eval.py``)::

    predictions.jsonl   captioning: {"id", "hypothesis", "references": [...], "score"}
                        activity:   {"id", "predicted", "label", "score", "topk": [5 class names, best first]}
    metrics.json        captioning: bleu_1..bleu_4, meteor (null: the report stage scores it), rouge_l, cider_d, num_items,
                        decode_time_s, items_per_s (numbers only, so ``dvc metrics show`` stays readable)
                        activity: top_1, top_5, mean_class_accuracy, reversal_pair_accuracy,
                        reversal_swap_rate, num_items, decode_time_s, items_per_s
    details.json        captioning: decoding settings and ``scale`` (the sentence below);
                        activity: class_names, reversal_pairs, confusion (rows = true class, columns =
                        predicted), per_class_accuracy
    plots/confusion.csv activity only: one row per clip, ``actual,predicted`` (the ``dvc plots`` confusion
                        template); ``plots/`` exists, empty, for captioning so every evaluation has the same outs

Scale: every caption metric is coco-caption's raw value, never x100. BLEU-n, METEOR and ROUGE-L lie in
[0, 1]; CIDEr-D is reported as coco-caption returns it (it can exceed 1; papers print 100x these numbers).
Accuracies are fractions in [0, 1]. ``score`` is the model's own confidence: the beam's length-normalised
log-probability for captions, the softmax probability of the predicted class for activity.

The metrics are always computed from the written ``predictions.jsonl`` (``metrics.score_predictions_jsonl``
/ ``metrics.score_activity_jsonl``), so the file on disk and the numbers cannot disagree.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from seqvision import annotations, metrics
from seqvision.config import EvaluateConfig
from seqvision.datasets import (
    ActivityDataset,
    ImageCaptionDataset,
    VideoCaptionDataset,
    VisualStore,
    activity_labels,
    make_loader,
)
from seqvision.decode import decode
from seqvision.io import write_json, write_text
from seqvision.models import TASKS, build_from_checkpoint
from seqvision.synth.events import REVERSAL_PAIRS
from seqvision.train import load_checkpoint, resolve_device
from seqvision.vocab import Vocab

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


def corpus(task: str) -> str:
    """The tokens sub-folder (``video`` / ``image``) of a captioning task."""
    return "image" if task == "image_captioning" else "video"


def load_activity_labels(activity_dir: str | Path, activity_split: int = 1) -> ActivityLabels:
    """Class names and per-split labels from a UCF101-layout folder (``annotations.load_video_records``)."""
    class_names = annotations.load_class_names(activity_dir)
    # video_dir only fills in record paths, which evaluation never opens.
    records = annotations.load_video_records(
        video_dir=activity_dir, activity_dir=activity_dir, activity_split=activity_split
    )
    return ActivityLabels(class_names, {s: activity_labels(records, s) for s in annotations.SPLITS})


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


def _timing(num_items: int, seconds: float) -> dict[str, float]:
    return {"decode_time_s": float(seconds), "items_per_s": float(num_items / seconds) if seconds > 0 else 0.0}


def write_caption_outputs(
    out_dir: str | Path,
    records: Sequence[Mapping[str, Any]],
    *,
    meteor: metrics.MeteorMode = "auto",
    seconds: float = 0.0,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``predictions.jsonl``, score it, write ``metrics.json`` / ``details.json`` and an empty
    ``plots/``. Returns the metrics."""
    out_dir = Path(out_dir)
    write_jsonl(out_dir / PREDICTIONS, records)
    scores = metrics.score_predictions_jsonl(out_dir / PREDICTIONS, meteor=meteor)
    result = {**scores, **_timing(len(records), seconds)}
    metrics.write_metrics(out_dir / METRICS, result)
    write_json(out_dir / DETAILS, {**dict(details or {}), "scale": CAPTION_SCALE})
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
    accuracy) and ``plots/confusion.csv``. Returns the metrics."""
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
    result.update(_timing(len(records), seconds))
    metrics.write_metrics(out_dir / METRICS, result)
    write_json(out_dir / DETAILS, {
        **dict(details or {}),
        "class_names": list(class_names),
        "reversal_pairs": [list(p) for p in reversal_pairs],
        "confusion": report["confusion"],
        "per_class_accuracy": report["per_class_accuracy"],
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


# --------------------------------------------------------------------------------------------------------
# Running a model


@torch.inference_mode()
def predict_activity(
    model: nn.Module, loader: DataLoader, *, class_names: Sequence[str], device: torch.device
) -> list[dict[str, Any]]:
    """One record per clip: predicted class, its softmax probability, the top-5 class names, the label."""
    model.eval()
    records: list[dict[str, Any]] = []
    k = min(TOPK, len(class_names))
    for batch in loader:
        logits, _ = model(batch.visual.to(device), batch.lengths.to(device))  # (B, C)
        if logits.size(-1) != len(class_names):
            raise ValueError(f"the model predicts {logits.size(-1)} classes, the annotations list {len(class_names)}")
        probs = torch.softmax(logits.float(), dim=-1)
        top_p, top_i = probs.topk(k, dim=-1)  # (B, k), best first
        for item_id, label, ps, idx in zip(batch.ids, batch.labels.tolist(), top_p.tolist(), top_i.tolist()):
            records.append({
                "id": item_id,
                "predicted": class_names[idx[0]],
                "label": class_names[label],
                "score": float(ps[0]),
                "topk": [class_names[i] for i in idx],
            })
    return records


def predict_captions(
    model: nn.Module,
    loader: DataLoader,
    *,
    vocab: Vocab,
    references: Mapping[str, Sequence[str]],
    config: EvaluateConfig,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Decode every item of ``loader`` (no teacher forcing): one record per item with the decoded caption,
    every reference and the beam's length-normalised log-probability."""
    model.eval()
    records: list[dict[str, Any]] = []
    for batch in loader:
        out = decode(
            model, batch.visual.to(device), batch.lengths.to(device),
            beam_size=config.beam_size, max_length=config.max_length, length_penalty_alpha=config.length_penalty,
        )
        for item_id, tokens, score in zip(batch.ids, out.tokens.tolist(), out.score.tolist()):
            refs = list(references[item_id])
            if not refs:
                raise ValueError(f"test item {item_id!r} has no reference caption")
            records.append({"id": item_id, "hypothesis": vocab.decode(tokens), "references": refs,
                            "score": float(score)})
    return records


def evaluate_checkpoint(
    task: str,
    *,
    checkpoint: str | Path,
    family: str | None = None,
    features_dir: str | Path,
    frames_dir: str | Path | None = None,
    tokens_dir: str | Path | None = None,
    activity: ActivityLabels | None = None,
    out_dir: str | Path,
    config: EvaluateConfig,
    device: str | torch.device = "auto",
    workers: int = 0,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (a ``train.fit`` best.pt) on the test split and write ``out_dir``.

    Visual input: ``features_dir`` (``artifacts/features``), or ``frames_dir`` for a checkpoint that carries
    its own encoder (``finetune_encoder``). Captioning needs ``tokens_dir`` (``artifacts/tokens``; the
    ``video``/``image`` sub-folder is picked from ``task``), activity the labels (:func:`load_activity_labels`).
    ``family``, when given, must match the checkpoint's. Returns the metrics written to ``metrics.json``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    device = resolve_device(device) if isinstance(device, str) else device
    ckpt = load_checkpoint(checkpoint)
    if ckpt.get("task") != task:
        raise ValueError(f"{checkpoint}: a {ckpt.get('task')!r} checkpoint, not {task!r}")
    if family is not None and ckpt.get("family") != family:
        raise ValueError(f"{checkpoint}: a {ckpt.get('family')!r} model, not {family!r}")
    model = build_from_checkpoint(ckpt).to(device).eval()
    pixels = "encoder" in ckpt
    if pixels and frames_dir is None:
        raise ValueError(f"{checkpoint} fine-tunes its encoder: it needs the frames folder, not features")
    root = frames_dir if pixels else features_dir
    kind = "images" if task == "image_captioning" else "videos"
    store = VisualStore(root, kind=kind, split=SPLIT)  # type: ignore[arg-type]
    about = {"checkpoint": str(checkpoint), "family": ckpt.get("family"), "epoch": ckpt.get("epoch"),
             "input": "frames" if pixels else "features", "device": str(device)}

    if task == "activity":
        if activity is None:
            raise ValueError("activity evaluation needs the labels (load_activity_labels)")
        dataset = ActivityDataset(store, activity.labels.get(SPLIT, {}))
        _check_items(dataset, checkpoint)
        loader = make_loader(dataset, batch_size=config.batch_size, shuffle=False, workers=workers, device=device)
        started = time.perf_counter()
        records = predict_activity(model, loader, class_names=activity.class_names, device=device)
        seconds = time.perf_counter() - started
        return write_activity_outputs(
            out_dir, records, class_names=activity.class_names,
            reversal_pairs=reversal_pairs_for(activity.class_names), seconds=seconds,
            details={**about, "dropped": dataset.dropped},
        )

    if tokens_dir is None:
        raise ValueError("captioning evaluation needs the tokens folder")
    tokens = Path(tokens_dir) / corpus(task)
    vocab = Vocab.load(tokens / "vocab.json")
    if getattr(model.config, "vocab_size", len(vocab)) != len(vocab):
        raise ValueError(f"{checkpoint}: vocabulary of {model.config.vocab_size} words, but "
                         f"{tokens / 'vocab.json'} has {len(vocab)}")
    dataset_cls = ImageCaptionDataset if task == "image_captioning" else VideoCaptionDataset
    dataset = dataset_cls(store, tokens, train=False)
    _check_items(dataset, checkpoint)
    loader = make_loader(dataset, batch_size=config.batch_size, shuffle=False, workers=workers, device=device)
    references = {item_id: dataset.references(item_id) for item_id in dataset.ids}
    started = time.perf_counter()
    records = predict_captions(model, loader, vocab=vocab, references=references, config=config, device=device)
    seconds = time.perf_counter() - started
    settings = {"beam_size": config.beam_size, "length_penalty": config.length_penalty,
                "max_length": config.max_length}
    return write_caption_outputs(
        # METEOR: null here; the report stage scores every run in one Java process (report.add_meteor).
        out_dir, records, meteor="never", seconds=seconds,
        details={**about, **settings, "dropped": dataset.dropped},
    )


def _check_items(dataset: Any, source: str | Path) -> None:
    if len(dataset) == 0:
        raise ValueError(f"no {SPLIT} items to evaluate {source} on (features and annotations share no ids)")

