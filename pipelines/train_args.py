"""The train stage's flags and input checks, shared by ``pipelines.train`` (the Prefect flow) and
``pipelines.train_worker`` (one seed, alone or under torchrun). Prefect-free: the workers never import Prefect
(seconds per process on a busy machine, for nothing they use)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seqvision.config import MODEL_FAMILIES, TASKS, ConfigError, EvaluateConfig, TrainConfig, load_params
from seqvision.tasks import task_spec

from pipelines.common import add_data_arguments, add_params_argument, data_value


@dataclass(frozen=True)
class TrainParams:
    """The params one training reads, nothing else: ``dvc.yaml`` lists exactly these for ``train@{task}-{model}``
    (tests/test_dvc_deps.py checks it)."""

    train: TrainConfig
    model_config: Any  # the family's models: section
    budget: int | None  # models.match_params.<task>
    decoding: EvaluateConfig | None  # captioning: the evaluate section (picks the best epoch, predicts test)
    activity_dir: str  # activity: the label lists ("" for captioning, which reads none)
    activity_split: int


def read_train_params(args: argparse.Namespace) -> TrainParams:
    """params.yaml (validated once, whole) -> what the training of ``args.task`` / ``args.model`` reads."""
    params = load_params(args.params)
    activity = args.task == "activity"
    return TrainParams(
        train=params.train, model_config=params.models.family(args.model),
        budget=params.models.match_params.budget(args.task),
        decoding=None if activity else params.evaluate,
        activity_dir=data_value(args, params, "activity_dir") if activity else "",
        activity_split=data_value(args, params, "activity_split") if activity else 1,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The train stage's flags."""
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--model", required=True, choices=MODEL_FAMILIES, help="model family")
    add_params_argument(parser, sections="train, models.<model>, models.match_params.<task>, and evaluate "
                                         "(captioning) or data.activity_dir/activity_split (activity)")
    parser.add_argument("--features", required=True, help="feature folder (artifacts/features)")
    parser.add_argument("--tokens", default=None, help="token folder (artifacts/tokens); captioning only")
    parser.add_argument("--encoder", default=None,
                        help="the encoder stage's encoder.pt; read only when params.yaml train.finetune_encoder is "
                             "on: the model then trains with this encoder in front, on --frames pixels")
    parser.add_argument("--frames", default=None,
                        help="frame folder (artifacts/frames); read only with train.finetune_encoder")
    add_data_arguments(parser, ("activity_dir", "activity_split"))
    parser.add_argument("--metadata", default=None,
                        help="the synthetic benchmark's metadata.json: adds the content metrics to a captioner's test "
                             "evaluation (a real dataset has none: leave it out)")
    parser.add_argument("--out", required=True, help="output folder (artifacts/runs/{task}/{model}); seed k trains "
                                                     "into --out/train/seed{k} and --out/test/seed{k}")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="continue each seed from its last.pt when that was written for the same params and "
                             "inputs (default: on)")
    parser.add_argument("--tracking", action=argparse.BooleanOptionalAction, default=True,
                        help="log the training as a child MLflow run of the comparison (default: on)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these small sequence models run fastest single-"
                             "threaded on a shared CPU, see docs/benchmarks.md; 0: the stage shares OMP_NUM_THREADS "
                             "or the usable cores among its seeds, a worker keeps torch's default)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="per-epoch progress bar (default: only when stderr is a terminal)")


def check_inputs(args: argparse.Namespace, params: TrainParams) -> None:
    """Fail fast, naming the path, when an input the training reads is missing (before Prefect starts)."""
    spec = task_spec(args.task)
    finetune = params.train.finetune_encoder
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {args.threads}")
    if finetune and not (args.frames and args.encoder):
        raise ConfigError("train.finetune_encoder is on: pass --frames (artifacts/frames) and --encoder "
                          "(artifacts/encoder/encoder.pt)")
    if finetune:
        needed = [(Path(args.frames) / "index.json", "extract"), (Path(args.encoder), "encoder")]
    else:
        features = Path(args.features)
        needed = [(features / "index.json", "features")]
        needed += [(features / f"{spec.kind}-{split}.npy", "features") for split in ("train", "val")]
    if args.metadata and not Path(args.metadata).is_file():
        raise FileNotFoundError(f"{args.metadata}: no such file (--metadata); leave it out for a real dataset")
    if spec.corpus is None:
        if not params.activity_dir:
            raise ConfigError("activity needs its label lists: pass --activity-dir or set data.activity_dir")
        needed.append((Path(params.activity_dir) / "classInd.txt", "the data"))
    else:
        if not args.tokens:
            raise ConfigError(f"--tokens is required for --task {args.task}")
        needed.append((Path(args.tokens) / spec.corpus / "vocab.json", "tokenize"))
    for path, stage in needed:
        if path.is_file():
            continue
        if stage == "features" and path.suffix == ".npy" and (Path(args.features) / "index.json").is_file():
            split = path.stem.rsplit("-", 1)[-1]
            raise FileNotFoundError(f"{path}: missing, though {Path(args.features) / 'index.json'} exists: the data "
                                    f"has no {spec.kind} in its {split} split")
        where = "check --activity-dir / data.activity_dir" if stage == "the data" else f"run the {stage} stage first"
        raise FileNotFoundError(f"{path}: no such file; {where}")
