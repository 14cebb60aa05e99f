"""Build any model by (task, family); rebuild one from its checkpoint; size a family to a parameter budget.

Tasks: ``activity`` (many-to-one), ``image_captioning`` (one-to-many), ``video_captioning`` (many-to-many).
Families: ``rnn``, ``lstm``, ``gru`` (:mod:`seqvision.rnn`), ``transformer`` (:mod:`seqvision.transformer`) and
the order-blind ``meanpool`` (:mod:`seqvision.meanpool`) and ``mingru`` (:mod:`seqvision.mingru`, an RNN trained by
parallel scan). See ``docs/models.md`` for the architectures.

A model is fully described by its *spec*, ``{"task", "family", "dims", "config"}`` (+ ``"encoder"`` when a frame
encoder is fine-tuned in front of it): the family's ``models:`` section as trained, and the data's sizes. Every
checkpoint stores the spec once (nanoGPT-style), so :func:`build_from_checkpoint` rebuilds the model from the
checkpoint alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from seqvision.blocks import ModelDims
from seqvision.config import (
    MODEL_FAMILIES,
    MeanPoolModelConfig,
    MinGRUModelConfig,
    RecurrentModelConfig,
    TransformerModelConfig,
    check_names,
)
from seqvision.encoders import PixelFeatures, encoder_from_checkpoint, encoder_state
from seqvision.meanpool import MeanPoolCaptioner, MeanPoolClassifier
from seqvision.mingru import MINGRU_MODELS
from seqvision.rnn import RNNActivityClassifier, RNNImageCaptioner, RNNVideoCaptioner
from seqvision.transformer import TransformerActivityClassifier, TransformerCaptioner

CAPTIONING_TASKS = ("image_captioning", "video_captioning")
RECURRENT_FAMILIES = ("rnn", "lstm", "gru")

_RECURRENT = {
    "activity": RNNActivityClassifier,
    "image_captioning": RNNImageCaptioner,
    "video_captioning": RNNVideoCaptioner,
}

# family -> task -> model class
MODELS: dict[str, dict[str, type[nn.Module]]] = {
    "rnn": _RECURRENT,
    "lstm": _RECURRENT,
    "gru": _RECURRENT,
    "transformer": {
        "activity": TransformerActivityClassifier,
        "image_captioning": TransformerCaptioner,
        "video_captioning": TransformerCaptioner,
    },
    "meanpool": {
        "activity": MeanPoolClassifier,
        "image_captioning": MeanPoolCaptioner,
        "video_captioning": MeanPoolCaptioner,
    },
    "mingru": MINGRU_MODELS,
}
assert tuple(MODELS) == MODEL_FAMILIES

# family -> its params.yaml section (``models.<family>``), the one definition of its knobs and defaults
SECTIONS: dict[str, type] = {
    "rnn": RecurrentModelConfig,
    "lstm": RecurrentModelConfig,
    "gru": RecurrentModelConfig,
    "transformer": TransformerModelConfig,
    "meanpool": MeanPoolModelConfig,
    "mingru": MinGRUModelConfig,
}


def family_config(family: str, config: Any = None) -> Any:
    """The family's section as its config dataclass, from a dataclass, a mapping of its knobs, or None (defaults)."""
    cls = SECTIONS[family]
    if config is None:
        return cls()
    if isinstance(config, cls):
        return config
    if isinstance(config, Mapping):
        return cls(**config)
    raise TypeError(f"config of {family} must be a {cls.__name__}, a mapping or None, got {type(config).__name__}")


def build_model(task: str, family: str, config: Any = None, *, dims: ModelDims) -> nn.Module:
    """A fresh model for ``task`` from ``family``.

    ``config`` is the family's ``models:`` section (see :func:`family_config`); ``dims`` the data's sizes:
    captioning needs ``vocab_size``, activity ``num_classes``. The model keeps both as ``model.config`` and
    ``model.dims``.
    """
    check_names(task, family)
    if task == "activity" and not dims.num_classes:
        raise ValueError("activity models need num_classes")
    if task in CAPTIONING_TASKS and not dims.vocab_size:
        raise ValueError("captioning models need vocab_size")
    config = family_config(family, config)
    cls = MODELS[family][task]
    if family in RECURRENT_FAMILIES:
        return cls(config, dims, cell=family)
    return cls(config, dims)


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class PixelModel(nn.Module):
    """A model with the frame encoder in front (``train.finetune_encoder``): uint8 pixels in, not features.

    Same contract as the wrapped model (forward, and for captioners encode / init_state / step); ``visual`` is
    (B, T, H, W, 3) uint8 for clips or (B, H, W, 3) for images. The encoder trains with the model.
    """

    def __init__(self, encoder: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.pixels = PixelFeatures(encoder)
        self.model = model
        self.config, self.dims = model.config, model.dims

    def forward(self, visual: torch.Tensor, lengths: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        features, lengths = self.pixels(visual, lengths)
        return self.model(features, lengths, *args, **kwargs)

    def encode(self, visual: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.encode(*self.pixels(visual, lengths))

    def init_state(self, memory: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return self.model.init_state(memory)

    def step(self, prev_tokens: torch.Tensor, state: Any, memory: Any) -> Any:
        return self.model.step(prev_tokens, state, memory)


_ENCODER_PREFIX = "pixels.encoder."


def model_spec(model: nn.Module, *, task: str, family: str) -> dict[str, Any]:
    """What rebuilds ``model`` (stored once in every checkpoint): task, family, dims and config as plain data, plus
    the encoder's backbone and config for a :class:`PixelModel` (its fine-tuned weights are in the state dict)."""
    spec = {"task": task, "family": family, "dims": dataclasses.asdict(model.dims),
            "config": dataclasses.asdict(model.config)}
    if isinstance(model, PixelModel):
        state = encoder_state(model.pixels.encoder)
        spec["encoder"] = {"backbone": state["backbone"], "config": state["config"]}
    return spec


def build_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """A model with fresh weights from :func:`model_spec` output (a :class:`PixelModel` when it has an encoder)."""
    model = build_model(spec["task"], spec["family"], spec["config"], dims=ModelDims(**spec["dims"]))
    if "encoder" in spec:
        skeleton = {**spec["encoder"], "model": None}
        model = PixelModel(encoder_from_checkpoint(skeleton), model)
    return model


def build_from_checkpoint(checkpoint: Mapping[str, Any], *, load_weights: bool = True) -> nn.Module:
    """Rebuild a model from a checkpoint dict alone (``checkpoint["spec"]``), weights loaded strictly."""
    model = build_from_spec(checkpoint["spec"])
    if load_weights:
        model.load_state_dict(checkpoint["model"])
    return model


# --------------------------------------------------------------------------------------------------------
# Parameter budgets


def _count(task: str, family: str, config: Any, dims: ModelDims) -> int:
    # Built on the meta device: no memory is allocated, so even very wide candidates cost microseconds (but the
    # first build imports torch._dynamo through the meta initialisers: ~4 s per process; see _quadratic_count).
    with torch.device("meta"):
        return count_parameters(build_model(task, family, config, dims=dims))


def _quadratic_count(task: str, family: str, config: Any, dims: ModelDims, step: int) -> Callable[[int], int] | None:
    """The parameter count as an exact function of ``hidden_size``, or None.

    Every family's count is a quadratic in ``hidden_size`` (recurrent and attention weights h x h, projections
    h x fixed, biases and norms h), so three tiny models built on the CPU (milliseconds, and no torch._dynamo
    import as on the meta device) give its coefficients. Two more sizes check it; a family whose count is not
    quadratic gets None (the caller then searches with :func:`_count`)."""
    def real(hidden: int) -> int:
        with torch.random.fork_rng(devices=[]):  # the initialisers must not move the caller's random stream
            return count_parameters(build_model(task, family, dataclasses.replace(config, hidden_size=hidden),
                                                dims=dims))

    h1, h2, h3 = step, 2 * step, 3 * step
    c1, c2, c3 = real(h1), real(h2), real(h3)
    a = Fraction(c1 - 2 * c2 + c3, 2 * step * step)
    b = Fraction(c2 - c1, step) - a * (h1 + h2)
    c = c1 - a * h1 * h1 - b * h1

    def count(hidden: int) -> int:
        value = a * hidden * hidden + b * hidden + c
        return int(value)

    if any(count(h) != real(h) for h in (4 * step, 7 * step)):
        return None
    return count


def fit_to_budget(task: str, family: str, config: Any, budget: int, *, dims: ModelDims,
                  max_hidden: int = 8192) -> tuple[Any, int]:
    """``config`` with ``hidden_size`` chosen so the family's parameter count for ``task`` is as close as possible
    to ``budget``; returns (config, its parameter count). Everything but ``hidden_size`` stays as configured; the
    Transformer's width stays even and divisible by its heads. The count is not guaranteed to land within any
    tolerance (a budget below a family's fixed costs cannot be met): callers check and report it."""
    config = family_config(family, config)
    step = 1
    if family == "transformer":
        heads = config.num_heads
        step = heads if heads % 2 == 0 else 2 * heads  # even and divisible by num_heads
    exact = _quadratic_count(task, family, config, dims, step)

    def count(hidden: int) -> int:
        if exact is not None:
            return exact(hidden)
        return _count(task, family, dataclasses.replace(config, hidden_size=hidden), dims)

    # The count grows monotonically with hidden_size: binary search over multiples of ``step``.
    lo, hi = 1, max(1, max_hidden // step)
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid * step) < budget:
            lo = mid + 1
        else:
            hi = mid
    counts = {m: count(m * step) for m in (lo - 1, lo) if m >= 1}
    best = min(counts, key=lambda m: abs(counts[m] - budget))  # the closer of the two sizes around the budget
    return dataclasses.replace(config, hidden_size=best * step), counts[best]
