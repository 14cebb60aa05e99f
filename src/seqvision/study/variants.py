"""The study's model variants and their one width, without torch (``check_params`` and the presets import them).

Variants are the families of the comparison plus the two implementation choices the study is about: the
Transformer with naive attention (``transformer_naive``) and minGRU run as a loop (``mingru_sequential``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# variant -> (family, knobs that differ from the family's defaults)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "rnn": ("rnn", {}),
    "lstm": ("lstm", {}),
    "gru": ("gru", {}),
    "transformer": ("transformer", {"attention_impl": "sdpa"}),
    "transformer_naive": ("transformer", {"attention_impl": "naive"}),
    "mingru": ("mingru", {"scan": "parallel"}),
    "mingru_sequential": ("mingru", {"scan": "sequential"}),
}


@dataclass(frozen=True)
class ModelSizes:
    """One width for every family (the study is about how cost scales with N, not about the constants)."""

    feature_dim: int = 128
    hidden_size: int = 128
    num_layers: int = 1
    num_heads: int = 4
    ffn_mult: int = 4
    embed_size: int = 128
    num_classes: int = 12
    vocab_size: int = 100
    dropout: float = 0.0  # no dropout: it adds masks (an N x N one in naive attention) that are not the architecture


def family_of(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown study variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return VARIANTS[variant][0]
