"""Greedy decoding and beam search for every captioner, batched on the model's device.

Both loop over time steps only; the batch (and the beams) advance together as tensors. They drive a model
through the decoding contract of docs/design.md::

    memory = model.encode(visual, lengths)            # tuple of tensors (or None), batch on dim 0
    state = model.init_state(memory)                  # same
    logits, state = model.step(prev_tokens, state, memory)   # prev_tokens (B,) -> logits (B, V)

and feed back their own previous outputs, never reference tokens (no teacher forcing). ``<pad>`` and
``<bos>`` are never generated. A sequence stops at its first ``<eos>``; decoding stops when every sequence
has stopped, or after ``max_length`` generated tokens.

Scores: ``log_prob`` is the sum of the model's log-probabilities of the generated tokens (``<eos>``
included). ``score`` divides it by the GNMT length penalty ``lp(n) = ((5 + n) / 6) ** alpha``, n = generated
tokens incl. ``<eos>`` (Wu et al. 2016, "Google's Neural Machine Translation System", arXiv:1609.08144,
eq. 14); with ``alpha = 0`` it equals ``log_prob``. Beam search ranks hypotheses by ``score``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from seqvision.vocab import BOS_ID, EOS_ID, PAD_ID


Tensors = tuple[Tensor | None, ...] | None


class Captioner(Protocol):
    def encode(self, visual: Tensor, lengths: Tensor) -> Tensors: ...

    def init_state(self, memory: Tensors) -> Tensors: ...

    def step(self, prev_tokens: Tensor, state: Tensors, memory: Tensors) -> tuple[Tensor, Tensors]: ...


class Decoded(NamedTuple):
    """Best hypothesis per item. ``tokens`` int64 (B, L): generated ids without ``<bos>``, ending with
    ``<eos>`` when the sequence finished, then ``<pad>``; L = longest hypothesis. ``lengths`` int64 (B,):
    generated tokens incl. ``<eos>``. ``log_prob`` float32 (B,): summed log-probabilities. ``score`` float32
    (B,): ``log_prob / lp(lengths)``."""

    tokens: Tensor
    lengths: Tensor
    log_prob: Tensor
    score: Tensor


class BeamStep(NamedTuple):
    """The beams of :func:`beam_search` after step ``step`` (0-based), as its ``on_step`` callback sees them; beam j
    of item b is row ``[b, j]``, best first. ``tokens`` int64 (B, k, step + 1): each beam's generated ids so far
    (``<pad>`` after its ``<eos>``). ``source`` int64 (B, k): the beam of the previous step it extends.
    ``log_prob``, ``score`` float32 (B, k) as in :class:`Decoded` (``-inf`` for a beam with no candidate left).
    ``finished`` bool (B, k)."""

    step: int
    tokens: Tensor
    source: Tensor
    log_prob: Tensor
    score: Tensor
    finished: Tensor


def length_penalty(lengths: Tensor, alpha: float) -> Tensor:
    """GNMT length penalty ((5 + n) / 6) ** alpha (Wu et al. 2016); 1 for alpha = 0."""
    return ((5.0 + lengths.float()) / 6.0) ** alpha


def reorder(tensors: Tensors, index: Tensor) -> Tensors:
    """``index_select(0, index)`` on every tensor of a memory/state tuple (``None`` entries pass through)."""
    if tensors is None:
        return None
    return tuple(None if t is None else t.index_select(0, index) for t in tensors)


def _check(model: Captioner, max_length: int, beam_size: int = 1, alpha: float = 0.0) -> None:
    if getattr(model, "training", False):
        raise ValueError("decode with the model in eval mode (call model.eval()): dropout would be active")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if alpha < 0:
        raise ValueError(f"length_penalty must be >= 0, got {alpha}")


def _log_probs(logits: Tensor) -> Tensor:
    """(N, V) logits -> (N, V) float32 log-probabilities with <pad> and <bos> excluded from generation."""
    logp = F.log_softmax(logits.float(), dim=-1)
    logp[:, PAD_ID] = float("-inf")
    logp[:, BOS_ID] = float("-inf")
    return logp


@torch.inference_mode()
def greedy_decode(
    model: Captioner,
    visual: Tensor,
    lengths: Tensor,
    *,
    max_length: int,
    length_penalty_alpha: float = 0.0,
) -> Decoded:
    """Most likely next token at every step, for the whole batch at once."""
    _check(model, max_length, alpha=length_penalty_alpha)
    memory = model.encode(visual, lengths)
    state = model.init_state(memory)
    batch, device = visual.size(0), visual.device

    prev = torch.full((batch,), BOS_ID, dtype=torch.long, device=device)
    tokens = torch.full((batch, max_length), PAD_ID, dtype=torch.long, device=device)
    out_lengths = torch.zeros(batch, dtype=torch.long, device=device)
    log_prob = torch.zeros(batch, dtype=torch.float32, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for t in range(max_length):
        logits, state = model.step(prev, state, memory)  # (B, V)
        best_logp, best = _log_probs(logits).max(dim=-1)  # (B,), (B,)
        alive = ~finished
        best = best.masked_fill(finished, PAD_ID)  # finished sequences stop growing
        log_prob += best_logp.masked_fill(finished, 0.0)
        out_lengths += alive.long()
        tokens[:, t] = best
        finished |= best == EOS_ID
        prev = best
        if bool(finished.all()):
            break
    tokens = tokens[:, : int(out_lengths.max())]
    return Decoded(tokens, out_lengths, log_prob, log_prob / length_penalty(out_lengths, length_penalty_alpha))


@torch.inference_mode()
def beam_search(
    model: Captioner,
    visual: Tensor,
    lengths: Tensor,
    *,
    beam_size: int,
    max_length: int,
    length_penalty_alpha: float = 0.0,
    on_step: Callable[[BeamStep], None] | None = None,
) -> Decoded:
    """Beam search with ``beam_size`` hypotheses per item, all items and beams advanced as one batch.

    Finished hypotheses stay in the beam with their score frozen (they can only be extended by ``<pad>``
    at log-probability 0) and compete with live ones on the length-normalised score, so a beam wide enough
    to keep every candidate is exact. Returns the best-scoring hypothesis per item. ``on_step`` (for inspection,
    e.g. the walkthrough notebook) receives a :class:`BeamStep` of copies after every step; it does not change
    the search.
    """
    _check(model, max_length, beam_size, length_penalty_alpha)
    alpha = length_penalty_alpha
    batch, device, k = visual.size(0), visual.device, beam_size
    memory = model.encode(visual, lengths)
    state = model.init_state(memory)
    # Each item's row repeated k times: row b * k + j is beam j of item b. Every beam of an item shares the
    # item's memory, so reordering beams within an item never changes memory; only the state is reordered.
    expand = torch.arange(batch, device=device).repeat_interleave(k)  # (B*k,)
    memory, state = reorder(memory, expand), reorder(state, expand)

    prev = torch.full((batch * k,), BOS_ID, dtype=torch.long, device=device)
    tokens = torch.full((batch, k, max_length), PAD_ID, dtype=torch.long, device=device)
    beam_logp = torch.zeros(batch, k, device=device)
    beam_logp[:, 1:] = float("-inf")  # k identical start beams: expand only the first at step 0
    beam_len = torch.zeros(batch, k, dtype=torch.long, device=device)
    finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
    item_offset = (torch.arange(batch, device=device) * k).unsqueeze(1)  # (B, 1)

    for t in range(max_length):
        logits, state = model.step(prev, state, memory)  # (B*k, V)
        vocab = logits.size(-1)
        logp = _log_probs(logits).view(batch, k, vocab)
        # A finished (or dead, -inf) beam has exactly one continuation: <pad> at log-probability 0.
        logp = logp.masked_fill(finished.unsqueeze(-1), float("-inf"))
        logp[..., PAD_ID] = logp[..., PAD_ID].masked_fill(finished, 0.0)

        cand_logp = beam_logp.unsqueeze(-1) + logp  # (B, k, V)
        cand_len = (beam_len + (~finished).long()).unsqueeze(-1)  # (B, k, 1), same for every token
        cand_score = cand_logp / length_penalty(cand_len, alpha)  # (B, k, V)
        top_score, flat = cand_score.view(batch, k * vocab).topk(k, dim=-1)  # (B, k) each
        source = torch.div(flat, vocab, rounding_mode="floor")  # (B, k) beam each candidate extends
        token = flat % vocab  # (B, k)

        beam_logp = cand_logp.view(batch, k * vocab).gather(1, flat)
        was_finished = finished.gather(1, source)
        beam_len = beam_len.gather(1, source) + (~was_finished).long()
        tokens = tokens.gather(1, source.unsqueeze(-1).expand(-1, -1, max_length))  # (B, k, max_length)
        tokens[:, :, t] = token
        finished = was_finished | (token == EOS_ID) | torch.isinf(beam_logp)
        if on_step is not None:
            on_step(BeamStep(t, tokens[:, :, : t + 1].clone(), source.clone(), beam_logp.clone(), top_score.clone(),
                             finished.clone()))

        state = reorder(state, (item_offset + source).view(-1))
        prev = token.view(-1)
        if bool(finished.all()):
            break

    final_score = beam_logp / length_penalty(beam_len, alpha)  # (B, k)
    best = final_score.argmax(dim=-1)  # (B,)
    rows = torch.arange(batch, device=device)
    out_lengths = beam_len[rows, best]
    tokens = tokens[rows, best, : int(out_lengths.max())]
    return Decoded(tokens, out_lengths, beam_logp[rows, best], final_score[rows, best])


def decode(
    model: Captioner,
    visual: Tensor,
    lengths: Tensor,
    *,
    beam_size: int,
    max_length: int,
    length_penalty_alpha: float = 0.0,
) -> Decoded:
    """Greedy decoding for ``beam_size == 1`` (same result as a one-beam search, cheaper), else beam search."""
    if beam_size == 1:
        return greedy_decode(
            model, visual, lengths, max_length=max_length, length_penalty_alpha=length_penalty_alpha
        )
    return beam_search(
        model,
        visual,
        lengths,
        beam_size=beam_size,
        max_length=max_length,
        length_penalty_alpha=length_penalty_alpha,
    )
