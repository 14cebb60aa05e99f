"""evaluate stage: one trained model on the test split -> predictions, metrics and confusion in ``--out``.

    python -m pipelines.evaluate --params params.yaml --task activity --model lstm \\
        --checkpoint artifacts/train/activity/lstm/best.pt --features artifacts/features \\
        --frames artifacts/frames --tokens artifacts/tokens --out artifacts/eval/activity/lstm

Reads the ``evaluate`` section of params.yaml (the whole file is validated first); activity labels come
from ``--activity-dir`` / ``--activity-split`` (default: params.yaml ``data:``). Captioners decode with
beam search (evaluate.beam_size, length_penalty, max_length), never teacher forcing.

Outputs in ``--out`` (layout in seqvision/evaluate.py): predictions.jsonl, metrics.json, details.json and
plots/ (activity: plots/confusion.csv for the ``dvc plots`` confusion template). Caption metrics are raw
coco-caption values: BLEU/METEOR/ROUGE-L in [0, 1], CIDEr-D not x100 (it can exceed 1).

Exit status: 0 done; 2 bad params, a missing input or inputs that do not fit together (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipelines.common import IO_RETRIES, resolve_configs, stage_work
from seqvision import annotations
from seqvision.config import ConfigError
from seqvision.evaluate import HEADLINE, evaluate_checkpoint, load_activity_labels
from seqvision.models import MODELS, TASKS

INPUT_ERRORS = (ConfigError, FileNotFoundError, annotations.AnnotationError, ValueError)


@task(**IO_RETRIES, cache_policy=NO_CACHE)  # DVC decides what reruns, not a Prefect cache
def evaluate_model(task_name: str, model: str, **kwargs: Any) -> dict[str, Any]:
    with stage_work("evaluate"):
        return evaluate_checkpoint(task_name, family=model, **kwargs)


@flow(name="evaluate")
def evaluate_flow(
    *,
    task_name: str,
    model: str,
    checkpoint: str,
    out: str,
    params: str = "params.yaml",
    features: str = "artifacts/features",
    frames: str | None = "artifacts/frames",
    tokens: str = "artifacts/tokens",
    activity_dir: str | None = None,
    activity_split: int | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on the test split into ``out``; returns the metrics."""
    logger = get_run_logger()
    data, config = resolve_configs(params, {"activity_dir": activity_dir, "activity_split": activity_split},
                                   "evaluate")
    activity = None
    if task_name == "activity":
        with stage_work("evaluate"):
            activity = load_activity_labels(data.activity_dir, data.activity_split)
    result = evaluate_model(
        task_name, model, checkpoint=checkpoint, features_dir=features, frames_dir=frames, tokens_dir=tokens,
        activity=activity, out_dir=out, config=config, device=device,
    )
    logger.info(summary(task_name, model, result))
    return result


def summary(task_name: str, model: str, result: dict[str, Any]) -> str:
    headline = HEADLINE[task_name]
    return (f"{task_name}/{model}: {headline} = {result[headline]:.4f} on {result['num_items']} test items "
            f"({result['decode_time_s']:.1f} s, {result['items_per_s']:.0f} items/s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.evaluate",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--params", default="params.yaml", help="params file; its evaluate section is used")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--model", required=True, choices=tuple(MODELS), help="model family of the checkpoint")
    parser.add_argument("--checkpoint", required=True, help="best.pt written by the train stage")
    parser.add_argument("--features", default="artifacts/features", help="feature arrays (artifacts/features)")
    parser.add_argument("--frames", default="artifacts/frames",
                        help="frame shards, used only by checkpoints that fine-tune their encoder")
    parser.add_argument("--tokens", default="artifacts/tokens", help="vocabularies and references (captioning)")
    parser.add_argument("--activity-dir", default=None, help="UCF101-layout labels (default: params.yaml data.activity_dir)")
    parser.add_argument("--activity-split", type=int, default=None,
                        help="UCF101 split number (default: params.yaml data.activity_split)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto picks CUDA when present")
    parser.add_argument("--out", required=True, help="output folder (artifacts/eval/{task}/{model})")
    return parser.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> None:
    """Fail fast, naming the path, before Prefect starts."""
    data, _ = resolve_configs(args.params, {"activity_dir": args.activity_dir,
                                            "activity_split": args.activity_split}, "evaluate")
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"{args.checkpoint}: no such checkpoint; run the train stage first")
    for label, folder in (("--features", args.features),) + (
        (("--tokens", args.tokens),) if args.task != "activity" else ()
    ):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: no such folder ({label})")
    if args.task == "activity":
        activity_dir = data.activity_dir
        if not activity_dir or not Path(activity_dir).is_dir():
            raise FileNotFoundError(f"{activity_dir or '(empty)'}: no activity label folder (--activity-dir)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_inputs(args)
        result = evaluate_flow(
            task_name=args.task, model=args.model, checkpoint=args.checkpoint, out=args.out, params=args.params,
            features=args.features, frames=args.frames, tokens=args.tokens, activity_dir=args.activity_dir,
            activity_split=args.activity_split, device=args.device,
        )
    except INPUT_ERRORS as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    print(f"evaluate: {summary(args.task, args.model, result)} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
