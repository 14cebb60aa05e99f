"""Media files (MP4, PNG) and annotation files in the native formats of MSR-VTT, UCF101 and COCO.

Every file is written atomically (``seqvision.io``) and deterministically: x264 runs single-threaded
with fixed options, PNGs carry no timestamps, JSON has sorted keys.
"""

from __future__ import annotations

import io as _io
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from .. import io
from ..config import SynthConfig, to_dict
from .events import EVENT_CLASSES, REVERSAL_PAIRS
from .items import SPLITS, ItemRecord, held_out_combinations

GENERATOR_VERSION = "2.0"
X264_PRESET = "medium"
# MB-tree off: with it, x264 (core 165, single-threaded) gave different bytes for identical input in
# about one clip in five (seen at 48, 64 and 96 pixels); without it, every repeat was identical.
X264_PARAMS = "mbtree=0"

# Real MSR-VTT spells its validation split "validate"; our split names are train/val/test.
MSRVTT_SPLIT = {"train": "train", "val": "validate", "test": "test"}

# Every path the generator writes, relative to the output folder (videos/images are added per item).
ANNOTATION_FILES = (
    "annotations/msrvtt.json",
    "annotations/metadata.json",
    "annotations/ucf101/classInd.txt",
    "annotations/ucf101/trainlist01.txt",
    "annotations/ucf101/vallist01.txt",
    "annotations/ucf101/testlist01.txt",
    "annotations/coco/captions_train.json",
    "annotations/coco/captions_val.json",
    "annotations/coco/captions_test.json",
)


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> uint8 (H * 3 / 2, W) planar yuv420p (Y, then U, then V), BT.601 limited range,
    chroma averaged over 2x2 blocks: the layout ``av.VideoFrame.from_ndarray(..., format="yuv420p")`` takes.

    Doing it here keeps the colour conversion under our control (same bytes whatever swscale version the
    FFmpeg build carries) and lets the encoder take frames as they are, without PyAV's implicit reformat.
    """
    rgb = frame.astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    cb = 128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0
    cr = 128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0
    height, width = y.shape
    pool = lambda c: c.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))  # noqa: E731
    quantize = lambda c: np.clip(np.rint(c), 0, 255).astype(np.uint8)  # noqa: E731
    planes = [quantize(y).ravel(), quantize(pool(cb)).ravel(), quantize(pool(cr)).ravel()]
    return np.concatenate(planes).reshape(height * 3 // 2, width)


def write_mp4(path: str | Path, frames: np.ndarray, *, fps: int, crf: int) -> None:
    """Encode uint8 (T, H, W, 3) RGB frames (H, W even) as H.264/yuv420p MP4 at ``fps``, atomically.

    ``thread_count = 1`` makes x264's output depend on the input only (its frame threads otherwise make
    rate-control decisions depend on timing); parallelism comes from worker processes instead.
    """
    _, height, width, _ = frames.shape
    with io.atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.thread_count = 1
            # Say what rgb_to_yuv420p produced (BT.601, limited range), so decoders convert back the same way.
            stream.codec_context.colorspace = 6  # AVCOL_SPC_SMPTE170M
            stream.codec_context.color_primaries = 6  # AVCOL_PRI_SMPTE170M
            stream.codec_context.color_trc = 6  # AVCOL_TRC_SMPTE170M
            stream.codec_context.color_range = 1  # AVCOL_RANGE_MPEG
            stream.options = {"crf": str(crf), "preset": X264_PRESET, "x264-params": X264_PARAMS}
            for t, frame in enumerate(frames):
                video_frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")
                video_frame.pts = t
                container.mux(stream.encode(video_frame))
            container.mux(stream.encode(None))


def write_png(path: str | Path, image: np.ndarray) -> None:
    """uint8 (H, W, 3) RGB as PNG, atomically."""
    buffer = _io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=6)
    io.write_bytes(path, buffer.getvalue())


def synth_manifest(config: SynthConfig) -> dict[str, Any]:
    """Contents of ``synth.json``: everything that determines the output bytes. ``workers`` is left out
    because it does not change a single byte."""
    resolved = to_dict(config)
    resolved.pop("workers")
    return {
        "generator": "seqvision.synth",
        "version": GENERATOR_VERSION,
        "config": resolved,
        "encoder": {"codec": "libx264", "pix_fmt": "yuv420p", "preset": X264_PRESET, "params": X264_PARAMS, "threads": 1},
        "event_classes": list(EVENT_CLASSES),
    }


def write_annotations(
    out: Path, config: SynthConfig, videos: list[ItemRecord], images: list[ItemRecord]
) -> None:
    """Write every annotation file from the item records (given in id order)."""
    ann = out / "annotations"
    _write_msrvtt(ann / "msrvtt.json", config, videos)
    _write_ucf101(ann / "ucf101", videos)
    for split in SPLITS:
        _write_coco(ann / "coco" / f"captions_{split}.json", config, [r for r in images if r.key.split == split])
    io.write_json(
        ann / "metadata.json",
        {
            "generator": {"name": "seqvision.synth", "version": GENERATOR_VERSION},
            "event_classes": list(EVENT_CLASSES),
            "reversal_pairs": [list(p) for p in REVERSAL_PAIRS],
            "held_out_combinations": [list(c) for c in held_out_combinations(config.seed, config.held_out_combinations)],
            "videos": [r.metadata for r in videos],
            "images": [r.metadata for r in images],
        },
    )


def _write_msrvtt(path: Path, config: SynthConfig, videos: list[ItemRecord]) -> None:
    entries, sentences = [], []
    for r in videos:
        entries.append(
            {
                "video_id": r.key.id,
                "id": r.key.number,
                "split": MSRVTT_SPLIT[r.key.split],
                "category": r.label,  # MSR-VTT's 20 categories become our event classes (0-based)
                "url": f"synthetic://seqvision/{r.key.id}",
                "start time": 0.0,
                "end time": round(r.num_frames / config.fps, 3),
            }
        )
        for caption in r.captions:
            sentences.append({"video_id": r.key.id, "caption": caption, "sen_id": len(sentences)})
    info = {
        "contributor": "seqvision synthetic generator",
        "data_created": "n/a (deterministic; see synth.json)",
        "version": GENERATOR_VERSION,
        "year": "n/a",
    }
    io.write_json(path, {"info": info, "videos": entries, "sentences": sentences})


def _write_ucf101(folder: Path, videos: list[ItemRecord]) -> None:
    io.write_text(folder / "classInd.txt", "".join(f"{i + 1} {name}\n" for i, name in enumerate(EVENT_CLASSES)))
    for split in SPLITS:
        rows = [r for r in videos if r.key.split == split]
        # Real UCF101 test lists carry no label column: readers take the class from the
        # `Class/v_Class_gNN_cMM.avi` path. Our flat `video{N}.mp4` names cannot carry it, so every
        # list here, the test list included, has the 1-based label column.
        text = "".join(f"{r.key.file_name} {r.label + 1}\n" for r in rows)  # type: ignore[operator]
        io.write_text(folder / f"{split}list01.txt", text)


def _write_coco(path: Path, config: SynthConfig, images: list[ItemRecord]) -> None:
    annotations = []
    for r in images:
        for k, caption in enumerate(r.captions):
            # Globally unique annotation ids, stable across splits: image number * 100 + reference index.
            annotations.append({"id": r.key.number * 100 + k, "image_id": r.key.number, "caption": caption})
    io.write_json(
        path,
        {
            "info": {
                "description": "seqvision synthetic still scenes",
                "version": GENERATOR_VERSION,
                "contributor": "seqvision synthetic generator",
                "date_created": "n/a (deterministic; see synth.json)",
            },
            "licenses": [{"id": 1, "name": "CC0 1.0 (generated data)", "url": ""}],
            "images": [
                {
                    "id": r.key.number,
                    "file_name": r.key.file_name,
                    "width": config.width,
                    "height": config.height,
                    "license": 1,
                }
                for r in images
            ],
            "annotations": annotations,
        },
    )
