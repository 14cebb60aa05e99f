"""Greedy decoding and beam search on toy models whose best sequence can be found by enumeration."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

from seqvision.decode import BeamStep, beam_search, decode, greedy_decode, length_penalty, reorder
from seqvision.vocab import BOS_ID as BOS
from seqvision.vocab import EOS_ID as EOS
from seqvision.vocab import PAD_ID as PAD


class PrefixTableModel:
    """A deterministic toy captioner: logits = table[item, code(prefix)], a fixed random table.

    The state carries a code of the whole prefix fed so far (code <- code * V + prev), so the logits depend
    on the full history and a beam search that reorders its state wrongly gets them wrong. The memory holds
    the item index. It records every ``prev_tokens`` it is fed (to check there is no teacher forcing).
    """

    training = False

    def __init__(self, table: Tensor) -> None:
        self.table = table  # (items, codes, V)
        self.vocab = table.size(-1)
        self.fed: list[Tensor] = []

    def encode(self, visual: Tensor, lengths: Tensor) -> tuple[Tensor, None]:
        return visual[:, 0, 0].long(), None  # (B,) item index; a None entry must pass through

    def init_state(self, memory: tuple[Tensor, None]) -> tuple[Tensor]:
        return (torch.zeros_like(memory[0]),)

    def step(self, prev: Tensor, state: tuple[Tensor], memory: tuple[Tensor, None]) -> tuple[Tensor, tuple[Tensor]]:
        self.fed.append(prev.clone())
        code = state[0] * self.vocab + prev  # (B,)
        return self.table[memory[0], code], (code,)

    def log_prob(self, item: int, sequence: list[int]) -> float:
        """Log-probability of generating ``sequence`` (the search excludes <pad> and <bos> but does not
        renormalise, so these are the model's own log-probabilities)."""
        code, prev, total = 0, BOS, 0.0
        for token in sequence:
            code = code * self.vocab + prev
            total += torch.log_softmax(self.table[item, code].double(), -1)[token].item()
            prev = token
        return total


def _inputs(num_items: int) -> tuple[Tensor, Tensor]:
    visual = torch.arange(num_items, dtype=torch.float32).view(num_items, 1, 1)  # (B, T=1, D=1)
    return visual, torch.ones(num_items, dtype=torch.long)


def _random_model(num_items: int, vocab: int, max_length: int, seed: int) -> PrefixTableModel:
    g = torch.Generator().manual_seed(seed)
    codes = vocab ** (max_length + 1)
    return PrefixTableModel(2.0 * torch.randn(num_items, codes, vocab, generator=g))


def _exhaustive_best(model: PrefixTableModel, item: int, max_length: int, alpha: float) -> tuple[list[int], float]:
    """Every sequence the decoder may produce: tokens other than <pad>/<bos>, stopping at the first <eos>
    or after max_length tokens."""
    words = [t for t in range(model.vocab) if t not in (PAD, BOS, EOS)]
    candidates = [list(p) + [EOS] for n in range(max_length) for p in itertools.product(words, repeat=n)]
    candidates += [list(p) for p in itertools.product(words, repeat=max_length)]
    scored = [
        (model.log_prob(item, seq) / ((5 + len(seq)) / 6) ** alpha, seq) for seq in candidates
    ]
    score, seq = max(scored)
    return seq, score


def _check_well_formed(tokens: Tensor, lengths: Tensor) -> None:
    for row, n in zip(tokens.tolist(), lengths.tolist()):
        assert EOS not in row[: n - 1]  # stops at its first <eos>
        assert all(t == PAD for t in row[n:])  # finished hypotheses stop growing
        assert PAD not in row[:n] and BOS not in row[:n]
    assert tokens.size(1) == int(lengths.max())


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_wide_beam_finds_the_exhaustive_best(alpha: float) -> None:
    num_items, vocab, max_length = 4, 5, 4
    model = _random_model(num_items, vocab, max_length, seed=0)
    visual, lengths = _inputs(num_items)
    # at most 1 + 2 + 4 + 8 finished + 16 unfinished = 31 hypotheses: 32 beams keep every one
    out = beam_search(model, visual, lengths, beam_size=32, max_length=max_length, length_penalty_alpha=alpha)
    greedy = greedy_decode(model, visual, lengths, max_length=max_length, length_penalty_alpha=alpha)
    _check_well_formed(out.tokens, out.lengths)
    greedy_is_optimal = []
    for item in range(num_items):
        best, best_score = _exhaustive_best(model, item, max_length, alpha)
        n = int(out.lengths[item])
        assert out.tokens[item, :n].tolist() == best
        assert float(out.score[item]) == pytest.approx(best_score, abs=1e-4)
        assert float(out.log_prob[item]) == pytest.approx(model.log_prob(item, best), abs=1e-4)
        greedy_is_optimal.append(greedy.tokens[item, : int(greedy.lengths[item])].tolist() == best)
    assert not all(greedy_is_optimal)  # the search has something to find beyond greedy


def test_beam_of_one_equals_greedy() -> None:
    num_items, vocab, max_length = 6, 6, 5
    model = _random_model(num_items, vocab, max_length, seed=1)
    visual, lengths = _inputs(num_items)
    greedy = greedy_decode(model, visual, lengths, max_length=max_length)
    beam = beam_search(model, visual, lengths, beam_size=1, max_length=max_length)
    assert torch.equal(beam.tokens, greedy.tokens)
    assert torch.equal(beam.lengths, greedy.lengths)
    torch.testing.assert_close(beam.log_prob, greedy.log_prob)
    assert torch.equal(decode(model, visual, lengths, beam_size=1, max_length=max_length).tokens, greedy.tokens)
    _check_well_formed(greedy.tokens, greedy.lengths)


def _scripted_model(vocab: int = 5, max_length: int = 4) -> PrefixTableModel:
    """Item 0: '<eos>' at once has p = 0.5; '3 3 <eos>' has p = 0.45 * 0.95 * 0.95 = 0.406.
    Item 1: never emits <eos> with any weight (token 4 has p ~ 1 everywhere)."""
    codes = vocab ** (max_length + 1)
    table = torch.full((2, codes, vocab), -30.0)
    table[0, :, 4] = 0.0  # default for item 0: token 4
    first = BOS  # code after feeding <bos> from code 0
    table[0, first] = torch.log(torch.tensor([1e-9, 1e-9, 0.5, 0.45, 0.05]))
    after_3 = first * vocab + 3
    table[0, after_3] = torch.log(torch.tensor([1e-9, 1e-9, 0.04, 0.95, 0.01]))
    after_33 = after_3 * vocab + 3
    table[0, after_33] = torch.log(torch.tensor([1e-9, 1e-9, 0.95, 0.04, 0.01]))
    table[1, :, 4] = 10.0
    return PrefixTableModel(table)


def test_length_penalty_changes_the_ranking() -> None:
    model = _scripted_model()
    visual, lengths = _inputs(1)
    # alpha = 0: log 0.5 = -0.693 beats log 0.406 = -0.901 -> the one-token caption '<eos>'
    short = beam_search(model, visual, lengths, beam_size=4, max_length=4, length_penalty_alpha=0.0)
    assert short.tokens[0].tolist() == [EOS]
    # alpha = 1: -0.693 / ((5+1)/6) = -0.693 vs -0.901 / ((5+3)/6) = -0.676 -> '3 3 <eos>' wins
    long = beam_search(model, visual, lengths, beam_size=4, max_length=4, length_penalty_alpha=1.0)
    assert long.tokens[0].tolist() == [3, 3, EOS]
    assert float(long.score[0]) == pytest.approx(float(long.log_prob[0]) / (8 / 6), rel=1e-6)
    assert float(long.log_prob[0]) == pytest.approx(torch.tensor(0.45 * 0.95 * 0.95).log().item(), rel=1e-5)
    assert float(length_penalty(torch.tensor(3), 0.6)) == pytest.approx((8 / 6) ** 0.6)


def test_narrow_beam_ranks_finished_and_live_hypotheses_by_normalised_score() -> None:
    # vocab 5 (pad, bos, eos, 3, 4), alpha = 6 so that lp(1) = 1, lp(2) = (7/6)^6 = 2.52, lp(3) = (8/6)^6 = 5.62
    vocab, max_length = 5, 3
    table = torch.full((1, vocab ** (max_length + 1), vocab), -30.0)
    table[0, :, 4] = 0.0
    c0 = BOS
    table[0, c0] = torch.log(torch.tensor([1e-9, 1e-9, 0.5, 0.49, 0.01]))  # '<eos>' -0.693, '3' -0.713
    c3 = c0 * vocab + 3
    table[0, c3] = torch.log(torch.tensor([1e-9, 1e-9, 0.01, 0.5, 0.49]))  # '3 3' -1.406, '3 4' -1.427
    table[0, c3 * vocab + 3] = torch.log(torch.tensor([1e-9, 1e-9, 0.01, 0.49, 0.5]))
    table[0, c3 * vocab + 4] = torch.log(torch.tensor([1e-9, 1e-9, 0.99, 0.005, 0.005]))  # '3 4 <eos>' -1.437
    model = PrefixTableModel(table)
    visual, lengths = _inputs(1)
    # Step 1 with 2 beams: by raw log-prob '<eos>' (-0.693) and '3 3' (-1.406) survive and '3 4' is cut;
    # by normalised score '3 3' (-0.558) and '3 4' (-0.566) beat the finished '<eos>' (-0.693), and
    # '3 4 <eos>' (-1.437 / 5.62 = -0.256) wins at the end, as exhaustive search confirms.
    out = beam_search(model, visual, lengths, beam_size=2, max_length=max_length, length_penalty_alpha=6.0)
    assert out.tokens[0].tolist() == [3, 4, EOS]
    assert out.tokens[0].tolist() == _exhaustive_best(model, 0, max_length, 6.0)[0]


def test_on_step_shows_every_step_of_the_search_without_changing_it() -> None:
    num_items, vocab, max_length, k, alpha = 3, 6, 5, 3, 0.6
    model = _random_model(num_items, vocab, max_length, seed=3)
    visual, lengths = _inputs(num_items)
    steps: list[BeamStep] = []
    out = beam_search(model, visual, lengths, beam_size=k, max_length=max_length, length_penalty_alpha=alpha,
                      on_step=steps.append)
    plain = beam_search(model, visual, lengths, beam_size=k, max_length=max_length, length_penalty_alpha=alpha)
    assert torch.equal(out.tokens, plain.tokens) and torch.equal(out.score, plain.score)
    assert [s.step for s in steps] == list(range(len(steps))) and 1 <= len(steps) <= max_length
    for before, after in zip(steps, steps[1:]):
        assert after.tokens.shape == (num_items, k, after.step + 1)
        # every beam extends the beam it names: the search's own back-pointers
        extended = before.tokens.gather(1, after.source.unsqueeze(-1).expand(-1, -1, before.step + 1))
        assert torch.equal(after.tokens[:, :, :-1], extended)
    for s in steps:  # the score is the log-probability over the length penalty of the generated tokens
        generated = (s.tokens != PAD).sum(-1)  # (B, k), <eos> included
        live = torch.isfinite(s.log_prob)
        torch.testing.assert_close(s.score[live], (s.log_prob / length_penalty(generated, alpha))[live])
    last = steps[-1]
    best = last.score.argmax(-1)  # (B,)
    for item in range(num_items):
        n = int(out.lengths[item])
        assert last.tokens[item, best[item], :n].tolist() == out.tokens[item, :n].tolist()
        assert float(last.score[item, best[item]]) == pytest.approx(float(out.score[item]))


def test_on_step_shows_a_finished_hypothesis_kept_until_a_longer_one_passes_it() -> None:
    model = _scripted_model()
    visual, lengths = _inputs(1)
    steps: list[BeamStep] = []
    beam_search(model, visual, lengths, beam_size=2, max_length=4, length_penalty_alpha=1.0, on_step=steps.append)
    # step 0: '<eos>' (log 0.5 = -0.693, finished) and '3' (log 0.45); step 1: '<eos>' stays first, padded,
    # ahead of '3 3' (log 0.4275 / (7/6) = -0.729); step 2: '3 3 <eos>' (log 0.406 / (8/6) = -0.676) passes it
    assert steps[0].tokens[0].tolist() == [[EOS], [3]] and steps[0].finished[0].tolist() == [True, False]
    assert steps[1].tokens[0].tolist() == [[EOS, PAD], [3, 3]] and steps[1].source[0].tolist() == [0, 1]
    assert float(steps[1].score[0, 0]) == pytest.approx(torch.tensor(0.5).log().item(), rel=1e-5)
    assert steps[-1].tokens[0, 0, :3].tolist() == [3, 3, EOS]

@pytest.mark.parametrize("beam_size", [1, 3])
def test_finished_hypotheses_stop_growing(beam_size: int) -> None:
    model = _scripted_model()
    visual, lengths = _inputs(2)
    out = decode(model, visual, lengths, beam_size=beam_size, max_length=4)
    # item 0 (greedy and beam, alpha 0): '<eos>' at step 0, then only padding, score frozen at log 0.5
    assert out.tokens[0].tolist() == [EOS, PAD, PAD, PAD]
    assert int(out.lengths[0]) == 1
    assert float(out.log_prob[0]) == pytest.approx(torch.tensor(0.5).log().item(), rel=1e-5)
    # item 1 never finishes: max_length tokens, no <eos>
    assert out.tokens[1].tolist() == [4, 4, 4, 4]
    assert int(out.lengths[1]) == 4
    _check_well_formed(out.tokens, out.lengths)


def test_decoding_feeds_back_its_own_tokens() -> None:
    num_items, vocab, max_length = 5, 6, 5
    model = _random_model(num_items, vocab, max_length, seed=2)
    visual, lengths = _inputs(num_items)
    out = greedy_decode(model, visual, lengths, max_length=max_length)
    assert model.fed[0].tolist() == [BOS] * num_items
    for t, fed in enumerate(model.fed[1:]):
        for item in range(num_items):
            if t < int(out.lengths[item]):
                assert int(fed[item]) == int(out.tokens[item, t])
    assert len(model.fed) == int(out.lengths.max())  # stops once every sequence has finished


def test_reorder_selects_rows_of_every_tensor_and_keeps_none() -> None:
    a, b = torch.arange(6).view(3, 2), torch.arange(3.0)
    out = reorder((a, None, b), torch.tensor([2, 2, 0]))
    assert out[1] is None
    assert out[0].tolist() == [[4, 5], [4, 5], [0, 1]] and out[2].tolist() == [2.0, 2.0, 0.0]
    assert reorder(None, torch.tensor([0])) is None


class TinyGRUCaptioner(nn.Module):
    """A real (random) recurrent captioner with a multi-tensor memory and a float state."""

    def __init__(self, feature_dim: int = 4, hidden: int = 8, vocab: int = 9) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.init = nn.Linear(feature_dim, hidden)
        self.cell = nn.GRUCell(hidden + feature_dim, hidden)
        self.out = nn.Linear(hidden, vocab)

    def encode(self, visual: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, None]:
        mask = torch.arange(visual.size(1), device=visual.device) < lengths[:, None]  # (B, T)
        mean = (visual * mask[..., None]).sum(1) / lengths[:, None]  # (B, D)
        return mean, mask, None

    def init_state(self, memory: tuple[Tensor, Tensor, None]) -> tuple[Tensor]:
        return (torch.tanh(self.init(memory[0])),)

    def step(
        self, prev: Tensor, state: tuple[Tensor], memory: tuple[Tensor, Tensor, None]
    ) -> tuple[Tensor, tuple[Tensor]]:
        h = self.cell(torch.cat([self.embed(prev), memory[0]], dim=-1), state[0])  # (B, H)
        return 3.0 * self.out(h), (h,)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_real_module_beam_search_on_device(device: str) -> None:
    torch.manual_seed(0)
    model = TinyGRUCaptioner().to(device).eval()
    visual = torch.randn(5, 3, 4, device=device)
    lengths = torch.tensor([3, 1, 2, 3, 2], device=device)
    greedy = greedy_decode(model, visual, lengths, max_length=7)
    beam1 = beam_search(model, visual, lengths, beam_size=1, max_length=7)
    assert torch.equal(greedy.tokens, beam1.tokens)
    beam = beam_search(model, visual, lengths, beam_size=4, max_length=7)
    assert beam.tokens.device.type == device
    _check_well_formed(beam.tokens.cpu(), beam.lengths.cpu())
    # Batched decoding equals decoding each item on its own.
    for i in range(5):
        alone = beam_search(model, visual[i : i + 1], lengths[i : i + 1], beam_size=4, max_length=7)
        n = int(alone.lengths[0])
        assert beam.tokens[i, :n].tolist() == alone.tokens[0, :n].tolist()


def test_training_mode_is_refused() -> None:
    model = TinyGRUCaptioner()  # nn.Module starts in training mode
    with pytest.raises(ValueError, match="eval"):
        greedy_decode(model, torch.randn(1, 2, 4), torch.tensor([2]), max_length=3)
