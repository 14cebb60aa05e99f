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

from pipelines.common import (
    IO_RETRIES,
    add_data_arguments,
    add_params_argument,
    data_value,
    require_files,
    run_main,
)
from seqvision.config import TASKS, EvaluateConfig, load_params
from seqvision.evaluate import evaluate_checkpoint
from seqvision.results import HEADLINE, load_activity_labels
from seqvision.models import MODELS


@task(**IO_RETRIES, cache_policy=NO_CACHE)  # DVC decides what reruns, not a Prefect cache
def evaluate_model(task_name: str, model: str, **kwargs: Any) -> dict[str, Any]:
    return evaluate_checkpoint(task_name, family=model, **kwargs)


@flow(name="evaluate")
def evaluate_flow(
    *,
    task_name: str,
    model: str,
    checkpoint: str,
    out: str,
    config: EvaluateConfig | None = None,
    activity_dir: str | None = None,
    activity_split: int | None = None,
    params: str = "params.yaml",
    features: str = "artifacts/features",
    frames: str | None = "artifacts/frames",
    tokens: str = "artifacts/tokens",
    device: str = "auto",
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on the test split into ``out``; returns the metrics. ``config``: the ``evaluate``
    section and ``activity_dir`` / ``activity_split`` (``main`` passes them, read once); what is not given is read
    from the ``params`` file (a deployment run)."""
    logger = get_run_logger()
    if config is None or (task_name == "activity" and (activity_dir is None or activity_split is None)):
        loaded = load_params(params)
        config = config or loaded.evaluate
        activity_dir = loaded.data.activity_dir if activity_dir is None else activity_dir
        activity_split = loaded.data.activity_split if activity_split is None else activity_split
    activity = None
    if task_name == "activity":
        activity = load_activity_labels(activity_dir, activity_split)
    result = evaluate_model(
        task_name, model, checkpoint_path=checkpoint, features_dir=features, frames_dir=frames, tokens_dir=tokens,
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
    add_params_argument(parser, sections="evaluate and data.activity_dir/activity_split")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--model", required=True, choices=tuple(MODELS), help="model family of the checkpoint")
    parser.add_argument("--checkpoint", required=True, help="best.pt written by the train stage")
    parser.add_argument("--features", default="artifacts/features", help="feature arrays (artifacts/features)")
    parser.add_argument("--frames", default="artifacts/frames",
                        help="frame shards, used only by checkpoints that fine-tune their encoder")
    parser.add_argument("--tokens", default="artifacts/tokens", help="vocabularies and references (captioning)")
    add_data_arguments(parser, ("activity_dir", "activity_split"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto picks CUDA when present")
    parser.add_argument("--out", required=True, help="output folder (artifacts/eval/{task}/{model})")
    return parser.parse_args(argv)


def check_inputs(args: argparse.Namespace, activity_dir: str) -> None:
    """Fail fast, naming the path, before Prefect starts."""
    require_files(args.checkpoint, stage="train")
    for label, folder in (("--features", args.features),) + (
        (("--tokens", args.tokens),) if args.task != "activity" else ()
    ):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: no such folder ({label})")
    if args.task == "activity":
        if not activity_dir or not Path(activity_dir).is_dir():
            raise FileNotFoundError(f"{activity_dir or '(empty)'}: no activity label folder (--activity-dir)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> int:
        params = load_params(args.params)  # the only read of params.yaml in this process
        activity_dir, activity_split = "", 1  # read only for activity: captioning depends on no labels
        if args.task == "activity":
            activity_dir, activity_split = (data_value(args, params, k) for k in ("activity_dir", "activity_split"))
        check_inputs(args, activity_dir)
        result = evaluate_flow(
            task_name=args.task, model=args.model, checkpoint=args.checkpoint, out=args.out, config=params.evaluate,
            activity_dir=activity_dir, activity_split=activity_split, features=args.features, frames=args.frames,
            tokens=args.tokens, device=args.device,
        )
        print(f"evaluate: {summary(args.task, args.model, result)} -> {args.out}")
        return 0

    return run_main("evaluate", work, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
