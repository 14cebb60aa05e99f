"""Worker of the train stage: one seed of one (task, model) training, then its test evaluation.

    python -m pipelines.train_worker --task activity --model lstm --seed-index 1 --params params.yaml \\
        --features artifacts/features --activity-dir data/annotations/ucf101 --out artifacts/runs/activity/lstm

``python -m pipelines.train`` starts one of these per seed (``train.seeds`` of them, as parallel processes: at most
one per CPU core or GPU) and aggregates what they write; run by hand, it trains one seed. The flags are those of
``pipelines.train`` (``pipelines.train_args``; Prefect-free, so a worker never imports Prefect) plus
``--seed-index``. Seed k trains with ``train.seed + k`` into ``--out/train/seed{k}``: checkpoints, history and
summary (``seqvision.experiment.run``; its best epoch chosen with the test decoder); then its ``best.pt`` predicts
the test split into ``--out/test/seed{k}`` (``seqvision.evaluate``; with ``--metadata``, the content metrics too). Workers write files only:
the stage process logs everything to MLflow once they are done.

Under ``torchrun`` (``pipelines.train --nproc-per-node N``; docs/ddp.md) every rank runs this module for the same
seed: the process group is opened (NCCL on GPU ``$LOCAL_RANK`` when ``train.device`` resolves to CUDA, else gloo),
``train.batch_size`` is the global batch, and rank 0 alone writes and evaluates.

Exit status: 0 done; 1 training failed; 2 bad arguments, params or inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from pathlib import Path

import torch

from pipelines.common import DEBUG_ENV, USAGE_ERRORS, follow_parent
from pipelines.train_args import TrainParams, add_arguments, check_inputs, read_train_params
from seqvision import distributed, experiment
from seqvision.config import EvaluateConfig
from seqvision.io import load_metadata
from seqvision.evaluate import evaluate_checkpoint
from seqvision.results import load_activity_labels, test_dir, train_dir
from seqvision.runtime import resolve_device

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.train_worker",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.add_argument("--seed-index", type=int, default=0,
                        help="which seed: train.seed + this, into --out/seed{this} (default 0)")
    return parser.parse_args(argv)


def train_seed(args: argparse.Namespace, params: TrainParams) -> experiment.TrainSummary:
    """Train seed ``args.seed_index`` and evaluate its best checkpoint on the test split (rank 0)."""
    out, tested = train_dir(args.out, args.seed_index), test_dir(args.out, args.seed_index)
    train_config = dataclasses.replace(params.train, seed=params.train.seed + args.seed_index)
    encoder = experiment.finetune_encoder(train_config.finetune_encoder, args.encoder)
    data = experiment.load_for_training(args.task, seed=train_config.seed, activity_dir=params.activity_dir,
                                        activity_split=params.activity_split, features_dir=args.features,
                                        frames_dir=args.frames, tokens_dir=args.tokens, encoder=encoder)
    summary = experiment.run(
        args.task, args.model, data=data, train_config=train_config, model_config=params.model_config,
        budget=params.budget, decoding=params.decoding, out_dir=out, resume=args.resume, progress=args.progress,
        log=lambda note: print(f"seed {args.seed_index}: {note}", flush=True), encoder=encoder,
    )
    if distributed.is_rank0():
        activity = None
        if args.task == "activity":
            activity = load_activity_labels(params.activity_dir, params.activity_split)
        # Activity models need no decoding settings; their test batch is the training batch.
        decoding = params.decoding or EvaluateConfig(batch_size=train_config.batch_size)
        evaluate_checkpoint(
            args.task, checkpoint_path=out / "best.pt", family=args.model, features_dir=args.features,
            frames_dir=args.frames, tokens_dir=args.tokens, activity=activity, out_dir=tested, config=decoding,
            device=train_config.device, metadata=load_metadata(args.metadata) if args.metadata else None,
        )
    distributed.barrier()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    follow_parent()  # the stage (or torchrun's agent) died: stop, rather than write into its outputs
    torchrun = all(key in os.environ for key in TORCHRUN_ENV)
    rank = os.environ.get("RANK", "0")
    try:
        if args.seed_index < 0:
            raise ValueError(f"--seed-index must be >= 0, got {args.seed_index}")
        params = read_train_params(args)
        check_inputs(args, params)
        if args.seed_index >= params.train.seeds:
            raise ValueError(f"--seed-index {args.seed_index}: train.seeds is {params.train.seeds}")
    except USAGE_ERRORS as err:
        print(f"train_worker: error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if torchrun:
            with distributed.process_group(device_type=resolve_device(params.train.device).type):
                summary = train_seed(args, params)
        else:
            summary = train_seed(args, params)
    except USAGE_ERRORS as err:
        print(f"train_worker: error: seed {args.seed_index}, rank {rank}: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the training failed; under torchrun the other ranks are stopped
        if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        print(f"train_worker: error: {args.task}/{args.model} seed {args.seed_index}: {type(err).__name__}: {err}",
              file=sys.stderr)
        return 1
    if rank == "0":
        state = "converged" if summary.converged else "not converged"
        print(f"train_worker: {args.task}/{args.model} seed {args.seed_index}: val {summary.metric} "
              f"{summary.best_val_metric:.3f} at epoch {summary.best_epoch} of {summary.epochs_run} ({state})",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
