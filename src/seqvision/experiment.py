"""Train one model family on one task from the pipeline's artifacts: the work behind ``train@{task}-{model}``.

Plain functions, in the order the stage calls them:

1. :func:`load_task_data` — the train/val datasets of a task from ``artifacts/features`` (+ ``artifacts/tokens``
   for captioning, + the UCF101-style label lists for activity), and the sizes a model needs.
2. :func:`sized_config` / :func:`build` — the family's ``models:`` section, resized by ``models.match_params``
   when that is on, then the model itself.
3. :func:`validation_metric` — what picks ``best.pt``: top-1 accuracy for activity; for captioners CIDEr-D of
   greedy decodes on (at most :data:`CIDER_VAL_ITEMS` of) the val set, the metric the comparison reports.
4. :func:`run` — :func:`seqvision.train.fit` plus the stage's outputs in ``out_dir``:

   ``best.pt`` / ``last.pt``   fit's checkpoints (:mod:`seqvision.checkpoint` layout, verified on load);
                               ``models.build_from_checkpoint(checkpoint.load(path))`` rebuilds the model
   ``history.json``            fit's per-epoch records
   ``learning_curve.json``     ``[{"epoch", "train_loss", "val_loss", "val_metric"}, ...]`` for ``dvc plots``
   ``config.json``             exactly what was trained: task, family, effective model config, train config
   ``summary.json``            headline numbers (see :class:`TrainSummary`), less its :data:`RUN_FIELDS`
   ``runinfo.json``            the :data:`RUN_FIELDS`, fit's per-epoch times and what it ran on
                               (``runtime_tags``: device, GPU, torch and CUDA versions): measurements of this
                               run, which differ on every run (``io.write_runinfo``; DVC ignores the file)

Resuming: ``last.pt`` records a fingerprint of everything in the params and inputs that decides the result (task,
family, effective model config, the train knobs that change the maths, the content of the input files), and the
run's ``runinfo.json`` the code that started it (:func:`code_digest`: every module of the ``seqvision`` package;
kept out of the checkpoints, so their bytes do not change with an unrelated edit). ``resume=True`` continues from
``last.pt`` only when both match and both checkpoints verify; otherwise it starts afresh (saying why), so a stage
rerun by DVC after its params, inputs or code changed never continues someone else's run (DVC keeps the stage's
checkpoints, ``persist: true``), and a corrupted checkpoint is never resumed from or left as an output.

Tracking goes through a :class:`seqvision.tracking.TrackerLike` that the caller opens
(:func:`seqvision.tracking.open_training_run`); nothing here needs MLflow itself.

Under DDP (``torchrun ... -m pipelines.train_worker``, started by ``pipelines.train --nproc-per-node``; ``docs/ddp.md``) every rank calls :func:`run`: the train
data is sharded, rank 0 alone decides whether to resume, writes the outputs and uses the tracker.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import hashlib
import json
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from seqvision import annotations, checkpoint, distributed, io, models, tracking
from seqvision.blocks import ModelDims
from seqvision.config import MODEL_FAMILIES, TASKS, EvaluateConfig, TrainConfig, check_names, flatten, to_dict
from seqvision.annotations import activity_labels
from seqvision.datasets import VisualStore, make_loader, task_dataset
from seqvision.decode import decode
from seqvision.io import atomic_path, file_digest, read_runinfo, write_json, write_runinfo
from seqvision.metrics import cider_d
from seqvision.runtime import resolve_device, seed_everything
from seqvision.tasks import task_spec
from seqvision.train import _RESUMABLE_CHANGES, ACCURACY, ValidationMetric, fit
from seqvision.vocab import Vocab, load_split

FAMILIES = MODEL_FAMILIES

# CIDEr-D is computed on the first CIDER_VAL_ITEMS val items (the val loader is not shuffled, so always the
# same ones). On the default data that is all 150; it caps the per-epoch cost of greedy decoding + scoring on a
# large val set (e.g. MSR-VTT's 497 val videos are all kept, COCO's 5,000 Karpathy val images are not).
CIDER_VAL_ITEMS = 1000

# Outputs this module writes into out_dir (and removes before a fresh start).
OUTPUT_FILES = ("best.pt", "last.pt", "history.json", "learning_curve.json", "config.json", "summary.json",
                io.RUNINFO)


# --------------------------------------------------------------------------------------------------------
# Data


class TaskData(NamedTuple):
    """The datasets of one task and what a model needs to know about them."""

    task: str
    train: Dataset
    val: Dataset
    feature_dim: int
    num_classes: int | None  # activity
    vocab: Vocab | None  # captioning
    max_caption_length: int | None  # captioning: longest training caption in generated tokens (words + <eos>)
    inputs: tuple[Path, ...]  # the files whose content decides the result (for the resume fingerprint)
    dropped: int  # labelled / captioned items of train + val that have no features (skipped by extract)
    constant_prediction: int | str  # the majority training class / the most frequent training caption


def _stores(features_dir: Path, kind: str, *, pixels: bool = False) -> dict[str, VisualStore]:
    stores = {}
    for split in ("train", "val"):
        array = features_dir / f"{kind}-{split}.npy"
        if not pixels and not array.is_file():
            raise FileNotFoundError(f"{array}: no such feature array; run the features stage first")
        if not (features_dir / "index.json").is_file():
            raise FileNotFoundError(f"{features_dir / 'index.json'}: missing; run the features stage first")
        stores[split] = VisualStore(features_dir, kind=kind, split=split)  # type: ignore[arg-type]
    return stores


def load_task_data(
    task: str,
    *,
    features_dir: str | Path,
    tokens_dir: str | Path | None = None,
    activity_dir: str | Path | None = None,
    activity_split: int = 1,
    seed: int = 0,
    pixel_feature_dim: int | None = None,
) -> TaskData:
    """Train and val datasets of ``task``.

    ``features_dir``: ``artifacts/features`` (``{videos,images}-{split}.npy`` + ``index.json``). Captioning reads
    ``{tokens_dir}/video`` or ``{tokens_dir}/image`` (vocab, ids, references); activity reads the UCF101-style
    lists in ``activity_dir`` (split ``activity_split``). ``seed`` drives the per-epoch caption sampling.
    ``pixel_feature_dim``: set for ``train.finetune_encoder``: ``features_dir`` is then the frames folder
    (``artifacts/frames``, uint8 pixels) and this is the feature size the encoder in front of the model emits.
    Raises ``FileNotFoundError`` / ``ValueError`` naming the missing input or the empty split.
    """
    spec = task_spec(task)
    features_dir = Path(features_dir)
    kind = spec.kind
    pixels = pixel_feature_dim is not None
    stores = _stores(features_dir, kind, pixels=pixels)
    inputs = [features_dir / "index.json"]
    if not pixels:
        inputs += [features_dir / f"{kind}-{s}.npy" for s in ("train", "val")]

    num_classes = vocab = max_length = None
    if task == "activity":
        if not activity_dir:
            raise ValueError("activity needs the UCF101-style label lists (activity_dir)")
        activity_dir = Path(activity_dir)
        names = annotations.load_class_names(activity_dir)
        # video_dir only names file paths, which training never opens; the ids and labels are what matter.
        records = annotations.load_video_records(
            video_dir=activity_dir, activity_dir=activity_dir, activity_split=activity_split
        )
        train_set: Any = task_dataset(task, stores["train"], labels=activity_labels(records, "train"))
        val_set: Any = task_dataset(task, stores["val"], labels=activity_labels(records, "val"))
        num_classes = len(names)
        constant: int | str = collections.Counter(train_set.labels[i] for i in train_set.ids).most_common(1)[0][0]
        inputs += sorted(p for p in activity_dir.iterdir() if p.suffix == ".txt")
    else:
        if not tokens_dir:
            raise ValueError(f"{task} needs the tokenized captions (tokens_dir)")
        corpus = Path(tokens_dir) / str(spec.corpus)
        for name in ("vocab.json", "train.npz", "val.npz", "references-val.json"):
            if not (corpus / name).is_file():
                raise FileNotFoundError(f"{corpus / name}: missing; run the tokenize stage first")
        train_set = task_dataset(task, stores["train"], tokens_dir=tokens_dir, train=True, seed=seed)
        val_set = task_dataset(task, stores["val"], tokens_dir=tokens_dir)
        vocab = Vocab.load(corpus / "vocab.json")
        encoded = load_split(corpus, "train")
        max_length = int(encoded.lengths.max()) - 1  # minus <bos>
        kept = set(train_set.ids)
        counts = collections.Counter(
            tuple(row) for row, item_id in zip(encoded.tokens.tolist(), encoded.ids.tolist()) if item_id in kept
        )
        constant = vocab.decode(counts.most_common(1)[0][0]) if counts else ""
        inputs += [corpus / n for n in ("vocab.json", "train.npz", "val.npz", "references-val.json")]

    for split, dataset in (("train", train_set), ("val", val_set)):
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError(
                f"{task}: no {split} items have both features in {features_dir} and "
                f"{'labels' if task == 'activity' else 'captions'}; do the artifacts come from the same data?"
            )
    store = stores["train"]
    feature_dim = pixel_feature_dim if pixels else int(store.row(store.ids[0]).shape[-1])
    dropped = len(train_set.dropped) + len(val_set.dropped)  # type: ignore[attr-defined]
    return TaskData(task, train_set, val_set, feature_dim, num_classes, vocab, max_length, tuple(inputs), dropped,
                    constant)


def finetune_encoder(enabled: bool, encoder_path: str | Path | None) -> nn.Module | None:
    """The trained frame encoder to fine-tune with the model when ``train.finetune_encoder`` (``enabled``) is on;
    ``None`` when it is off. Raises ``ValueError`` / ``FileNotFoundError`` naming what is missing."""
    from seqvision.features import load_encoder

    if not enabled:
        return None
    if not encoder_path:
        raise ValueError("train.finetune_encoder is on: pass the encoder stage's encoder.pt (--encoder) and the "
                         "frames (--frames)")
    return load_encoder(encoder_path)


def load_for_training(task: str, *, seed: int, activity_dir: str | Path | None, activity_split: int,
                      features_dir: str | Path, frames_dir: str | Path | None, tokens_dir: str | Path | None,
                      encoder: nn.Module | None) -> TaskData:
    """The task's train/val data for one training: cached features, or frame pixels when ``encoder`` (from
    :func:`finetune_encoder`) is fine-tuned in front. ``seed``: ``train.seed`` (per-epoch caption sampling)."""
    if encoder is not None and not frames_dir:
        raise ValueError("train.finetune_encoder is on: pass the frames folder (--frames)")
    source = features_dir if encoder is None else frames_dir
    pixel_dim = None if encoder is None else int(encoder.feature_dim)  # type: ignore[arg-type]
    return load_task_data(task, features_dir=source, tokens_dir=tokens_dir,  # type: ignore[arg-type]
                          activity_dir=activity_dir, activity_split=activity_split, seed=seed,
                          pixel_feature_dim=pixel_dim)


# --------------------------------------------------------------------------------------------------------
# Model


def dims(data: TaskData) -> ModelDims:
    """The sizes a model of ``data``'s task takes from the data."""
    return ModelDims(feature_dim=data.feature_dim, vocab_size=len(data.vocab) if data.vocab is not None else 0,
                     num_classes=data.num_classes or 0)


# A family whose size cannot come within this fraction of its task's budget is reported (the report marks it).
BUDGET_TOLERANCE = 0.1


def sized_config(task: str, family: str, section: Any, budget: int | None, *, data: TaskData) -> Any:
    """The family's ``models:`` section, with ``hidden_size`` resized to the task's ``models.match_params`` budget
    (``budget``; None: off). Warns when the closest size is more than :data:`BUDGET_TOLERANCE` off the budget."""
    check_names(task, family)
    if budget is None:
        return section
    config, count = models.fit_to_budget(task, family, section, budget, dims=dims(data))
    if abs(count - budget) > BUDGET_TOLERANCE * budget:
        warnings.warn(f"models.match_params.{task}: {family} gets {count:,} parameters at hidden_size="
                      f"{config.hidden_size}, more than {BUDGET_TOLERANCE:.0%} away from the budget of {budget:,}",
                      stacklevel=2)
    return config


def build(task: str, family: str, config: Any, *, data: TaskData) -> nn.Module:
    """A fresh model of ``family`` for ``task``, sized for ``data`` (feature width, classes or vocabulary)."""
    return models.build_model(task, family, config, dims=dims(data))


# --------------------------------------------------------------------------------------------------------
# Validation metric, and the same metric for a model that ignores its input


def _references(dataset: Any, ids: Sequence[str]) -> dict[str, list[str]]:
    return {i: dataset.references(i) for i in ids}


def caption_cider(vocab: Vocab, decoding: EvaluateConfig, *, max_items: int = CIDER_VAL_ITEMS) -> ValidationMetric:
    """CIDEr-D (coco-caption, [0, 10]) of the first ``max_items`` items of the val loader, decoded exactly as the
    test split is (``decoding``: the ``evaluate`` section's beam size, length penalty and maximum length), so the
    checkpoint is chosen with the decoder it is tested with."""

    def val_cider_d(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
        hypotheses: dict[str, str] = {}
        for batch in loader:
            batch = batch.to(device)
            decoded = decode(model, batch.visual, batch.lengths, beam_size=decoding.beam_size,  # type: ignore[arg-type]
                             max_length=decoding.max_length, length_penalty_alpha=decoding.length_penalty)
            for item_id, ids in zip(batch.ids, decoded.tokens.tolist()):
                hypotheses[item_id] = vocab.decode(ids)
            if len(hypotheses) >= max_items:
                break
        keep = list(hypotheses)[:max_items]
        hypotheses = {i: hypotheses[i] for i in keep}
        return cider_d(hypotheses, _references(loader.dataset, keep))

    return ValidationMetric("cider_d", val_cider_d, higher_is_better=True)


def validation_metric(data: TaskData, decoding: EvaluateConfig | None = None) -> ValidationMetric:
    """Accuracy for activity; for the captioners CIDEr-D of the test decoder (``decoding``, required for them)."""
    if data.task == "activity":
        return ACCURACY
    if decoding is None:
        raise ValueError(f"{data.task}: the validation metric decodes like the test split: pass the evaluate section")
    assert data.vocab is not None
    return caption_cider(data.vocab, decoding)


def input_blind_metric(data: TaskData) -> float:
    """The validation metric of a model that ignores its input: the majority training class (activity), or the
    most frequent training caption for every item (captioning), scored like :func:`validation_metric`."""
    val: Any = data.val
    if data.task == "activity":
        return sum(val.labels[i] == data.constant_prediction for i in val.ids) / len(val.ids)
    keep = list(val.ids)[:CIDER_VAL_ITEMS]
    hypotheses = {i: str(data.constant_prediction) for i in keep}
    return cider_d(hypotheses, _references(val, keep))


# --------------------------------------------------------------------------------------------------------
# Resume fingerprint


@functools.cache
def code_digest() -> str:
    """SHA-256 over the source of every module of the ``seqvision`` package (paths and contents, sorted): a change
    to any of them may change a training's result. Coarser than a training's imports, which errs towards
    starting afresh: an interrupted run resumes only under the code that started it."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def fingerprint(task: str, family: str, config: Any, train_config: TrainConfig, inputs: Sequence[Path], *,
                encoder: nn.Module | None = None) -> str:
    """SHA-256 over what in the params and inputs decides a training's result: names, effective model config, the
    train knobs that change the maths (not ``device``, ``num_workers`` & co., which fit allows to change on
    resume) and input contents. The code is checked beside it (:func:`code_digest`, in ``runinfo.json``)."""
    train_knobs = {k: v for k, v in to_dict(train_config).items() if k not in _RESUMABLE_CHANGES}
    blob = {
        "task": task,
        "family": family,
        "model": to_dict(config),
        "train": train_knobs,
        "inputs": [file_digest(p) for p in inputs],
    }
    if encoder is not None:  # fine-tuning: the starting encoder decides the result too (only then in the blob,
        # so fingerprints of feature-based runs stay what they were)
        digest = hashlib.sha256()
        for name, tensor in sorted(encoder.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        blob["finetune_encoder"] = digest.hexdigest()
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _resume_point(out_dir: Path, expected: str, log: Any) -> int | None:
    """The epoch to continue from, or None for a fresh start (outputs of another run are then removed).

    Resumable: ``last.pt`` verifies (:func:`seqvision.checkpoint.load`) and carries ``expected`` as its
    fingerprint, the run's ``runinfo.json`` names this code (:func:`code_digest`; a run without it, e.g. outputs
    checked out by DVC, is not resumed), and ``best.pt`` verifies too. A missing or corrupt ``best.pt`` is restored from ``last.pt`` when
    the last epoch was the best one; otherwise the best weights are lost and the run starts afresh. A corrupt
    checkpoint is never resumed from and never left behind as an output; ``log`` says which case applied.
    """
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if not last_path.is_file():
        return None
    try:
        last = checkpoint.load(last_path)
    except checkpoint.CorruptCheckpoint as err:
        log(f"{err}; it is not resumed from: starting afresh")
        return None
    if last.get("fingerprint") != expected:
        log(f"{last_path}: written for other params or inputs; starting afresh")
        return None
    if read_runinfo(out_dir).get("code") != code_digest():
        log(f"{last_path}: written by other code (or its runinfo.json is gone); starting afresh")
        return None
    if last["best_epoch"] is None:
        return int(last["epoch"])
    problem = None
    try:
        best = checkpoint.load(best_path)
        if best.get("fingerprint") != expected or best.get("epoch") != last["best_epoch"]:
            problem = f"{best_path}: not the best epoch ({last['best_epoch']}) of this run"
    except (FileNotFoundError, checkpoint.CorruptCheckpoint) as err:
        problem = str(err)
    if problem is not None:
        if last["best_epoch"] != last["epoch"]:
            log(f"{problem}, and its weights (epoch {last['best_epoch']}) are not in {last_path}: starting afresh")
            return None
        log(f"{problem}: restored from {last_path}, whose epoch {last['epoch']} was the best")
        with atomic_path(best_path) as tmp:  # the last epoch was the best: last.pt holds best.pt's weights
            shutil.copyfile(last_path, tmp)
    return int(last["epoch"])


def _silent(*_: Any) -> None:
    """``log`` on DDP ranks other than 0."""


def _clear_outputs(out_dir: Path) -> None:
    for name in OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------
# One training


@dataclasses.dataclass(frozen=True)
class TrainSummary:
    """What ``summary.json`` holds."""

    task: str
    family: str
    seed: int  # train.seed of this run
    num_parameters: int
    metric: str  # "accuracy" or "cider_d"
    best_val_metric: float | None
    best_epoch: int | None
    input_blind_metric: float  # the same metric for a model that ignores its input (see input_blind_metric)
    epochs_run: int
    stopped_early: bool
    converged: bool  # stopped by patience, or its best epoch lies patience epochs before the end (see converged)
    resumed_from_epoch: int  # 0 for a fresh run
    train_time_s: float  # sum over epochs of training + validation time (across resumptions)
    samples_per_s: float  # training samples per second of training time
    peak_memory_mb: float  # CUDA: peak allocated; CPU: the process's peak RSS
    device: str
    torch_version: str
    train_items: int
    val_items: int
    dropped_items: int
    model_config: dict[str, Any]
    mlflow_run_id: str | None
    mlflow_parent_run_id: str | None


# TrainSummary fields that measure or identify this run rather than follow from its inputs: runinfo.json, not
# summary.json (whose bytes DVC hashes).
RUN_FIELDS = ("resumed_from_epoch", "train_time_s", "samples_per_s", "peak_memory_mb", "mlflow_run_id",
              "mlflow_parent_run_id")


def converged(stopped_early: bool, epochs_since_best: int, patience: int) -> bool:
    """Whether a run converged: it stopped early, or its last ``patience`` epochs improved neither the validation
    metric nor the validation loss (the stopping rule of ``train.fit``, met just as ``train.epochs`` ran out). A
    run that hit ``train.epochs`` while either was still improving is not converged (with ``patience`` 0 nothing
    is ever called converged: there is no criterion)."""
    if patience <= 0:
        return False
    return stopped_early or epochs_since_best >= patience


def learning_curve(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """fit's history -> the rows ``dvc plots`` draws (x: epoch)."""
    return [
        {"epoch": h["epoch"], "train_loss": h["train_loss"], "val_loss": h["val_loss"], "val_metric": h["val_metric"]}
        for h in history
    ]


def _summarize_history(history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Time, throughput and peak memory over the epochs that have them (a resumed run whose runinfo.json was not
    kept, e.g. after ``dvc pull``, has no times for its earlier epochs)."""
    timed = [h for h in history if "train_time_s" in h]
    train_seconds = sum(h["train_time_s"] for h in timed)
    samples = sum(h["samples_per_s"] * h["train_time_s"] for h in timed)
    return {
        "train_time_s": round(sum(h["epoch_time_s"] for h in timed), 3),
        "samples_per_s": round(samples / train_seconds, 1) if train_seconds > 0 else 0.0,
        "peak_memory_mb": round(max((h["peak_memory_mb"] for h in timed), default=0.0), 1),
    }


def run(
    task: str,
    family: str,
    *,
    data: TaskData,
    train_config: TrainConfig,
    model_config: Any,
    budget: int | None = None,
    decoding: EvaluateConfig | None = None,
    out_dir: str | Path,
    tracker: tracking.TrackerLike | None = None,
    parent_run_id: str | None = None,
    resume: bool = True,
    progress: bool | None = None,
    log: Any = print,
    encoder: nn.Module | None = None,
) -> TrainSummary:
    """Train ``family`` on ``task`` with seed ``train_config.seed`` and write every output into ``out_dir`` (see the
    module docstring).

    ``decoding`` (captioning): the ``evaluate`` section, whose decoder picks the best epoch as it predicts the test
    split.
    ``tracker`` (e.g. from :func:`seqvision.tracking.open_training_run`) receives fit's params and per-epoch metrics, the effective
    model config, parameter count, headline metrics, ``config.json``, ``summary.json`` and ``best.pt``.
    ``resume``: continue from ``out_dir/last.pt`` when its fingerprint matches (else start afresh).
    ``log``: where one-line notes go (resume decisions, warnings).
    ``model_config``: the family's ``models:`` section; ``budget``: its task's ``models.match_params`` (None: off).
    ``encoder``: for ``train.finetune_encoder``: this trained frame encoder goes in front of the model and
    trains with it (``models.PixelModel``); ``data`` must then come from frames (``pixel_feature_dim``).
    Under DDP only rank 0 logs, writes and tracks; ``train.batch_size`` is the global batch.
    """
    check_names(task, family)
    if data.task != task:
        raise ValueError(f"data was loaded for {data.task!r}, not {task!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank0 = distributed.is_rank0()
    tracker = tracker if tracker is not None and rank0 else tracking.NullTracker()
    log = log if rank0 else _silent

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = sized_config(task, family, model_config, budget, data=data)
    for w in caught:
        log(f"warning: {w.message}")
    key = fingerprint(task, family, config, train_config, data.inputs, encoder=encoder)
    resumed_from = None
    if rank0:
        resumed_from = _resume_point(out_dir, key, log) if resume else None
        if resumed_from is None:
            _clear_outputs(out_dir)
            write_runinfo(out_dir, code=code_digest())  # what a later resume checks
        else:
            log(f"resuming from {out_dir / 'last.pt'} (epoch {resumed_from})")
    # DDP: every rank follows rank 0's decision, and only once its clean-up is done (they all read last.pt).
    resumed_from = distributed.broadcast_object(resumed_from)

    seed_everything(train_config.seed)  # before building, so the initial weights are reproducible
    model = build(task, family, config, data=data)
    if encoder is not None:
        model = models.PixelModel(copy.deepcopy(encoder), model)
    num_parameters = models.count_parameters(model)
    device = resolve_device(train_config.device)
    workers = train_config.num_workers
    train_loader = make_loader(data.train, batch_size=train_config.batch_size, shuffle=True,  # type: ignore[arg-type]
                               seed=train_config.seed, workers=workers, device=device, shard=True)
    val_loader = make_loader(data.val, batch_size=train_config.batch_size, shuffle=False,  # type: ignore[arg-type]
                             workers=workers, device=device)
    metric = validation_metric(data, decoding)
    blind = input_blind_metric(data)

    if rank0:
        write_json(out_dir / "config.json", {
            "task": task, "family": family, "model": to_dict(config),
            "match_params": budget or "off",
            "train": to_dict(train_config), "num_parameters": num_parameters, "fingerprint": key,
        })
    tracker.log_params({
        **flatten({"model": to_dict(config)}), "model.family": family, "model.task": task,
        f"models.match_params.{task}": budget or "off", "num_parameters": num_parameters,
    })
    tracker.log_artifact(out_dir / "config.json")

    result = fit(
        model, train_loader, val_loader, config=train_config, lr=config.lr, out_dir=out_dir, tracker=tracker,
        metric=metric,
        spec=models.model_spec(model, task=task, family=family), extra={"fingerprint": key},
        resume=resumed_from is not None,
        progress=progress,
    )
    if rank0 and result.best_checkpoint is None:  # cannot happen: the first epoch always writes best.pt
        raise RuntimeError(f"{out_dir / 'best.pt'}: missing after training")
    resumed_from = resumed_from or 0
    for entry in result.history[:resumed_from]:  # the resumed child run also gets the earlier epochs, as fit logs
        earlier = {k: v for k, v in entry.items() if k != "epoch"}
        tracker.log_epoch({**earlier, f"val_{result.metric}": entry["val_metric"]}, step=entry["epoch"])

    stats = _summarize_history(result.history)
    summary = TrainSummary(
        task=task, family=family, seed=train_config.seed, num_parameters=num_parameters, metric=result.metric,
        best_val_metric=result.best_metric, best_epoch=result.best_epoch, input_blind_metric=round(blind, 6),
        epochs_run=len(result.history), stopped_early=result.stopped_early,
        converged=converged(result.stopped_early, result.epochs_since_best, train_config.patience),
        resumed_from_epoch=resumed_from,
        device=str(device), torch_version=str(torch.__version__), train_items=len(data.train),  # type: ignore[arg-type]
        val_items=len(data.val), dropped_items=data.dropped, model_config=to_dict(config),  # type: ignore[arg-type]
        mlflow_run_id=getattr(tracker, "run_id", None), mlflow_parent_run_id=parent_run_id, **stats,
    )
    if rank0:
        write_json(out_dir / "learning_curve.json", learning_curve(result.history))
        fields = dataclasses.asdict(summary)
        write_json(out_dir / "summary.json", {k: v for k, v in fields.items() if k not in RUN_FIELDS})
        # runtime_tags: what the training ran on, for the stage's MLflow run (its process does not import torch)
        write_runinfo(out_dir, **{k: fields[k] for k in RUN_FIELDS}, runtime_tags=tracking.runtime_tags(device))
    tracker.log_epoch({
        f"best_val_{result.metric}": result.best_metric, "best_epoch": result.best_epoch,
        f"input_blind_val_{result.metric}": blind, "num_parameters": num_parameters,
        "epochs_run": summary.epochs_run, "train_time_s": stats["train_time_s"],
        "train_samples_per_s": stats["samples_per_s"], "train_peak_memory_mb": stats["peak_memory_mb"],
    }, step=summary.epochs_run)
    tracker.log_artifact(out_dir / "summary.json")
    tracker.log_artifact(out_dir / io.RUNINFO)
    tracker.log_artifact(out_dir / "best.pt")
    return summary


__all__ = [
    "CIDER_VAL_ITEMS", "FAMILIES", "OUTPUT_FILES", "TASKS", "TaskData", "TrainSummary", "build", "caption_cider",
    "converged", "dims", "finetune_encoder", "fingerprint", "input_blind_metric", "learning_curve",
    "load_for_training", "load_task_data", "run", "sized_config", "validation_metric",
]
