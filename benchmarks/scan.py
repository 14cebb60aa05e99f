"""minGRU's training scan: the chunked two-level scan (``mingru.parallel_scan``) against the single log-space scan
(``mingru.parallel_scan_log``, Heinsen 2023, the reference) and the step loop, on one CPU thread.

    python benchmarks/scan.py [--lengths 16 34 146] [--batch 64] [--hidden 370] [--repeats 7]
                              [--docs docs/benchmarks.md]

One minGRU layer's forward and backward (the projection, the gates, the scan, a loss over every state) at the
activity task's shapes: batch 64 (``train.batch_size``), 128-d frame features, 370 hidden units (minGRU's size at the
comparison's 100k-parameter budget), T frames: 16 (the demo's clips), 34 and 146 (row 1 of the study's clips at
D = 8 and the longest it renders; longer T is row 3's business, and the step loop is slow there: a run with T = 1024
and 7 repeats had not finished after 13 minutes). The three are timed interleaved, ``--repeats`` times after a warm-up; the median is
reported, with the ratio reference / chunked (> 1: the chunked scan is faster). Beside it, each scan's largest
relative error against a float64 step loop on the same layer. Printed as markdown; replaces the "## minGRU scan"
section of ``--docs``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from seqvision import mingru
from seqvision.io import replace_markdown_section

HEADING = "## minGRU scan"
SCANS = ("chunked", "log-space", "sequential")


def states(layer: mingru.MinGRULayer, x: torch.Tensor, scan: str) -> torch.Tensor:
    """The layer's states on x: 'chunked' and 'sequential' as the layer runs them, 'log-space' with the layer's own
    gates fed to the single log-space scan it used before."""
    if scan != "log-space":
        return layer(x, scan="parallel" if scan == "chunked" else scan)
    pre_h, pre_z = layer.proj(x).chunk(2, dim=-1)
    return mingru.parallel_scan_log(-F.softplus(pre_z), -F.softplus(-pre_z) + mingru.log_g(pre_h))


def layer_step(layer: mingru.MinGRULayer, x: torch.Tensor, scan: str) -> Callable[[], None]:
    """One forward + backward of ``layer`` on x with the named scan."""

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        states(layer, x, scan).square().mean().backward()

    return step


def max_relative_error(layer: mingru.MinGRULayer, x: torch.Tensor, scan: str) -> float:
    with torch.no_grad():
        exact = copy.deepcopy(layer).double()(x.double(), scan="sequential")
        got = states(layer, x, scan)
    return float(((got.double() - exact).abs() / exact).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 34, 146], help="frames per clip T")
    parser.add_argument("--batch", type=int, default=64, help="clips per batch")
    parser.add_argument("--hidden", type=int, default=370, help="minGRU hidden units")
    parser.add_argument("--features", type=int, default=128, help="frame feature size")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per scan (interleaved)")
    parser.add_argument("--docs", type=Path, default=None,
                        help="markdown file whose '## minGRU scan' section to replace")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = mingru.MinGRULayer(args.features, args.hidden)
    rows = []
    for T in args.lengths:
        x = torch.randn(args.batch, T, args.features)
        steps = {scan: layer_step(layer, x, scan) for scan in SCANS}
        times: dict[str, list[float]] = {scan: [] for scan in steps}
        for step in steps.values():
            step()  # warm-up
        for _ in range(args.repeats):
            for scan, step in steps.items():
                start = time.perf_counter()
                step()
                times[scan].append(time.perf_counter() - start)
        median = {scan: statistics.median(ts) for scan, ts in times.items()}
        errors = {scan: max_relative_error(layer, x[:2], scan) for scan in ("chunked", "log-space")}
        rows.append(f"| {T} | {median['chunked'] * 1e3:.0f} | {median['log-space'] * 1e3:.0f} | "
                    f"{median['sequential'] * 1e3:.0f} | **{median['log-space'] / median['chunked']:.2f}x** | "
                    f"{errors['chunked']:.1e} | {errors['log-space']:.1e} |")
        print(rows[-1], flush=True)
    section = "\n".join([
        HEADING, "",
        f"Measured with `python benchmarks/scan.py` ({platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, 1 thread; what each column means is in the script's docstring): one minGRU layer's "
        f"forward + backward, batch {args.batch}, {args.features} -> {args.hidden}, median of {args.repeats} "
        "interleaved repeats. Speedup = log-space / chunked (the reference, measured in the same run). Errors: "
        "largest relative error of the states against a float64 step loop.", "",
        "| T | chunked (ms) | log-space (ms) | step loop (ms) | speedup vs log-space | error, chunked | "
        "error, log-space |",
        "|---:|---:|---:|---:|---:|---:|---:|", *rows, ""])
    if args.docs:
        replace_markdown_section(args.docs, HEADING, section + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
