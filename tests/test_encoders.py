"""Frame encoder tests: the small CNN trains, torchvision backbones load local weights only, features come out
in the documented shapes and dtype, and fine-tuning keeps padded frames out of the encoder."""

from __future__ import annotations

import io
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
    train_encoder,
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
    torch.manual_seed(0)
    return SmallCNN(SmallCNNConfig(**{"feature_dim": 16, "grid": 2, "num_attributes": 2, "width": 8, **over}))


def test_small_cnn_shapes():
    pooled, grid = tiny_cnn()(torch.zeros(3, 64, 64, 3, dtype=torch.uint8))
    assert pooled.shape == (3, 16) and grid.shape == (3, 4, 16)
    with pytest.raises(ValueError, match="uint8"):
        tiny_cnn()(torch.zeros(3, 64, 64, 3))


def test_train_encoder_loss_decreases():
    frames, targets, cells = squares(16)
    encoder = tiny_cnn()
    epochs = []
    history = train_encoder(encoder, frames, targets, cell_targets=cells, epochs=30, lr=1e-2, batch_size=8,
                            log=lambda epoch, loss: epochs.append(epoch))
    assert epochs == list(range(30)) and len(history) == 30
    assert history[-1] < 0.5 * history[0], history
    encoder.eval()
    with torch.no_grad():
        pooled, grid = encoder(torch.from_numpy(frames))
        predicted = encoder.attribute_head(pooled).argmax(1).numpy()
    assert (predicted == targets.argmax(1)).mean() >= 0.9


def test_train_encoder_rejects_mismatched_targets():
    frames, targets, _ = squares(4)
    with pytest.raises(ValueError, match="targets"):
        train_encoder(tiny_cnn(), frames, targets[:, :1], epochs=1)
    with pytest.raises(ValueError, match="num_attributes"):
        train_encoder(tiny_cnn(num_attributes=0), frames, targets, epochs=1)


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
    encoder = tiny_cnn()
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
    encoder = tiny_cnn().eval()
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
    model = PixelModel(tiny_cnn(), build_model("activity", "lstm", {"hidden_size": 8, "dropout": 0.0},
                                               dims=ModelDims(16, num_classes=3)))
    other = clips.clone()
    other[1, 2:] = 255 - other[1, 2:]  # different padding in clip 1
    # Train mode (BatchNorm uses batch statistics): padded frames must not reach the encoder at all.
    logits, loss = model(clips, lengths, torch.tensor([0, 2]))
    torch.testing.assert_close(logits, model(other, lengths)[0])
    loss.backward()
    assert model.pixels.encoder.trunk[0].weight.grad.abs().sum() > 0  # the encoder trains too
    checkpoint.save(tmp_path / "best.pt", {"spec": model_spec(model.eval(), task="activity", family="lstm"),
                                           "model": model.state_dict()})
    rebuilt = build_from_checkpoint(checkpoint.load(tmp_path / "best.pt")).eval()
    assert isinstance(rebuilt, PixelModel)
    with torch.no_grad():
        assert torch.equal(model(clips, lengths)[0], rebuilt(clips, lengths)[0])


def test_pixel_model_images_use_the_grid():
    frames, _, _ = squares(2)
    torch.manual_seed(0)
    model = PixelModel(tiny_cnn(), build_model("image_captioning", "transformer",
                                               {"hidden_size": 8, "num_heads": 2, "num_layers": 1},
                                               dims=ModelDims(16, vocab_size=9))).eval()
    tokens = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    with torch.no_grad():
        logits, loss = model(torch.from_numpy(frames), torch.tensor([4, 4]), tokens)
        memory = model.encode(torch.from_numpy(frames), torch.tensor([4, 4]))
    assert logits.shape == (2, 3, 9) and torch.isfinite(loss) and memory[0].shape == (2, 4, 8)
