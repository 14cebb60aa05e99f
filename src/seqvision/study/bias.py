"""Row 4 of the seed's table: inductive bias, as test accuracy vs training-set size.

The slide: RNNs have a strong inductive bias (the recurrence builds in temporal order), Transformers a weak one
(they must learn it from data). The prediction it makes: a recurrent model beats the Transformer on small training
sets, and the Transformer closes the gap, or overtakes, as the training set grows.

- :func:`nested_subsets`   class-stratified training subsets, the one at fraction f inside every larger one.
- :func:`train_and_test`   one training of the comparison's protocol (``experiment.run``) on one subset, then its
                           best checkpoint on the whole test split (``evaluate.evaluate_checkpoint``), in a fresh
                           single-threaded process.
- :func:`run_inductive_bias` every (family, fraction, seed), ``bias_workers`` at a time; then :func:`analyse`.
- :func:`analyse`          per family the accuracy curve (mean and 95% t-interval over seeds), the Transformer
                           against every other family at every size (:func:`seqvision.metrics.compare_resampled`),
                           crossovers, training items needed to reach a target accuracy, and the verdicts.

Training budget (``bias_budget``): with "steps" (the default) a subset trains for as many optimizer steps as the
full set does (``train.epochs`` scaled by the ratio of steps per epoch), with ``train.patience`` scaled alike, so
early stopping still waits as many steps for an improvement. With "epochs" every subset gets the comparison's
``train.epochs`` and ``train.patience`` as they are: a 1/32 subset of 1,200 clips then gets one step per epoch, 15
in all, and most families end at the cap unconverged (measured: docs/study.md), which measures how far each family
gets in 15 steps rather than what it can learn from 36 clips.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from seqvision import annotations, experiment
from seqvision.config import EvaluateConfig, Params, TrainConfig, to_dict
from seqvision.datasets import task_dataset
from seqvision.evaluate import evaluate_checkpoint
from seqvision.metrics import compare_resampled, item_weights, resampled_values, seed_summary, verdict_symbol
from seqvision.results import load_activity_labels
from seqvision.runtime import usable_cores
from seqvision.study.complexity import Finding, Log, RowResult
from seqvision.study.fit import Verdict, combine
from seqvision.study.measure import Cell, CellError, run_isolated
from seqvision.study.presets import StudyConfig

ROW = "inductive_bias"
TASK = "activity"
REFERENCE = "transformer"  # every other family is compared with it
# The table's columns and the families whose verdicts make each cell (meanpool, order-blind, has no claim).
COLUMNS: dict[str, tuple[str, ...]] = {"RNNs": ("rnn", "lstm", "gru"), "minGRU": ("mingru",)}
CLAIM = "strong: ahead of the Transformer on small training sets; the Transformer closes the gap with more data"
ALPHA = 0.05
RESAMPLES = 2000


# --------------------------------------------------------------------------------------------------------
# Subsets and schedules


def nested_subsets(labels: Mapping[str, int], fractions: Sequence[float], *, seed: int) -> dict[float, list[str]]:
    """Class-stratified training subsets: ``{fraction: sorted ids}``.

    Each class's ids are shuffled once (``seed``); the subset at fraction f takes the first
    max(1, floor(f * n_c + 0.5)) of class c's n_c ids, so every class is present, each keeps its share, and a subset
    is contained in every subset of a larger fraction. Deterministic given ``labels`` and ``seed``.
    """
    if any(not 0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"fractions must lie in (0, 1], got {list(fractions)}")
    by_class: dict[int, list[str]] = {}
    for item_id in sorted(labels):
        by_class.setdefault(labels[item_id], []).append(item_id)
    rng = np.random.default_rng(seed)
    shuffled = {c: [ids[i] for i in rng.permutation(len(ids))] for c, ids in sorted(by_class.items())}
    return {f: sorted(i for ids in shuffled.values() for i in ids[:max(1, math.floor(f * len(ids) + 0.5))])
            for f in sorted(fractions)}


def scaled_schedule(train: TrainConfig, *, items: int, full_items: int, equal_steps: bool) -> TrainConfig:
    """``train`` for a subset of ``items`` of the ``full_items`` training clips: with ``equal_steps``, epochs and
    patience multiplied by (steps per epoch on the full set) / (steps per epoch on the subset), so the subset gets
    at least the full set's optimizer steps and the same patience in steps; else, or when the subset has at least as
    many steps per epoch, unchanged (never fewer epochs than ``train`` asks for)."""
    ratio = math.ceil(full_items / train.batch_size) / math.ceil(items / train.batch_size)
    if not equal_steps or ratio <= 1:
        return train
    return dataclasses.replace(train, epochs=math.ceil(train.epochs * ratio), patience=round(train.patience * ratio))


# --------------------------------------------------------------------------------------------------------
# One training (a fresh process)


@dataclass(frozen=True)
class TrainingSpec:
    """One (family, fraction, seed) training: everything the fresh process needs, picklable.

    ``train_ids``: the training subset (None: the whole train split). ``extra_tests``: (name, features folder)
    pairs whose test split ``best.pt`` is also evaluated on (row 1 tests a model trained on short clips on longer
    ones); the folders share the test ids of ``features_dir``. ``name``: how logs call it.
    """

    family: str
    fraction: float
    seed_index: int
    train_ids: tuple[str, ...] | None
    train_config: TrainConfig  # seed and schedule already set
    model_config: Any  # the family's models: section
    budget: int | None  # models.match_params.activity
    features_dir: str
    activity_dir: str
    activity_split: int
    out_dir: str
    extra_tests: tuple[tuple[str, str], ...] = ()
    name: str = ""

    @property
    def title(self) -> str:
        return self.name or f"{ROW}/{self.family} fraction={self.fraction:g} seed {self.seed_index}"


def train_and_test(spec: TrainingSpec) -> dict[str, Any]:
    """Train ``spec`` with the train stage's code on its subset, evaluate ``best.pt`` on the test split.

    One torch thread (this project's rule for CPU training processes). Returns the test ``top_1`` and
    ``mean_class_accuracy``, ``correct`` ({test id: 0 or 1}), and the training's ``epochs_run``, ``converged``,
    ``best_epoch``, ``best_val_accuracy``, ``num_parameters``, ``train_items``, ``train_time_s``, ``notes``, and
    ``extra``: {name: {"top_1", "correct"}} for each of ``spec.extra_tests``.
    """
    torch.set_num_threads(1)
    out = Path(spec.out_dir)
    data = experiment.load_task_data(TASK, features_dir=spec.features_dir, activity_dir=spec.activity_dir,
                                     activity_split=spec.activity_split, seed=spec.train_config.seed)
    full: Any = data.train
    if spec.train_ids is not None:
        missing = sorted(set(spec.train_ids) - set(full.ids))
        if missing:
            raise ValueError(f"training subset ids without features or labels, e.g. {missing[0]!r}")
        subset = task_dataset(TASK, full.store, labels={i: full.labels[i] for i in spec.train_ids})
        majority = collections.Counter(subset.labels[i] for i in subset.ids).most_common(1)[0][0]
        data = data._replace(train=subset, constant_prediction=majority)  # the input-blind reference of the subset
    notes: list[str] = []
    summary = experiment.run(TASK, spec.family, data=data, train_config=spec.train_config,
                             model_config=spec.model_config, budget=spec.budget, out_dir=out / "train", resume=False,
                             progress=False, log=notes.append)
    activity = load_activity_labels(spec.activity_dir, spec.activity_split)

    def test(features_dir: str, name: str) -> tuple[dict[str, Any], dict[str, int]]:
        metrics = evaluate_checkpoint(
            TASK, checkpoint_path=out / "train" / "best.pt", family=spec.family, features_dir=features_dir,
            activity=activity, out_dir=out / name, config=EvaluateConfig(batch_size=spec.train_config.batch_size),
            device=spec.train_config.device,
        )
        details = json.loads((out / name / "details.json").read_text(encoding="utf-8"))
        return metrics, details["per_item"]["correct"]

    metrics, correct = test(spec.features_dir, "test")
    extra = {}
    for name, features_dir in spec.extra_tests:
        other, other_correct = test(features_dir, f"test-{name}")
        extra[name] = {"top_1": other["top_1"], "correct": other_correct}
    (out / "train" / "last.pt").unlink(missing_ok=True)  # never resumed here; best.pt stays for re-evaluation
    return {
        "top_1": metrics["top_1"], "mean_class_accuracy": metrics["mean_class_accuracy"],
        "correct": correct, "extra": extra, "epochs_run": summary.epochs_run,
        "converged": summary.converged, "best_epoch": summary.best_epoch,
        "best_val_accuracy": summary.best_val_metric, "num_parameters": summary.num_parameters,
        "train_items": summary.train_items, "train_time_s": summary.train_time_s, "notes": notes,
    }


def run_trainings(specs: Sequence[TrainingSpec], *, workers: int, timeout_s: float, log: Log = None
                  ) -> list[dict[str, Any] | str]:
    """:func:`train_and_test` for every spec, ``workers`` fresh processes at a time (forked from the study's fork
    server, which has torch imported); per spec its result, or the one-line error of a failed training."""
    def one(spec: TrainingSpec) -> dict[str, Any] | str:
        name = spec.title
        try:
            result = run_isolated(train_and_test, spec, timeout_s=timeout_s)
        except CellError as err:
            if log:
                log(f"{name}: FAILED {str(err).splitlines()[0]}")
            return str(err).splitlines()[0]
        if log:
            state = "converged" if result["converged"] else "not converged"
            log(f"{name}: top-1 {result['top_1']:.3f} on test, {result['train_items']} items, "
                f"{result['epochs_run']}/{spec.train_config.epochs} epochs ({state})")
        return result

    # The most epochs (the smallest subsets under equal steps, with a validation pass per epoch) first, so the
    # longest trainings do not start last.
    order = sorted(range(len(specs)), key=lambda i: -specs[i].train_config.epochs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {i: pool.submit(one, specs[i]) for i in order}
        return [futures[i].result() for i in range(len(specs))]


# --------------------------------------------------------------------------------------------------------
# Analysis


class SizePoint(NamedTuple):
    """One family at one training-set size: test accuracy per seed and which test items each seed got right."""

    family: str
    fraction: float
    train_items: int
    accuracy: tuple[float, ...]  # test top-1 per seed
    correct: tuple[np.ndarray, ...]  # per seed: (num_test_items,) 0/1, the same item order for every point


def points_from_cells(cells: Sequence[Cell]) -> dict[str, list[SizePoint]]:
    """The row's cells -> ``{family: points by training size}`` (cells without a finished seed are left out)."""
    out: dict[str, list[SizePoint]] = {}
    for cell in cells:
        if not cell.metrics.get("top_1"):
            continue
        correct = tuple(np.frombuffer(s.encode(), dtype=np.uint8) - ord("0") for s in cell.settings["test_correct"])
        out.setdefault(cell.variant, []).append(SizePoint(
            cell.variant, float(cell.key["fraction"]), int(cell.key["train_items"]),
            tuple(cell.metrics["top_1"]), correct))
    return {family: sorted(points, key=lambda p: p.fraction) for family, points in out.items()}


def compare(a: SizePoint, b: SizePoint, *, seed: int = 0, resamples: int = RESAMPLES) -> dict[str, Any]:
    """A's test accuracy minus B's at one size: difference, 95% interval, p-value and symbol (">" A significantly
    higher, "<" lower, "~" neither; alpha 0.05, unadjusted).

    The comparison's own test (:func:`seqvision.metrics.compare_resampled`): a Welch-Satterthwaite t-test whose
    variance holds both the spread over training seeds and the sampling of the test items (paired: both systems
    are scored on the same items)."""
    num_items = len(a.correct[0])
    weights = item_weights(num_items, resamples=resamples, seed=seed)
    tables = [[np.stack([c.astype(float), np.ones(num_items)], axis=1) for c in p.correct] for p in (a, b)]
    result = compare_resampled(resampled_values(tables[0], weights), resampled_values(tables[1], weights),
                               num_items=num_items, seed=seed)
    return {"difference": result.difference, "interval": list(result.interval), "p_value": result.p_value,
            "symbol": verdict_symbol(result, alpha=ALPHA)}


def crossover(reference: Sequence[SizePoint], other: Sequence[SizePoint], symbols: Sequence[str]
              ) -> dict[str, Any]:
    """Where the reference (the Transformer) overtakes ``other``, on their common sizes, ascending.

    ``symbols[i]``: :func:`compare` of reference vs other at size i. Let s be the smallest size from which the
    reference's mean is above other's at every larger size. ``status``:

    - "crossover": s is not the smallest size and the reference is significantly above at s or a larger size;
      ``train_items`` is s, ``other_ahead_before`` whether other was significantly above at a smaller size;
    - "reference ahead throughout": above at every size and significantly so at one at least;
    - "none": not above at the largest size, or nowhere significantly above from s on (no crossover within the
      measured range).
    """
    means = [(float(np.mean(r.accuracy)), float(np.mean(o.accuracy))) for r, o in zip(reference, other)]
    start = None
    for i in reversed(range(len(means))):
        if means[i][0] <= means[i][1]:
            break
        start = i
    base: dict[str, Any] = {"status": "none", "train_items": None, "other_ahead_before": False}
    if start is None or not any(s == ">" for s in symbols[start:]):
        return base
    if start == 0:
        return {**base, "status": "reference ahead throughout"}
    return {"status": "crossover", "train_items": reference[start].train_items,
            "other_ahead_before": any(s == "<" for s in symbols[:start])}


def samples_to_reach(items: Sequence[int], means: Sequence[float], target: float) -> dict[str, Any]:
    """Training items at which a mean-accuracy curve first reaches ``target``: interpolated linearly in log(items)
    between the last measured size below the target and the first at or above it. ``how``: "interpolated", "at or
    below the smallest size" (``items`` is then the smallest measured size), or "not reached" (``items`` None)."""
    for i, (n, mean) in enumerate(zip(items, means)):
        if mean >= target:
            if i == 0:
                return {"items": float(n), "how": "at or below the smallest size"}
            n0, m0 = items[i - 1], means[i - 1]
            t = (target - m0) / (mean - m0)
            return {"items": float(math.exp(math.log(n0) + t * (math.log(n) - math.log(n0)))), "how": "interpolated"}
    return {"items": None, "how": "not reached"}


def _negated(value: float) -> float:
    return 0.0 - value  # not -value: a tie prints +0.000, not -0.000


def _flip(symbol: str) -> str:
    return {">": "<", "<": ">"}.get(symbol, symbol)


def bias_verdict(small: str, large: str, *, measured: str) -> Verdict:
    """A recurrent family's verdict from its comparisons with the Transformer at the smallest and the largest size
    (``small``, ``large``: ">" the recurrent family significantly ahead, "<" behind, "~" no significant difference).

    - "agrees": ahead at the smallest size, tied or behind at the largest (the gap closes or reverses);
    - "disagrees": behind at the smallest size; or tied there and ahead at the largest (the Transformer loses ground
      with data); or tied there and behind at the largest (no small-data advantage for the recurrent bias);
    - "inconclusive": tied at both ends, or ahead at both (no catch-up within the measured range).
    """
    if small == ">" and large in ("~", "<"):
        end = "tied with it" if large == "~" else "behind it"
        return Verdict("agrees", CLAIM, measured,
                       f"ahead of the Transformer at the smallest size, {end} at the largest")
    if small == "<":
        return Verdict("disagrees", CLAIM, measured, "behind the Transformer already at the smallest size")
    if small == "~" and large == ">":
        return Verdict("disagrees", CLAIM, measured,
                       "tied with the Transformer at the smallest size, ahead at the largest: the Transformer loses "
                       "ground with more data")
    if small == "~" and large == "<":
        return Verdict("disagrees", CLAIM, measured,
                       "no advantage over the Transformer at the smallest size, behind it at the largest")
    if small == ">":
        return Verdict("inconclusive", CLAIM, measured,
                       "ahead of the Transformer at both ends: no catch-up within the measured range")
    return Verdict("inconclusive", CLAIM, measured, "no significant difference at the smallest or the largest size")


def analyse(points: Mapping[str, Sequence[SizePoint]], *, target_fraction: float, num_classes: int,
            seed: int = 0, resamples: int = RESAMPLES) -> dict[str, Any]:
    """Curves, comparisons with the Transformer, crossovers, training items to reach the target, verdicts.

    ``target_fraction``: the target accuracy is this times the best family's mean at the largest measured size.
    Returns ``{"curves", "comparisons", "crossovers", "target", "samples_to_target", "verdicts", "chance"}``
    (``verdicts``: family -> :class:`Verdict`; the rest JSON-ready).
    """
    curves = {
        family: [{"fraction": p.fraction, "train_items": p.train_items, **seed_summary(p.accuracy)} for p in mine]
        for family, mine in points.items()
    }
    at_largest = {f: c[-1]["mean"] for f, c in curves.items() if c}
    best = max(at_largest, key=lambda f: at_largest[f]) if at_largest else None
    target = target_fraction * at_largest[best] if best else None
    samples = {family: samples_to_reach([r["train_items"] for r in curve], [r["mean"] for r in curve], target)
               for family, curve in curves.items() if target is not None}
    comparisons: dict[str, list[dict[str, Any]]] = {}
    crossovers: dict[str, dict[str, Any]] = {}
    verdicts: dict[str, Verdict] = {}
    reference = {p.fraction: p for p in points.get(REFERENCE, ())}
    for family, mine in points.items():
        if family == REFERENCE:
            continue
        pairs = [(reference[p.fraction], p) for p in mine if p.fraction in reference]
        if not pairs:
            continue
        rows = [{"fraction": o.fraction, "train_items": o.train_items, **compare(r, o, seed=seed, resamples=resamples)}
                for r, o in pairs]
        comparisons[family] = rows
        symbols = [row["symbol"] for row in rows]
        crossovers[family] = crossover([r for r, _ in pairs], [o for _, o in pairs], symbols)
        if any(family in members for members in COLUMNS.values()):
            ends = [rows[0], rows[-1]] if len(rows) > 1 else [rows[0]]
            measured = "; ".join(
                f"{family} - transformer {_negated(row['difference']):+.3f} [{_negated(row['interval'][1]):+.3f}, "
                f"{_negated(row['interval'][0]):+.3f}] at {row['train_items']} items" for row in ends)
            verdicts[family] = bias_verdict(_flip(symbols[0]), _flip(symbols[-1]), measured=measured)
    return {"curves": curves, "comparisons": comparisons, "crossovers": crossovers, "verdicts": verdicts,
            "target": {"fraction": target_fraction, "accuracy": target, "best_family": best},
            "samples_to_target": samples, "chance": 1.0 / num_classes}


def table_cells(verdicts: Mapping[str, Verdict]) -> list[dict[str, str]]:
    """One table cell per column with a verdict: its families' verdicts joined (:func:`fit.combine`)."""
    out = []
    for column, families in COLUMNS.items():
        judged = {f: verdicts[f] for f in families if f in verdicts}
        if judged:
            out.append({"column": column, "quantity": "inductive bias", "claim": CLAIM,
                        "measured": "; ".join(v.measured for v in judged.values()),
                        "verdict": combine(judged, depends_on="the cell")})
    return out


def summary_lines(result: RowResult) -> list[str]:
    """Crossovers and training clips to reach the target, one line per family, for logs and the CLI."""
    extra = result.extra
    lines = []
    for family, found in extra["crossovers"].items():
        if found["status"] == "crossover":
            before = " (it was significantly ahead below)" if found["other_ahead_before"] else ""
            lines.append(f"{ROW}/{family}: the Transformer overtakes it from {found['train_items']} clips{before}")
        elif found["status"] == "reference ahead throughout":
            lines.append(f"{ROW}/{family}: the Transformer is ahead at every size")
        else:
            lines.append(f"{ROW}/{family}: no crossover within the measured range")
    target = extra["target"]
    if target["accuracy"] is not None:
        reached = []
        for family, found in extra["samples_to_target"].items():
            if found["items"] is None:
                reached.append(f"{family} not reached")
            else:
                at_most = "<= " if found["how"] != "interpolated" else ""
                reached.append(f"{family} {at_most}{found['items']:.0f}")
        lines.append(f"{ROW}: clips to reach top-1 {target['accuracy']:.3f} ({target['fraction']:g} x "
                     f"{target['best_family']} at the largest size): {', '.join(reached)}")
    return lines


# --------------------------------------------------------------------------------------------------------
# The row


def run_inductive_bias(config: StudyConfig, *, params: Params, work_dir: str | Path, log: Log = None) -> RowResult:
    """Row 4: every family of ``config.bias_families`` on every training fraction, ``config.bias_seeds`` seeds.

    ``params``: the pipeline's params (``train``, ``models``, ``data.activity_dir`` / ``activity_split``), read once
    by the caller. Trainings write into ``work_dir/{family}/f{fraction}/seed{k}/{train,test}``. Features come from
    ``config.bias_features``, labels from ``config.bias_activity_dir`` (default: ``params.data.activity_dir``).
    """
    activity_dir = config.bias_activity_dir or params.data.activity_dir
    split = params.data.activity_split
    data = experiment.load_task_data(TASK, features_dir=config.bias_features, activity_dir=activity_dir,
                                     activity_split=split)
    full: Any = data.train
    labels = {i: full.labels[i] for i in full.ids}
    subsets = nested_subsets(labels, config.bias_fractions, seed=config.seed)
    train = params.train
    if config.bias_epochs:
        train = dataclasses.replace(train, epochs=config.bias_epochs)
    schedules = {f: scaled_schedule(train, items=len(ids), full_items=len(labels),
                                    equal_steps=config.bias_budget == "steps") for f, ids in subsets.items()}
    specs = [
        TrainingSpec(family=family, fraction=f, seed_index=k, train_ids=tuple(ids),
                     train_config=dataclasses.replace(schedules[f], seed=train.seed + k),
                     model_config=params.models.family(family), budget=params.models.match_params.budget(TASK),
                     features_dir=str(config.bias_features), activity_dir=str(activity_dir), activity_split=split,
                     out_dir=str(Path(work_dir) / family / f"f{f:g}" / f"seed{k}"))
        for family in config.bias_families for f, ids in subsets.items() for k in range(config.bias_seeds)
    ]
    if log:
        log(f"{ROW}: {len(specs)} trainings ({len(config.bias_families)} families x {len(subsets)} fractions x "
            f"{config.bias_seeds} seeds) of {len(labels)} training clips, "
            f"{config.bias_workers or usable_cores()} at a time")
    results = run_trainings(specs, workers=config.bias_workers or usable_cores(), timeout_s=config.bias_timeout_s,
                            log=log)

    test_ids = sorted(next((r["correct"] for r in results if isinstance(r, dict)), {}))
    cells = []
    for family in config.bias_families:
        for f, ids in subsets.items():
            mine = [(s, r) for s, r in zip(specs, results) if s.family == family and s.fraction == f]
            done = [(s, r) for s, r in mine if isinstance(r, dict)]
            metrics = {m: [float(r[m]) for _, r in done]
                       for m in ("top_1", "mean_class_accuracy", "best_val_accuracy", "epochs_run", "train_time_s")}
            metrics["converged"] = [float(r["converged"]) for _, r in done]
            schedule = schedules[f]
            settings = {
                "seeds": [s.train_config.seed for s, _ in done], "epochs_cap": schedule.epochs,
                "patience": schedule.patience, "batch_size": schedule.batch_size,
                "lr": params.models.family(family).lr,
                "num_parameters": done[0][1]["num_parameters"] if done else None,
                "test_correct": ["".join(str(int(r["correct"][i])) for i in test_ids) for _, r in done],
                "notes": sorted({n for _, r in done for n in r["notes"]}),
            }
            errors = [f"seed {s.seed_index}: {r}" for s, r in mine if isinstance(r, str)]
            cells.append(Cell(ROW, family, {"fraction": f, "train_items": len(ids)}, metrics, settings, errors))
    num_classes = len(annotations.load_class_names(activity_dir))
    analysis = analyse(points_from_cells(cells), target_fraction=config.bias_target, num_classes=num_classes,
                       seed=config.seed)
    verdicts = analysis.pop("verdicts")
    findings = [Finding(ROW, family, "top_1", None, v) for family, v in verdicts.items()]
    extra = {**analysis, "test_ids": test_ids, "full_train_items": len(labels), "num_classes": num_classes,
             "features": str(config.bias_features), "activity_dir": str(activity_dir), "activity_split": split,
             "train": to_dict(train), "budget": config.bias_budget}
    return RowResult(ROW, cells, findings, table_cells(verdicts), extra=extra, config=to_dict(config))
