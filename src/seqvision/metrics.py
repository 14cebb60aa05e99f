"""Evaluation metrics: caption metrics exactly as the coco-caption toolkit computes them, and accuracy.

Captioning
    BLEU-1..4, CIDEr-D, ROUGE-L (and METEOR when a Java runtime is present) come straight from
    ``pycocoevalcap``'s scorer classes, the field's reference implementation (Chen et al. 2015,
    "Microsoft COCO Captions: Data Collection and Evaluation Server", arXiv:1504.00325). Only its
    tokenizer is replaced: ``pycocoevalcap.tokenizer.PTBTokenizer`` shells out to Stanford CoreNLP 3.4.1
    (Java); :func:`seqvision.ptb.ptb_tokenize` is a pure-Python port of it, the one tokenizer of the project
    (the vocabulary is built from the same tokens).

    Scale: every figure is the toolkit's raw value, never multiplied by 100. BLEU, METEOR and ROUGE-L lie
    in [0, 1]. CIDEr-D is reported as coco-caption returns it (the toolkit multiplies by 10 internally, so
    it lies in [0, 10] and is typically 0-1.5 on real data); papers print 100x these numbers.
    METEOR is ``None`` when it could not be computed (no ``java`` on PATH); it is never estimated.

Classification
    top-1 / top-5 accuracy, mean-class accuracy, per-class accuracy, confusion matrix (rows = true class,
    columns = predicted class) and accuracy restricted to the time-reversed class pairs.

Predictions files (JSON Lines, one object per line)
    captioning: ``{"id", "hypothesis", "references": [...], "score"}``
    activity:   ``{"id", "predicted", "label", "score", "topk": [...]}`` (class names; ``topk`` optional,
    ranked best first; it is needed for top-5).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from seqvision.io import write_json
from seqvision.ptb import ptb_tokenize

MeteorMode = Literal["auto", "always", "never"]

CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d")

# --------------------------------------------------------------------------------------------------------
# Caption metrics


def java_available() -> bool:
    """True when a ``java`` executable is on PATH (pycocoevalcap's METEOR needs it)."""
    return shutil.which("java") is not None


def _meteor(gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> float:
    return meteor_scores({"corpus": (gts, res)})["corpus"]


def meteor_scores(corpora: Mapping[str, tuple[Mapping[Any, list[str]], Mapping[Any, list[str]]]]) -> dict[str, float]:
    """METEOR of several corpora with one Java process: ``{name: (gts, res)}`` -> ``{name: score}``.

    ``gts`` / ``res`` are coco-caption's dicts of PTB-tokenized captions (``{id: [refs...]}``, ``{id: [hyp]}``).
    Starting METEOR (the JVM plus its paraphrase table, on the first call) costs 10-25 s here while scoring
    150 items then takes about a second, so the report stage scores every run in one process rather than each
    evaluate stage starting its own (docs/benchmarks.md, "Whole demo").
    """
    from pycocoevalcap.meteor.meteor import Meteor

    if not java_available():
        raise RuntimeError("METEOR needs a Java runtime ('java' on PATH)")
    scorer = Meteor()  # starts `java -jar meteor-1.5.jar` in a subprocess
    try:
        return {name: float(scorer.compute_score(dict(gts), dict(res))[0]) for name, (gts, res) in corpora.items()}
    finally:
        del scorer  # its __del__ kills the subprocess


def tokenized_corpus(records: Sequence[Mapping[str, Any]]) -> tuple[dict[Any, list[str]], dict[Any, list[str]]]:
    """(gts, res) of prediction records ``{"id", "hypothesis", "references"}``, PTB-tokenized as coco-caption does."""
    gts = {r["id"]: [ptb_tokenize(str(c)) for c in r["references"]] for r in records}
    res = {r["id"]: [ptb_tokenize(str(r["hypothesis"]))] for r in records}
    return gts, res


def caption_scores(
    hypotheses: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    *,
    meteor: MeteorMode = "auto",
    per_item: dict[str, dict[Any, float]] | None = None,
) -> dict[str, float | None]:
    """coco-caption metrics of one hypothesis per item against its references.

    ``hypotheses``: ``{id: caption}``; ``references``: ``{id: [caption, ...]}`` (raw text; both are tokenized
    with :func:`ptb_tokenize` first, as coco-caption does). The id sets must be equal.
    ``meteor``: ``"auto"`` computes METEOR when Java is present and returns ``None`` otherwise; ``"always"``
    raises without Java; ``"never"`` returns ``None``. ``per_item``: a dict that receives ``{"cider_d": {id: v},
    "rouge_l": {id: v}}``, the item scores whose means are the corpus values (what a bootstrap resamples).

    Returns ``{"bleu_1".."bleu_4", "meteor", "rouge_l", "cider_d": float | None}``, raw toolkit values (not
    x100): BLEU/METEOR/ROUGE-L in [0, 1], CIDEr-D in [0, 10]. BLEU is corpus-level (clipped counts summed
    over items, brevity penalty from the closest reference length); ROUGE-L and CIDEr-D are item means.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(hypotheses) != set(references):
        missing = sorted(map(str, set(references) - set(hypotheses)))[:5]
        extra = sorted(map(str, set(hypotheses) - set(references)))[:5]
        raise ValueError(f"hypotheses and references must cover the same ids; missing {missing}, extra {extra}")
    if not hypotheses:
        raise ValueError("no captions to score")
    empty = [key for key, refs in references.items() if len(refs) == 0]
    if empty:
        raise ValueError(f"items without references: {sorted(map(str, empty))[:5]}")
    if meteor not in ("auto", "always", "never"):
        raise ValueError(f"meteor must be 'auto', 'always' or 'never', got {meteor!r}")

    keys = list(references)  # the scorers iterate gts.keys(); keep one order for both dicts
    gts = {key: [ptb_tokenize(r) for r in references[key]] for key in keys}
    res = {key: [ptb_tokenize(hypotheses[key])] for key in keys}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # option="closest", coco-caption's choice
    cider, cider_items = Cider().compute_score(gts, res)  # CIDEr-D: n=4, sigma=6, clipped, idf from these refs
    rouge, rouge_items = Rouge().compute_score(gts, res)  # ROUGE-L, beta=1.2
    if per_item is not None:  # both scorers return item scores in gts' key order
        per_item["cider_d"] = {key: float(v) for key, v in zip(keys, cider_items)}
        per_item["rouge_l"] = {key: float(v) for key, v in zip(keys, rouge_items)}

    meteor_score: float | None = None
    if meteor == "always" and not java_available():
        raise RuntimeError("METEOR needs a Java runtime ('java' on PATH); use meteor='auto' to skip it")
    if meteor != "never" and java_available():
        meteor_score = _meteor(gts, res)

    return {
        "bleu_1": float(bleu[0]),
        "bleu_2": float(bleu[1]),
        "bleu_3": float(bleu[2]),
        "bleu_4": float(bleu[3]),
        "meteor": meteor_score,
        "rouge_l": float(rouge),
        "cider_d": float(cider),
    }


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every non-empty line of a JSON Lines file, parsed; errors name the file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON: {err}") from None
    return records


def score_predictions_jsonl(path: str | Path, *, meteor: MeteorMode = "auto",
                            per_item: dict[str, dict[Any, float]] | None = None) -> dict[str, Any]:
    """Caption metrics of a predictions file with lines ``{"id", "hypothesis", "references": [...], ...}``.

    Returns :func:`caption_scores` plus ``"num_items"``; ``per_item`` as there.
    """
    hypotheses: dict[str, str] = {}
    references: dict[str, list[str]] = {}
    for number, record in enumerate(read_jsonl(path), 1):
        try:
            key, hyp, refs = str(record["id"]), record["hypothesis"], record["references"]
        except (KeyError, TypeError):
            raise ValueError(f"{path}: record {number} needs 'id', 'hypothesis' and 'references'") from None
        if key in hypotheses:
            raise ValueError(f"{path}: id {key!r} appears twice")
        hypotheses[key], references[key] = str(hyp), [str(r) for r in refs]
    metrics: dict[str, Any] = dict(caption_scores(hypotheses, references, meteor=meteor, per_item=per_item))
    metrics["num_items"] = len(hypotheses)
    return metrics


def write_metrics(path: str | Path, metrics: Mapping[str, Any]) -> None:
    """Write a metrics mapping as deterministic JSON, atomically. ``None`` becomes ``null``."""
    write_json(path, dict(metrics))


# --------------------------------------------------------------------------------------------------------
# Classification metrics


def topk_accuracy(scores: Any, labels: Any, k: int) -> float:
    """Fraction of rows whose true label is among the ``k`` highest scores. ``scores`` (N, C), ``labels`` (N,).

    Ties are broken towards the lower class index (as ``argmax``). With ``k >= C`` the result is 1.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"expected scores (N, C) and labels (N,), got {scores.shape} and {labels.shape}")
    if len(labels) == 0:
        raise ValueError("no predictions to score")
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (N, k), best first
    return float((ranked == labels[:, None]).any(axis=1).mean())


def confusion_matrix(labels: Any, predicted: Any, num_classes: int) -> np.ndarray:
    """int64 (C, C): entry [i, j] counts items of true class i predicted as class j."""
    labels, predicted = np.asarray(labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    if labels.shape != predicted.shape or labels.ndim != 1:
        raise ValueError(f"labels and predictions must be 1-d and equal in length: {labels.shape}, {predicted.shape}")
    for name, values in (("labels", labels), ("predictions", predicted)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got [{values.min()}, {values.max()}]")
    return np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def classification_report(
    labels: Any,
    predicted: Any,
    *,
    class_names: Sequence[str],
    reversal_pairs: Sequence[tuple[str, str]] = (),
    topk: Any | None = None,
) -> dict[str, Any]:
    """Activity-recognition metrics from true and predicted class indices (N,).

    ``topk``: optional (N, k) int array of class indices ranked best first (k >= 5 unless there are fewer
    classes); without it ``top_5`` is ``None``. ``reversal_pairs``: pairs of class names that are each
    other's time reversal (e.g. ``("move_left", "move_right")``).

    Returns ``top_1``; ``top_5``; ``mean_class_accuracy`` (mean of per-class recall over classes that occur
    in ``labels``); ``per_class_accuracy`` ``{name: float | None}`` (``None`` for a class with no items);
    ``confusion`` (rows = true, columns = predicted, as nested lists); ``reversal_pair_accuracy`` (top-1
    over items whose true class is in any pair; ``None`` without such items); ``reversal_swap_rate``
    (fraction of those items predicted as the partner class, i.e. fooled by the direction of time);
    ``num_items``; ``class_names``.
    """
    names = list(class_names)
    num_classes = len(names)
    labels, predicted = np.asarray(labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("no predictions to score")
    confusion = confusion_matrix(labels, predicted, num_classes)
    counts = confusion.sum(axis=1)  # (C,) items per true class
    correct = np.diag(confusion)
    per_class = {name: (float(correct[i] / counts[i]) if counts[i] else None) for i, name in enumerate(names)}
    present = counts > 0

    top_5: float | None = None
    if topk is not None:
        topk = np.asarray(topk, dtype=np.int64)
        if topk.ndim != 2 or topk.shape[0] != len(labels):
            raise ValueError(f"topk must be (N, k) with N = {len(labels)}, got {topk.shape}")
        if topk.shape[1] < min(5, num_classes):
            raise ValueError(f"top-5 needs 5 ranked classes per item (or all {num_classes}); got {topk.shape[1]}")
        if not np.array_equal(topk[:, 0], predicted):
            raise ValueError("topk[:, 0] must equal the predicted class")
        top_5 = float((topk[:, :5] == labels[:, None]).any(axis=1).mean())

    index = {name: i for i, name in enumerate(names)}
    partner = np.full(num_classes, -1, dtype=np.int64)
    for a, b in reversal_pairs:
        for name in (a, b):
            if name not in index:
                raise ValueError(f"reversal pair ({a!r}, {b!r}): unknown class {name!r}")
        partner[index[a]], partner[index[b]] = index[b], index[a]
    in_pair = partner[labels] >= 0
    pair_accuracy = swap_rate = None
    if in_pair.any():
        pair_accuracy = float((predicted[in_pair] == labels[in_pair]).mean())
        swap_rate = float((predicted[in_pair] == partner[labels[in_pair]]).mean())

    return {
        "top_1": float(correct.sum() / len(labels)),
        "top_5": top_5,
        "mean_class_accuracy": float((correct[present] / counts[present]).mean()),
        "per_class_accuracy": per_class,
        "confusion": confusion.tolist(),
        "reversal_pair_accuracy": pair_accuracy,
        "reversal_swap_rate": swap_rate,
        "num_items": int(len(labels)),
        "class_names": names,
    }


def classification_scores(
    scores: Any,
    labels: Any,
    *,
    class_names: Sequence[str],
    reversal_pairs: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """:func:`classification_report` from scores or logits (N, C) and true labels (N,)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != len(class_names):
        raise ValueError(f"scores must be (N, {len(class_names)}), got {scores.shape}")
    topk = np.argsort(-scores, axis=1, kind="stable")[:, :5]  # (N, min(5, C)), best first; [:, 0] == argmax
    return classification_report(
        labels, topk[:, 0], class_names=class_names, reversal_pairs=reversal_pairs, topk=topk
    )


def score_activity_jsonl(
    path: str | Path,
    *,
    class_names: Sequence[str],
    reversal_pairs: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """:func:`classification_report` of a predictions file with lines ``{"id", "predicted", "label", ...}``
    (class names; an optional ``"topk"`` list of class names, best first, enables top-5)."""
    index = {name: i for i, name in enumerate(class_names)}
    records = read_jsonl(path)

    def lookup(name: Any, number: int) -> int:
        if name not in index:
            raise ValueError(f"{path}: record {number}: unknown class {name!r}")
        return index[name]

    labels, predicted, topk = [], [], []
    for number, record in enumerate(records, 1):
        try:
            labels.append(lookup(record["label"], number))
            predicted.append(lookup(record["predicted"], number))
        except (KeyError, TypeError):
            raise ValueError(f"{path}: record {number} needs 'predicted' and 'label'") from None
        if "topk" in record:
            topk.append([lookup(name, number) for name in record["topk"][:5]])
    have_topk = bool(records) and len(topk) == len(records) and len({len(t) for t in topk}) == 1
    return classification_report(
        labels,
        predicted,
        class_names=class_names,
        reversal_pairs=reversal_pairs,
        topk=np.asarray(topk) if have_topk else None,
    )


# --------------------------------------------------------------------------------------------------------
# Over seeds

# Two-sided 95% quantiles of Student's t, t_{0.975, df} for df = 1..30 (any statistics table); beyond 30 the
# normal 1.96 is within 2% of the exact value (t_{0.975, 30} = 2.042).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def seed_summary(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "ci95": [low, high], "seeds": values}`` of one metric over seeds: the mean and its 95%
    t-interval (sample std, n - 1 degrees of freedom). ``std`` and ``ci95`` are None for a single seed (no spread
    to estimate), everything None when a seed has no value (a metric undefined for that run)."""
    seeds = [None if v is None else float(v) for v in values]
    if not seeds or any(v is None for v in seeds):
        return {"mean": None, "std": None, "ci95": None, "seeds": seeds}
    n = len(seeds)
    mean = float(np.mean(seeds))
    if n == 1:
        return {"mean": mean, "std": None, "ci95": None, "seeds": seeds}
    std = float(np.std(seeds, ddof=1))
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * std / np.sqrt(n)
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "seeds": seeds}
