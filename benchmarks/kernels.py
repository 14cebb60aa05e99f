"""What pinning the CPU kernels costs, and whether the kernel path changes the bits (seqvision/kernels.py).

    python benchmarks/kernels.py [--pairs 5] [--steps 40] [--docs docs/benchmarks.md]

One fixed workload, each run in a fresh process (the pins are read when torch loads): a small conv stem over
64x64 frames (oneDNN), a GRU and a one-block Transformer encoder over 16 steps of 128 features (MKL matmuls,
ATen's vectorised elementwise kernels), trained with AdamW for ``--steps`` steps on seeded random data, one
thread. Three settings, interleaved pair by pair so that background load hits them alike:

- ``pinned``: the project default (``ATEN_CPU_CAPABILITY=avx2``, ``MKL_CBWR=COMPATIBLE``, ``ONEDNN_MAX_CPU_ISA=AVX2``);
- ``native``: nothing pinned (``SEQVISION_CPU_KERNELS=native``): each library picks its widest path;
- ``scalar``: ``ATEN_CPU_CAPABILITY=default`` on top of the pins: another kernel path, as another CPU would
  take one. Its weights differing from ``pinned`` shows that the path decides the last bits.

Reported: median seconds per setting, the median of the paired ratios against ``pinned``, and the SHA-256 of
the trained weights per setting (identical across runs of one setting: the workload is deterministic).
The results replace the "## Pinned CPU kernels" section of ``--docs``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEADING = "## Pinned CPU kernels"
SETTINGS = {
    "pinned": {},
    "native": {"SEQVISION_CPU_KERNELS": "native"},
    "scalar": {"ATEN_CPU_CAPABILITY": "default"},
}
PIN_KEYS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "SEQVISION_CPU_KERNELS")


def workload(steps: int) -> dict[str, object]:
    """Train the fixed model; returns seconds, the weights' hash and the kernel path torch reports."""
    import seqvision  # noqa: F401 - applies the pins (or not) before torch loads
    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 128))
    gru = nn.GRU(128, 128, batch_first=True)
    block = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True)
    head = nn.Linear(256, 10)
    modules = nn.ModuleList([stem, gru, block, head])
    optimizer = torch.optim.AdamW(modules.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    frames = torch.rand(32 * 4, 3, 64, 64, generator=generator)
    labels = torch.randint(0, 10, (32,), generator=generator)
    started = time.perf_counter()
    for _ in range(steps):
        features = stem(frames).view(32, 4, 128).repeat(1, 4, 1)  # 16 steps
        recurrent, _ = gru(features)
        attended = block(features)
        logits = head(torch.cat([recurrent[:, -1], attended.mean(1)], dim=1))
        loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    digest = hashlib.sha256()
    for tensor in modules.state_dict().values():
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return {"seconds": seconds, "sha256": digest.hexdigest(), "capability": torch.backends.cpu.get_cpu_capability()}


def run_child(setting: str, steps: int) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in PIN_KEYS}
    env.update(SETTINGS[setting])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1] / "src"),
                                                    env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(steps)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(pairs: int, steps: int) -> dict[str, list[dict[str, object]]]:
    results: dict[str, list[dict[str, object]]] = {name: [] for name in SETTINGS}
    for i in range(pairs):
        for name in SETTINGS:
            results[name].append(run_child(name, steps))
            print(f"pair {i + 1}/{pairs} {name}: {results[name][-1]['seconds']:.2f} s", file=sys.stderr)
    return results


def markdown(results: dict[str, list[dict[str, object]]], steps: int) -> str:
    pinned = [float(r["seconds"]) for r in results["pinned"]]
    lines = [
        HEADING, "",
        f"Measured with `python benchmarks/kernels.py` ({len(pinned)} interleaved runs per setting, {steps} "
        f"training steps of the fixed workload in the script's docstring, one thread) on {platform.machine()} "
        f"({_cpu_name()}). Ratio: the median of the paired ratios against `pinned` (above 1: slower).", "",
        "| setting | torch kernel path | median s | ratio vs pinned | weights SHA-256 (first 12) | same hash every run |",
        "|---|---|---:|---:|---|---|",
    ]
    for name, runs in results.items():
        seconds = [float(r["seconds"]) for r in runs]
        ratio = statistics.median(s / p for s, p in zip(seconds, pinned))
        hashes = {str(r["sha256"]) for r in runs}
        lines.append(f"| {name} | {runs[0]['capability']} | {statistics.median(seconds):.2f} | {ratio:.2f} | "
                     f"{sorted(hashes)[0][:12]} | {'yes' if len(hashes) == 1 else 'no'} |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5, help="runs per setting, interleaved (default 5)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (default 40)")
    parser.add_argument("--docs", help="replace the section of this markdown file with the results")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(workload(args.steps)))
        return 0
    text = markdown(measure(args.pairs, args.steps), args.steps)
    print(text)
    if args.docs:
        from seqvision.io import replace_markdown_section

        replace_markdown_section(Path(args.docs), HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
