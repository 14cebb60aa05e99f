"""What every model family shares: masks over padded sequences, the activity models' clip centring, teacher
forcing, and the one caption loss. Every family imports these, so all of them train on exactly the same
objective and see padding the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from seqvision.vocab import PAD_ID


@dataclass(frozen=True)
class ModelDims:
    """The sizes a model takes from its data, not from params.yaml (those are the family's ``models:`` section)."""

    feature_dim: int  # D of the visual features
    vocab_size: int = 0  # captioning only
    num_classes: int = 0  # activity only


def length_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) int lengths -> (B, max_len) bool, True at real positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def check_lengths(lengths: Tensor, max_len: int) -> None:
    """Raise a clear error unless lengths is (B,) with every value in [1, max_len]."""
    if lengths.dim() != 1 or bool((lengths < 1).any()) or bool((lengths > max_len).any()):
        raise ValueError(f"lengths must be (B,) in [1, {max_len}], got {lengths.tolist()}")


def masked_mean(x: Tensor, lengths: Tensor) -> Tensor:
    """Mean of x (B, T, D) over its first ``lengths`` (B,) positions -> (B, D). Padding never counts."""
    mask = length_mask(lengths, x.size(1)).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    return (x * mask).sum(1) / lengths.clamp(min=1).unsqueeze(-1).to(x.dtype)


def center_clip(x: Tensor, lengths: Tensor) -> Tensor:
    """Every real frame minus the mean of its clip's real frames; padding stays 0: (B, T, D) -> (B, T, D).

    The input of every order-aware activity model (the order-blind mean-pool one pools the same two parts, see
    ``meanpool.MeanPoolClassifier``). Frame features vary much less within a clip than between clips, so on raw
    features the models memorised each clip's static content (colours, shapes, place) and stayed near chance on
    validation; subtracting the clip mean leaves what changes, which is what the activity classes are about
    (docs/models.md). Order-free, so it favours no family.
    """
    mask = length_mask(lengths, x.size(1)).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    return (x - masked_mean(x, lengths).unsqueeze(1)) * mask


def split_tokens(tokens: Tensor, token_lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher forcing: ``<bos> w1 .. wn <eos> <pad>..`` -> (inputs (B, L-1), targets (B, L-1), input lengths (B,)).

    The inputs are ``tokens[:, :-1]`` and the targets ``tokens[:, 1:]``; an input sequence is one shorter than
    its caption (``<eos>`` is never fed). Without ``token_lengths`` the lengths are the non-pad counts.
    """
    if token_lengths is None:
        token_lengths = (tokens != PAD_ID).sum(1)
    in_lengths = (token_lengths - 1).clamp(min=1, max=tokens.size(1) - 1)
    return tokens[:, :-1], tokens[:, 1:], in_lengths


def caption_loss(logits: Tensor, targets: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of logits (B, L, V) against targets (B, L), averaged over real (non-pad) target tokens.

    Computed in float32 whatever the autocast dtype of ``logits``. Padding is ``<pad>`` in ``targets`` (captions
    are padded after ``<eos>``), so it never counts.
    """
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),  # (B*L, V)
        targets.reshape(-1),  # (B*L,)
        ignore_index=PAD_ID,
        label_smoothing=label_smoothing,
    )
