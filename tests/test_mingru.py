"""minGRU: the parallel scans equal the sequential recurrence, and every model keeps the model contract.

Everything is tiny (feature_dim 8, hidden 16, vocab 13) and runs on one CPU thread.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from seqvision.decode import beam_search, greedy_decode
from seqvision.mingru import (
    MINGRU_MODELS,
    MinGRU,
    MinGRULayer,
    g,
    log_g,
    parallel_scan,
    parallel_scan_log,
    sequential_scan,
)
from seqvision.blocks import ModelDims
from seqvision.config import ConfigError, MinGRUModelConfig, from_mapping
from seqvision.vocab import BOS_ID as BOS
from seqvision.vocab import EOS_ID as EOS
from seqvision.vocab import PAD_ID as PAD

torch.set_num_threads(1)

FEATURE_DIM, VOCAB, CLASSES, GRID = 8, 13, 5, 4
TASKS = tuple(MINGRU_MODELS)
CAPTIONING = ("image_captioning", "video_captioning")


def make(task: str, *, seed: int = 0, **over) -> torch.nn.Module:
    torch.manual_seed(seed)
    knobs = {"hidden_size": 16, "num_layers": 2, "embed_size": 8, "dropout": 0.1, "attention": True, **over}
    return MINGRU_MODELS[task](MinGRUModelConfig(**knobs), ModelDims(FEATURE_DIM, VOCAB, CLASSES))


def visual_batch(task: str, *, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Video: 3 clips of up to 7 frames (lengths 7, 4, 1), random values in the padding; image: 3 full grids."""
    gen = torch.Generator().manual_seed(seed)
    if task == "image_captioning":
        return torch.randn(3, GRID, FEATURE_DIM, generator=gen), torch.full((3,), GRID)
    return torch.randn(3, 7, FEATURE_DIM, generator=gen), torch.tensor([7, 4, 1])


def caption_batch(*, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """<bos> w.. <eos> <pad>.. with lengths 8, 5, 3 (incl. bos/eos)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([8, 5, 3])
    tokens = torch.randint(4, VOCAB, (3, 8), generator=gen)
    tokens[:, 0] = BOS
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n - 1] = EOS
        tokens[i, n:] = PAD
    return tokens, lengths


def run(model, task, visual, lengths, tokens=None, token_lengths=None, labels=None):
    if task == "activity":
        return model(visual, lengths, labels)
    return model(visual, lengths, tokens, token_lengths)


# --------------------------------------------------------------------------------------------------------
# The scan


def test_g_is_positive_continuous_and_log_g_is_its_log():
    x = torch.linspace(-30, 30, 2001, dtype=torch.float64)
    assert bool((g(x) > 0).all())
    torch.testing.assert_close(log_g(x), g(x).log())
    torch.testing.assert_close(g(torch.tensor([-1e-9, 1e-9])), torch.tensor([0.5, 0.5]))


def random_recurrence(B: int, T: int, H: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(B, T, H, generator=gen) * 0.98 + 0.01  # coefficients in (0, 1), as 1 - z
    b = torch.rand(B, T, H, generator=gen) * 2 + 1e-3  # positive values, as z * g(.)
    h0 = torch.rand(B, H, generator=gen) + 0.1
    return a, b, h0


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((got.double() - exact).abs() / exact.abs()).max())


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("scan", [parallel_scan, parallel_scan_log])
def test_parallel_scans_equal_the_linear_recurrence(scan, with_h0):
    a, b, h0 = random_recurrence(3, 50, 6)
    h0 = h0 if with_h0 else None
    expected = sequential_scan(a.double(), b.double(), None if h0 is None else h0.double())
    got = scan(a.log(), b.log(), None if h0 is None else h0.log())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [1, 15, 16, 17, 33, 1000])
def test_chunked_scan_is_exact_to_float32_rounding_at_any_length_and_chunk_boundary(length):
    """The training scan's error does not grow with T (the single log-space scan's does: > 1e-5 at T = 1000)."""
    a, b, h0 = random_recurrence(2, length, 5, seed=length)
    for start in (None, h0):
        expected = sequential_scan(a.double(), b.double(), None if start is None else start.double())
        got = parallel_scan(a.log(), b.log(), None if start is None else start.log())
        assert got.shape == (2, length, 5)
        assert relative_error(got, expected) < 1e-6
    if length == 1000:
        assert relative_error(parallel_scan_log(a.log(), b.log(), h0.log()), expected) > 1e-5


def test_chunked_scan_with_extreme_gates():
    """Gates that forget almost everything (a^30: a quarter of them below the scan's floor a >= e^-40, down to
    1e-60) and gates that keep almost everything (a = 1 - 1e-6 a) stay finite and exact: the floor is invisible."""
    a, b, h0 = random_recurrence(2, 300, 8, seed=3)
    for coeff in (a ** 8, a ** 30, 1 - a * 1e-6):
        expected = sequential_scan(coeff.double(), b.double(), h0.double())
        got = parallel_scan(coeff.log(), b.log(), h0.log())
        assert bool(torch.isfinite(got).all())
        assert relative_error(got, expected) < 1e-6


def test_parallel_layer_equals_sequential_layer_values_and_gradients():
    """Values and gradients of the parallel layer against the float64 sequential reference, normwise 1e-5."""
    torch.manual_seed(0)
    layer = MinGRULayer(5, 7)
    x = torch.randn(4, 40, 5)
    h0 = g(torch.randn(4, 7))

    def values_and_grads(layer: MinGRULayer, x: torch.Tensor, h0: torch.Tensor, scan: str) -> list[torch.Tensor]:
        x = x.clone().requires_grad_()
        layer.zero_grad()
        h = layer(x, h0, scan=scan)
        (h * torch.linspace(-1, 1, 7, dtype=h.dtype)).sum().backward()
        return [h.detach(), x.grad] + [p.grad for p in layer.parameters()]

    parallel = values_and_grads(layer, x, h0, "parallel")
    reference = values_and_grads(copy.deepcopy(layer).double(), x.double(), h0.double(), "sequential")
    for ours, exact in zip(parallel, reference):
        assert ours.dtype == torch.float32
        error = (ours.double() - exact).abs().max() / exact.abs().max()
        assert error < 1e-5, f"normwise relative error {error:.2e}"


def test_stack_with_lengths_equals_stepping_each_row_alone():
    """Padding/lengths: each row's outputs and final state equal a step-by-step run over its real frames only."""
    torch.manual_seed(0)
    rnn = MinGRU(5, 6, 3, dropout=0.0).eval()
    x = torch.randn(3, 9, 5) * 3
    lengths = torch.tensor([9, 5, 1])
    with torch.no_grad():
        out, final = rnn(x, lengths)
        for i, n in enumerate(lengths.tolist()):
            h = torch.zeros(1, 3, 6)  # h_{-1} = 0, the encoder's start
            tops = []
            for t in range(n):
                h = rnn.step(x[i : i + 1, t], h)
                tops.append(h[:, -1])
            torch.testing.assert_close(out[i, :n], torch.cat(tops), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(final[i], h[0], rtol=1e-5, atol=1e-5)
            assert bool((out[i, n:] == 0).all()), "outputs past a row's length must be zero"


def test_layer_scan_error_stays_at_float32_rounding_at_n_2048():
    """The chunked scan carries no error growth with t (docs/study.md, minGRU numerics)."""
    torch.manual_seed(0)
    layer = MinGRULayer(8, 16)
    x = torch.randn(1, 2048, 8)
    with torch.no_grad():
        parallel = layer(x, scan="parallel").double()
        reference = copy.deepcopy(layer).double()(x.double(), scan="sequential")
    relative = ((parallel - reference).abs() / reference).amax(dim=(0, 2))  # (T,)
    assert relative.max() < 1e-6


def test_bfloat16_inputs_are_scanned_in_float32():
    gen = torch.Generator().manual_seed(0)
    log_a = -torch.rand(2, 300, 4, generator=gen)
    log_b = torch.randn(2, 300, 4, generator=gen)
    exact = parallel_scan_log(log_a.double(), log_b.double())
    got = parallel_scan_log(log_a.bfloat16(), log_b.bfloat16())
    assert got.dtype == torch.bfloat16
    # Only the input and output roundings of bfloat16 remain (a bfloat16 cumsum over 300 steps is off by >10%).
    exact_from_rounded = parallel_scan_log(log_a.bfloat16().double(), log_b.bfloat16().double())
    torch.testing.assert_close(got.double(), exact_from_rounded, rtol=8e-3, atol=0)
    assert exact.shape == got.shape
    chunked = parallel_scan(log_a.bfloat16(), log_b.bfloat16())
    assert chunked.dtype == torch.bfloat16
    torch.testing.assert_close(chunked.double(), exact_from_rounded, rtol=8e-3, atol=0)


# --------------------------------------------------------------------------------------------------------
# The models


@pytest.mark.parametrize("task", TASKS)
def test_output_shapes_loss_and_gradients(task):
    model = make(task)
    visual, lengths = visual_batch(task)
    tokens, token_lengths = caption_batch()
    out, loss = run(model, task, visual, lengths, tokens, token_lengths, torch.tensor([0, 3, 4]))
    assert out.shape == ((3, CLASSES) if task == "activity" else (3, tokens.size(1) - 1, VOCAB))
    loss.backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"
    assert dataclasses.is_dataclass(model.config)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("attention", [True, False])
def test_parallel_and_sequential_models_agree(task, attention):
    parallel = make(task, attention=attention).eval()
    sequential = make(task, attention=attention, scan="sequential").eval()
    sequential.load_state_dict(parallel.state_dict())
    visual, lengths = visual_batch(task)
    tokens, token_lengths = caption_batch()
    with torch.no_grad():
        a, _ = run(parallel, task, visual, lengths, tokens, token_lengths)
        b, _ = run(sequential, task, visual, lengths, tokens, token_lengths)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task", CAPTIONING)
@pytest.mark.parametrize("attention", [True, False])
def test_step_matches_teacher_forcing_and_survives_beam_reordering(task, attention):
    model = make(task, attention=attention).eval()
    visual, lengths = visual_batch(task)
    tokens, token_lengths = caption_batch()
    with torch.no_grad():
        logits, _ = model(visual, lengths, tokens, token_lengths)
        memory = model.encode(visual, lengths)
        state = model.init_state(memory)
        assert all(t.size(0) == 3 for t in (*memory, *state)), "batch must be on dim 0"
        order = torch.arange(3)
        for t in range(tokens.size(1) - 1):
            if t == 2:  # reorder the batch as beam search does, and keep going
                idx = torch.tensor([2, 0, 1])
                memory = tuple(m.index_select(0, idx) for m in memory)
                state = tuple(s.index_select(0, idx) for s in state)
                order = order[idx]
            step_logits, state = model.step(tokens[order, t], state, memory)
            assert state[0].shape == (3, 2, 16), "the decoding state is O(1): (B, layers, H) at every step"
            real = tokens[order, t + 1] != PAD
            torch.testing.assert_close(step_logits[real], logits[order, t][real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("task", CAPTIONING)
def test_greedy_and_beam_search_run_on_the_decoding_api(task):
    model = make(task).eval()
    visual, lengths = visual_batch(task)
    greedy = greedy_decode(model, visual, lengths, max_length=6)
    beam = beam_search(model, visual, lengths, beam_size=3, max_length=6)
    assert greedy.tokens.shape[0] == beam.tokens.shape[0] == 3
    assert bool((beam.score >= greedy.score - 1e-5).all()), "a 3-beam search should never score below greedy"


@pytest.mark.parametrize("task", CAPTIONING)
@pytest.mark.parametrize("attention", [True, False])
def test_decoder_is_causal(task, attention):
    model = make(task, attention=attention).eval()
    visual, lengths = visual_batch(task)
    tokens = torch.randint(4, VOCAB, (3, 9), generator=torch.Generator().manual_seed(3))
    tokens[:, 0] = BOS
    full = torch.full((3,), 9)
    t = 4
    changed = tokens.clone()
    changed[:, t + 1 :] = (tokens[:, t + 1 :] - 4 + 1) % (VOCAB - 4) + 4
    with torch.no_grad():
        a, _ = model(visual, lengths, tokens, full)
        b, _ = model(visual, lengths, changed, full)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :], atol=1e-4), "later positions should see the change"


@pytest.mark.parametrize("task", TASKS)
def test_padding_never_leaks(task):
    model = make(task).eval()
    visual, lengths = visual_batch(task)
    tokens, token_lengths = caption_batch()
    labels = torch.tensor([0, 3, 4])
    garbage = torch.randn(3, visual.size(1) + 3, FEATURE_DIM) * 100
    mask = (torch.arange(visual.size(1))[None, :] < lengths[:, None]).unsqueeze(-1)
    padded = garbage.clone()
    padded[:, : visual.size(1)] = torch.where(mask, visual, garbage[:, : visual.size(1)])
    longer_tokens = torch.cat([tokens, torch.full((3, 2), PAD)], dim=1)
    with torch.no_grad():
        out_a, loss_a = run(model, task, visual, lengths, tokens, token_lengths, labels)
        out_b, loss_b = run(model, task, padded, lengths, longer_tokens, token_lengths, labels)
    if task == "activity":
        torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    else:
        real = tokens[:, 1:] != PAD
        torch.testing.assert_close(out_a[real], out_b[:, : out_a.size(1)][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)


def test_activity_model_is_causal_in_time_and_reads_the_last_real_frame():
    """The final state at length n depends on frames < n only: appending frames (length unchanged) is invisible,
    while changing the last real frame changes the logits."""
    model = make("activity").eval()
    visual, lengths = visual_batch("activity")
    with torch.no_grad():
        base, _ = model(visual, lengths)
        changed = visual.clone()
        changed[0, 6] += 1.0  # clip 0 has 7 real frames: its last one
        other, _ = model(changed, lengths)
    assert not torch.allclose(base[0], other[0], atol=1e-5)
    torch.testing.assert_close(base[1:], other[1:], rtol=0, atol=0)


@pytest.mark.parametrize("task", TASKS)
def test_overfits_a_few_samples(task):
    model = make(task, dropout=0.0, hidden_size=32)
    visual, lengths = visual_batch(task)
    tokens, token_lengths = caption_batch()
    labels = torch.tensor([0, 3, 4])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(300):
        _, loss = run(model, task, visual, lengths, tokens, token_lengths, labels)
        first = loss.item() if first is None else first
        if loss.item() < 0.02:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.02, f"loss {first:.3f} -> {loss.item():.3f}"


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="mingru.scan: expected one of 'parallel', 'sequential'"):
        from_mapping(MinGRUModelConfig, {"scan": "blelloch"}, where="mingru")
    with pytest.raises(ValueError, match="num_classes"):
        MINGRU_MODELS["activity"](MinGRUModelConfig(), ModelDims(8))
    with pytest.raises(ValueError, match="vocab_size"):
        MINGRU_MODELS["video_captioning"](MinGRUModelConfig(), ModelDims(8))
