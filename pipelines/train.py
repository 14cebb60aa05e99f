"""train stage: one model family on one task, ``train.seeds`` seeds, each evaluated on the test split.

    python -m pipelines.train --task activity --model lstm --params params.yaml \\
        --features artifacts/features --tokens artifacts/tokens \\
        --activity-dir data/annotations/ucf101 --activity-split 1 --out artifacts/runs/activity/lstm

Tasks: activity, image_captioning, video_captioning. Models: rnn, lstm, gru, transformer, meanpool, mingru.
Reads ``train``, ``models.<model>``, ``models.match_params.<task>``, and ``evaluate`` (captioning: one decoder picks
each seed's best epoch and predicts the test split) or ``data.activity_dir`` / ``activity_split`` (activity) of
params.yaml (``pipelines.train_args.TrainParams``), once; the whole file is validated first.

Seeds ``train.seed`` .. ``train.seed + train.seeds - 1`` train as parallel worker processes
(``pipelines.train_worker``, forked from ``pipelines.seed_server``, which has their imports done once): one per CUDA
device, else up to two per CPU core (``--parallel`` to choose), each into
``--out/train/seed{k}`` (checkpoints, history) and ``--out/test/seed{k}`` (test predictions and metrics). The stage then writes, over seeds, the
mean and 95% interval of every test metric (``metrics.json``), every seed's summary (``summary.json``), the
learning curves (``learning_curve.json``) and, for activity, the confusion rows (``plots/``): docs/design.md. With
``--metadata`` (the synthetic benchmark's metadata.json) captioners also get the content metrics. With
``train.finetune_encoder`` the encoder from ``--encoder`` trains with each model on the pixels of ``--frames``.

MLflow: the training is one child run of the comparison's parent run (``$SEQVISION_PARENT_RUN_ID``, else the RUNNING
run in ``.seqvision/parent_run_id`` under the repository root, else a new run "comparison"), holding every seed's
learning curve (``seed{k}/...``), the test metrics per seed and their mean and interval (``test/...``), the
parameter count, and the folders it reads as MLflow dataset inputs (features or frames, tokens or the activity class
lists; one input per split, its digest the folder's DVC hash). Runs go to ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<repo>/mlflow.db``; the store is checked before any work. A failed seed fails the stage and marks the run
FAILED.

DDP: with ``--nproc-per-node N`` each seed trains on N local processes under torchrun (NCCL on GPUs, gloo on
CPU), one seed after another; ``train.batch_size`` stays the global batch (docs/ddp.md).

Exit status: 0 done; 1 a seed failed (e.g. a non-finite loss: one line naming the seed and its error; the worker's
traceback is in the log above it with ``--debug``); 2 bad arguments, params or inputs (one line on stderr).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import queue
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines import seed_server

if __name__ == "__main__" and not {"-h", "--help"} & set(sys.argv[1:]):
    # The seeds' fork server imports torch and the worker (about 3 s) while this process imports its own. This
    # process does not import torch on a machine without a GPU driver (seqvision.runtime.visible_gpus): the seeds
    # train in the workers, and what it does here (slots, MLflow, the seeds' aggregate) needs none.
    seed_server.start()

from prefect import flow, get_run_logger, task  # noqa: E402 - after the fork server's start, on purpose
from prefect.cache_policies import NO_CACHE

import pipelines
from pipelines.common import CHILDREN, DEBUG_ENV, StageFailed, exit_fast, run_main
from pipelines.train_args import TrainParams, add_arguments, check_inputs, read_train_params
from seqvision import results, tracking
from seqvision.io import RUNINFO, read_runinfo, write_runinfo
from seqvision.config import ConfigError, TrainConfig, check_names, load_params, tracked_params
from seqvision.runtime import default_threads, parallel_slots, visible_gpus



def check_nproc(nproc_per_node: int, train_config: TrainConfig) -> None:
    """Raise ``ConfigError`` unless ``nproc_per_node`` processes can share ``train_config``'s work: at least one,
    a global batch that divides evenly, a visible GPU when the device names CUDA, and (on CUDA) one GPU each."""
    if nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1, got {nproc_per_node}")
    if train_config.batch_size % nproc_per_node:
        raise ConfigError(f"train.batch_size ({train_config.batch_size}) is the global batch and must divide by "
                          f"--nproc-per-node ({nproc_per_node})")
    gpus = visible_gpus(train_config.device)
    if train_config.device.startswith("cuda") and not gpus:
        raise ConfigError(f"device {train_config.device!r} requested, but no CUDA device is visible (use 'auto' or "
                          "'cpu')")
    if gpus and nproc_per_node > len(gpus):  # NCCL refuses two ranks on one GPU
        raise ConfigError(f"--nproc-per-node {nproc_per_node} but only {len(gpus)} GPU(s)")


def worker_args(task_name: str, model: str, *, seed_index: int, out: str, params_path: str, params: TrainParams,
                features: str, tokens: str | None, frames: str | None, encoder: str | None, metadata: str | None,
                resume: bool, progress: bool | None, threads: int) -> list[str]:
    """The flags of ``pipelines.train_worker`` for one seed of this training."""
    args = ["--task", task_name, "--model", model, "--seed-index", str(seed_index), "--out", out,
            "--params", params_path, "--features", features, "--threads", str(threads),
            "--resume" if resume else "--no-resume", "--no-tracking"]
    if task_name == "activity":
        args += ["--activity-dir", params.activity_dir, "--activity-split", str(params.activity_split)]
    for flag, value in (("--tokens", tokens), ("--frames", frames), ("--encoder", encoder), ("--metadata", metadata)):
        if value is not None:
            args += [flag, str(value)]
    if progress is not None:
        args.append("--progress" if progress else "--no-progress")
    return args


def start_worker(nproc_per_node: int, args: list[str], env: dict[str, str], *, fork: bool = True) -> Any:
    """One seed's worker, its stdout and stderr merged into ``.stdout``: on CPU (``fork``) forked from the seed
    server (``pipelines.seed_server``, the imports done once per stage); on a GPU a fresh interpreter (a process
    forked after CUDA initialised cannot use it, and what torch's imports touch is not ours to promise); for DDP,
    torchrun with ``nproc_per_node`` fresh processes through ``pipelines.ddp_launch``: a free port on 127.0.0.1 only
    (concurrent trainings on one machine do not collide, and nothing listens on the machine's other interfaces)."""
    if nproc_per_node == 1 and fork:
        return seed_server.ForkedWorker(args, env)
    command = [sys.executable, "-m", "pipelines.train_worker", *args] if nproc_per_node == 1 else [
        sys.executable, "-m", "pipelines.ddp_launch", f"--nproc-per-node={nproc_per_node}",
        "-m", "pipelines.train_worker", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def stream(proc: Any, *, log: Callable[[str], Any], redraw: Callable[[str], Any] | None = None,
           keep: int = 40) -> tuple[int, str]:
    """Follow a started worker (``Popen`` or :class:`pipelines.seed_server.ForkedWorker`), passing each output line
    to ``log`` as it comes, and each progress-bar redraw (text ended by a carriage return) to ``redraw`` instead;
    return (exit status, its last ``keep`` lines). The worker is stopped if this process is interrupted."""
    tail: collections.deque[str] = collections.deque(maxlen=keep)
    with proc:
        CHILDREN.add(proc)  # stopped by run_main if the stage is interrupted while this thread waits
        try:
            assert proc.stdout is not None
            # newline="": lines end at \n, \r\n or a lone \r, and say which
            for chunk in io.TextIOWrapper(proc.stdout, encoding="utf-8", errors="replace", newline=""):
                text = chunk.rstrip("\r\n")
                if chunk.endswith("\r") and not chunk.endswith("\r\n"):
                    if redraw is not None and text:
                        redraw(text)
                    continue
                tail.append(text)
                log(text)
            return proc.wait(), "\n".join(tail)
        finally:
            CHILDREN.discard(proc)
            if proc.poll() is None:  # interrupted: torchrun forwards SIGTERM to its workers
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()


def redraw_on_stderr(prefix: str) -> Callable[[str], None]:
    """A worker's progress bar on this process's stderr, prefixed with its seed (seeds training at once take
    turns on the one line)."""
    def redraw(text: str) -> None:
        sys.stderr.write(f"\r{prefix}{text}")
        sys.stderr.flush()

    return redraw


def worker_env(slot: str | None) -> dict[str, str]:
    """A worker's environment: this process's, the checkout importable, unbuffered output, and its one device."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pipelines.CODE_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # stream the workers' lines as they come, not when their buffers fill
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    return env


@task(cache_policy=NO_CACHE, task_run_name="seed-{seed_index}")  # DVC decides what reruns, not a Prefect cache
def train_seed(seed_index: int, args: list[str], nproc_per_node: int, slots: queue.Queue) -> None:
    """Seed ``seed_index`` in a worker process on a free slot; raises ``RuntimeError`` with its last lines when it
    fails (the flow fails the stage after the other seeds have finished)."""
    logger = get_run_logger()
    slot = slots.get(timeout=600)  # the task runner runs at most len(slots) of these at once: one is free
    try:
        where = "cpu" if slot is None else f"CUDA_VISIBLE_DEVICES={slot}"
        logger.info(f"seed {seed_index} on {where}")
        status, tail = stream(start_worker(nproc_per_node, args, worker_env(slot), fork=slot is None),
                              log=lambda line: logger.info(f"seed {seed_index}: {line}"),
                              redraw=redraw_on_stderr(f"seed {seed_index}: "))
    finally:
        slots.put(slot)
    if status != 0:
        errors = [line.split("error: ", 1)[1] for line in tail.splitlines() if "error: " in line]
        last = errors[-1:] or tail.splitlines()[-1:]
        raise StageFailed(f"seed {seed_index} exited with status {status}: {last[0] if last else '(no output)'}")


@task(cache_policy=NO_CACHE, tags=["orchestration"])
def open_run(task_name: str, model: str, params: TrainParams, repo_root: Path,
             inputs: dict[str, str] | None = None) -> tuple[Any, str]:
    """This training's MLflow child run under the comparison's parent (created while the seeds train), holding the
    params it depends on and the folders it reads (``inputs``, :func:`read_folders`) as dataset inputs."""
    flat = tracked(task_name, model, params)
    tracker, parent = tracking.open_training_run(task_name, model, repo_root=repo_root, params=flat)
    tracker.log_params(flat)
    if inputs:
        tracker.log_datasets(inputs, repo_root=repo_root)
    return tracker, parent


def read_folders(task_name: str, params: TrainParams, *, features: str, tokens: str | None,
                 frames: str | None) -> dict[str, str]:
    """The input folders a training reads, by name: the features (the frames instead when the encoder is fine-tuned
    on pixels), the tokens for captioners, the class lists for activity."""
    folders = {"frames": frames} if params.train.finetune_encoder and frames else {"features": features}
    if task_name == "activity":
        folders["activity_labels"] = params.activity_dir
    elif tokens is not None:
        folders["tokens"] = tokens
    return {name: str(folder) for name, folder in folders.items() if folder}


@task(cache_policy=NO_CACHE)
def aggregate(out: str, seeds: int, budget: int | None) -> dict[str, Any]:
    return results.aggregate(out, seeds=seeds, budget=budget)


def log_run(tracker: Any, out: str, seeds: int, metrics: dict[str, Any]) -> None:
    """Every seed's learning curve, the test metrics per seed and over seeds, what the seeds ran on, and the
    stage's files. A plain call in the flow, not a Prefect task: as a task it took about 2 s from the call to its
    first line on the 2-core machine (2026-12-04, cause inside Prefect not found), for 0.04 s of logging."""
    summary = json.loads((Path(out) / "summary.json").read_text(encoding="utf-8"))
    measured = read_runinfo(out).get("seeds", [])
    resumed = {f"seqvision.seed{k}.resumed_from_epoch": m.get("resumed_from_epoch") for k, m in enumerate(measured)}
    # What seed 0's worker ran on (its runinfo.json); else the device and torch version in its summary.
    first = summary["seeds"][0]
    runtime = (measured[0].get("runtime_tags") if measured else None) or {
        f"seqvision.{key}": first[key] for key in ("device", "torch_version") if first.get(key) is not None}
    tracker.set_tags({"seqvision.seeds": seeds, **resumed, **runtime})
    rows: list[tuple[int, dict[str, Any]]] = []  # logged in one go: a store transaction per call
    for k, (trained, _) in enumerate(results.seed_folders(out, seeds)):
        for row in json.loads((trained / "history.json").read_text(encoding="utf-8")):
            named = {(f"val_{summary['metric']}" if key == "val_metric" else key): value for key, value in row.items()}
            rows.append((row["epoch"], {f"seed{k}/{key}": value for key, value in named.items() if key != "epoch"}))
    flat: dict[str, float] = {"num_parameters": metrics["num_parameters"], "converged_seeds": metrics["converged"]}
    for name, summary in metrics.items():
        if not isinstance(summary, dict) or summary.get("mean") is None:
            continue
        flat[f"test/{name}"] = summary["mean"]
        if summary.get("ci95"):
            flat[f"test/{name}/ci95_low"], flat[f"test/{name}/ci95_high"] = summary["ci95"]
        for k, value in enumerate(summary["seeds"]):
            flat[f"test/{name}/seed{k}"] = value
    tracker.log_steps([*rows, (0, flat)])
    tracker.log_params({"num_parameters": metrics["num_parameters"]})
    for name in ("summary.json", "metrics.json"):
        tracker.log_artifact(Path(out) / name)
    if (Path(out) / RUNINFO).is_file():  # the measurements: absent when not recorded
        tracker.log_artifact(Path(out) / RUNINFO)


def tracked(task_name: str, model: str, params: TrainParams) -> dict[str, Any]:
    flat = tracked_params(task_name, model, train_config=params.train, model_config=params.model_config,
                          budget=params.budget)
    if params.decoding is not None:
        flat.update({f"evaluate.{k}": v for k, v in (("beam_size", params.decoding.beam_size),
                                                      ("length_penalty", params.decoding.length_penalty),
                                                      ("max_length", params.decoding.max_length))})
    return flat


@flow(name="train")
def train_flow(
    task: str,
    model: str,
    *,
    out: str,
    params: TrainParams | None = None,
    params_path: str = "params.yaml",
    activity_dir: str | None = None,
    activity_split: int | None = None,
    features: str = "artifacts/features",
    tokens: str | None = None,
    frames: str | None = "artifacts/frames",
    encoder: str | None = "artifacts/encoder/encoder.pt",
    metadata: str | None = None,
    resume: bool = True,
    tracking: bool = True,
    progress: bool | None = None,
    repo_root: str | None = None,
    nproc_per_node: int = 1,
    parallel: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``task`` over ``train.seeds`` seeds into ``out``; returns ``metrics.json``'s content.

    ``params``: what the training reads (``main`` passes it, read once); None: read from the ``params_path`` file
    (a deployment run; ``activity_dir`` / ``activity_split`` then override its ``data:`` values). The workers read
    ``params_path`` themselves. ``repo_root`` (default: the current directory, where DVC runs stages) anchors the
    MLflow store and the parent-run file. ``parallel``: seeds at once (default: one per GPU, else per CPU core).
    ``threads``: the CPU threads the seeds share (``--threads``; default ``runtime.default_threads``).
    """
    logger = get_run_logger()
    check_names(task, model)
    if params is None:
        loaded = load_params(params_path)
        activity = task == "activity"
        params = TrainParams(
            train=loaded.train, model_config=loaded.models.family(model),
            budget=loaded.models.match_params.budget(task), decoding=None if activity else loaded.evaluate,
            activity_dir=(loaded.data.activity_dir if activity_dir is None else activity_dir) if activity else "",
            activity_split=(loaded.data.activity_split if activity_split is None else activity_split) if activity else 1,
        )
    check_nproc(nproc_per_node, params.train)
    root = Path(repo_root).resolve() if repo_root else Path.cwd().resolve()
    seeds = params.train.seeds
    # CPU: up to two seeds per core at once: 3 seeds on 2 cores share them (~1.5x one seed's time) instead of
    # running 2 then 1 (2x)
    slots_list = [None] if nproc_per_node > 1 else parallel_slots(seeds, device=params.train.device,
                                                                  wanted=parallel, per_core=2)
    # CPU: one torch thread per worker (fastest for these small models, docs/benchmarks.md), more when there are
    # more cores than seeds; under torchrun the ranks share them.
    cpu_threads = threads or default_threads()
    per_worker = max(1, cpu_threads // max(len(slots_list), nproc_per_node)) if slots_list[0] is None else 1
    slots: queue.Queue = queue.Queue()
    for slot in slots_list:
        slots.put(slot)
    finetune = params.train.finetune_encoder
    if progress is None:  # the workers' stderr is a pipe: decide here, for this process's terminal
        progress = sys.stderr.isatty()
    logger.info(f"{task}/{model}: {seeds} seed(s), {len(slots_list)} at once, {per_worker} thread(s) each")
    # The flow's thread pool runs the tasks; the slots bound how many seeds train at once. The MLflow run opens
    # while they train.
    inputs = read_folders(task, params, features=features, tokens=tokens, frames=frames)
    run = open_run.submit(task, model, params, root, inputs) if tracking else None
    futures = [train_seed.submit(k, worker_args(
        task, model, seed_index=k, out=out, params_path=params_path, params=params, features=features,
        tokens=tokens, frames=frames if finetune else None, encoder=encoder if finetune else None,
        metadata=metadata, resume=resume, progress=progress, threads=per_worker), nproc_per_node, slots)
        for k in range(seeds)]
    errors = []
    for future in futures:
        try:
            future.result()
        except Exception as err:  # noqa: BLE001 - every seed is waited for; then the stage fails
            errors.append(err)
    tracker, parent = run.result() if run is not None else (tracking_off(), None)
    with tracker:  # an exception marks the child run FAILED (KILLED for Ctrl-C) and propagates
        if errors:
            raise StageFailed("; ".join(str(e) for e in errors))
        metrics = aggregate(out, seeds, params.budget)
        if run is not None:
            log_run(tracker, out, seeds, metrics)
            stamp_run_ids(out, tracker.run_id, parent)
    logger.info(describe(out))
    return metrics


def tracking_off() -> Any:
    return tracking.NullTracker()


def stamp_run_ids(out: str, run_id: str | None, parent: str | None) -> None:
    """Record the MLflow run ids in the stage's ``runinfo.json`` (the report logs on the runs they name)."""
    write_runinfo(out, mlflow_run_id=run_id, mlflow_parent_run_id=parent)


def describe(out: str) -> str:
    s = json.loads((Path(out) / "summary.json").read_text(encoding="utf-8"))
    vals = [x["best_val_metric"] for x in s["seeds"]]
    spread = f"{min(vals):.3f}-{max(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"
    seconds = read_runinfo(out).get("train_time_s")
    return (f"{s['task']}/{s['family']}: val {s['metric']} {spread} over {s['num_seeds']} seed(s), "
            f"{s['converged_seeds']} converged; {s['num_parameters']:,} parameters"
            + (f", {seconds:.1f} s of training" if seconds is not None else ""))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.train",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.add_argument("--parallel", type=int, default=None, metavar="N",
                        help="seeds trained at once (default: one per CUDA device, else up to two per CPU core, so a "
                             "few seeds share the cores rather than run in rounds)")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="DDP: train each seed on this many local processes under torchrun, one per GPU on "
                             "CUDA, gloo on CPU; train.batch_size stays the global batch (default 1: no torchrun)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()

    if args.debug:  # the seed workers print their tracebacks too
        os.environ[DEBUG_ENV] = "1"

    def work() -> int:
        params = read_train_params(args)  # the only read of params.yaml in this process
        check_inputs(args, params)  # the common mistakes get one clean line before Prefect starts
        check_nproc(args.nproc_per_node, params.train)
        if args.parallel is not None and args.parallel < 1:
            raise ConfigError(f"--parallel must be >= 1, got {args.parallel}")
        root = Path.cwd().resolve()
        if args.tracking:
            tracking.check_tracking(tracking.tracking_uri(root))
        train_flow(
            args.task, args.model, out=args.out, params=params, params_path=args.params, features=args.features,
            tokens=args.tokens, frames=args.frames, encoder=args.encoder, metadata=args.metadata,
            resume=args.resume, tracking=args.tracking, progress=args.progress, repo_root=str(root),
            nproc_per_node=args.nproc_per_node, parallel=args.parallel, threads=args.threads,
        )
        print(f"train: {describe(args.out)} -> {args.out} ({time.perf_counter() - started:.1f} s in this process)")
        return 0

    return run_main("train", work, debug=args.debug)


if __name__ == "__main__":
    exit_fast(main())  # pipelines.common: skips the interpreter teardown
