"""What several stage CLIs share: the raw-data flags (named like params.yaml's ``data:`` keys), and the
stage timings that ``benchmarks/pipeline.py`` reads (:func:`stage_work`, :func:`untimed`)."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import functools
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from seqvision.config import DataConfig, from_mapping, load_params, to_dict

DATA_KEYS = tuple(f.name for f in dataclasses.fields(DataConfig))


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--video-dir``-style flag per ``data:`` key; a flag left out falls back to params.yaml."""
    for f in dataclasses.fields(DataConfig):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=int if f.type in (int, "int") else str,
            default=None,
            help=f"{f.metadata.get('help', '')} (default: params.yaml data.{f.name})",
        )


def data_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The data flags as ``{key: value or None}`` (``None`` = not given)."""
    return {key: getattr(args, key) for key in DATA_KEYS}


def retry_on_io_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only for I/O trouble (disk full, a network filesystem or server
    hiccup: ``OSError``), never for a bug or bad input, which would fail the same way again."""
    try:
        state.result()
    except OSError:
        return True
    except BaseException:  # noqa: BLE001 - anything else fails the task at once
        return False
    return False


# Keyword arguments of @task for the tasks that read or write files.
IO_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": 2, "retry_condition_fn": retry_on_io_error}


def resolve_configs(params: str | Path, overrides: dict[str, Any], section: str) -> tuple[DataConfig, Any]:
    """Validate the whole params file; return (data paths with the given flags applied, ``section``'s config)."""
    loaded = load_params(params)
    data = to_dict(loaded["data"])
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(DataConfig, data, where="data (params + flags)"), loaded[section]


# --------------------------------------------------------------------------------------------------------
# Stage timings: how much of a stage process's life is the library's work, and how much is orchestration
# (interpreter and imports, Prefect flow/task run bookkeeping, MLflow). With $SEQVISION_TIMINGS=<file> set,
# every stage process appends one JSON line to that file when it exits:
#   {"stage": $DVC_STAGE or null, "kind": names given to stage_work ("+"-joined, in order of first use) or
#    null, "work_s": seconds inside stage_work blocks, "age_s": seconds since the process started,
#    "age_from": "proc" (Linux /proc) or "import" (since this module was imported: an underestimate),
#    "pid", "owner_pid": null, or the pid of the stage process this one descends from (torchrun workers),
#    "argv", "written_at": Unix time of the line}
# Unset (the normal case), nothing is registered and stage_work / untimed do nothing.

TIMINGS_ENV = "SEQVISION_TIMINGS"
# The outermost stage process puts its pid here, so its children (torchrun workers, spawn-pool workers, which
# import this module too) know their time is already inside its age and must not be added to it again.
TIMINGS_OWNER_ENV = "SEQVISION_TIMINGS_OWNER"

_IMPORTED = time.perf_counter()
_TIMINGS_FILE = os.environ.get(TIMINGS_ENV) or None

T = TypeVar("T")


class _WorkClock:
    """Wall time during which at least one work block is open and none is paused: the union of the blocks'
    intervals, so nested blocks (a task body inside a flow-level block, or tasks in concurrent threads) count
    once. A pause (MLflow calls made from inside the work) stops the clock for every thread: an approximation
    that only matters if work and MLflow calls ran concurrently, which no stage does."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = 0
        self._paused = 0
        self._since = 0.0
        self._seconds = 0.0
        self.kinds: list[str] = []

    def _running(self) -> bool:
        return self._open > 0 and self._paused == 0

    def change(self, *, opened: int = 0, paused: int = 0, kind: str | None = None) -> None:
        now = time.perf_counter()
        with self._lock:
            was_running = self._running()
            self._open += opened
            self._paused += paused
            if kind is not None and kind not in self.kinds:
                self.kinds.append(kind)
            if was_running and not self._running():
                self._seconds += now - self._since
            elif self._running() and not was_running:
                self._since = now

    def seconds(self) -> float:
        """Work so far, including a block still open."""
        now = time.perf_counter()
        with self._lock:
            return self._seconds + (now - self._since if self._running() else 0.0)


_CLOCK = _WorkClock()


@contextlib.contextmanager
def stage_work(kind: str) -> Iterator[None]:
    """Count the enclosed block as stage *work*: the calls into ``seqvision`` that a stage exists to make
    (decoding, tokenizing, training, evaluating, report building), not Prefect or MLflow bookkeeping.
    ``kind`` names the stage ("extract", "train", ...). Does nothing unless ``$SEQVISION_TIMINGS`` is set."""
    if _TIMINGS_FILE is None:
        yield
        return
    _CLOCK.change(opened=1, kind=kind)
    try:
        yield
    finally:
        _CLOCK.change(opened=-1)


@contextlib.contextmanager
def _paused() -> Iterator[None]:
    _CLOCK.change(paused=1)
    try:
        yield
    finally:
        _CLOCK.change(paused=-1)


class _Untimed:
    """Forwards attribute access to ``target``; its method calls stop the work clock while they run."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        if name == "_target":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        value = getattr(self._target, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def call(*args: Any, **kwargs: Any) -> Any:
            with _paused():
                return value(*args, **kwargs)

        return call


def untimed(target: T) -> T:
    """``target`` (an MLflow tracker handed into the work) with its method calls *not* counted as work: MLflow
    logging is orchestration even when the library makes the calls. Plain method calls only (no ``with``).
    Returns ``target`` itself unless ``$SEQVISION_TIMINGS`` is set."""
    if _TIMINGS_FILE is None:
        return target
    return _Untimed(target)  # type: ignore[return-value]


def process_age() -> tuple[float, str]:
    """(seconds since this process started, "proc"), from /proc/self/stat's start time (Linux); else
    (seconds since this module was imported, "import"), which misses the interpreter start and earlier imports."""
    since_import = time.perf_counter() - _IMPORTED
    try:
        stat = Path("/proc/self/stat").read_text()
        # Field 22, starttime, in clock ticks after boot; fields are counted from after the ")" that closes
        # the command name (which may itself contain spaces or parentheses), where field 3 starts.
        start_ticks = int(stat.rpartition(")")[2].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return since_import, "import"
    # Clock ticks are 10 ms; anything shorter than the time since import is a clock we misread.
    return (age, "proc") if age >= since_import else (since_import, "import")


def timing_record() -> dict[str, Any]:
    """This process's timing line (see above), as of now."""
    age, age_from = process_age()
    owner = os.environ.get(TIMINGS_OWNER_ENV)
    return {
        "stage": os.environ.get("DVC_STAGE") or None,  # DVC sets it for every stage command
        "kind": "+".join(_CLOCK.kinds) or None,
        "work_s": round(_CLOCK.seconds(), 4),
        "age_s": round(age, 4),
        "age_from": age_from,
        "pid": os.getpid(),
        "owner_pid": int(owner) if owner and owner != str(os.getpid()) else None,
        "argv": sys.argv,
        "written_at": round(time.time(), 3),  # Unix time; what follows (interpreter teardown) is not in age_s
    }


def _write_timing() -> None:
    record = timing_record()
    if record["owner_pid"] is not None and record["kind"] is None:
        return  # a helper process (e.g. a spawn-pool worker) that did no stage work of its own
    line = (json.dumps(record) + "\n").encode()
    # One write on an O_APPEND descriptor: lines of concurrent stage processes never interleave.
    fd = os.open(_TIMINGS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # type: ignore[arg-type]
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


if _TIMINGS_FILE is not None:
    os.environ.setdefault(TIMINGS_OWNER_ENV, str(os.getpid()))
    # Registered at import, before the exit handlers that Prefect and MLflow register once they start working
    # (atexit runs the last registered first), so the age includes their clean-up.
    atexit.register(_write_timing)
