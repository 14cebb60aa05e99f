"""params.yaml sections -> frozen, validated, typed configs.

Every stage reads ``params.yaml`` through :func:`load_params`, which validates the *whole* file before any
work starts: an unknown key, a wrong type or an out-of-range value raises one :class:`ConfigError` that names
the file, the dotted key and what is allowed.

A section is a frozen dataclass. Field metadata (built with :func:`knob`) carries the allowed range or
choices and the one-line help that ``--help`` shows; the dataclass defaults are the embedded defaults, and
the committed ``params.yaml`` repeats them so that ``dvc`` can track each knob.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from seqvision.tasks import TASKS as _TASK_SPECS
from seqvision.tasks import task_spec

T = TypeVar("T")


class ConfigError(ValueError):
    """A params value is missing, unknown, mistyped or out of range. The message names the key."""


def knob(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    choices: Sequence[Any] | None = None,
) -> Any:
    """A dataclass field with its allowed range or choices and a help line."""
    meta = {"help": help, "low": low, "high": high, "choices": tuple(choices) if choices else None}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        value = default
        return field(default_factory=lambda: value, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------------------
# Validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}s"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    if origin is dict:
        return "a mapping"
    return str(tp)


def _convert(value: Any, tp: Any, where: str, meta: Mapping[str, Any]) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in its config form."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")

    if dataclasses.is_dataclass(tp):
        return _from_mapping(tp, value, where)
    if origin is dict:  # keys checked here, values by the section's owner (StudySection.overrides)
        if value is None:
            return {}
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise bad
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where, meta)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]", meta) for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad
        return tuple(_convert(v, a, f"{where}[{i}]", meta) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return _check_range(value, where, meta)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        # NaN compares false with everything, so it would pass any range check below (and e.g. a NaN
        # max_skipped_fraction would silently disable the skip guard); no knob gives infinity a meaning.
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return _check_range(number, where, meta)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        choices = meta.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def _check_range(value: float, where: str, meta: Mapping[str, Any]) -> Any:
    low, high = meta.get("low"), meta.get("high")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ConfigError(f"{where}: expected a value in {span}, got {value!r}")
    return value


def _from_mapping(cls: type[T], data: Any, where: str) -> T:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected {_type_name(cls)}, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}: unknown key; allowed keys are {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _convert(data[name], hints[name], f"{where}.{name}", f.metadata)
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:  # __post_init__ cross-field checks
        raise ConfigError(f"{where}: {err}") from None


def from_mapping(cls: type[T], data: Any, *, where: str) -> T:
    """Build and validate config ``cls`` from a plain mapping; errors are reported under ``where``."""
    return _from_mapping(cls, data, where)


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain YAML/JSON-friendly data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, for MLflow params and hashes."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# --------------------------------------------------------------------------------------------------------
# Sections. Each stage owns one; the dataclass defaults are the embedded defaults.


@dataclass(frozen=True)
class SplitSizes:
    train: int = knob(1200, "items in the train split", low=1, high=1_000_000)
    val: int = knob(150, "items in the validation split", low=1, high=1_000_000)
    test: int = knob(150, "items in the test split", low=1, high=1_000_000)


@dataclass(frozen=True)
class SynthConfig:
    """The built-in synthetic video benchmark (``python -m seqvision.synth``)."""

    seed: int = knob(0, "master seed; every item derives its own generator from it", low=0)
    videos: SplitSizes = knob(SplitSizes(), "number of video clips per split")
    images: SplitSizes = knob(SplitSizes(), "number of still images per split")
    height: int = knob(64, "frame height in pixels (even, for yuv420p)", low=16, high=1024)
    width: int = knob(64, "frame width in pixels (even, for yuv420p)", low=16, high=1024)
    min_frames: int = knob(16, "shortest clip, in frames", low=4, high=4096)
    max_frames: int = knob(32, "longest clip, in frames", low=4, high=4096)
    fps: int = knob(12, "frames per second of the encoded MP4s", low=1, high=120)
    max_objects: int = knob(3, "objects per scene are drawn from 1..max_objects", low=1, high=3)
    max_events: int = knob(3, "events per clip are drawn from 1..max_events", low=1, high=3)
    noise_std: float = knob(6.0, "std of per-frame pixel noise (0-255 scale)", low=0.0, high=64.0)
    long_range: bool = knob(
        False,
        "long-range clips: the labelled object is hidden, fades in, does its event, fades out and stays hidden for "
        "long_range_distance frames, while distractors walk (docs/data.md)",
    )
    long_range_distance: int = knob(
        55, "long-range: frames after the labelled object was last visible (and before it is first visible)",
        low=1, high=2048,
    )
    main_event_frames: int = knob(12, "long-range: length of the labelled event, in frames", low=4, high=4096)
    held_out_combinations: int = knob(
        4,
        "colour-shape combinations no train or val image shows (distinct colours, shapes in turn); about half of "
        "the test images show at least one (0: no compositional test split)",
        low=0, high=8,
    )
    crf: int = knob(18, "x264 constant rate factor (lower = higher quality)", low=0, high=51)
    workers: int = knob(0, "worker processes; 0 means one per CPU core", low=0, high=256)

    def __post_init__(self) -> None:
        if self.height % 2 or self.width % 2:
            raise ConfigError(f"height and width must be even for yuv420p, got {self.height}x{self.width}")
        if self.min_frames > self.max_frames:
            raise ConfigError(f"min_frames ({self.min_frames}) must not exceed max_frames ({self.max_frames})")


# Presets for the generator CLI: overrides on top of the embedded defaults.
SYNTH_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": {
        "videos": {"train": 24, "val": 8, "test": 8},
        "images": {"train": 24, "val": 8, "test": 8},
        "min_frames": 8,
        "max_frames": 12,
    },
}


@dataclass(frozen=True)
class DataConfig:
    """Where the raw inputs live. dvc.yaml interpolates these into stage commands and deps;
    the code receives them as command-line arguments. Point them at a real dataset to use it."""

    video_dir: str = knob("data/videos", "folder holding the video files")
    image_dir: str = knob("data/images", "folder holding the image files")
    video_captions: str = knob("data/annotations/msrvtt.json", "video caption JSON ('' for none)")
    video_captions_format: str = knob(
        "msrvtt", "schema of video_captions", choices=("msrvtt", "msvd")
    )
    activity_dir: str = knob(
        "data/annotations/ucf101", "folder with UCF101-style classInd.txt and split lists ('' for none)"
    )
    activity_split: int = knob(1, "which UCF101 split list to use (trainlist0N / testlist0N)", low=1, high=3)
    image_captions_dir: str = knob(
        "data/annotations/coco", "folder with COCO captions_*.json files ('' for none)"
    )
    karpathy_split: str = knob("", "optional Karpathy-split JSON (dataset_coco.json) that assigns image splits")
    metadata: str = knob(
        "data/annotations/metadata.json",
        "the synthetic benchmark's per-item ground truth (the small_cnn encoder's targets, the content metrics); "
        "'' for a real dataset",
    )


@dataclass(frozen=True)
class ExtractConfig:
    """Videos and images -> uint8 frame shards (``python -m pipelines.extract``; see seqvision.frames)."""

    sampling: Literal["uniform", "segment", "dense"] = knob(
        "uniform", "frame sampler: evenly spaced, one per segment (TSN), or consecutive (see seqvision.sampling)"
    )
    num_frames: int = knob(16, "frames kept per clip (T); shorter clips repeat their last frame", low=1, high=4096)
    frame_stride: int = knob(2, "gap between consecutive frames for sampling: dense", low=1, high=1024)
    resize: tuple[int, int] = knob((64, 64), "(height, width) of every stored frame and image", low=8, high=4096)
    shard_size: int = knob(512, "videos or images per .npy shard file", low=1, high=1_000_000)
    workers: int = knob(0, "decoding processes; 0 means one per CPU core, 1 decodes in-process", low=0, high=256)
    max_skipped_fraction: float = knob(
        0.05, "fail if more than this fraction of the videos (or images) cannot be decoded", low=0.0, high=1.0
    )
    seed: int = knob(0, "seed for the random train-split draws of segment/dense sampling", low=0)


@dataclass(frozen=True)
class TrainConfig:
    """One training loop for every model (``seqvision.train.fit``); shared by all train@ stages."""

    epochs: int = knob(15, "at most this many passes over the training set (early stopping ends a run sooner)",
                       low=1, high=10_000)
    batch_size: int = knob(64, "examples per optimizer step", low=1, high=65_536)
    weight_decay: float = knob(0.01, "AdamW decoupled weight decay (matrices only)", low=0.0, high=1.0)
    warmup_fraction: float = knob(0.05, "fraction of all steps spent in linear warmup", low=0.0, high=1.0)
    min_lr_ratio: float = knob(0.1, "cosine decay ends at lr * min_lr_ratio", low=0.0, high=1.0)
    clip_grad_norm: float = knob(1.0, "clip the global gradient norm to this value; 0 disables", low=0.0)
    label_smoothing: float = knob(
        0.0, "label smoothing for the training loss (passed to the model)", low=0.0, high=0.99
    )
    scheduled_sampling: float = knob(
        0.0, "captioning: final probability of feeding the model's own token (ramps up linearly from 0)",
        low=0.0, high=1.0,
    )
    patience: int = knob(3, "stop after this many epochs in which neither the validation metric nor the "
                            "validation loss improved; 0 = never", low=0)
    device: str = knob("auto", "auto picks CUDA when present", choices=("auto", "cpu", "cuda"))
    compile: bool = knob(False, "wrap the model in torch.compile")
    deterministic: bool = knob(True, "deterministic kernels (torch.use_deterministic_algorithms, cuDNN)")
    seed: int = knob(0, "seed of the first run; run k uses seed + k (python, numpy, torch, data order)", low=0)
    seeds: int = knob(3, "runs per (task, model), with seeds seed .. seed + seeds - 1; each stage trains them as "
                         "parallel processes (one per CPU core or GPU)", low=1, high=100)
    num_workers: int = knob(0, "DataLoader worker processes", low=0, high=64)
    log_every: int = knob(25, "steps between progress updates and NaN checks (each one syncs the GPU)", low=1)
    finetune_encoder: bool = knob(
        False, "train the encoder stage's encoder end to end with each model (models then consume pixels, not "
        "cached features; meant for GPUs)"
    )


@dataclass(frozen=True)
class RecurrentModelConfig:
    """One recurrent family (models.rnn, models.lstm, models.gru); the cell type is the family name."""

    lr: float = knob(2e-3, "peak AdamW learning rate (reached after warmup); chosen per family by one "
                     "validation sweep (docs/tuning.md)", low=0.0, high=1.0)
    hidden_size: int = knob(128, "hidden units per recurrent layer (encoder and decoder)", low=1, high=16_384)
    num_layers: int = knob(1, "stacked recurrent layers (encoder and decoder each)", low=1, high=16)
    embed_size: int = knob(128, "word embedding size (captioning)", low=1, high=16_384)
    dropout: float = knob(0.2, "dropout on inputs, between layers and before the output layer", low=0.0, high=0.9)
    attention: bool = knob(
        True, "captioning: soft attention over grid cells / encoder outputs (Show, Attend and Tell)"
    )
    tbptt_steps: int = knob(0, "frame encoder: truncate backprop every N time steps; 0 = full BPTT", low=0)


@dataclass(frozen=True)
class TransformerModelConfig:
    """models.transformer: pre-norm encoder(-decoder) with scaled-dot-product attention."""

    lr: float = knob(2e-3, "peak AdamW learning rate (reached after warmup); chosen per family by one "
                     "validation sweep (docs/tuning.md)", low=0.0, high=1.0)
    hidden_size: int = knob(128, "model width d_model (divisible by num_heads, even)", low=2, high=16_384)
    num_layers: int = knob(1, "blocks in the encoder, and again in the decoder", low=1, high=48)
    num_heads: int = knob(4, "attention heads", low=1, high=128)
    ffn_mult: int = knob(4, "feed-forward width = ffn_mult * hidden_size", low=1, high=16)
    dropout: float = knob(0.1, "dropout on embeddings, attention weights and residual branches", low=0.0, high=0.9)
    attention_impl: str = knob(
        "sdpa", "sdpa: fused F.scaled_dot_product_attention (O(N) memory); naive: softmax(QK^T)V with the (N, N) "
        "score matrix (O(N^2) memory; the study compares both)", choices=("sdpa", "naive"))

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.hidden_size % 2:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be even and divisible by num_heads ({self.num_heads})"
            )


@dataclass(frozen=True)
class MeanPoolModelConfig:
    """models.meanpool: the order-blind family (mean feature -> MLP classifier / LSTM decoder)."""

    lr: float = knob(2e-3, "peak AdamW learning rate (reached after warmup); chosen per family by one "
                     "validation sweep (docs/tuning.md)", low=0.0, high=1.0)
    hidden_size: int = knob(128, "classifier MLP width / decoder LSTM width", low=1, high=16_384)
    num_layers: int = knob(1, "classifier hidden layers / decoder LSTM layers", low=1, high=16)
    embed_size: int = knob(128, "word embedding size (captioning)", low=1, high=16_384)
    dropout: float = knob(0.2, "dropout on the pooled feature, embeddings and before the output", low=0.0, high=0.9)


MODEL_FAMILIES = ("rnn", "lstm", "gru", "transformer", "meanpool", "mingru")
TASKS = tuple(_TASK_SPECS)  # the task names, in the order of seqvision.tasks (their one definition)


def check_names(task: str, family: str) -> None:
    """Raise ``ValueError`` naming the allowed values unless ``task`` and ``family`` exist."""
    task_spec(task)
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(MODEL_FAMILIES)}")


def tracked_params(task: str, family: str, *, train_config: TrainConfig, model_config: Any,
                   budget: int | None) -> dict[str, Any]:
    """The params one training depends on, flat (``train.lr``, ``models.lstm.hidden_size``, ...): what its MLflow
    run records and its lineage hash covers."""
    return flatten({"train": to_dict(train_config),
                    "models": {family: to_dict(model_config), "match_params": {task: budget or "off"}}})


@dataclass(frozen=True)
class ParamBudgets:
    """``models.match_params``: one parameter budget per task (the families differ in their fixed costs, e.g. a
    captioner's vocabulary layers, so one number cannot serve all three tasks). A number, not a family name, so a
    training depends only on its own family's section and its task's budget, which is what DVC tracks."""

    activity: int | Literal["off"] = knob(100000, "activity models: parameter budget, or off", low=1)
    image_captioning: int | Literal["off"] = knob(200000, "image captioners: parameter budget, or off", low=1)
    video_captioning: int | Literal["off"] = knob(200000, "video captioners: parameter budget, or off", low=1)

    def budget(self, task: str) -> int | None:
        """The budget of ``task``; None when off."""
        value = getattr(self, task)
        return None if value == "off" else int(value)


@dataclass(frozen=True)
class MinGRUModelConfig:
    """models.mingru: minGRU (Feng et al. 2024), gates that depend on the input only, trained with a parallel scan."""

    lr: float = knob(2e-3, "peak AdamW learning rate (reached after warmup); chosen per family by one "
                     "validation sweep (docs/tuning.md)", low=0.0, high=1.0)
    hidden_size: int = knob(128, "hidden units per minGRU layer (encoder and decoder)", low=1, high=16_384)
    num_layers: int = knob(1, "stacked minGRU layers (encoder and decoder each)", low=1, high=16)
    embed_size: int = knob(128, "word embedding size (captioning)", low=1, high=16_384)
    dropout: float = knob(0.2, "dropout on inputs, between layers and before the output layer", low=0.0, high=0.9)
    attention: bool = knob(True, "captioning: attention over grid cells / encoder outputs, queried by h_t")
    scan: str = knob("parallel", "parallel: chunked prefix scan (mingru.parallel_scan); sequential: the step loop "
                     "(same maths)", choices=("parallel", "sequential"))


@dataclass(frozen=True)
class ModelsConfig:
    """One sub-mapping per family, so DVC retrains only the family whose knobs changed. The lr of each family is
    the one scripts/lr_sweep.py chose on validation (docs/tuning.md); ``--apply`` writes params.yaml, and these
    defaults must repeat it (tests/test_config.py)."""

    rnn: RecurrentModelConfig = knob(RecurrentModelConfig(lr=8e-3), "vanilla (tanh) RNN family")
    lstm: RecurrentModelConfig = knob(RecurrentModelConfig(lr=8e-3), "LSTM family")
    gru: RecurrentModelConfig = knob(RecurrentModelConfig(lr=1.6e-2), "GRU family")
    transformer: TransformerModelConfig = knob(TransformerModelConfig(lr=8e-3), "Transformer family")
    meanpool: MeanPoolModelConfig = knob(MeanPoolModelConfig(lr=1.6e-2), "order-blind mean-pool family")
    mingru: MinGRUModelConfig = knob(MinGRUModelConfig(lr=8e-3), "minGRU family (parallel-scan RNN)")
    match_params: ParamBudgets = knob(
        ParamBudgets(), "per task: resize every family's hidden_size to this many parameters, or off"
    )

    def family(self, name: str) -> RecurrentModelConfig | TransformerModelConfig | MeanPoolModelConfig | MinGRUModelConfig:
        """The ``models.<name>`` section."""
        if name not in MODEL_FAMILIES:
            raise ConfigError(f"unknown model family {name!r}; expected one of {', '.join(MODEL_FAMILIES)}")
        return getattr(self, name)


SMALL_CNN_SLOTS = 8  # colours of the synthetic palette (synth.scene.COLORS), one slot each


@dataclass(frozen=True)
class EncoderConfig:
    """The frame encoder shared by every model (``seqvision.encoders``) and the features it extracts."""

    backbone: str = knob(
        "small_cnn",
        "small_cnn (trained here on the synthetic attributes) or a torchvision model name",
        choices=("small_cnn", "resnet18", "resnet34", "resnet50", "mobilenet_v3_small"),
    )
    weights: str = knob(
        "",
        "torchvision backbones: local file with a state dict ('' = random weights, with a warning); never downloaded",
    )
    feature_dim: int = knob(128, "small_cnn feature width (torchvision backbones keep their own)", low=8, high=4096)
    width: int = knob(16, "small_cnn: channels of the object CNN's first conv (then 2x, 4x)", low=4, high=1024)
    slot_dim: int = knob(
        8, "small_cnn: values per colour slot (8 slots, one per colour; the rest of feature_dim is colour-blind)",
        low=4, high=512,
    )
    grid: int = knob(4, "image features are a grid x grid map of region vectors", low=1, high=16)
    image_size: int = knob(224, "torchvision backbones: frames are resized to this side first", low=32, high=1024)
    epochs: int = knob(4, "small_cnn: epochs of attribute training", low=0, high=1000)
    frames_per_clip: int = knob(
        3, "small_cnn: training frames drawn per train clip (one per equal segment); every train image is used too",
        low=1, high=4096,
    )
    lr: float = knob(3e-3, "small_cnn: peak AdamW learning rate (one-cycle schedule)", low=0.0, high=1.0)
    weight_decay: float = knob(1e-4, "small_cnn: AdamW weight decay", low=0.0, high=1.0)
    batch_size: int = knob(32, "small_cnn: training batch size (frames)", low=1, high=65_536)
    seed: int = knob(0, "small_cnn: initialisation and data-order seed", low=0)

    def __post_init__(self) -> None:
        if self.backbone == "small_cnn" and self.feature_dim <= SMALL_CNN_SLOTS * self.slot_dim:
            raise ConfigError(
                f"small_cnn puts {SMALL_CNN_SLOTS} colour slots of slot_dim values in feature_dim, with room to "
                f"spare: feature_dim ({self.feature_dim}) must exceed {SMALL_CNN_SLOTS} * slot_dim ({self.slot_dim})"
            )


@dataclass(frozen=True)
class TokenizeConfig:
    """Captions -> vocabulary + padded ids (``python -m pipelines.tokenize``). One vocabulary per corpus
    (video, image), built from its training captions only."""

    min_count: int = knob(
        2, "times a word must occur in the training captions to get its own id; rarer words -> <unk>", low=1
    )
    max_size: int | None = knob(
        None, "largest vocabulary, the 4 special tokens included (null: no limit)", low=5, high=10_000_000
    )
    max_length: int = knob(
        32, "words kept per caption, <bos>/<eos> excluded; longer captions are truncated", low=1, high=1024
    )


@dataclass(frozen=True)
class EvaluateConfig:
    """How every captioner decodes (``seqvision.decode``): on the val split to pick its best epoch, and on the test
    split; one decoder for both."""

    beam_size: int = knob(3, "captioning: beams per item; 1 = greedy decoding", low=1, high=64)
    # alpha = 0 keeps beam search a pure maximum-likelihood search (the objective every family is trained
    # for) and adds no knob that would have to be tuned per family; 0.6 is GNMT's value (Wu et al. 2016).
    length_penalty: float = knob(
        0.0, "captioning: GNMT length-penalty exponent alpha, score = logP / ((5+n)/6)^alpha; 0 = none",
        low=0.0, high=5.0,
    )
    max_length: int = knob(30, "captioning: most generated tokens per caption, <eos> included", low=1, high=1024)
    batch_size: int = knob(64, "items per evaluation batch", low=1, high=65_536)


@dataclass(frozen=True)
class ReportConfig:
    """The report (``python -m pipelines.report``): it scores METEOR and writes the tables and verdicts."""

    compute_meteor: str = knob(
        "auto", "METEOR (scored by the report stage, one Java process for every run): auto = when java is on "
        "PATH, else reported as unavailable",
        choices=("auto", "always", "never"),
    )


@dataclass(frozen=True)
class StudySection:
    """The study (``python -m pipelines.study``, docs/study.md): one of its presets and knobs set over it.

    Only the shape is checked here: the knobs are those of ``seqvision.study.presets.StudyConfig``, which lives with
    the study's code (it imports torch, which no other stage's params need). ``seqvision.study.run.study_config``
    validates them, naming ``study.overrides.<knob>``; pipelines/check_params.py calls it before any stage runs.
    """

    preset: str = knob("default", "the study's preset: ci (seconds), default (make study on a 2-core CPU), gpu")
    overrides: dict[str, Any] = knob({}, "StudyConfig knobs set over the preset, e.g. {repeats: 3}")


@dataclass(frozen=True)
class Params:
    """Every section of params.yaml, validated (:func:`load_params`). Stages read it once in ``main`` and pass the
    sections they need down as typed configs."""

    data: DataConfig = knob(DataConfig(), "where the raw inputs live")
    synth: SynthConfig = knob(SynthConfig(), "the synthetic benchmark generator")
    extract: ExtractConfig = knob(ExtractConfig(), "frame extraction")
    tokenize: TokenizeConfig = knob(TokenizeConfig(), "caption tokenization")
    train: TrainConfig = knob(TrainConfig(), "the training loop")
    encoder: EncoderConfig = knob(EncoderConfig(), "the shared frame encoder")
    models: ModelsConfig = knob(ModelsConfig(), "the model families")
    evaluate: EvaluateConfig = knob(EvaluateConfig(), "decoding: picks each captioner's best epoch and its test captions")
    report: ReportConfig = knob(ReportConfig(), "the report")
    study: StudySection = knob(StudySection(), "the seed's table, measured (make study)")


SECTIONS: dict[str, type] = {f.name: f.type if isinstance(f.type, type) else typing.get_type_hints(Params)[f.name]
                             for f in dataclasses.fields(Params)}


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans (``true``/``false`` only). ``dvc exp run -S`` rewrites
    params.yaml with ruamel.yaml (YAML 1.2), which drops the quotes of ``match_params: "off"``; YAML 1.1, PyYAML's
    default, would then read ``off`` as False."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_params(path: str | Path) -> Params:
    """Read and validate every section of a params file; a section absent from the file gets its defaults.

    Raises :class:`ConfigError` naming ``path`` and the dotted key on any problem.
    """
    sections = SECTIONS
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file; copy params.yaml from the repository root")
    try:
        raw = yaml.load(path.read_text(), Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(
            f"{path}: {unknown[0]}: unknown section; allowed sections are {', '.join(sorted(sections))}"
        )
    try:
        return Params(**{name: from_mapping(cls, raw.get(name), where=name) for name, cls in sections.items()})
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


# --------------------------------------------------------------------------------------------------------
# Command lines: every knob of a section becomes a documented flag.


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "") -> None:
    """Add one ``--flag`` per (nested) field of ``cls``; help shows the default and what is allowed."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        dotted = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            add_config_arguments(parser, tp, prefix=f"{dotted}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        allowed = []
        low, high = f.metadata.get("low"), f.metadata.get("high")
        if low is not None and high is not None:
            allowed.append(f"range [{low}, {high}]")
        elif low is not None:
            allowed.append(f">= {low}")
        elif high is not None:
            allowed.append(f"<= {high}")
        if f.metadata.get("choices"):
            allowed.append("one of " + ", ".join(map(str, f.metadata["choices"])))
        if typing.get_origin(tp) is Literal:
            allowed.append("one of " + ", ".join(map(str, typing.get_args(tp))))
        help_text = f"{f.metadata.get('help', '')} (default: {default}{'; ' if allowed else ''}{'; '.join(allowed)})"
        flag = "--" + dotted.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f"cfg:{dotted}", "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is tuple:
            kwargs["nargs"] = "+"
            kwargs["type"] = yaml.safe_load
            kwargs["metavar"] = "V"
        else:
            kwargs["type"] = yaml.safe_load  # "3" -> 3, "0.5" -> 0.5, "abc" -> "abc"; validation follows
            kwargs["metavar"] = "V"
        parser.add_argument(flag, **kwargs)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags a user actually gave, as a nested mapping ready to merge into a section."""
    nested: dict[str, Any] = {}
    for key, value in vars(args).items():
        if not key.startswith("cfg:"):
            continue
        parts = key[4:].split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
