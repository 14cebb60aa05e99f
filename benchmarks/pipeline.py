"""Pipeline orchestration: how much of ``dvc repro`` is stage work, the no-op repro, what a param change reruns.

    python benchmarks/pipeline.py [--skip-full] [--keep-persistent] [--dvc-args "..."] [--repeats 3]
                                  [--param models.gru.hidden_size] [--log FILE] [--docs docs/benchmarks.md]

Run it from the root of the repository to measure, with the project's interpreter (``.venv/bin/python``: its
``bin/`` goes first on PATH, as ``make demo`` does), after ``make data``. In one run:

1. **Full repro** (skipped with ``--skip-full``): ``scripts/with-prefect-server dvc repro -f`` (forced: every
   stage runs; ``--dvc-args`` are appended). The persistent outputs of the stages it will run (the trainings'
   ``last.pt``/``best.pt``) are removed first, unless ``--keep-persistent``: a training finds a finished
   ``last.pt`` and resumes past its last epoch, so without this a forced repro of a repository that already
   ran would time trainings that do not train. ``$SEQVISION_TIMINGS`` is set, so every stage process appends
   one line at exit (``pipelines/common.py``): its seconds of library *work* (the ``seqvision`` calls inside
   ``common.stage_work``) and its age (from process start, /proc). Meanwhile this script watches, through
   pidfds, the moment each stage process really ends. DVC runs one stage at a time, so the wall time splits
   exactly into: the Prefect server's start (until scripts/with-prefect-server says it is up), DVC's start-up
   (until the first stage process starts), then per stage process its age at the timing line (work + in-process
   overhead: interpreter start, imports, Prefect flow/task runs, MLflow), its interpreter exit after that line
   (module and object finalization), and DVC after it until the next stage process starts (hashing and caching
   the outputs, rewriting dvc.lock, checking the next stage, spawning it), and finally the server's stop.
   Orchestration share = (wall − Σ work) / wall, target ≤ 5%; the wall time includes starting and stopping
   the shared Prefect server, as ``make demo`` does.
2. **No-op repro**: with everything up to date (``dvc status`` clean; else this part is skipped and says
   why), ``dvc repro`` and ``scripts/with-prefect-server dvc repro``, ``--repeats`` times each, interleaved;
   best and median. A no-op starts no stage process, so the first is DVC alone (load the pipeline, check
   every stage's dependencies and outputs) and the second adds the Prefect server's start and stop that
   ``make demo`` pays even when nothing runs. Target ≤ 2 s.
3. **Param change**: ``--param`` (an integer under ``models.<model>``) + 1 in params.yaml, then ``dvc status``
   (the stages whose recorded params or dependencies differ) and ``dvc repro --dry --downstream
   --force-downstream`` on those (they and everything downstream of them: a retrained checkpoint changes
   every downstream input); params.yaml is then restored byte for byte, whatever happens. Expected:
   exactly ``train@*-<model>``, ``evaluate@*-<model>`` and ``report``.

params.yaml and dvc.lock are left as they were, except that the forced repro rewrites dvc.lock (and the stage
outputs, and adds MLflow runs) as a normal ``dvc repro`` would. Results are printed as markdown and, after a
full run, replace the "## Pipeline orchestration" section of ``--docs``. Linux only (/proc, pidfd).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from seqvision.io import replace_markdown_section

HEADING = "## Pipeline orchestration"
TARGET_SHARE = 0.05
TARGET_NOOP_S = 2.0
TIMINGS_ENV = "SEQVISION_TIMINGS"  # pipelines.common.TIMINGS_ENV (not imported: that would import Prefect)
SERVER_READY = "Prefect server for this run:"  # what scripts/with-prefect-server prints once the server answers
RUNNING = re.compile(r"^Running stage '([^']+)'")
BIN = Path(sys.executable).parent


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
    env.pop(TIMINGS_ENV, None)
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


def stream(command: Sequence[str], *, env: dict[str, str], log: Path) -> Streamed:
    """Run ``command`` with stdout and stderr merged into ``log``, timestamping each line as it arrives (stage
    processes inherit DVC's output, so their lines come through too)."""
    stage_lines: list[tuple[str, float]] = []
    server_ready_at = None
    started_at = time.time()
    last_line_at = started_at
    with log.open("w", encoding="utf-8") as sink, subprocess.Popen(
        list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        errors="replace",
    ) as proc:
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


class ExitWatcher:
    """When each stage process (``python -m pipelines.…``) really ends, seen from outside through a pidfd: its
    timing line is written by its last atexit handler, and the interpreter's finalization after that is
    invisible from inside. New processes are found by scanning /proc every ``interval`` seconds (stage processes
    live for seconds, so none is missed); a pidfd becomes readable the moment its process exits."""

    def __init__(self, interval: float = 0.2) -> None:
        self.available = hasattr(os, "pidfd_open") and Path("/proc/self/stat").is_file()
        self.exited: dict[int, float] = {}
        self._interval = interval
        self._fds: dict[int, int] = {}  # pidfd -> pid
        self._checked: dict[int, float] = {}  # pid -> first seen; re-read for a moment, until the shell execs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="exit-watcher", daemon=True)

    def __enter__(self) -> ExitWatcher:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.available:
            self._stop.set()
            self._thread.join(timeout=10)
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    @staticmethod
    def _is_stage(argv: list[bytes]) -> bool:
        return any(a == b"-m" and b.startswith(b"pipelines.") for a, b in itertools.pairwise(argv))

    def _scan(self) -> None:
        now = time.monotonic()
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            first_seen = self._checked.setdefault(pid, now)
            if first_seen < 0 or now - first_seen > 2.0:  # watched already, or long past its exec
                continue
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if not self._is_stage(argv):
                continue
            try:
                fd = os.pidfd_open(pid)  # type: ignore[attr-defined]
            except OSError:  # gone already
                continue
            self._fds[fd] = pid
            self._checked[pid] = -1.0

    def _run(self) -> None:
        while not self._stop.is_set():
            self._scan()
            ready, _, _ = select.select(list(self._fds), [], [], self._interval)
            now = time.time()
            for fd in ready:
                self.exited[self._fds.pop(fd)] = now
                os.close(fd)


# --------------------------------------------------------------------------------------------------------
# 1. the full repro


@dataclasses.dataclass(frozen=True)
class StageTiming:
    """One stage process, from its timing line and what the watcher saw (seconds)."""

    stage: str
    kind: str
    started_at: float  # Unix time the process started (its timing line's time minus its age)
    work_s: float  # inside common.stage_work
    age_s: float  # process start to its timing line (the last atexit handler)
    exit_s: float | None  # timing line to the process's end: interpreter finalization (None: not observed)
    between_s: float = 0.0  # the process's end to the next stage process's start (or to DVC's last line)


@dataclasses.dataclass(frozen=True)
class FullRun:
    """The forced repro; its wall time is the sum of: server start, DVC start-up, Σ (age + exit + between) of
    the stage processes in the order they ran, and the server's stop after DVC's last line."""

    command: str
    removed: int  # persistent outputs removed first, so that every training trains from epoch 0
    wall_s: float
    server_start_s: float | None  # None: PREFECT_API_URL was set, no server started
    dvc_start_s: float  # from the server being ready (or the start) to the first stage process's start
    server_stop_s: float  # from DVC's last line to the command's end
    stages: list[StageTiming]
    missing: list[str]  # stages DVC ran that left no timing line
    age_from_import: int  # records whose age fell back to "since pipelines.common was imported"
    exit_observed: bool
    log: Path

    @property
    def work_s(self) -> float:
        return sum(s.work_s for s in self.stages)

    @property
    def share(self) -> float:
        return (self.wall_s - self.work_s) / self.wall_s


def stage_kind(stage: str) -> str:
    """``train@activity-gru`` -> ``train``."""
    return stage.split("@", 1)[0]


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    # Children of a stage process (torchrun workers) live inside its age: counting them again would be wrong.
    return [r for r in records if r.get("owner_pid") is None]


def analyse(streamed: Streamed, records: list[dict[str, Any]], exited: dict[int, float], *, command: str,
            log: Path, exit_observed: bool, removed: int = 0) -> FullRun:
    """Line the stage processes up in the order they started (DVC runs one at a time) and split the wall time."""
    stages = []
    for r in sorted(records, key=lambda r: r["written_at"] - r["age_s"]):
        gone = exited.get(r["pid"])
        name = r.get("stage") or " ".join(r["argv"][:1])
        stages.append(StageTiming(stage=name, kind=stage_kind(r.get("stage") or r.get("kind") or "?"),
                                  started_at=r["written_at"] - r["age_s"], work_s=r["work_s"], age_s=r["age_s"],
                                  exit_s=None if gone is None else gone - r["written_at"]))
    ends = [s.started_at + s.age_s + (s.exit_s or 0.0) for s in stages]
    next_starts = [s.started_at for s in stages[1:]] + [streamed.last_line_at]
    stages = [dataclasses.replace(s, between_s=nxt - end) for s, end, nxt in zip(stages, ends, next_starts)]
    ready = streamed.server_ready_at
    first = stages[0].started_at if stages else streamed.last_line_at
    recorded = {r.get("stage") for r in records}
    return FullRun(
        command=command,
        removed=removed,
        wall_s=streamed.ended_at - streamed.started_at,
        server_start_s=None if ready is None else ready - streamed.started_at,
        dvc_start_s=first - (ready if ready is not None else streamed.started_at),
        server_stop_s=streamed.ended_at - streamed.last_line_at,
        stages=stages,
        missing=[name for name, _ in streamed.stage_lines if name not in recorded],
        age_from_import=sum(r.get("age_from") != "proc" for r in records),
        exit_observed=exit_observed,
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
    timings = log.with_name(log.name + ".timings.jsonl")  # kept beside the log: one line per stage process
    timings.unlink(missing_ok=True)
    with ExitWatcher() as watcher:
        streamed = stream(command, env=command_env(**{TIMINGS_ENV: str(timings)}), log=log)
    if streamed.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise RuntimeError(f"{shown} exited with {streamed.returncode}; the log's end ({log}):\n{tail}")
    return analyse(streamed, read_records(timings), watcher.exited, command=shown, log=log,
                   exit_observed=watcher.available, removed=len(removed))


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


def time_noop(repeats: int) -> list[NoopRun]:
    commands = {"`dvc repro`": dvc("repro"),
                "`scripts/with-prefect-server dvc repro`": ["scripts/with-prefect-server", *dvc("repro")]}
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


def expected_reruns(stages: list[str], model: str) -> list[str]:
    return sorted(s for s in stages if s == "report" or (stage_kind(s) in ("train", "evaluate")
                                                          and s.endswith(f"-{model}")))


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
        would_run: list[str] = []
        if changed:
            proc = run_quiet(dvc("repro", "--dry", "--downstream", "--force-downstream", *changed))
            would_run = sorted({m.group(1) for m in map(RUNNING.match, proc.stdout.splitlines()) if m})
    finally:
        params_file.write_bytes(original)
    stages = [line.split()[0] for line in run_quiet(dvc("stage", "list")).stdout.splitlines() if line.strip()]
    return ParamChange(param, old, new, changed, would_run, expected_reruns(stages, path[1]), sorted(before))


# --------------------------------------------------------------------------------------------------------
# markdown


def full_markdown(run: FullRun) -> str:
    work, wall = run.work_s, run.wall_s
    age = sum(s.age_s for s in run.stages)
    exits = sum(s.exit_s or 0.0 for s in run.stages)
    between = sum(s.between_s for s in run.stages)
    verdict = "met" if run.share <= TARGET_SHARE else "MISSED"
    server = ("no Prefect server started (PREFECT_API_URL was set)" if run.server_start_s is None
              else f"Prefect server start {run.server_start_s:.1f} s")
    removed = (f"{run.removed} persistent outputs (training checkpoints) were removed first, so every training ran "
               "from epoch 0, as on a fresh clone." if run.removed else
               "No persistent outputs were removed first (none there, or `--keep-persistent`).")
    lines = [
        (f"`{run.command}`: **{wall:.1f} s** wall for {len(run.stages)} stage processes, Σ stage work {work:.1f} s: "
         f"**orchestration is {run.share:.1%} of the wall time** (target ≤ {TARGET_SHARE:.0%}: {verdict}). The "
         f"wall time = {server} + DVC start-up {run.dvc_start_s:.1f} s + stage processes until their timing line "
         f"{age:.1f} s (work {work:.1f} s, in-process overhead {age - work:.1f} s) + interpreter exit after it "
         f"{exits:.1f} s + DVC between stage processes {between:.1f} s + after DVC's last line (server stop) "
         f"{run.server_stop_s:.1f} s. {removed}"),
        "",
        ("| stage kind | stages | work | in-process overhead (per stage) | interpreter exit (per stage) "
         "| DVC after the stage (per stage) | total | orchestration share |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    kinds: dict[str, list[StageTiming]] = {}
    for s in run.stages:
        kinds.setdefault(s.kind, []).append(s)

    def cell(total: float | None, count: int) -> str:
        return "–" if total is None else f"{total:,.1f} ({total / count:.2f})"

    def row(label: str, items: list[StageTiming]) -> str:
        n = len(items)
        work_s = sum(s.work_s for s in items)
        inproc = sum(s.age_s - s.work_s for s in items)
        exit_s = None if any(s.exit_s is None for s in items) else sum(s.exit_s or 0.0 for s in items)
        after = sum(s.between_s for s in items)
        total = sum(s.age_s + (s.exit_s or 0.0) + s.between_s for s in items)
        share = f"{(total - work_s) / total:.0%}" if total > 0 else "–"
        return (f"| {label} | {n} | {work_s:,.1f} | {cell(inproc, n)} | {cell(exit_s, n)} | {cell(after, n)} | "
                f"{total:,.1f} | {share} |")

    for kind, items in kinds.items():
        lines.append(row(kind, items))
    lines.append(row("**all**", run.stages))
    notes = [
        ("Columns, per stage process (seconds): *work* inside `common.stage_work`; *in-process overhead* = process "
         "age at its timing line − work (interpreter start, imports, argument and params checks, Prefect flow and "
         "task runs, MLflow); *interpreter exit* = from the timing line (its last atexit handler) to the process's "
         "end, seen through a pidfd (module and object finalization); *DVC after the stage* = from its end to the "
         "next stage process's start (DVC hashing and caching its outputs, rewriting dvc.lock, checking the next "
         "stage, spawning its shell and interpreter).")
    ]
    if run.missing:
        notes.append(f"No timing line from {', '.join(run.missing)} (not counted).")
    if run.age_from_import:
        notes.append(f"{run.age_from_import} process age(s) measured from the import of pipelines.common only "
                     "(no /proc): an underestimate.")
    if not run.exit_observed:
        notes.append("Interpreter exit not observed (no pidfd): it is inside *DVC after the stage*.")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


def noop_markdown(noop: list[NoopRun] | str) -> str:
    if isinstance(noop, str):
        return f"No-op `dvc repro`: not measured: {noop}\n"
    lines = ["| no-op command | best | median | target ≤ 2 s (best) |", "|---|---:|---:|---|"]
    for n in noop:
        verdict = "met" if round(n.best, 2) <= TARGET_NOOP_S else "MISSED"  # judged at the precision shown
        lines.append(f"| {n.label} | {n.best:.2f} s | {n.median:.2f} s | {verdict} |")
    repeats = len(noop[0].seconds) if noop else 0
    server = ("PREFECT_API_URL was set, so the wrapper started no server and the rows differ only by noise"
              if os.environ.get("PREFECT_API_URL") else
              "the second adds starting and stopping the Prefect server (what `make demo` pays when nothing changed)")
    return ("\n".join(lines) + f"\n\n{repeats} interleaved repeats with every stage up to date: no stage process "
            f"starts, so the first row is DVC alone (loading the pipeline, checking every dependency and output); "
            f"{server}.\n")


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
            f"(`dvc repro --dry --downstream --force-downstream`) {len(change.would_run)} would rerun: "
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
        "script's docstring. *Work* is the time inside the stages' calls into `seqvision`; everything else "
        "(interpreter start and imports, Prefect flow and task runs, MLflow, DVC between stages, the Prefect "
        "server) is orchestration. The machine is shared with other jobs and noisy: rerun before trusting a "
        "small difference.\n\n"
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
                        help="where the full repro's output goes, with the stage timing lines in <log>.timings.jsonl "
                             "(default: a new file in the temp folder, kept)")
    parser.add_argument("--docs", default="docs/benchmarks.md", help="markdown file to update ('' for none)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if not (Path("dvc.yaml").is_file() and Path("scripts/with-prefect-server").is_file()):
        parser.error("run from the repository root (dvc.yaml and scripts/ not found here)")
    if not Path("data/annotations").is_dir():
        parser.error("data/ is missing: run `make data` first")
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
            noop = time_noop(args.repeats)
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
