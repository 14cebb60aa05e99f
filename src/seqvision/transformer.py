"""Every Transformer model for all three tasks, built from small pre-norm blocks.

- :class:`TransformerActivityClassifier`  many-to-one: encoder over frame features with temporal positions and a
  learned CLS token whose final state is classified (ViT/BERT-style; cf. ViViT, Arnab et al. 2021).
- :class:`TransformerCaptioner`           one-to-many and many-to-many: encoder over the visual tokens (image grid
  cells or frames) -> decoder with causal self-attention and cross-attention (Vaswani et al. 2017).

Attention is ``F.scaled_dot_product_attention`` (fused kernels where available; ``attention_impl="naive"`` instead
materialises softmax(QK^T)V, for the memory study in docs/study.md) with our own masks: a key padding
mask over visual tokens (padded frames are never attended to, in the encoder or in cross-attention) and causal
self-attention in the decoder. Caption padding sits after ``<eos>``, so causality alone hides it from every real
position. We write the blocks ourselves instead of using ``nn.Transformer`` to control masks and the KV cache.

Positions are sinusoidal (no maximum length to configure; clips and captions of any length work). Pre-norm blocks
(Xiong et al. 2020) train stably without warm-up tricks at these sizes.

Decoding state: a KV cache. ``init_state`` returns empty self-attention keys/values, one (B, heads, 0, head_dim)
pair per decoder layer; every ``step`` appends the new token's keys/values, so a step costs O(t), not O(t^2).
The cross-attention keys/values of the memory are recomputed at each step (memory is short: G cells or T frames).
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqvision.blocks import ModelDims, caption_loss, center_clip, check_lengths, length_mask, split_tokens
from seqvision.config import TransformerModelConfig
from seqvision.vocab import PAD_ID

State = tuple[Tensor, ...]  # (k_1, v_1, ..., k_N, v_N), each (B, heads, t, head_dim)

ATTENTION_IMPLS = ("sdpa", "naive")


def sinusoidal_positions(positions: Tensor, dim: int) -> Tensor:
    """positions (L,) int -> (L, dim) float: [sin(p w_i), cos(p w_i)], w_i = 10000^(-i/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) / half)  # (dim/2,)
    angles = positions.float()[:, None] * freqs[None, :]  # (L, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (L, dim)


def attention_weights(q: Tensor, k: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(d)) with ``F.scaled_dot_product_attention``'s masks (True = may attend; causal aligned
    top-left): q (B, h, Lq, D/h), k (B, h, Lk, D/h) -> (B, h, Lq, Lk), rows summing to 1."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, h, Lq, Lk)
    if is_causal:
        future = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).triu(1)  # (Lq, Lk)
        scores = scores.masked_fill(future, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(dim=-1)


def naive_attention(q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                    is_causal: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(d)) v with the (B, h, Lq, Lk) weights materialised: the textbook form whose memory
    grows with Lq * Lk, which fused kernels avoid (Dao et al. 2022). Same arguments and result as
    ``F.scaled_dot_product_attention``."""
    weights = attention_weights(q, k, attn_mask=attn_mask, is_causal=is_causal)  # (B, h, Lq, Lk)
    weights = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return weights @ v  # (B, h, Lq, D/h)


class Attention(nn.Module):
    """Multi-head attention over ``source`` (self-attention when None), with an optional KV cache."""

    def __init__(self, dim: int, num_heads: int, dropout: float, impl: str = "sdpa") -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.attend = F.scaled_dot_product_attention if impl == "sdpa" else naive_attention
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        return x.view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, h, L, D/h)

    def _project(self, x: Tensor, source: Tensor | None, cache: tuple[Tensor, Tensor] | None
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, h, Lq, D/h) and k, v (B, h, Lk', D/h), the cached keys/values first."""
        q = self._heads(self.q(x))  # (B, h, Lq, D/h)
        k, v = self.kv(x if source is None else source).chunk(2, dim=-1)  # each (B, Lk, D)
        k, v = self._heads(k), self._heads(v)  # each (B, h, Lk, D/h)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        return q, k, v

    def weights(self, x: Tensor, source: Tensor | None = None, *, mask: Tensor | None = None,
                is_causal: bool = False, cache: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The attention weights :meth:`forward` applies, from its arguments -> (B, h, Lq, Lk'), rows summing to 1.

        Computed explicitly (the fused kernel never materialises them), so they equal forward's up to rounding;
        dropout is not applied. Same arguments as ``forward``, so a forward hook can call it.
        """
        q, k, _ = self._project(x, source, cache)
        return attention_weights(q, k, attn_mask=mask, is_causal=is_causal)

    def forward(self, x: Tensor, source: Tensor | None = None, *, mask: Tensor | None = None,
                is_causal: bool = False, cache: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, Lq, D); source (B, Lk, D); mask (B, 1, 1, Lk) bool, True = may attend.

        With ``cache`` = (k, v) of earlier positions, the new keys/values are appended (incremental decoding).
        Returns (output (B, Lq, D), (k, v) each (B, h, Lk', D/h)).
        """
        B, L, D = x.shape
        q, k, v = self._project(x, source, cache)
        y = self.attend(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )  # (B, h, Lq, D/h)
        y = y.transpose(1, 2).reshape(B, L, D)  # (B, Lq, D)
        return self.proj(y), (k, v)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU(), nn.Linear(mult * dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class EncoderBlock(nn.Module):
    def __init__(self, config: TransformerModelConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, config.num_heads, config.dropout, config.attention_impl)
        self.ffn = FeedForward(d, config.ffn_mult, config.dropout)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, S, D), mask (B, 1, 1, S) -> (B, S, D)."""
        x = x + self.drop(self.attn(self.ln1(x), mask=mask)[0])
        return x + self.ffn(self.ln2(x))


class DecoderBlock(nn.Module):
    def __init__(self, config: TransformerModelConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = Attention(d, config.num_heads, config.dropout, config.attention_impl)
        self.cross_attn = Attention(d, config.num_heads, config.dropout, config.attention_impl)
        self.ffn = FeedForward(d, config.ffn_mult, config.dropout)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, memory: Tensor, memory_mask: Tensor,
                cache: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, L, D), memory (B, S, D), memory_mask (B, 1, 1, S) -> (B, L, D), self-attention (k, v).

        Without a cache the self-attention is causal over x; with one, x is the newest position only and may
        see every cached (earlier) position, which is the same thing.
        """
        y, kv = self.self_attn(self.ln1(x), is_causal=cache is None, cache=cache)
        x = x + self.drop(y)
        x = x + self.drop(self.cross_attn(self.ln2(x), memory, mask=memory_mask)[0])
        return x + self.ffn(self.ln3(x)), kv


def _init_weights(module: nn.Module) -> None:
    # GPT-2 initialisation (Radford et al. 2019): small normal weights, zero biases.
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class VisualEncoder(nn.Module):
    """Visual tokens (frames or grid cells) -> contextualised tokens, padding masked out."""

    def __init__(self, config: TransformerModelConfig, feature_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(feature_dim, config.hidden_size)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_layers))
        self.ln = nn.LayerNorm(config.hidden_size)

    def forward(self, visual: Tensor, lengths: Tensor, *, cls: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """visual (B, S, F), lengths (B,) -> (tokens (B, S', D), mask (B, S') bool); S' = S + 1 with ``cls``."""
        B, S, _ = visual.shape
        check_lengths(lengths, S)
        x = self.proj(visual) + sinusoidal_positions(torch.arange(S, device=visual.device), self.proj.out_features)
        mask = length_mask(lengths, S)  # (B, S)
        if cls is not None:
            x = torch.cat([cls.expand(B, 1, -1), x], dim=1)  # (B, 1 + S, D); the CLS token has no position
            mask = torch.cat([mask.new_ones(B, 1), mask], dim=1)  # (B, 1 + S)
        x = self.drop(x)
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, S'): keys only; padded queries are ignored downstream
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.ln(x), mask


class TransformerActivityClassifier(nn.Module):
    """Encoder over clip-centred frame features (``blocks.center_clip``) with temporal positions; the CLS token's
    final state is classified."""

    def __init__(self, config: TransformerModelConfig, dims: ModelDims) -> None:
        super().__init__()
        if dims.num_classes < 1:
            raise ValueError("activity models need num_classes >= 1")
        self.config, self.dims = config, dims
        self.encoder = VisualEncoder(config, dims.feature_dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.head = nn.Linear(config.hidden_size, dims.num_classes)
        self.apply(_init_weights)
        nn.init.normal_(self.cls, std=0.02)

    def forward(self, visual: Tensor, lengths: Tensor, labels: Tensor | None = None, *,
                label_smoothing: float = 0.0) -> tuple[Tensor, Tensor | None]:
        """visual (B, T, D), lengths (B,), labels (B,) -> (logits (B, C), loss or None)."""
        x, _ = self.encoder(center_clip(visual, lengths), lengths, cls=self.cls)  # (B, 1 + T, D)
        logits = self.head(x[:, 0])  # (B, C)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing) if labels is not None else None
        return logits, loss


class TransformerCaptioner(nn.Module):
    """Encoder-decoder captioner for images (grid cells as tokens) and videos (frames as tokens).

    memory: ``(tokens (B, S, D), mask (B, S) bool)``; state: the decoder's KV cache (see the module docstring).
    """

    def __init__(self, config: TransformerModelConfig, dims: ModelDims) -> None:
        super().__init__()
        if dims.vocab_size < 4:
            raise ValueError("captioning models need vocab_size >= 4 (pad, bos, eos, unk)")
        self.config, self.dims = config, dims
        d = config.hidden_size
        self.encoder = VisualEncoder(config, dims.feature_dim)
        self.embed = nn.Embedding(dims.vocab_size, d, padding_idx=PAD_ID)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.num_layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, dims.vocab_size)
        self.apply(_init_weights)
        # GPT-2's std 0.02 suits unit-scale token embeddings; the frame features are not (std ~3 per dimension on
        # the default data), and with 0.02 the visual tokens start small next to the positional code, so within
        # the 5-epoch budget the decoder barely used the image (val CIDEr-D 0.58 image / 0.68 video). With 0.3:
        # 1.22 / 0.83, measured 2026-11-25 on the default data.
        nn.init.normal_(self.encoder.proj.weight, std=0.3)

    def _embed(self, tokens: Tensor, start: int) -> Tensor:
        """tokens (B, L) at positions start.. -> (B, L, D)."""
        positions = torch.arange(start, start + tokens.size(1), device=tokens.device)
        return self.drop(self.embed(tokens) + sinusoidal_positions(positions, self.config.hidden_size))

    def encode(self, visual: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder(visual, lengths)

    def init_state(self, memory: tuple[Tensor, ...]) -> State:
        B = memory[0].size(0)
        c = self.config
        empty = memory[0].new_zeros(B, c.num_heads, 0, c.hidden_size // c.num_heads)  # (B, h, 0, D/h)
        return (empty,) * (2 * c.num_layers)

    def forward(self, visual: Tensor, lengths: Tensor, tokens: Tensor | None = None,
                token_lengths: Tensor | None = None, *, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
        """visual (B, S, F), lengths (B,), tokens (B, L) -> (logits (B, L-1, V), mean loss over real tokens)."""
        if tokens is None:
            raise ValueError("captioners need tokens for teacher forcing; decode with encode/init_state/step")
        inputs, targets, _ = split_tokens(tokens, token_lengths)
        memory, mask = self.encode(visual, lengths)
        memory_mask = mask[:, None, None, :]  # (B, 1, 1, S)
        x = self._embed(inputs, 0)  # (B, L-1, D)
        for block in self.blocks:
            x, _ = block(x, memory, memory_mask)
        logits = self.head(self.ln(x))  # (B, L-1, V)
        return logits, caption_loss(logits, targets, label_smoothing=label_smoothing)

    def step(self, prev_tokens: Tensor, state: State, memory: tuple[Tensor, ...]) -> tuple[Tensor, State]:
        """prev_tokens (B,) -> (logits (B, V), state with this position's keys/values appended)."""
        memory_tokens, mask = memory
        x = self._embed(prev_tokens.unsqueeze(1), start=state[0].size(2))  # (B, 1, D)
        new_state: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            x, (k, v) = block(x, memory_tokens, mask[:, None, None, :], cache=(state[2 * i], state[2 * i + 1]))
            new_state += [k, v]
        return self.head(self.ln(x[:, 0])), tuple(new_state)  # (B, V)
