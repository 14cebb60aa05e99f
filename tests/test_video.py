"""seqvision.video: the right frames, both decoders, and every awkward kind of file.

Fixtures are synthesized with PyAV in tmp_path: frame n is a flat grey of brightness 10*n (so a frame's
index can be read back from its pixels), optionally with a red block in the top-left corner (to see
orientation).
"""

from __future__ import annotations

import fractions
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest

from seqvision import video

STEP = 10  # brightness of frame n is STEP * n


def brightness(frames: np.ndarray) -> np.ndarray:
    """Mean of the bottom-right quarter of each frame (the red marker lives top-left): float (T,)."""
    _, h, w, _ = frames.shape
    return frames[:, h // 2 :, w // 2 :].reshape(len(frames), -1).mean(axis=1)


def write_video(
    path: Path,
    *,
    num_frames: int = 24,
    height: int = 32,
    width: int = 64,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    fps: int = 12,
    options: dict[str, str] | None = None,
    marker: bool = False,
    rotation: int | None = None,
    frame_times_ms: list[int] | None = None,
    container_options: dict[str, str] | None = None,
) -> Path:
    """A tiny synthetic video; frame n is grey 10*n (clipped at 250). Needs ``codec`` in av.codecs_available."""
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build cannot encode {codec}")
    if options is None and codec == "libx264":
        options = {"crf": "4"}  # near-lossless, so brightness survives compression
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if options:
            stream.options = options
        if rotation is not None:
            stream.set_display_rotation(rotation)
        if frame_times_ms is not None:
            stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for n in range(num_frames):
            value = min(STEP * n, 250)
            if pix_fmt == "gray":
                frame = av.VideoFrame.from_ndarray(np.full((height, width), value, np.uint8), format="gray")
            else:
                rgb = np.full((height, width, 3), value, np.uint8)
                if marker:
                    rgb[: height // 4, : width // 4] = (255, 0, 0)
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if frame_times_ms is not None:
                frame.pts, frame.time_base = frame_times_ms[n], fractions.Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _mdat_payload(data: bytes) -> int:
    start = data.find(b"mdat")
    assert start > 0, "no mdat box"
    return start + 4


def make_bad(kind: str, tmp: Path) -> Path:
    """One file of an awkward ``kind`` (see BAD_KINDS)."""
    if kind == "zero_byte":
        path = tmp / "zero.mp4"
        path.write_bytes(b"")
    elif kind == "not_a_video":
        path = tmp / "notes.mp4"
        path.write_text("this is a text file, renamed .mp4\n" * 20)
    elif kind == "truncated":  # moov box at the end (the default), cut off
        full = write_video(tmp / "full.mp4", num_frames=48).read_bytes()
        path = tmp / "truncated.mp4"
        path.write_bytes(full[: len(full) // 2])
    elif kind == "truncated_faststart":  # moov first, so the index survives but the frames do not
        full = write_video(tmp / "full.mp4", num_frames=48, container_options={"movflags": "faststart"})
        data = full.read_bytes()
        path = tmp / "truncated_faststart.mp4"
        path.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "corrupt":  # random bytes over the first compressed frame, NAL length prefix included
        data = bytearray(write_video(tmp / "full.mp4", num_frames=48).read_bytes())
        start = _mdat_payload(bytes(data))
        data[start : start + 400] = np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8).tobytes()
        path = tmp / "corrupt.mp4"
        path.write_bytes(bytes(data))
    elif kind == "audio_only":
        path = write_audio_only(tmp / "audio.mp4")
    elif kind == "short":  # fewer frames than asked for
        path = write_video(tmp / "short.mp4", num_frames=5)
    elif kind == "odd_size":
        path = write_video(tmp / "odd.mp4", height=17, width=33, pix_fmt="yuv444p")
    elif kind == "grayscale":  # a real single-plane gray pix_fmt (x264 would store 4:2:0)
        path = write_video(tmp / "gray.mkv", codec="ffv1", pix_fmt="gray")
    elif kind == "rotated":
        path = write_video(tmp / "rotated.mp4", rotation=90, marker=True)
    elif kind == "vfr":  # irregular frame times: bursts of 33 ms, then 200 ms gaps
        times = np.cumsum([0] + [33 if n % 3 else 200 for n in range(1, 24)]).tolist()
        path = write_video(tmp / "vfr.mp4", frame_times_ms=times)
    elif kind == "vp9_webm":
        path = write_video(tmp / "clip.webm", codec="libvpx-vp9", options={"crf": "4", "b": "0"})
    elif kind == "hevc":
        path = write_video(tmp / "hevc.mp4", codec="libx265", options={"crf": "4", "x265-params": "log-level=none"})
    elif kind == "mjpeg":
        path = write_video(tmp / "mjpeg.avi", codec="mjpeg", pix_fmt="yuvj420p", options={"q:v": "2"})
    elif kind == "mpeg4_part2":
        path = write_video(tmp / "mpeg4.avi", codec="mpeg4", options={"qscale": "1"})
    elif kind == "av1":  # decord 0.6's FFmpeg has no AV1 decoder: must fall back to PyAV
        path = write_video(tmp / "av1.mp4", codec="libsvtav1", options={"crf": "10", "svtav1-params": "log-level=0"})
    elif kind == "decord_stride_bug":  # 48 px wide: decord 0.6 mis-copies it at native size
        path = write_video(tmp / "w48.mp4", width=48)
    else:
        raise ValueError(kind)
    return path


# kind -> ("decoded", expected decoder or None for either) | ("skipped", reason pattern)
BAD_KINDS: dict[str, tuple[str, str | None]] = {
    "zero_byte": ("skipped", r"empty file"),
    "not_a_video": ("skipped", r"not a readable video container"),
    "truncated": ("skipped", r"not a readable video container"),
    "truncated_faststart": ("skipped", r"truncated"),
    "corrupt": ("skipped", r"decode error"),
    "audio_only": ("skipped", r"no video stream"),
    "short": ("decoded", "decord"),
    "odd_size": ("decoded", "decord"),
    "grayscale": ("decoded", "decord"),
    "rotated": ("decoded", "decord"),
    "vfr": ("decoded", "decord"),
    "vp9_webm": ("decoded", "decord"),
    "hevc": ("decoded", "decord"),
    "mjpeg": ("decoded", "decord"),
    "mpeg4_part2": ("decoded", "decord"),
    "av1": ("decoded", "pyav"),
    "decord_stride_bug": ("decoded", None),  # decord at 64x64, PyAV at native size
}

EVERY_OTHER: Callable[[int], np.ndarray] = lambda n: np.arange(0, n, 2)  # noqa: E731


def test_frames_match_requested_indices(tmp_path):
    path = write_video(tmp_path / "ramp.mp4", num_frames=24)
    indices = [0, 3, 7, 8, 20, 23, 5]  # any order
    frames = video.read_clip(path, lambda n: indices).frames
    assert frames.dtype == np.uint8 and frames.shape == (7, 32, 64, 3) and frames.flags.c_contiguous
    np.testing.assert_allclose(brightness(frames), STEP * np.array(indices), atol=3)


@pytest.mark.parametrize("decoder", ["auto", "pyav"])
def test_resize_and_repeats(tmp_path, decoder):
    path = write_video(tmp_path / "ramp.mp4", num_frames=24)
    clip = video.read_clip(path, lambda n: [1, 1, 2, n - 1], size=(16, 32), decoder=decoder)
    assert clip.frames.shape == (4, 16, 32, 3)
    assert clip.num_source_frames == 24 and clip.indices.tolist() == [1, 1, 2, 23]
    assert clip.decoder == ("decord" if decoder == "auto" else "pyav")
    np.testing.assert_allclose(brightness(clip.frames), [10, 10, 20, 230], atol=3)
    assert np.array_equal(clip.frames[0], clip.frames[1])


def test_pyav_fallback_gives_the_same_pixels_as_decord(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.mp4"
    with av.open(str(path), "w") as container:  # textured frames, so resampling differences would show
        stream = container.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt, stream.options = 96, 64, "yuv420p", {"crf": "10"}
        for _ in range(6):
            image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    a = video.read_clip(path, lambda n: [0, 5], size=(40, 56), decoder="auto").frames.astype(float)
    b = video.read_clip(path, lambda n: [0, 5], size=(40, 56), decoder="pyav").frames.astype(float)
    luma = np.array([0.299, 0.587, 0.114])
    # Same resampler (swscale bilinear): luma agrees to rounding; 4:2:0 chroma upsampling differs a little.
    assert np.abs(a @ luma - b @ luma).mean() < 0.5
    assert np.abs(a - b).mean() < 4.0


@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_awkward_files_decode_or_fail_with_a_reason(tmp_path, kind):
    path = make_bad(kind, tmp_path)
    outcome, expected = BAD_KINDS[kind]
    if outcome == "skipped":
        with pytest.raises(video.VideoDecodeError, match=expected) as err:
            video.read_clip(path, EVERY_OTHER, size=(32, 32))
        assert "\n" not in err.value.reason and len(err.value.reason) < 160
        return
    clip = video.read_clip(path, EVERY_OTHER, size=(32, 32))
    assert clip.frames.shape == (len(clip.indices), 32, 32, 3) and clip.frames.dtype == np.uint8
    if expected is not None:
        assert clip.decoder == expected
    if kind != "rotated":  # the marker-free fixtures: every frame shows its own index
        tolerance = 12 if kind in ("mjpeg", "mpeg4_part2") else 4
        np.testing.assert_allclose(brightness(clip.frames), STEP * clip.indices, atol=tolerance)
    if kind == "grayscale":
        assert np.array_equal(clip.frames[..., 0], clip.frames[..., 1])
        assert np.array_equal(clip.frames[..., 1], clip.frames[..., 2])
    if kind == "short":
        assert clip.num_source_frames == 5


@pytest.mark.parametrize("decoder", ["auto", "pyav"])
def test_rotation_is_applied(tmp_path, decoder):
    """A 90-degree display matrix: frames come out as a player shows them (portrait), in both decoders."""
    path = write_video(tmp_path / "rotated.mp4", rotation=90, marker=True)  # stored 32x64, red top-left
    frame = video.read_clip(path, lambda n: [0], decoder=decoder).frames[0]
    assert frame.shape == (64, 32, 3)
    red = (frame[..., 0] > 200) & (frame[..., 1] < 60)
    rows, cols = np.nonzero(red)
    # counter-clockwise quarter turn: the top-left block ends up bottom-left
    assert rows.min() >= 64 - 16 - 1 and cols.max() <= 8


def test_clip_reports_the_source_frame_count_and_decoder(tmp_path):
    clip = video.read_clip(write_video(tmp_path / "a.mp4", num_frames=20), lambda n: [0])
    assert (clip.num_source_frames, clip.decoder, clip.frames.shape) == (20, "decord", (1, 32, 64, 3))
    webm = video.read_clip(make_bad("vp9_webm", tmp_path), lambda n: [n - 1], decoder="pyav")  # no index: counted
    assert webm.num_source_frames == 24 and webm.decoder == "pyav" and webm.indices.tolist() == [23]


def test_out_of_range_index_is_a_decode_error(tmp_path):
    path = write_video(tmp_path / "a.mp4", num_frames=10)
    with pytest.raises(video.VideoDecodeError, match="frame index 10 out of range for a 10-frame video"):
        video.read_clip(path, lambda n: [0, 10])
    with pytest.raises(video.VideoDecodeError, match="file not found"):
        video.read_clip(tmp_path / "missing.mp4", lambda n: [0])
