"""train stage: one model family on one task -> checkpoints, history and summary in ``--out``.

    python -m pipelines.train --task activity --model lstm --params params.yaml \\
        --features artifacts/features --tokens artifacts/tokens \\
        --activity-dir data/annotations/ucf101 --activity-split 1 --out artifacts/train/activity/lstm

Tasks: activity, image_captioning, video_captioning. Models: rnn, lstm, gru, transformer, meanpool.
Reads the ``train`` section, ``models.<model>``, ``models.match_params.<task>`` and ``data.activity_dir`` /
``activity_split`` of params.yaml (``pipelines.train_args.TrainParams``), once; the whole file is validated first.
Inputs: ``--features`` (every task), ``--tokens`` (captioning: ``{tokens}/video`` or ``{tokens}/image``),
``--activity-dir`` / ``--activity-split`` (activity; default: params.yaml ``data:``). With params.yaml
``train.finetune_encoder: true`` the model trains end to end: the encoder from ``--encoder`` (the encoder stage's encoder.pt) sits in front of it and trains with it,
on the uint8 frames of ``--frames`` instead of the cached features (meant for GPUs: every step runs the CNN).

Outputs in ``--out``: best.pt, last.pt, history.json, learning_curve.json (for ``dvc plots``), config.json,
summary.json (see seqvision.experiment). With ``--resume`` (the default) a rerun continues from ``last.pt``
when that was written for the same params and inputs, and starts afresh otherwise.

MLflow: the training is a child run of the comparison's parent run: ``$SEQVISION_PARENT_RUN_ID`` if set, else
the still-RUNNING run recorded in ``.seqvision/parent_run_id`` under the repository root (the current
directory), else a new run "comparison" in experiment "seqvision" (recorded there). Runs go to
``$MLFLOW_TRACKING_URI``, else ``sqlite:///<repo>/mlflow.db``. A failed training marks its run FAILED.

DDP: with ``--nproc-per-node N`` (N > 1) the flow creates the child run once, then a Prefect task launches
``torchrun --standalone --nproc-per-node N -m pipelines.train_ddp`` on this machine with ``$MLFLOW_RUN_ID`` set,
streams its output and marks the run FINISHED or FAILED from its exit status. ``train.batch_size`` stays the
global batch (it must divide by N); one process per GPU (NCCL) when ``train.device`` resolves to CUDA, else N
CPU processes (gloo); they share ``--threads``, at least one each. Without randomness inside a step (dropout,
scheduled sampling) the outputs equal one process's up to float summation order (docs/ddp.md).

Exit status: 0 done; 1 training failed (e.g. a non-finite loss); 2 bad arguments, params or inputs (one line on
stderr; ``--debug`` adds the traceback).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

import pipelines
from pipelines.common import run_main
from pipelines.train_args import TrainParams, add_arguments, check_inputs, read_train_params
from seqvision import experiment, tracking
from seqvision.config import ConfigError, TrainConfig, load_params
from seqvision.runtime import resolve_device


def check_nproc(nproc_per_node: int, train_config: TrainConfig) -> None:
    """Raise ``ConfigError`` unless ``nproc_per_node`` processes can share ``train_config``'s work: at least one,
    a global batch that divides evenly, and (on CUDA) one GPU each."""
    if nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1, got {nproc_per_node}")
    if train_config.batch_size % nproc_per_node:
        raise ConfigError(f"train.batch_size ({train_config.batch_size}) is the global batch and must divide by "
                          f"--nproc-per-node ({nproc_per_node})")
    cuda = resolve_device(train_config.device).type == "cuda"
    if cuda and nproc_per_node > torch.cuda.device_count():  # NCCL refuses two ranks on one GPU
        raise ConfigError(f"--nproc-per-node {nproc_per_node} but only {torch.cuda.device_count()} GPU(s)")


def tracked(task_name: str, model: str, params: TrainParams) -> dict[str, Any]:
    return experiment.tracked_params(task_name, model, train_config=params.train, model_config=params.model_config,
                                     budget=params.budget)


@task(cache_policy=NO_CACHE)  # DVC decides what reruns, not a Prefect cache
def load_data(task_name: str, params: TrainParams, features: str, tokens: str | None, frames: str | None,
              encoder: Any) -> experiment.TaskData:
    return experiment.load_for_training(task_name, seed=params.train.seed, activity_dir=params.activity_dir,
                                        activity_split=params.activity_split, features_dir=features,
                                        frames_dir=frames, tokens_dir=tokens, encoder=encoder)


@task(cache_policy=NO_CACHE, task_run_name="fit-{task_name}-{model}")
def train_model(task_name: str, model: str, data: experiment.TaskData, params: TrainParams, out: str, *,
                repo_root: Path, tracking_on: bool, resume: bool, progress: bool | None,
                encoder: Any = None) -> experiment.TrainSummary:
    logger = get_run_logger()
    tracker: Any = tracking.NullTracker()
    parent = None
    if tracking_on:
        tracker, parent = tracking.open_training_run(task_name, model, repo_root=repo_root,
                                                     params=tracked(task_name, model, params))
        logger.info(f"MLflow run {tracker.run_id} under parent {parent}")
    with tracker:  # an exception marks the child run FAILED (KILLED for Ctrl-C) and propagates
        return experiment.run(task_name, model, data=data, train_config=params.train,
                              model_config=params.model_config, budget=params.budget, out_dir=out, tracker=tracker,
                              parent_run_id=parent, resume=resume, progress=progress, log=logger.info,
                              encoder=encoder)


def torchrun_command(nproc_per_node: int, worker_args: list[str]) -> list[str]:
    """``python -m torch.distributed.run`` (torchrun, with this interpreter) for one node: ``--standalone`` picks
    a free local rendezvous port, so concurrent trainings on one machine do not collide."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
            "-m", "pipelines.train_ddp", *worker_args]


def stream(command: list[str], *, env: dict[str, str], log: Callable[[str], Any], keep: int = 40) -> tuple[int, str]:
    """Run ``command``, passing each output line (stdout and stderr merged) to ``log`` as it comes; return
    (exit status, its last ``keep`` lines). The child is stopped if this process is interrupted."""
    tail: collections.deque[str] = collections.deque(maxlen=keep)
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.rstrip("\n"))
                log(tail[-1])
            return proc.wait(), "\n".join(tail)
        finally:
            if proc.poll() is None:  # interrupted: torchrun forwards SIGTERM to its workers
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()


@task(cache_policy=NO_CACHE, task_run_name="torchrun-{task_name}-{model}")
def train_model_ddp(task_name: str, model: str, params: TrainParams, out: str, *, nproc_per_node: int,
                    worker_args: list[str], repo_root: Path, tracking_on: bool) -> dict[str, Any]:
    """One training on ``nproc_per_node`` local processes; returns ``summary.json``'s content.

    The MLflow run is created here, once, and handed to every rank through ``$MLFLOW_RUN_ID`` (rank 0 logs into
    it); its status comes from torchrun's exit status, which covers ranks that were killed before they could
    report anything.
    """
    logger = get_run_logger()
    env = dict(os.environ)
    # The workers import pipelines.train_ddp by module name, wherever the flow was started from.
    source_root = str(Path(pipelines.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # stream the workers' lines as they come, not when their buffers fill
    tracker: Any = tracking.NullTracker()
    if tracking_on:
        tracker, parent = tracking.open_training_run(task_name, model, repo_root=repo_root,
                                                     params=tracked(task_name, model, params))
        env.update({tracking.RUN_ID_ENV: tracker.run_id, tracking.PARENT_RUN_ENV: parent,
                    "MLFLOW_TRACKING_URI": tracking.tracking_uri(repo_root)})
        logger.info(f"MLflow run {tracker.run_id} under parent {parent}, shared by {nproc_per_node} processes")
    command = torchrun_command(nproc_per_node, worker_args)
    logger.info(" ".join(command))
    with tracker:  # FINISHED on exit status 0; FAILED otherwise (KILLED for Ctrl-C)
        status, tail = stream(command, env=env, log=logger.info)
        if status != 0:
            raise RuntimeError(f"torchrun exited with status {status}; its last lines:\n{tail}")
    return json.loads((Path(out) / "summary.json").read_text(encoding="utf-8"))


def worker_args(task_name: str, model: str, *, nproc_per_node: int, out: str, params_path: str, params: TrainParams,
                features: str, tokens: str | None, frames: str | None, encoder: str | None, resume: bool,
                tracking_on: bool, progress: bool | None, repo_root: Path) -> list[str]:
    """The flags of ``pipelines.train_ddp`` for one training. The workers share this process's torch threads
    (at least one each): N processes with all of them each would oversubscribe the CPU N times."""
    threads = max(1, torch.get_num_threads() // nproc_per_node)
    args = ["--task", task_name, "--model", model, "--out", out, "--params", params_path, "--features", features,
            "--repo-root", str(repo_root), "--threads", str(threads),
            "--activity-dir", params.activity_dir, "--activity-split", str(params.activity_split),
            "--resume" if resume else "--no-resume", "--tracking" if tracking_on else "--no-tracking"]
    for flag, value in (("--tokens", tokens), ("--frames", frames), ("--encoder", encoder)):
        if value is not None:
            args += [flag, str(value)]
    if progress is not None:
        args.append("--progress" if progress else "--no-progress")
    return args


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
    resume: bool = True,
    tracking: bool = True,
    progress: bool | None = None,
    repo_root: str | None = None,
    nproc_per_node: int = 1,
    frames: str | None = "artifacts/frames",
    encoder: str | None = "artifacts/encoder/encoder.pt",
) -> dict[str, Any]:
    """Train ``model`` on ``task`` into ``out``; returns ``summary.json``'s content.

    ``params``: what the training reads (``main`` passes it, read once); None: read from the ``params_path`` file
    (a deployment run; ``activity_dir`` / ``activity_split`` then override its ``data:`` values). The DDP workers
    read ``params_path`` themselves (each torchrun process once).
    ``repo_root`` (default: the current directory, where DVC runs stages) anchors the MLflow store and the
    parent-run file ``.seqvision/parent_run_id``. ``nproc_per_node`` > 1: DDP over that many local processes under
    torchrun (see the module docstring). ``frames`` / ``encoder``: read only when ``train.finetune_encoder`` is on.
    """
    experiment.check_names(task, model)
    if params is None:
        loaded = load_params(params_path)
        params = TrainParams(
            train=loaded.train, model_config=loaded.models.family(model),
            budget=loaded.models.match_params.budget(task),
            activity_dir=loaded.data.activity_dir if activity_dir is None else activity_dir,
            activity_split=loaded.data.activity_split if activity_split is None else activity_split,
        )
    check_nproc(nproc_per_node, params.train)
    root = Path(repo_root).resolve() if repo_root else Path.cwd().resolve()
    # Loaded here in the DDP case too: bad inputs then fail (exit 2) before N processes start.
    frame_encoder = experiment.finetune_encoder(params.train.finetune_encoder, encoder)
    task_data = load_data(task, params, features, tokens, frames, frame_encoder)
    if nproc_per_node == 1:
        summary: Any = train_model(task, model, task_data, params, out, repo_root=root, tracking_on=tracking,
                                   resume=resume, progress=progress, encoder=frame_encoder)
        summary = dataclasses.asdict(summary)
    else:
        args = worker_args(task, model, nproc_per_node=nproc_per_node, out=out, params_path=params_path,
                           params=params, features=features, tokens=tokens,
                           frames=frames if frame_encoder is not None else None,
                           encoder=encoder if frame_encoder is not None else None, resume=resume,
                           tracking_on=tracking, progress=progress, repo_root=root)
        summary = train_model_ddp(task, model, params, out, nproc_per_node=nproc_per_node, worker_args=args,
                                  repo_root=root, tracking_on=tracking)
    get_run_logger().info(describe(summary))
    return summary


def describe(summary: experiment.TrainSummary | dict[str, Any]) -> str:
    s = summary if isinstance(summary, dict) else dataclasses.asdict(summary)
    blind = "majority class" if s["task"] == "activity" else "most frequent caption"
    return (
        f"{s['task']}/{s['family']}: val {s['metric']} {s['best_val_metric']:.3f} at epoch {s['best_epoch']} of "
        f"{s['epochs_run']} ({blind}: {s['input_blind_metric']:.3f}); {s['num_parameters']:,} parameters, "
        f"{s['train_time_s']:.1f} s, {s['samples_per_s']:.0f} samples/s on {s['device']}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.train",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="DDP: train on this many local processes under torchrun, one per GPU on CUDA, gloo on "
                             "CPU; train.batch_size stays the global batch (default 1: this process, no torchrun)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()

    def work() -> int:
        params = read_train_params(args)  # the only read of params.yaml in this process
        check_inputs(args, params)  # the common mistakes get one clean line before Prefect starts
        check_nproc(args.nproc_per_node, params.train)
        if args.threads:
            torch.set_num_threads(args.threads)
        summary = train_flow(
            args.task, args.model, out=args.out, params=params, params_path=args.params, features=args.features,
            tokens=args.tokens, resume=args.resume, tracking=args.tracking, progress=args.progress,
            nproc_per_node=args.nproc_per_node, frames=args.frames, encoder=args.encoder,
        )
        print(f"train: {describe(summary)} -> {args.out} ({time.perf_counter() - started:.1f} s in this process)")
        return 0

    return run_main("train", work, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
