"""The order-blind mean-pool family, for all three tasks.

Each averages the visual features over the real frames (or grid cells) first, so shuffling the frames cannot
change its output. Whatever a sequence model gains over these comes from order and timing.

- :class:`MeanPoolClassifier`  activity: mean frame feature -> MLP (TSN-style average consensus, Wang et al. 2016).
- :class:`MeanPoolCaptioner`   image and video captioning: mean feature -> LSTM decoder without attention; the mean
  initialises the state and is fed with every word (Mean-Pool, Venugopalan et al. 2015; for images the FC /
  Show-and-Tell baseline, Vinyals et al. 2015).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqvision.blocks import ModelDims, caption_loss, check_lengths, masked_mean, split_tokens
from seqvision.config import MeanPoolModelConfig
from seqvision.rnn import InitState, RecurrentDecoder, State


class MeanPoolClassifier(nn.Module):
    """Order-blind clip statistics -> ``num_layers`` ReLU layers of ``hidden_size`` -> linear (TSN-style).

    The statistics are the mean of the real frames and their mean absolute deviation from it (how much, not in
    which order, each feature changes: the part the sequence models get from ``rnn.center_clip``), standardised
    per dimension by a BatchNorm layer. The mean alone stayed near chance on the default data (val top-1 ~0.13 at
    5 epochs); [mean, deviation] standardised reached 0.31-0.36 (docs/models.md). Both ignore frame order, so the
    reversed pairs (grow/shrink, ...) stay indistinguishable, as they must for this family.
    """

    def __init__(self, config: MeanPoolModelConfig, dims: ModelDims) -> None:
        super().__init__()
        if dims.num_classes < 1:
            raise ValueError("activity models need num_classes >= 1")
        self.config, self.dims = config, dims
        self.norm = nn.BatchNorm1d(2 * dims.feature_dim)
        layers: list[nn.Module] = [nn.Dropout(config.dropout)]
        width = 2 * dims.feature_dim
        for _ in range(config.num_layers):
            layers += [nn.Linear(width, config.hidden_size), nn.ReLU(), nn.Dropout(config.dropout)]
            width = config.hidden_size
        layers.append(nn.Linear(width, dims.num_classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, visual: Tensor, lengths: Tensor, labels: Tensor | None = None, *,
                label_smoothing: float = 0.0) -> tuple[Tensor, Tensor | None]:
        """visual (B, T, D), lengths (B,), labels (B,) -> (logits (B, C), loss or None)."""
        check_lengths(lengths, visual.size(1))
        mean = masked_mean(visual, lengths)  # (B, D)
        deviation = masked_mean((visual - mean.unsqueeze(1)).abs(), lengths)  # (B, D)
        stats = torch.cat([mean, deviation], dim=-1)  # (B, 2D)
        if self.training and stats.size(0) == 1:  # batch statistics need two items: use the running ones
            norm = self.norm
            stats = F.batch_norm(stats, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0,
                                 norm.eps)
        else:
            stats = self.norm(stats)
        logits = self.mlp(stats)  # (B, 2D) -> (B, C)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing) if labels is not None else None
        return logits, loss


class MeanPoolCaptioner(nn.Module):
    """Mean feature -> LSTM decoder (no attention). Same class for images (grid cells) and videos (frames).

    memory: ``(mean (B, D),)``; state: ``(h, c)``, each (B, num_layers, H).
    """

    def __init__(self, config: MeanPoolModelConfig, dims: ModelDims) -> None:
        super().__init__()
        if dims.vocab_size < 4:
            raise ValueError("captioning models need vocab_size >= 4 (pad, bos, eos, unk)")
        self.config, self.dims = config, dims
        self.drop = nn.Dropout(config.dropout)
        self.init = InitState("lstm", dims.feature_dim, config.hidden_size, config.num_layers)
        self.decoder = RecurrentDecoder(
            cell="lstm", vocab_size=dims.vocab_size, embed_size=config.embed_size,
            hidden_size=config.hidden_size, num_layers=config.num_layers, dropout=config.dropout,
            context="fixed", context_size=dims.feature_dim,
        )

    def encode(self, visual: Tensor, lengths: Tensor) -> tuple[Tensor, ...]:
        check_lengths(lengths, visual.size(1))
        return (self.drop(masked_mean(visual, lengths)),)  # (B, D)

    def init_state(self, memory: tuple[Tensor, ...]) -> State:
        return self.init(memory[0])

    def forward(self, visual: Tensor, lengths: Tensor, tokens: Tensor | None = None,
                token_lengths: Tensor | None = None, *, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
        """visual (B, S, D), lengths (B,), tokens (B, L) -> (logits (B, L-1, V), mean loss over real tokens)."""
        if tokens is None:
            raise ValueError("captioners need tokens for teacher forcing; decode with encode/init_state/step")
        inputs, targets, in_lengths = split_tokens(tokens, token_lengths)
        memory = self.encode(visual, lengths)
        logits = self.decoder(inputs, in_lengths, self.init_state(memory), memory)  # (B, L-1, V)
        return logits, caption_loss(logits, targets, label_smoothing=label_smoothing)

    def step(self, prev_tokens: Tensor, state: State, memory: tuple[Tensor, ...]) -> tuple[Tensor, State]:
        """prev_tokens (B,) -> (logits (B, V), state)."""
        return self.decoder.step(prev_tokens, state, memory)
