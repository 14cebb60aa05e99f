"""Frame extraction speed, as ratios against references measured in the same run on the same files.

    python benchmarks/extract.py [--videos DIR] [--repeats 7] [--docs docs/benchmarks.md]

For each set of files:

1. ceiling: PyAV decoding every frame of every file, single-threaded, no colour conversion or resize (the
   practical per-core ceiling for anything that must decode these files);
2. extraction, 1 worker: ``seqvision.frames`` on the same files in-process (decord, ``--num-frames`` frames
   sampled uniformly, RGB + resize to 64x64, written into the .npy shard);
3. extraction, 2 workers: the same through the spawn pool, in steady state (pool already started; its
   start-up cost is reported separately).

Speed is *source* frames per second (every frame of a file is decoded, or skipped over, to reach the sampled
ones), so all rows count the same work. Measurements are repeated, interleaved so background load hits them
alike; the best run is reported (the least disturbed), the median beside it. CPU seconds include the pool
workers (read from /proc), so "CPU s" shows the work done independent of how busy the machine was.

Targets: extraction >= 0.7x the ceiling per core, 2 workers >= 1.8x one worker. Without ``--videos`` two
generated sets are measured: ``synth-like`` (40 clips like data/videos: 64x64, 16-32 frames, moving shape on
noise; the one the targets are about) and ``longer`` (10 clips, 128x128, 96-128 frames), which shows how the
fixed per-file cost weighs on tiny clips. Results are printed as markdown and replace the
"## Frame extraction" section of ``--docs``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np

from seqvision import frames
from seqvision.config import ExtractConfig
from seqvision.io import replace_markdown_section

HEADING = "## Frame extraction"
TARGET_CEILING = 0.7
TARGET_SCALING = 1.8
NAMES = {"ceiling": "ceiling", "one": "1 worker"}


class Record(NamedTuple):
    id: str
    path: Path
    split: str


class FileSet(NamedTuple):
    name: str
    count: int
    size: int
    min_frames: int
    max_frames: int


SETS = {
    "synth-like": FileSet("synth-like", 40, 64, 16, 32),
    "longer": FileSet("longer", 10, 128, 96, 128),
}


def make_videos(folder: Path, spec: FileSet, *, seed: int = 0) -> list[Path]:
    """H.264 clips like data/videos: a moving red square on a flat background plus pixel noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    size = spec.size
    paths = []
    for i in range(spec.count):
        num_frames = int(rng.integers(spec.min_frames, spec.max_frames + 1))
        path = folder / f"video{i}.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=12)
            stream.width = stream.height = size
            stream.pix_fmt, stream.options = "yuv420p", {"crf": "18"}
            background = rng.integers(40, 200, 3)
            for t in range(num_frames):
                image = np.empty((size, size, 3), np.float32)
                image[:] = background
                x = (4 + 2 * t) % (size - 16)
                image[size // 3 : size // 3 + 16, x : x + 16] = (230, 60, 60)
                image += rng.normal(0, 6, image.shape)
                frame = av.VideoFrame.from_ndarray(np.clip(image, 0, 255).astype(np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        paths.append(path)
    return paths


def pyav_decode_only(paths: list[Path]) -> int:
    """Decode every frame, one thread, nothing else; returns the number of frames."""
    count = 0
    for path in paths:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"
            stream.codec_context.thread_count = 1
            for _ in container.decode(stream):
                count += 1
    return count


def cpu_seconds(pids: list[int]) -> float:
    """This process's CPU time plus that of ``pids`` (Linux /proc; other systems: this process only)."""
    total = time.process_time()
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


class Timing(NamedTuple):
    best_s: float
    median_s: float
    cpu_s: float  # CPU seconds (main process + workers) of the best run


def measure(runs: dict[str, tuple[Callable[[], object], list[int]]], repeats: int) -> dict[str, Timing]:
    """Run each callable ``repeats`` times, interleaved; ``runs[name] = (fn, worker pids)``."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (fn, pids) in runs.items():
            cpu, start = cpu_seconds(pids), time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start, cpu_seconds(pids) - cpu))
    out = {}
    for name, values in samples.items():
        best = min(values)
        out[name] = Timing(best[0], statistics.median(v[0] for v in values), best[1])
    return out


class SetResult(NamedTuple):
    name: str
    description: str
    source_frames: int
    stored_clips: int
    startup_s: float
    timings: dict[str, Timing]


def run_set(name: str, description: str, paths: list[Path], *, num_frames: int, repeats: int,
            tmp_dir: Path) -> SetResult:
    records = [Record(p.stem, p, "train") for p in paths]
    config = dataclasses.replace(ExtractConfig(), num_frames=num_frames, shard_size=len(records),
                                 max_skipped_fraction=1.0, sampling="uniform", resize=(64, 64))
    (plan,) = frames.plan_shards(records, kind="videos", shard_size=len(records))
    source_frames = pyav_decode_only(paths)  # also warms the page cache
    with frames.FrameExtractor(tmp_dir / f"{name}-1", config=config, workers=1, progress=False) as one:
        start = time.perf_counter()
        with frames.FrameExtractor(tmp_dir / f"{name}-2", config=config, workers=2, progress=False) as two:
            warm = two.extract_shard(plan)  # spawns both workers, imports, first decode
            startup_s = time.perf_counter() - start
            if warm.skipped:
                print(f"warning: {len(warm.skipped)} skipped, e.g. {warm.skipped[0]}", file=sys.stderr)
            one.extract_shard(plan)
            timings = measure(
                {
                    "ceiling": (lambda: pyav_decode_only(paths), []),
                    "one": (lambda: one.extract_shard(plan), []),
                    "two": (lambda: two.extract_shard(plan), two.worker_pids()),
                },
                repeats,
            )
    return SetResult(name, description, source_frames, len(warm.entries), startup_s, timings)


def table(result: SetResult) -> str:
    t = result.timings
    fps = {key: result.source_frames / timing.best_s for key, timing in t.items()}
    median = {key: result.source_frames / timing.median_s for key, timing in t.items()}

    def verdict(key: str, reference: str, target: float) -> str:
        value, typical = fps[key] / fps[reference], median[key] / median[reference]
        met = "met" if value >= target else "MISSED"
        return f"**{value:.2f}x** (median {typical:.2f}x) of {NAMES[reference]}; target >= {target}x: {met}"

    rows = [
        ("PyAV decode-only, 1 thread (ceiling)", "ceiling", "1.00x"),
        ("extraction, 1 worker (in-process)", "one", verdict("one", "ceiling", TARGET_CEILING)),
        ("extraction, 2 workers (spawn pool)", "two", verdict("two", "one", TARGET_SCALING)),
    ]
    lines = [f"**{result.name}**: {result.description}; {result.source_frames} source frames, "
             f"{result.stored_clips} clips stored. Pool start-up {result.startup_s:.2f} s (not included).", "",
             "| run | source frames/s (best) | median | CPU s, all processes (best run) | ratio |",
             "|---|---:|---:|---:|---|"]
    for label, key, ratio in rows:
        timing = t[key]
        lines.append(f"| {label} | {fps[key]:,.0f} | {median[key]:,.0f} | "
                     f"{timing.cpu_s:.3f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=Path, help="measure this folder of videos instead of generated sets")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (best is reported)")
    parser.add_argument("--num-frames", type=int, default=16, help="frames sampled per clip (extract.num_frames)")
    parser.add_argument("--docs", default="docs/benchmarks.md", help="markdown file to update ('' for none)")
    args = parser.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory(prefix="seqvision-bench-") as tmp:
        tmp_dir = Path(tmp)
        if args.videos:
            suffixes = (".mp4", ".avi", ".webm", ".mkv", ".mov")
            paths = sorted(p for p in args.videos.iterdir() if p.suffix.lower() in suffixes)
            results.append(run_set("videos", f"`{args.videos}`", paths, num_frames=args.num_frames,
                                   repeats=args.repeats, tmp_dir=tmp_dir))
        else:
            for spec in SETS.values():
                paths = make_videos(tmp_dir / spec.name, spec)
                description = (f"{spec.count} generated H.264 clips, {spec.size}x{spec.size}, "
                               f"{spec.min_frames}-{spec.max_frames} frames")
                results.append(run_set(spec.name, description, paths, num_frames=args.num_frames,
                                       repeats=args.repeats, tmp_dir=tmp_dir))
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    machine = (f"Machine: {platform.machine()}, {os.cpu_count()} CPUs visible, load average {load[0]:.2f} / "
               f"{load[1]:.2f} / {load[2]:.2f} (1/5/15 min) at the end; Python {platform.python_version()}, "
               f"PyAV {av.__version__}; {args.num_frames} frames per clip stored at 64x64; "
               f"{args.repeats} interleaved repeats.")
    markdown = "\n".join(table(r) for r in results) + "\n" + machine + "\n"
    print(markdown)
    if args.docs:
        update_docs(Path(args.docs), markdown, sys.argv[1:] if argv is None else argv)
    return 0


def update_docs(path: Path, markdown: str, argv: list[str]) -> None:
    """Replace (or append) only the "## Frame extraction" section; other sections stay as they are."""
    command = " ".join(["python benchmarks/extract.py", *argv])
    section = (
        f"{HEADING}\n\n"
        f"Measured with `{command}`; what each row means is in the script's docstring. Frames/s count *source* "
        "frames, so extraction and the decode-only ceiling do the same decoding work. The machine is shared "
        "with other jobs and noisy: rerun before trusting a small difference.\n\n"
        f"{markdown}\n"
        "Reading the numbers: decord's `VideoReader` costs about 1 ms per file to open (it indexes every "
        "packet and builds a filter graph) against about 0.4 ms for PyAV, and hands every frame between its "
        "demux and decoder threads, which suffers when other processes hold the cores. On 16-32-frame clips "
        "that fixed cost is a large share of the work, hence the gap between the two sets. Two workers can "
        "only approach 2x when two cores are free: compare the load average with the CPU count.\n"
    )
    replace_markdown_section(path, HEADING, section)


if __name__ == "__main__":
    sys.exit(main())
