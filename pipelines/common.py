"""What every stage entry point shares, Prefect-free: the params and raw-data flags, reading params.yaml once,
the one-line error policy, and the I/O retry policy of the tasks that read or write files.

Each stage's ``main`` parses its arguments, reads params.yaml once (:func:`read_params`: validated, with the
data flags applied) and calls its flow with the typed :class:`~seqvision.config.Params`; the flow never reads
params.yaml again. A flow started another way (a Prefect deployment, the comparison flow) gets a path instead
and resolves it once (:func:`resolve_params`).

Errors (:func:`run_main`): a mistake a user can fix (bad params, a missing or malformed input) is one line on
stderr and exit status 2; a failed run is one line and exit status 1. ``--debug`` or ``SEQVISION_DEBUG=1`` adds
the traceback.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import faulthandler
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

from seqvision.annotations import AnnotationError
from seqvision.checkpoint import CorruptCheckpoint
from seqvision.config import ConfigError, DataConfig, Params, from_mapping, load_params, to_dict

DATA_KEYS = tuple(f.name for f in dataclasses.fields(DataConfig))
DEBUG_ENV = "SEQVISION_DEBUG"
# Set by scripts/with-prefect-server, which starts its Prefect server beside the command instead of before it:
# the server's log, and its pid. A stage waits for the server's /health before its work (wait_for_prefect_server).
SERVER_LOG_ENV = "SEQVISION_PREFECT_SERVER_LOG"
SERVER_PID_ENV = "SEQVISION_PREFECT_SERVER_PID"
SERVER_WAIT_S = 300.0  # a busy 2-core machine took ~20 s to start one
EXIT_STACKS_AFTER_S = 30.0  # exit_fast: a stage still exiting after this long prints every thread's stack

# Errors that mean "fix your arguments, params or inputs" (exit 2), not "the run went wrong" (exit 1).
USAGE_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, FileNotFoundError, AnnotationError, CorruptCheckpoint, ValueError,
)


# --------------------------------------------------------------------------------------------------------
# Arguments and params


def add_params_argument(parser: argparse.ArgumentParser, *, sections: str) -> None:
    """``--params`` (default params.yaml) and ``--debug``; ``sections`` says in the help which sections are read."""
    parser.add_argument("--params", default="params.yaml",
                        help=f"params file (default: params.yaml); this stage reads {sections}; the whole file is "
                             "validated first")
    parser.add_argument("--debug", action="store_true",
                        help=f"print tracebacks with errors (also: {DEBUG_ENV}=1)")


def add_data_arguments(parser: argparse.ArgumentParser, keys: tuple[str, ...] = DATA_KEYS) -> None:
    """One ``--video-dir``-style flag per ``data:`` key in ``keys``; a flag left out falls back to params.yaml."""
    for f in dataclasses.fields(DataConfig):
        if f.name in keys:
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                type=int if f.type in (int, "int") else str,
                default=None,
                help=f"{f.metadata.get('help', '')} (default: params.yaml data.{f.name})",
            )


def read_params(args: argparse.Namespace) -> Params:
    """params.yaml (``args.params``), validated once, with the data flags that were given applied."""
    params = load_params(args.params)
    overrides = {key: getattr(args, key) for key in DATA_KEYS if getattr(args, key, None) is not None}
    return with_data(params, overrides) if overrides else params


def with_data(params: Params, overrides: Mapping[str, Any]) -> Params:
    """``params`` with some ``data:`` keys replaced (validated like params.yaml)."""
    data = from_mapping(DataConfig, {**to_dict(params.data), **overrides}, where="data (params + flags)")
    return dataclasses.replace(params, data=data)


def data_value(args: argparse.Namespace, params: Params, key: str) -> Any:
    """The ``data.<key>`` flag when it was given (validated like params.yaml), else params.yaml's value. Reads no
    other ``data:`` key, so a stage that needs one path depends on that path alone."""
    given = getattr(args, key, None)
    if given is None:
        return getattr(params.data, key)
    return getattr(from_mapping(DataConfig, {key: given}, where="data (flag)"), key)


def resolve_params(params: Params | str | Path, data: DataConfig | None = None) -> Params:
    """What a flow works with: ``params`` itself, or the validated file it names; ``data`` replaces its data
    section (a deployment run's raw-data paths)."""
    resolved = params if isinstance(params, Params) else load_params(params)
    return resolved if data is None else dataclasses.replace(resolved, data=data)


# --------------------------------------------------------------------------------------------------------
# Errors


class StageFailed(RuntimeError):
    """The stage's work failed somewhere this process can only report (a worker process): the message says where
    and why, and there is no traceback here to offer."""


# Processes a stage started (the train stage's seed workers: Popen, or pipelines.seed_server.ForkedWorker with the
# same interface): stopped when the stage is interrupted.
CHILDREN: set[Any] = set()
PARENT_POLL_S = 1.0
_FOLLOWING = False


def stop_children(timeout: float = 30.0) -> None:
    """Terminate every live process in :data:`CHILDREN` (SIGTERM, then SIGKILL after ``timeout`` seconds)."""
    live = [proc for proc in list(CHILDREN) if proc.poll() is None]
    for proc in live:
        proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in live:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_for_prefect_server(timeout_s: float = SERVER_WAIT_S, poll_s: float = 0.1) -> None:
    """Block until the Prefect server that scripts/with-prefect-server started answers ``/health``; no-op without it.

    The wrapper starts the server beside its command rather than before it, so a ``dvc repro`` with nothing to run
    does not wait ~5 s for a server nobody uses, and a stage's own imports overlap the server's start. Raises
    :class:`StageFailed`, naming the server's log, when the server exits or does not answer in ``timeout_s``."""
    log, url = os.environ.get(SERVER_LOG_ENV), os.environ.get("PREFECT_API_URL")
    if not log or not url:
        return
    pid = int(os.environ.get(SERVER_PID_ENV) or 0)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            pass
        if pid and not _alive(pid):
            raise StageFailed(f"the Prefect server for this run ({url}) exited before it answered; see {log}")
        if time.monotonic() > deadline:
            raise StageFailed(f"the Prefect server for this run ({url}) did not answer in {timeout_s:.0f} s; "
                              f"see {log}")
        time.sleep(poll_s)


@contextlib.contextmanager
def without_default_heartbeats() -> Iterator[None]:
    """Prefect's flow-run heartbeats off while the block runs, unless the user set their frequency
    (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, or its profile/TOML setting); a no-op in a process without Prefect.

    A flow run's heartbeats (every 180 s by default) come from a thread that sleeps in 1-s steps, and the flow's end
    waits for that sleep to finish: 0.66 s of every stage process whose flow ran 0.4 s (docs/benchmarks.md,
    "Flow-run heartbeats"). They feed Prefect automations that mark a silent run crashed; a stage under DVC or make
    ends with its process, which its caller sees. Deployment runs (prefect.yaml) do not come through here and keep
    them."""
    if "prefect" not in sys.modules:
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    if "heartbeat_frequency" in get_current_settings().flows.model_fields_set:
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if Path("/proc/self/stat").exists():
            return False
        try:  # no /proc (macOS): ask the kernel, which counts a zombie as alive
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def follow_parent(poll_s: float = PARENT_POLL_S) -> None:
    """Stop this process (as if interrupted) when the process that started it dies, so that a killed ``dvc repro``
    leaves no stage writing into its outputs, nor a killed stage its workers. SIGTERM is made an interrupt, and a
    daemon thread watching the parent's pid (the kernel hands an orphan to another process) sends it, so both paths
    stop the workers and say so. Only from the main thread (signal handlers live there)."""
    global _FOLLOWING
    if _FOLLOWING or threading.current_thread() is not threading.main_thread():
        return
    _FOLLOWING = True
    signal.signal(signal.SIGTERM, _interrupt)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        # SIGTERM, whose handler is installed above: SIGINT may be ignored (a stage started from a background
        # job of a non-interactive shell inherits SIG_IGN for it, and Python then installs no handler).
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="follow-parent", daemon=True).start()


class _NoUsageTracebacks(logging.Filter):
    """Drop the traceback from a log record about a usage error (bad params or inputs): Prefect logs one for every
    failed task and flow, and the stage's own one-line error already says what to fix."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], USAGE_ERRORS):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_usage_tracebacks() -> None:
    """Install :class:`_NoUsageTracebacks` on the handlers of Prefect's and the root logger (once)."""
    for logger in (logging.getLogger("prefect"), logging.getLogger()):
        for handler in logger.handlers:
            if not any(isinstance(f, _NoUsageTracebacks) for f in handler.filters):
                handler.addFilter(_NoUsageTracebacks())


def exit_fast(status: int) -> NoReturn:
    """End a stage process with ``status`` as a normal exit would, minus the interpreter's teardown.

    The thread shutdown of a normal exit runs (its hooks, then a join of the non-daemon threads), the exit
    handlers run (Prefect's log shipping, logging's flush, multiprocessing's), the standard streams are flushed;
    then the process ends without freeing every module one by one, which took 1.6 s after the last exit handler
    in a train stage that had imported torch, Prefect and MLflow (measured 2026-12-04), 25 times per demo. Files
    the stage wrote are closed by then (``with`` blocks, atomic writes).
    """
    # A stage that hangs here says where: every thread's stack on stderr after EXIT_STACKS_AFTER_S.
    faulthandler.dump_traceback_later(EXIT_STACKS_AFTER_S, exit=False)
    try:
        # What the interpreter's own exit does first: the thread-exit hooks (they tell the idle workers of every
        # concurrent.futures executor nobody shut down to stop), then a join of every non-daemon thread. Joining
        # without the hooks waited on such workers until the garbage collector freed their executor (the report
        # stage: 129 s once, for ever another time).
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        faulthandler.cancel_dump_traceback_later()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)


def run_main(stage: str, work: Callable[[], int], *, debug: bool = False, lifeline: bool = True) -> int:
    """Run a stage's ``work`` with the error policy of the module docstring; returns the exit status. With
    ``lifeline`` the stage stops when its parent dies (:func:`follow_parent`)."""
    debug = debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if lifeline:
        follow_parent()
    if not debug:
        quiet_usage_tracebacks()
    try:
        wait_for_prefect_server()
        with without_default_heartbeats():
            return work()
    except KeyboardInterrupt:
        stop_children()
        print(f"{stage}: interrupted", file=sys.stderr)
        return 130
    except USAGE_ERRORS as err:
        status = 2
        message = str(err)
    except StageFailed as err:
        print(f"{stage}: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - the run failed; say what, in one line
        status = 1
        message = f"{type(err).__name__}: {err}"
    if debug:
        traceback.print_exc()
    elif status == 1:
        message += f" (rerun with --debug or {DEBUG_ENV}=1 for the traceback)"
    print(f"{stage}: error: {message}", file=sys.stderr)
    return status


# --------------------------------------------------------------------------------------------------------
# Prefect task policy


def retry_on_io_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only for I/O trouble (disk full, a network filesystem or server
    hiccup: ``OSError``), never for a bug or bad input, which would fail the same way again."""
    try:
        state.result()
    except FileNotFoundError:  # a missing input stays missing
        return False
    except OSError:
        return True
    except BaseException:  # noqa: BLE001 - anything else fails the task at once
        return False
    return False


# Keyword arguments of @task for the tasks that read or write files.
IO_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": 2, "retry_condition_fn": retry_on_io_error}


def require_files(*paths: str | Path, stage: str) -> None:
    """``FileNotFoundError`` for the first missing file, saying which stage writes it."""
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file; run the {stage} stage first (dvc repro {stage})")
