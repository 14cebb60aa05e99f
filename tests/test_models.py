"""Model contract tests: shapes, causality, padding, overfitting, TBPTT, decoding API, checkpoints, budgets.

Everything is tiny (feature_dim 8, hidden 16-24, vocab 13) and runs on one CPU thread.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from seqvision import checkpoint
from seqvision.blocks import ModelDims, caption_loss, center_clip
from seqvision.config import TASKS, ModelsConfig
from seqvision.models import MODELS, RECURRENT_FAMILIES, build_from_checkpoint, build_model, count_parameters, fit_to_budget, model_spec
from seqvision.vocab import BOS_ID as BOS
from seqvision.vocab import EOS_ID as EOS
from seqvision.vocab import PAD_ID as PAD

torch.set_num_threads(1)

FEATURE_DIM, VOCAB, CLASSES, GRID = 8, 13, 5, 4
FAMILIES = tuple(MODELS)
CAPTIONING = ("image_captioning", "video_captioning")

TINY = {
    "rnn": {"hidden_size": 24, "num_layers": 2, "embed_size": 8, "dropout": 0.1, "attention": True},
    "lstm": {"hidden_size": 16, "num_layers": 2, "embed_size": 8, "dropout": 0.1, "attention": True},
    "gru": {"hidden_size": 16, "num_layers": 2, "embed_size": 8, "dropout": 0.1, "attention": True},
    "transformer": {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "ffn_mult": 2, "dropout": 0.1},
    "meanpool": {"hidden_size": 16, "num_layers": 1, "embed_size": 8, "dropout": 0.1},
    "mingru": {"hidden_size": 16, "num_layers": 2, "embed_size": 8, "dropout": 0.1, "attention": True},
}

# Captioner variants: every family, plus the recurrent decoder without attention (a different code path).
CAPTIONERS = [(task, family, True) for task in CAPTIONING for family in FAMILIES] + [
    (task, "lstm", False) for task in CAPTIONING
]


def make(task: str, family: str, *, attention: bool = True, seed: int = 0, tbptt_steps: int = 0, **over):
    torch.manual_seed(seed)
    knobs = {**TINY[family], **over}
    if "attention" in knobs:
        knobs["attention"] = attention
    if family in RECURRENT_FAMILIES:
        knobs["tbptt_steps"] = tbptt_steps
    return build_model(task, family, knobs, dims=ModelDims(FEATURE_DIM, VOCAB, CLASSES))


def visual_batch(task: str, *, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Video: 3 clips of up to 7 frames (lengths 7, 4, 1), random values in the padding; image: 3 full grids."""
    g = torch.Generator().manual_seed(seed)
    if task == "image_captioning":
        return torch.randn(3, GRID, FEATURE_DIM, generator=g), torch.full((3,), GRID)
    return torch.randn(3, 7, FEATURE_DIM, generator=g), torch.tensor([7, 4, 1])


def caption_batch(*, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """<bos> w.. <eos> <pad>.. with lengths 8, 5, 3 (incl. bos/eos)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([8, 5, 3])
    tokens = torch.randint(4, VOCAB, (3, 8), generator=g)
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


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", TASKS)
def test_output_shapes_loss_and_gradients(task, family):
    model = make(task, family)
    visual, lengths = visual_batch(task)
    tokens, token_lengths = caption_batch()
    labels = torch.tensor([0, 3, 4])
    out, loss = run(model, task, visual, lengths, tokens, token_lengths, labels)
    expected = (3, CLASSES) if task == "activity" else (3, tokens.size(1) - 1, VOCAB)
    assert out.shape == expected
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"
    if task == "activity":
        assert model(visual, lengths)[1] is None  # no labels, no loss
    assert dataclasses.is_dataclass(model.config) and count_parameters(model) > 0


@pytest.mark.parametrize("task", TASKS)
def test_loss_is_the_mean_over_real_targets_with_optional_label_smoothing(task):
    model = make(task, "gru").eval()
    visual, lengths = visual_batch(task)
    tokens, token_lengths = caption_batch()
    labels = torch.tensor([0, 3, 4])
    with torch.no_grad():
        if task == "activity":
            logits, loss = model(visual, lengths, labels, label_smoothing=0.1)
            expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
        else:
            logits, loss = model(visual, lengths, tokens, token_lengths, label_smoothing=0.1)
            real = tokens[:, 1:] != PAD
            expected = torch.nn.functional.cross_entropy(logits[real], tokens[:, 1:][real], label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", TASKS)
def test_cuda_matches_cpu(task, family):
    model = make(task, family, tbptt_steps=3).eval()
    visual, lengths = visual_batch(task)
    tokens, token_lengths = caption_batch()
    labels = torch.tensor([0, 3, 4])
    with torch.no_grad():
        cpu_out, cpu_loss = run(model, task, visual, lengths, tokens, token_lengths, labels)
    model.cuda()
    cuda = [t.cuda() for t in (visual, lengths, tokens, token_lengths, labels)]
    with torch.no_grad():
        out, loss = run(model, task, *cuda)
    torch.testing.assert_close(out.cpu(), cpu_out, rtol=1e-3, atol=1e-3)
    model.train()
    run(model, task, *cuda)[1].backward()  # packed cuDNN recurrences and fused attention, forward and backward
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("task,family,attention", CAPTIONERS)
def test_decoder_is_causal(task, family, attention):
    model = make(task, family, attention=attention).eval()
    visual, lengths = visual_batch(task)
    tokens = torch.randint(4, VOCAB, (3, 9), generator=torch.Generator().manual_seed(3))
    tokens[:, 0] = BOS
    full = torch.full((3,), 9)
    t = 4  # change every token after position t
    changed = tokens.clone()
    changed[:, t + 1 :] = (tokens[:, t + 1 :] - 4 + 1) % (VOCAB - 4) + 4
    with torch.no_grad():
        a, _ = model(visual, lengths, tokens, full)
        b, _ = model(visual, lengths, changed, full)
    # logits[:, i] predict token i+1 from tokens[:, :i+1]: positions <= t-? see only unchanged inputs
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :], atol=1e-4), "later positions should see the change"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", TASKS)
def test_padding_never_leaks(task, family):
    model = make(task, family).eval()
    visual, lengths = visual_batch(task)
    tokens, token_lengths = caption_batch()
    labels = torch.tensor([0, 3, 4])
    # Different garbage in the padded frames, plus 3 extra padded frames and 2 extra padded token columns.
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
        real = tokens[:, 1:] != PAD  # (B, L-1) positions with a real target
        torch.testing.assert_close(out_a[real], out_b[:, : out_a.size(1)][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", TASKS)
def test_overfits_a_few_samples(task, family):
    model = make(task, family, dropout=0.0, hidden_size=32 if family != "rnn" else 48)
    visual, lengths = visual_batch(task)
    tokens, token_lengths = caption_batch()
    labels = torch.tensor([0, 3, 4])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3 if family == "transformer" else 1e-2)
    start = time.perf_counter()
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
    assert time.perf_counter() - start < 20


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_tbptt_truncates_gradients_but_not_the_forward_pass(cell):
    lengths = torch.tensor([9, 7, 2])
    visual = torch.randn(3, 9, FEATURE_DIM)
    full = make("activity", cell, dropout=0.0).eval()
    truncated = make("activity", cell, dropout=0.0, tbptt_steps=3).eval()
    truncated.load_state_dict(full.state_dict())

    # The gradient that matters is the one reaching the recurrent encoder's input: the classifier centres each
    # clip first (rnn.center_clip), and the clip mean is a non-recurrent path to every frame.
    seen = {}

    def keep_grad(module, args):
        args[0].retain_grad()
        seen["input"] = args[0]

    hook = truncated.encoder.register_forward_pre_hook(keep_grad)
    x = visual.clone().requires_grad_(True)
    logits, _ = truncated(x, lengths)
    hook.remove()
    # The forward pass is untouched: the hidden state is carried across chunks.
    torch.testing.assert_close(logits, full(visual, lengths)[0], rtol=1e-5, atol=1e-6)
    logits.sum().backward()
    frame_grad = seen["input"].grad.abs().sum(-1)  # (B, T)
    # Chunks end at each clip's last frame: 9 frames -> [0, 3), [3, 6), [6, 9); 7 -> [0, 1), [1, 4), [4, 7);
    # 2 -> [0, 2). The classifier reads the last real step, so exactly the last k frames get gradient.
    assert torch.all(frame_grad[0, :6] == 0) and torch.all(frame_grad[0, 6:] > 0)
    assert torch.all(frame_grad[1, :4] == 0) and torch.all(frame_grad[1, 4:7] > 0) and torch.all(frame_grad[1, 7:] == 0)
    assert torch.all(frame_grad[2, :2] > 0) and torch.all(frame_grad[2, 2:] == 0)
    # ...while the output still depends on the early chunk (through the carried, detached state).
    centred = center_clip(visual, lengths)
    early = centred.clone()
    early[0, 0] += 1.0
    with torch.no_grad():
        last = truncated.encoder(centred, lengths)[1][0][0, -1]  # top layer's final h of clip 0
        assert not torch.allclose(truncated.encoder(early, lengths)[1][0][0, -1], last, atol=1e-6)
    # Without truncation the first frame does get gradient.
    y = visual.clone().requires_grad_(True)
    full(y, lengths)[0].sum().backward()
    assert y.grad[0, 0].abs().sum() > 0


def test_tbptt_video_captioner_matches_full_forward():
    visual, lengths = visual_batch("video_captioning")
    tokens, token_lengths = caption_batch()
    full = make("video_captioning", "lstm").eval()
    truncated = make("video_captioning", "lstm", tbptt_steps=2).eval()
    truncated.load_state_dict(full.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            truncated(visual, lengths, tokens, token_lengths)[0], full(visual, lengths, tokens, token_lengths)[0],
            rtol=1e-5, atol=1e-6,
        )


@pytest.mark.parametrize("task,family,attention", CAPTIONERS)
def test_step_matches_teacher_forcing_and_survives_beam_reordering(task, family, attention):
    model = make(task, family, attention=attention).eval()
    visual, lengths = visual_batch(task)
    tokens, token_lengths = caption_batch()
    with torch.no_grad():
        logits, _ = model(visual, lengths, tokens, token_lengths)
        memory = model.encode(visual, lengths)
        state = model.init_state(memory)
        assert isinstance(memory, tuple) and isinstance(state, tuple)
        assert all(t.size(0) == 3 for t in (*memory, *state)), "batch must be on dim 0"
        order = torch.arange(3)
        for t in range(tokens.size(1) - 1):
            if t == 2:  # reorder the batch as beam search does, and keep going
                idx = torch.tensor([2, 0, 1])
                memory = tuple(m.index_select(0, idx) for m in memory)
                state = tuple(s.index_select(0, idx) for s in state)
                order = order[idx]
            step_logits, state = model.step(tokens[order, t], state, memory)
            real = tokens[order, t + 1] != PAD
            torch.testing.assert_close(step_logits[real], logits[order, t][real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", RECURRENT_FAMILIES)
@pytest.mark.parametrize("task", CAPTIONING)
def test_packed_attention_decoder_has_the_step_loops_loss_and_gradients(task, family):
    """The attention decoder's teacher forcing computes only real positions (rows sorted longest first): its loss
    and gradients are those of feeding every position of the padded batch through ``step``, whatever the order of
    the rows, and its logits are zero on padding."""
    model = make(task, family).eval()  # eval: no dropout, so both paths see the same maths
    visual, lengths = visual_batch(task)
    tokens, token_lengths = caption_batch()
    perm = torch.tensor([2, 0, 1])  # shortest caption first, longest in the middle
    visual, lengths, tokens, token_lengths = visual[perm], lengths[perm], tokens[perm], token_lengths[perm]
    params = list(model.parameters())

    logits, loss = model(visual, lengths, tokens, token_lengths)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    memory = model.encode(visual, lengths)
    state = model.init_state(memory)
    steps = []
    for t in range(tokens.size(1) - 1):
        step_logits, state = model.step(tokens[:, t], state, memory)
        steps.append(step_logits)
    reference = caption_loss(torch.stack(steps, dim=1), tokens[:, 1:])
    reference_grads = torch.autograd.grad(reference, params, allow_unused=True)

    torch.testing.assert_close(loss, reference)
    for name, g, r in zip([n for n, _ in model.named_parameters()], grads, reference_grads):
        assert (g is None) == (r is None), name
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7, msg=name)
    padding = tokens[:, 1:] == PAD
    assert padding.any() and torch.equal(logits[padding], torch.zeros_like(logits[padding]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", TASKS)
def test_checkpoint_rebuilds_an_identical_model(task, family, tmp_path):
    model = make(task, family, seed=7).eval()
    path = tmp_path / "best.pt"
    checkpoint.save(path, {"spec": model_spec(model, task=task, family=family), "model": model.state_dict(),
                           "epoch": 3})
    rebuilt = build_from_checkpoint(checkpoint.load(path)).eval()
    assert type(rebuilt) is type(model) and rebuilt.config == model.config and rebuilt.dims == model.dims
    visual, lengths = visual_batch(task)
    tokens, token_lengths = caption_batch()
    with torch.no_grad():
        a, _ = run(model, task, visual, lengths, tokens, token_lengths)
        b, _ = run(rebuilt, task, visual, lengths, tokens, token_lengths)
    assert torch.equal(a, b)


@pytest.mark.parametrize("task", TASKS)
def test_fit_to_budget_brings_every_family_within_tolerance(task):
    dims = ModelDims(feature_dim=32, vocab_size=50, num_classes=12)
    configs = {family: ModelsConfig().family(family) for family in FAMILIES}

    def count(family, config):
        return count_parameters(build_model(task, family, config, dims=dims))

    counts = {f: count(f, c) for f, c in configs.items()}
    assert max(counts.values()) > 1.3 * min(counts.values()), "defaults should differ, or the test proves nothing"
    for budget in (count("transformer", configs["transformer"]), 300_000):
        for family, config in configs.items():
            fitted, fitted_count = fit_to_budget(task, family, config, budget, dims=dims)
            assert type(fitted) is type(config) and fitted_count == count(family, fitted)
            assert abs(fitted_count - budget) <= 0.1 * budget, (family, budget)
            assert dataclasses.replace(fitted, hidden_size=config.hidden_size) == config  # only the width moves
            if family == "transformer":
                assert fitted.hidden_size % fitted.num_heads == 0


@pytest.mark.parametrize("task", TASKS)
def test_fit_to_budget_counts_exactly_at_two_layers_and_leaves_the_random_stream_alone(task):
    dims = ModelDims(feature_dim=32, vocab_size=50, num_classes=12)
    for family in FAMILIES:
        config = dataclasses.replace(ModelsConfig().family(family), num_layers=2)
        torch.manual_seed(0)
        fitted, fitted_count = fit_to_budget(task, family, config, 250_000, dims=dims)
        after = torch.rand(3)
        torch.manual_seed(0)
        assert torch.equal(after, torch.rand(3)), family  # sizing does not change what a seed trains
        assert fitted_count == count_parameters(build_model(task, family, fitted, dims=dims)), family


def test_fit_to_budget_reports_an_unreachable_budget_by_its_count():
    dims = ModelDims(feature_dim=8, vocab_size=1000)
    fitted, count = fit_to_budget("image_captioning", "lstm", TINY["lstm"], 10, dims=dims)
    assert fitted.hidden_size == 1 and count > 10_000  # the vocabulary layers alone exceed the budget


def test_meanpool_is_order_blind_and_the_sequence_models_are_not():
    visual, lengths = visual_batch("activity")
    shuffled = visual.clone()
    shuffled[0] = visual[0, torch.randperm(7, generator=torch.Generator().manual_seed(0))]
    outputs = {}
    for family in ("meanpool", "lstm", "transformer"):
        model = make("activity", family).eval()
        with torch.no_grad():
            outputs[family] = (model(visual, lengths)[0][0], model(shuffled, lengths)[0][0])
    torch.testing.assert_close(*outputs["meanpool"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(*outputs["lstm"], atol=1e-5)
    assert not torch.allclose(*outputs["transformer"], atol=1e-5)


def test_builder_rejects_bad_requests():
    with pytest.raises(ValueError, match="unknown model family"):
        build_model("activity", "mamba", dims=ModelDims(8, num_classes=3))
    with pytest.raises(ValueError, match="unknown task"):
        build_model("segmentation", "lstm", dims=ModelDims(8, num_classes=3))
    with pytest.raises(ValueError, match="vocab_size"):
        build_model("video_captioning", "lstm", dims=ModelDims(8))
    with pytest.raises(TypeError):
        build_model("activity", "lstm", {"num_heads": 2}, dims=ModelDims(8, num_classes=3))
    model = make("activity", "lstm")
    with pytest.raises(ValueError, match="lengths"):
        model(torch.randn(2, 5, FEATURE_DIM), torch.tensor([5, 0]))


def test_center_clip_removes_each_clips_mean_over_real_frames_only():
    visual = torch.randn(2, 5, 3) + torch.tensor([10.0, -4.0, 2.0])  # a large static part
    lengths = torch.tensor([5, 3])
    centred = center_clip(visual, lengths)
    torch.testing.assert_close(centred[0].mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(centred[1, :3].mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    assert torch.all(centred[1, 3:] == 0)  # padding stays padding
    torch.testing.assert_close(centred[1, :3], visual[1, :3] - visual[1, :3].mean(0))
