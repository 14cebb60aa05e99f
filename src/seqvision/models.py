"""Build any model by (task, family); rebuild one from its checkpoint; size families to one parameter budget.

Tasks: ``activity`` (many-to-one), ``image_captioning`` (one-to-many), ``video_captioning`` (many-to-many).
Families: ``rnn``, ``lstm``, ``gru`` (:mod:`seqvision.rnn`), ``transformer`` (:mod:`seqvision.transformer`) and
``meanpool`` (:mod:`seqvision.baselines`). See ``docs/models.md`` for the architectures.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from seqvision.baselines import MeanPoolCaptioner, MeanPoolClassifier, MeanPoolConfig
from seqvision.encoders import PixelFeatures, encoder_from_checkpoint, encoder_state
from seqvision.rnn import RNNActivityClassifier, RNNConfig, RNNImageCaptioner, RNNVideoCaptioner
from seqvision.transformer import TransformerActivityClassifier, TransformerCaptioner, TransformerConfig

TASKS = ("activity", "image_captioning", "video_captioning")
CAPTIONING_TASKS = ("image_captioning", "video_captioning")

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
}

# family -> the model config dataclass stored in checkpoints
MODEL_CONFIGS: dict[str, type] = {
    "rnn": RNNConfig,
    "lstm": RNNConfig,
    "gru": RNNConfig,
    "transformer": TransformerConfig,
    "meanpool": MeanPoolConfig,
}


def _knobs(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a dataclass, a mapping or None, got {type(config).__name__}")


def build_model(
    task: str,
    family: str,
    config: Any = None,
    *,
    feature_dim: int,
    vocab_size: int | None = None,
    num_classes: int | None = None,
    tbptt_steps: int = 0,
) -> nn.Module:
    """A fresh model for ``task`` from ``family``.

    ``config`` is the family's ``params.yaml`` section (``config.ModelsConfig.<family>``), a mapping of the same
    knobs, or None for the defaults. ``feature_dim`` is D of the visual features; captioning needs ``vocab_size``,
    activity ``num_classes``. ``tbptt_steps`` (recurrent families only; others ignore it) truncates backprop in
    frame encoders. The returned model carries its frozen config as ``model.config``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if family not in MODELS:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(MODELS)}")
    if task == "activity" and not num_classes:
        raise ValueError("activity models need num_classes")
    if task in CAPTIONING_TASKS and not vocab_size:
        raise ValueError("captioning models need vocab_size")
    knobs = _knobs(config)
    knobs.update(feature_dim=feature_dim, vocab_size=vocab_size or 0, num_classes=num_classes or 0)
    if MODEL_CONFIGS[family] is RNNConfig:
        knobs.update(cell=family, tbptt_steps=tbptt_steps)
    return MODELS[family][task](MODEL_CONFIGS[family](**knobs))


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class PixelModel(nn.Module):
    """A model with the frame encoder in front (``encoder.finetune_encoder``): uint8 pixels in, not features.

    Same contract as the wrapped model (forward, and for captioners encode / init_state / step); ``visual`` is
    (B, T, H, W, 3) uint8 for clips or (B, H, W, 3) for images. The encoder trains with the model.
    """

    def __init__(self, encoder: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.pixels = PixelFeatures(encoder)
        self.model = model
        self.config = model.config

    def forward(self, visual: torch.Tensor, lengths: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        features, lengths = self.pixels(visual, lengths)
        return self.model(features, lengths, *args, **kwargs)

    def encode(self, visual: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.encode(*self.pixels(visual, lengths))

    def init_state(self, memory: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return self.model.init_state(memory)

    def step(self, prev_tokens: torch.Tensor, state: Any, memory: Any) -> Any:
        return self.model.step(prev_tokens, state, memory)

    def checkpoint_metadata(self) -> dict[str, Any]:
        """Added to every checkpoint ``train.fit`` writes, so that :func:`build_from_checkpoint` rebuilds the pair:
        the encoder's config (its weights in the checkpoint's ``model`` state dict are the fine-tuned ones)."""
        return {"encoder": encoder_state(self.pixels.encoder)}


def checkpoint_state(model: nn.Module, *, task: str, family: str) -> dict[str, Any]:
    """The part of a checkpoint that rebuilds the model: {"task", "family", "config", "model"} (+ "encoder" for a
    :class:`PixelModel`, holding the encoder's own config and weights).

    Callers add their own keys (optimizer state, epoch, metrics) to the returned dict before saving.
    """
    inner = model.model if isinstance(model, PixelModel) else model
    state = {
        "task": task,
        "family": family,
        "config": dataclasses.asdict(inner.config),  # type: ignore[arg-type]
        "model": inner.state_dict(),
    }
    if isinstance(model, PixelModel):
        state["encoder"] = encoder_state(model.pixels.encoder)
    return state


def build_from_checkpoint(checkpoint: Mapping[str, Any], *, load_weights: bool = True) -> nn.Module:
    """Rebuild a model from a checkpoint dict alone (``checkpoint_state`` layout), weights loaded strictly."""
    task, family = checkpoint["task"], checkpoint["family"]
    config = MODEL_CONFIGS[family](**checkpoint["config"])
    model = MODELS[family][task](config)
    if "encoder" not in checkpoint:
        if load_weights:
            model.load_state_dict(checkpoint["model"])
        return model
    pixel_model = PixelModel(encoder_from_checkpoint(checkpoint["encoder"]), model)
    if load_weights:
        state = checkpoint["model"]
        if any(key.startswith("pixels.") for key in state):  # train.fit saves the whole PixelModel (fine-tuned encoder)
            pixel_model.load_state_dict(state)
        else:  # checkpoint_state: the inner model; the encoder's weights are in "encoder"
            model.load_state_dict(state)
    return pixel_model


# --------------------------------------------------------------------------------------------------------
# Parameter budgets


def _count(task: str, family: str, knobs: Mapping[str, Any], dims: Mapping[str, Any]) -> int:
    # Built on the meta device: no memory is allocated, so even very wide candidates cost microseconds.
    with torch.device("meta"):
        return count_parameters(build_model(task, family, knobs, **dims))


def match_params(
    task: str,
    configs: Mapping[str, Any],
    target: int | str,
    *,
    feature_dim: int,
    vocab_size: int | None = None,
    num_classes: int | None = None,
    tolerance: float = 0.1,
    max_hidden: int = 8192,
) -> dict[str, Any]:
    """Resize each family's ``hidden_size`` so its parameter count for ``task`` is as close as possible to a budget.

    ``configs`` maps family -> its params section (dataclass or mapping). ``target`` is a parameter count or a
    family name whose own count (at its configured size) is the budget; that family is returned unchanged.
    Everything but ``hidden_size`` stays as configured; the Transformer's width stays divisible by its heads.
    Returns family -> config of the same type with the new ``hidden_size``. Warns when the closest size is
    still off by more than ``tolerance`` (relative), e.g. when the budget is below a family's fixed costs.
    """
    dims = {"feature_dim": feature_dim, "vocab_size": vocab_size, "num_classes": num_classes}
    if isinstance(target, str):
        if target not in configs:
            raise ValueError(f"match_params target {target!r} is not one of the families {', '.join(configs)}")
        budget = _count(task, target, _knobs(configs[target]), dims)
    else:
        budget = int(target)

    matched: dict[str, Any] = {}
    for family, config in configs.items():
        if family == target:
            matched[family] = config
            continue
        knobs = _knobs(config)
        step = 1
        if family == "transformer":
            heads = knobs.get("num_heads", TransformerConfig.num_heads)
            step = heads if heads % 2 == 0 else 2 * heads  # even and divisible by num_heads
        # The count grows monotonically with hidden_size: binary search over multiples of ``step``.
        lo, hi = 1, max(1, max_hidden // step)
        while lo < hi:
            mid = (lo + hi) // 2
            if _count(task, family, {**knobs, "hidden_size": mid * step}, dims) < budget:
                lo = mid + 1
            else:
                hi = mid
        counts = {m: _count(task, family, {**knobs, "hidden_size": m * step}, dims) for m in (lo - 1, lo) if m >= 1}
        best = min(counts, key=lambda m: abs(counts[m] - budget))  # the closer of the two sizes around the budget
        count = counts[best]
        if abs(count - budget) > tolerance * budget:
            warnings.warn(
                f"match_params: {family} for {task} gets {count:,} parameters at hidden_size={best * step}, "
                f"more than {tolerance:.0%} away from the budget of {budget:,}",
                stacklevel=2,
            )
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            matched[family] = dataclasses.replace(config, hidden_size=best * step)
        else:
            matched[family] = {**knobs, "hidden_size": best * step}
    return matched
