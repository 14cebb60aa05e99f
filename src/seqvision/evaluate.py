"""Test-split evaluation of one trained model: predictions JSONL, metrics JSON, confusion for ``dvc plots``.

Captioners decode with :func:`seqvision.decode.decode` (beam search, or greedy for ``beam_size == 1``),
batched, feeding back their own tokens (never teacher forcing). Activity models classify each clip once.
The files written and their meaning are :mod:`seqvision.results`'s layout.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from seqvision import checkpoint
from seqvision.config import EvaluateConfig
from seqvision.datasets import VisualStore, make_loader, task_dataset
from seqvision.tasks import task_spec
from seqvision.decode import decode
from seqvision.models import build_from_checkpoint
from seqvision.results import (
    SPLIT,
    TOPK,
    ActivityLabels,
    reversal_pairs_for,
    write_activity_outputs,
    write_caption_outputs,
)
from seqvision.runtime import resolve_device
from seqvision.vocab import Vocab

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
    checkpoint_path: str | Path,
    family: str | None = None,
    features_dir: str | Path,
    frames_dir: str | Path | None = None,
    tokens_dir: str | Path | None = None,
    activity: ActivityLabels | None = None,
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
    out_dir: str | Path,
    config: EvaluateConfig,
    device: str | torch.device = "auto",
    workers: int = 0,
) -> dict[str, Any]:
    """Evaluate ``checkpoint_path`` (a ``train.fit`` best.pt, verified on load) on the test split; write ``out_dir``.

    Visual input: ``features_dir`` (``artifacts/features``), or ``frames_dir`` for a checkpoint that carries
    its own encoder (``finetune_encoder``). Captioning needs ``tokens_dir`` (``artifacts/tokens``; the
    ``video``/``image`` sub-folder is picked from ``task``), activity the labels (:func:`load_activity_labels`).
    ``family``, when given, must match the checkpoint's. ``metadata`` (the synthetic benchmark's
    ``io.load_metadata``): adds the content metrics to a captioner's evaluation. Returns the metrics written to
    ``metrics.json``, plus the decoding time written to ``runinfo.json``.
    """
    spec = task_spec(task)
    device = resolve_device(device)
    ckpt = checkpoint.load(checkpoint_path)
    saved = ckpt["spec"]
    if saved.get("task") != task:
        raise ValueError(f"{checkpoint_path}: a {saved.get('task')!r} checkpoint, not {task!r}")
    if family is not None and saved.get("family") != family:
        raise ValueError(f"{checkpoint_path}: a {saved.get('family')!r} model, not {family!r}")
    model = build_from_checkpoint(ckpt).to(device).eval()
    pixels = "encoder" in saved
    if pixels and frames_dir is None:
        raise ValueError(f"{checkpoint_path} fine-tunes its encoder: it needs the frames folder, not features")
    root = frames_dir if pixels else features_dir
    store = VisualStore(root, kind=spec.kind, split=SPLIT)  # type: ignore[arg-type]
    about = {"checkpoint": str(checkpoint_path), "family": saved.get("family"), "epoch": ckpt.get("epoch"),
             "input": "frames" if pixels else "features", "device": str(device)}

    if task == "activity":
        if activity is None:
            raise ValueError("activity evaluation needs the labels (load_activity_labels)")
        dataset = task_dataset(task, store, labels=activity.labels.get(SPLIT, {}))
        _check_items(dataset, checkpoint_path)
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
    tokens = Path(tokens_dir) / str(spec.corpus)
    vocab = Vocab.load(tokens / "vocab.json")
    if model.dims.vocab_size != len(vocab):
        raise ValueError(f"{checkpoint_path}: vocabulary of {model.dims.vocab_size} words, but "
                         f"{tokens / 'vocab.json'} has {len(vocab)}")
    dataset = task_dataset(task, store, tokens_dir=tokens_dir)
    _check_items(dataset, checkpoint_path)
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
        content=(spec.kind, metadata[spec.kind]) if metadata is not None else None,
    )


def _check_items(dataset: Any, source: str | Path) -> None:
    if len(dataset) == 0:
        raise ValueError(f"no {SPLIT} items to evaluate {source} on (features and annotations share no ids)")

