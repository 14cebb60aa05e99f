"""Measuring one cell: peak memory, wall time, a fresh process per measurement, and the records that hold them.

A *cell* is one measurement of the study: one model variant at one setting (sequence length, threads, distance,
training-set fraction...), repeated. :class:`Cell` is its JSON-ready record; every row of the study (compute,
parallelism, and later long-range and data size) produces a list of them.

Peak memory on CPU is the process's peak resident set above a baseline, read where a measurement starts and ends
in a fresh process. On Linux the kernel's high-water mark (``VmHWM``, the number ``ru_maxrss`` reports) is reset
right before the measured call by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0, proc(5)), so the
delta is the call's own peak, not hidden under an earlier one. Elsewhere the fallback is the plain ``ru_maxrss``
delta, which only sees growth above the process's earlier peak (hence a fresh process per cell). ``tracemalloc``
would see neither: tensor storage is not allocated through Python's allocator. On CUDA it is
``torch.cuda.max_memory_allocated`` above the memory allocated at the start.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from seqvision.runtime import main_not_rerun
from seqvision.study import cellserver


class CellError(RuntimeError):
    """A cell's process raised, was killed (e.g. out of memory) or ran past its time limit."""


# --------------------------------------------------------------------------------------------------------
# Memory


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``VmRSS``; elsewhere the peak, the best available)."""
    status = _proc_status()
    if "VmRSS" in status:
        return status["VmRSS"]
    return _ru_maxrss_bytes()


def peak_rss_bytes(*, method: str = "hwm") -> int:
    """Peak resident set size: ``VmHWM`` (resettable, Linux) with ``method="hwm"`` when available, else ru_maxrss."""
    if method == "hwm":
        status = _proc_status()
        if "VmHWM" in status:
            return status["VmHWM"]
    return _ru_maxrss_bytes()


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _proc_status() -> dict[str, int]:
    try:
        with open("/proc/self/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024  # "  1234 kB"
    return out


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``), so a baseline RSS holds no reusable slack."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class MemoryProbe:
    """Filled in when the ``peak_memory`` block ends: peak bytes above the start, and how they were measured."""

    peak_bytes: int = 0
    method: str = ""


@contextlib.contextmanager
def peak_memory(device: torch.device | str = "cpu", *, method: str = "auto") -> Iterator[MemoryProbe]:
    """Measure the peak memory of the block above what was in use when it started.

    CPU, ``method="auto"``: reset ``VmHWM`` and read it back ("rss_hwm"), or, where it cannot be reset, the
    ``ru_maxrss`` delta ("ru_maxrss"), which only sees growth above the process's earlier peak. ``method`` forces
    one of the two. CUDA: ``max_memory_allocated`` above ``memory_allocated`` at the start ("cuda_allocated").
    """
    device = torch.device(device)
    probe = MemoryProbe()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield probe
        torch.cuda.synchronize(device)
        probe.peak_bytes, probe.method = torch.cuda.max_memory_allocated(device) - base, "cuda_allocated"
        return
    if method not in ("auto", "rss_hwm", "ru_maxrss"):
        raise ValueError(f"method must be auto, rss_hwm or ru_maxrss, got {method!r}")
    release_free_memory()
    use_hwm = method != "ru_maxrss" and reset_peak_rss()
    if method == "rss_hwm" and not use_hwm:
        raise RuntimeError("cannot reset the peak RSS here (/proc/self/clear_refs is not writable)")
    base = rss_bytes() if use_hwm else peak_rss_bytes(method="ru_maxrss")
    yield probe
    peak = peak_rss_bytes(method="hwm" if use_hwm else "ru_maxrss")
    probe.peak_bytes, probe.method = max(0, peak - base), "rss_hwm" if use_hwm else "ru_maxrss"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(tensors: Sequence[torch.Tensor | None] | None) -> int:
    """Bytes held by the tensors of a state/memory tuple."""
    return sum(t.numel() * t.element_size() for t in tensors or () if t is not None)


# --------------------------------------------------------------------------------------------------------
# Fresh processes


def _exit_with(pid: int, *, every_s: float = 1.0) -> None:
    """A daemon thread that ends this process once process ``pid`` (the study's) is gone.

    A cell's parent is the fork server, not the study process, and the fork server outlives a killed study process
    while any cell holds the pipe it watches; without this, killing the study (Ctrl-C under ``dvc repro``, a
    SIGKILL) left its trainings running orphaned."""
    def watch() -> None:
        while True:
            time.sleep(every_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # alive, owned by someone else (cannot happen for our own parent)
                pass

    threading.Thread(target=watch, name="exit-with-study", daemon=True).start()


def _child(conn: Any, parent: int, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    _exit_with(parent)
    # The objects inherited from the fork server never become garbage here; without freezing them, every
    # gc.collect() (release_free_memory) walks all of torch's Python objects: 0.3 s per cell, measured.
    gc.freeze()
    try:
        result = ("ok", fn(*args, **kwargs))
    except BaseException:  # noqa: BLE001 - the parent reports it with the cell
        result = ("error", traceback.format_exc(limit=6))
    conn.send(result)
    conn.close()


def run_isolated(fn: Callable[..., Any], /, *args: Any, timeout_s: float = 600.0, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a fresh process forked from a fork server that has torch imported; its result.

    ``fn`` and its arguments must be picklable (a module-level function). Raises :class:`CellError` when the
    call raises, the process dies (e.g. killed for memory) or runs past ``timeout_s`` (then it is killed).
    """
    ctx = cellserver.start()  # once per process; ended when it exits
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(send, os.getpid(), fn, args, kwargs), daemon=True)
    with main_not_rerun(fn):
        process.start()
    send.close()
    try:
        if not receive.poll(timeout_s):
            process.kill()
            raise CellError(f"{getattr(fn, '__name__', fn)} ran past its limit of {timeout_s:g} s and was stopped")
        try:
            status, payload = receive.recv()
        except EOFError:
            process.join()
            raise CellError(f"{getattr(fn, '__name__', fn)}: the process died (exit code {process.exitcode};"
                            " -9 usually means it ran out of memory)") from None
    finally:
        process.join()
        receive.close()
    if status == "error":
        raise CellError(payload.strip().splitlines()[-1] + "\n" + payload)
    return payload


def time_call(fn: Callable[[], Any], *, device: torch.device) -> float:
    """Wall time of ``fn()`` in seconds, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Cell:
    """One measurement of the study, JSON-ready.

    ``row``: which row of the seed's table ("compute", "streaming", "parallelism", "gpu"; later "long_range",
    "data_size"). ``variant``: the model ("lstm", "transformer_naive", "mingru"...). ``key``: what distinguishes
    this cell within the row and variant, e.g. ``{"n": 512}`` or ``{"n": 512, "threads": 2}``. ``metrics``: one
    value per repeat (or seed) for each measured quantity, e.g. ``{"time_s": [...], "peak_bytes": [...]}``.
    ``settings``: everything else needed to reproduce or read it (sizes, batch, device, dtype, parameters).
    ``errors``: one line per repeat that failed (its metrics are absent, not zero).
    """

    row: str
    variant: str
    key: Mapping[str, Any]
    metrics: Mapping[str, Sequence[float]] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    errors: Sequence[str] = ()

    @property
    def name(self) -> str:
        """A stable, human-readable id, e.g. ``compute/lstm/n=512`` (MLflow run names, logs)."""
        return "/".join([self.row, self.variant, *(f"{k}={v}" for k, v in self.key.items())])

    def median(self, metric: str) -> float:
        """Median over the repeats; NaN when every repeat failed."""
        values = self.metrics.get(metric, ())
        return float(statistics.median(values)) if values else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "row": self.row, "variant": self.variant, "key": dict(self.key), "name": self.name,
            "metrics": {k: [float(v) for v in vs] for k, vs in self.metrics.items()},
            "medians": {k: self.median(k) if self.metrics[k] else None for k in self.metrics},
            "settings": dict(self.settings), "errors": list(self.errors),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Cell:
        return cls(row=data["row"], variant=data["variant"], key=dict(data["key"]),
                   metrics={k: list(v) for k, v in data["metrics"].items()}, settings=dict(data["settings"]),
                   errors=list(data["errors"]))


def environment() -> dict[str, Any]:
    """Where the numbers come from: host, CPU count, load, library versions, accelerator."""
    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError):
        env["load_average_1m"] = os.getloadavg()[0]
    return env
