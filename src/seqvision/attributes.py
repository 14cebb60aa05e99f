"""What the synthetic objects look like in each frame, as training targets for the small CNN (the ``encoder`` stage).

The generator records each clip's objects and events in ``data/annotations/metadata.json``. This module replays
that record to the objects drawn in any frame (:func:`video_objects`, :func:`image_objects`), turns them into
multi-label targets (:class:`AttributeSpace`, :func:`frame_targets`), trains
:class:`~seqvision.encoders.SmallCNN` on the train split's frames (:func:`train_attribute_encoder`) and scores it
on val with per-object accuracies that match what the captions name (:func:`attribute_accuracy`): the colours
present, and for each object its shape, size word and 3x3 region.

Replaying the metadata: each object's initial state, then its events in order; during an event ``[start, end)``
the state is interpolated exactly as the generator does (linear, the first frame shows ``before``, the last
``after``; a bounce adds ``hop * sin(pi t)``). What the metadata cannot give exactly: states are rounded there
(0.01 px, 0.1 degree), the long-range jitter tail (at most 3% of the frame) is not recorded and is ignored, and
fades and colour blends are cut at the half-way point (visible when alpha >= 0.5; the nearer colour of a
change_color blend).
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqvision import io
from seqvision.encoders import SmallCNN, build_encoder
from seqvision.io import MetadataError, load_metadata, ordered_entries, shard_name
from seqvision.features import EncoderRun, read_index, require_metadata
from seqvision.synth.render import coverage
from seqvision.synth.scene import COLORS, RADIUS_FRACTION, SHAPES, SIZES, ObjectState, region

VISIBLE_ALPHA = 0.5  # an object fading in or out counts as present from half opacity
# Circumradius / min(H, W) spans 0.06 (a small object shrunk: 0.10 * 0.6) .. 0.272 (a large one grown:
# 0.16 * 1.7); log-spaced bins over that range put bin centres on the sizes that actually occur.
RADIUS_RANGE = (0.06, 0.272)
# fit_probe: the heads refit on the frozen features before the final val scores (20 epochs, 1.7 s on the default data)
PROBE_EPOCHS, PROBE_LR, PROBE_BATCH = 20, 1e-2, 256
# The 3x3 regions of scene.region in row-major order (a test checks that they agree).
REGIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
ANY_COLOR = "any"  # the owner of the colour-free copies of the binned groups (AttributeSpace)


# --------------------------------------------------------------------------------------------------------
# Attribute targets


class AttributeGroup(NamedTuple):
    """One property of an object, bound to the object's colour (colours are unique within a scene, so a colour
    names one object): a categorical choice among ``labels``, exactly one per visible object."""

    kind: str  # "shape", "size", "region", "x", "y", "radius"
    labels: tuple[str, ...]
    binned: bool  # a continuous quantity in bins with soft "tent" targets, also kept colour-free ("any")


@dataclass(frozen=True)
class AttributeSpace:
    """The multi-label targets, one vector of ``size`` values in [0, 1] per frame (and per grid cell).

    - ``shape:{s}``, ``color:{c}``: which shapes and colours are visible (presence, multi-hot);
    - ``shape:{c}:{s}``, ``size:{c}:{small|large}``, ``region:{c}:{r}``: the shape, size word and 3x3 region of the
      object of colour c, as the captions name them. Binding each to its colour is what lets a model that sees only
      the pooled vector say "red circle" rather than "red" + "circle" (a frame with a red square and a blue circle
      has the same shape and colour presence as one with a red circle and a blue square);
    - ``x:{c}:{b}``, ``y:{c}:{b}``: where that object is, in ``position_bins`` bins across the frame (finer than
      regions: move_left, bounce); ``radius:{c}:{b}``: its size in ``radius_bins`` log-spaced bins (grow, shrink);
    - ``x:any:{b}``, ``y:any:{b}``, ``radius:any:{b}``: the same bins for every visible object whatever its
      colour (the max over objects). Colour-bound bins alone make "moves left" eight separate patterns to learn
      (one per colour), and 1200 training clips are too few for that: with ground-truth attribute vectors as
      frame features, a GRU reached 0.22 val accuracy on activity with colour-bound bins only and 0.45 with the
      colour-free bins added (docs/encoder.md).

    Binned quantities use soft "tent" targets (two neighbouring bins share the weight by distance), so the
    encoder is taught a smooth code rather than arbitrary bin edges. Orientation is left out: orientation bins
    stayed at chance level within the stage's time budget (small shapes on 64x64 noisy frames).
    """

    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    sizes: tuple[str, ...] = SIZES
    regions: tuple[str, ...] = REGIONS
    position_bins: int = 8
    radius_bins: int = 4

    @cached_property
    def groups(self) -> tuple[AttributeGroup, ...]:
        bins = lambda n: tuple(str(b) for b in range(n))  # noqa: E731
        return (AttributeGroup("shape", self.shapes, False), AttributeGroup("size", self.sizes, False),
                AttributeGroup("region", self.regions, False), AttributeGroup("x", bins(self.position_bins), True),
                AttributeGroup("y", bins(self.position_bins), True),
                AttributeGroup("radius", bins(self.radius_bins), True))

    def group(self, kind: str) -> AttributeGroup:
        return self.groups[self._group_index(kind)]

    def owners(self, group: AttributeGroup) -> tuple[str, ...]:
        """The colours a group is bound to, plus ``"any"`` for the binned groups."""
        return (*self.colors, ANY_COLOR) if group.binned else self.colors

    @property
    def num_presence(self) -> int:
        """The first ``num_presence`` entries are the shape and colour presence labels."""
        return len(self.shapes) + len(self.colors)

    @cached_property
    def names(self) -> list[str]:
        names = [f"shape:{s}" for s in self.shapes] + [f"color:{c}" for c in self.colors]
        for group in self.groups:
            names += [f"{group.kind}:{owner}:{label}" for owner in self.owners(group) for label in group.labels]
        return names

    @property
    def size(self) -> int:
        return len(self.names)

    def block(self, kind: str) -> slice:
        """Where every owner's labels of group ``kind`` sit, owners in :meth:`owners` order."""
        return self._blocks[self._group_index(kind)]

    def span(self, kind: str, color: str) -> slice:
        """Where the labels of group ``kind`` for colour ``color`` (or ``"any"``) sit in a target vector."""
        return self._spans[kind, color]

    def _group_index(self, kind: str) -> int:
        for i, group in enumerate(self.groups):
            if group.kind == kind:
                return i
        raise KeyError(f"no attribute group {kind!r}; expected one of {', '.join(g.kind for g in self.groups)}")

    @cached_property
    def _blocks(self) -> tuple[slice, ...]:
        blocks, start = [], self.num_presence
        for group in self.groups:
            stop = start + len(self.owners(group)) * len(group.labels)
            blocks.append(slice(start, stop))
            start = stop
        return tuple(blocks)

    @cached_property
    def _spans(self) -> dict[tuple[str, str], slice]:
        spans = {}
        for group, block in zip(self.groups, self._blocks):
            for k, owner in enumerate(self.owners(group)):
                start = block.start + k * len(group.labels)
                spans[group.kind, owner] = slice(start, start + len(group.labels))
        return spans


class ObjectView(NamedTuple):
    """One object as drawn in one frame; coordinates in pixels of the metadata's frame size."""

    shape: str
    color: str
    x: float
    y: float
    radius: float
    angle: float
    alpha: float


def tent(position: float, bins: int) -> np.ndarray:
    """Soft one-hot of ``position`` in [0, 1] over ``bins`` bins centred at (b + 0.5) / bins: float32 (bins,).

    Positions beyond the first or last centre go wholly to that bin; the weights always sum to 1."""
    out = np.zeros(bins, dtype=np.float32)
    if bins == 1:
        out[0] = 1.0
        return out
    u = min(max(position * bins - 0.5, 0.0), bins - 1.0)  # in units of bins, 0 = centre of bin 0
    low = min(math.floor(u), bins - 2)
    out[low] = 1.0 - (u - low)
    out[low + 1] = u - low
    return out


def size_word(radius: float, *, height: int, width: int) -> str:
    """The size category whose radius (``scene.RADIUS_FRACTION``) is nearest: "small" up to 0.13 of the frame side
    (half-way between 0.10 and 0.16), "large" above, so a grow or shrink switches word at its middle frame."""
    fraction = radius / min(height, width)
    return min(SIZES, key=lambda s: abs(fraction - RADIUS_FRACTION[s]))


def region_of(obj: ObjectView, *, height: int, width: int) -> str:
    """The 3x3 region holding the object's centre, as the captions name it (``scene.region``)."""
    return region(ObjectState(obj.x, obj.y, obj.radius, obj.angle, (0.0, 0.0, 0.0), obj.alpha),
                  height=height, width=width)


def object_targets(space: AttributeSpace, obj: ObjectView, *, height: int, width: int) -> np.ndarray:
    """The attribute vector of one visible object: float32 (space.size,)."""
    out = np.zeros(space.size, dtype=np.float32)
    out[space.shapes.index(obj.shape)] = 1.0
    out[len(space.shapes) + space.colors.index(obj.color)] = 1.0
    categories = {"shape": obj.shape, "size": size_word(obj.radius, height=height, width=width),
                  "region": region_of(obj, height=height, width=width)}
    for kind, label in categories.items():
        out[space.span(kind, obj.color)][space.group(kind).labels.index(label)] = 1.0
    low, high = (math.log(r) for r in RADIUS_RANGE)
    size = (math.log(max(obj.radius, 1e-6) / min(height, width)) - low) / (high - low)  # 0..1 over the range
    binned = {"x": tent(obj.x / width, space.position_bins), "y": tent(obj.y / height, space.position_bins),
              # size 0 / 1 -> centre of the first / last bin
              "radius": tent(size * (1 - 1 / space.radius_bins) + 0.5 / space.radius_bins, space.radius_bins)}
    for kind, vector in binned.items():
        out[space.span(kind, obj.color)] = out[space.span(kind, ANY_COLOR)] = vector
    return out


class FrameTargets(NamedTuple):
    """The targets of one frame."""

    frame: np.ndarray  # float32 (A,) in [0, 1]: the element-wise max over the visible objects' vectors
    cells: np.ndarray  # float32 (grid*grid, A) in [0, 1]: the same over the objects centred in each grid cell
    pixels: np.ndarray  # uint8 (H, W): per pixel, 0 (background) or 1 + the index of the colour seen there


def frame_targets(
    space: AttributeSpace, objects: Sequence[ObjectView], *, height: int, width: int, grid: int
) -> FrameTargets:
    """Targets of one frame from its objects (:class:`FrameTargets`). Objects below half opacity are absent.

    The frame target is the element-wise max over visible objects; a cell's target is the max over the objects
    whose centre lies in that cell (cells are row-major, as ``SmallCNN``'s grid), so each object is described once,
    in one cell. The pixel labels are rendered with the generator's own rasteriser (``synth.render.coverage``),
    objects painted in order with their opacity (later ones on top): a pixel shows the colour that makes up at
    least half of it, else background.
    """
    frame = np.zeros(space.size, dtype=np.float32)
    cells = np.zeros((grid * grid, space.size), dtype=np.float32)
    weights = np.zeros((len(space.colors), height, width))  # how much of each pixel each colour makes up
    for obj in objects:
        if obj.alpha <= 0.0:
            continue
        # rendered in the object's bounding box only (the shape lies inside its circumcircle)
        x0, y0 = max(0, math.floor(obj.x - obj.radius) - 1), max(0, math.floor(obj.y - obj.radius) - 1)
        x1, y1 = min(width, math.ceil(obj.x + obj.radius) + 1), min(height, math.ceil(obj.y + obj.radius) + 1)
        if x1 > x0 and y1 > y0:
            state = ObjectState(obj.x - x0, obj.y - y0, obj.radius, obj.angle, (0.0, 0.0, 0.0), obj.alpha)
            drawn = obj.alpha * coverage(obj.shape, state, height=y1 - y0, width=x1 - x0)
            weights[:, y0:y1, x0:x1] *= 1.0 - drawn  # painted over
            weights[space.colors.index(obj.color), y0:y1, x0:x1] += drawn
        if obj.alpha < VISIBLE_ALPHA:
            continue
        vector = object_targets(space, obj, height=height, width=width)
        np.maximum(frame, vector, out=frame)
        row = min(grid - 1, max(0, int(grid * obj.y / height)))
        col = min(grid - 1, max(0, int(grid * obj.x / width)))
        np.maximum(cells[row * grid + col], vector, out=cells[row * grid + col])
    pixels = np.where(weights.max(axis=0) >= 0.5, weights.argmax(axis=0) + 1, 0).astype(np.uint8)
    return FrameTargets(frame, cells, pixels)


def _state(raw: Mapping[str, Any]) -> tuple[float, float, float, float, float]:
    return (float(raw["x"]), float(raw["y"]), float(raw["radius"]), float(raw["angle"]), float(raw["alpha"]))


def video_objects(meta: Mapping[str, Any], frame: int) -> list[ObjectView]:
    """Every object of a clip as drawn at source frame ``frame`` (0-based), reconstructed from its metadata.

    Replays the generator's timeline (``synth.events``): the initial state, then each event of that object in
    order; inside an event the state is interpolated with t = (frame - start) / max(1, end - start - 1), plus
    the bounce hop. The long-range jitter tail is not in the metadata and is ignored.
    """
    views = []
    for j, obj in enumerate(meta["objects"]):
        x, y, radius, angle, alpha = _state(obj["initial"])
        color = obj["color"]
        for event in meta["events"]:
            if event["object"] != j:
                continue
            start, end = int(event["start"]), int(event["end"])
            if frame >= end:
                x, y, radius, angle, alpha = _state(event["after"])
                color = event["color_after"]
                continue
            if frame >= start:
                t = (frame - start) / max(1, end - start - 1)
                a, b = _state(event["before"]), _state(event["after"])
                x, y, radius, angle, alpha = (u + (v - u) * t for u, v in zip(a, b))
                y -= float(event.get("hop", 0.0)) * math.sin(math.pi * t)
                color = event["color_before"] if t < 0.5 else event["color_after"]
            break  # events are in temporal order: later ones have not started
        views.append(ObjectView(obj["shape"], color, x, y, radius, angle, alpha))
    return views


def image_objects(meta: Mapping[str, Any]) -> list[ObjectView]:
    """Every object of a still image, from its metadata."""
    return [ObjectView(o["shape"], o["color"], *_state(o)) for o in meta["objects"]]


# --------------------------------------------------------------------------------------------------------
# Training data


class AttributeData(NamedTuple):
    """Frames with their attribute targets."""

    frames: np.ndarray  # uint8 (N, H, W, 3)
    targets: np.ndarray  # float32 (N, A)
    cells: np.ndarray  # float32 (N, G, A)
    pixels: np.ndarray  # uint8 (N, h, w): per pixel, background (0) or 1 + colour index, at the metadata's size
    sources: list[tuple[str, int]]  # (video or image id, source frame index; -1 for an image)


def _pick(num_valid: int, count: int, rng: np.random.Generator) -> list[int]:
    """``count`` positions among ``num_valid`` frames, one drawn at random per equal segment (TSN-style)."""
    if count >= num_valid:
        return list(range(num_valid))
    return [int(rng.integers(k * num_valid // count, (k + 1) * num_valid // count)) for k in range(count)]


def collect_attribute_data(
    frames_dir: str | Path,
    metadata: Mapping[str, Mapping[str, Any]],
    *,
    split: str,
    space: AttributeSpace,
    grid: int,
    frames_per_clip: int,
    seed: int,
) -> AttributeData:
    """Frames of one split with their targets: ``frames_per_clip`` real frames of every clip (one per segment,
    drawn with ``seed`` and the clip id) and every image. Only entries of ``split`` are read."""
    frames_dir = Path(frames_dir)
    index = read_index(frames_dir)
    pixels: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    cells: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    sources: list[tuple[str, int]] = []
    shards: dict[Path, np.ndarray] = {}

    def shard(kind: str, entry: Mapping[str, Any]) -> np.ndarray:
        path = frames_dir / shard_name(kind, split, entry["shard"])
        if path not in shards:
            shards[path] = io.load_array(path, stage="extract")
        return shards[path]

    def meta_of(kind: str, item_id: str) -> Mapping[str, Any]:
        try:
            return metadata[kind][item_id]
        except KeyError:
            raise MetadataError(f"{kind[:-1]} {item_id!r} of {frames_dir / 'index.json'} is not in metadata.json; "
                                f"the frames were not extracted from this synthetic dataset") from None

    for entry in ordered_entries(index, "videos", split):
        meta = meta_of("videos", str(entry["id"]))
        height, width = int(meta["height"]), int(meta["width"])
        rng = np.random.default_rng([seed, zlib.crc32(str(entry["id"]).encode())])
        positions = _pick(int(entry.get("num_valid", len(entry["frame_indices"]))), frames_per_clip, rng)
        clip = shard("videos", entry)[int(entry["row"])]
        for pos in positions:
            source = int(entry["frame_indices"][pos])
            target = frame_targets(space, video_objects(meta, source), height=height, width=width, grid=grid)
            pixels.append(np.asarray(clip[pos]))
            targets.append(target.frame)
            cells.append(target.cells)
            labels.append(target.pixels)
            sources.append((str(entry["id"]), source))
    for entry in ordered_entries(index, "images", split):
        meta = meta_of("images", str(entry["id"]))
        target = frame_targets(space, image_objects(meta), height=int(meta["height"]), width=int(meta["width"]),
                               grid=grid)
        pixels.append(np.asarray(shard("images", entry)[int(entry["row"])]))
        targets.append(target.frame)
        cells.append(target.cells)
        labels.append(target.pixels)
        sources.append((str(entry["id"]), -1))
    if not pixels:
        raise ValueError(f"{frames_dir / 'index.json'}: no {split} videos or images")
    return AttributeData(np.stack(pixels), np.stack(targets), np.stack(cells), np.stack(labels), sources)


# --------------------------------------------------------------------------------------------------------
# Fitting


def attribute_loss(space: AttributeSpace, logits: Tensor, targets: Tensor) -> Tensor:
    """Loss of attribute logits (N, A) against targets (N, A) (frames, or grid cells flattened into N).

    Presence (shapes, colours) is multi-label: binary cross-entropy, summed over the labels and averaged over
    rows. Each colour-bound group of a colour that is present is one categorical choice, so it gets a
    cross-entropy over its labels (one-hot or soft tent targets), averaged over the (row, colour) pairs where it
    applies. So every decision (one label, one group) weighs about the same. Treating bins as categories, rather
    than as more independent binary labels among mostly-absent colours, learned positions markedly faster in the
    same steps; averaging presence over its labels instead of summing left colours half learned (docs/encoder.md).
    """
    p, num_colors = space.num_presence, len(space.colors)
    loss = F.binary_cross_entropy_with_logits(logits[:, :p], targets[:, :p], reduction="sum") / max(len(logits), 1)
    present = targets[:, len(space.shapes) : p] >= 0.5  # (N, C)
    for group in space.groups:
        block, labels = space.block(group.kind), len(group.labels)
        bound = slice(block.start, block.start + num_colors * labels)
        log_probs = F.log_softmax(logits[:, bound].view(-1, num_colors, labels), dim=-1)  # (N, C, labels)
        target = targets[:, bound].view(-1, num_colors, labels)
        mask = present & (target.sum(-1) > 0.5)  # (N, C)
        per_pair = -(target * log_probs).sum(-1)  # (N, C)
        loss = loss + (per_pair * mask).sum() / mask.sum().clamp(min=1)
        if group.binned:  # the colour-free bins hold every visible object at once: independent binary labels
            free = slice(bound.stop, block.stop)
            loss = loss + F.binary_cross_entropy_with_logits(
                logits[:, free], targets[:, free], reduction="sum") / max(len(logits), 1)
    return loss


class AttributeHeads(nn.Module):
    """Attribute logits (the :class:`AttributeSpace` layout) from ``SmallCNN`` features, pooled (N, D) or per grid
    cell (N, G, D). Colour c's presence and its colour-bound groups come from slot c, through one small MLP shared
    by every colour (as the slots share their code); an MLP, because reading a 3x3 region off a centroid takes
    thresholds, which linear heads learned too slowly (docs/encoder.md). Shape presence and the colour-free bins
    come linearly from the colour-blind part, so that it learns to hold them. One module serves frames and cells
    alike: a cell holds the slots of the objects centred in it, copied from the frame's. A probe: used to train and
    score the encoder, not part of its checkpoint."""

    def __init__(self, space: AttributeSpace, *, feature_dim: int, slot_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.space, self.slot_dim = space, slot_dim
        per_slot = 1 + sum(len(g.labels) for g in space.groups)
        free = len(space.shapes) + sum(len(g.labels) for g in space.groups if g.binned)
        self.per_slot = nn.Sequential(nn.Linear(slot_dim, hidden), nn.ReLU(), nn.Linear(hidden, per_slot))
        # linear, and from the colour-blind part only: that part must hold where objects are whatever their colour
        self.free = nn.Linear(feature_dim - len(space.colors) * slot_dim, free)

    def forward(self, features: Tensor) -> Tensor:
        """features (..., D) -> logits (..., space.size)."""
        C, S = len(self.space.colors), self.slot_dim
        slots = features[..., : C * S].unflatten(-1, (C, S))  # (..., C, S)
        per_slot = self.per_slot(slots)  # (..., C, 1 + labels of every group)
        free = self.free(features[..., C * S :])  # (..., shapes + labels of the binned groups)
        parts = [free[..., : len(self.space.shapes)], per_slot[..., 0]]  # shape presence, colour presence
        bound_at, free_at = 1, len(self.space.shapes)
        for group in self.space.groups:
            labels = len(group.labels)
            parts.append(per_slot[..., bound_at : bound_at + labels].flatten(-2))  # (..., C*labels)
            bound_at += labels
            if group.binned:
                parts.append(free[..., free_at : free_at + labels])
                free_at += labels
        return torch.cat(parts, dim=-1)


def build_heads(space: AttributeSpace, encoder: SmallCNN) -> AttributeHeads:
    """The heads for ``encoder``, initialised from the current torch RNG state."""
    if encoder.num_colors != len(space.colors):
        raise ValueError(f"the encoder has {encoder.num_colors} colour slots, the targets {len(space.colors)} "
                         f"colours; build it with num_colors=len(space.colors)")
    return AttributeHeads(space, feature_dim=encoder.feature_dim, slot_dim=encoder.slot_dim)


def pixel_loss(color_logits: Tensor, pixels: Tensor) -> Tensor:
    """Cross-entropy of the per-pixel colour logits (N, C+1, h, w) against the rendered labels (N, H, W), brought
    to the logits' grid as soft targets (the share of each label in each cell) when the sizes differ; averaged
    over frames and pixels."""
    target = F.one_hot(pixels.long(), color_logits.size(1)).permute(0, 3, 1, 2).float()  # (N, C+1, H, W)
    if target.shape[-2:] != color_logits.shape[-2:]:
        target = F.adaptive_avg_pool2d(target, color_logits.shape[-2:])  # (N, C+1, h, w)
    return -(target * F.log_softmax(color_logits, dim=1)).sum(dim=1).mean()


def _one_cycle(optimizer: torch.optim.Optimizer, *, lr: float, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Warm-up to ``lr`` over the first 15% of steps, cosine decay after (Smith & Topin 2017), which matters with
    only a few hundred steps."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, steps), pct_start=0.15)


def fit_attribute_encoder(
    encoder: SmallCNN,
    heads: AttributeHeads,
    data: AttributeData,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    device: str | torch.device = "cpu",
    log: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``encoder`` and ``heads`` on ``data``: :func:`attribute_loss` on the pooled vector plus the same loss
    on every grid cell, plus :func:`pixel_loss` on the colour stem. AdamW, one-cycle schedule. Calls
    ``log(epoch, mean loss)`` after each epoch; returns the mean loss of every epoch."""
    space = heads.space
    num = len(data.frames)
    targets, cells, pixels = (torch.as_tensor(a) for a in (data.targets, data.cells, data.pixels))
    colors = slice(len(space.shapes), space.num_presence)
    modules = nn.ModuleList([encoder, heads]).to(device).train()
    optimizer = torch.optim.AdamW(modules.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = _one_cycle(optimizer, lr=lr, steps=epochs * math.ceil(num / batch_size))
    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(num, generator=generator)
        total = 0.0
        for start in range(0, num, batch_size):
            idx = order[start : start + batch_size]
            frame_target = targets[idx].to(device)
            # every visible object gets a crop, even while the colour stem misses it (the crop is then centred on
            # the few pixels found, or on the frame's centre): its targets still teach the slot
            out = encoder.encode(torch.from_numpy(data.frames[idx.numpy()]).to(device),
                                 present=frame_target[:, colors] >= 0.5)
            loss = pixel_loss(out.color_logits, pixels[idx].to(device))
            loss = loss + attribute_loss(space, heads(out.pooled), frame_target)
            loss = loss + attribute_loss(space, heads(out.grid).flatten(0, 1), cells[idx].flatten(0, 1).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        history.append(total / max(num, 1))
        if log is not None:
            log(epoch, history[-1])
    return history


@torch.inference_mode()
def encode_frames(
    encoder: SmallCNN, frames: np.ndarray, *, batch_size: int = 64, device: str | torch.device = "cpu"
) -> tuple[Tensor, Tensor]:
    """The encoder in eval mode over frames uint8 (N, H, W, 3) -> (pooled (N, D), grid (N, G, D)) float32 on CPU."""
    was_training = encoder.training
    encoder.to(device).eval()
    pooled, grid = [], []
    for start in range(0, len(frames), batch_size):
        p, g = encoder(torch.from_numpy(np.array(frames[start : start + batch_size])).to(device))
        pooled.append(p.float().cpu())
        grid.append(g.float().cpu())
    encoder.train(was_training)
    return torch.cat(pooled), torch.cat(grid)


def fit_probe(
    heads: AttributeHeads,
    pooled: Tensor,
    targets: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 128,
    seed: int = 0,
) -> list[float]:
    """Train ``heads`` further on frozen pooled features (N, D) against the frames' targets (N, A): a probe of
    what the features hold. Heads trained alongside the encoder stop with the encoder's schedule, before they have
    sharpened the thresholds that read positions off a centroid (val region accuracy 0.81 -> 0.93 after 30 probe
    epochs, docs/encoder.md). The cells share these heads. Returns the mean loss of every epoch."""
    target = torch.as_tensor(targets)
    heads.train()
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=1e-4)
    schedule = _one_cycle(optimizer, lr=lr, steps=epochs * math.ceil(len(pooled) / batch_size))
    generator = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        order = torch.randperm(len(pooled), generator=generator)
        total = 0.0
        for start in range(0, len(pooled), batch_size):
            idx = order[start : start + batch_size]
            loss = attribute_loss(heads.space, heads(pooled[idx]), target[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        history.append(total / max(len(pooled), 1))
    heads.eval()
    return history


@torch.inference_mode()
def predict_attributes(heads: AttributeHeads, pooled: Tensor, grid: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Attribute logits of encoded frames (:func:`encode_frames`): (frame (N, A), cells (N, G, A)) float32."""
    was_training = heads.training
    heads.eval()
    out = heads(pooled).numpy(), heads(grid).numpy()
    heads.train(was_training)
    return out


# --------------------------------------------------------------------------------------------------------
# Accuracy


def attribute_accuracy(
    space: AttributeSpace, logits: np.ndarray, cell_logits: np.ndarray, targets: np.ndarray, cells: np.ndarray
) -> dict[str, float]:
    """Accuracies of :func:`predict_attributes` output (logits (N, A), cell logits (N, G, A)) against targets
    ((N, A), (N, G, A)); each in [0, 1], NaN when nothing was there to score.

    What the captions name, read from the pooled vector (all that the video models see):

    - ``colors``: frames whose set of visible colours (logit >= 0, i.e. p >= 0.5) is exact;
    - ``shape``, ``size``, ``region``: per visible object (truly present colour), the most probable shape /
      size word / 3x3 region of that colour is the true one (chance 1/4, 1/2, 1/9);
    - ``objects``: visible objects whose colour is detected *and* whose shape, size and region are all right;

    and read from the grid cells (what image models attend over): ``grid_colors``, the frame's colour set from
    the max over cells; ``grid_shape``, ``grid_size``, ``grid_region``, read in the cell most confident that the
    object's colour is there. Also ``x``, ``y``, ``radius`` (per visible object, the most probable bin is the bin
    nearest the truth; chance 1/8, 1/8, 1/4) and ``shape_set`` (frames whose set of shapes is exact).
    """
    num_shapes, p = len(space.shapes), space.num_presence
    truth = targets[:, :p] >= 0.5
    guess = logits[:, :p] >= 0.0
    colors_truth, colors_guess = truth[:, num_shapes:], guess[:, num_shapes:]  # (N, C)
    out = {"colors": float(np.mean(np.all(colors_guess == colors_truth, axis=1)))}
    frame_idx, color_idx = np.nonzero(colors_truth)  # every visible object, as (frame, colour)
    # the cell each object is read from: where the cell head is surest its colour is present
    best_cell = cell_logits[frame_idx, :, num_shapes + color_idx].argmax(axis=1)  # (objects,)
    all_right = colors_guess[frame_idx, color_idx]
    for group in space.groups:
        labels = len(group.labels)
        bound = slice(space.block(group.kind).start, space.block(group.kind).start + len(space.colors) * labels)
        wanted = targets[frame_idx, bound].reshape(-1, len(space.colors), labels)[np.arange(len(frame_idx)),
                                                                                   color_idx]  # (objects, labels)
        got = logits[frame_idx, bound].reshape(-1, len(space.colors), labels)[np.arange(len(frame_idx)), color_idx]
        in_cell = cell_logits[frame_idx, best_cell, bound].reshape(-1, len(space.colors), labels)[
            np.arange(len(frame_idx)), color_idx]
        right = got.argmax(axis=1) == wanted.argmax(axis=1)
        out[group.kind] = float(right.mean()) if len(right) else float("nan")
        if not group.binned:
            all_right = all_right & right
            out[f"grid_{group.kind}"] = float(np.mean(in_cell.argmax(axis=1) == wanted.argmax(axis=1))) \
                if len(right) else float("nan")
    out["objects"] = float(all_right.mean()) if len(all_right) else float("nan")
    out["grid_colors"] = float(np.mean(np.all((cell_logits[..., num_shapes:p].max(axis=1) >= 0.0) == colors_truth,
                                              axis=1)))
    out["shape_set"] = float(np.mean(np.all(guess[:, :num_shapes] == truth[:, :num_shapes], axis=1)))
    out["cell_colors"] = float(np.mean(np.all((cell_logits[..., num_shapes:p] >= 0.0) == (cells[..., num_shapes:p]
                                                                                          >= 0.5), axis=-1)))
    order = ("colors", "shape", "size", "region", "objects", "grid_colors", "grid_shape", "grid_size", "grid_region",
             "x", "y", "radius", "shape_set", "cell_colors")
    return {key: out[key] for key in order}


# --------------------------------------------------------------------------------------------------------
# The encoder stage's training


def train_attribute_encoder(
    config: Any,
    *,
    frames_dir: str | Path,
    metadata_path: str | Path,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
) -> EncoderRun:
    """Train ``SmallCNN`` (the ``encoder:`` section, ``config.EncoderConfig``) on the train split's attributes.

    Train clips contribute ``config.frames_per_clip`` frames each, train images all of theirs; the val split
    (same sampling) is scored after every epoch with :func:`attribute_accuracy`, and again, for ``metrics``, after
    the heads are refit on the frozen features (:func:`fit_probe`). Test data is never read.
    Raises :class:`~seqvision.io.MetadataError` when ``metadata_path`` does not exist (a real dataset has
    none).
    """
    if config.backbone != "small_cnn":
        raise ValueError(f"train_attribute_encoder trains small_cnn, not {config.backbone!r}")
    require_metadata(metadata_path)
    started = time.perf_counter()
    space = AttributeSpace()
    metadata = load_metadata(metadata_path)
    sampling = {"space": space, "grid": config.grid, "frames_per_clip": config.frames_per_clip, "seed": config.seed}
    train = collect_attribute_data(frames_dir, metadata, split="train", **sampling)
    index = read_index(frames_dir)
    has_val = any(e["split"] == "val" for kind in ("videos", "images") for e in index[kind])
    val = collect_attribute_data(frames_dir, metadata, split="val", **sampling) if has_val else None
    prepared = time.perf_counter()
    log(f"encoder: {len(train.frames)} train frames ({sum(s[1] >= 0 for s in train.sources)} from clips), "
        f"{0 if val is None else len(val.frames)} val frames, {space.size} attributes; "
        f"targets in {prepared - started:.1f} s")

    encoder = build_encoder(config, num_colors=len(space.colors))
    heads = build_heads(space, encoder)
    epochs: list[dict[str, Any]] = []
    epoch_seconds: list[float] = []

    def score() -> dict[str, float]:
        assert val is not None
        logits, cell_logits = predict_attributes(heads, *encode_frames(encoder, val.frames, device=device))
        return {k: round(v, 4) for k, v in attribute_accuracy(space, logits, cell_logits, val.targets,
                                                               val.cells).items()}

    def after_epoch(epoch: int, loss: float) -> None:
        epoch_seconds.append(round(time.perf_counter() - prepared, 2))
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": round(loss, 5)}
        if val is not None:
            record["val"] = score()
        epochs.append(record)
        val_text = "" if val is None else "; val " + ", ".join(f"{k} {v:.3f}" for k, v in record["val"].items())
        log(f"encoder: epoch {epoch + 1}/{config.epochs} loss {loss:.4f}{val_text}")

    fit_attribute_encoder(encoder, heads, train, epochs=config.epochs, lr=config.lr,
                          batch_size=config.batch_size, weight_decay=config.weight_decay, seed=config.seed,
                          device=device, log=after_epoch)
    trained = time.perf_counter()
    probe_loss = fit_probe(heads.cpu(), encode_frames(encoder, train.frames, device=device)[0], train.targets,
                           epochs=PROBE_EPOCHS, lr=PROBE_LR, batch_size=PROBE_BATCH, seed=config.seed)
    encoder.cpu().eval()
    metrics = score() if val is not None else {}
    probed = time.perf_counter()
    if val is not None:
        log("encoder: val after the probe: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    history = {
        "backbone": "small_cnn",
        "trained": True,
        "attributes": space.names,
        "train": {"frames": len(train.frames), "clips": len({s[0] for s in train.sources if s[1] >= 0}),
                  "images": sum(s[1] < 0 for s in train.sources), "frames_per_clip": config.frames_per_clip},
        "val": {"frames": 0 if val is None else len(val.frames)},
        "epochs": epochs,
        "probe": {"epochs": PROBE_EPOCHS, "train_loss": round(probe_loss[-1], 5) if probe_loss else None,
                  "val": metrics},
    }
    seconds = {"targets": round(prepared - started, 2), "training": round(trained - prepared, 2),
               "probe": round(probed - trained, 2)}
    return EncoderRun(encoder, history, metrics, {"seconds": seconds, "seconds_at_epoch_end": epoch_seconds})
