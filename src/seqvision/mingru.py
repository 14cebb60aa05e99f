"""minGRU, a recurrent family trained in parallel: every model of the three tasks, built on one recurrence.

minGRU (Feng et al. 2024, "Were RNNs All We Needed?", arXiv:2410.01201, section 3.1) drops the GRU's dependence
of the gates on the previous state::

    z_t  = sigmoid(W_z x_t + b_z)              update gate, from x_t only
    h~_t = g(W_h x_t + b_h)                    candidate, from x_t only
    h_t  = (1 - z_t) * h_{t-1} + z_t * h~_t

so h_t = a_t h_{t-1} + b_t with a_t = 1 - z_t and b_t = z_t h~_t known for every t before the recurrence runs.
That linear recurrence is a prefix scan: training computes all N states with :func:`parallel_scan`, two levels of
prefix sums (within chunks of 16 steps in float64, then across the chunks in log space with
:func:`parallel_scan_log`; Heinsen 2023, "Efficient Parallelization of a Ubiquitous Sequential Computation",
arXiv:2311.06281), a critical path of O(log N) on parallel hardware instead of N. Inference keeps the O(1)-state
sequential step (:meth:`MinGRU.step`). Both run the same maths; ``MinGRUModelConfig.scan="sequential"`` makes the
forward pass use the step loop too (the reference the tests compare against, and the "RNN as a loop" point of the
parallelism study).

The log-space form needs h > 0: g(x) = x + 0.5 for x >= 0, sigmoid(x) otherwise (the paper's appendix B.3.1), so
h~_t > 0 and every state, a convex combination of positive values, stays positive. Written after the paper's
appendix B and lucidrains/minGRU-pytorch (minGRU_pytorch/minGRU.py at 2707433), plain PyTorch, no custom kernels.

- :class:`MinGRUActivityClassifier`  clip-centred frame features -> minGRU stack -> last real step -> linear
  (the contract of ``rnn.RNNActivityClassifier``).
- :class:`MinGRUImageCaptioner`     decoder started from g(W * mean grid feature), optional attention over the grid.
- :class:`MinGRUVideoCaptioner`     minGRU encoder -> minGRU decoder started from the encoder's final state,
  optional attention over the encoder outputs.

Attention in the decoders uses the recurrence's output at t as the query (Luong et al. 2015, "Effective
Approaches to Attention-based Neural Machine Translation"), not h_{t-1} as in Show, Attend and Tell: the context
then never feeds back into the recurrence, so teacher-forced training stays one parallel scan plus one batched
attention over all positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqvision.blocks import (
    ModelDims,
    caption_loss,
    center_clip,
    check_lengths,
    length_mask,
    masked_mean,
    split_tokens,
)
from seqvision.config import MinGRUModelConfig
from seqvision.vocab import PAD_ID

SCANS = ("parallel", "sequential")

State = tuple[Tensor]  # (h,) with h (B, num_layers, H), h > 0


# --------------------------------------------------------------------------------------------------------
# The recurrence


def g(x: Tensor) -> Tensor:
    """Positive activation for the candidate state: x + 0.5 for x >= 0, sigmoid(x) below (continuous at 0)."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: Tensor) -> Tensor:
    """log g(x), computed without forming g(x) for x < 0 (log sigmoid(x) = -softplus(-x))."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


def parallel_scan_log(log_a: Tensor, log_b: Tensor, log_h0: Tensor | None = None) -> Tensor:
    """All states of h_t = a_t h_{t-1} + b_t at once, in log space (Heinsen 2023, eq. 2).

    log_a, log_b (B, T, H) float; log_h0 (B, H) or None for h_{-1} = 0. Returns h (B, T, H), same dtype as log_b.
    With a*_t = sum_{k<=t} log a_k: log h_t = a*_t + logsumexp(log h0, log b_k - a*_k for k <= t). Both cumulative
    ops are prefix scans, so position t depends on positions <= t only (causal, padding at the end is harmless).

    Runs in float32 at least: a*_t falls linearly with t and the result is the difference of two large numbers,
    which bfloat16/float16 cannot hold (the absolute error of log h grows like eps * |a*_t|; see docs/study.md).
    """
    dtype = log_b.dtype
    work = torch.promote_types(dtype, torch.float32)
    log_a, log_b = log_a.to(work), log_b.to(work)
    if log_h0 is not None:  # h0 enters as position -1 with coefficient 1 (log 0), then is dropped again
        log_a = F.pad(log_a, (0, 0, 1, 0))  # (B, 1 + T, H)
        log_b = torch.cat([log_h0.to(work).unsqueeze(1), log_b], dim=1)  # (B, 1 + T, H)
    a_star = torch.cumsum(log_a, dim=1)  # (B, T', H)
    log_h = a_star + torch.logcumsumexp(log_b - a_star, dim=1)  # (B, T', H)
    if log_h0 is not None:
        log_h = log_h[:, 1:]
    return log_h.exp().to(dtype)


SCAN_CHUNK = 16
# a_t >= exp(LOG_A_MIN) inside the chunked scan, so that no intermediate leaves float64's range (|x| < 709):
# within a chunk of 16 steps, -cumsum(log a) <= 16 * 40 = 640. It changes h_t by at most e^-40 h_{t-1}.
LOG_A_MIN = -40.0


def parallel_scan(log_a: Tensor, log_b: Tensor, log_h0: Tensor | None = None, *, chunk: int = SCAN_CHUNK) -> Tensor:
    """All states of h_t = a_t h_{t-1} + b_t at once: the function training uses. Same contract as
    :func:`parallel_scan_log`: log_a, log_b (B, T, H); log_h0 (B, H) or None -> h (B, T, H) in log_b's dtype.

    Two levels of prefix sums. Within each chunk of ``chunk`` steps, with r_t = sum of log a_k from the chunk's
    start to t (float64), the states from a zero start are exp(r_t) * cumsum(exp(log b_k - r_k)): sums of positive
    terms, accurate to a few float64 ulps. Across chunks, each chunk's end state is a_chunk * h_prev + b_chunk, one
    more linear recurrence of T / chunk steps, scanned with :func:`parallel_scan_log`; then every state adds
    exp(r_t) times the state carried into its chunk. Against a float64 loop the error stays at float32 rounding
    (~1e-7) at any T, where the single log-space scan's grows like eps * |sum log a| (2e-4 at T = 1000), and on
    CPU a layer's forward and backward is 1.2-1.6x as fast (``logcumsumexp`` and its backward dominate the single
    scan; benchmarks/scan.py). The price: float64 intermediates, about 1.7x the single scan's memory.
    """
    dtype = log_b.dtype
    B, T, H = log_b.shape
    n = -(-T // chunk)  # chunks; the last one padded at the end with a = 1, b = 0 (the scan is causal)
    log_a = log_a.to(torch.float64).clamp_min(LOG_A_MIN)
    log_b = log_b.to(torch.float64)
    if n * chunk > T:
        log_a = F.pad(log_a, (0, 0, 0, n * chunk - T))
        log_b = F.pad(log_b, (0, 0, 0, n * chunk - T), value=float("-inf"))
    r = torch.cumsum(log_a.view(B, n, chunk, H), dim=2)  # (B, n, C, H), in [-640, 0]
    decay = r.exp()  # (B, n, C, H): product of a from the chunk's start
    local = decay * torch.cumsum((log_b.view(B, n, chunk, H) - r).exp(), dim=2)  # (B, n, C, H), zero start
    tiny = torch.finfo(torch.float64).tiny
    ends = parallel_scan_log(r[:, :, -1], local[:, :, -1].clamp_min(tiny).log(),
                             None if log_h0 is None else log_h0.to(torch.float64))  # (B, n, H)
    start = torch.zeros_like(ends[:, :1]) if log_h0 is None else log_h0.to(torch.float64).exp().unsqueeze(1)
    carried = torch.cat([start, ends[:, :-1]], dim=1)  # (B, n, H): the state each chunk starts from
    h = local + decay * carried.unsqueeze(2)  # (B, n, C, H)
    return h.view(B, n * chunk, H)[:, :T].to(dtype)


def sequential_scan(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """The same recurrence as a loop: a, b (B, T, H), h0 (B, H) or None (zeros) -> h (B, T, H). N sequential steps."""
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    out = []
    for t in range(b.size(1)):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


class MinGRULayer(nn.Module):
    """One minGRU layer: x (B, T, I) -> h (B, T, H). One linear map gives both gate and candidate."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(input_size, 2 * hidden_size)

    def forward(self, x: Tensor, h0: Tensor | None = None, *, scan: str = "parallel") -> Tensor:
        """x (B, T, I), h0 (B, H) positive or None (zeros) -> all states (B, T, H), positive."""
        pre_h, pre_z = self.proj(x).chunk(2, dim=-1)  # each (B, T, H)
        if scan == "sequential":
            z = torch.sigmoid(pre_z)
            return sequential_scan(1 - z, z * g(pre_h), h0)
        # log(1 - sigmoid(k)) = -softplus(k), log sigmoid(k) = -softplus(-k): no log of a rounded probability.
        log_a = -F.softplus(pre_z)
        log_b = -F.softplus(-pre_z) + log_g(pre_h)
        log_h0 = None if h0 is None else torch.log(h0.clamp_min(torch.finfo(h0.dtype).tiny))
        return parallel_scan(log_a, log_b, log_h0)

    def step(self, x: Tensor, h: Tensor) -> Tensor:
        """One step: x (B, I), h (B, H) -> h (B, H). Constant time and memory per step, whatever t is."""
        pre_h, pre_z = self.proj(x).chunk(2, dim=-1)  # each (B, H)
        return torch.lerp(h, g(pre_h), torch.sigmoid(pre_z))  # (1 - z) h + z h~


class MinGRU(nn.Module):
    """A stack of minGRU layers with dropout between them (as ``nn.GRU(dropout=...)``), batch first.

    States are batch-first ``(B, num_layers, H)``, the layout of ``rnn.py``'s decoding API.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, dropout: float, *,
                 scan: str = "parallel") -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            MinGRULayer(input_size if i == 0 else hidden_size, hidden_size) for i in range(num_layers)
        )
        self.drop = nn.Dropout(dropout if num_layers > 1 else 0.0)
        self.hidden_size, self.num_layers, self.scan = hidden_size, num_layers, scan

    def forward(self, x: Tensor, lengths: Tensor | None = None, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, I), lengths (B,) or None (all T), h0 (B, L, H) or None -> (outputs (B, T, H), final (B, L, H)).

        outputs are the top layer's states, zero past each length; final is each layer's state at the row's last
        real step. The recurrence is causal, so padded steps (after the real ones) never reach a real position.
        """
        B, T, _ = x.shape
        last = torch.full((B,), T - 1, device=x.device) if lengths is None else lengths.to(x.device) - 1  # (B,)
        finals = []
        for i, layer in enumerate(self.layers):
            if i > 0:
                x = self.drop(x)
            x = layer(x, None if h0 is None else h0[:, i], scan=self.scan)  # (B, T, H)
            finals.append(x[torch.arange(B, device=x.device), last])  # (B, H)
        if lengths is not None:
            x = x * length_mask(lengths.to(x.device), T).unsqueeze(-1).to(x.dtype)  # (B, T, H)
        return x, torch.stack(finals, dim=1)  # (B, T, H), (B, L, H)

    def step(self, x: Tensor, h: Tensor) -> Tensor:
        """x (B, I), h (B, L, H) -> new h (B, L, H); the top layer's state is ``h[:, -1]``."""
        states = []
        for i, layer in enumerate(self.layers):
            if i > 0:
                x = self.drop(x)
            x = layer.step(x, h[:, i])  # (B, H)
            states.append(x)
        return torch.stack(states, dim=1)  # (B, L, H)


class DotAttention(nn.Module):
    """Luong's "general" score h_t^T W v_s, scaled by 1/sqrt(H) and masked; any number of queries at once."""

    def __init__(self, value_size: int, query_size: int) -> None:
        super().__init__()
        self.key = nn.Linear(value_size, query_size, bias=False)

    def keys(self, values: Tensor) -> Tensor:
        """values (B, S, Dv) -> keys (B, S, H); computed once per clip/image."""
        return self.key(values)

    def weights(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        """The weights :meth:`forward` applies, from its arguments (``values`` unused) -> (B, L, S), zero on
        padding, rows summing to 1. Same arguments as ``forward``, so a forward hook can call it."""
        scores = torch.bmm(query, keys.transpose(1, 2)) / math.sqrt(query.size(-1))  # (B, L, S)
        return scores.masked_fill(~mask.unsqueeze(1), float("-inf")).softmax(-1)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        """query (B, L, H), keys (B, S, H), values (B, S, Dv), mask (B, S) bool -> context (B, L, Dv)."""
        return torch.bmm(self.weights(query, keys, values, mask), values)  # (B, L, Dv)


class MinGRUDecoder(nn.Module):
    """Word-level minGRU decoder; with attention the output layer sees [h_t; context_t(h_t)].

    ``memory`` with attention: (values (B, S, Dv), mask (B, S) bool, keys (B, S, H)); without: ().
    """

    def __init__(self, *, vocab_size: int, embed_size: int, hidden_size: int, num_layers: int, dropout: float,
                 scan: str, context_size: int = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size, padding_idx=PAD_ID)
        self.drop = nn.Dropout(dropout)
        self.rnn = MinGRU(embed_size, hidden_size, num_layers, dropout, scan=scan)
        self.attend = DotAttention(context_size, hidden_size) if context_size else None
        self.out = nn.Linear(hidden_size + context_size, vocab_size)

    def _logits(self, h_top: Tensor, memory: tuple[Tensor, ...]) -> Tensor:
        """h_top (B, L, H) -> logits (B, L, V)."""
        if self.attend is not None:
            values, mask, keys = memory
            h_top = torch.cat([h_top, self.attend(h_top, keys, values, mask)], dim=-1)  # (B, L, H + Dv)
        return self.out(self.drop(h_top))

    def forward(self, tokens: Tensor, state: State, memory: tuple[Tensor, ...]) -> Tensor:
        """Teacher forcing: tokens (B, L) fed from ``state`` -> logits (B, L, V), all positions in parallel."""
        out, _ = self.rnn(self.drop(self.embed(tokens)), None, state[0])  # (B, L, H)
        return self._logits(out, memory)

    def step(self, prev: Tensor, state: State, memory: tuple[Tensor, ...]) -> tuple[Tensor, State]:
        """prev tokens (B,) -> (logits (B, V), new state)."""
        h = self.rnn.step(self.drop(self.embed(prev)), state[0])  # (B, L, H)
        return self._logits(h[:, -1:], memory)[:, 0], (h,)


# --------------------------------------------------------------------------------------------------------
# Models


class MinGRUActivityClassifier(nn.Module):
    """Clip-centred frame features -> minGRU stack -> top state at the last real frame -> linear."""

    def __init__(self, config: MinGRUModelConfig, dims: ModelDims) -> None:
        super().__init__()
        if dims.num_classes < 1:
            raise ValueError("activity models need num_classes >= 1")
        self.config, self.dims = config, dims
        self.drop = nn.Dropout(config.dropout)
        self.encoder = MinGRU(dims.feature_dim, config.hidden_size, config.num_layers, config.dropout,
                              scan=config.scan)
        self.head = nn.Linear(config.hidden_size, dims.num_classes)

    def forward(self, visual: Tensor, lengths: Tensor, labels: Tensor | None = None, *,
                label_smoothing: float = 0.0) -> tuple[Tensor, Tensor | None]:
        """visual (B, T, D), lengths (B,), labels (B,) -> (logits (B, C), loss or None)."""
        check_lengths(lengths, visual.size(1))
        _, final = self.encoder(self.drop(center_clip(visual, lengths)), lengths)  # (B, L, H)
        logits = self.head(self.drop(final[:, -1]))  # (B, C)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing) if labels is not None else None
        return logits, loss


class _MinGRUCaptioner(nn.Module):
    """Teacher-forced ``forward`` over the decoding API (encode / init_state / step) of the two captioners."""

    config: MinGRUModelConfig
    decoder: MinGRUDecoder

    def encode(self, visual: Tensor, lengths: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def init_state(self, memory: tuple[Tensor, ...]) -> State:
        raise NotImplementedError

    def _decoder_memory(self, memory: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return memory[:3] if self.config.attention else ()

    def forward(self, visual: Tensor, lengths: Tensor, tokens: Tensor | None = None,
                token_lengths: Tensor | None = None, *, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
        """visual (B, S, D), lengths (B,), tokens (B, L) -> (logits (B, L-1, V), mean loss over real tokens)."""
        if tokens is None:
            raise ValueError("captioners need tokens for teacher forcing; decode with encode/init_state/step")
        inputs, targets, _ = split_tokens(tokens, token_lengths)  # padding sits after <eos>: causality hides it
        memory = self.encode(visual, lengths)
        logits = self.decoder(inputs, self.init_state(memory), self._decoder_memory(memory))  # (B, L-1, V)
        return logits, caption_loss(logits, targets, label_smoothing=label_smoothing)

    def step(self, prev_tokens: Tensor, state: State, memory: tuple[Tensor, ...]) -> tuple[Tensor, State]:
        """prev_tokens (B,) -> (logits (B, V), state (h (B, num_layers, H),))."""
        return self.decoder.step(prev_tokens, state, self._decoder_memory(memory))


def _check_vocab(dims: ModelDims) -> None:
    if dims.vocab_size < 4:
        raise ValueError("captioning models need vocab_size >= 4 (pad, bos, eos, unk)")


class MinGRUImageCaptioner(_MinGRUCaptioner):
    """Decoder started from g(W * mean grid feature) per layer; attention over the grid cells optional.

    memory: with attention ``(grid (B, G, D), mask (B, G) bool, keys (B, G, H))``; without ``(mean (B, D),)``.
    """

    def __init__(self, config: MinGRUModelConfig, dims: ModelDims) -> None:
        super().__init__()
        _check_vocab(dims)
        self.config, self.dims = config, dims
        self.drop = nn.Dropout(config.dropout)
        # g() keeps the initial state positive, as the log-space scan needs (tanh, as in rnn.InitState, would not).
        self.init = nn.Linear(dims.feature_dim, config.num_layers * config.hidden_size)
        self.decoder = MinGRUDecoder(
            vocab_size=dims.vocab_size, embed_size=config.embed_size, hidden_size=config.hidden_size,
            num_layers=config.num_layers, dropout=config.dropout, scan=config.scan,
            context_size=dims.feature_dim if config.attention else 0,
        )

    def encode(self, visual: Tensor, lengths: Tensor) -> tuple[Tensor, ...]:
        check_lengths(lengths, visual.size(1))
        if not self.config.attention:
            return (masked_mean(visual, lengths),)  # (B, D)
        grid = self.drop(visual)  # (B, G, D)
        assert self.decoder.attend is not None
        return grid, length_mask(lengths, grid.size(1)), self.decoder.attend.keys(grid)

    def init_state(self, memory: tuple[Tensor, ...]) -> State:
        if self.config.attention:
            grid, mask, _ = memory
            mean = masked_mean(grid, mask.sum(1))  # (B, D)
        else:
            mean = memory[0]
        h0 = g(self.init(mean)).view(mean.size(0), self.config.num_layers, self.config.hidden_size)  # (B, L, H)
        return (h0,)


class MinGRUVideoCaptioner(_MinGRUCaptioner):
    """minGRU encoder over frames -> minGRU decoder started from the encoder's final state (S2VT-style hand-over).

    memory: ``(final (B, L, H),)`` or, with attention, ``(outputs (B, T, H), mask (B, T) bool, keys (B, T, H),
    final (B, L, H))``.
    """

    def __init__(self, config: MinGRUModelConfig, dims: ModelDims) -> None:
        super().__init__()
        _check_vocab(dims)
        self.config, self.dims = config, dims
        self.drop = nn.Dropout(config.dropout)
        self.encoder = MinGRU(dims.feature_dim, config.hidden_size, config.num_layers, config.dropout,
                              scan=config.scan)
        self.decoder = MinGRUDecoder(
            vocab_size=dims.vocab_size, embed_size=config.embed_size, hidden_size=config.hidden_size,
            num_layers=config.num_layers, dropout=config.dropout, scan=config.scan,
            context_size=config.hidden_size if config.attention else 0,
        )

    def encode(self, visual: Tensor, lengths: Tensor) -> tuple[Tensor, ...]:
        check_lengths(lengths, visual.size(1))
        outputs, final = self.encoder(self.drop(visual), lengths)  # (B, T, H), (B, L, H)
        if not self.config.attention:
            return (final,)
        values = self.drop(outputs)
        assert self.decoder.attend is not None
        return values, length_mask(lengths, values.size(1)), self.decoder.attend.keys(values), final

    def init_state(self, memory: tuple[Tensor, ...]) -> State:
        return (memory[-1],)


MINGRU_MODELS: dict[str, type[nn.Module]] = {
    "activity": MinGRUActivityClassifier,
    "image_captioning": MinGRUImageCaptioner,
    "video_captioning": MinGRUVideoCaptioner,
}
