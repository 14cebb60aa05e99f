"""Attention maps of the captioners: where each generated word looked, for figures and notebooks.

:func:`caption_attention` replays a caption through the decoding contract of :mod:`seqvision.decode` (``encode``,
``init_state``, then one ``step`` per word, fed the previous word: teacher forcing on the given caption) and
records, at every step, the weights of the attention the prediction used:

- rnn / lstm / gru and minGRU with ``attention: true``: the decoder's soft attention over the image grid cells or
  the encoder outputs of the frames (``AdditiveAttention``, Xu et al. 2015; minGRU's ``DotAttention``);
- transformer: the cross-attention of the *last* decoder layer, averaged over heads. The last layer is the one
  whose output the word is predicted from; earlier layers only shape its query. Averaging the heads gives one
  map per word (per-head maps are often specialised and harder to read; Voita et al. 2019).

The weights come from the attention modules themselves: a forward hook calls the module's ``weights`` method
with the arguments its ``forward`` got (the one definition of its softmax), so nothing in the model changes and
training and decoding run no extra code. Families without attention (meanpool; rnn-family or minGRU with
``attention: false``) give None.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from seqvision.mingru import MinGRUImageCaptioner, MinGRUVideoCaptioner
from seqvision.models import PixelModel
from seqvision.rnn import RNNImageCaptioner, RNNVideoCaptioner
from seqvision.transformer import TransformerCaptioner
from seqvision.vocab import BOS_ID, PAD_ID

_RECURRENT_CAPTIONERS = (RNNImageCaptioner, RNNVideoCaptioner, MinGRUImageCaptioner, MinGRUVideoCaptioner)


class CaptionReplay(NamedTuple):
    """A caption replayed step by step. ``logits`` float32 (L, V): the model's prediction of each word, as
    ``decode`` computes it. ``attention`` float32 (L, positions) or None: see :func:`caption_attention`."""

    logits: Tensor
    attention: Tensor | None


def _inner(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, PixelModel) else model


def word_attention_module(model: nn.Module) -> nn.Module | None:
    """The attention module a captioner's words attend through (see the module docstring), or None."""
    inner = _inner(model)
    if isinstance(inner, TransformerCaptioner):
        return inner.blocks[-1].cross_attn
    if isinstance(inner, _RECURRENT_CAPTIONERS) and inner.config.attention:
        return inner.decoder.attend
    return None


@contextmanager
def recording(modules: Sequence[nn.Module]) -> Iterator[list[list[Tensor]]]:
    """While the block runs, every call's attention weights per module, each as (B, heads, Lq, Lk) float32 (heads
    = 1 for the recurrent families' single attention)."""
    calls: list[list[Tensor]] = [[] for _ in modules]

    def hook(index: int) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            weights = module.weights(*args, **kwargs).float()
            while weights.dim() < 4:  # (B, S) additive, (B, L, S) dot-product -> (B, 1, L, S)
                weights = weights.unsqueeze(1)
            calls[index].append(weights)

        return record

    handles = [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _inputs(model: nn.Module, visual: Tensor, length: int) -> tuple[Tensor, Tensor, int | None]:
    """One item as a batch of one on the model's device: (visual (1, ...), lengths (1,), real positions or None
    when every memory position is real: a :class:`PixelModel`'s image becomes a grid of cells, all real)."""
    if not hasattr(model, "step"):
        raise ValueError(f"{type(model).__name__} is not a captioner (no encode / init_state / step)")
    if not 1 <= length <= visual.size(0):
        raise ValueError(f"length must be in [1, {visual.size(0)}], got {length}")
    device = next(model.parameters()).device
    pixels_of_image = isinstance(model, PixelModel) and visual.dim() == 3  # (H, W, 3)
    visual = visual.to(device)
    if visual.is_floating_point():
        visual = visual.float()
    return visual.unsqueeze(0), torch.tensor([length], device=device), None if pixels_of_image else length


@torch.no_grad()
def replay_caption(model: nn.Module, visual: Tensor, length: int, tokens: Tensor) -> CaptionReplay:
    """Feed ``tokens`` to a captioner one step at a time, as ``decode`` does with its own output.

    visual: one item's features (S, D) (image grid cells or frames; uint8 pixels for a :class:`PixelModel`),
    ``length`` of them real; tokens: (L,) int, the caption without ``<bos>`` (``<eos>`` last when it finished).
    Step t is fed token t-1 (``<bos>`` at t = 0) and predicts token t. The model must be in eval mode.
    """
    if model.training:
        raise ValueError("replay with the model in eval mode (call model.eval()): dropout would be active")
    if tokens.dim() != 1 or tokens.numel() == 0 or bool((tokens == PAD_ID).any()) or bool((tokens == BOS_ID).any()):
        raise ValueError("tokens must be (L,) with L >= 1, without <bos> and <pad> (cut a decoded row at its length)")
    batch, lengths, real = _inputs(model, visual, length)
    tokens = tokens.to(lengths.device).long()
    module = word_attention_module(model)
    with recording([module] if module is not None else []) as calls:
        memory = model.encode(batch, lengths)
        state = model.init_state(memory)
        prev = torch.full((1,), BOS_ID, dtype=torch.long, device=lengths.device)
        logits = []
        for t in range(tokens.numel()):
            step_logits, state = model.step(prev, state, memory)  # (1, V)
            logits.append(step_logits[0].float())
            prev = tokens[t : t + 1]
    if module is None:
        return CaptionReplay(torch.stack(logits).cpu(), None)
    if len(calls[0]) != tokens.numel():  # one attention call per step, or the module is not the one stepped
        raise RuntimeError(f"{len(calls[0])} attention calls for {tokens.numel()} steps")
    weights = torch.cat([w.mean(dim=1)[0] for w in calls[0]])  # (L, S): heads averaged, one query per step
    return CaptionReplay(torch.stack(logits).cpu(), weights[:, :real].cpu())


def caption_attention(model: nn.Module, visual: Tensor, length: int, tokens: Tensor) -> Tensor | None:
    """Per generated word, the attention weights over the real memory positions used when predicting it.

    visual (S, D) one item's features, ``length`` real positions; tokens (L,) the generated caption without
    ``<bos>``. Returns float32 (L, length), rows summing to 1 (the transformer: last decoder layer's
    cross-attention, mean over heads), or None for a family or config without attention. A :class:`PixelModel`
    takes pixels instead; for an image (H, W, 3) the positions are its encoder's G grid cells.
    """
    return replay_caption(model, visual, length, tokens).attention


@torch.no_grad()
def encoder_self_attention(model: nn.Module, visual: Tensor, length: int) -> Tensor | None:
    """The Transformer captioner's visual encoder self-attention: float32 (layers, heads, length, length) over the
    real positions (query rows, key columns; rows sum to 1). None for the other families."""
    inner = _inner(model)
    if not isinstance(inner, TransformerCaptioner):
        return None
    if model.training:
        raise ValueError("call model.eval() first: dropout would be active")
    batch, lengths, real = _inputs(model, visual, length)
    with recording([block.attn for block in inner.encoder.blocks]) as calls:
        model.encode(batch, lengths)
    weights = torch.stack([layer[0][0] for layer in calls])  # (layers, h, S, S)
    return weights[:, :, :real, :real].cpu()
