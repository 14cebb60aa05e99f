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

Over seeds and between systems
    :func:`seed_summary` (mean and 95% t-interval of a metric over training seeds); :func:`item_weights`,
    :func:`resampled_values` and :func:`compare_resampled` (the paired two-level bootstrap: the difference of two
    systems with seeds and test items resampled, its 95% interval and p-value),
    :func:`holm` (step-down correction for several comparisons) and :func:`verdict_symbol` (">", "<" or "~").

Predictions files (JSON Lines, one object per line)
    captioning: ``{"id", "hypothesis", "references": [...], "score"}``
    activity:   ``{"id", "predicted", "label", "score", "topk": [...]}`` (class names; ``topk`` optional,
    ranked best first; it is needed for top-5).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal, NamedTuple

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

    if meteor not in ("auto", "always", "never"):
        raise ValueError(f"meteor must be 'auto', 'always' or 'never', got {meteor!r}")
    keys, gts, res = _tokenized(hypotheses, references)

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


def _tokenized(
    hypotheses: Mapping[Any, str], references: Mapping[Any, Sequence[str]]
) -> tuple[list[Any], dict[Any, list[str]], dict[Any, list[str]]]:
    """(keys, gts, res) for the coco-caption scorers, PTB-tokenized; checks that both cover the same ids."""
    if set(hypotheses) != set(references):
        missing = sorted(map(str, set(references) - set(hypotheses)))[:5]
        extra = sorted(map(str, set(hypotheses) - set(references)))[:5]
        raise ValueError(f"hypotheses and references must cover the same ids; missing {missing}, extra {extra}")
    if not hypotheses:
        raise ValueError("no captions to score")
    empty = [key for key, refs in references.items() if len(refs) == 0]
    if empty:
        raise ValueError(f"items without references: {sorted(map(str, empty))[:5]}")
    keys = list(references)  # the scorers iterate gts.keys(); keep one order for both dicts
    gts = {key: [ptb_tokenize(r) for r in references[key]] for key in keys}
    res = {key: [ptb_tokenize(hypotheses[key])] for key in keys}
    return keys, gts, res


def cider_d(hypotheses: Mapping[Any, str], references: Mapping[Any, Sequence[str]]) -> float:
    """CIDEr-D alone, the value :func:`caption_scores` returns under ``"cider_d"`` (the captioners' validation
    metric, scored every epoch: BLEU and ROUGE-L besides it cost more than CIDEr-D itself)."""
    from pycocoevalcap.cider.cider import Cider

    _, gts, res = _tokenized(hypotheses, references)
    return float(Cider().compute_score(gts, res)[0])


def item_cider_d(records: Mapping[Any, Mapping[str, Any]]) -> dict[Any, float]:
    """Per-item CIDEr-D of caption records (``{id: {"hypothesis", "references"}}``; items without references are
    left out, a missing hypothesis is empty): coco-caption's scorer as in :func:`caption_scores`, idf from these
    items' references."""
    from pycocoevalcap.cider.cider import Cider

    keys = [k for k, r in records.items() if r.get("references")]
    if not keys:
        return {}
    _, gts, res = _tokenized({k: str(records[k].get("hypothesis", "")) for k in keys},
                             {k: [str(c) for c in records[k]["references"]] for k in keys})
    _, scores = Cider().compute_score(gts, res)
    return {k: float(s) for k, s in zip(keys, scores)}


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
# Over seeds, and between two systems


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b), by its continued fraction (Lentz's method; Press et al.,
    Numerical Recipes, 3rd ed., 6.4). Enough for Student's t: no scipy in the declared dependencies."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point; use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * result


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom (``inf``: the standard normal)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(df) or df > 1e7:
        return NormalDist().cdf(t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(probability: float, df: float) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must lie in (0, 1), got {probability}")
    if math.isinf(df) or df > 1e7:
        return NormalDist().inv_cdf(probability)
    if probability < 0.5:
        return -t_quantile(1.0 - probability, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < probability:
        low, high = high, high * 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if student_t_cdf(mid, df) < probability:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


def seed_summary(values: Sequence[float | None], *, confidence: float = 0.95) -> dict[str, Any]:
    """``{"mean", "std", "ci95": [low, high], "seeds": values}`` of one metric over training seeds: the mean and
    its t-interval (sample std, n - 1 degrees of freedom; Student 1908). ``std`` and ``ci95`` are None for a single
    seed (no spread to estimate from), everything but ``seeds`` None when a seed has no value (a metric undefined
    for that run, e.g. reversal-pair accuracy on a dataset without reversal pairs)."""
    seeds = [None if v is None else float(v) for v in values]
    if not seeds or any(v is None or not math.isfinite(v) for v in seeds):
        return {"mean": None, "std": None, "ci95": None, "seeds": seeds}
    n = len(seeds)
    mean = float(np.mean(seeds))
    if n == 1:
        return {"mean": mean, "std": None, "ci95": None, "seeds": seeds}
    std = float(np.std(seeds, ddof=1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "seeds": seeds}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979): reject the hypotheses whose adjusted p is below alpha and
    the family-wise error rate over all of them stays <= alpha, under any dependence between the tests."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * float(p_values[i])))
        adjusted[i] = running
    return adjusted


Statistic = Callable[[np.ndarray], np.ndarray]


def ratio_of_sums(totals: np.ndarray) -> np.ndarray:
    """Column 0 over column 1 of summed per-item columns (..., K) -> (...); NaN where column 1 sums to 0. A
    mean of per-item scores is the ratio of the score column to a column of ones."""
    totals = np.asarray(totals, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(totals[..., 1] != 0, totals[..., 0] / totals[..., 1], np.nan)


class Comparison(NamedTuple):
    """A - B on one metric: the difference of the seed-mean corpus values, its interval and two-sided p-value.

    ``interval`` is ``difference +- t * std_error`` (``confidence`` level, ``df`` Welch-Satterthwaite degrees
    of freedom); ``p_value`` the matching two-sided t-test, so ``p_value < 1 - confidence`` exactly when the
    interval excludes 0. ``percentile_interval``: the plain percentile interval of the same two-level
    resampling, kept for comparison (too narrow with 2-3 seeds; see :func:`compare_resampled`).
    ``seed_variance`` (A's and B's parts) and ``item_variance`` are the parts of ``std_error ** 2``."""

    difference: float
    interval: tuple[float, float]
    p_value: float
    std_error: float
    df: float
    confidence: float
    percentile_interval: tuple[float, float]
    seed_variance: tuple[float, float]
    item_variance: float
    seeds: tuple[int, int]
    num_items: int
    resamples: int  # resamples where both systems' values were defined

    def to_json(self) -> dict[str, Any]:
        out = self._asdict()
        for key in ("interval", "percentile_interval", "seed_variance", "seeds"):
            out[key] = list(out[key])
        out["df"] = None if math.isinf(self.df) else self.df
        return out


def item_weights(num_items: int, *, resamples: int, seed: int) -> np.ndarray:
    """int64 (resamples, num_items): how often each test item is drawn in each bootstrap resample (rows sum to
    ``num_items``). Deterministic given ``seed``; one matrix serves every system of a task, which pairs them."""
    if num_items < 2:
        raise ValueError(f"a bootstrap over test items needs at least 2 items, got {num_items}")
    if resamples < 2:
        raise ValueError(f"resamples must be >= 2, got {resamples}")
    rng = np.random.default_rng([seed, num_items])
    return rng.multinomial(num_items, np.full(num_items, 1.0 / num_items), size=resamples)


def resampled_values(tables: Sequence[np.ndarray], weights: np.ndarray, *, statistic: Statistic = ratio_of_sums
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One system's corpus values: (observed (n,), resampled (B, n)) for its n seeds.

    ``tables``: per seed a float array (N, K) of per-item columns (the same items, in the same order, for every
    seed and every system compared); ``weights`` (B, N) from :func:`item_weights`; ``statistic`` maps summed
    columns (M, K) to corpus values (M,) (NaN where undefined), e.g. :func:`ratio_of_sums`."""
    if not len(tables):
        raise ValueError("a system needs at least one seed")
    stacked = np.stack([np.asarray(t, dtype=np.float64) for t in tables])  # (n, N, K)
    if stacked.ndim != 3 or stacked.shape[1] != weights.shape[1]:
        raise ValueError(f"tables must be (N, K) with N = {weights.shape[1]} items each, got {stacked.shape[1:]}")
    n, _, k = stacked.shape
    observed = np.asarray(statistic(stacked.sum(axis=1)), dtype=np.float64)  # (n,)
    totals = np.einsum("bi,sik->bsk", weights.astype(np.float64), stacked)  # (B, n, K)
    values = np.asarray(statistic(totals.reshape(-1, k)), dtype=np.float64).reshape(len(weights), n)
    return observed, values


def _seed_part(observed: np.ndarray, values: np.ndarray) -> tuple[float, float, float]:
    """(variance of the seed mean, its degrees of freedom, the item noise of single seeds) of one system."""
    n = len(observed)
    if n < 2:
        return 0.0, math.inf, 0.0
    between = float(np.var(observed, ddof=1)) / n
    # The item bootstrap's variance of a seed's deviation from the seed mean is the seed x item noise times
    # (n - 1) / n: the part of the item variance that the between-seed variance already holds.
    residual = float(np.mean(np.var(values - values.mean(axis=1, keepdims=True), axis=0, ddof=1))) * n / (n - 1)
    return between, float(n - 1), residual


def compare_resampled(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], *, num_items: int,
                      confidence: float = 0.95, seed: int = 0) -> Comparison:
    """System A minus system B on one metric, with training seeds and test items both sources of variation.

    ``a``, ``b``: each system's :func:`resampled_values` over the same :func:`item_weights` of ``num_items`` test
    items (the same draw for A and B: the pairing). Resampling the summed per-item columns, not per-item values,
    recomputes a metric that is a ratio of sums (or a function of several) in every resample.

    Two-level paired bootstrap: every resample draws the test items with replacement and, for the percentile
    interval, each system's seeds with replacement (independently per system). With 2-5 seeds a percentile
    interval is too narrow when training variance dominates (its seed part is estimated from n - 1 = 2 degrees of
    freedom but read off a normal-like spread: measured coverage 0.79-0.91 of a nominal 0.95 with 3 seeds) and too
    wide when item noise dominates (0.98-0.99: the seed x item noise is counted more than once);
    tests/test_statistics.py measures both. The interval and p-value are therefore Student-t with the variance
    split into its parts: each system's between-seed variance of its corpus value / n (exact, unbiased), plus the
    item bootstrap's variance of the paired difference of seed means without the noise already in the seed part,
    and Welch-Satterthwaite degrees of freedom. ``Comparison.percentile_interval`` keeps the plain one.

    A system with one seed (a deterministic baseline, or a single training run) contributes no seed variance;
    then the interval covers test-item sampling only. Deterministic given ``seed``.
    """
    (obs_a, val_a), (obs_b, val_b) = a, b
    if not (np.isfinite(obs_a).all() and np.isfinite(obs_b).all()):
        raise ValueError("the metric is undefined for a seed on the whole test set (its denominator is empty)")
    keep = np.isfinite(val_a).all(axis=1) & np.isfinite(val_b).all(axis=1)
    val_a, val_b = val_a[keep], val_b[keep]
    if len(val_a) < 2:
        raise ValueError("the metric is undefined in almost every resample (too few items in its denominator)")
    difference = float(obs_a.mean() - obs_b.mean())
    var_a, df_a, res_a = _seed_part(obs_a, val_a)
    var_b, df_b, res_b = _seed_part(obs_b, val_b)
    item_raw = float(np.var(val_a.mean(axis=1) - val_b.mean(axis=1), ddof=1))
    # The item bootstrap of the seed means counts each seed's own item noise again, although the between-seed
    # variance holds it already (Owen 2007, "The pigeonhole bootstrap": resampling both factors counts it three
    # times); remove the extra count.
    var_item = max(item_raw - res_a / len(obs_a) - res_b / len(obs_b), 0.0)
    total = var_a + var_b + var_item
    std_error = math.sqrt(total)
    parts = [(var_a, df_a), (var_b, df_b), (var_item, float(num_items - 1))]
    denominator = sum(v * v / d for v, d in parts if v > 0 and math.isfinite(d))
    df = total * total / denominator if denominator > 0 else math.inf  # Welch (1947) - Satterthwaite (1946)
    if std_error > 0:
        half = t_quantile(0.5 + confidence / 2.0, df) * std_error
        p_value = 2.0 * (1.0 - student_t_cdf(abs(difference) / std_error, df))
    else:  # nothing varies: identical systems, or the same difference on every item of every seed
        half, p_value = 0.0, (1.0 if difference == 0 else 0.0)
    rng = np.random.default_rng([seed, 1])
    pick_a = rng.integers(0, len(obs_a), size=val_a.shape)  # (B, n_a): each resample's seeds, drawn per system
    pick_b = rng.integers(0, len(obs_b), size=val_b.shape)
    both = (np.take_along_axis(val_a, pick_a, axis=1).mean(axis=1)
            - np.take_along_axis(val_b, pick_b, axis=1).mean(axis=1))  # (B,)
    low, high = np.percentile(both, [50 * (1 - confidence), 50 * (1 + confidence)])
    return Comparison(
        difference=difference, interval=(difference - half, difference + half), p_value=min(1.0, max(0.0, p_value)),
        std_error=std_error, df=df, confidence=confidence, percentile_interval=(float(low), float(high)),
        seed_variance=(var_a, var_b), item_variance=var_item, seeds=(len(obs_a), len(obs_b)), num_items=num_items,
        resamples=int(len(val_a)),
    )


def verdict_symbol(comparison: Comparison, *, adjusted_p: float | None = None, alpha: float = 0.05) -> str:
    """">" (A significantly higher), "<" (lower) or "~" (no significant difference): significant when the p-value
    (``adjusted_p``, e.g. :func:`holm`'s, when several comparisons are made) is below ``alpha`` and the interval
    excludes 0."""
    p = comparison.p_value if adjusted_p is None else adjusted_p
    low, high = comparison.interval
    if p < alpha and low > 0:
        return ">"
    if p < alpha and high < 0:
        return "<"
    return "~"
