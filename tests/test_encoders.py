"""Frame encoder tests: the small CNN's colour slots hold where each colour's object is and land in its grid cell,
torchvision backbones load local weights only, features come out in the documented shapes and dtype, and fine-tuning
keeps padded frames out of the encoder. (The small CNN's training: tests/test_attributes.py.)"""

from __future__ import annotations

import io
import math
import socket
import warnings

import numpy as np
import pytest
import torch
import torchvision

from seqvision.config import EncoderConfig
from seqvision.encoders import (
    RandomWeightsWarning,
    SmallCNN,
    SmallCNNConfig,
    TorchvisionConfig,
    TorchvisionEncoder,
    build_encoder,
    encoder_from_checkpoint,
    encoder_state,
    extract_features,
)
from seqvision import checkpoint
from seqvision.blocks import ModelDims
from seqvision.models import PixelModel, build_from_checkpoint, build_model, model_spec

torch.set_num_threads(1)

COLOURS = {"red": (230, 40, 40), "blue": (40, 80, 235)}


def squares(n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n frames 64x64 with one red or blue square in the left or right half, on a dark noisy background.

    Returns frames uint8 (n, 64, 64, 3), targets (n, 2) [red, blue], cell targets (n, 4, 2) for a 2x2 grid.
    """
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 40, size=(n, 64, 64, 3), dtype=np.uint8)
    targets = np.zeros((n, 2), dtype=np.float32)
    cells = np.zeros((n, 4, 2), dtype=np.float32)
    for i in range(n):
        colour, right = i % 2, (i // 2) % 2
        y, x = int(rng.integers(4, 20)), int(rng.integers(4, 20)) + 32 * right
        frames[i, y : y + 10, x : x + 10] = list(COLOURS.values())[colour]
        targets[i, colour] = 1.0
        cells[i, right, colour] = 1.0  # top row of the 2x2 grid: cell 0 = left, cell 1 = right
    return frames, targets, cells


def tiny_cnn(**over) -> SmallCNN:
    """2 colour slots of 6 values (12 of D = 16), a 2x2 grid."""
    torch.manual_seed(0)
    return SmallCNN(SmallCNNConfig(**{"feature_dim": 16, "grid": 2, "width": 8, "num_colors": 2, "slot_dim": 6,
                                      **over}))


def seeing_cnn() -> SmallCNN:
    """A tiny CNN whose colour stem is set by hand: red and blue pixels (of ``squares``) are found, the dark
    background is not. Its 3x3 conv passes each pixel's R and B through (centre tap), the 1x1 conv scores them."""
    encoder = tiny_cnn().eval()
    conv, score = encoder.color_stem[0], encoder.color_stem[2]
    with torch.no_grad():
        for module in (conv, score):
            module.weight.zero_()
            module.bias.zero_()
        conv.weight[0, 0, 1, 1] = conv.weight[1, 2, 1, 1] = 1.0  # channel 0: R, channel 1: B (inputs in [-2, 2])
        score.weight[1, 0] = score.weight[2, 1] = 10.0  # red, blue logits; background stays at 0
        score.bias[1:] = -5.0
    return encoder


def test_small_cnn_shapes():
    pooled, grid = tiny_cnn()(torch.zeros(3, 64, 64, 3, dtype=torch.uint8))
    assert pooled.shape == (3, 16) and grid.shape == (3, 4, 16)
    with pytest.raises(ValueError, match="uint8"):
        tiny_cnn()(torch.zeros(3, 64, 64, 3))
    with pytest.raises(ValueError, match="feature_dim > num_colors \\* slot_dim"):
        tiny_cnn(slot_dim=8)


def test_colour_slots_hold_each_objects_place_and_size():
    """A red square in the top-right cell and a blue one in the bottom-left: slot c holds [object values, centroid
    x, y in [-1, 1], log(1 + pixels)] of colour c, zeros for an absent colour; the grid puts each slot in its cell."""
    frames = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    frames[0, 10:20, 40:50] = COLOURS["red"]  # 10 x 10 px, centre (45, 15)
    frames[0, 44:52, 4:12] = COLOURS["blue"]  # 8 x 8 px, centre (8, 48)
    frames[1, 40:48, 40:48] = COLOURS["red"]  # frame 1: red only
    with torch.no_grad():
        pooled, grid = seeing_cnn()(torch.from_numpy(frames))
    slots = pooled[:, :12].view(2, 2, 6)  # (N, C, S): red, blue
    to_unit = lambda px: px / 32 - 1  # noqa: E731  (pixel coordinate -> [-1, 1], edges at -1 and 1)
    torch.testing.assert_close(slots[0, 0, 3:], torch.tensor([to_unit(45.0), to_unit(15.0), math.log1p(100)]))
    torch.testing.assert_close(slots[0, 1, 3:], torch.tensor([to_unit(8.0), to_unit(48.0), math.log1p(64)]))
    assert slots[0, :, :3].abs().sum(-1).min() > 0  # the object CNN looked at both
    assert torch.equal(slots[1, 1], torch.zeros(6))  # no blue in frame 1
    cells = grid[:, :, :12].view(2, 4, 2, 6)  # (N, G, C, S), cells row-major in a 2x2 grid
    assert torch.equal(cells[0, 1, 0], slots[0, 0]) and torch.equal(cells[0, 2, 1], slots[0, 1])
    assert cells[0, [0, 2, 3], 0].abs().sum() == 0 and cells[0, [0, 1, 3], 1].abs().sum() == 0
    assert torch.equal(cells[1, 3, 0], slots[1, 0])
    # the colour-blind part: one MLP of each seen object's slot, summed; each cell's part sums its own objects'
    per_object = seeing_cnn().project(slots) * torch.tensor([[1.0, 1.0], [1.0, 0.0]]).unsqueeze(-1)
    torch.testing.assert_close(pooled[:, 12:], per_object.sum(1))
    torch.testing.assert_close(grid[0, 1, 12:], per_object[0, 0]) and torch.testing.assert_close(grid[0, 0, 12:],
                                                                                                  torch.zeros(4))


def test_slot_values_follow_the_object_not_its_place():
    """The object CNN sees each object centred: the same square anywhere gives the same values."""
    frames = np.zeros((3, 64, 64, 3), dtype=np.uint8)
    frames[0, 10:20, 10:20] = COLOURS["red"]
    frames[1, 36:46, 44:54] = COLOURS["red"]
    frames[2, 36:42, 40:58] = COLOURS["red"]  # another shape, same place
    with torch.no_grad():
        pooled, _ = seeing_cnn()(torch.from_numpy(frames))
    torch.testing.assert_close(pooled[0, :3], pooled[1, :3], atol=1e-4, rtol=1e-3)
    assert (pooled[2, :3] - pooled[1, :3]).abs().max() > 1e-3  # 10x the tolerance above (untrained: small values)
    assert not torch.allclose(pooled[0, 3:5], pooled[1, 3:5])


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or fetch weights fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_torchvision_backbone_loads_a_local_weights_file(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    torch.manual_seed(123)
    reference = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a weights file means no warning
        encoder = TorchvisionEncoder(TorchvisionConfig("resnet18", grid=2, image_size=64), weights=path).eval()
    assert torch.equal(encoder.trunk[0].weight, reference.conv1.weight)
    assert encoder.feature_dim == 512
    frames = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        pooled, grid = encoder(frames)
        x = (frames.permute(0, 3, 1, 2).float() / 255 - encoder.mean) / encoder.std
        expected = torch.nn.Sequential(*list(reference.children())[:-1])(x).flatten(1)  # up to avgpool
    assert pooled.shape == (2, 512) and grid.shape == (2, 4, 512)
    torch.testing.assert_close(pooled, expected, rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "torch_home").exists(), "nothing may be cached or downloaded"


def test_torchvision_backbone_without_weights_warns(no_network):
    with pytest.warns(RandomWeightsWarning, match="RANDOM weights.*encoder.weights"):
        build_encoder(EncoderConfig(backbone="resnet18", image_size=64))


def test_torchvision_backbone_rejects_a_wrong_or_missing_file(tmp_path, no_network):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a resnet18 state dict"):
        TorchvisionEncoder(TorchvisionConfig("resnet18"), weights=path)
    with pytest.raises(FileNotFoundError, match="encoder.weights"):
        TorchvisionEncoder(TorchvisionConfig("resnet18"), weights=tmp_path / "absent.pth")


def test_extract_features_shapes_dtype_and_values():
    encoder = seeing_cnn()
    encoder.train()
    frames, _, _ = squares(6)
    videos = frames.reshape(2, 3, 64, 64, 3)
    feats = extract_features(encoder, videos, batch_size=2)  # fewer frames per batch than a clip has
    assert feats.dtype == np.float16 and feats.shape == (2, 3, 16)
    assert encoder.training, "the encoder's mode is restored"
    encoder.eval()
    with torch.no_grad():
        pooled, grid = encoder(torch.from_numpy(frames))
    np.testing.assert_allclose(feats.reshape(6, 16), pooled.numpy(), rtol=1e-2, atol=1e-2)
    images = extract_features(encoder, frames, batch_size=4)
    assert images.dtype == np.float16 and images.shape == (6, 4, 16)
    np.testing.assert_allclose(images, grid.numpy(), rtol=1e-2, atol=1e-2)


def test_encoder_checkpoint_round_trip():
    encoder = seeing_cnn()
    buffer = io.BytesIO()
    torch.save(encoder_state(encoder), buffer)
    buffer.seek(0)
    rebuilt = encoder_from_checkpoint(torch.load(buffer, weights_only=True)).eval()
    frames = torch.from_numpy(squares(2)[0])
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(encoder(frames), rebuilt(frames)))


def test_finetuning_skips_padded_frames_and_round_trips(tmp_path):
    frames, _, _ = squares(8)
    clips = torch.from_numpy(frames.reshape(2, 4, 64, 64, 3))
    lengths = torch.tensor([4, 2])
    torch.manual_seed(0)
    model = PixelModel(seeing_cnn().train(), build_model("activity", "lstm", {"hidden_size": 8, "dropout": 0.0},
                                                         dims=ModelDims(16, num_classes=3)))
    other = clips.clone()
    other[1, 2:] = 255 - other[1, 2:]  # different padding in clip 1
    # Train mode (BatchNorm uses batch statistics): padded frames must not reach the encoder at all.
    logits, loss = model(clips, lengths, torch.tensor([0, 2]))
    torch.testing.assert_close(logits, model(other, lengths)[0])
    loss.backward()
    assert model.pixels.encoder.object_cnn[0].weight.grad.abs().sum() > 0  # the encoder trains too
    checkpoint.save(tmp_path / "best.pt", {"spec": model_spec(model.eval(), task="activity", family="lstm"),
                                           "model": model.state_dict()})
    rebuilt = build_from_checkpoint(checkpoint.load(tmp_path / "best.pt")).eval()
    assert isinstance(rebuilt, PixelModel)
    with torch.no_grad():
        assert torch.equal(model(clips, lengths)[0], rebuilt(clips, lengths)[0])


def test_pixel_model_images_use_the_grid():
    frames, _, _ = squares(2)
    torch.manual_seed(0)
    model = PixelModel(seeing_cnn(), build_model("image_captioning", "transformer",
                                               {"hidden_size": 8, "num_heads": 2, "num_layers": 1},
                                               dims=ModelDims(16, vocab_size=9))).eval()
    tokens = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    with torch.no_grad():
        logits, loss = model(torch.from_numpy(frames), torch.tensor([4, 4]), tokens)
        memory = model.encode(torch.from_numpy(frames), torch.tensor([4, 4]))
    assert logits.shape == (2, 3, 9) and torch.isfinite(loss) and memory[0].shape == (2, 4, 8)
