"""DDP worker of the train stage: ``torchrun`` starts one copy per process (rank).

    torchrun --standalone --nproc-per-node 2 -m pipelines.train_ddp --task activity --model lstm \\
        --params params.yaml --features artifacts/features --activity-dir data/annotations/ucf101 \\
        --out artifacts/train/activity/lstm

``python -m pipelines.train --nproc-per-node N`` runs exactly this under Prefect (see docs/ddp.md). The flags are
those of ``pipelines.train`` without ``--nproc-per-node``, plus ``--repo-root``; they are defined here so that the
workers never import Prefect (seconds per process on a busy machine, for nothing they use).

Each process opens the process group (NCCL on GPU ``$LOCAL_RANK`` when ``train.device`` resolves to CUDA, else
gloo), loads the data and runs ``seqvision.experiment.run`` on its shard of the training set; ``train.batch_size``
is the global batch, split evenly over the processes. Rank 0 alone writes ``--out`` and logs to MLflow: into the
existing run ``$MLFLOW_RUN_ID`` when that is set (the Prefect launcher creates it once, passes it to every rank and
ends it), else into a new child run of the comparison's parent, as ``pipelines.train`` does.

Exit status: 0 done; 1 training failed; 2 bad arguments, params or inputs (torchrun itself exits 1 when any
worker fails).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import torch
from torch import nn

from pipelines import common
from seqvision import annotations, distributed, experiment, features, tracking
from seqvision.config import (
    ConfigError,
    DataConfig,
    ModelsConfig,
    TrainConfig,
    flatten,
    load_params,
    to_dict,
)
from seqvision.train import resolve_device

RUN_ID_FILE = Path(".seqvision") / "parent_run_id"  # relative to the repository root; not a DVC output
DATA_DVC = "data.dvc"

# Errors that mean "fix your arguments, params or inputs" (exit 2), not "training went wrong" (exit 1).
USAGE_ERRORS = (ConfigError, FileNotFoundError, annotations.AnnotationError, ValueError)

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def resolve_configs(
    params: str | Path, *, activity_dir: str | None = None, activity_split: int | None = None
) -> tuple[DataConfig, TrainConfig, ModelsConfig]:
    """Validate the whole params file; return ``data`` (with the activity flags that were given applied),
    ``train`` and ``models``."""
    overrides = {"activity_dir": activity_dir, "activity_split": activity_split}
    data, train_config = common.resolve_configs(params, overrides, "train")
    return data, train_config, load_params(params)["models"]


def open_run(task: str, model: str, *, train_config: TrainConfig, models_config: ModelsConfig,
             repo_root: Path) -> tuple[tracking.Tracker, str]:
    """(tracker, parent run id) of this training's child MLflow run, tagged with the stage's params and lineage
    (see ``experiment.open_child_run``; with ``$MLFLOW_RUN_ID`` set it logs into that run instead)."""
    data_dvc = repo_root / DATA_DVC
    params = flatten({"train": to_dict(train_config), "models": {model: to_dict(getattr(models_config, model)),
                                                                  "match_params": models_config.match_params}})
    return experiment.open_child_run(
        task, model, repo_root=repo_root, params=params, run_id_file=repo_root / RUN_ID_FILE,
        data_dvc=data_dvc if data_dvc.is_file() else None,
    )


def finetune_encoder(params: str | Path, encoder_path: str | Path | None) -> nn.Module | None:
    """The trained frame encoder to fine-tune with the model when params.yaml ``encoder.finetune_encoder`` is on
    (``None`` when it is off). Raises ``ConfigError`` / ``FileNotFoundError`` naming what is missing."""
    if not load_params(params)["encoder"].finetune_encoder:
        return None
    if not encoder_path:
        raise ConfigError("encoder.finetune_encoder is on: pass --encoder (artifacts/encoder/encoder.pt) and --frames")
    return features.load_encoder(encoder_path)


def load_data(task: str, *, features_dir: str, frames_dir: str | None, encoder: nn.Module | None,
              tokens: str | None, data_config: DataConfig, seed: int) -> experiment.TaskData:
    """The task's train/val data: cached features, or frame pixels when an encoder is fine-tuned."""
    if encoder is None:
        source, pixel_dim = features_dir, None
    elif not frames_dir:
        raise ConfigError("encoder.finetune_encoder is on: pass --frames (artifacts/frames)")
    else:
        source, pixel_dim = frames_dir, int(encoder.feature_dim)  # type: ignore[arg-type]
    return experiment.load_task_data(task, features_dir=source, tokens_dir=tokens,
                                     activity_dir=data_config.activity_dir, activity_split=data_config.activity_split,
                                     seed=seed, pixel_feature_dim=pixel_dim)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The train stage's flags, shared by ``pipelines.train`` and this worker."""
    parser.add_argument("--task", required=True, help=f"one of {', '.join(experiment.TASKS)}")
    parser.add_argument("--model", required=True, help=f"one of {', '.join(experiment.FAMILIES)}")
    parser.add_argument("--params", default="params.yaml", help="params file (train and models sections)")
    parser.add_argument("--features", required=True, help="feature folder (artifacts/features)")
    parser.add_argument("--tokens", default=None, help="token folder (artifacts/tokens); captioning only")
    parser.add_argument("--encoder", default=None,
                        help="the encoder stage's encoder.pt; read only when params.yaml encoder.finetune_encoder is "
                             "on: the model then trains with this encoder in front, on --frames pixels")
    parser.add_argument("--frames", default=None,
                        help="frame folder (artifacts/frames); read only with encoder.finetune_encoder")
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="torchrun ... -m pipelines.train_ddp",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.add_argument("--repo-root", default=".",
                        help="anchors the MLflow store and .seqvision/parent_run_id (default: the current directory)")
    return parser.parse_args(argv)


def train(args: argparse.Namespace, data_config: DataConfig, train_config: TrainConfig,
          models_config: ModelsConfig) -> experiment.TrainSummary:
    """This rank's part of one training; the process group is already up."""
    encoder = finetune_encoder(args.params, args.encoder)
    with common.stage_work("train"):
        data = load_data(args.task, features_dir=args.features, frames_dir=args.frames, encoder=encoder,
                         tokens=args.tokens, data_config=data_config, seed=train_config.seed)
    tracker: tracking.Tracker | tracking.NullTracker = tracking.NullTracker()
    parent = None
    if args.tracking and distributed.is_rank0():
        tracker, parent = open_run(args.task, args.model, train_config=train_config, models_config=models_config,
                                   repo_root=Path(args.repo_root).resolve())
    with tracker, common.stage_work("train"):  # an exception marks the run FAILED; success is the creator's to report
        return experiment.run(
            args.task, args.model, data=data, train_config=train_config, models_config=models_config,
            out_dir=args.out, tracker=common.untimed(tracker), parent_run_id=parent, resume=args.resume,
            progress=args.progress,
            log=lambda note: print(f"train_ddp: {note}", flush=True), encoder=encoder,
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        missing = [key for key in TORCHRUN_ENV if key not in os.environ]
        if missing:
            raise ConfigError(f"{', '.join(missing)} unset: start this module with torchrun (see docs/ddp.md)")
        experiment.check_names(args.task, args.model)
        paths, train_config, models_config = resolve_configs(args.params, activity_dir=args.activity_dir,
                                                             activity_split=args.activity_split)
        if args.threads < 0:
            raise ConfigError(f"--threads must be >= 0, got {args.threads}")
    except USAGE_ERRORS as err:
        print(f"train_ddp: error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    rank = os.environ["RANK"]
    try:
        with distributed.process_group(device_type=resolve_device(train_config.device).type):
            summary = train(args, paths, train_config, models_config)
            world = distributed.world_size()
    except USAGE_ERRORS as err:
        print(f"train_ddp: error: rank {rank}: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the training failed; torchrun stops the other ranks
        traceback.print_exc()
        print(f"train_ddp: error: rank {rank}: {args.task}/{args.model}: {type(err).__name__}: {err}",
              file=sys.stderr)
        return 1
    if rank == "0":
        print(f"train_ddp: {args.task}/{args.model} on {world} processes: val {summary.metric} "
              f"{summary.best_val_metric:.3f} at epoch {summary.best_epoch} -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
