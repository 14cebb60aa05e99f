"""Decode video frames: the only module that imports decord.

Output contract of every reader here: ``uint8`` array ``(T, H, W, 3)``, RGB, values 0-255, C-contiguous,
one row per requested index, in the order requested.

- Decoder: decord first. If decord cannot open or decode a file (a codec its bundled FFmpeg lacks, e.g. AV1;
  a stream it mis-copies, see below) the file is decoded with PyAV instead and ``decoder`` says ``"pyav"``.
  A file neither can decode raises :class:`VideoDecodeError` with a short human ``reason``.
- Resize: ``size=(H, W)`` resizes with swscale's *bilinear* filter in both decoders (decord's ``width``/
  ``height`` arguments insert FFmpeg's ``scale`` filter, whose default is bilinear; PyAV is asked for
  ``BILINEAR`` explicitly, so both paths give the same pixels). Aspect ratio is not preserved.
- Colour: whatever the source pixel format (yuv420p, yuvj, 10-bit, ``gray``...), frames are converted to
  RGB24; a grayscale video comes out with three equal channels.
- Rotation: **applied**. A display-matrix rotation (phones record portrait video as landscape + a 90 degree
  matrix) is honoured so frames look as a player shows them: decord applies it itself (FFmpeg ``transpose``
  filters) and the PyAV path applies ``np.rot90`` by ``VideoFrame.rotation`` (counter-clockwise degrees).
  For 90/270 degree rotations ``size`` is the size *after* rotation. Mirror flags in the matrix are ignored.
- Frame count: decord's count comes from the container index; PyAV's is the number of video packets.
  A file whose decodable frames fall short of that count (a truncated download) is an error, not a
  shorter clip.

decord 0.6 mis-copies frames whose row padding is a multiple of the width (e.g. 48- or 24-pixel-wide
outputs: "DECORDArrayCopyFromTo: The size must exactly match"); those files take the PyAV path.

Readers are created inside the function that reads and closed before it returns, so nothing decord-owned
crosses a ``fork``; call these from the process that decodes (e.g. a ``spawn`` pool worker).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import av
import decord
import numpy as np

Decoder = Literal["decord", "pyav"]

# decord's bundled FFmpeg logs every decode hiccup to stderr; failures reach us as exceptions instead.
decord.logging.set_level(decord.logging.QUIET)


class VideoDecodeError(Exception):
    """A file that no decoder here can read; ``reason`` is one short human line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Clip(NamedTuple):
    frames: np.ndarray  # uint8 (T, H, W, 3) RGB
    indices: np.ndarray  # int64 (T,) source-frame index of each row
    num_source_frames: int
    decoder: Decoder


IndexChooser = Callable[[int], Sequence[int] | np.ndarray]


def read_clip(
    path: str | Path,
    choose: IndexChooser,
    *,
    size: tuple[int, int] | None = None,
    decoder: Literal["auto", "pyav"] = "auto",
) -> Clip:
    """Open ``path``, pick frames with ``choose(num_source_frames) -> indices``, decode exactly those.

    ``choose`` sees the frame count of the decoder that actually reads the file, so indices are always in
    range even when the PyAV fallback counts differently. ``size=(H, W)`` resizes (bilinear); ``None``
    keeps the displayed size. ``decoder="pyav"`` skips decord (tests and benchmarks).
    Raises :class:`VideoDecodeError` for anything undecodable.
    """
    path = Path(path)
    _check_file(path)
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (height, width) with positive values, got {size!r}")
    if decoder == "auto":
        try:
            return _decord_clip(path, choose, size)
        except _IndexError as err:
            raise VideoDecodeError(str(err)) from None
        except Exception:  # noqa: BLE001 - any decord failure means: try PyAV on this file
            pass
    return _pyav_clip(path, choose, size)


# --------------------------------------------------------------------------------------------------------
# decord


class _IndexError(ValueError):
    """The chooser asked for a frame that does not exist: a caller bug, not a decoder failure."""


def _check_indices(indices: Sequence[int] | np.ndarray, num_frames: int) -> np.ndarray:
    wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
    if wanted.size == 0:
        raise _IndexError("no frame indices requested")
    if wanted.min() < 0 or wanted.max() >= num_frames:
        bad = int(wanted.min() if wanted.min() < 0 else wanted.max())
        raise _IndexError(f"frame index {bad} out of range for a {num_frames}-frame video")
    return wanted


def _decord_clip(path: Path, choose: IndexChooser, size: tuple[int, int] | None) -> Clip:
    height, width = size if size is not None else (-1, -1)
    # decord prints "ERROR opening: <file>" to the C++ stderr before raising; we report failures ourselves.
    with _native_stderr_silenced():
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), width=width, height=height, num_threads=1)
    try:
        num_frames = len(reader)
        if num_frames < 1:
            raise RuntimeError("decord found no frames")
        wanted = _check_indices(choose(num_frames), num_frames)
        unique, inverse = np.unique(wanted, return_inverse=True)
        frames = reader.get_batch(unique.tolist()).asnumpy()  # (U, H, W, 3) uint8
    finally:
        del reader
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) != len(unique):
        raise RuntimeError(f"decord returned {frames.dtype} {frames.shape}")
    if size is not None and frames.shape[1:3] != tuple(size):
        raise RuntimeError(f"decord returned size {frames.shape[1:3]}, asked for {size}")
    return Clip(np.ascontiguousarray(frames[inverse]), wanted, num_frames, "decord")


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for a moment (C++ code writes there directly)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2 (e.g. some embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# --------------------------------------------------------------------------------------------------------
# PyAV fallback


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise VideoDecodeError("file not found")
    if path.stat().st_size == 0:
        raise VideoDecodeError("empty file (0 bytes)")


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), mode="r")
    except av.error.InvalidDataError:
        raise VideoDecodeError("not a readable video container (truncated, corrupt or not a video)") from None
    except av.error.FFmpegError as err:
        raise VideoDecodeError(f"cannot open: {_short(err)}") from None


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        raise VideoDecodeError(f"no video stream (streams: {', '.join(kinds) or 'none'})")
    stream = container.streams.video[0]
    if stream.codec_context is None or stream.codec_context.name is None:
        raise VideoDecodeError("video stream with no decoder available")
    stream.thread_type = "SLICE"  # one process per core already; keep each decoder single-frame
    stream.codec_context.thread_count = 1
    return stream


def _count_frames(path: Path) -> int:
    """Video packets in the file (one per frame); fewer than the container index lists means truncated."""
    with _open(path) as container:
        stream = _video_stream(container)
        listed = stream.frames  # from the container index; 0 when the format has none (e.g. WebM)
        try:
            count = sum(1 for packet in container.demux(stream) if packet.size > 0)
        except av.error.FFmpegError as err:
            raise VideoDecodeError(f"cannot demux: {_short(err)}") from None
    if 0 < count < listed:
        raise VideoDecodeError(f"truncated: the index lists {listed} frames, the file holds {count}")
    return count


def _pyav_clip(path: Path, choose: IndexChooser, size: tuple[int, int] | None) -> Clip:
    num_frames = _count_frames(path)
    if num_frames < 1:
        raise VideoDecodeError("video stream has no frames")
    try:
        wanted = _check_indices(choose(num_frames), num_frames)
    except _IndexError as err:
        raise VideoDecodeError(str(err)) from None
    unique = np.unique(wanted)
    last = int(unique[-1])
    position = {int(index): row for row, index in enumerate(unique)}
    frames: list[np.ndarray | None] = [None] * len(unique)
    decoded = 0
    with _open(path) as container:
        stream = _video_stream(container)
        try:
            for frame in container.decode(stream):
                row = position.get(decoded)
                if row is not None:
                    frames[row] = _to_rgb(frame, size)
                decoded += 1
                if decoded > last:
                    break
        except av.error.FFmpegError as err:
            raise VideoDecodeError(f"decode error after {decoded} of {num_frames} frames: {_short(err)}") from None
    if decoded <= last:
        raise VideoDecodeError(f"truncated: decoded {decoded} of {num_frames} frames")
    stacked = np.stack(frames)  # (U, H, W, 3)
    inverse = np.searchsorted(unique, wanted)
    return Clip(np.ascontiguousarray(stacked[inverse]), wanted, num_frames, "pyav")


def _to_rgb(frame: av.VideoFrame, size: tuple[int, int] | None) -> np.ndarray:
    """One decoded frame -> uint8 (H, W, 3) RGB at the displayed orientation, resized to ``size``."""
    quarter_turns = (round((frame.rotation or 0) / 90)) % 4  # counter-clockwise
    if size is None:
        rgb = frame.to_ndarray(format="rgb24")
    else:
        height, width = size if quarter_turns % 2 == 0 else size[::-1]  # rotate after resizing
        rgb = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="BILINEAR")
    if quarter_turns:
        rgb = np.rot90(rgb, k=quarter_turns)
    return np.ascontiguousarray(rgb)


def _short(err: Exception) -> str:
    """FFmpeg errors carry errno and file name; keep the human part."""
    text = getattr(err, "strerror", None) or str(err)
    return str(text).splitlines()[0][:120]
