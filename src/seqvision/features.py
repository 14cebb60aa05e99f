"""The ``encoder`` and ``features`` stages as plain functions (``pipelines/features.py`` wraps them in Prefect flows).

``encoder``: :func:`train_attribute_encoder` trains :class:`~seqvision.encoders.SmallCNN` once, on train-split
frames only (a few frames per train clip plus every train image), to recognise the synthetic objects' attributes
recorded in ``data/annotations/metadata.json``: the benchmark's stand-in for ImageNet pretraining. Targets are
*where* things are as well as *what* they are (see :class:`AttributeSpace`), so the pooled vector and the grid keep
position, which move_left vs move_right and "left of" depend on. Torchvision backbones are not trained:
:func:`pretrained_encoder` loads ``encoder.weights`` from a local file (or warns that the weights are random).

``features``: :func:`write_features` runs the encoder over every frame shard and writes
``{kind}-{split}.npy`` float16 (videos (n, T, D) pooled per frame, images (n, G, D) grid) in the frame shards' row
order (shard by shard in natural order, then row), plus ``index.json``, so ``datasets.VisualStore`` reads them.

Per-frame object state comes from the metadata: each object's initial state, then its events in order; during an
event ``[start, end)`` the state is interpolated exactly as the generator does (linear, the first frame shows
``before``, the last ``after``; a bounce adds ``hop * sin(pi t)``). What the metadata cannot give exactly: states
are rounded there (0.01 px, 0.1 degree), the long-range jitter tail (at most 3% of the frame) is not recorded and
is ignored, and fades and colour blends are cut at the half-way point (visible when alpha >= 0.5; the nearer
colour of a change_color blend).
"""

from __future__ import annotations

import json
import math
import re
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from seqvision import io
from seqvision.encoders import (
    SmallCNN,
    build_encoder,
    encoder_from_checkpoint,
    encoder_state,
    extract_features,
)
from seqvision.synth.scene import COLORS, SHAPES

VISIBLE_ALPHA = 0.5  # an object fading in or out counts as present from half opacity
COVER_FRACTION = 0.7  # an object occupies the grid cells its disk of radius 0.7 R touches (R = circumradius)
# Circumradius / min(H, W) spans 0.06 (a small object shrunk: 0.10 * 0.6) .. 0.272 (a large one grown:
# 0.16 * 1.7); log-spaced bins over that range put bin centres on the sizes that actually occur.
RADIUS_RANGE = (0.06, 0.272)


ANY_COLOR = "any"  # the colour-free position and size bins (AttributeSpace)


class MetadataError(ValueError):
    """metadata.json is missing, malformed, or does not describe the extracted frames. The message says which."""


# --------------------------------------------------------------------------------------------------------
# Attribute targets


@dataclass(frozen=True)
class AttributeSpace:
    """The multi-label targets, one vector of ``size`` values in [0, 1] per frame (and per grid cell).

    - ``shape:{s}``, ``color:{c}``: which shapes and colours are visible;
    - ``x:{c}:{b}``, ``y:{c}:{b}``: where the object of colour c is (colours are unique within a scene, so a
      colour names one object), in ``position_bins`` bins across the frame;
    - ``radius:{c}:{b}``: its size, in ``radius_bins`` log-spaced bins (grow/shrink);
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
    position_bins: int = 8
    radius_bins: int = 4

    @property
    def names(self) -> list[str]:
        names = [f"shape:{s}" for s in self.shapes] + [f"color:{c}" for c in self.colors]
        for kind, bins in self._groups():
            names += [f"{kind}:{c}:{b}" for c in self._bound() for b in range(bins)]
        return names

    @property
    def size(self) -> int:
        return self.num_presence + len(self._bound()) * sum(bins for _, bins in self._groups())

    @property
    def num_presence(self) -> int:
        """The first ``num_presence`` entries are the shape and colour presence labels."""
        return len(self.shapes) + len(self.colors)

    def _groups(self) -> tuple[tuple[str, int], ...]:
        return (("x", self.position_bins), ("y", self.position_bins), ("radius", self.radius_bins))

    def _bound(self) -> tuple[str, ...]:
        return (*self.colors, ANY_COLOR)

    def bins(self, kind: str, color: str) -> slice:
        """Where ``kind`` ("x", "y", "radius") bins of colour ``color`` (or ``"any"``) sit in a target vector."""
        start = self.num_presence
        for name, bins in self._groups():
            if name == kind:
                start += self._bound().index(color) * bins
                return slice(start, start + bins)
            start += len(self._bound()) * bins
        raise KeyError(kind)


class ObjectView(NamedTuple):
    """One object as drawn in one frame; coordinates in pixels of the metadata's frame size."""

    shape: str
    color: str
    x: float
    y: float
    radius: float
    angle: float
    alpha: float


def _tent(position: float, bins: int) -> np.ndarray:
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


def object_targets(space: AttributeSpace, obj: ObjectView, *, height: int, width: int) -> np.ndarray:
    """The attribute vector of one visible object: float32 (space.size,)."""
    out = np.zeros(space.size, dtype=np.float32)
    out[space.shapes.index(obj.shape)] = 1.0
    out[len(space.shapes) + space.colors.index(obj.color)] = 1.0
    x, y = _tent(obj.x / width, space.position_bins), _tent(obj.y / height, space.position_bins)
    out[space.bins("x", obj.color)] = out[space.bins("x", ANY_COLOR)] = x
    out[space.bins("y", obj.color)] = out[space.bins("y", ANY_COLOR)] = y
    low, high = (math.log(r) for r in RADIUS_RANGE)
    size = (math.log(max(obj.radius, 1e-6) / min(height, width)) - low) / (high - low)  # 0..1 over the range
    radius = _tent(size * (1 - 1 / space.radius_bins) + 0.5 / space.radius_bins,
                   space.radius_bins)  # size 0 / 1 -> centre of the first / last bin
    out[space.bins("radius", obj.color)] = out[space.bins("radius", ANY_COLOR)] = radius
    return out


def frame_targets(
    space: AttributeSpace, objects: Sequence[ObjectView], *, height: int, width: int, grid: int
) -> tuple[np.ndarray, np.ndarray]:
    """Targets of one frame from its objects: (frame (A,), cells (grid*grid, A)) float32 in [0, 1].

    Objects below half opacity are absent. The frame target is the element-wise max over visible objects; a
    cell's target is the max over the objects whose disk of radius COVER_FRACTION * R touches that cell (cells
    are row-major, as ``SmallCNN``'s grid).
    """
    frame = np.zeros(space.size, dtype=np.float32)
    cells = np.zeros((grid * grid, space.size), dtype=np.float32)
    cell_h, cell_w = height / grid, width / grid
    for obj in objects:
        if obj.alpha < VISIBLE_ALPHA:
            continue
        vector = object_targets(space, obj, height=height, width=width)
        np.maximum(frame, vector, out=frame)
        reach = COVER_FRACTION * obj.radius
        for row in range(grid):
            for col in range(grid):
                # distance from the centre to the cell rectangle
                dx = max(col * cell_w - obj.x, 0.0, obj.x - (col + 1) * cell_w)
                dy = max(row * cell_h - obj.y, 0.0, obj.y - (row + 1) * cell_h)
                if dx * dx + dy * dy < reach * reach:
                    np.maximum(cells[row * grid + col], vector, out=cells[row * grid + col])
    return frame, cells


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


def load_metadata(path: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"videos": {id: VideoMeta}, "images": {id: ImageMeta}}`` from the generator's metadata.json."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path}: no such file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {kind: {str(m["id"]): m for m in raw[kind]} for kind in ("videos", "images")}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise MetadataError(f"{path}: not the synthetic benchmark's metadata.json ({type(err).__name__}: {err})") \
            from None


# --------------------------------------------------------------------------------------------------------
# Training data


class AttributeData(NamedTuple):
    """Frames with their attribute targets."""

    frames: np.ndarray  # uint8 (N, H, W, 3)
    targets: np.ndarray  # float32 (N, A)
    cells: np.ndarray  # float32 (N, G, A)
    sources: list[tuple[str, int]]  # (video or image id, source frame index; -1 for an image)


def read_index(frames_dir: str | Path) -> dict[str, Any]:
    path = Path(frames_dir) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; run the extract stage first")
    index = json.loads(path.read_text(encoding="utf-8"))
    for kind in ("videos", "images"):
        if not isinstance(index.get(kind), list):
            raise ValueError(f"{path}: missing key {kind!r} (a list of entries)")
    return index


def _natural(name: str) -> tuple[Any, ...]:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _shard_name(kind: str, split: str, shard: int | str) -> str:
    return shard if isinstance(shard, str) else f"{kind}-{split}-{int(shard):03d}.npy"


def ordered_entries(index: Mapping[str, Any], kind: str, split: str) -> list[dict[str, Any]]:
    """The split's index entries in feature-row order: shard by shard (natural order: 1000 after 999), then row.

    The same order as ``datasets.VisualStore``."""
    entries = [e for e in index[kind] if e["split"] == split]
    return sorted(entries, key=lambda e: (_natural(_shard_name(kind, split, e["shard"])), int(e["row"])))


def _splits(index: Mapping[str, Any], kind: str) -> list[str]:
    order = {"train": 0, "val": 1, "test": 2}
    return sorted({e["split"] for e in index[kind]}, key=lambda s: (order.get(s, 3), s))


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
    sources: list[tuple[str, int]] = []
    shards: dict[str, np.ndarray] = {}

    def shard(kind: str, entry: Mapping[str, Any]) -> np.ndarray:
        name = _shard_name(kind, split, entry["shard"])
        if name not in shards:
            shards[name] = np.load(frames_dir / name, mmap_mode="r")
        return shards[name]

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
            frame, cell = frame_targets(space, video_objects(meta, source), height=height, width=width, grid=grid)
            pixels.append(np.asarray(clip[pos]))
            targets.append(frame)
            cells.append(cell)
            sources.append((str(entry["id"]), source))
    for entry in ordered_entries(index, "images", split):
        meta = meta_of("images", str(entry["id"]))
        frame, cell = frame_targets(space, image_objects(meta), height=int(meta["height"]), width=int(meta["width"]),
                                    grid=grid)
        pixels.append(np.asarray(shard("images", entry)[int(entry["row"])]))
        targets.append(frame)
        cells.append(cell)
        sources.append((str(entry["id"]), -1))
    if not pixels:
        raise ValueError(f"{frames_dir / 'index.json'}: no {split} videos or images")
    return AttributeData(np.stack(pixels), np.stack(targets), np.stack(cells), sources)


# --------------------------------------------------------------------------------------------------------
# Encoder stage


def attribute_loss(space: AttributeSpace, logits: Tensor, targets: Tensor) -> Tensor:
    """Loss of attribute logits (N, A) against targets (N, A) (frames, or grid cells flattened into N).

    Presence (shapes, colours) is multi-label: binary cross-entropy, summed over the labels and averaged over
    rows. Each binned quantity of a colour that is present is one categorical choice, so it gets a cross-entropy
    over its bins (soft tent targets), averaged over the (row, colour) pairs where it applies. So every decision
    (one label, one bin group) weighs about the same. Treating bins as categories, rather than as more
    independent binary labels among mostly-absent colours, learned positions markedly faster in the same steps;
    averaging presence over its labels instead of summing left colours half learned (docs/encoder.md).
    """
    p, num_colors = space.num_presence, len(space.colors)
    loss = F.binary_cross_entropy_with_logits(logits[:, :p], targets[:, :p], reduction="sum") / max(len(logits), 1)
    present = targets[:, len(space.shapes) : p] >= 0.5  # (N, C)
    start = p
    for _, bins in space._groups():
        span = slice(start, start + num_colors * bins)
        log_probs = F.log_softmax(logits[:, span].view(-1, num_colors, bins), dim=-1)  # (N, C, bins)
        target = targets[:, span].view(-1, num_colors, bins)
        mask = present & (target.sum(-1) > 0.5)  # (N, C)
        per_pair = -(target * log_probs).sum(-1)  # (N, C)
        loss = loss + (per_pair * mask).sum() / mask.sum().clamp(min=1)
        # The colour-free bins hold every visible object at once (several bumps): independent binary labels.
        free = slice(span.stop, span.stop + bins)
        loss = loss + F.binary_cross_entropy_with_logits(
            logits[:, free], targets[:, free], reduction="sum") / max(len(logits), 1)
        start = free.stop
    return loss


def fit_attribute_encoder(
    encoder: SmallCNN,
    data: AttributeData,
    *,
    space: AttributeSpace,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    device: str | torch.device = "cpu",
    log: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``encoder`` (built with ``num_attributes = space.size``) on ``data``: :func:`attribute_loss` on the
    pooled vector's head plus the same loss on every grid cell's head. AdamW with a one-cycle schedule (warm-up to
    ``lr`` over the first 15% of steps, cosine decay after; Smith & Topin 2017), which matters with only a few
    hundred steps. Calls ``log(epoch, mean loss)`` after each epoch; returns the mean loss of every epoch.

    (``encoders.train_encoder`` is the generic version: plain BCE on every label, constant learning rate.)
    """
    num = len(data.frames)
    targets = torch.as_tensor(data.targets)
    cells = torch.as_tensor(data.cells)
    encoder.to(device).train()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(num / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch),
                                                   pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(num, generator=generator)
        total = 0.0
        for start in range(0, num, batch_size):
            idx = order[start : start + batch_size]
            x = torch.from_numpy(data.frames[idx.numpy()]).to(device)
            pooled, grid = encoder(x)  # (B, D), (B, G, D)
            loss = attribute_loss(space, encoder.attribute_head(pooled), targets[idx].to(device))
            loss = loss + attribute_loss(space, encoder.cell_head(grid).flatten(0, 1), cells[idx].flatten(0, 1).to(device))
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
def predict_attributes(
    encoder: SmallCNN, frames: np.ndarray, *, batch_size: int = 256, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Attribute scores: frames uint8 (N, H, W, 3) -> (frame logits (N, A), cell logits (N, G, A)) float32."""
    was_training = encoder.training
    encoder.to(device).eval()
    frame_logits, cell_logits = [], []
    for start in range(0, len(frames), batch_size):
        x = torch.from_numpy(np.array(frames[start : start + batch_size])).to(device)
        pooled, grid = encoder(x)  # (n, D), (n, G, D)
        frame_logits.append(encoder.attribute_head(pooled).float().cpu().numpy())
        cell_logits.append(encoder.cell_head(grid).float().cpu().numpy())
    encoder.train(was_training)
    return np.concatenate(frame_logits), np.concatenate(cell_logits)


def attribute_accuracy(
    space: AttributeSpace, logits: np.ndarray, cell_logits: np.ndarray, targets: np.ndarray, cells: np.ndarray
) -> dict[str, float]:
    """Accuracies of :func:`predict_attributes` output against targets ((N, A) and (N, G, A)):

    - ``colors`` / ``shapes``: frames whose set of visible colours / shapes (logit >= 0, i.e. p >= 0.5) is exact;
    - ``x``, ``y``, ``radius``: per visible object, the most probable bin is the bin nearest the truth (chance:
      1/8, 1/8, 1/4);
    - ``cell_colors``: (frame, grid cell) pairs whose set of colours is exact.
    """
    shapes, p = len(space.shapes), space.num_presence
    truth = targets[:, :p] >= 0.5
    guess = logits[:, :p] >= 0.0
    out = {"colors": float(np.mean(np.all(guess[:, shapes:] == truth[:, shapes:], axis=1))),
           "shapes": float(np.mean(np.all(guess[:, :shapes] == truth[:, :shapes], axis=1)))}
    for kind, _ in space._groups():
        hits, total = 0, 0
        for c, color in enumerate(space.colors):
            span = space.bins(kind, color)
            rows = truth[:, shapes + c]
            hits += int(np.sum(logits[rows, span].argmax(axis=1) == targets[rows, span].argmax(axis=1)))
            total += int(rows.sum())
        out[kind] = hits / total if total else float("nan")
    out["cell_colors"] = float(np.mean(np.all((cell_logits[..., shapes:p] >= 0.0) == (cells[..., shapes:p] >= 0.5),
                                              axis=-1)))
    return out


class EncoderRun(NamedTuple):
    encoder: nn.Module
    history: dict[str, Any]  # JSON-ready: what was trained on, loss and val accuracy per epoch, timings
    metrics: dict[str, Any]  # JSON-ready: final val accuracies (empty when nothing was trained or no val split)


def require_metadata(metadata_path: str | Path) -> None:
    """Raise :class:`MetadataError`, saying what to do instead, when small_cnn's metadata file is missing."""
    if not Path(metadata_path).is_file():
        raise MetadataError(
            f"encoder.backbone is small_cnn, which is trained on the synthetic objects' attributes recorded in "
            f"{metadata_path}, but there is no such file (a real dataset has none). Set encoder.backbone to a "
            f"torchvision model (resnet18, ...) and encoder.weights to a local ImageNet state-dict file "
            f"(see docs/encoder.md)"
        )


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
    (same sampling) is scored after every epoch with :func:`attribute_accuracy`. Test data is never read.
    Raises :class:`MetadataError` when ``metadata_path`` does not exist (a real dataset has none).
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

    encoder = build_encoder(config, num_attributes=space.size)
    epochs: list[dict[str, Any]] = []

    def after_epoch(epoch: int, loss: float) -> None:
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": round(loss, 5),
                                  "seconds": round(time.perf_counter() - prepared, 2)}
        if val is not None:
            logits, cell_logits = predict_attributes(encoder, val.frames, device=device)
            record["val"] = {k: round(v, 4) for k, v in
                             attribute_accuracy(space, logits, cell_logits, val.targets, val.cells).items()}
        epochs.append(record)
        val_text = "" if val is None else "; val " + ", ".join(f"{k} {v:.3f}" for k, v in record["val"].items())
        log(f"encoder: epoch {epoch + 1}/{config.epochs} loss {loss:.4f}{val_text}")

    fit_attribute_encoder(encoder, train, space=space, epochs=config.epochs, lr=config.lr,
                          batch_size=config.batch_size, weight_decay=config.weight_decay, seed=config.seed,
                          device=device, log=after_epoch)
    encoder.cpu().eval()
    trained = time.perf_counter()
    metrics = dict(epochs[-1]["val"]) if epochs and val is not None else {}
    history = {
        "backbone": "small_cnn",
        "trained": True,
        "attributes": space.names,
        "train": {"frames": len(train.frames), "clips": len({s[0] for s in train.sources if s[1] >= 0}),
                  "images": sum(s[1] < 0 for s in train.sources), "frames_per_clip": config.frames_per_clip},
        "val": {"frames": 0 if val is None else len(val.frames)},
        "epochs": epochs,
        "seconds": {"targets": round(prepared - started, 2), "training": round(trained - prepared, 2)},
    }
    return EncoderRun(encoder, history, metrics)


def pretrained_encoder(config: Any) -> EncoderRun:
    """A torchvision backbone with ``config.weights`` loaded from a local file; nothing is trained.

    With ``weights: ""`` the backbone is random: ``build_encoder`` warns (:class:`RandomWeightsWarning`) and the
    history records ``"random_weights": true``."""
    encoder = build_encoder(config)
    history = {"backbone": config.backbone, "trained": False, "weights": config.weights,
               "random_weights": not config.weights, "epochs": []}
    return EncoderRun(encoder.eval(), history, {})


def save_encoder(run: EncoderRun, out_dir: str | Path) -> None:
    """``encoder.pt`` (rebuilds the encoder alone: ``encoders.encoder_from_checkpoint(torch.load(...))``),
    ``history.json`` and ``metrics.json``, each written atomically."""
    out_dir = Path(out_dir)
    checkpoint = encoder_state(run.encoder)
    if "attributes" in run.history:
        checkpoint["attributes"] = run.history["attributes"]
    with io.atomic_path(out_dir / "encoder.pt") as tmp:
        torch.save(checkpoint, tmp)
    io.write_json(out_dir / "history.json", run.history)
    io.write_json(out_dir / "metrics.json", run.metrics)


def load_encoder(path: str | Path) -> nn.Module:
    """The encoder saved by :func:`save_encoder`, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; run the encoder stage first")
    return encoder_from_checkpoint(torch.load(path, map_location="cpu", weights_only=True)).eval()


# --------------------------------------------------------------------------------------------------------
# Features stage


class FeatureJob(NamedTuple):
    """One output array: every entry of one kind and split, in row order."""

    kind: str  # "videos" | "images"
    split: str
    entries: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.split}.npy"


def plan_features(frames_dir: str | Path) -> list[FeatureJob]:
    """One job per (kind, split) present in ``frames_dir/index.json``."""
    index = read_index(frames_dir)
    return [FeatureJob(kind, split, ordered_entries(index, kind, split))
            for kind in ("videos", "images") for split in _splits(index, kind)]


def count_frames(jobs: Sequence[FeatureJob]) -> int:
    """Frames the jobs will encode (a clip counts its T frames, an image 1), for a progress bar."""
    return sum(len(e.get("frame_indices", ())) if j.kind == "videos" else 1 for j in jobs for e in j.entries)


def _row_runs(job: FeatureJob) -> Iterator[tuple[str, list[int]]]:
    """(shard file, rows) in job order, rows grouped per shard."""
    current, rows = None, []
    for entry in job.entries:
        name = _shard_name(job.kind, job.split, entry["shard"])
        if name != current and rows:
            yield current, rows  # type: ignore[misc]
            rows = []
        current = name
        rows.append(int(entry["row"]))
    if rows:
        yield current, rows  # type: ignore[misc]


def write_feature_array(
    encoder: nn.Module,
    frames_dir: str | Path,
    job: FeatureJob,
    out_dir: str | Path,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    on_frames: Callable[[int], None] | None = None,
) -> tuple[int, ...]:
    """Encode one job's frames into ``out_dir/{kind}-{split}.npy`` float16; returns its shape.

    Videos: (n, T, D) pooled per frame; images: (n, G, D) grid. Rows follow ``job.entries``. Written through a
    memory map on a temporary name, then renamed, so memory stays bounded and a crash leaves no partial file.
    ``on_frames(k)`` is called after every k frames (for a progress bar).
    """
    frames_dir = Path(frames_dir)
    runs = list(_row_runs(job))
    if not runs:
        raise ValueError(f"no {job.kind} in split {job.split!r}")
    first = np.load(frames_dir / runs[0][0], mmap_mode="r")
    per_item = first.shape[1] if job.kind == "videos" else 1
    probe = extract_features(encoder, np.array(first[:1]), batch_size=batch_size, device=device)
    shape = (len(job.entries), *probe.shape[1:])
    items_per_chunk = max(1, batch_size // per_item)
    with io.atomic_path(Path(out_dir) / job.name) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        at = 0
        for shard_name, rows in runs:
            shard = np.load(frames_dir / shard_name, mmap_mode="r")
            if shard.shape[1:] != first.shape[1:]:
                raise ValueError(f"{frames_dir / shard_name}: frames {shard.shape[1:]}, expected {first.shape[1:]}")
            contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
            for start in range(0, len(rows), items_per_chunk):
                chunk_rows = rows[start : start + items_per_chunk]
                # a private copy: torch warns about (and must not write into) read-only memmap pages
                pixels = np.array(shard[chunk_rows[0] : chunk_rows[-1] + 1]) if contiguous else shard[chunk_rows]
                out[at : at + len(chunk_rows)] = extract_features(encoder, pixels, batch_size=batch_size,
                                                                  device=device)
                at += len(chunk_rows)
                if on_frames is not None:
                    on_frames(len(chunk_rows) * per_item)
            del shard
        out.flush()
        del out
    return shape


def write_feature_index(
    frames_dir: str | Path, out_dir: str | Path, *, encoder_info: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]
) -> None:
    """``out_dir/index.json``: the frames' index (same entries, so ``VisualStore`` finds the same rows) plus a
    ``features`` section describing the encoder and every array. Feature arrays of an earlier run that this run
    did not write (``{videos,images}-*.npy`` not in ``shapes``) are removed, so they cannot be mistaken for
    current ones."""
    out_dir = Path(out_dir)
    for stale in (*out_dir.glob("videos-*.npy"), *out_dir.glob("images-*.npy")):
        if stale.name not in shapes:
            stale.unlink()
    index = read_index(frames_dir)
    index["features"] = {"encoder": dict(encoder_info), "dtype": "float16",
                         "arrays": {name: list(shape) for name, shape in sorted(shapes.items())}}
    io.write_json(out_dir / "index.json", index)


def start_features(out_dir: str | Path) -> None:
    """Create ``out_dir`` and remove its ``index.json``: until the run writes a new one at the end, readers fail
    clearly instead of pairing an old index with new arrays."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "index.json").unlink(missing_ok=True)


def encoder_info(encoder: nn.Module) -> dict[str, Any]:
    """What the feature arrays came from: backbone name, config, feature width, grid."""
    state = encoder_state(encoder)
    return {"backbone": state["backbone"], "config": state["config"], "feature_dim": int(encoder.feature_dim),
            "grid": int(encoder.grid)}


def write_features(
    encoder: nn.Module,
    frames_dir: str | Path,
    out_dir: str | Path,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, tuple[int, ...]]:
    """The whole features stage without Prefect: every array, then ``index.json``; returns {file: shape}."""
    jobs = plan_features(frames_dir)
    start_features(out_dir)
    shapes = {}
    with tqdm(total=count_frames(jobs), unit="frame", desc="features", disable=not progress) as bar:
        for job in jobs:
            shapes[job.name] = write_feature_array(encoder, frames_dir, job, out_dir, batch_size=batch_size,
                                                   device=device, on_frames=bar.update)
    write_feature_index(frames_dir, out_dir, encoder_info=encoder_info(encoder), shapes=shapes)
    return shapes
