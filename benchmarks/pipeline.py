"""Pipeline orchestration: how much of ``dvc repro`` is stage work, the no-op repro, what a param change reruns.

    python benchmarks/pipeline.py [--skip-full] [--keep-persistent] [--dvc-args "..."] [--repeats 3]
                                  [--param models.gru.hidden_size] [--log FILE] [--docs docs/benchmarks.md]

Run it from the root of the repository to measure, with the project's interpreter (``.venv/bin/python``: its
``bin/`` goes first on PATH, as ``make demo`` does), after ``make data``. Everything is measured from outside the
stage code: process starts and ends, and the Prefect server's own records of the flow and task runs. In one run:

1. **Full repro** (skipped with ``--skip-full``): ``scripts/with-prefect-server dvc repro -f`` (forced: every
   stage runs; ``--dvc-args`` are appended). The persistent outputs of the stages it will run (the trainings'
   ``last.pt``/``best.pt``) are removed first, unless ``--keep-persistent``: a training finds a finished
   ``last.pt`` and resumes past its last epoch, so without this a forced repro of a repository that already
   ran would time trainings that do not train. Meanwhile this script watches /proc for every ``python -m
   pipelines.…`` process (the stage processes and the seed workers they start): its start (/proc) and its end
   (a pidfd). After the repro it reads the flow and task runs of that time window from the Prefect server's
   database (the same ``$PREFECT_HOME``, default ``.prefect/``, through a temporary server, or
   ``$PREFECT_API_URL`` when that is set).

   **Work** is the wall-clock union of the Prefect task runs not tagged ``orchestration`` (the MLflow
   bookkeeping tasks are), a union because a stage's seed tasks run in parallel. A task that starts a worker process
   (a seed) counts as work only from the worker's start plus its start-up (interpreter start and imports, timed
   after the repro as the best of three ``python -m <worker module> --help``: an estimate) to the worker's last
   output line (Prefect's log record of it); the rest of that task (waiting for a slot, spawning, the worker's
   start-up and interpreter exit, reaping it) is orchestration. So is everything outside task runs: code in a
   flow's body between tasks counts as orchestration even where it is library work, and a stage with no flow
   (``check_params``) is orchestration as a whole. Orchestration share = (wall − work) / wall, target ≤ 20% (on
   the way to 5%); the wall time includes starting and stopping the shared Prefect server, as ``make demo``.

   DVC runs one stage at a time, so the wall time splits exactly into: the server's start (until
   scripts/with-prefect-server starts it beside DVC; a stage's wait for it is in that stage's start-up), DVC's
   start-up (until the first stage process starts), then per stage process *start-up* (process start to its flow
   run's start: interpreter start, imports, arguments and params, the flow run's creation), *in the flow* (its flow
   run, split into work and the rest: the Prefect task engine, flow-body code, orchestration tasks, seed workers'
   start-up and exit), *exit* (flow run end to process end: the stage's last lines and interpreter exit) and *DVC
   after the stage* (until the next stage process starts: hashing and caching the outputs, rewriting dvc.lock,
   checking and spawning the next stage), and finally the server's stop (after DVC's last line).
2. **No-op repro**: with everything up to date (``dvc status`` clean; else this part is skipped and says
   why), ``dvc repro`` (every stage, the study's included) and, with ``--dvc-args``, ``dvc repro <dvc-args>``
   (``make demo``'s: ``report``), each alone and through ``scripts/with-prefect-server``, ``--repeats`` times each,
   interleaved; best and median. A no-op starts no stage process, so plain ``dvc repro`` is DVC alone (load the
   pipeline, check every stage's dependencies and outputs) and the wrapper adds the Prefect server's start and
   stop that ``make demo`` pays even when nothing runs. Target ≤ 1.5 s for each.
3. **Param change**: ``--param`` (an integer under ``models.<model>``) + 1 in params.yaml, then ``dvc status``
   (the stages whose recorded params or dependencies differ) and ``dvc repro --dry --downstream
   --force-downstream`` on those (they and everything downstream of them: a retrained checkpoint changes
   every downstream input), except below ``check_params``, whose output is the same bytes for every valid params
   file; params.yaml is then restored byte for byte, whatever happens. Expected: exactly ``check_params``,
   ``train@*-<model>`` and ``report``.

params.yaml and dvc.lock are left as they were, except that the forced repro rewrites dvc.lock (and the stage
outputs, and adds MLflow and Prefect runs) as a normal ``dvc repro`` would. Results are printed as markdown and,
after a full run, replace the "## Pipeline orchestration" section of ``--docs``. Linux only (/proc, pidfd).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import platform
import re
import select
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from seqvision.io import replace_markdown_section

HEADING = "## Pipeline orchestration"
TARGET_SHARE = 0.20  # issue #10: <= 20% now, on the way to 5%
TARGET_NOOP_S = 1.5
ORCHESTRATION_TAG = "orchestration"  # Prefect tasks that are bookkeeping, not work (pipelines/train.py)
SAME_OUTPUT_STAGES = ("check_params",)  # same output bytes for every valid params file: nothing reruns below them
# What scripts/with-prefect-server prints as it starts the server beside the command (the first stage that runs a
# flow waits for it: that wait is in the stage's start-up).
SERVER_READY = "Prefect server for this run:"
RUNNING = re.compile(r"^Running stage '([^']+)'")
BIN = Path(sys.executable).parent

Interval = tuple[float, float]


# --------------------------------------------------------------------------------------------------------
# running commands


def command_env(**extra: str) -> dict[str, str]:
    """What ``make demo`` exports: the interpreter's bin/ first on PATH (dvc.yaml calls ``python``), no
    telemetry, unbuffered stage output."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHON", sys.executable)  # scripts/with-prefect-server starts the server with it
    for key, value in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                       ("DO_NOT_TRACK", "1"), ("PYTHONUNBUFFERED", "1")):
        env.setdefault(key, value)
    return {**env, **extra}


def dvc(*args: str) -> list[str]:
    return [str(BIN / "dvc"), *args]


def run_quiet(command: Sequence[str], *, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(command), capture_output=True, text=True, env=command_env(), timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}:\n{proc.stdout[-2000:]}"
                           f"{proc.stderr[-2000:]}")
    return proc


@dataclasses.dataclass
class Streamed:
    """A command's exit status, its wall time and the moments of the lines we care about (Unix time)."""

    returncode: int
    started_at: float
    ended_at: float
    server_ready_at: float | None
    last_line_at: float
    stage_lines: list[tuple[str, float]]  # ("train@activity-gru", when its "Running stage" line came)


def stream(command: Sequence[str], *, env: dict[str, str], log: Path,
           started: Callable[[int], object] | None = None) -> Streamed:
    """Run ``command`` with stdout and stderr merged into ``log``, timestamping each line as it arrives (stage
    processes inherit DVC's output, so their lines come through too); ``started`` gets its pid."""
    stage_lines: list[tuple[str, float]] = []
    server_ready_at = None
    started_at = time.time()
    last_line_at = started_at
    with log.open("w", encoding="utf-8") as sink, subprocess.Popen(
        list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        errors="replace",
    ) as proc:
        if started is not None:
            started(proc.pid)
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.time()
            sink.write(line)
            last_line_at = now
            if server_ready_at is None and line.startswith(SERVER_READY):
                server_ready_at = now
            match = RUNNING.match(line)
            if match:
                stage_lines.append((match.group(1), now))
        returncode = proc.wait()
    return Streamed(returncode, started_at, time.time(), server_ready_at, last_line_at, stage_lines)


@dataclasses.dataclass(frozen=True)
class Proc:
    """One ``python -m pipelines.…`` process as seen from outside (Unix times)."""

    pid: int
    ppid: int
    argv: tuple[str, ...]
    started_at: float  # /proc/<pid>/stat starttime (10 ms ticks)
    ended_at: float | None  # its pidfd became readable; None: still running when the watch stopped

    @property
    def module(self) -> str:
        return next((b for a, b in itertools.pairwise(self.argv) if a == "-m"), "?")


def boot_offset() -> float:
    """Unix time of boot, to 1 ms: /proc's start times count from boot (CLOCK_BOOTTIME; /proc/stat's btime is
    whole seconds only)."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def parent_pid(pid: int) -> int | None:
    """``pid``'s parent (/proc), None when it is gone."""
    try:
        # After the command, which may hold spaces and parentheses: state, ppid, ...
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


class ProcessWatcher:
    """Every ``python -m pipelines.…`` process that descends from process ``root`` (set by :meth:`follow`: the
    stage processes and the workers they start; not those of other jobs on the machine): when it started (/proc)
    and when it really ended (a pidfd becomes readable the moment its process exits). New processes are found by
    scanning /proc every ``interval`` seconds (stage processes live for seconds, so none is missed)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.procs: dict[int, Proc] = {}
        self._root: int | None = None
        self._interval = interval
        self._boot = boot_offset()
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._fds: dict[int, int] = {}  # pidfd -> pid
        self._checked: dict[int, float] = {}  # pid -> first seen; re-read for a moment, until the shell execs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-watcher", daemon=True)

    def __enter__(self) -> ProcessWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def follow(self, root: int) -> None:
        self._root = root

    @staticmethod
    def _is_ours(argv: list[str]) -> bool:
        return any(a == "-m" and b.startswith("pipelines.") for a, b in itertools.pairwise(argv))

    def _descends(self, pid: int) -> bool:
        seen = 0
        while pid > 1 and seen < 64:
            if pid == self._root:
                return True
            pid = parent_pid(pid) or 0
            seen += 1
        return False

    def _scan(self) -> None:
        if self._root is None:
            return
        now = time.monotonic()
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            first_seen = self._checked.setdefault(pid, now)
            if first_seen < 0 or now - first_seen > 2.0:  # watched or rejected already, or long past its exec
                continue
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if not self._is_ours(argv):
                continue
            parent = self.procs.get(int(fields[1]))
            if parent is not None and parent.argv == tuple(a for a in argv if a):
                continue  # a fork of a stage process, not yet exec'd (a subprocess starting): look again later
            if not self._descends(pid):
                self._checked[pid] = -1.0  # another job's
                continue
            try:
                fd = os.pidfd_open(pid)
            except OSError:  # gone already
                continue
            self._fds[fd] = pid
            self._checked[pid] = -1.0
            self.procs[pid] = Proc(pid=pid, ppid=int(fields[1]), argv=tuple(a for a in argv if a),
                                   started_at=self._boot + int(fields[19]) / self._ticks, ended_at=None)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._scan()
            ready, _, _ = select.select(list(self._fds), [], [], self._interval)
            now = time.time()
            for fd in ready:
                pid = self._fds.pop(fd)
                self.procs[pid] = dataclasses.replace(self.procs[pid], ended_at=now)
                os.close(fd)


# --------------------------------------------------------------------------------------------------------
# Prefect's records


@dataclasses.dataclass(frozen=True)
class FlowRunRecord:
    id: str
    name: str
    started_at: float
    ended_at: float


@dataclasses.dataclass(frozen=True)
class TaskRunRecord:
    id: str
    name: str
    flow_run_id: str | None
    started_at: float
    ended_at: float
    tags: tuple[str, ...] = ()
    last_line_at: float | None = None  # its last log record (read only for tasks that started a worker)

    @property
    def is_work(self) -> bool:
        return ORCHESTRATION_TAG not in self.tags


@dataclasses.dataclass(frozen=True)
class PrefectRecords:
    flows: list[FlowRunRecord]
    tasks: list[TaskRunRecord]
    unfinished: int  # task or flow runs of the window without a start or an end time (not counted)


@contextlib.contextmanager
def prefect_client() -> Iterator[Any]:
    """A client of the server scripts/with-prefect-server ran: ``$PREFECT_API_URL`` when set (the wrapper then
    used it), else a temporary server on the same database (``$PREFECT_HOME``, default ``.prefect/`` here)."""
    saved = dict(os.environ)
    if not os.environ.get("PREFECT_API_URL"):
        os.environ["PREFECT_HOME"] = os.environ.get("PREFECT_HOME") or str(Path(".prefect").resolve())
        os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "true"
        # A busy 2-core machine takes ~20 s to start it: Prefect's default timeout.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        # Imported here only: Prefect is slow to import, and it reads these settings when it is.
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            yield client
    finally:
        os.environ.clear()
        os.environ.update(saved)


def read_runs(client: Any, since: float, until: float, page: int = 200) -> PrefectRecords:
    """The flow and task runs that started between ``since`` and ``until`` (Unix times)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterStartTime, TaskRunFilter, TaskRunFilterStartTime,
    )

    window = {"after_": datetime.datetime.fromtimestamp(since, datetime.timezone.utc),
              "before_": datetime.datetime.fromtimestamp(until, datetime.timezone.utc)}

    def every(read: Callable[..., list[Any]], **filters: Any) -> list[Any]:
        rows: list[Any] = []
        while len(batch := read(**filters, limit=page, offset=len(rows))) == page:
            rows += batch
        return rows + batch

    flow_runs = every(client.read_flow_runs, flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(**window)))
    task_runs = every(client.read_task_runs, task_run_filter=TaskRunFilter(start_time=TaskRunFilterStartTime(**window)))
    finished = [r for r in [*flow_runs, *task_runs] if r.start_time is not None and r.end_time is not None]
    return PrefectRecords(
        flows=[FlowRunRecord(str(r.id), r.name, r.start_time.timestamp(), r.end_time.timestamp())
               for r in flow_runs if r in finished],
        tasks=[TaskRunRecord(str(r.id), r.name, None if r.flow_run_id is None else str(r.flow_run_id),
                             r.start_time.timestamp(), r.end_time.timestamp(), tuple(r.tags))
               for r in task_runs if r in finished],
        unfinished=len(flow_runs) + len(task_runs) - len(finished),
    )


def read_last_lines(client: Any, tasks: list[TaskRunRecord], workers: dict[str, Proc]) -> list[TaskRunRecord]:
    """``tasks`` with the time of each one's last log record before its worker (``workers``: by task id) ended:
    a seed task logs every line of its worker as it comes, and Prefect's own "Finished" record after it."""
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId, LogFilterTimestamp
    from prefect.client.schemas.sorting import LogSort

    out = []
    for t in tasks:
        ended = workers[t.id].ended_at
        assert ended is not None
        logs = client.read_logs(
            log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[t.id]), timestamp=LogFilterTimestamp(
                before_=datetime.datetime.fromtimestamp(ended, datetime.timezone.utc))),
            limit=1, sort=LogSort.TIMESTAMP_DESC)
        out.append(dataclasses.replace(t, last_line_at=logs[0].timestamp.timestamp() if logs else None))
    return out


def time_startup(module: str, repeats: int = 3) -> float | None:
    """Best of ``repeats`` ``python -m <module> --help`` (interpreter start, the module's imports, argument
    parsing, interpreter exit): what a worker process costs before and after its own work. None: it failed."""
    best = None
    for _ in range(repeats):
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", module, "--help"], env=command_env(), capture_output=True,
                              check=False)
        if proc.returncode != 0:
            return None
        seconds = time.perf_counter() - started
        best = seconds if best is None else min(best, seconds)
    return best


# --------------------------------------------------------------------------------------------------------
# 1. the full repro: attribution (pure functions of the records above)


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """The union of ``intervals`` as sorted, disjoint intervals (empty ones dropped)."""
    merged: list[Interval] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def union_s(intervals: Iterable[Interval]) -> float:
    """Seconds covered by at least one of ``intervals`` (overlaps counted once)."""
    return sum(end - start for start, end in merge(intervals))


def clip(interval: Interval, start: float, end: float) -> Interval:
    return max(interval[0], start), min(interval[1], end)


def worker_of(tasks: list[TaskRunRecord], workers: list[Proc], slack: float = 0.5) -> dict[str, Proc]:
    """Which task started which worker: a task's run holds its worker's whole life (``slack`` seconds for
    Prefect's and the pidfd's timestamps), and ends right after it (the task waits for the worker, then reports).
    Pairs are matched tightest end first, so seed tasks that wait for a free slot get the right worker."""
    pairs = sorted((t.ended_at - w.ended_at, i, j) for i, t in enumerate(tasks) for j, w in enumerate(workers)
                   if w.ended_at is not None and t.started_at - slack <= w.started_at
                   and w.ended_at <= t.ended_at + slack)
    matched: dict[str, Proc] = {}
    used: set[int] = set()
    for _, i, j in pairs:
        if tasks[i].id not in matched and j not in used:
            matched[tasks[i].id] = workers[j]
            used.add(j)
    return matched


def work_interval(t: TaskRunRecord, worker: Proc | None, startup_s: float) -> Interval:
    """The part of task run ``t`` that is work: all of it, or, when it started ``worker``, from the worker's
    start plus its start-up to the worker's last output line (else the task's end)."""
    if worker is None:
        return t.started_at, t.ended_at
    end = t.ended_at if t.last_line_at is None else min(t.ended_at, t.last_line_at)
    return max(t.started_at, worker.started_at + startup_s), end


@dataclasses.dataclass(frozen=True)
class StageRun:
    """One stage process (seconds, except the Unix times ``started_at`` / ``ended_at``)."""

    stage: str
    kind: str
    started_at: float
    ended_at: float
    startup_s: float  # process start to its flow run's start (the whole process when it runs no flow)
    flow_s: float  # its flow run(s), start of the first to the end of the last
    work_s: float  # the union of its work intervals
    exit_s: float  # flow run end to process end
    between_s: float = 0.0  # process end to the next stage process's start (or to DVC's last line)
    tasks: int = 0
    workers: int = 0  # worker processes it started (seeds)
    worker_tail_s: float = 0.0  # Σ over them: their last output line to their task's end
    workers_without_line: int = 0  # workers whose task has no log record (their work runs to the task's end)

    @property
    def total_s(self) -> float:
        return self.startup_s + self.flow_s + self.exit_s + self.between_s


def stage_kind(stage: str) -> str:
    """``train@activity-gru`` -> ``train``."""
    return stage.split("@", 1)[0]


def name_processes(stage_procs: list[Proc], stage_lines: list[tuple[str, float]], slack: float = 1.0,
                   modules: Mapping[str, str] | None = None) -> list[str]:
    """Each stage process's DVC stage: the last "Running stage" line before it started (``slack``: our reader
    may see a line a little after DVC wrote it) of a stage that runs the process's module (``modules``:
    {stage: module}, when known; a short stage such as check_params can end less than ``slack`` before the next
    stage's line)."""
    modules = modules or {}
    names = []
    for p in stage_procs:
        before = [name for name, at in stage_lines if at <= p.started_at + slack
                  and modules.get(name, p.module) == p.module]
        names.append(before[-1] if before else p.module)
    return names


def stage_modules() -> dict[str, str]:
    """{stage: the module its command runs with ``python -m``} for every stage of dvc.yaml."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        found = {stage.addressing: shlex.split(stage.cmd) for stage in repo.index.stages if getattr(stage, "cmd", None)}
    return {name: argv[2] for name, argv in found.items() if argv[:2] == ["python", "-m"] and len(argv) > 2}


def attribute(procs: list[Proc], records: PrefectRecords, *, startup_s: dict[str, float],
              stage_lines: list[tuple[str, float]], last_line_at: float,
              modules: Mapping[str, str] | None = None) -> list[StageRun]:
    """Split each stage process's life (``procs``: stage processes and their workers) with the flow and task
    runs it ran. ``startup_s``: a worker module's start-up (:func:`time_startup`); ``last_line_at``: DVC's last
    output line, where the last stage's *DVC after* ends."""
    watched = {p.pid for p in procs}
    stage_procs = sorted((p for p in procs if p.ppid not in watched and p.ended_at is not None),
                         key=lambda p: p.started_at)
    runs = []
    for p, name in zip(stage_procs, name_processes(stage_procs, stage_lines, modules=modules), strict=True):
        assert p.ended_at is not None
        flows = [f for f in records.flows if p.started_at <= f.started_at <= p.ended_at]
        ids = {f.id for f in flows}
        tasks = [t for t in records.tasks if t.flow_run_id in ids]
        workers = [w for w in procs if w.ppid == p.pid]
        started_by = worker_of([t for t in tasks if t.is_work], workers)
        work = []
        for t in tasks:
            if t.is_work:
                worker = started_by.get(t.id)
                startup = 0.0 if worker is None else startup_s.get(worker.module, 0.0)
                work.append(clip(work_interval(t, worker, startup), p.started_at, p.ended_at))
        flow_start = min((f.started_at for f in flows), default=p.ended_at)
        flow_end = max((f.ended_at for f in flows), default=p.ended_at)
        spawning = [t for t in tasks if t.id in started_by]
        runs.append(StageRun(
            stage=name, kind=stage_kind(name), started_at=p.started_at, ended_at=p.ended_at,
            startup_s=flow_start - p.started_at, flow_s=flow_end - flow_start, work_s=union_s(work),
            exit_s=p.ended_at - flow_end, tasks=len(tasks), workers=len(workers),
            worker_tail_s=sum(t.ended_at - t.last_line_at for t in spawning if t.last_line_at is not None),
            workers_without_line=sum(t.last_line_at is None for t in spawning)))
    next_starts = [r.started_at for r in runs[1:]] + [last_line_at]
    return [dataclasses.replace(r, between_s=nxt - r.ended_at) for r, nxt in zip(runs, next_starts)]


@dataclasses.dataclass(frozen=True)
class FullRun:
    """The forced repro; its wall time is the sum of: server start, DVC start-up, Σ total_s of the stage processes
    in the order they ran, and the server's stop after DVC's last line."""

    command: str
    removed: int  # persistent outputs removed first, so that every training trains from epoch 0
    wall_s: float
    server_start_s: float | None  # None: PREFECT_API_URL was set, no server started
    dvc_start_s: float  # from the server being ready (or the start) to the first stage process's start
    server_stop_s: float  # from DVC's last line to the command's end
    stages: list[StageRun]
    missing: list[str]  # stages DVC ran whose process was not seen
    worker_startup_s: dict[str, float]  # per worker module: the start-up counted as orchestration
    unfinished: int  # Prefect runs without a start or end time
    log: Path

    @property
    def work_s(self) -> float:
        return sum(s.work_s for s in self.stages)

    @property
    def share(self) -> float:
        return (self.wall_s - self.work_s) / self.wall_s


def analyse(streamed: Streamed, procs: list[Proc], records: PrefectRecords, *, startup_s: dict[str, float],
            command: str, log: Path, removed: int = 0, modules: Mapping[str, str] | None = None) -> FullRun:
    stages = attribute(procs, records, startup_s=startup_s, stage_lines=streamed.stage_lines,
                       last_line_at=streamed.last_line_at, modules=modules)
    ready = streamed.server_ready_at
    first = stages[0].started_at if stages else streamed.last_line_at
    seen = {s.stage for s in stages}
    return FullRun(
        command=command,
        removed=removed,
        wall_s=streamed.ended_at - streamed.started_at,
        server_start_s=None if ready is None else ready - streamed.started_at,
        dvc_start_s=first - (ready if ready is not None else streamed.started_at),
        server_stop_s=streamed.ended_at - streamed.last_line_at,
        stages=stages,
        missing=[name for name, _ in streamed.stage_lines if name not in seen],
        worker_startup_s=startup_s,
        unfinished=records.unfinished,
        log=log,
    )


def remove_persistent_outputs(dvc_args: list[str]) -> list[Path]:
    """Remove the ``persist: true`` outputs of the stages ``dvc repro -f <dvc_args>`` will run (from its dry run),
    so they start as on a fresh clone; DVC keeps them in its cache. Returns what was removed."""
    # Imported here only: DVC's API is slow to import, and the rest of this script uses its command line.
    from dvc.repo import Repo

    proc = run_quiet(dvc("repro", "-f", "--dry", *dvc_args))
    planned = {m.group(1) for m in map(RUNNING.match, proc.stdout.splitlines()) if m}
    with Repo(".") as repo:
        paths = [Path(out.fs_path) for stage in repo.index.stages if stage.addressing in planned
                 for out in stage.outs if out.persist]
    removed = []
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed


def run_full(dvc_args: list[str], *, log: Path, keep_persistent: bool = False) -> FullRun:
    command = ["scripts/with-prefect-server", *dvc("repro", "-f"), *dvc_args]
    shown = " ".join(["scripts/with-prefect-server dvc repro -f", *map(shlex.quote, dvc_args)])
    removed = [] if keep_persistent else remove_persistent_outputs(dvc_args)
    with ProcessWatcher() as watcher:
        streamed = stream(command, env=command_env(), log=log, started=watcher.follow)
    if streamed.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise RuntimeError(f"{shown} exited with {streamed.returncode}; the log's end ({log}):\n{tail}")
    procs = list(watcher.procs.values())
    print("reading the flow and task runs from Prefect", file=sys.stderr, flush=True)
    with prefect_client() as client:
        records = read_runs(client, streamed.started_at, streamed.ended_at)
        # Only the tasks that started a worker need their last log line.
        stage_pids = {p.pid for p in procs}
        spawned = [p for p in procs if p.ppid in stage_pids]
        spawning = worker_of([t for t in records.tasks if t.is_work], spawned)
        tasks = read_last_lines(client, [t for t in records.tasks if t.id in spawning], spawning)
        records = dataclasses.replace(records, tasks=[t for t in records.tasks if t.id not in spawning] + tasks)
    modules = sorted({p.module for p in spawned})
    print(f"timing the start-up of {', '.join(modules) or 'no worker module'}", file=sys.stderr, flush=True)
    startup = {m: s for m in modules if (s := time_startup(m)) is not None}
    raw = {"procs": [dataclasses.asdict(p) for p in procs], "flows": [dataclasses.asdict(f) for f in records.flows],
           "tasks": [dataclasses.asdict(t) for t in records.tasks], "unfinished": records.unfinished,
           "worker_startup_s": startup, "streamed": dataclasses.asdict(streamed)}
    log.with_name(log.name + ".records.json").write_text(json.dumps(raw, indent=1), encoding="utf-8")
    return analyse(streamed, procs, records, startup_s=startup, command=shown, log=log, removed=len(removed),
                   modules=stage_modules())


# --------------------------------------------------------------------------------------------------------
# 2. the no-op repro


@dataclasses.dataclass(frozen=True)
class NoopRun:
    label: str
    seconds: list[float]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def out_of_date() -> dict[str, Any]:
    """``dvc status``: {stage: what changed} for every stage that is not up to date."""
    return json.loads(run_quiet(dvc("status", "--json")).stdout or "{}")


def time_noop(repeats: int, dvc_args: Sequence[str] = ()) -> list[NoopRun]:
    """``dvc repro`` (every stage) and, with ``dvc_args``, ``dvc repro <dvc_args>`` (``make demo``'s), each alone and
    through scripts/with-prefect-server, ``repeats`` times, interleaved."""
    targets = [[], list(dvc_args)] if dvc_args else [[]]
    commands = {}
    for args in targets:
        shown = " ".join(["dvc repro", *map(shlex.quote, args)])
        commands[f"`{shown}`"] = dvc("repro", *args)
        commands[f"`scripts/with-prefect-server {shown}`"] = ["scripts/with-prefect-server", *dvc("repro", *args)]
    seconds: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(repeats):  # interleaved, so background load hits both alike
        for label, command in commands.items():
            started = time.perf_counter()
            proc = run_quiet(command)
            seconds[label].append(time.perf_counter() - started)
            ran = [m.group(1) for m in map(RUNNING.match, (proc.stdout + proc.stderr).splitlines()) if m]
            if ran:
                raise RuntimeError(f"{label} was not a no-op: it ran {', '.join(ran)}")
    return [NoopRun(label, values) for label, values in seconds.items()]


# --------------------------------------------------------------------------------------------------------
# 3. what one param change reruns


@dataclasses.dataclass(frozen=True)
class ParamChange:
    param: str
    old: int
    new: int
    changed: list[str]  # dvc status: stages whose recorded params/deps now differ
    would_run: list[str]  # dvc repro --dry --downstream --force-downstream on those
    expected: list[str]
    # Stages out of date before the change. One that DVC never ran (no dvc.lock entry) is reported the same
    # before and after, so it cannot be told apart: the check is conclusive only when this is empty.
    already_out_of_date: list[str]

    @property
    def ok(self) -> bool:
        return set(self.would_run) == set(self.expected)


def bump_integer(text: str, path: Sequence[str], delta: int = 1) -> tuple[str, int, int]:
    """``text`` (block-style YAML) with the integer at ``path`` increased by ``delta``, every other byte kept
    (a YAML dump would re-quote values and could change what DVC reads). Returns (text, old, new)."""
    lines = text.splitlines(keepends=True)
    stack: list[tuple[int, str]] = []  # (indent, key) of the mappings we are inside
    key_line = re.compile(r"^(\s*)([A-Za-z0-9_.-]+):(\s*)([^#\n]*?)(\s*(#.*)?)$")
    for i, line in enumerate(lines):
        match = key_line.match(line.rstrip("\n"))
        if not match or line.lstrip().startswith("#"):
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if [k for _, k in stack] + [key] == list(path):
            old = int(match.group(4))
            new = old + delta
            end = "\n" if line.endswith("\n") else ""
            lines[i] = f"{match.group(1)}{key}:{match.group(3)}{new}{match.group(5)}{end}"
            return "".join(lines), old, new
        stack.append((indent, key))
    raise KeyError(f"params.yaml: no {'.'.join(path)}")


def expected_reruns(stages: list[str], model: str, whole_models: Sequence[str] = ()) -> list[str]:
    """The stages a change of ``models.<model>`` should rerun: :data:`SAME_OUTPUT_STAGES`, that family's trainings,
    the report, and ``whole_models`` (stages that read the whole ``models`` section: the study rows that train every
    family) with, when there are any, the study report drawn from them."""
    expected = {s for s in stages if s in ("report", *SAME_OUTPUT_STAGES)
                or (stage_kind(s) == "train" and s.endswith(f"-{model}"))}
    expected |= set(whole_models)
    if whole_models and "study_report" in stages:
        expected.add("study_report")
    return sorted(expected)


def stages_reading(section: str) -> list[str]:
    """The stages whose dvc.yaml ``params`` list ``section`` as a whole (``models``, not ``models.gru``)."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        return sorted(stage.addressing for stage in repo.index.stages for dep in stage.deps
                      if section in (getattr(dep, "params", None) or ()))


def would_rerun(changed: list[str]) -> list[str]:
    """What ``dvc repro`` reruns after a change that makes ``changed`` out of date: they and everything downstream
    of them (a new checkpoint changes every input below it), except below the :data:`SAME_OUTPUT_STAGES`."""
    forced = [s for s in changed if s not in SAME_OUTPUT_STAGES]
    ran = {s for s in changed if s in SAME_OUTPUT_STAGES}
    if forced:
        proc = run_quiet(dvc("repro", "--dry", "--downstream", "--force-downstream", *forced))
        ran |= {m.group(1) for m in map(RUNNING.match, proc.stdout.splitlines()) if m}
    return sorted(ran)


def check_param_change(param: str, *, before: dict[str, Any], params_file: Path = Path("params.yaml")) -> ParamChange:
    """``before``: ``dvc status`` as it is now, so stages already out of date are told apart."""
    path = param.split(".")
    if len(path) != 3 or path[0] != "models":
        raise ValueError(f"--param must be models.<model>.<integer knob>, got {param!r}")
    original = params_file.read_bytes()
    try:
        text, old, new = bump_integer(original.decode("utf-8"), path)
        # The edit must change that one value and nothing else, as DVC (YAML 1.2) and yaml (1.1) both read it.
        was, now = yaml.safe_load(original), yaml.safe_load(text)
        now_value = now[path[0]][path[1]][path[2]]
        now[path[0]][path[1]][path[2]] = old
        if now != was or now_value != new:
            raise RuntimeError(f"editing {param} in {params_file} changed more than that value")
        params_file.write_text(text, encoding="utf-8")
        after = out_of_date()
        changed = sorted(s for s, why in after.items() if before.get(s) != why)
        would_run = would_rerun(changed)
    finally:
        params_file.write_bytes(original)
    stages = [line.split()[0] for line in run_quiet(dvc("stage", "list")).stdout.splitlines() if line.strip()]
    return ParamChange(param, old, new, changed, would_run, expected_reruns(stages, path[1], stages_reading("models")),
                       sorted(before))


# --------------------------------------------------------------------------------------------------------
# markdown


def full_markdown(run: FullRun) -> str:
    work, wall = run.work_s, run.wall_s
    startup = sum(s.startup_s for s in run.stages)
    in_flow = sum(s.flow_s for s in run.stages)
    exits = sum(s.exit_s for s in run.stages)
    between = sum(s.between_s for s in run.stages)
    verdict = "met" if run.share <= TARGET_SHARE else "MISSED"
    server = ("no Prefect server started (PREFECT_API_URL was set)" if run.server_start_s is None
              else f"Prefect server started beside DVC {run.server_start_s:.1f} s (the first stage's wait for it is in "
                   "its start-up)")
    removed = (f"{run.removed} persistent outputs (training checkpoints) were removed first, so every training ran "
               "from epoch 0, as on a fresh clone." if run.removed else
               "No persistent outputs were removed first (none there, or `--keep-persistent`).")
    lines = [
        (f"`{run.command}`: **{wall:.1f} s** wall for {len(run.stages)} stage processes, work {work:.1f} s: "
         f"**orchestration is {run.share:.1%} of the wall time** (target ≤ {TARGET_SHARE:.0%}: {verdict}). The "
         f"wall time = {server} + DVC start-up {run.dvc_start_s:.1f} s + stage start-up {startup:.1f} s + flow runs "
         f"{in_flow:.1f} s (work {work:.1f} s, the rest {in_flow - work:.1f} s) + stage exit {exits:.1f} s + DVC "
         f"after each stage {between:.1f} s + after DVC's last line (server stop) {run.server_stop_s:.1f} s. "
         f"{removed}"),
        "",
        ("| stage kind | stages | work | start-up (per stage) | in the flow, not work (per stage) | exit (per stage) "
         "| DVC after the stage (per stage) | total | orchestration share |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    kinds: dict[str, list[StageRun]] = {}
    for s in run.stages:
        kinds.setdefault(s.kind, []).append(s)

    def cell(total: float, count: int) -> str:
        return f"{total:,.1f} ({total / count:.2f})"

    def row(label: str, items: list[StageRun]) -> str:
        n = len(items)
        work_s = sum(s.work_s for s in items)
        total = sum(s.total_s for s in items)
        share = f"{(total - work_s) / total:.0%}" if total > 0 else "–"
        return (f"| {label} | {n} | {work_s:,.1f} | {cell(sum(s.startup_s for s in items), n)} | "
                f"{cell(sum(s.flow_s - s.work_s for s in items), n)} | {cell(sum(s.exit_s for s in items), n)} | "
                f"{cell(sum(s.between_s for s in items), n)} | {total:,.1f} | {share} |")

    for kind, items in kinds.items():
        lines.append(row(kind, items))
    if run.stages:
        lines.append(row("**all**", run.stages))
    notes = [
        ("Columns, per stage process (seconds): *work* = the union of its Prefect task runs not tagged "
         f"`{ORCHESTRATION_TAG}`, read from the Prefect server's records (a task that starts a worker process: from "
         "the worker's start plus its start-up to its last output line); *start-up* = process start (/proc) to its "
         "flow run's start (interpreter start, imports, arguments and params, creating the flow run); *in the flow, "
         "not work* = the rest of its flow run (Prefect's task engine, code in the flow between tasks, "
         f"`{ORCHESTRATION_TAG}` tasks such as MLflow runs, workers' start-up and exit); *exit* = flow run end to "
         "process end, seen through a pidfd (the stage's last lines, interpreter exit); *DVC after the stage* = from "
         "its end to the next stage process's start (DVC hashing and caching its outputs, rewriting dvc.lock, "
         "checking the next stage, spawning its shell and interpreter). A stage that runs no flow is all start-up.")
    ]
    workers = sum(s.workers for s in run.stages)
    if workers:
        startup_text = ", ".join(f"`python -m {m} --help` {v:.2f} s" for m, v in run.worker_startup_s.items())
        tail = sum(s.worker_tail_s for s in run.stages)
        notes.append(
            f"{workers} worker processes (the seeds): each one's start-up ({startup_text or 'not measured: 0 s'}, "
            "best of 3 after the repro: an estimate of interpreter start, imports and exit) and the "
            f"{tail:.1f} s in all from their last output lines to the ends of their tasks (interpreter exit, the "
            "stage reaping them) are in *in the flow, not work*.")
        unlined = sum(s.workers_without_line for s in run.stages)
        if unlined:
            notes.append(f"{unlined} worker(s) left no log record in Prefect: their work runs to their task's end.")
    if run.missing:
        notes.append(f"No process seen for {', '.join(run.missing)} (its time falls in *DVC after* the stage before).")
    if run.unfinished:
        notes.append(f"{run.unfinished} Prefect flow or task run(s) of the window have no start or end time (not "
                     "counted).")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


def noop_markdown(noop: list[NoopRun] | str) -> str:
    if isinstance(noop, str):
        return f"No-op `dvc repro`: not measured: {noop}\n"
    lines = [f"| no-op command | best | median | target ≤ {TARGET_NOOP_S:g} s (best) |", "|---|---:|---:|---|"]
    for n in noop:
        verdict = "met" if round(n.best, 2) <= TARGET_NOOP_S else "MISSED"  # judged at the precision shown
        lines.append(f"| {n.label} | {n.best:.2f} s | {n.median:.2f} s | {verdict} |")
    repeats = len(noop[0].seconds) if noop else 0
    server = ("PREFECT_API_URL was set, so the wrapper started no server and the rows differ only by noise"
              if os.environ.get("PREFECT_API_URL") else
              "starting and stopping the Prefect server (what `make demo` pays when nothing changed)")
    return ("\n".join(lines) + f"\n\n{repeats} interleaved repeats with every stage up to date: no stage process "
            f"starts, so a plain `dvc repro` row is DVC alone (loading the pipeline, checking every dependency and "
            f"output); the scripts/with-prefect-server rows add: {server}.\n")


def param_markdown(change: ParamChange | str) -> str:
    if isinstance(change, str):
        return f"Param change: not checked: {change}\n"
    if change.ok:
        verdict = "as expected"
    else:
        verdict = (f"expected {', '.join(change.expected)}; extra: "
                   f"{', '.join(sorted(set(change.would_run) - set(change.expected))) or 'none'}; missing: "
                   f"{', '.join(sorted(set(change.expected) - set(change.would_run))) or 'none'}")
        verdict = (f"**inconclusive** ({verdict}): {len(change.already_out_of_date)} stage(s) were out of date "
                   "before the change; run `dvc repro` first" if change.already_out_of_date
                   else f"**NOT as expected**: {verdict}")
    return (f"`{change.param}` {change.old} → {change.new}: `dvc status` lists {len(change.changed)} stage(s) "
            f"({', '.join(change.changed) or 'none'}); with everything downstream of them "
            f"(`dvc repro --dry --downstream --force-downstream`; none for {', '.join(SAME_OUTPUT_STAGES)}, whose "
            f"output does not change) {len(change.would_run)} would rerun: "
            f"{', '.join(change.would_run) or 'none'} — {verdict}. params.yaml restored byte for byte.\n")


def machine_line() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    try:
        version = run_quiet(dvc("--version")).stdout.strip()
    except (RuntimeError, OSError):
        version = "?"
    return (f"Machine: {platform.machine()}, {os.cpu_count()} CPUs visible, load average {load[0]:.2f} / "
            f"{load[1]:.2f} / {load[2]:.2f} (1/5/15 min) at the end; Python {platform.python_version()}, "
            f"DVC {version}.")


def update_docs(path: Path, markdown: str, argv: list[str]) -> None:
    """Replace (or append) only the "## Pipeline orchestration" section; other sections stay as they are."""
    command = " ".join(["python benchmarks/pipeline.py", *map(shlex.quote, argv)])
    section = (
        f"{HEADING}\n\n"
        f"Measured with `{command}` on the repository's own data and params; what each number means is in the "
        "script's docstring. Measured from outside the stage code: *work* is the wall-clock union of the "
        f"Prefect task runs not tagged `{ORCHESTRATION_TAG}` (parallel seeds counted once), from the Prefect "
        "server's own records; a seed task's worker process counts from its start plus its start-up (timed "
        "separately) to its last output line. Everything else (interpreter start and imports, Prefect's flow and "
        "task engine, code in a flow between its tasks, MLflow bookkeeping, interpreter exit, DVC between stages, "
        "the Prefect server) is orchestration. The machine is shared with other jobs and noisy: rerun before "
        "trusting a small difference.\n\n"
        f"{markdown}"
    )
    replace_markdown_section(path, HEADING, section)


# --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-full", action="store_true",
                        help="only the no-op repro and the param-change check (fast; the docs are not updated)")
    parser.add_argument("--dvc-args", default="", help="appended to the forced `dvc repro -f` (e.g. targets)")
    parser.add_argument("--keep-persistent", action="store_true",
                        help="keep the persistent outputs (training checkpoints): trainings then resume from them")
    parser.add_argument("--repeats", type=int, default=3, help="no-op repros of each kind (best and median)")
    parser.add_argument("--param", default="models.gru.hidden_size",
                        help="integer param increased by 1 for the rerun check (default: %(default)s)")
    parser.add_argument("--log", type=Path, default=None,
                        help="where the full repro's output goes, with the raw records (processes, Prefect flow and "
                             "task runs) in <log>.records.json "
                             "(default: a new file in the temp folder, kept)")
    parser.add_argument("--docs", default="docs/benchmarks.md", help="markdown file to update ('' for none)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if not (Path("dvc.yaml").is_file() and Path("scripts/with-prefect-server").is_file()):
        parser.error("run from the repository root (dvc.yaml and scripts/ not found here)")
    if not Path("data/annotations").is_dir():
        parser.error("data/ is missing: run `make data` first")
    if not args.skip_full and not (hasattr(os, "pidfd_open") and Path("/proc/self/stat").is_file()):
        parser.error("the full repro needs Linux's /proc and pidfds (kernel >= 5.3); --skip-full measures the rest")
    if not (BIN / "dvc").is_file():
        parser.error(f"{BIN / 'dvc'}: not found; run this with the project's interpreter (.venv/bin/python)")

    lock = Path("dvc.lock")
    parts = []
    if not args.skip_full:
        log = args.log
        if log is None:
            fd, name = tempfile.mkstemp(prefix="seqvision-pipeline-", suffix=".log")
            os.close(fd)
            log = Path(name)
        print(f"full repro: scripts/with-prefect-server dvc repro -f {args.dvc_args}".strip() + f" (log: {log})",
              file=sys.stderr, flush=True)
        full = run_full(shlex.split(args.dvc_args), log=log, keep_persistent=args.keep_persistent)
        parts.append(full_markdown(full))
    lock_before = lock.read_bytes() if lock.is_file() else None
    try:
        dirty = out_of_date()
        if dirty:
            noop: list[NoopRun] | str = (f"{len(dirty)} stage(s) not up to date ({', '.join(sorted(dirty)[:5])}"
                                         f"{', …' if len(dirty) > 5 else ''}); a repro would run them")
        else:
            print(f"no-op repro, {args.repeats} x 2", file=sys.stderr, flush=True)
            noop = time_noop(args.repeats, shlex.split(args.dvc_args))
        print(f"param change: {args.param}", file=sys.stderr, flush=True)
        try:
            change: ParamChange | str = check_param_change(args.param, before=dirty)
        except (RuntimeError, KeyError, ValueError) as err:
            change = str(err).splitlines()[0]
    finally:
        # Neither part may change the lock file; if DVC did, put it back (and say so).
        lock_after = lock.read_bytes() if lock.is_file() else None
        if lock_after != lock_before and lock_before is not None:
            lock.write_bytes(lock_before)
            print("warning: dvc.lock changed during the no-op/param checks; restored", file=sys.stderr)
    parts += [noop_markdown(noop), param_markdown(change)]
    markdown = "\n".join(parts) + "\n" + machine_line() + "\n"
    print(markdown)
    if args.docs and not args.skip_full:
        shown = list(sys.argv[1:] if argv is None else argv)
        if "--log" in shown[:-1]:  # where the log went is not part of the measurement
            del shown[shown.index("--log"):shown.index("--log") + 2]
        update_docs(Path(args.docs), markdown, [a for a in shown if not a.startswith("--log=")])
    return 0 if isinstance(change, ParamChange) and change.ok else 1


if __name__ == "__main__":
    sys.exit(main())
