"""Non-learned reference points, scored exactly like the models (same items, files and metrics).

Each baseline is fitted on the *train* split and evaluated on the *test* split; its outputs go to
``artifacts/eval/{task}/baseline_{name}/`` in the layout of ``evaluate.py``.

- ``majority`` (activity): always the most frequent training class; top-5 = the five most frequent.
- ``frequent_caption`` (both captioning tasks): always the most frequent (normalised) training caption.
- ``nearest_neighbour`` (all tasks): mean-pool each item's features (over its real frames, or its grid
  cells), L2-normalise, and retrieve the most cosine-similar training item. Captioning returns that item's
  consensus caption (the one that agrees most with its other captions, after Devlin et al. 2015,
  "Exploring Nearest Neighbor Approaches for Image Captioning", arXiv:1505.04467); activity returns its
  class, and ranks classes by their best similarity (a 1-NN classifier).

Mean pooling throws away frame order, so like the ``meanpool`` models these are order-blind: a clip and
its time reversal get the same prediction.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from seqvision.datasets import VisualStore, task_dataset
from seqvision.tasks import task_spec
from seqvision.results import (
    BASELINES,
    PREFIX,
    SPLIT,
    ActivityLabels,
    reversal_pairs_for,
    write_activity_outputs,
    write_caption_outputs,
)
from seqvision.vocab import load_references, normalize, tokenize



# --------------------------------------------------------------------------------------------------------
# The baselines themselves: plain functions on arrays and strings


def class_ranking(train_labels: Sequence[int], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Classes by training frequency, most frequent first (ties: lower index first), and each class's
    frequency (C,) as a fraction of the training items."""
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=num_classes)[:num_classes]
    order = np.argsort(-counts, kind="stable")  # stable: equal counts keep index order
    return order, counts / max(1, counts.sum())


def most_frequent_caption(captions: Sequence[str]) -> tuple[str, float]:
    """The most frequent caption after normalisation (``vocab.normalize``; ties: alphabetically first) and
    its share of all non-empty captions."""
    counts = Counter(c for c in map(normalize, captions) if c)
    if not counts:
        raise ValueError("no non-empty training captions")
    caption = min(counts, key=lambda c: (-counts[c], c))
    return caption, counts[caption] / sum(counts.values())


def mean_pooled(store: VisualStore, ids: Sequence[str]) -> np.ndarray:
    """float32 (N, D): each item's features averaged over its real frames (videos) or grid cells (images)."""
    if store.source != "features":
        raise ValueError(f"{store.root}: nearest-neighbour retrieval needs features, not frame shards")
    rows = [np.asarray(store.row(i)[: store.length(i)], dtype=np.float32).mean(axis=0) for i in ids]
    return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def cosine_neighbours(queries: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the index of the most cosine-similar gallery row (ties: lower index) and that
    similarity. queries (Q, D), gallery (N, D) -> (Q,) int64, (Q,) float32."""
    sims = cosine_similarities(queries, gallery)  # (Q, N)
    best = sims.argmax(axis=1)  # argmax returns the first maximum
    return best, sims[np.arange(len(best)), best]


def cosine_similarities(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """(Q, N) cosine similarities."""
    return _normalise(queries) @ _normalise(gallery).T


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _overlap(a: Sequence[str], b: Sequence[str]) -> float:
    """Mean over n = 1, 2 of the n-gram F1 between two token lists."""
    scores = []
    for n in (1, 2):
        ga, gb = _ngrams(a, n), _ngrams(b, n)
        total = sum(ga.values()) + sum(gb.values())
        scores.append(2 * sum((ga & gb).values()) / total if total else 0.0)
    return sum(scores) / len(scores)


def consensus_caption(captions: Sequence[str]) -> str:
    """The caption (normalised) with the highest mean unigram/bigram F1 against the others; the first one
    when there is only one or on ties."""
    normalised = [c for c in map(normalize, captions) if c]
    if not normalised:
        raise ValueError("no non-empty caption to choose from")
    if len(normalised) == 1:
        return normalised[0]
    tokens = [tokenize(c) for c in normalised]
    scores = [
        sum(_overlap(t, other) for j, other in enumerate(tokens) if j != i) / (len(tokens) - 1)
        for i, t in enumerate(tokens)
    ]
    return normalised[int(np.argmax(scores))]  # argmax returns the first maximum


# --------------------------------------------------------------------------------------------------------
# Predictions in the evaluate.py record format


def majority_records(
    test_ids: Sequence[str], test_labels: Sequence[int], train_labels: Sequence[int], class_names: Sequence[str]
) -> list[dict[str, Any]]:
    order, freq = class_ranking(train_labels, len(class_names))
    topk = [class_names[i] for i in order[:5]]
    return [
        {"id": i, "predicted": topk[0], "label": class_names[y], "score": float(freq[order[0]]), "topk": topk}
        for i, y in zip(test_ids, test_labels)
    ]


def nearest_neighbour_activity_records(
    test_ids: Sequence[str],
    test_labels: Sequence[int],
    test_features: np.ndarray,
    train_labels: Sequence[int],
    train_features: np.ndarray,
    class_names: Sequence[str],
) -> list[dict[str, Any]]:
    """1-NN classification; classes ranked by their most similar training item (absent classes last)."""
    sims = cosine_similarities(test_features, train_features)  # (Q, N)
    train_labels = np.asarray(train_labels, dtype=np.int64)
    num_classes = len(class_names)
    per_class = np.full((len(test_ids), num_classes), -np.inf, dtype=np.float32)  # (Q, C) best sim per class
    for c in range(num_classes):
        members = train_labels == c
        if members.any():
            per_class[:, c] = sims[:, members].max(axis=1)
    records = []
    for row, (item_id, label) in enumerate(zip(test_ids, test_labels)):
        ranked = np.argsort(-per_class[row], kind="stable")[:5]
        records.append({
            "id": item_id,
            "predicted": class_names[ranked[0]],
            "label": class_names[label],
            "score": float(per_class[row, ranked[0]]),
            "topk": [class_names[c] for c in ranked],
        })
    return records


def frequent_caption_records(
    test_references: Mapping[str, Sequence[str]], train_captions: Sequence[str]
) -> list[dict[str, Any]]:
    caption, share = most_frequent_caption(train_captions)
    return [
        {"id": i, "hypothesis": caption, "references": list(refs), "score": share}
        for i, refs in test_references.items()
    ]


def nearest_neighbour_caption_records(
    test_references: Mapping[str, Sequence[str]],
    test_features: np.ndarray,
    train_captions: Sequence[Sequence[str]],
    train_features: np.ndarray,
) -> list[dict[str, Any]]:
    """``test_features`` rows follow ``test_references``' order, ``train_features`` rows ``train_captions``'."""
    best, sims = cosine_neighbours(test_features, train_features)
    return [
        {"id": i, "hypothesis": consensus_caption(train_captions[b]), "references": list(refs), "score": float(s)}
        for (i, refs), b, s in zip(test_references.items(), best.tolist(), sims.tolist())
    ]


# --------------------------------------------------------------------------------------------------------
# The baselines stage


class BaselineResult(NamedTuple):
    task: str
    name: str
    out_dir: Path
    metrics: dict[str, Any]


def run_baselines(
    tasks: Sequence[str],
    *,
    features_dir: str | Path,
    tokens_dir: str | Path | None,
    activity: ActivityLabels | None,
    out_root: str | Path,
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[BaselineResult]:
    """Fit every baseline of ``tasks`` on train, score it on test, write ``{out_root}/{task}/baseline_{name}``.
    ``metadata`` (the synthetic benchmark's ``io.load_metadata``) adds the content metrics to the captioning
    baselines, as the train stage adds them to the models."""
    results = []
    for task in tasks:
        if task not in BASELINES:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(BASELINES)}")
        kind = task_spec(task).kind
        train_store = VisualStore(features_dir, kind=kind, split="train")
        test_store = VisualStore(features_dir, kind=kind, split=SPLIT)
        for name in BASELINES[task]:
            out_dir = Path(out_root) / task / f"{PREFIX}{name}"
            started = time.perf_counter()
            if task == "activity":
                if activity is None:
                    raise ValueError("activity baselines need the labels (results.load_activity_labels)")
                metrics = _activity_baseline(name, train_store, test_store, activity, out_dir, started)
            else:
                if tokens_dir is None:
                    raise ValueError("captioning baselines need the tokens folder")
                content = (kind, metadata[kind]) if metadata is not None else None
                metrics = _caption_baseline(name, task, train_store, test_store, Path(tokens_dir), out_dir,
                                            started, content=content)
            results.append(BaselineResult(task, name, out_dir, metrics))
    return results


def _activity_baseline(name: str, train_store: VisualStore, test_store: VisualStore, activity: ActivityLabels,
                       out_dir: Path, started: float) -> dict[str, Any]:
    train: Any = task_dataset("activity", train_store, labels=activity.labels.get("train", {}))
    test: Any = task_dataset("activity", test_store, labels=activity.labels.get(SPLIT, {}))
    if not len(train) or not len(test):
        raise ValueError(f"{test_store.root}: no labelled train or {SPLIT} clips with features")
    train_labels = [train.labels[i] for i in train.ids]
    test_labels = [test.labels[i] for i in test.ids]
    names = activity.class_names
    if name == "majority":
        records = majority_records(test.ids, test_labels, train_labels, names)
    else:
        records = nearest_neighbour_activity_records(
            test.ids, test_labels, mean_pooled(test_store, test.ids),
            train_labels, mean_pooled(train_store, train.ids), names,
        )
    return write_activity_outputs(
        out_dir, records, class_names=names, reversal_pairs=reversal_pairs_for(names),
        seconds=time.perf_counter() - started, details={"baseline": name, "train_items": len(train)},
    )


def _caption_baseline(name: str, task: str, train_store: VisualStore, test_store: VisualStore, tokens_dir: Path,
                      out_dir: Path, started: float, *, content: Any = None) -> dict[str, Any]:
    tokens = tokens_dir / str(task_spec(task).corpus)
    test: Any = task_dataset(task, test_store, tokens_dir=tokens_dir)  # the items the models are scored on
    if not len(test):
        raise ValueError(f"{test_store.root}: no {SPLIT} items with features and references")
    test_references = {i: test.references(i) for i in test.ids}
    train_references = load_references(tokens, "train")
    train_ids = [i for i in train_store.ids if train_references.get(i)]
    if not train_ids:
        raise ValueError(f"{tokens}: no training captions for the items in {train_store.root}")
    if name == "frequent_caption":
        records = frequent_caption_records(test_references, [c for i in train_ids for c in train_references[i]])
    else:
        records = nearest_neighbour_caption_records(
            test_references, mean_pooled(test_store, test.ids),
            [train_references[i] for i in train_ids], mean_pooled(train_store, train_ids),
        )
    return write_caption_outputs(
        out_dir, records, meteor="never",  # the report stage scores METEOR for every run at once
        seconds=time.perf_counter() - started, details={"baseline": name, "train_items": len(train_ids)},
        content=content,
    )
