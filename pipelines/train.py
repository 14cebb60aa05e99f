"""train stage: one model family on one task -> checkpoints, history and summary in ``--out``.

    python -m pipelines.train --task activity --model lstm --params params.yaml \\
        --features artifacts/features --tokens artifacts/tokens \\
        --activity-dir data/annotations/ucf101 --activity-split 1 --out artifacts/train/activity/lstm

Tasks: activity, image_captioning, video_captioning. Models: rnn, lstm, gru, transformer, meanpool.
Reads the ``train`` section and ``models.<model>`` (+ ``models.match_params`` and, when that names a family,
that family's section) of params.yaml; the whole file is validated first. Inputs: ``--features`` (every task),
``--tokens`` (captioning: ``{tokens}/video`` or ``{tokens}/image``), ``--activity-dir`` / ``--activity-split``
(activity; default: params.yaml ``data:``).

Outputs in ``--out``: best.pt, last.pt, history.json, learning_curve.json (for ``dvc plots``), config.json,
summary.json (see seqvision.experiment). With ``--resume`` (the default) a rerun continues from ``last.pt``
when that was written for the same params and inputs, and starts afresh otherwise.

MLflow: the training is a child run of the comparison's parent run: ``$SEQVISION_PARENT_RUN_ID`` if set, else
the still-RUNNING run recorded in ``.seqvision/parent_run_id`` under the repository root (the current
directory), else a new run "comparison" in experiment "seqvision" (recorded there). Runs go to
``$MLFLOW_TRACKING_URI``, else ``sqlite:///<repo>/mlflow.db``. A failed training marks its run FAILED.

Exit status: 0 done; 1 training failed (e.g. a non-finite loss); 2 bad arguments, params or inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipelines import common
from seqvision import annotations, experiment
from seqvision.config import ConfigError, DataConfig, ModelsConfig, TrainConfig, flatten, load_params, to_dict

RUN_ID_FILE = Path(".seqvision") / "parent_run_id"  # relative to the repository root; not a DVC output
DATA_DVC = "data.dvc"

# Errors that mean "fix your arguments, params or inputs" (exit 2), not "training went wrong" (exit 1).
USAGE_ERRORS = (ConfigError, FileNotFoundError, annotations.AnnotationError, ValueError)


def resolve_configs(
    params: str | Path, *, activity_dir: str | None = None, activity_split: int | None = None
) -> tuple[DataConfig, TrainConfig, ModelsConfig]:
    """Validate the whole params file; return ``data`` (with the activity flags that were given applied),
    ``train`` and ``models``."""
    overrides = {"activity_dir": activity_dir, "activity_split": activity_split}
    data, train_config = common.resolve_configs(params, overrides, "train")
    return data, train_config, load_params(params)["models"]


def check_inputs(task_name: str, *, features: str | Path, tokens: str | Path | None,
                 activity_dir: str | Path | None) -> None:
    """Fail fast, naming the path, when an input the task reads is missing (before Prefect starts)."""
    kind = "images" if task_name == "image_captioning" else "videos"
    needed = [Path(features) / "index.json", Path(features) / f"{kind}-train.npy", Path(features) / f"{kind}-val.npy"]
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
def load_data(task_name: str, features: str, tokens: str | None, activity_dir: str | None, activity_split: int,
              seed: int) -> experiment.TaskData:
    return experiment.load_task_data(task_name, features_dir=features, tokens_dir=tokens, activity_dir=activity_dir,
                                     activity_split=activity_split, seed=seed)


@task(cache_policy=NO_CACHE, task_run_name="fit-{task_name}-{model}")
def train_model(task_name: str, model: str, data: experiment.TaskData, train_config: TrainConfig,
                models_config: ModelsConfig, out: str, *, repo_root: Path, tracking: bool, resume: bool,
                progress: bool | None) -> experiment.TrainSummary:
    logger = get_run_logger()
    if not tracking:
        return experiment.run(task_name, model, data=data, train_config=train_config, models_config=models_config,
                              out_dir=out, resume=resume, progress=progress, log=logger.info)
    data_dvc = repo_root / DATA_DVC
    params = flatten({"train": to_dict(train_config), "models": {model: to_dict(getattr(models_config, model)),
                                                                  "match_params": models_config.match_params}})
    tracker, parent = experiment.open_child_run(
        task_name, model, repo_root=repo_root, params=params, run_id_file=repo_root / RUN_ID_FILE,
        data_dvc=data_dvc if data_dvc.is_file() else None,
    )
    logger.info(f"MLflow run {tracker.run_id} under parent {parent}")
    with tracker:  # an exception marks the child run FAILED (KILLED for Ctrl-C) and propagates
        return experiment.run(task_name, model, data=data, train_config=train_config, models_config=models_config,
                              out_dir=out, tracker=tracker, parent_run_id=parent, resume=resume, progress=progress,
                              log=logger.info)


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
) -> dict[str, Any]:
    """Train ``model`` on ``task`` into ``out``; returns ``summary.json``'s content.

    ``repo_root`` (default: the current directory, where DVC runs stages) anchors the MLflow store and the
    parent-run file ``.seqvision/parent_run_id``. ``activity_dir`` / ``activity_split``: default params.yaml ``data:``.
    """
    experiment.check_names(task, model)
    paths, train_config, models_config = resolve_configs(params, activity_dir=activity_dir,
                                                         activity_split=activity_split)
    root = Path(repo_root).resolve() if repo_root else Path.cwd().resolve()
    data = load_data(task, features, tokens, paths.activity_dir, paths.activity_split, train_config.seed)
    summary = train_model(task, model, data, train_config, models_config, out, repo_root=root, tracking=tracking,
                          resume=resume, progress=progress)
    get_run_logger().info(describe(summary))
    return dataclasses.asdict(summary)


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
    parser.add_argument("--task", required=True, help=f"one of {', '.join(experiment.TASKS)}")
    parser.add_argument("--model", required=True, help=f"one of {', '.join(experiment.FAMILIES)}")
    parser.add_argument("--params", default="params.yaml", help="params file (train and models sections)")
    parser.add_argument("--features", required=True, help="feature folder (artifacts/features)")
    parser.add_argument("--tokens", default=None, help="token folder (artifacts/tokens); captioning only")
    parser.add_argument("--activity-dir", default=None,
                        help="UCF101-style classInd.txt + split lists; activity only (default: params.yaml "
                             "data.activity_dir)")
    parser.add_argument("--activity-split", type=int, default=None,
                        help="which trainlist0N/vallist0N (default: params.yaml data.activity_split)")
    parser.add_argument("--out", required=True, help="output folder (artifacts/train/{task}/{model})")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="continue from --out/last.pt when it was written for the same params and inputs "
                             "(default: on)")
    parser.add_argument("--tracking", action=argparse.BooleanOptionalAction, default=True,
                        help="log a child MLflow run (default: on)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these small sequence models run fastest single-"
                             "threaded on a shared CPU, see docs/benchmarks.md; 0 keeps torch's default)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="per-epoch progress bar (default: only when stderr is a terminal)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:  # the common mistakes get one clean line before Prefect starts
        experiment.check_names(args.task, args.model)
        paths, _, _ = resolve_configs(args.params, activity_dir=args.activity_dir, activity_split=args.activity_split)
        check_inputs(args.task, features=args.features, tokens=args.tokens, activity_dir=paths.activity_dir)
        if args.threads < 0:
            raise ConfigError(f"--threads must be >= 0, got {args.threads}")
    except USAGE_ERRORS as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        summary = train_flow(
            args.task, args.model, out=args.out, params=args.params, features=args.features, tokens=args.tokens,
            activity_dir=args.activity_dir, activity_split=args.activity_split, resume=args.resume,
            tracking=args.tracking, progress=args.progress,
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
