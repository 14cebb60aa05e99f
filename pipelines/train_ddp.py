"""DDP worker of the train stage: ``torchrun`` starts one copy per process (rank).

    torchrun --standalone --nproc-per-node 2 -m pipelines.train_ddp --task activity --model lstm \\
        --params params.yaml --features artifacts/features --activity-dir data/annotations/ucf101 \\
        --out artifacts/train/activity/lstm

``python -m pipelines.train --nproc-per-node N`` runs exactly this under Prefect (see docs/ddp.md). The flags are
those of ``pipelines.train`` without ``--nproc-per-node``, plus ``--repo-root`` (``pipelines.train_args``, which
is Prefect-free, so the workers never import Prefect). Each worker reads params.yaml once.

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

from pipelines.common import USAGE_ERRORS
from pipelines.train_args import TrainParams, add_arguments, check_inputs, read_train_params
from seqvision import distributed, experiment, tracking
from seqvision.config import ConfigError
from seqvision.runtime import resolve_device

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


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


def train(args: argparse.Namespace, params: TrainParams) -> experiment.TrainSummary:
    """This rank's part of one training; the process group is already up."""
    encoder = experiment.finetune_encoder(params.train.finetune_encoder, args.encoder)
    data = experiment.load_for_training(args.task, seed=params.train.seed, activity_dir=params.activity_dir,
                                        activity_split=params.activity_split, features_dir=args.features,
                                        frames_dir=args.frames, tokens_dir=args.tokens, encoder=encoder)
    tracker: tracking.Tracker | tracking.NullTracker = tracking.NullTracker()
    parent = None
    if args.tracking and distributed.is_rank0():
        tracker, parent = tracking.open_training_run(
            args.task, args.model, repo_root=Path(args.repo_root).resolve(),
            params=experiment.tracked_params(args.task, args.model, train_config=params.train,
                                             model_config=params.model_config, budget=params.budget))
    with tracker:  # an exception marks the run FAILED; success is the creator's to report
        return experiment.run(
            args.task, args.model, data=data, train_config=params.train, model_config=params.model_config,
            budget=params.budget,
            out_dir=args.out, tracker=tracker, parent_run_id=parent, resume=args.resume, progress=args.progress,
            log=lambda note: print(f"train_ddp: {note}", flush=True), encoder=encoder,
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        missing = [key for key in TORCHRUN_ENV if key not in os.environ]
        if missing:
            raise ConfigError(f"{', '.join(missing)} unset: start this module with torchrun (see docs/ddp.md)")
        params = read_train_params(args)
        check_inputs(args, params)
    except USAGE_ERRORS as err:
        print(f"train_ddp: error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    rank = os.environ["RANK"]
    try:
        with distributed.process_group(device_type=resolve_device(params.train.device).type):
            summary = train(args, params)
            world = distributed.world_size()
    except USAGE_ERRORS as err:
        print(f"train_ddp: error: rank {rank}: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the training failed; torchrun stops the other ranks
        if args.debug:
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
