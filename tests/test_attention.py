"""attention: each module's ``weights`` are the ones its forward applies; replaying a caption reproduces greedy
decoding and records, per word, a distribution over the real memory positions only; the Transformer's encoder
self-attention; the families without attention give None."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqvision import checkpoint
from seqvision.attention import (
    caption_attention,
    encoder_self_attention,
    recording,
    replay_caption,
    word_attention_module,
)
from seqvision.blocks import ModelDims
from seqvision.datasets import VisualStore
from seqvision.tasks import task_spec
from seqvision.decode import greedy_decode
from seqvision.encoders import SmallCNN, SmallCNNConfig
from seqvision.mingru import DotAttention
from seqvision.models import PixelModel, build_from_checkpoint, build_model
from seqvision.rnn import AdditiveAttention
from seqvision.transformer import Attention
from seqvision.vocab import BOS_ID, EOS_ID, PAD_ID

torch.set_num_threads(1)

CAPTIONING = ("image_captioning", "video_captioning")
TINY_FAMILIES = ("gru", "transformer", "meanpool")  # the families of the tiny_checkpoints fixture
FEATURE_DIM, VOCAB = 6, 11
# Fresh models of every family with attention; transformer with two layers, so "the last one" is a choice.
FRESH = {
    "rnn": {"hidden_size": 12, "embed_size": 8, "num_layers": 2},
    "lstm": {"hidden_size": 12, "embed_size": 8},
    "gru": {"hidden_size": 12, "embed_size": 8},
    "mingru": {"hidden_size": 12, "embed_size": 8, "num_layers": 2},
    "transformer": {"hidden_size": 8, "num_heads": 2, "num_layers": 2},
}


def fresh(task: str, family: str, **over) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(task, family, {**FRESH.get(family, {}), **over},
                       dims=ModelDims(FEATURE_DIM, vocab_size=VOCAB)).eval()


def caption(model, visual: torch.Tensor, length: int, *, max_length: int = 9) -> torch.Tensor:
    """The model's greedy caption of one item: (L,) ids without <bos>, <eos> last when it finished."""
    out = greedy_decode(model, visual[None], torch.tensor([length]), max_length=max_length)
    return out.tokens[0, : int(out.lengths[0])]


def check_distribution(weights: torch.Tensor, rows: int, length: int) -> None:
    assert weights.dtype == torch.float32 and weights.shape == (rows, length)
    assert bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(-1), torch.ones(rows), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------
# The modules: ``weights`` takes forward's arguments and gives the weights forward applies


def test_each_attention_modules_weights_are_the_ones_its_forward_applies():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    values, mask = torch.randn(2, 5, 6, generator=g), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    additive = AdditiveAttention(6, 4, 7)
    query, keys = torch.randn(2, 4, generator=g), additive.keys(values)
    weights = additive.weights(query, keys, values, mask)  # (B, S)
    torch.testing.assert_close(torch.bmm(weights[:, None], values)[:, 0], additive(query, keys, values, mask))
    assert bool((weights[0, 3:] == 0).all())

    dot = DotAttention(6, 4)
    query, keys = torch.randn(2, 3, 4, generator=g), dot.keys(values)
    weights = dot.weights(query, keys, values, mask)  # (B, L, S)
    torch.testing.assert_close(torch.bmm(weights, values), dot(query, keys, values, mask))

    x, source = torch.randn(2, 3, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    cache = (torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 2, 4, 4, generator=g))
    for impl in ("sdpa", "naive"):
        attention = Attention(8, 2, 0.0, impl).eval()
        for args, kwargs in (((x, source), {"mask": mask[:, None, None, :]}),  # cross-attention, padded memory
                             ((x,), {"is_causal": True}),  # decoder self-attention
                             ((x[:, -1:],), {"cache": cache})):  # one step after 4 cached positions
            out, (_, v) = attention(*args, **kwargs)
            weights = attention.weights(*args, **kwargs)  # (B, h, Lq, Lk)
            merged = (weights @ v).transpose(1, 2).reshape(out.shape)  # (B, Lq, D)
            torch.testing.assert_close(attention.proj(merged), out, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


# --------------------------------------------------------------------------------------------------------
# The tiny trained captioners, on real tiny test items


def tiny_item(artifacts, task: str, model) -> tuple[torch.Tensor, int]:
    """The test item with the longest greedy caption among those with padding after their real positions: clips
    one frame short, or image grids with two extra rows of large noise (image grids have no padding of their
    own)."""
    store = VisualStore(artifacts.features, kind=task_spec(task).kind, split="test")
    noise = 50 * torch.randn(2, store.row(store.ids[0]).shape[-1], generator=torch.Generator().manual_seed(3))
    items = []
    for i in store.ids:
        visual, length = torch.from_numpy(store.load(i)).float(), store.length(i)
        if task == "image_captioning":
            visual = torch.cat([visual, noise])
        if length < visual.size(0):
            items.append((visual, length))
    return max(items, key=lambda item: caption(model, *item, max_length=10).numel())


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("task", CAPTIONING)
def test_replaying_the_greedy_caption_reproduces_it_and_attends_to_real_positions_only(
        task, family, tiny_artifacts, tiny_checkpoints):
    model = build_from_checkpoint(checkpoint.load(tiny_checkpoints[task, family])).eval()
    visual, length = tiny_item(tiny_artifacts, task, model)
    decoded = greedy_decode(model, visual[None], torch.tensor([length]), max_length=10)
    tokens = decoded.tokens[0, : int(decoded.lengths[0])]
    assert tokens.numel() >= 2

    replay = replay_caption(model, visual, length, tokens)
    logp = torch.log_softmax(replay.logits, dim=-1)
    logp[:, [PAD_ID, BOS_ID]] = float("-inf")  # never generated (decode._log_probs)
    assert torch.equal(logp.argmax(-1), tokens)  # every step predicts the word greedy chose there
    torch.testing.assert_close(logp.gather(1, tokens[:, None]).sum(), decoded.log_prob[0], atol=1e-5, rtol=0)

    weights = caption_attention(model, visual, length, tokens)
    if family == "meanpool":
        assert weights is None and word_attention_module(model) is None
        assert encoder_self_attention(model, visual, length) is None
        return
    check_distribution(weights, tokens.numel(), length)
    # Padding excluded: the item without its padding attends exactly alike, for its own caption and a reference.
    torch.testing.assert_close(caption_attention(model, visual[:length], length, tokens), weights)
    reference = torch.tensor([4, 5, 6, 7, EOS_ID])
    check_distribution(caption_attention(model, visual, length, reference), 5, length)
    torch.testing.assert_close(caption_attention(model, visual[:length], length, reference),
                               caption_attention(model, visual, length, reference))
    encoder = encoder_self_attention(model, visual, length)
    if family != "transformer":
        assert encoder is None
        return
    layers, heads = model.config.num_layers, model.config.num_heads
    assert encoder.dtype == torch.float32 and encoder.shape == (layers, heads, length, length)
    assert bool((encoder >= 0).all())
    torch.testing.assert_close(encoder.sum(-1), torch.ones(layers, heads, length), atol=1e-5, rtol=0)
    torch.testing.assert_close(encoder_self_attention(model, visual[:length], length), encoder)


# --------------------------------------------------------------------------------------------------------
# Every family with attention (fresh weights): the replay is aligned with teacher forcing


def visual_item(task: str) -> tuple[torch.Tensor, int]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(7 if task == "video_captioning" else 4, FEATURE_DIM, generator=g), 5 if task == \
        "video_captioning" else 4


@pytest.mark.parametrize("family", tuple(FRESH))
@pytest.mark.parametrize("task", CAPTIONING)
def test_step_t_attention_is_what_teacher_forcing_on_the_caption_attends_at_position_t(task, family):
    model = fresh(task, family)
    visual, length = visual_item(task)
    tokens = torch.tensor([5, 7, 4, 9, EOS_ID])
    weights = caption_attention(model, visual, length, tokens)
    check_distribution(weights, tokens.numel(), length)
    # The teacher-forced forward (all positions at once for the transformer and minGRU) sees <bos> w1 .. wn:
    # position t is fed token t-1 and predicts token t, as the replay's step t.
    module = word_attention_module(model)
    with recording([module]) as calls, torch.no_grad():
        model(visual[None], torch.tensor([length]), torch.cat([torch.tensor([BOS_ID]), tokens])[None])
    forced = torch.cat([w.mean(dim=1)[0] for w in calls[0]])  # (L, S): heads averaged
    torch.testing.assert_close(weights, forced[:, :length], atol=1e-5, rtol=1e-4)
    if family == "transformer":
        assert module is model.blocks[-1].cross_attn  # the last decoder layer, whose output predicts the word
    # Different words attend differently (a map that ignored the step would repeat one row).
    assert not torch.allclose(weights[0], weights[1])


@pytest.mark.parametrize("task", CAPTIONING)
def test_families_without_attention_give_none(task):
    visual, length = visual_item(task)
    tokens = torch.tensor([5, EOS_ID])
    for family, over in (("meanpool", {}), ("lstm", {"attention": False}), ("mingru", {"attention": False})):
        model = fresh(task, family, **over)
        assert caption_attention(model, visual, length, tokens) is None
        assert encoder_self_attention(model, visual, length) is None


def test_a_fine_tuned_encoders_image_attends_over_its_grid_cells():
    torch.manual_seed(0)
    encoder = SmallCNN(SmallCNNConfig(feature_dim=16, grid=2, width=8, num_colors=2, slot_dim=6)).eval()
    model = PixelModel(encoder, build_model("image_captioning", "transformer", {"hidden_size": 8, "num_heads": 2},
                                            dims=ModelDims(16, vocab_size=VOCAB))).eval()
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    tokens = caption(model, image, 1)
    check_distribution(caption_attention(model, image, 1, tokens), tokens.numel(), 4)  # 2x2 grid cells, all real
    assert encoder_self_attention(model, image, 1).shape == (1, 2, 4, 4)


def test_bad_inputs_are_refused():
    model = fresh("video_captioning", "gru")
    visual, length = visual_item("video_captioning")
    with pytest.raises(ValueError, match="<pad>"):
        caption_attention(model, visual, length, torch.tensor([5, EOS_ID, PAD_ID]))
    with pytest.raises(ValueError, match="length"):
        caption_attention(model, visual, 8, torch.tensor([5]))
    with pytest.raises(ValueError, match="eval"):
        caption_attention(model.train(), visual, length, torch.tensor([5]))
    with pytest.raises(ValueError, match="not a captioner"):
        caption_attention(build_model("activity", "gru", dims=ModelDims(FEATURE_DIM, num_classes=3)).eval(),
                          visual, length, torch.tensor([5]))
