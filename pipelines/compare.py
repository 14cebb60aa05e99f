"""compare flow: the whole comparison in one run, with the code the DVC stages call, trainings side by side.

    python -m pipelines.compare --params params.yaml                       # every task x model, here
    python -m pipelines.compare --tasks activity --models gru meanpool     # a subset
    python -m pipelines.compare --deployment train/train-gpu               # trainings on a GPU work pool

In order: extract, tokenize, encoder, features (the stage flows, as subflows; --no-prepare reuses the
existing artifacts), then one training per (task, model) (the train stage: ``train.seeds`` seeds, each tested),
run concurrently, then the baselines and the report. Paths default to dvc.yaml's; the raw-data flags fall
back to params.yaml's ``data:`` section, as in every stage.

Trainings. Locally, each one is the train stage's own command (``python -m pipelines.train ...``, exactly
what ``dvc repro`` runs) in its own process. --max-parallel bounds the worker processes at once: by default one
per CUDA device (a training sees only its device through CUDA_VISIBLE_DEVICES and trains its seeds there one after
another), or on CPU one per usable core (each seed's worker runs single-threaded, the fastest setting for these
models: docs/benchmarks.md), shared as max_parallel // seeds trainings of min(seeds, max_parallel) seeds at once. With
--deployment NAME, each one is a run of that Prefect deployment of the train flow (e.g. train/train-gpu),
all submitted at once; the work pool decides how many run together. The artifacts must then be on storage
the workers share.

MLflow: one parent run "comparison" ($SEQVISION_PARENT_RUN_ID when set, else a new one), every training a
child run under it; the report is logged on the parent.

Failures. A training that fails (or a deployment run that does not end Completed) does not stop the others:
its ``{runs}/{task}/{model}/summary.json`` records ``"status": "failed"`` and the error, the report marks it
failed, the rest is reported. The flow then ends Failed (the parent MLflow run too), naming
what failed; ``{reports}/compare.json`` lists every training with its status, device, start and end time.

Exit status: 0 everything succeeded; 1 something failed (the report is still written when it can be);
2 bad arguments, params or inputs (one line on stderr, before anything runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import queue
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import FailedRun, ObjectNotFound
from prefect.runtime import flow_run as current_run
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

import pipelines
from pipelines import baselines as baselines_stage
from pipelines import extract as extract_stage
from pipelines import features as features_stage
from pipelines import report as report_stage
from pipelines import tokenize as tokenize_stage
from pipelines.common import (
    IO_RETRIES,
    add_data_arguments,
    add_params_argument,
    read_params,
    resolve_params,
    run_main,
)
from seqvision import tracking
from seqvision.config import MODEL_FAMILIES, TASKS, ConfigError, DataConfig, Params
from seqvision.tasks import task_spec
from seqvision.features import require_metadata
from seqvision.io import write_json
from seqvision.runtime import parallel_slots

# The train stage's command line as dvc.yaml runs it (the interpreter running this flow, so a venv carries over).
TRAIN_COMMAND: tuple[str, ...] = (sys.executable, "-m", "pipelines.train")
STATUS_FILE = "compare.json"
DEFAULT_TRAIN_TIMEOUT_S = 12 * 3600.0  # a bound on every wait; one training of the default params takes minutes


@dataclasses.dataclass(frozen=True)
class Training:
    """One (task, model) training of the comparison."""

    task: str
    model: str

    @property
    def name(self) -> str:
        return f"{self.task}/{self.model}"


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """What every training of one comparison shares (plain values, so Prefect can record them)."""

    params: str
    features: str
    tokens: str
    activity_dir: str
    activity_split: int
    metadata: str  # the synthetic benchmark's metadata.json ("" for a real dataset)
    runs: str  # {runs}/{task}/{model} is a training's output folder
    parallel: int  # seeds of one training at once (its --parallel)
    resume: bool
    mlflow: bool
    parent_run_id: str | None
    tracking_uri: str | None
    prefect_api_url: str | None  # local trainings report their flow runs to the same Prefect server
    deployment: str | None  # None: local processes
    timeout_s: float

    def out(self, job: Training) -> str:
        return str(Path(self.runs) / job.task / job.model)


@dataclasses.dataclass(frozen=True)
class TrainingResult:
    """How one training went; one entry of ``compare.json``."""

    task: str
    model: str
    status: str  # "ok" | "failed"
    error: str  # why it failed ("" when ok)
    where: str  # "cpu", "CUDA_VISIBLE_DEVICES=1", "deployment train/train-gpu, flow run <name> (<id>)"
    started: float  # Unix time
    ended: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def name(self) -> str:
        return f"{self.task}/{self.model}"


# --------------------------------------------------------------------------------------------------------
# Planning: which trainings, where, how many at once


def plan_trainings(tasks: Sequence[str] | None, models: Sequence[str] | None) -> list[Training]:
    """Every (task, model) pair of the two subsets (``None``: all), in dvc.yaml's order."""
    tasks = list(TASKS) if tasks is None else list(tasks)
    models = list(MODEL_FAMILIES) if models is None else list(models)
    for kind, names, allowed in (("task", tasks, TASKS), ("model", models, MODEL_FAMILIES)):
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise ConfigError(f"unknown {kind} {unknown[0]!r}; choose from {', '.join(allowed)}")
        if not names:
            raise ConfigError(f"no {kind} to compare")
        if len(set(names)) != len(names):
            raise ConfigError(f"{kind} names repeat: {' '.join(names)}")
    return [Training(t, m) for t in TASKS if t in tasks for m in MODEL_FAMILIES if m in models]


def training_slots(max_parallel: int | None, *, train_device: str, num_trainings: int,
                   seeds: int) -> tuple[list[str | None], int]:
    """(one entry per training that may run at once, seeds each of them trains at once). GPUs: one training per
    device (``runtime.parallel_slots``), its seeds one after another there. CPU: ``max_parallel`` worker processes
    (default one per usable core), as ``max_parallel // s`` trainings of ``s = min(seeds, max_parallel)`` seeds.
    ``ConfigError`` for bad values."""
    if max_parallel is not None and max_parallel < 1:
        raise ConfigError(f"max_parallel must be >= 1, got {max_parallel}")
    try:
        workers = parallel_slots(num_trainings * seeds, device=train_device, wanted=max_parallel)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if workers[0] is not None:  # GPUs
        return workers[:num_trainings], 1
    per_training = min(seeds, len(workers))
    return [None] * max(1, min(num_trainings, len(workers) // per_training)), per_training


def check_inputs(
    *, params: Params, tasks: Sequence[str] | None, models: Sequence[str] | None,
    prepare: bool, features: str, tokens: str, deployment: str | None,
    max_parallel: int | None, train_timeout_s: float,
) -> list[Training]:
    """Everything that can be checked before any work starts; raises one of ``pipelines.common.USAGE_ERRORS``."""
    jobs = plan_trainings(tasks, models)
    data, encoder = params.data, params.encoder
    if max_parallel is not None and max_parallel < 1:
        raise ConfigError(f"max_parallel must be >= 1, got {max_parallel}")
    if not train_timeout_s > 0:
        raise ConfigError(f"train_timeout_s must be > 0, got {train_timeout_s}")
    if deployment is not None and (deployment.count("/") != 1 or not all(deployment.split("/"))):
        raise ConfigError(f"deployment {deployment!r}: expected 'flow name/deployment name', e.g. train/train-gpu")
    if prepare:
        extract_stage.check_inputs(data)
        if encoder.backbone == "small_cnn":
            require_metadata(data.metadata)
    else:  # the trainings read what the features and tokenize stages wrote
        needed = [Path(features) / "index.json"]
        needed += sorted({Path(tokens) / str(spec.corpus) / "vocab.json"
                          for spec in map(task_spec, {j.task for j in jobs}) if spec.captioning})
        for path in needed:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file; run without --no-prepare to build it")
    if any(j.task == "activity" for j in jobs) and not data.activity_dir:
        raise ConfigError("activity needs its label lists: set data.activity_dir or pass --activity-dir")
    return jobs


# --------------------------------------------------------------------------------------------------------
# I/O tasks (retried on I/O errors only)


IO_TASK = {**IO_RETRIES, "cache_policy": NO_CACHE}


# What DVC removes before it reruns a train stage (all of its outputs but the persisted checkpoints in train/).
CLEARED = ("test", "plots", "metrics.json", "summary.json", "learning_curve.json")


@task(**IO_TASK, task_run_name="clear-{job.task}-{job.model}")  # type: ignore[arg-type]
def clear_results(job: Training, out: str) -> None:
    """Remove an earlier training's results of this (task, model) before it is retrained, as DVC does before
    rerunning its stage (the checkpoints stay, to resume from): a training that now fails must not be reported
    with its old test metrics."""
    for name in CLEARED:
        path = Path(out) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


@task(**IO_TASK, task_run_name="mark-failed-{result.task}-{result.model}")  # type: ignore[arg-type]
def record_failure(result: TrainingResult, out: str, parent_run_id: str | None) -> None:
    """``{out}/summary.json`` for a failed training: the report reads ``status`` and ``error`` from it (and
    marks the run failed), and a later successful training overwrites it."""
    write_json(Path(out) / "summary.json", {
        "task": result.task, "family": result.model, "status": "failed", "error": result.error,
        "where": result.where, "mlflow_parent_run_id": parent_run_id,
    })


@task(**IO_TASK)  # type: ignore[arg-type]
def write_status(path: str, status: dict[str, Any]) -> None:
    write_json(path, status)


# --------------------------------------------------------------------------------------------------------
# Trainings


def failure_reason(returncode: int, output: str) -> str:
    """One line on why a train process failed: its ``train: error:`` line, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("train: error:"):
            return line[len("train: error:"):].strip()
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}" + (" (out of memory?)" if -returncode == 9 else "")
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}" + (f": {lines[-1]}" if lines else "")


def train_command(job: Training, settings: TrainSettings) -> list[str]:
    """The train stage's command for ``job``, with dvc.yaml's arguments."""
    argv = [*TRAIN_COMMAND, "--params", settings.params, "--task", job.task, "--model", job.model,
            "--features", settings.features, "--tokens", settings.tokens, "--metadata", settings.metadata,
            "--activity-dir", settings.activity_dir, "--activity-split", str(settings.activity_split),
            "--parallel", str(settings.parallel), "--out", settings.out(job)]
    argv += [] if settings.resume else ["--no-resume"]
    argv += [] if settings.mlflow else ["--no-tracking"]
    return argv


def train_environment(settings: TrainSettings, slot: str | None) -> dict[str, str]:
    """The environment of a local training process: this one's, plus where to find the parent run, the
    tracking store, the Prefect server and the code, and the one device it may use."""
    env = dict(os.environ)
    env.pop(tracking.RUN_ID_ENV, None)  # each training creates its own child run
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pipelines.CODE_ROOT), env.get("PYTHONPATH", "")) if p)
    if settings.parent_run_id:
        env[tracking.PARENT_RUN_ENV] = settings.parent_run_id
    if settings.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = settings.tracking_uri
    if settings.prefect_api_url:  # else every process would start its own temporary server (6-9 s)
        env["PREFECT_API_URL"] = settings.prefect_api_url
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    return env


@task(cache_policy=NO_CACHE, task_run_name="train-{job.task}-{job.model}")
def train_locally(job: Training, settings: TrainSettings, slots: queue.Queue) -> TrainingResult | State:
    """Run the train stage's command for ``job`` on a free slot. A failure ends the task run Failed, carrying
    its :class:`TrainingResult` (no traceback: the error is the training's, reported in one line)."""
    logger = get_run_logger()
    # The task runner runs at most len(slots) of these at once, so a slot is free (the timeout only guards
    # against a bug there).
    slot = slots.get(timeout=600)
    where = "cpu" if slot is None else f"CUDA_VISIBLE_DEVICES={slot}"
    started = time.time()
    try:
        logger.info(f"{job.name}: training on {where}")
        proc = subprocess.run(train_command(job, settings), env=train_environment(settings, slot),
                              capture_output=True, text=True, timeout=settings.timeout_s, check=False)
        output = proc.stdout + proc.stderr
        if proc.returncode == 0:
            logger.info(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else f"{job.name}: done")
            return TrainingResult(job.task, job.model, "ok", "", where, started, time.time())
        error = failure_reason(proc.returncode, proc.stderr).removeprefix(f"{job.name}: ")
        logger.error(f"{job.name} failed: {error}\n" + "\n".join(output.strip().splitlines()[-20:]))
    except subprocess.TimeoutExpired:  # subprocess.run has killed the process
        error = f"no result after {settings.timeout_s:.0f} s (train_timeout_s); the process was killed"
        logger.error(f"{job.name} failed: {error}")
    except OSError as err:  # the interpreter could not be started
        error = f"could not start the train process: {err}"
        logger.error(f"{job.name} failed: {error}")
    finally:
        slots.put(slot)
    return failed(TrainingResult(job.task, job.model, "failed", error, where, started, time.time()))


def failed(result: TrainingResult) -> State:
    """The Failed state of a training's task run, carrying its result for the comparison's bookkeeping."""
    return Failed(message=f"{result.name}: {result.error}", data=result)


def deployment_parameters(job: Training, settings: TrainSettings) -> dict[str, Any]:
    """``train_flow``'s parameters for ``job`` (paths as dvc.yaml passes them; they resolve on the worker)."""
    return {
        "task": job.task, "model": job.model, "out": settings.out(job),
        "params_path": settings.params, "features": settings.features, "tokens": settings.tokens,
        "metadata": settings.metadata or None, "activity_dir": settings.activity_dir,
        "activity_split": settings.activity_split, "resume": settings.resume, "tracking": settings.mlflow,
    }


@task(cache_policy=NO_CACHE, task_run_name="submit-{job.task}-{job.model}")
def train_on_deployment(job: Training, settings: TrainSettings, key: str) -> TrainingResult | State:
    """One run of the train deployment for ``job``, waited for; a run that does not end Completed is
    returned as failed (one that is still running at the timeout is left running, and reported failed)."""
    logger = get_run_logger()
    assert settings.deployment is not None
    env: dict[str, str] = {}
    if settings.parent_run_id:  # the worker's training attaches to this comparison's parent run ...
        env[tracking.PARENT_RUN_ENV] = settings.parent_run_id
    if settings.tracking_uri:  # ... in the same store (a tracking server, or a database the workers share)
        env["MLFLOW_TRACKING_URI"] = settings.tracking_uri
    started = time.time()
    try:
        flow_run = run_deployment(
            settings.deployment, parameters=deployment_parameters(job, settings), timeout=settings.timeout_s,
            job_variables={"env": env} if env else None,
            idempotency_key=key,  # a retried comparison does not submit the same training twice
        )
    except Exception as err:  # noqa: BLE001 - e.g. the server refused the run; the other trainings go on
        error = f"could not submit to {settings.deployment}: {type(err).__name__}: {err}"
        logger.error(f"{job.name} failed: {error}")
        return failed(TrainingResult(job.task, job.model, "failed", error, f"deployment {settings.deployment}",
                                     started, time.time()))
    state = flow_run.state
    where = f"deployment {settings.deployment}, flow run {flow_run.name} ({flow_run.id})"
    if state is not None and state.is_completed():
        logger.info(f"{job.name}: {where} Completed")
        return TrainingResult(job.task, job.model, "ok", "", where, started, time.time())
    if state is None or not state.is_final():
        error = (f"flow run still {state.name if state else 'without a state'} after {settings.timeout_s:.0f} s "
                 f"(train_timeout_s); not cancelled")
    else:
        error = f"flow run ended {state.name}" + (f": {state.message}" if state.message else "")
    logger.error(f"{job.name} failed: {where}: {error}")
    return failed(TrainingResult(job.task, job.model, "failed", error, where, started, time.time()))


@flow(name="trainings")
def trainings_flow(jobs: list[Training], settings: TrainSettings, slots: list[str | None]) -> list[TrainingResult]:
    """Every training of ``jobs``, at most ``len(slots)`` at once (the caller sizes this flow's task runner)."""
    if settings.deployment is None:
        free: queue.Queue = queue.Queue()
        for slot in slots:
            free.put(slot)
        futures = [train_locally.submit(job, settings, free) for job in jobs]
    else:
        futures = [train_on_deployment.submit(job, settings, f"{current_run.id}-{job.task}-{job.model}")
                   for job in jobs]
    results = []
    for job, future in zip(jobs, futures):
        future.wait()
        outcome = future.state.result(raise_on_failure=False)
        if not isinstance(outcome, TrainingResult):  # the task itself broke (a bug here, not in the training)
            now = time.time()
            outcome = TrainingResult(job.task, job.model, "failed", _one_line(outcome), "", now, now)
        results.append(outcome)
    return results


# --------------------------------------------------------------------------------------------------------
# The comparison


def open_parent_run(root: Path, *, mode: str) -> str:
    """The comparison's parent run: ``$SEQVISION_PARENT_RUN_ID`` when set, else a new one. Never the run
    recorded in ``.seqvision/parent_run_id`` by stage runs: one comparison, one parent."""
    data_dvc = root / tracking.DATA_DVC
    tags = tracking.lineage_tags(repo_root=root, data_dvc=data_dvc if data_dvc.is_file() else None)
    return tracking.start_parent(tracking.PARENT_EXPERIMENT, tracking.PARENT_RUN_NAME, repo_root=root,
                                 tags={**tags, "seqvision.stage": "compare", "seqvision.mode": mode})


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


@flow(name="compare")
def compare_flow(
    *,
    params: Params | str = "params.yaml",
    data: DataConfig | None = None,
    params_path: str = "params.yaml",
    tasks: list[str] | None = None,
    models: list[str] | None = None,
    max_parallel: int | None = None,
    deployment: str | None = None,
    train_timeout_s: float = DEFAULT_TRAIN_TIMEOUT_S,
    prepare: bool = True,
    resume: bool = True,
    mlflow: bool = True,
    repo_root: str | None = None,
    frames: str = "artifacts/frames",
    tokens: str = "artifacts/tokens",
    encoder: str = "artifacts/encoder",
    features: str = "artifacts/features",
    runs: str = "artifacts/runs",
    evals: str = "artifacts/eval",
    reports: str = "reports",
) -> dict[str, Any] | State:
    """The whole comparison (see the module docstring). ``tasks`` / ``models``: subsets (default all);
    ``max_parallel``: trainings at once (default: one per CUDA device, else one per usable core; with
    ``deployment``, all at once); ``deployment``: e.g. ``train/train-gpu`` to train on a work pool;
    ``prepare``: run extract, tokenize, encoder and features first (False reuses their outputs);
    ``repo_root`` (default: the current directory) anchors the MLflow store, as in the train stage.
    ``params``: the validated params (or a params file, read once here); ``data`` replaces its ``data:`` section;
    ``params_path``: the file the local training processes read.

    Returns ``compare.json``'s content when everything succeeded. Otherwise ends Failed with a message that
    names what failed (calling the flow then raises ``prefect.exceptions.FailedRun``), after writing what
    could be written: the other trainings, the baselines, the report and compare.json.
    """
    logger = get_run_logger()
    if not isinstance(params, Params):
        params_path = str(params)
    params = resolve_params(params, data)
    data = params.data
    jobs = check_inputs(params=params, tasks=tasks, models=models, prepare=prepare,
                        features=features, tokens=tokens, deployment=deployment, max_parallel=max_parallel,
                        train_timeout_s=train_timeout_s)
    root = Path(repo_root).resolve() if repo_root else Path.cwd().resolve()
    per_training = 1
    if deployment is None:
        slots, per_training = training_slots(max_parallel, train_device=params.train.device,
                                             num_trainings=len(jobs), seeds=params.train.seeds)
    else:
        with get_client(sync_client=True) as client:  # fail before any work when the name is wrong
            try:
                client.read_deployment_by_name(deployment)
            except ObjectNotFound:
                raise ConfigError(f"deployment {deployment!r} not found on the Prefect server "
                                  f"(`prefect deployment ls`; docs/cluster.md)") from None
        slots = [None] * min(max_parallel or len(jobs), len(jobs))
    mode = "local" if deployment is None else f"deployment {deployment}"
    parent = open_parent_run(root, mode=mode) if mlflow else None
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    logger.info(f"{len(jobs)} trainings of {params.train.seeds} seed(s) ({mode}, at most {len(slots)} at once, "
                f"{per_training} seed(s) each at once); MLflow parent run: {parent}")

    status: dict[str, Any] = {"mode": mode, "max_parallel": len(slots), "parent_run_id": parent,
                              "trainings": [], "baselines": "not run", "report": "not run"}
    try:
        if prepare:
            extract_stage.extract_flow(config=params.extract, data=data, out=frames, progress=False)
            if data.video_captions or data.image_captions_dir or data.karpathy_split:
                tokenize_stage.tokenize_flow(config=params.tokenize, data=data, out=tokens)
            features_stage.encoder_flow(config=params.encoder, frames=frames, metadata=data.metadata, out=encoder)
            features_stage.features_flow(encoder=str(Path(encoder) / "encoder.pt"), frames=frames, out=features,
                                         progress=False)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the trainings need the memory the encoder cached
        settings = TrainSettings(
            params=params_path, features=features, tokens=tokens, activity_dir=data.activity_dir,
            activity_split=data.activity_split, metadata=data.metadata, runs=runs, parallel=per_training,
            resume=resume, mlflow=mlflow, parent_run_id=parent,
            tracking_uri=tracking.tracking_uri(root) if mlflow else None, prefect_api_url=api_url,
            deployment=deployment, timeout_s=float(train_timeout_s),
        )
        for job in jobs:
            clear_results(job, settings.out(job))
        bounded = trainings_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=len(slots)))
        results = bounded(jobs, settings, slots)
        for result in results:
            if not result.ok:
                record_failure(result, settings.out(Training(result.task, result.model)), parent)
        status["trainings"] = [dataclasses.asdict(r) for r in results]

        try:
            baselines_stage.baselines_flow(
                out=evals, tasks=tuple(sorted({j.task for j in jobs}, key=TASKS.index)),
                activity_dir=data.activity_dir, activity_split=data.activity_split, features=features, tokens=tokens,
                metadata=data.metadata or None,
            )
            status["baselines"] = "ok"
        except Exception as err:  # noqa: BLE001
            logger.error(f"baselines failed: {_one_line(err)}")
            status["baselines"] = f"failed: {_one_line(err)}"
        try:
            written = report_stage.report_flow(
                out=reports, runs=runs, baselines=evals, frames=frames, features=features, tokens=tokens,
                metadata=data.metadata or None,
                tasks=tuple(t for t in TASKS if any(j.task == t for j in jobs)),
                models=tuple(m for m in MODEL_FAMILIES if any(j.model == m for j in jobs)),
                parent_run_id=parent, mlflow=mlflow, repo_root=str(root),
                meteor=params.report.compute_meteor,
            )
            status["report"] = {k: str(v) for k, v in written["paths"].items()}
        except Exception as err:  # noqa: BLE001 - e.g. MLflow unreachable: the report files may still exist
            logger.error(f"report failed: {_one_line(err)}")
            status["report"] = f"failed: {_one_line(err)}"
    except BaseException as err:  # a data stage failed (or Ctrl-C): nothing to compare
        if parent:
            _end_parent(parent, root, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise

    problems = summarize_problems(results, status)
    status["failed"] = problems
    write_status(str(Path(reports) / STATUS_FILE), status)
    if problems:
        if parent:
            _end_parent(parent, root, "FAILED")  # after the report ended it FINISHED: the comparison is incomplete
        report = status["report"]["html"] if isinstance(status["report"], dict) else "not written"
        message = f"{'; '.join(problems)}. Report: {report}"
        logger.error(message)
        return Failed(message=message)
    logger.info(f"{len(jobs)} trainings done; report: {status['report']['html']}")
    return status


def summarize_problems(results: Sequence[TrainingResult], status: dict[str, Any]) -> list[str]:
    """One line per thing that failed (empty when the comparison is complete)."""
    failed = [r for r in results if not r.ok]
    problems = []
    if failed:
        problems.append(f"{len(failed)} of {len(results)} trainings failed: "
                        + ", ".join(f"{r.name} ({r.error})" for r in failed))
    problems += [f"{part} {status[part]}" for part in ("baselines", "report")
                 if isinstance(status[part], str) and status[part].startswith("failed")]
    return problems


def _end_parent(parent: str, root: Path, state: str) -> None:
    try:
        tracking.end_run(parent, repo_root=root, status=state)
    except Exception as err:  # noqa: BLE001 - the flow's own outcome matters more than this bookkeeping
        get_run_logger().warning(f"could not mark MLflow run {parent} {state}: {_one_line(err)}")


# --------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.compare",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_params_argument(parser, sections="every section")
    parser.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                        help=f"tasks to compare (default: all of {', '.join(TASKS)})")
    parser.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                        help=f"model families to compare (default: all of {', '.join(MODEL_FAMILIES)})")
    parser.add_argument("--max-parallel", type=int, default=None, metavar="N",
                        help="trainings at once (default: one per CUDA device, else one per usable CPU core; "
                             "with --deployment, all)")
    parser.add_argument("--deployment", default=None, metavar="FLOW/DEPLOYMENT",
                        help="train on this Prefect deployment of the train flow, e.g. train/train-gpu "
                             "(default: local processes)")
    parser.add_argument("--train-timeout", dest="train_timeout_s", type=float, default=DEFAULT_TRAIN_TIMEOUT_S,
                        metavar="SECONDS",
                        help="seconds one training may take before it counts as failed (default: %(default)s)")
    parser.add_argument("--prepare", action=argparse.BooleanOptionalAction, default=True,
                        help="run extract, tokenize, encoder and features first (default: on; --no-prepare "
                             "reuses their outputs)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="a training continues from its last.pt when that was written for the same params "
                             "and inputs, as in the train stage (default: on)")
    parser.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=True,
                        help="track the trainings as child runs of one parent run and log the report on it "
                             "(default: on)")
    parser.add_argument("--repo-root", default=None,
                        help="where mlflow.db lives unless MLFLOW_TRACKING_URI is set (default: .)")
    for name, default, what in (
        ("frames", "artifacts/frames", "frame shards"), ("tokens", "artifacts/tokens", "vocabularies, caption ids"),
        ("encoder", "artifacts/encoder", "encoder checkpoint folder"), ("features", "artifacts/features", "features"),
        ("runs", "artifacts/runs", "trainings: {runs}/{task}/{model}"),
        ("eval", "artifacts/eval", "evaluations and baselines: {eval}/{task}/{name}"),
        ("reports", "reports", "report.html, report.md, compare.json"),
    ):
        parser.add_argument(f"--{name}", dest="evals" if name == "eval" else name, default=default,
                            help=f"{what} (default: %(default)s)")
    add_data_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()

    def work() -> int:
        params = read_params(args)
        check_inputs(params=params, tasks=args.tasks, models=args.models, prepare=args.prepare,
                     features=args.features, tokens=args.tokens, deployment=args.deployment,
                     max_parallel=args.max_parallel, train_timeout_s=args.train_timeout_s)
        try:
            status = compare_flow(
                params=params, params_path=args.params, tasks=args.tasks, models=args.models,
                max_parallel=args.max_parallel, deployment=args.deployment, train_timeout_s=args.train_timeout_s,
                prepare=args.prepare, resume=args.resume, mlflow=args.mlflow, repo_root=args.repo_root,
                frames=args.frames, tokens=args.tokens, encoder=args.encoder,
                features=args.features, runs=args.runs, evals=args.evals, reports=args.reports,
            )
        except FailedRun as err:  # some training (or the baselines, the report) failed; the rest is written
            print(f"compare: error: {err}", file=sys.stderr)
            return 1
        for result in status["trainings"]:
            print(f"compare: {result['task']}/{result['model']}: trained and tested on {result['where']} in "
                  f"{result['ended'] - result['started']:.1f} s")
        print(f"compare: report {status['report']['html']}; every training in {Path(args.reports) / STATUS_FILE} "
              f"({time.perf_counter() - started:.1f} s)")
        return 0

    return run_main("compare", work, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
