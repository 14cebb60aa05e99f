"""The ``encoder`` and ``features`` stages as plain functions (``pipelines/features.py`` wraps them in Prefect flows).

``encoder``: small_cnn is trained on the synthetic objects' attributes by
:func:`seqvision.attributes.train_attribute_encoder` (the benchmark's stand-in for ImageNet pretraining); a
torchvision backbone is not trained: :func:`pretrained_encoder` loads ``encoder.weights`` from a local file (or
warns that the weights are random). Either way :func:`save_encoder` writes the :class:`EncoderRun`.

``features``: :func:`plan_features` lists one :class:`FeatureJob` per (kind, split); :func:`start_features`,
:func:`write_feature_array` per job and :func:`write_feature_index` write ``{kind}-{split}.npy`` float16 (videos
(n, T, D) pooled per frame, images (n, G, D) grid) in the frame shards' row order (shard by shard in natural
order, then row), plus ``index.json``, so ``datasets.VisualStore`` reads them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from seqvision import io
from seqvision.io import MetadataError, ordered_entries, shard_name
from seqvision.encoders import build_encoder, encoder_from_checkpoint, encoder_state, extract_features


# --------------------------------------------------------------------------------------------------------
# The frames artifact's index


def read_index(frames_dir: str | Path) -> dict[str, Any]:
    """``frames_dir/index.json`` (written by the extract stage): ``{"videos": [entry, ...], "images": [...]}``."""
    path = Path(frames_dir) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; run the extract stage first")
    index = json.loads(path.read_text(encoding="utf-8"))
    for kind in ("videos", "images"):
        if not isinstance(index.get(kind), list):
            raise ValueError(f"{path}: missing key {kind!r} (a list of entries)")
    return index


def _splits(index: Mapping[str, Any], kind: str) -> list[str]:
    order = {"train": 0, "val": 1, "test": 2}
    return sorted({e["split"] for e in index[kind]}, key=lambda s: (order.get(s, 3), s))


# --------------------------------------------------------------------------------------------------------
# Encoder stage: the run record, torchvision backbones, checkpoints


class EncoderRun(NamedTuple):
    encoder: nn.Module
    history: dict[str, Any]  # JSON-ready: what was trained on, loss and val accuracy per epoch
    metrics: dict[str, Any]  # JSON-ready: final val accuracies (empty when nothing was trained or no val split)
    runinfo: dict[str, Any] = {}  # JSON-ready measurements of this run (seconds per part and per epoch)


def require_metadata(metadata_path: str | Path) -> None:
    """Raise :class:`MetadataError`, saying what to do instead, when small_cnn's metadata file is missing."""
    if not Path(metadata_path).is_file():
        raise MetadataError(
            f"encoder.backbone is small_cnn, which is trained on the synthetic objects' attributes recorded in "
            f"{metadata_path}, but there is no such file (a real dataset has none). Set encoder.backbone to a "
            f"torchvision model (resnet18, ...) and encoder.weights to a local ImageNet state-dict file "
            f"(see docs/encoder.md)"
        )


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
    ``history.json``, ``metrics.json`` and the run's timings in ``runinfo.json`` (``io.write_runinfo``), each written
    atomically."""
    out_dir = Path(out_dir)
    checkpoint = encoder_state(run.encoder)
    if "attributes" in run.history:
        checkpoint["attributes"] = run.history["attributes"]
    # Serialized in memory: torch.save names the zip's records after the file, and the atomic write's temporary
    # file has a random name, which gave every run other bytes (and DVC another hash) for the same encoder.
    buffer = BytesIO()
    torch.save(checkpoint, buffer)
    io.write_bytes(out_dir / "encoder.pt", buffer.getvalue())
    io.write_json(out_dir / "history.json", run.history)
    io.write_json(out_dir / "metrics.json", run.metrics)
    io.write_json(out_dir / io.RUNINFO, run.runinfo)


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
        name = shard_name(job.kind, job.split, entry["shard"])
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
    first = io.load_array(frames_dir / runs[0][0], stage="extract")
    per_item = first.shape[1] if job.kind == "videos" else 1
    probe = extract_features(encoder, np.array(first[:1]), batch_size=batch_size, device=device)
    shape = (len(job.entries), *probe.shape[1:])
    items_per_chunk = max(1, batch_size // per_item)
    with io.atomic_path(Path(out_dir) / job.name) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        at = 0
        for shard_file, rows in runs:
            shard = io.load_array(frames_dir / shard_file, stage="extract")
            if shard.shape[1:] != first.shape[1:]:
                raise ValueError(f"{frames_dir / shard_file}: frames {shard.shape[1:]}, expected {first.shape[1:]}")
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
