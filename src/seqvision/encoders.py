"""The frame encoder shared by every model family: uint8 RGB frames -> a pooled vector and a grid of region vectors.

Two kinds, one interface (``forward(frames uint8 (N, H, W, 3)) -> (pooled (N, D) float, grid (N, G, D) float)``):

- :class:`SmallCNN`: an object-centric encoder for the synthetic frames (a per-pixel colour classifier, then one
  small CNN on a crop around each colour's object, into one slot per colour), trained by the ``encoder`` stage
  (:func:`seqvision.attributes.train_attribute_encoder`) to recognise the objects' attributes. On this benchmark
  it stands in for ImageNet pretraining: it sees exactly the visual vocabulary the captions and classes are
  about, trains in about a minute, and needs no download.
- :class:`TorchvisionEncoder`: a torchvision backbone (``resnet18`` ...) built with ``weights=None`` and loaded only
  from a local state-dict file. Nothing is ever downloaded; without a file the weights are random and a
  :class:`RandomWeightsWarning` says so.

:func:`extract_features` runs either over frame shards for the ``features`` stage; :class:`PixelFeatures` runs it
inside a model when the encoder is fine-tuned end to end.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqvision.config import SMALL_CNN_SLOTS

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
    width: int = 16  # channels of the object CNN's first conv (then 2x, 4x)
    num_colors: int = 8  # colour slots: one per colour of the synthetic palette
    slot_dim: int = 8  # values per colour slot; num_colors * slot_dim < feature_dim
    crop: int = 32  # each object is seen as a crop x crop patch ...
    window: float = 0.5  # ... of a window this fraction of the frame side (32 px of 64), centred on the object


class SmallCNNOutput(NamedTuple):
    pooled: Tensor  # (N, D): num_colors slots of slot_dim values, then the colour-blind part
    grid: Tensor  # (N, G, D): the same layout per grid cell
    color_logits: Tensor  # (N, num_colors + 1, H, W): per pixel, background (0) or one of the colours


MIN_PIXELS = 4  # a colour covering fewer pixels (p >= 0.5) is taken as absent and gets no crop


class SmallCNN(nn.Module):
    """64x64 RGB frames -> pooled (N, D) and grid (N, grid*grid, D), made of colour slots and a colour-blind part.

    Every object of the synthetic benchmark has a colour that is unique in its scene, so a colour names an object,
    and the encoder is object-centric with the slots keyed by colour (as slot attention, Locatello et al. 2020,
    but with known keys), in two stages, as a two-stage detector (Ren et al. 2015):

    1. a per-pixel colour classifier (a 3x3 and a 1x1 conv: background or one of ``num_colors``) finds where each
       colour is: its pixels (p >= 0.5), their centroid and their count;
    2. every colour with at least MIN_PIXELS pixels is cropped around its centroid (``crop`` x ``crop`` samples of
       the colour's probability map and of the other colours', so occluders show) and one small CNN, shared by all
       colours, turns the crop into the slot's values: shape, size, orientation, whatever the training asks.

    Slot c = [the object CNN's ``slot_dim - 3`` values, centroid x, y in [-1, 1], log(1 + pixels)]; zeros, apart from
    the pixel count, for an absent colour. Because the object CNN sees each object centred, at one scale, it learns
    shapes in a fraction of the steps a CNN over the whole frame needs, where every shape must be recognised at
    every offset (docs/encoder.md), and it costs less; because its weights are shared, "circle" reads
    the same in the red slot as in the blue one, and a model reading slot c gets "red circle" bound for free.
    The colour-blind part sums one small MLP of each object's slot (the same for every colour). The grid puts each
    object's slot, and its share of the colour-blind part, in the cell holding its centroid (row-major cells).
    """

    def __init__(self, config: SmallCNNConfig) -> None:
        super().__init__()
        self.config = config
        self.feature_dim, self.grid = config.feature_dim, config.grid
        self.num_colors, self.slot_dim = config.num_colors, config.slot_dim
        free = config.feature_dim - config.num_colors * config.slot_dim
        if config.num_colors < 1 or config.slot_dim < 4 or free < 1:
            raise ValueError(f"small_cnn: {config.num_colors} colour slots of {config.slot_dim} values need "
                             f"num_colors >= 1, slot_dim >= 4 and feature_dim > num_colors * slot_dim, "
                             f"got feature_dim {config.feature_dim}")
        if config.crop % 8:
            raise ValueError(f"small_cnn: crop must be a multiple of 8, got {config.crop}")
        w = config.width
        self.color_stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace=True),
                                        nn.Conv2d(16, config.num_colors + 1, 1))

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.object_cnn = nn.Sequential(  # crop -> crop/2 -> crop/4 -> crop/8
            *block(2, w), *block(w, 2 * w), *block(2 * w, 4 * w), nn.Flatten(),
            nn.Linear(4 * w * (config.crop // 8) ** 2, config.slot_dim - 3),
        )
        # The colour-blind part: a sum over the objects of one small MLP of each slot (Deep Sets, Zaheer et al.
        # 2017), so it can hold what every object does whatever its colour, e.g. a histogram of where objects are.
        # No ReLU at the end: with one, 75 of the 128 pooled dimensions of an earlier design were never positive
        # on the default data (dead for every sequence model downstream).
        self.project = nn.Sequential(nn.Linear(config.slot_dim, 64), nn.ReLU(inplace=True), nn.Linear(64, free))

    def encode(self, frames: Tensor, *, present: Tensor | None = None) -> SmallCNNOutput:
        """frames uint8 (N, H, W, 3) -> :class:`SmallCNNOutput`. ``present`` (N, C) bool: colours to crop even
        when too few of their pixels are found (training passes the true ones; a colour with no pixel found is then
        cropped at the frame's centre)."""
        x = (_to_float_chw(frames) - 0.5) / 0.25  # (N, 3, H, W)
        N, _, H, W = x.shape
        C, S = self.num_colors, self.slot_dim
        logits = self.color_stem(x)  # (N, C+1, H, W)
        # Detached: the stem learns colours from the pixel labels alone. Letting the slots' losses reach it through
        # the crops made it trade per-pixel colours for whatever helped the crops (6% of object pixels right).
        every = logits.detach().softmax(dim=1)  # (N, C+1, H, W), background first
        probs = every[:, 1:]  # (N, C, H, W)
        with torch.no_grad():  # where each colour is: hard pixels, their count and centroid
            hard = (probs >= 0.5).float()
            h, w = hard.shape[-2:]
            pixels = hard.sum(dim=(2, 3))  # (N, C)
            # pixel centres in grid_sample's coordinates (align_corners=False): -1 and 1 are the frame's edges
            ys = ((torch.arange(h, device=x.device) * 2 + 1) / h - 1).view(1, 1, h, 1)
            xs = ((torch.arange(w, device=x.device) * 2 + 1) / w - 1).view(1, 1, 1, w)
            centre = torch.stack([(hard * xs).sum(dim=(2, 3)), (hard * ys).sum(dim=(2, 3))], dim=-1)
            centre = centre / pixels.clamp(min=1).unsqueeze(-1)  # (N, C, 2), (0, 0) where absent
            crop = pixels >= MIN_PIXELS if present is None else (pixels >= MIN_PIXELS) | present
        frame_idx, color_idx = torch.nonzero(crop, as_tuple=True)  # (K,) each: the objects to look at
        values = probs.new_zeros(N, C, S - 3)
        if len(frame_idx):
            theta = probs.new_zeros(len(frame_idx), 2, 3)  # crop -> frame: scale the window, move to the centre
            theta[:, 0, 0] = theta[:, 1, 1] = self.config.window
            theta[:, :, 2] = centre[frame_idx, color_idx]
            size = (len(frame_idx), 2, self.config.crop, self.config.crop)
            sample_at = F.affine_grid(theta, list(size), align_corners=False)  # (K, crop, crop, 2)
            own = probs[frame_idx, color_idx]  # (K, H, W)
            others = 1 - every[frame_idx, 0] - own  # (K, H, W): the other colours, e.g. an occluder
            crops = F.grid_sample(torch.stack([own, others], dim=1), sample_at, align_corners=False)  # (K, 2, c, c)
            values = values.index_put((frame_idx, color_idx), self.object_cnn(crops))
        slots = torch.cat([values, centre, torch.log1p(pixels).unsqueeze(-1)], dim=-1)  # (N, C, S)
        per_object = self.project(slots) * crop.unsqueeze(-1)  # (N, C, free): the colours looked at only
        pooled = torch.cat([slots.flatten(1), per_object.sum(dim=1)], dim=1)  # (N, C*S + free)
        # Each slot into the grid cell holding its centroid; the pixel count of an absent colour stays out.
        g = self.grid
        col = ((centre[..., 0] + 1) / 2 * g).long().clamp(0, g - 1)  # (N, C)
        row = ((centre[..., 1] + 1) / 2 * g).long().clamp(0, g - 1)
        in_cell = (F.one_hot(row * g + col, g * g).transpose(1, 2) * crop.unsqueeze(1)).to(slots.dtype)  # (N, G, C)
        cell_slots = in_cell.unsqueeze(-1) * slots.unsqueeze(1)  # (N, G, C, S)
        cell_free = torch.einsum("ngc,ncf->ngf", in_cell, per_object)  # (N, G, free): the cell's objects
        grid = torch.cat([cell_slots.flatten(2), cell_free], dim=2)  # (N, G, D)
        return SmallCNNOutput(pooled, grid, logits)

    def forward(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """frames uint8 (N, H, W, 3) -> (pooled (N, D), grid (N, G, D))."""
        out = self.encode(frames)
        return out.pooled, out.grid


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


def build_encoder(config: Any, *, num_colors: int = SMALL_CNN_SLOTS) -> nn.Module:
    """An encoder from the ``encoder:`` params section (``config.EncoderConfig``).

    ``small_cnn`` gets ``num_colors`` colour slots (one per colour of the synthetic palette) of ``config.slot_dim``
    values and is seeded with ``config.seed``; torchvision backbones load ``config.weights`` from a local file (or
    warn that they are random).
    """
    if config.backbone == "small_cnn":
        torch.manual_seed(config.seed)
        return SmallCNN(SmallCNNConfig(feature_dim=config.feature_dim, grid=config.grid, width=config.width,
                                       num_colors=num_colors, slot_dim=config.slot_dim))
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
