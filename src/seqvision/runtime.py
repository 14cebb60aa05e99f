"""Where and how a process computes: device choice, seeds, deterministic kernels, CPU threads.

The one owner of these decisions for every stage (training, evaluation, encoder, features), so they cannot
drift apart between stages. torch is imported where a function needs it, not with the module: the train stage's
main process plans its seeds' slots (:func:`parallel_slots`) without torch on a machine without a GPU driver
(:func:`visible_gpus`), which saves it an ``import torch`` (about 1.3 s of CPU per stage).
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# What a GPU driver leaves on Linux: NVIDIA's kernel module, its control device, WSL's GPU paravirtualisation,
# Jetson's (Tegra) memory device and ROCm's compute device (torch.cuda also drives AMD GPUs). Without any of them
# torch sees no CUDA device; a device named "cuda" asks torch anyway.
GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg", "/dev/nvmap", "/dev/kfd")


@contextlib.contextmanager
def main_not_rerun(fn: Callable[..., Any]) -> Iterator[None]:
    """Start a multiprocessing child without running the caller's ``__main__`` module again in it, unless ``fn``
    (the child's target) lives there.

    multiprocessing's spawn and forkserver children import the parent's main module (as ``__mp_main__``) before
    unpickling the target. A stage's main module (``pipelines/study_row.py``, ``pipelines/train.py``) imports
    Prefect, so every child paid 1-3 s for an import it never used (a no-op study cell: 2.2 s, 0.1 s without it;
    docs/study.md). The targets are functions of importable modules; the main module is hidden from
    ``spawn.get_preparation_data`` only while the process starts."""
    main = sys.modules.get("__main__")
    if main is None or getattr(fn, "__module__", None) == "__main__":
        yield
        return
    saved = {name: main.__dict__[name] for name in ("__spec__", "__file__") if name in main.__dict__}
    main.__spec__ = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.update(saved)
        if "__spec__" not in saved:
            main.__dict__.pop("__spec__", None)


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU. Asking for ``"cuda"`` without one is a ``ValueError``."""
    import torch

    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested, but no CUDA device is visible (use 'auto' or 'cpu')")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device). Call before building the model too."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def configure_backends(device: torch.device, *, deterministic: bool, compile_model: bool = False) -> None:
    """Deterministic kernels on request; TF32 matmuls/convolutions on CUDA.

    ``warn_only=True``: an op without a deterministic kernel warns instead of stopping a long run.
    ``torch.use_deterministic_algorithms`` also sets ``torch._inductor.config.deterministic``, and importing
    ``torch._inductor`` costs ~1.5 s per process (measured: a third of a small training stage). Without
    ``torch.compile`` that flag is never read, so we flip only the kernel switch it wraps.
    ``CUBLAS_WORKSPACE_CONFIG`` is required by cuBLAS for reproducible results (CUDA >= 10.2); it must be
    set before the first cuBLAS call, hence here, before the model runs.
    """
    import torch

    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if compile_model or not hasattr(torch._C, "_set_deterministic_algorithms"):
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
    else:
        torch._C._set_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    if device.type == "cuda":
        # TF32 keeps fp32 range with a 10-bit mantissa: ~free speed on Ampere+ for the fp32 parts that
        # autocast leaves in fp32. torch >= 2.9 has the fp32_precision API and deprecates allow_tf32.
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "tf32"
            torch.backends.cudnn.rnn.fp32_precision = "tf32"
        else:  # pragma: no cover - older torch
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True


def gpu_driver_present() -> bool:
    """Whether torch might see a CUDA device: True off Linux; on Linux, when a GPU driver left a trace
    (:data:`GPU_DRIVER_PATHS`) or torch is imported already (then asking it is free)."""
    return (not sys.platform.startswith("linux") or "torch" in sys.modules
            or any(os.path.exists(path) for path in GPU_DRIVER_PATHS))


def visible_gpus(device: str = "auto") -> list[str]:
    """The CUDA devices this process may use for ``device`` ("auto", "cpu" or "cuda[:n]"), as CUDA_VISIBLE_DEVICES
    entries (index or UUID): none for "cpu"; without a GPU driver (:func:`gpu_driver_present`) none, and torch is not
    imported, unless the device names "cuda"."""
    if device == "cpu" or not (device.startswith("cuda") or gpu_driver_present()):
        return []
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is not None:  # a child must name the *physical* device, not its index among the visible ones
        return [d.strip() for d in inherited.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; a container's CPU set, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """The CPU threads a process may use, without importing torch: ``OMP_NUM_THREADS`` when it is one number, else
    the usable cores (logical ones). torch's own default can be lower: it counts physical cores on hyperthreaded x86
    and also reads ``MKL_NUM_THREADS``."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else usable_cores()


def parallel_slots(jobs: int, *, device: str, wanted: int | None = None, per_core: int = 1) -> list[str | None]:
    """One entry per job that may run at once: the CUDA_VISIBLE_DEVICES value it gets, ``None`` on CPU.

    GPU (``device`` auto or cuda, and one visible): by default one job per device, so each has a device to itself;
    a larger ``wanted`` shares them round-robin. CPU: by default ``per_core`` per usable core, each job
    single-threaded (one thread was 5-14x faster than two for these small sequential models,
    docs/benchmarks.md). ``per_core`` 2 lets a few equal jobs share the cores instead of running in rounds: 3 seeds
    on 2 cores all finish after ~1.5 times one seed's time, not 2 (measured: 20.9 s against 29.1 s,
    docs/benchmarks.md). Never more slots than jobs, never fewer than one.
    """
    if wanted is not None and wanted < 1:
        raise ValueError(f"the number of jobs at once must be >= 1, got {wanted}")
    gpus = visible_gpus(device)
    if device.startswith("cuda") and not gpus:
        raise ValueError(f"device {device!r}, but no CUDA device is visible")
    count = max(1, min(wanted or (len(gpus) if gpus else per_core * usable_cores()), jobs))
    return [gpus[i % len(gpus)] for i in range(count)] if gpus else [None] * count
