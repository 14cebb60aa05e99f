"""Every recurrent model (vanilla RNN, LSTM, GRU) for all three tasks.

- :class:`RNNActivityClassifier`  many-to-one: recurrent encoder over frame features -> classifier (LRCN,
  Donahue et al. 2015).
- :class:`RNNImageCaptioner`      one-to-many: decoder initialised from the mean grid feature, with optional
  soft attention over the grid (Show, Attend and Tell, Xu et al. 2015).
- :class:`RNNVideoCaptioner`      many-to-many: recurrent encoder -> recurrent decoder initialised from the
  encoder's final state, optionally attending over the encoder outputs (S2VT-style, Venugopalan et al. 2015;
  attention as in Yao et al. 2015).

The cell type is the family name (``cell=``); the knobs are the family's ``models:`` section
(:class:`seqvision.config.RecurrentModelConfig`), the sizes of the data :class:`seqvision.blocks.ModelDims`. Recurrences run through ``nn.RNN`` / ``nn.LSTM`` /
``nn.GRU`` (cuDNN on GPU) on packed sequences, so padding never reaches a hidden state.

The word decoder every captioner but the Transformer's uses (:class:`RecurrentDecoder`) lives here too; the
pieces every family shares (``caption_loss``, ``length_mask``) are in :mod:`seqvision.blocks`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seqvision.blocks import (
    ModelDims,
    caption_loss,
    center_clip,
    check_lengths,
    length_mask,
    masked_mean,
    split_tokens,
)
from seqvision.config import RecurrentModelConfig
from seqvision.vocab import PAD_ID

CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}

State = tuple[Tensor, ...]  # batch on dim 0: (h,) or (h, c), each (B, num_layers, H)


# --------------------------------------------------------------------------------------------------------
# Hidden states: nn.RNN* keeps them layer-first (num_layers, B, H); the decoding API wants the batch on dim 0.


def _to_layer_first(state: State) -> Tensor | tuple[Tensor, Tensor]:
    hs = tuple(s.transpose(0, 1).contiguous() for s in state)  # each (num_layers, B, H)
    return hs if len(hs) == 2 else hs[0]  # type: ignore[return-value]


def _to_batch_first(hidden: Tensor | tuple[Tensor, ...]) -> State:
    hs = hidden if isinstance(hidden, tuple) else (hidden,)
    return tuple(h.transpose(0, 1) for h in hs)  # each (B, num_layers, H)


def make_rnn(cell: str, input_size: int, hidden_size: int, num_layers: int, dropout: float) -> nn.RNNBase:
    rnn = CELLS[cell](
        input_size, hidden_size, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
    )
    if cell == "lstm":
        # Forget-gate bias 1 so early training keeps the state (Jozefowicz et al. 2015). Gates: i, f, g, o.
        with torch.no_grad():
            for layer in range(num_layers):
                getattr(rnn, f"bias_ih_l{layer}")[hidden_size : 2 * hidden_size].fill_(1.0)
                getattr(rnn, f"bias_hh_l{layer}")[hidden_size : 2 * hidden_size].fill_(0.0)
    return rnn


def run_packed(
    rnn: nn.RNNBase, x: Tensor, lengths: Tensor, hidden: Tensor | tuple[Tensor, Tensor] | None
) -> tuple[Tensor, Tensor | tuple[Tensor, ...]]:
    """Run ``rnn`` over x (B, T, I) with only the first ``lengths`` steps of each row.

    Packing means padded steps are never computed: the returned final hidden state is the state after each
    row's last *real* step, and outputs past a row's length are zeros. Returns (outputs (B, T, H), hidden).
    """
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, hidden = rnn(packed, hidden)  # hidden comes back in the original (unsorted) row order
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.size(1))  # (B, T, H)
    return out, hidden


# --------------------------------------------------------------------------------------------------------
# Building blocks


class RecurrentEncoder(nn.Module):
    """A recurrent encoder over frame features, with optional truncated backpropagation through time.

    With ``tbptt_steps = k > 0`` each clip is processed in chunks of k steps *aligned to its own end*: the last
    chunk holds its last k real frames, the one before the k before them, and only the first chunk may be shorter.
    The hidden state is carried from chunk to chunk (the forward pass sees the whole clip) but detached at every
    chunk boundary, so gradients flow only within a chunk (Williams & Peng 1990). End alignment matters because the
    readout (the classifier, the decoder's initial state) sits at the end: with chunks counted from the start, a
    clip of k + 1 frames would backpropagate from its readout through one frame only.
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int, dropout: float,
                 tbptt_steps: int = 0) -> None:
        super().__init__()
        self.rnn = make_rnn(cell, input_size, hidden_size, num_layers, dropout)
        self.hidden_size = hidden_size
        self.tbptt_steps = tbptt_steps

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, State]:
        """x (B, T, I), lengths (B,) -> (outputs (B, T, H) zero past each length, final state batch-first)."""
        B, T, I = x.shape
        check_lengths(lengths, T)
        k = self.tbptt_steps
        if k <= 0 or int(lengths.max()) <= k:
            out, hidden = run_packed(self.rnn, x, lengths, None)
            return out, _to_batch_first(hidden)

        chunks = -(-int(lengths.max()) // k)  # ceil: chunks of the longest clip
        offset = chunks * k - lengths  # (B,): where each clip starts if every clip is right-aligned at chunks * k
        steps = torch.arange(k, device=x.device)  # (k,)
        parts = 2 if isinstance(self.rnn, nn.LSTM) else 1
        finals = tuple(x.new_zeros(self.rnn.num_layers, B, self.hidden_size) for _ in range(parts))
        padded = torch.cat([x, x.new_zeros(B, 1, I)], dim=1)  # (B, T + 1, I): position T feeds padded chunk slots
        rows, cols, values = [], [], []
        for c in range(chunks):
            starts = (c * k - offset).clamp(min=0)  # (B,) first real frame of chunk c, per clip
            ends = (c + 1) * k - offset  # (B,) one past its last
            active = (ends > 0).nonzero().squeeze(1)  # clips that have begun by chunk c (and then go on to the end)
            widths = (ends - starts)[active]  # (A,) k, except for a clip's first chunk
            positions = starts[active, None] + steps[None, :]  # (A, k)
            valid = steps[None, :] < widths[:, None]  # (A, k)
            positions = torch.where(valid, positions, torch.full_like(positions, T))  # padded slots -> position T
            gathered = padded[active[:, None], positions]  # (A, k, I)
            # The truncation: the carried state enters the chunk as a constant (zeros for a clip's first chunk).
            carried = tuple(h.index_select(1, active).detach() for h in finals)
            chunk_out, hidden = run_packed(self.rnn, gathered, widths, carried if parts == 2 else carried[0])
            hidden_t = hidden if isinstance(hidden, tuple) else (hidden,)
            finals = tuple(f.index_copy(1, active, h) for f, h in zip(finals, hidden_t))
            rows.append(active[:, None].expand_as(positions)[valid])
            cols.append(positions[valid])
            values.append(chunk_out[valid])  # (real frames of the chunk, H)
        # Every real frame lies in exactly one chunk: one write per position, no duplicates.
        out = x.new_zeros(B, T, self.hidden_size).index_put((torch.cat(rows), torch.cat(cols)), torch.cat(values))
        return out, tuple(h.transpose(0, 1) for h in finals)  # (B, T, H), each (B, L, H)


class AdditiveAttention(nn.Module):
    """Soft attention e_i = w^T tanh(W_k v_i + W_q h) (Bahdanau et al. 2015; Xu et al. 2015), masked."""

    def __init__(self, value_size: int, query_size: int, attn_size: int) -> None:
        super().__init__()
        self.key = nn.Linear(value_size, attn_size)
        self.query = nn.Linear(query_size, attn_size, bias=False)
        self.score = nn.Linear(attn_size, 1, bias=False)

    def keys(self, values: Tensor) -> Tensor:
        """values (B, S, Dv) -> keys (B, S, A); computed once per clip/image, not once per step."""
        return self.key(values)

    def weights(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        """The weights :meth:`forward` applies, from its arguments (``values`` unused) -> (B, S), zero on padding,
        rows summing to 1. Same arguments as ``forward``, so a forward hook can call it (``seqvision.attention``)."""
        scores = self.score(torch.tanh(keys + self.query(query).unsqueeze(1))).squeeze(-1)  # (B, S)
        return scores.masked_fill(~mask, float("-inf")).softmax(-1)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        """query (B, Hq), keys (B, S, A), values (B, S, Dv), mask (B, S) bool -> context (B, Dv)."""
        weights = self.weights(query, keys, values, mask)  # (B, S)
        return torch.bmm(weights.unsqueeze(1), values).squeeze(1)  # (B, Dv)


class RecurrentDecoder(nn.Module):
    """Word-level recurrent decoder, shared by the recurrent captioners and the mean-pool family's captioner.

    ``context`` says how the visual input enters each step besides the initial state:

    - ``"none"``:      input = word embedding (Show and Tell: the image only sets the initial state);
    - ``"attention"``: input = [embedding; beta * soft-attention context from the previous hidden state], and the
      output layer sees [h_t; context] (Show, Attend and Tell, with its gating scalar beta);
    - ``"fixed"``:     input = [embedding; one fixed vector] at every step (Mean-Pool, Venugopalan et al. 2015).

    ``memory`` for the decoder: attention -> (values (B, S, Dv), mask (B, S), keys (B, S, A)); fixed -> (ctx (B, Dc),);
    none -> ().
    """

    def __init__(self, *, cell: str, vocab_size: int, embed_size: int, hidden_size: int, num_layers: int,
                 dropout: float, context: Literal["none", "attention", "fixed"] = "none",
                 context_size: int = 0) -> None:
        super().__init__()
        self.cell, self.context = cell, context
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.embed = nn.Embedding(vocab_size, embed_size, padding_idx=PAD_ID)
        self.drop = nn.Dropout(dropout)
        ctx = context_size if context != "none" else 0
        self.rnn = make_rnn(cell, embed_size + ctx, hidden_size, num_layers, dropout)
        if context == "attention":
            self.attend = AdditiveAttention(context_size, hidden_size, hidden_size)
            self.gate = nn.Linear(hidden_size, 1)  # beta_t = sigmoid(f_beta(h_{t-1}))
        self.out = nn.Linear(hidden_size + (ctx if context == "attention" else 0), vocab_size)

    def attention_keys(self, values: Tensor) -> Tensor:
        return self.attend.keys(values)

    def forward(self, tokens: Tensor, lengths: Tensor, state: State, memory: tuple[Tensor, ...]) -> Tensor:
        """Teacher forcing: tokens (B, L) fed from ``state`` -> logits (B, L, V), zero past each row's length.

        Without attention the whole sequence runs packed through cuDNN. With attention the context at step t
        depends on h_{t-1}, so the steps run one by one; like a packed sequence, step t computes only the rows
        whose caption is still going (rows sorted longest first, so they are a prefix of the batch), and the
        embedding and the output layer run once over all real positions. Padding is never computed, so no real
        position sees it; the loss ignores the zero logits left there.
        """
        B, L = tokens.shape
        x = self.drop(self.embed(tokens))  # (B, L, E)
        if self.context == "attention":
            return self._attend_packed(x, lengths, state, memory)
        if self.context == "fixed":
            x = torch.cat([x, memory[0].unsqueeze(1).expand(B, L, -1)], dim=-1)  # (B, L, E + Dc)
        out, _ = run_packed(self.rnn, x, lengths, _to_layer_first(state))  # (B, L, H)
        return self.out(self.drop(out))  # (B, L, V)

    def _attend_packed(self, x: Tensor, lengths: Tensor, state: State, memory: tuple[Tensor, ...]) -> Tensor:
        """The attention path of :meth:`forward`: x (B, L, E) embedded inputs -> logits (B, L, V)."""
        B, L, _ = x.shape
        order = torch.argsort(lengths, descending=True, stable=True)  # (B,) longest first
        active = (lengths[order].unsqueeze(0) > torch.arange(L, device=lengths.device).unsqueeze(1)).sum(1)
        x, state = x[order], tuple(s[order] for s in state)
        memory = tuple(m[order] for m in memory)
        features = []  # per step t: (n_t, H + Dv) for the n_t rows still going
        for t, n in enumerate(active.tolist()):
            if n == 0:
                break
            out, state = self._cell(x[:n, t], tuple(s[:n] for s in state), tuple(m[:n] for m in memory))
            features.append(out)
        rows = torch.cat([order[: f.size(0)] for f in features])  # original row of each computed position
        cols = torch.cat([torch.full((f.size(0),), t, device=x.device) for t, f in enumerate(features)])
        logits = self.out(self.drop(torch.cat(features)))  # (real positions, V)
        return logits.new_zeros(B, L, logits.size(-1)).index_put((rows, cols), logits)

    def _cell(self, x: Tensor, state: State, memory: tuple[Tensor, ...]) -> tuple[Tensor, State]:
        """One recurrent step on embedded inputs x (B, E) -> (input of the output layer (B, H [+ Dv]), state)."""
        ctx = None
        if self.context == "attention":
            values, mask, keys = memory
            h_top = state[0][:, -1]  # (B, H): top layer of h_{t-1}
            ctx = torch.sigmoid(self.gate(h_top)) * self.attend(h_top, keys, values, mask)  # (B, Dv)
            x = torch.cat([x, ctx], dim=-1)
        elif self.context == "fixed":
            x = torch.cat([x, memory[0]], dim=-1)
        out, hidden = self.rnn(x.unsqueeze(1), _to_layer_first(state))  # out (B, 1, H)
        out = out.squeeze(1)  # (B, H)
        if ctx is not None:
            out = torch.cat([out, ctx], dim=-1)  # (B, H + Dv)
        return out, _to_batch_first(hidden)

    def step(self, prev: Tensor, state: State, memory: tuple[Tensor, ...]) -> tuple[Tensor, State]:
        """One step: prev tokens (B,) -> (logits (B, V), new state)."""
        out, state = self._cell(self.drop(self.embed(prev)), state, memory)
        return self.out(self.drop(out)), state


class InitState(nn.Module):
    """Initial decoder state from one visual vector: h0 (and c0) = tanh(W v), one per layer (Xu et al. 2015)."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.parts = nn.ModuleList(
            nn.Linear(input_size, num_layers * hidden_size) for _ in range(2 if cell == "lstm" else 1)
        )

    def forward(self, v: Tensor) -> State:
        """v (B, D) -> (h0,) or (h0, c0), each (B, num_layers, H)."""
        return tuple(torch.tanh(p(v)).view(v.size(0), self.num_layers, self.hidden_size) for p in self.parts)


# --------------------------------------------------------------------------------------------------------
# Models


class RNNActivityClassifier(nn.Module):
    """LRCN-style: clip-centred frame features -> recurrent encoder -> last real step's top hidden state -> linear."""

    def __init__(self, config: RecurrentModelConfig, dims: ModelDims, *, cell: str) -> None:
        super().__init__()
        if dims.num_classes < 1:
            raise ValueError("activity models need num_classes >= 1")
        self.config, self.dims, self.cell = config, dims, cell
        self.drop = nn.Dropout(config.dropout)
        self.encoder = RecurrentEncoder(cell, dims.feature_dim, config.hidden_size, config.num_layers,
                                        config.dropout, config.tbptt_steps)
        self.head = nn.Linear(config.hidden_size, dims.num_classes)

    def forward(self, visual: Tensor, lengths: Tensor, labels: Tensor | None = None, *,
                label_smoothing: float = 0.0) -> tuple[Tensor, Tensor | None]:
        """visual (B, T, D), lengths (B,), labels (B,) -> (logits (B, C), loss or None)."""
        _, state = self.encoder(self.drop(center_clip(visual, lengths)), lengths)
        logits = self.head(self.drop(state[0][:, -1]))  # h of the top layer (B, H) -> (B, C)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing) if labels is not None else None
        return logits, loss


class _Captioner(nn.Module):
    """Teacher-forced ``forward`` on top of the decoding API (encode / init_state / step) of a subclass."""

    decoder: RecurrentDecoder

    def encode(self, visual: Tensor, lengths: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def init_state(self, memory: tuple[Tensor, ...]) -> State:
        raise NotImplementedError

    def _decoder_memory(self, memory: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def forward(self, visual: Tensor, lengths: Tensor, tokens: Tensor | None = None,
                token_lengths: Tensor | None = None, *, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
        """visual (B, S, D), lengths (B,), tokens (B, L) -> (logits (B, L-1, V), mean loss over real tokens)."""
        if tokens is None:
            raise ValueError("captioners need tokens for teacher forcing; decode with encode/init_state/step")
        inputs, targets, in_lengths = split_tokens(tokens, token_lengths)
        memory = self.encode(visual, lengths)
        logits = self.decoder(inputs, in_lengths, self.init_state(memory), self._decoder_memory(memory))
        return logits, caption_loss(logits, targets, label_smoothing=label_smoothing)

    def step(self, prev_tokens: Tensor, state: State, memory: tuple[Tensor, ...]) -> tuple[Tensor, State]:
        """prev_tokens (B,) -> (logits (B, V), state). State: (h,) or (h, c), each (B, num_layers, H)."""
        return self.decoder.step(prev_tokens, state, self._decoder_memory(memory))


class RNNImageCaptioner(_Captioner):
    """Show, Attend and Tell: decoder state initialised from the mean grid feature; soft attention optional.

    memory: with attention ``(grid (B, G, D), mask (B, G) bool, keys (B, G, H))``; without ``(mean (B, D),)``.
    """

    def __init__(self, config: RecurrentModelConfig, dims: ModelDims, *, cell: str) -> None:
        super().__init__()
        if dims.vocab_size < 4:
            raise ValueError("captioning models need vocab_size >= 4 (pad, bos, eos, unk)")
        self.config, self.dims, self.cell = config, dims, cell
        self.drop = nn.Dropout(config.dropout)
        self.init = InitState(cell, dims.feature_dim, config.hidden_size, config.num_layers)
        self.decoder = RecurrentDecoder(
            cell=cell, vocab_size=dims.vocab_size, embed_size=config.embed_size,
            hidden_size=config.hidden_size, num_layers=config.num_layers, dropout=config.dropout,
            context="attention" if config.attention else "none", context_size=dims.feature_dim,
        )

    def encode(self, visual: Tensor, lengths: Tensor) -> tuple[Tensor, ...]:
        check_lengths(lengths, visual.size(1))
        if not self.config.attention:
            return (masked_mean(visual, lengths),)  # (B, D)
        grid = self.drop(visual)  # (B, G, D)
        return grid, length_mask(lengths, grid.size(1)), self.decoder.attention_keys(grid)

    def init_state(self, memory: tuple[Tensor, ...]) -> State:
        if self.config.attention:
            grid, mask, _ = memory
            mean = masked_mean(grid, mask.sum(1))  # (B, D)
        else:
            mean = memory[0]
        return self.init(mean)

    def _decoder_memory(self, memory: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return memory if self.config.attention else ()


class RNNVideoCaptioner(_Captioner):
    """Recurrent encoder over frames -> recurrent decoder started from the encoder's final state (S2VT-style).

    Encoder and decoder share cell type, width and depth, so the final state is handed over as is. With
    ``attention`` the decoder also attends over the encoder outputs of the real frames.
    memory: ``(*final_state,)`` or, with attention, ``(outputs (B, T, H), mask (B, T) bool, keys (B, T, H),
    *final_state)``; final_state is (h,) or (h, c), each (B, num_layers, H).
    """

    def __init__(self, config: RecurrentModelConfig, dims: ModelDims, *, cell: str) -> None:
        super().__init__()
        if dims.vocab_size < 4:
            raise ValueError("captioning models need vocab_size >= 4 (pad, bos, eos, unk)")
        self.config, self.dims, self.cell = config, dims, cell
        self.drop = nn.Dropout(config.dropout)
        self.encoder = RecurrentEncoder(cell, dims.feature_dim, config.hidden_size, config.num_layers,
                                        config.dropout, config.tbptt_steps)
        self.decoder = RecurrentDecoder(
            cell=cell, vocab_size=dims.vocab_size, embed_size=config.embed_size,
            hidden_size=config.hidden_size, num_layers=config.num_layers, dropout=config.dropout,
            context="attention" if config.attention else "none", context_size=config.hidden_size,
        )
        self._state_parts = 2 if cell == "lstm" else 1

    def encode(self, visual: Tensor, lengths: Tensor) -> tuple[Tensor, ...]:
        outputs, final = self.encoder(self.drop(visual), lengths)  # (B, T, H), each (B, L, H)
        if not self.config.attention:
            return final
        values = self.drop(outputs)
        return (values, length_mask(lengths, values.size(1)), self.decoder.attention_keys(values), *final)

    def init_state(self, memory: tuple[Tensor, ...]) -> State:
        return memory[-self._state_parts :]

    def _decoder_memory(self, memory: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return memory[:3] if self.config.attention else ()
