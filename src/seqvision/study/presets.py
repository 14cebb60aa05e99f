"""The study's settings: one frozen, validated config (params.yaml's ``study:`` section sets it) and its presets.

- ``ci``:      every variant on a three-point ladder with tiny models, two repeats; row 4 on two training fractions,
               one seed, two epochs; row 1 on two distances, 42 clips, two seeds, two epochs: seconds, for tests and
               CI (rows 1 and 4 on the tiny test artifacts and a tiny encoder).
- ``default``: ``make study`` on a 2-core CPU: 27 minutes on a fresh clone of a quiet machine, installation and data
               included (rows 2 and 3 about 3 minutes, row 4's 108 trainings 7, row 1's 78 trainings at equal
               optimizer steps and its clips 13; docs/study.md).
- ``gpu``:     longer sequences, a wider two-layer model, bfloat16 autocast, on CUDA (not run on the development
               machine, which has no GPU).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from seqvision.config import MODEL_FAMILIES, knob
from seqvision.study.variants import VARIANTS, ModelSizes

MAIN_VARIANTS = ("rnn", "lstm", "gru", "transformer", "transformer_naive", "mingru")
LADDER = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)


@dataclass(frozen=True)
class StudyConfig:
    """Every row of the seed's table: 1 (long-range dependencies), 2 (parallelism), 3 (compute and memory vs N),
    4 (inductive bias)."""

    # Row 3: training cost vs N
    variants: tuple[str, ...] = knob(MAIN_VARIANTS, "model variants of the compute/memory row",
                                     choices=tuple(VARIANTS))
    n_values: tuple[int, ...] = knob(LADDER, "sequence lengths N (frames per clip) of the compute/memory ladder")
    fit_min_n: int = knob(256, "fit exponents on the points with N >= this (fixed costs dominate below)", low=1)
    repeats: int = knob(5, "interleaved repeats per cell, each in a fresh process; the median is reported", low=1)
    iterations: int = knob(1, "timed steps per process after the measured first one (their median is one repeat)",
                           low=1, high=100)
    batch_size: int = knob(1, "clips per batch in the compute/memory row", low=1)
    threads: int = knob(1, "torch threads in the compute/memory and streaming cells", low=1, high=256)
    device: str = knob("cpu", "where the compute/memory row runs", choices=("cpu", "cuda"))
    precision: str = knob("float32", "float32, or bfloat16 autocast", choices=("float32", "bfloat16"))
    # Row 3: streaming inference
    stream_n_values: tuple[int, ...] = knob(LADDER, "decoded positions before the measured streaming step")
    stream_steps: int = knob(20, "timed decoding steps per streaming cell (median reported)", low=1)
    # Row 2: parallelism
    parallel_variants: tuple[str, ...] = knob((*MAIN_VARIANTS, "mingru_sequential"),
                                              "model variants of the parallelism row", choices=tuple(VARIANTS))
    parallel_n_values: tuple[int, ...] = knob((256, 1024), "sequence lengths of the threads experiment (batch 1)")
    thread_counts: tuple[int, ...] = knob((1, 2), "torch thread counts compared (training step time)")
    gpu_n_values: tuple[int, ...] = knob((256, 512, 1024, 2048, 4096, 8192, 16384),
                                         "sequence lengths of the GPU experiment (run only where CUDA is present)")
    gpu_tokens: int = knob(65536, "GPU experiment: frames per batch, held fixed (batch = gpu_tokens // N)", low=1)
    gpu_peak_tflops: float = knob(989.0, "dense bfloat16 peak of the GPU for MFU (H100/H200 SXM: 989)", low=0.0)
    # Models (one width for every family)
    feature_dim: int = knob(128, "D of the synthetic frame features", low=1)
    hidden_size: int = knob(128, "hidden units / d_model of every variant", low=2)
    num_layers: int = knob(1, "layers of every variant", low=1, high=48)
    num_heads: int = knob(4, "Transformer attention heads", low=1)
    # Row 4: inductive bias (accuracy vs training-set size; the comparison's training protocol and params.yaml)
    bias_families: tuple[str, ...] = knob(MODEL_FAMILIES, "model families of the inductive-bias row (transformer "
                                          "is the reference every other is compared with)", choices=MODEL_FAMILIES)
    bias_fractions: tuple[float, ...] = knob(FRACTIONS, "fractions of the training split (nested, class-stratified "
                                             "subsets)", low=0.0, high=1.0)
    bias_seeds: int = knob(3, "training seeds per (family, fraction): train.seed + k", low=1, high=100)
    bias_epochs: int = knob(0, "train.epochs for the full training set (0: params.yaml's)", low=0, high=10_000)
    bias_budget: str = knob("steps", "steps: every subset trains for the full set's optimizer steps (epochs and "
                            "patience scaled); epochs: train.epochs and train.patience as they are",
                            choices=("steps", "epochs"))
    bias_target: float = knob(0.9, "samples-to-target: target accuracy = this x the best family's mean at the "
                              "largest size", low=0.0, high=1.0)
    bias_features: str = knob("artifacts/features", "the features stage's folder the inductive-bias row trains on")
    bias_activity_dir: str = knob("", "UCF101-style label lists ('': params.yaml's data.activity_dir)")
    bias_workers: int = knob(0, "trainings at once, one torch thread each (0: one per usable CPU core)", low=0,
                             high=256)
    bias_timeout_s: float = knob(1800.0, "a training's process is stopped after this long (recorded as failed)",
                                 low=1.0)
    # Row 1: long-range dependencies (accuracy vs the distance D the label must be carried; docs/study.md)
    long_distances: tuple[int, ...] = knob((4, 8, 16, 32), "distances D: frames between the labelled event "
                                           "and either end of the clip (clips have 2D + 2*4 + E - 2 frames)")
    long_families: tuple[str, ...] = knob(("rnn", "lstm", "gru", "transformer", "mingru"),
                                          "model families trained at every distance", choices=MODEL_FAMILIES)
    long_control_family: str = knob("lstm", "the family trained on the last-frames and shuffled-frames controls "
                                    "(the bag-of-frames control is meanpool)", choices=MODEL_FAMILIES)
    long_train_clips: int = knob(480, "long-range clips in the train split (rendered once, cropped per distance)",
                                 low=6)
    long_val_clips: int = knob(80, "long-range clips in the val split (early stopping)", low=1)
    long_test_clips: int = knob(120, "long-range clips in the test split", low=1)
    long_seeds: int = knob(3, "training seeds per (family, distance): train.seed + k", low=1, high=100)
    long_epochs: int = knob(0, "train.epochs cap (0: params.yaml's), before long_budget scales it", low=0,
                            high=10_000)
    long_budget: str = knob("steps", "steps: every training gets the comparison's optimizer steps (train.epochs and "
                            "train.patience scaled by synth.videos.train / long_train_clips, as row 4's bias_budget); "
                            "epochs: train.epochs and train.patience as they are", choices=("steps", "epochs"))
    long_length_distance: int = knob(8, "length generalisation: the models trained at this distance (one of "
                                     "long_distances) are also tested on clips 2x and 4x as long", low=0)
    long_encoder: str = knob("artifacts/encoder/encoder.pt", "the frame encoder (the encoder stage's output)")
    long_workers: int = knob(0, "renderers / trainings at once, one torch thread each (0: one per usable CPU "
                             "core)", low=0, high=256)
    long_timeout_s: float = knob(1800.0, "a training's (or a rendering chunk's) process is stopped after this "
                                 "long (recorded as failed)", low=1.0)
    # Running
    cell_timeout_s: float = knob(300.0, "a cell's process is stopped after this long (recorded as failed)", low=1.0)
    tolerance: float = knob(0.25, "an exponent 'agrees' when its interval lies within claim +- tolerance",
                            low=0.0, high=1.0)
    seed: int = knob(0, "seeds the models, inputs, shuffled order and bootstrap", low=0)

    def __post_init__(self) -> None:
        for name in ("variants", "parallel_variants"):
            unknown = [v for v in getattr(self, name) if v not in VARIANTS]
            if unknown:
                raise ValueError(f"{name}: unknown variant {unknown[0]!r}; expected one of {', '.join(VARIANTS)}")
        for name in ("n_values", "stream_n_values", "parallel_n_values", "thread_counts", "gpu_n_values"):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(f"{name}: every value must be >= 1, got {list(getattr(self, name))}")
        if "transformer" not in self.bias_families:
            raise ValueError("bias_families: must include transformer, the reference of the inductive-bias row")
        if not self.bias_fractions or any(not 0.0 < f <= 1.0 for f in self.bias_fractions) or \
                len(set(self.bias_fractions)) != len(self.bias_fractions):
            raise ValueError(f"bias_fractions: distinct values in (0, 1] expected, got {list(self.bias_fractions)}")
        for name in ("n_values", "stream_n_values"):
            if len([n for n in getattr(self, name) if n >= self.fit_min_n]) < 2:
                raise ValueError(f"fit_min_n={self.fit_min_n} leaves fewer than 2 points of {name} to fit")
        if len(self.long_distances) < 2 or len(set(self.long_distances)) != len(self.long_distances) or \
                min(self.long_distances) < 1:
            raise ValueError(f"long_distances: at least two distinct values >= 1 expected, got "
                             f"{list(self.long_distances)}")
        if self.long_length_distance not in self.long_distances:
            raise ValueError(f"long_length_distance ({self.long_length_distance}) must be one of long_distances "
                             f"{list(self.long_distances)}")
        if self.hidden_size % self.num_heads or self.hidden_size % 2:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be even and divisible by num_heads "
                             f"({self.num_heads})")

    @property
    def sizes(self) -> ModelSizes:
        return ModelSizes(feature_dim=self.feature_dim, hidden_size=self.hidden_size, num_layers=self.num_layers,
                          num_heads=self.num_heads)

    def replace(self, **changes: Any) -> StudyConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, StudyConfig] = {
    "ci": StudyConfig(
        n_values=(16, 32, 64), fit_min_n=16, repeats=2, stream_n_values=(16, 32, 64), stream_steps=3,
        parallel_n_values=(32,), gpu_n_values=(64, 128), gpu_tokens=256, feature_dim=16, hidden_size=16,
        num_heads=2, cell_timeout_s=120.0, bias_fractions=(0.5, 1.0), bias_seeds=1, bias_epochs=2,
        bias_timeout_s=120.0, long_distances=(2, 4), long_length_distance=2, long_train_clips=24, long_val_clips=6,
        long_test_clips=12, long_seeds=2, long_epochs=2, long_budget="epochs", long_timeout_s=120.0,
    ),
    "default": StudyConfig(),
    "gpu": StudyConfig(
        n_values=(256, 512, 1024, 2048, 4096, 8192, 16384), fit_min_n=1024, device="cuda", precision="bfloat16",
        batch_size=8, hidden_size=512, num_layers=2, num_heads=8, stream_n_values=(256, 1024, 4096, 16384, 65536),
        gpu_n_values=(256, 512, 1024, 2048, 4096, 8192, 16384, 32768), gpu_tokens=262144,
    ),
}
