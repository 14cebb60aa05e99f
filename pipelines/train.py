"""train stage: one model family on one task -> checkpoints, history and summary in ``--out``.

    python -m pipelines.train --task activity --model lstm --params params.yaml \\
        --features artifacts/features --tokens artifacts/tokens \\
        --activity-dir data/annotations/ucf101 --activity-split 1 --out artifacts/train/activity/lstm

Tasks: activity, image_captioning, video_captioning. Models: rnn, lstm, gru, transformer, meanpool.
Reads the ``train`` section and ``models.<model>`` (+ ``models.match_params`` and, when that names a family,
that family's section) of params.yaml; the whole file is validated first. Inputs: ``--features`` (every task),
``--tokens`` (captioning: ``{tokens}/video`` or ``{tokens}/image``), ``--activity-dir`` / ``--activity-split``
(activity; default: params.yaml ``data:``). With params.yaml ``encoder.finetune_encoder: true`` the model trains
end to end: the encoder from ``--encoder`` (the encoder stage's encoder.pt) sits in front of it and trains with it,
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

Exit status: 0 done; 1 training failed (e.g. a non-finite loss); 2 bad arguments, params or inputs.
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
from pipelines.common import stage_work, untimed
from pipelines.train_ddp import (  # noqa: F401 - DATA_DVC, RUN_ID_FILE: re-exported, part of this stage's API
    DATA_DVC,
    RUN_ID_FILE,
    USAGE_ERRORS,
    add_arguments,
    finetune_encoder,
    open_run,
    resolve_configs,
)
from pipelines.train_ddp import load_data as load_task_data
from seqvision import experiment
from seqvision.config import ConfigError, ModelsConfig, TrainConfig, load_params
from seqvision.tracking import PARENT_RUN_ENV, RUN_ID_ENV, NullTracker, tracking_uri
from seqvision.train import resolve_device


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


def check_inputs(task_name: str, *, features: str | Path, tokens: str | Path | None,
                 activity_dir: str | Path | None, frames: str | Path | None = None) -> None:
    """Fail fast, naming the path, when an input the task reads is missing (before Prefect starts).
    ``frames``: set when the encoder is fine-tuned; the task then reads frame shards instead of features."""
    kind = "images" if task_name == "image_captioning" else "videos"
    if frames is not None:
        needed = [Path(frames) / "index.json"]
    else:
        needed = [Path(features) / "index.json", Path(features) / f"{kind}-train.npy",
                  Path(features) / f"{kind}-val.npy"]
    if task_name == "activity":
        if not activity_dir:
            raise ConfigError("activity needs its label lists: pass --activity-dir or set data.activity_dir")
        needed.append(Path(activity_dir) / "classInd.txt")
    else:
        if not tokens:
            raise ConfigError(f"--tokens is required for --task {task_name}")
        needed.append(Path(tokens) / ("image" if task_name == "image_captioning" else "video") / "vocab.json")
    for path in needed:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file; run the stage that writes it first")


@task(cache_policy=NO_CACHE)  # DVC decides what reruns, not a Prefect cache
def load_data(task_name: str, features: str, tokens: str | None, data_config: Any, seed: int, *,
              frames: str | None = None, encoder: Any = None) -> experiment.TaskData:
    with stage_work("train"):
        return load_task_data(task_name, features_dir=features, frames_dir=frames, encoder=encoder, tokens=tokens,
                              data_config=data_config, seed=seed)


@task(cache_policy=NO_CACHE, task_run_name="fit-{task_name}-{model}")
def train_model(task_name: str, model: str, data: experiment.TaskData, train_config: TrainConfig,
                models_config: ModelsConfig, out: str, *, repo_root: Path, tracking: bool, resume: bool,
                progress: bool | None, encoder: Any = None) -> experiment.TrainSummary:
    logger = get_run_logger()
    if not tracking:
        with stage_work("train"):
            return experiment.run(task_name, model, data=data, train_config=train_config,
                                  models_config=models_config, out_dir=out, resume=resume, progress=progress,
                                  log=logger.info, encoder=encoder)
    tracker, parent = open_run(task_name, model, train_config=train_config, models_config=models_config,
                               repo_root=repo_root)
    logger.info(f"MLflow run {tracker.run_id} under parent {parent}")
    with tracker, stage_work("train"):  # an exception marks the child run FAILED (KILLED for Ctrl-C) and propagates
        return experiment.run(task_name, model, data=data, train_config=train_config, models_config=models_config,
                              out_dir=out, tracker=untimed(tracker), parent_run_id=parent, resume=resume,
                              progress=progress, log=logger.info, encoder=encoder)


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
def train_model_ddp(task_name: str, model: str, train_config: TrainConfig, models_config: ModelsConfig, out: str,
                    *, nproc_per_node: int, worker_args: list[str], repo_root: Path,
                    tracking: bool) -> dict[str, Any]:
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
    tracker: Any = NullTracker()
    if tracking:
        tracker, parent = open_run(task_name, model, train_config=train_config, models_config=models_config,
                                   repo_root=repo_root)
        env.update({RUN_ID_ENV: tracker.run_id, PARENT_RUN_ENV: parent, "MLFLOW_TRACKING_URI": tracking_uri(repo_root)})
        logger.info(f"MLflow run {tracker.run_id} under parent {parent}, shared by {nproc_per_node} processes")
    command = torchrun_command(nproc_per_node, worker_args)
    logger.info(" ".join(command))
    with tracker:  # FINISHED on exit status 0; FAILED otherwise (KILLED for Ctrl-C)
        with stage_work("train"):
            status, tail = stream(command, env=env, log=logger.info)
        if status != 0:
            raise RuntimeError(f"torchrun exited with status {status}; its last lines:\n{tail}")
    return json.loads((Path(out) / "summary.json").read_text(encoding="utf-8"))


def worker_args(task: str, model: str, *, nproc_per_node: int, out: str, params: str, features: str,
                tokens: str | None, activity_dir: str | None, frames: str | None = None, encoder: str | None = None, activity_split: int | None, resume: bool, tracking: bool,
                progress: bool | None, repo_root: Path) -> list[str]:
    """The flags of ``pipelines.train_ddp`` for one training. The workers share this process's torch threads
    (at least one each): N processes with all of them each would oversubscribe the CPU N times."""
    threads = max(1, torch.get_num_threads() // nproc_per_node)
    args = ["--task", task, "--model", model, "--out", out, "--params", params, "--features", features,
            "--repo-root", str(repo_root), "--threads", str(threads),
            "--resume" if resume else "--no-resume", "--tracking" if tracking else "--no-tracking"]
    for flag, value in (("--tokens", tokens), ("--activity-dir", activity_dir), ("--activity-split", activity_split),
                        ("--frames", frames), ("--encoder", encoder)):
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
    params: str = "params.yaml",
    features: str = "artifacts/features",
    tokens: str | None = None,
    activity_dir: str | None = None,
    activity_split: int | None = None,
    resume: bool = True,
    tracking: bool = True,
    progress: bool | None = None,
    repo_root: str | None = None,
    nproc_per_node: int = 1,
    frames: str | None = "artifacts/frames",
    encoder: str | None = "artifacts/encoder/encoder.pt",
) -> dict[str, Any]:
    """Train ``model`` on ``task`` into ``out``; returns ``summary.json``'s content.

    ``repo_root`` (default: the current directory, where DVC runs stages) anchors the MLflow store and the
    parent-run file ``.seqvision/parent_run_id``. ``activity_dir`` / ``activity_split``: default params.yaml ``data:``.
    ``nproc_per_node`` > 1: DDP over that many local processes under torchrun (see the module docstring).
    ``frames`` / ``encoder``: read only when params.yaml ``encoder.finetune_encoder`` is on (end-to-end training).
    """
    experiment.check_names(task, model)
    paths, train_config, models_config = resolve_configs(params, activity_dir=activity_dir,
                                                         activity_split=activity_split)
    check_nproc(nproc_per_node, train_config)
    root = Path(repo_root).resolve() if repo_root else Path.cwd().resolve()
    # Loaded here in the DDP case too: bad inputs then fail (exit 2) before N processes start.
    frame_encoder = finetune_encoder(params, encoder)
    data = load_data(task, features, tokens, paths, train_config.seed, frames=frames, encoder=frame_encoder)
    if nproc_per_node == 1:
        summary: Any = train_model(task, model, data, train_config, models_config, out, repo_root=root,
                                   tracking=tracking, resume=resume, progress=progress, encoder=frame_encoder)
        summary = dataclasses.asdict(summary)
    else:
        args = worker_args(task, model, nproc_per_node=nproc_per_node, out=out, params=params, features=features,
                           tokens=tokens, activity_dir=activity_dir, activity_split=activity_split, resume=resume,
                           frames=frames if frame_encoder is not None else None,
                           encoder=encoder if frame_encoder is not None else None,
                           tracking=tracking, progress=progress, repo_root=root)
        summary = train_model_ddp(task, model, train_config, models_config, out, nproc_per_node=nproc_per_node,
                                  worker_args=args, repo_root=root, tracking=tracking)
    get_run_logger().info(describe(summary))
    return summary


def describe(summary: experiment.TrainSummary | dict[str, Any]) -> str:
    s = summary if isinstance(summary, dict) else dataclasses.asdict(summary)
    baseline = "majority class" if s["task"] == "activity" else "most frequent caption"
    return (
        f"{s['task']}/{s['family']}: val {s['metric']} {s['best_val_metric']:.3f} at epoch {s['best_epoch']} of "
        f"{s['epochs_run']} ({baseline}: {s['trivial_baseline']:.3f}); {s['num_parameters']:,} parameters, "
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
    try:  # the common mistakes get one clean line before Prefect starts
        experiment.check_names(args.task, args.model)
        paths, train_config, _ = resolve_configs(args.params, activity_dir=args.activity_dir,
                                                 activity_split=args.activity_split)
        finetune = load_params(args.params)["encoder"].finetune_encoder
        if finetune and not (args.frames and args.encoder):
            raise ConfigError("encoder.finetune_encoder is on: pass --frames (artifacts/frames) and --encoder "
                              "(artifacts/encoder/encoder.pt)")
        check_inputs(args.task, features=args.features, tokens=args.tokens, activity_dir=paths.activity_dir,
                     frames=args.frames if finetune else None)
        if finetune and not Path(args.encoder).is_file():
            raise FileNotFoundError(f"{args.encoder}: no such file; run the encoder stage first")
        if args.threads < 0:
            raise ConfigError(f"--threads must be >= 0, got {args.threads}")
        check_nproc(args.nproc_per_node, train_config)
    except USAGE_ERRORS as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        summary = train_flow(
            args.task, args.model, out=args.out, params=args.params, features=args.features, tokens=args.tokens,
            activity_dir=args.activity_dir, activity_split=args.activity_split, resume=args.resume,
            tracking=args.tracking, progress=args.progress, nproc_per_node=args.nproc_per_node,
            frames=args.frames, encoder=args.encoder,
        )
    except USAGE_ERRORS as err:  # e.g. a malformed label list or artifacts from different data
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the training itself failed; the MLflow run is marked FAILED
        print(f"train: error: {args.task}/{args.model}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"train: {describe(summary)} -> {args.out} ({time.perf_counter() - started:.1f} s in this process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
