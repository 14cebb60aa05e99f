"""Videos and images -> uint8 frame shards: the work of the ``extract`` stage.

Output (the contract in docs/design.md, ``artifacts/frames/``)::

    videos-{split}-{k:03d}.npy   uint8 (n, T, H, W, 3) RGB, T = config.num_frames, (H, W) = config.resize
    images-{split}-{k:03d}.npy   uint8 (n, H, W, 3) RGB
    index.json                   {"config": {...}, "videos": [VideoEntry...], "images": [ImageEntry...]}
    skipped.json                 [{"path", "id", "reason"}] for every file that could not be decoded

How it runs:

- :func:`plan_shards` cuts each split's records, in the given order, into shards of ``config.shard_size``.
  The plan is fixed before decoding, so re-running one shard (a retry) rewrites the same file.
- :class:`FrameExtractor` owns one process pool (``spawn`` context: every worker starts clean and opens its
  own decoders; nothing decord-owned is ever forked) and one progress bar. ``workers=1`` decodes in the
  calling process instead. Each shard is a memory-mapped ``.npy`` under a temporary name; each worker
  writes its clip's row straight into the mapped file (only metadata crosses the pipe), with at most
  ``4 * workers`` items in flight, so memory stays bounded by that, not by the dataset. The finished file
  is renamed into place (``seqvision.io.atomic_path``). Rows of skipped files are dropped (the shard is
  compacted), so a shard may hold fewer than ``shard_size`` rows.
- A file that cannot be decoded is skipped: one warning line, an entry in ``skipped.json``. If more than
  ``config.max_skipped_fraction`` of the videos (or of the images) are skipped, :func:`finalize` raises
  :class:`TooManySkipped` after writing ``skipped.json`` and without writing ``index.json``.

Videos: frames are sampled with ``seqvision.sampling`` (short clips repeat their last real frame; see there)
and decoded by ``seqvision.video`` (rotation applied, bilinear resize). Train-split records use the random
variant of ``segment``/``dense`` sampling, seeded by ``config.seed`` and the record id; val/test the centred
one. Images: PIL, EXIF orientation applied (as rotation is for videos), converted to RGB, bilinear resize.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from seqvision import io, sampling, video
from seqvision.config import ExtractConfig, to_dict
from seqvision.tasks import Kind

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SHARD_NAME = re.compile(r"^(videos|images)-(train|val|test)-\d{3}\.npy$")


class MediaRecord(Protocol):
    """What extraction needs from an annotation record (``annotations.VideoRecord`` / ``ImageRecord``)."""

    @property
    def id(self) -> str: ...
    @property
    def path(self) -> Path: ...
    @property
    def split(self) -> str: ...


class VideoEntry(NamedTuple):
    id: str
    split: str
    shard: str  # file name inside the output folder
    row: int
    frame_indices: tuple[int, ...]  # source-frame index of each of the T stored frames
    num_valid: int  # real frames; the rest repeat the last real one
    num_source_frames: int
    decoder: video.Decoder


class ImageEntry(NamedTuple):
    id: str
    split: str
    shard: str
    row: int


class Skipped(NamedTuple):
    path: str
    id: str
    reason: str


class ShardPlan(NamedTuple):
    kind: Kind
    split: str
    number: int
    records: tuple[Any, ...]  # MediaRecord

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.split}-{self.number:03d}.npy"


class ShardResult(NamedTuple):
    plan: ShardPlan
    entries: list[Any]  # VideoEntry | ImageEntry, in row order
    skipped: list[Skipped]


class ExtractResult(NamedTuple):
    videos: list[VideoEntry]
    images: list[ImageEntry]
    skipped: list[Skipped]
    num_videos: int  # attempted
    num_images: int


class TooManySkipped(RuntimeError):
    """More files were undecodable than ``max_skipped_fraction`` allows."""


# --------------------------------------------------------------------------------------------------------
# Planning


def plan_shards(records: Sequence[MediaRecord], *, kind: Kind, shard_size: int) -> list[ShardPlan]:
    """Split order train, val, test; record order kept within a split; ``shard_size`` records per shard."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    by_split: dict[str, list[MediaRecord]] = {split: [] for split in SPLITS}
    seen: set[str] = set()
    for record in records:
        if record.split not in by_split:
            raise ValueError(f"{kind} record {record.id!r}: split {record.split!r} is not one of {SPLITS}")
        if record.id in seen:
            raise ValueError(f"{kind} record id {record.id!r} appears twice")
        seen.add(record.id)
        by_split[record.split].append(record)
    plans = []
    for split, items in by_split.items():
        for number, start in enumerate(range(0, len(items), shard_size)):
            plans.append(ShardPlan(kind, split, number, tuple(items[start : start + shard_size])))
    return plans


def resolve_workers(workers: int) -> int:
    """0 -> the CPUs this process may use."""
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------------------
# Per-item work (runs in pool workers)


class _Job(NamedTuple):
    kind: Kind
    path: str
    id: str
    split: str
    config: ExtractConfig
    shard: str = ""  # temporary .npy of the shard being filled; pool workers write their row into it
    row: int = -1


class _Decoded(NamedTuple):
    pixels: np.ndarray | None  # uint8 (T, H, W, 3) or (H, W, 3); None when skipped or already written
    reason: str  # why it was skipped ("" when decoded)
    frame_indices: tuple[int, ...] = ()
    num_valid: int = 0
    num_source_frames: int = 0
    decoder: str = ""


def _decode(job: _Job) -> _Decoded:
    """Decode one file; every failure that is about the file becomes a reason, never an exception."""
    try:
        if job.kind == "videos":
            return _decode_video(job)
        return _decode_image(job)
    except video.VideoDecodeError as err:
        return _Decoded(None, err.reason)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - a decoder crash on one odd file must not stop the run
        first_line = (str(err).splitlines() or [""])[0][:100]
        return _Decoded(None, f"unexpected {type(err).__name__}: {first_line}".rstrip(": "))


def _decode_video(job: _Job) -> _Decoded:
    config = job.config
    chosen: list[sampling.Sample] = []

    def choose(num_source_frames: int) -> np.ndarray:
        sample = sampling.sample(
            num_source_frames,
            method=config.sampling,
            num_frames=config.num_frames,
            frame_stride=config.frame_stride,
            train=job.split == "train",
            seed=config.seed,
            key=job.id,
        )
        chosen.append(sample)
        return sample.indices

    clip = video.read_clip(job.path, choose, size=config.resize)
    sample = chosen[-1]  # the decoder that succeeded called choose last
    return _Decoded(
        clip.frames, "", tuple(int(i) for i in clip.indices), sample.num_valid, clip.num_source_frames, clip.decoder
    )


def _decode_image(job: _Job) -> _Decoded:
    height, width = job.config.resize
    path = Path(job.path)
    if not path.is_file():
        return _Decoded(None, "file not found")
    if path.stat().st_size == 0:
        return _Decoded(None, "empty file (0 bytes)")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)  # as displayed, like rotated videos
            rgb = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(rgb, dtype=np.uint8)
    except Image.UnidentifiedImageError:
        return _Decoded(None, "not a readable image")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return _Decoded(None, f"corrupt or truncated image: {str(err).splitlines()[0][:100]}")
    return _Decoded(np.ascontiguousarray(pixels), "")


_open_shard: dict[str, Any] = {}  # per pool worker: the shard memmap it is writing into


def _decode_into_shard(job: _Job) -> _Decoded:
    """Pool worker entry: decode, write the row straight into the shard's memmap, return only metadata.

    Sending pixels back through a pipe would cost the parent a copy and an unpickle per clip; with shared
    file pages the parent only renames the finished file.
    """
    result = _decode(job)
    if result.pixels is None:
        return result
    key = f"{job.shard}:{os.stat(job.shard).st_ino}"  # a reused temp name is a new file: do not reuse its map
    if key not in _open_shard:
        _open_shard.clear()
        _open_shard[key] = np.load(job.shard, mmap_mode="r+")
    _open_shard[key][job.row] = result.pixels
    return result._replace(pixels=None)


# --------------------------------------------------------------------------------------------------------
# Shards


class FrameExtractor:
    """A decoding pool plus a progress bar, shared by every shard of a run.

    Use as a context manager; :meth:`extract_shard` writes one shard and is safe to call again for the same
    plan (a retry overwrites the same file).
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        config: ExtractConfig,
        workers: int | None = None,
        progress: bool = True,
        total: int | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.config = config
        self.workers = resolve_workers(config.workers if workers is None else workers)
        self._pool: Any = None
        self._bar = tqdm(total=total, disable=not progress, unit="file", desc="extract", dynamic_ncols=True)

    def __enter__(self) -> FrameExtractor:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.workers > 1:
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def worker_pids(self) -> list[int]:
        """Process ids of the pool workers (empty when decoding in-process); for monitoring and benchmarks."""
        return [] if self._pool is None else [worker.pid for worker in self._pool._pool]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()  # results are all consumed by now; do not wait for idle workers
            self._pool.join()
            self._pool = None
        self._bar.close()

    def _results(self, jobs: Sequence[_Job]) -> Iterator[_Decoded]:
        """Results in job order, with at most ``4 * workers`` jobs in flight. In-process decoding returns
        the pixels; pool workers have already written them into ``job.shard`` at ``job.row``."""
        if self._pool is None:
            yield from map(_decode, jobs)
            return
        pending: collections.deque = collections.deque()
        todo = iter(jobs)
        for job in todo:
            pending.append(self._pool.apply_async(_decode_into_shard, (job,)))
            if len(pending) >= 4 * self.workers:
                break
        while pending:
            result = pending.popleft().get()
            job = next(todo, None)
            if job is not None:
                pending.append(self._pool.apply_async(_decode_into_shard, (job,)))
            yield result

    def extract_shard(self, plan: ShardPlan) -> ShardResult:
        """Decode ``plan``'s records into ``out_dir/plan.name``; returns the entries written and the skips."""
        config = self.config
        height, width = config.resize
        row_shape = (config.num_frames, height, width, 3) if plan.kind == "videos" else (height, width, 3)
        entries: list[Any] = []
        skipped: list[Skipped] = []
        kept_rows: list[int] = []  # planned row of each entry; skipped files leave a hole until compaction
        target = self.out_dir / plan.name
        with io.atomic_path(target) as tmp:
            jobs = [_Job(plan.kind, str(r.path), r.id, plan.split, config, str(tmp), row)
                    for row, r in enumerate(plan.records)]
            # Page-cache writes, no msync: the rename below publishes the file for readers; durability
            # across power loss is not promised for any artifact.
            rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(jobs), *row_shape))
            for job, result in zip(jobs, self._results(jobs), strict=True):
                self._bar.update(1)
                if result.reason:
                    skipped.append(Skipped(job.path, job.id, result.reason))
                    with tqdm.external_write_mode():
                        log.warning("skipped %s (%s): %s", job.path, job.id, result.reason)
                    continue
                if result.pixels is not None:  # decoded in-process
                    rows[job.row] = result.pixels
                row = len(entries)
                kept_rows.append(job.row)
                if plan.kind == "videos":
                    entries.append(VideoEntry(job.id, plan.split, plan.name, row, result.frame_indices,
                                              result.num_valid, result.num_source_frames, result.decoder))
                else:
                    entries.append(ImageEntry(job.id, plan.split, plan.name, row))
            del rows
            if entries and len(entries) < len(jobs):
                _keep_rows(tmp, kept_rows)
        if not entries:  # nothing decodable: no file, nothing in the index points at it
            target.unlink(missing_ok=True)
        return ShardResult(plan, entries, skipped)


def _keep_rows(path: Path, rows: Sequence[int]) -> None:
    """Rewrite a ``.npy`` in place keeping only ``rows`` (increasing), copied in chunks to bound memory."""
    full = np.load(path, mmap_mode="r")
    with io.atomic_path(path) as tmp:
        kept = np.lib.format.open_memmap(tmp, mode="w+", dtype=full.dtype, shape=(len(rows), *full.shape[1:]))
        for start in range(0, len(rows), 64):
            chunk = list(rows[start : start + 64])
            kept[start : start + len(chunk)] = full[chunk]
        del kept
    del full


# --------------------------------------------------------------------------------------------------------
# Whole runs


ShardRunner = Callable[[FrameExtractor, ShardPlan], ShardResult]  # (extractor, plan) -> one written shard


def extract(
    videos: Sequence[MediaRecord],
    images: Sequence[MediaRecord],
    out_dir: str | Path,
    *,
    config: ExtractConfig,
    workers: int | None = None,
    progress: bool = True,
    run_shard: ShardRunner = FrameExtractor.extract_shard,
    log_line: Callable[[str], None] | None = None,
) -> ExtractResult:
    """The whole stage: video and image shards, then ``index.json`` and ``skipped.json`` (:func:`finalize`).

    ``workers=None`` uses ``config.workers``. ``run_shard(extractor, plan)`` writes one shard (the extract
    flow passes its Prefect task, so each shard is a retried task run); ``log_line`` gets one line naming
    the shard and worker counts before decoding starts. Raises :class:`TooManySkipped` from :func:`finalize`.
    """
    plans = plan_shards(videos, kind="videos", shard_size=config.shard_size)
    plans += plan_shards(images, kind="images", shard_size=config.shard_size)
    total = len(videos) + len(images)
    with FrameExtractor(out_dir, config=config, workers=workers, progress=progress, total=total) as extractor:
        if log_line is not None:
            log_line(f"{len(videos)} videos, {len(images)} images -> {len(plans)} shards, "
                     f"{extractor.workers} worker(s)")
        shards = [run_shard(extractor, plan) for plan in plans]
    result = summarize(shards, num_videos=len(videos), num_images=len(images))
    finalize(out_dir, config=config, result=result)
    return result


def summarize(shards: Iterable[ShardResult], *, num_videos: int, num_images: int) -> ExtractResult:
    videos: list[VideoEntry] = []
    images: list[ImageEntry] = []
    skipped: list[Skipped] = []
    for shard in shards:
        (videos if shard.plan.kind == "videos" else images).extend(shard.entries)
        skipped.extend(shard.skipped)
    return ExtractResult(videos, images, skipped, num_videos, num_images)


def finalize(out_dir: str | Path, *, config: ExtractConfig, result: ExtractResult) -> None:
    """Write ``skipped.json``, check ``max_skipped_fraction``, write ``index.json``, drop stale shards.

    Raises :class:`TooManySkipped` (after writing ``skipped.json``, before ``index.json``) when too many
    videos or images could not be decoded.
    """
    out_dir = Path(out_dir)
    skipped_path = out_dir / "skipped.json"
    io.write_json(skipped_path, [s._asdict() for s in result.skipped])
    for kind, total, done in (("videos", result.num_videos, len(result.videos)),
                              ("images", result.num_images, len(result.images))):
        failed = total - done
        if total and failed / total > config.max_skipped_fraction:
            raise TooManySkipped(
                f"{failed} of {total} {kind} ({failed / total:.1%}) could not be decoded, more than "
                f"extract.max_skipped_fraction = {config.max_skipped_fraction:g}; reasons in {skipped_path}"
            )
    index = {
        "config": to_dict(config),
        "videos": [dict(e._asdict(), frame_indices=list(e.frame_indices)) for e in result.videos],
        "images": [e._asdict() for e in result.images],
    }
    # Shards of an earlier run with another shard_size or data would look current; remove them first.
    current = {e.shard for e in result.videos} | {e.shard for e in result.images}
    for path in out_dir.iterdir():
        if SHARD_NAME.match(path.name) and path.name not in current:
            path.unlink()
    io.write_json(out_dir / "index.json", index, indent=1)
    decoders = collections.Counter(e.decoder for e in result.videos)
    log.info(
        "extracted %d/%d videos (%s) and %d/%d images into %s; %d skipped",
        len(result.videos), result.num_videos, ", ".join(f"{n} {d}" for d, n in sorted(decoders.items())) or "none",
        len(result.images), result.num_images, out_dir, len(result.skipped),
    )
