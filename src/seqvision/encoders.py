"""The frame encoder shared by every model family: uint8 RGB frames -> a pooled vector and a grid of region vectors.

Two kinds, one interface (``forward(frames uint8 (N, H, W, 3)) -> (pooled (N, D) float, grid (N, G, D) float)``):

- :class:`SmallCNN`: a 5-layer CNN for 64x64 frames, trained here (:func:`train_encoder`) to recognise the
  synthetic objects' attributes (shape, colour, size), optionally per grid cell. On this benchmark it stands in for
  ImageNet pretraining: it sees exactly the visual vocabulary the captions and classes are about, trains in
  minutes, and needs no download.
- :class:`TorchvisionEncoder`: a torchvision backbone (``resnet18`` ...) built with ``weights=None`` and loaded only
  from a local state-dict file. Nothing is ever downloaded; without a file the weights are random and a
  :class:`RandomWeightsWarning` says so.

:func:`extract_features` runs either over frame shards for the ``features`` stage; :class:`PixelFeatures` runs it
inside a model when the encoder is fine-tuned end to end.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small")


class RandomWeightsWarning(UserWarning):
    """A pretrained-style backbone is running with random weights."""


def _to_float_chw(frames: Tensor) -> Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.size(-1) != 3:
        raise ValueError(f"expected uint8 frames (N, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    return frames.permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, H, W)


# --------------------------------------------------------------------------------------------------------
# Small CNN trained on the synthetic attributes


@dataclass(frozen=True)
class SmallCNNConfig:
    feature_dim: int = 128  # D of the pooled vector and of every grid cell
    grid: int = 4  # grid x grid region vectors
    num_attributes: int = 0  # multi-label attribute heads (shape/colour/size vocabulary); 0 = no heads
    width: int = 32  # channels of the first conv; the trunk widens to 2x, 4x, then feature_dim


class SmallCNN(nn.Module):
    """64x64 RGB frames -> pooled (N, D) and grid (N, grid*grid, D).

    Two choices keep *where* things are, which the sequence models need (move_left vs move_right, "left of"):
    the input carries two coordinate channels (CoordConv, Liu et al. 2018), so region vectors know their location;
    and the pooled vector is a learned projection of the flattened grid (like VGG's fc layers), not a global
    average, which would discard position.
    """

    def __init__(self, config: SmallCNNConfig) -> None:
        super().__init__()
        self.config = config
        self.feature_dim, self.grid = config.feature_dim, config.grid
        w, d = config.width, config.feature_dim

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.trunk = nn.Sequential(  # 64x64 -> 32 -> 16 -> 8 (other sizes work; the grid is adaptive-pooled)
            *block(3 + 2, w, 2), *block(w, 2 * w, 2), *block(2 * w, 2 * w, 1), *block(2 * w, 4 * w, 2),
            *block(4 * w, d, 1),
        )
        # No ReLU after the projection: with one, 75 of the 128 pooled dimensions were never positive on the
        # default data (dead for every sequence model downstream); the attribute heads are linear either way.
        self.project = nn.Linear(config.grid**2 * d, d)
        if config.num_attributes:
            self.attribute_head = nn.Linear(d, config.num_attributes)  # what is in the frame
            self.cell_head = nn.Linear(d, config.num_attributes)  # what is in each grid cell

    def forward(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """frames uint8 (N, H, W, 3) -> (pooled (N, D), grid (N, G, D))."""
        x = (_to_float_chw(frames) - 0.5) / 0.25  # (N, 3, H, W)
        N, _, H, W = x.shape
        ys = torch.linspace(-1, 1, H, device=x.device).view(1, 1, H, 1).expand(N, 1, H, W)
        xs = torch.linspace(-1, 1, W, device=x.device).view(1, 1, 1, W).expand(N, 1, H, W)
        fmap = self.trunk(torch.cat([x, xs, ys], dim=1))  # (N, D, h, w)
        grid = F.adaptive_avg_pool2d(fmap, self.grid)  # (N, D, g, g)
        grid = grid.flatten(2).transpose(1, 2)  # (N, G, D), row-major cells
        pooled = self.project(grid.flatten(1))  # (N, G*D) -> (N, D)
        return pooled, grid


def train_encoder(
    encoder: SmallCNN,
    frames: np.ndarray | Tensor,
    targets: np.ndarray | Tensor,
    *,
    cell_targets: np.ndarray | Tensor | None = None,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 128,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``encoder`` (built with ``num_attributes = A``) to predict which attributes are present.

    frames: uint8 (N, H, W, 3) (a memory-mapped shard is fine); targets: (N, A) multi-hot {0, 1}, the attributes
    of the objects in each frame; cell_targets: optional (N, G, A) multi-hot, the attributes present in each grid
    cell, which teaches the region vectors their own contents. Binary cross-entropy, AdamW, shuffled with ``seed``.
    Calls ``log(epoch, mean loss)`` after each epoch; returns the mean loss of every epoch.
    """
    if not encoder.config.num_attributes:
        raise ValueError("train_encoder needs an encoder built with num_attributes > 0")
    num = len(frames)
    targets_t = torch.as_tensor(np.asarray(targets), dtype=torch.float32)
    if targets_t.shape != (num, encoder.config.num_attributes):
        raise ValueError(f"targets must be (N, {encoder.config.num_attributes}), got {tuple(targets_t.shape)}")
    cells_t = None
    if cell_targets is not None:
        cells_t = torch.as_tensor(np.asarray(cell_targets), dtype=torch.float32)
        expected = (num, encoder.grid**2, encoder.config.num_attributes)
        if cells_t.shape != expected:
            raise ValueError(f"cell_targets must be {expected}, got {tuple(cells_t.shape)}")

    encoder.to(device).train()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(num, generator=generator)
        total, seen = 0.0, 0
        for start in range(0, num, batch_size):
            idx = np.sort(order[start : start + batch_size].numpy())  # sorted: sequential reads from a memmap
            x = torch.as_tensor(np.ascontiguousarray(frames[idx])).to(device)
            pooled, grid = encoder(x)
            loss = F.binary_cross_entropy_with_logits(encoder.attribute_head(pooled), targets_t[idx].to(device))
            if cells_t is not None:
                loss = loss + F.binary_cross_entropy_with_logits(encoder.cell_head(grid), cells_t[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        history.append(total / max(seen, 1))
        if log is not None:
            log(epoch, history[-1])
    return history


# --------------------------------------------------------------------------------------------------------
# torchvision backbones, local weights only


@dataclass(frozen=True)
class TorchvisionConfig:
    name: str = "resnet18"
    grid: int = 4
    image_size: int = 224  # frames are resized to image_size x image_size before the network


def _load_local_state_dict(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file {path} does not exist (encoder.weights in params.yaml)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common wrappers around a plain state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


class TorchvisionEncoder(nn.Module):
    """A torchvision classification backbone without its head: global-average-pooled vector + grid.

    Frames are resized to ``image_size`` and ImageNet-normalised, as the published weights expect. ``weights`` is a
    local file holding the model's state dict (the ``.pth`` torchvision distributes, or ``{"state_dict": ...}``);
    head keys may be missing or differ, every backbone key must load. ``weights=""`` builds random weights and warns.
    """

    def __init__(self, config: TorchvisionConfig, *, weights: str | Path = "", warn_random: bool = True) -> None:
        super().__init__()
        import torchvision  # only needed for this backbone kind

        if config.name not in TORCHVISION_BACKBONES:
            raise ValueError(f"unknown backbone {config.name!r}; expected one of {', '.join(TORCHVISION_BACKBONES)}")
        self.config = config
        self.grid = config.grid
        net = torchvision.models.get_model(config.name, weights=None)  # weights=None: never touches the network
        if weights:
            state = _load_local_state_dict(weights)
            missing, unexpected = net.load_state_dict(state, strict=False)
            head = ("fc.", "classifier.")
            bad = [k for k in (*missing, *unexpected) if not k.startswith(head)]
            if bad:
                raise ValueError(
                    f"{weights}: not a {config.name} state dict; missing or unexpected keys: {', '.join(bad[:5])}"
                    + (" ..." if len(bad) > 5 else "")
                )
        elif warn_random:
            warnings.warn(
                f"encoder backbone {config.name!r} has RANDOM weights (encoder.weights is empty), so its features "
                f"come from an untrained network. Nothing is downloaded: get the ImageNet state dict for "
                f"{config.name} (e.g. the torchvision .pth file) onto this machine and set encoder.weights in "
                f"params.yaml to its path; or use backbone: small_cnn.",
                RandomWeightsWarning,
                stacklevel=2,
            )
        if hasattr(net, "features"):  # mobilenet / efficientnet style
            self.trunk = net.features
        else:  # resnet style: everything up to the global pool
            self.trunk = nn.Sequential(*list(net.children())[:-2])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            self.feature_dim = int(self.trunk.eval()(torch.zeros(1, 3, 64, 64)).size(1))
        self.trunk.train()

    def forward(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """frames uint8 (N, H, W, 3) -> (pooled (N, D), grid (N, G, D))."""
        x = _to_float_chw(frames)  # (N, 3, H, W)
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        fmap = self.trunk((x - self.mean) / self.std)  # (N, D, h, w)
        grid = F.adaptive_avg_pool2d(fmap, self.grid).flatten(2).transpose(1, 2)  # (N, G, D)
        return fmap.mean(dim=(2, 3)), grid  # global average pool, as the classifier head was trained on


# --------------------------------------------------------------------------------------------------------
# Building, checkpoints, extraction


def build_encoder(config: Any, *, num_attributes: int = 0) -> nn.Module:
    """An encoder from the ``encoder:`` params section (``config.EncoderConfig``).

    ``small_cnn`` gets ``num_attributes`` heads for :func:`train_encoder` and is seeded with ``config.seed``;
    torchvision backbones load ``config.weights`` from a local file (or warn that they are random).
    """
    if config.backbone == "small_cnn":
        torch.manual_seed(config.seed)
        return SmallCNN(SmallCNNConfig(feature_dim=config.feature_dim, grid=config.grid, num_attributes=num_attributes))
    tv = TorchvisionConfig(name=config.backbone, grid=config.grid, image_size=config.image_size)
    return TorchvisionEncoder(tv, weights=config.weights)


def encoder_state(encoder: nn.Module) -> dict[str, Any]:
    """{"backbone", "config", "model"}: everything :func:`encoder_from_checkpoint` needs, weights included."""
    backbone = "small_cnn" if isinstance(encoder, SmallCNN) else encoder.config.name
    return {"backbone": backbone, "config": dataclasses.asdict(encoder.config), "model": encoder.state_dict()}


def encoder_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuild an encoder from :func:`encoder_state` output (no weights file needed, no warning)."""
    if checkpoint["backbone"] == "small_cnn":
        encoder: nn.Module = SmallCNN(SmallCNNConfig(**checkpoint["config"]))
    else:
        encoder = TorchvisionEncoder(TorchvisionConfig(**checkpoint["config"]), warn_random=False)
    if checkpoint.get("model") is not None:  # None: a skeleton whose weights come from elsewhere (models.PixelModel)
        encoder.load_state_dict(checkpoint["model"])
    return encoder


@torch.inference_mode()
def extract_features(
    encoder: nn.Module, frames: np.ndarray, *, batch_size: int = 256, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Features for the ``features`` stage, in the frames' row order, as float16.

    frames uint8 (N, T, H, W, 3) (video shards) -> pooled per frame, (N, T, D);
    frames uint8 (N, H, W, 3) (image shards)    -> grid per image,   (N, G, D).
    ``batch_size`` counts frames per forward pass. The encoder runs in eval mode and is left as it was.
    """
    if frames.ndim not in (4, 5):
        raise ValueError(f"expected frames (N, T, H, W, 3) or (N, H, W, 3), got shape {frames.shape}")
    video = frames.ndim == 5
    was_training = encoder.training
    encoder.to(device).eval()
    per_item = frames.shape[1] if video else 1
    items = max(1, batch_size // per_item)
    out = []
    for start in range(0, len(frames), items):
        chunk = torch.as_tensor(np.ascontiguousarray(frames[start : start + items])).to(device)
        n = chunk.size(0)
        pooled, grid = encoder(chunk.flatten(0, 1) if video else chunk)  # (n*T, H, W, 3) for videos
        feats = pooled.view(n, per_item, -1) if video else grid  # (n, T, D) or (n, G, D)
        out.append(feats.to(torch.float16).cpu().numpy())
    encoder.train(was_training)
    if not out:
        dim = encoder.feature_dim
        return np.zeros((0, frames.shape[1], dim) if video else (0, encoder.grid**2, dim), dtype=np.float16)
    return np.concatenate(out)


class PixelFeatures(nn.Module):
    """Runs an encoder inside a model, for ``finetune_encoder``: pixels in, the features a model consumes out.

    Video clips (B, T, H, W, 3) -> pooled per frame (B, T, D); only the real frames (per ``lengths``) go through
    the encoder, so padded frames neither cost compute nor touch BatchNorm statistics. Images (B, H, W, 3) ->
    grid (B, G, D), with lengths G.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, visual: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        if visual.dim() == 4:  # images
            _, grid = self.encoder(visual)  # (B, G, D)
            return grid, torch.full((visual.size(0),), grid.size(1), dtype=torch.long, device=visual.device)
        B, T = visual.shape[:2]
        real = torch.arange(T, device=visual.device)[None, :] < lengths[:, None]  # (B, T)
        pooled, _ = self.encoder(visual[real])  # (num_real, D)
        features = pooled.new_zeros(B, T, pooled.size(1))
        features[real] = pooled
        return features, lengths
