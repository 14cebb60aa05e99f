"""The same CPU kernels on every x86-64 machine, so that a run reproduces hash for hash elsewhere.

PyTorch, MKL and oneDNN each pick the widest vector code path the CPU offers: AVX-512 on one machine and
AVX2 on another sum floats in a different order, so the first trained weights differ in their last bits and
every hash downstream of them (``dvc.lock``) differs too. One variable per library, read once when it loads,
fixes the path:

- ``ATEN_CPU_CAPABILITY=avx2``: PyTorch's own vectorised kernels (elementwise, reductions, softmax);
- ``MKL_CBWR=COMPATIBLE``: MKL's conditional numerical reproducibility (the matmuls). ``AVX2`` would be faster
  but Intel documents it for Intel CPUs only (an AMD CPU silently falls back to the automatic path);
  ``COMPATIBLE`` is the branch MKL supports on every x86-64 CPU;
- ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN's convolutions (the frame encoder);
- ``OPENBLAS_CORETYPE=Haswell``: numpy's (and scipy's) OpenBLAS, the matrix products outside torch (the
  nearest-neighbour baselines' cosine similarities). Measured: on an AVX-512 machine OpenBLAS picked its SkylakeX
  kernels and three baseline prediction files differed in the last digits of their scores from an AVX2 machine's;
  under ``Haswell`` (the AVX2 kernels) they were identical (docs/reproducibility.md).

They take effect only when set before ``torch`` and ``numpy`` are imported, so ``seqvision/__init__.py`` applies
them and every stage imports ``seqvision`` first (``pipelines/__init__.py``). A value the user already set wins. A
CPU without AVX2, or not x86-64, gets nothing pinned (there is no wider path to fall back from).
``SEQVISION_CPU_KERNELS=native`` turns the pins off, for speed when cross-machine identity does not matter; what
they cost here is measured in docs/benchmarks.md ("Pinned CPU kernels").
"""

from __future__ import annotations

import os
import platform
from collections.abc import MutableMapping
from pathlib import Path

SWITCH = "SEQVISION_CPU_KERNELS"  # "pinned" (default) or "native"
PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2",
        "OPENBLAS_CORETYPE": "Haswell"}


def cpu_has_avx2(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU advertises AVX2 (Linux; elsewhere: assume an x86-64 CPU of the last decade has it)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    return any(line.startswith("flags") and " avx2" in line for line in text.splitlines())


def pin_cpu_kernels(environ: MutableMapping[str, str] | None = None, *, machine: str | None = None,
                    has_avx2: bool | None = None) -> dict[str, str]:
    """Set :data:`PINS` in ``environ`` (default ``os.environ``) where unset; returns what this call set."""
    env = os.environ if environ is None else environ
    if env.get(SWITCH, "pinned").strip().lower() == "native":
        return {}
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return {}
    if not (cpu_has_avx2() if has_avx2 is None else has_avx2):
        return {}
    set_here = {key: value for key, value in PINS.items() if key not in env}
    env.update(set_here)
    return set_here
