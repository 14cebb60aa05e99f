"""baselines stage: non-learned reference points, scored like the models, in ``{out}/{task}/baseline_{name}/``.

    python -m pipelines.baselines --params params.yaml --features artifacts/features \\
        --tokens artifacts/tokens --out artifacts/eval

Activity: ``majority`` (most frequent training class) and ``nearest_neighbour`` (1-NN on mean-pooled frame
features, cosine). Image and video captioning: ``frequent_caption`` (most frequent training caption) and
``nearest_neighbour`` (the closest training item's consensus caption). Fitted on train, scored on test.
See seqvision/baselines_eval.py.

Reads the ``evaluate`` section of params.yaml (compute_meteor); activity labels come from
``--activity-dir`` / ``--activity-split`` (default: params.yaml ``data:``). Same files as the evaluate stage.

Exit status: 0 done; 2 bad params or a missing input (one line on stderr).
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
from seqvision.baselines_eval import BASELINES, PREFIX, run_baselines
from seqvision.config import ConfigError
from seqvision.evaluate import HEADLINE, load_activity_labels

INPUT_ERRORS = (ConfigError, FileNotFoundError, annotations.AnnotationError, ValueError)


@task(**IO_RETRIES, cache_policy=NO_CACHE, task_run_name="baselines-{task_name}")
def task_baselines(task_name: str, **kwargs: Any) -> list[tuple[str, dict[str, Any]]]:
    with stage_work("baselines"):
        return [(r.name, r.metrics) for r in run_baselines([task_name], **kwargs)]


@flow(name="baselines")
def baselines_flow(
    *,
    out: str,
    tasks: tuple[str, ...] = tuple(BASELINES),
    params: str = "params.yaml",
    features: str = "artifacts/features",
    tokens: str = "artifacts/tokens",
    activity_dir: str | None = None,
    activity_split: int | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Every baseline of ``tasks``; returns ``{task: {name: metrics}}``."""
    logger = get_run_logger()
    data, config = resolve_configs(params, {"activity_dir": activity_dir, "activity_split": activity_split},
                                   "evaluate")
    activity = None
    if "activity" in tasks:
        with stage_work("baselines"):
            activity = load_activity_labels(data.activity_dir, data.activity_split)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for task_name in tasks:
        done = task_baselines(task_name, features_dir=features, tokens_dir=tokens, activity=activity,
                              out_root=out, config=config)
        results[task_name] = dict(done)
        for line in summary_lines(task_name, results[task_name]):
            logger.info(line)
    return results


def summary_lines(task_name: str, results: dict[str, dict[str, Any]]) -> list[str]:
    headline = HEADLINE[task_name]
    return [f"{task_name}/{PREFIX}{name}: {headline} = {m[headline]:.4f} on {m['num_items']} test items"
            for name, m in results.items()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.baselines",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--params", default="params.yaml", help="params file; its evaluate section is used")
    parser.add_argument("--tasks", nargs="+", default=list(BASELINES), choices=tuple(BASELINES), metavar="TASK",
                        help=f"tasks to run (default: all of {', '.join(BASELINES)})")
    parser.add_argument("--features", default="artifacts/features", help="feature arrays (artifacts/features)")
    parser.add_argument("--tokens", default="artifacts/tokens", help="vocabularies and references (captioning)")
    parser.add_argument("--activity-dir", default=None, help="UCF101-layout labels (default: params.yaml data.activity_dir)")
    parser.add_argument("--activity-split", type=int, default=None,
                        help="UCF101 split number (default: params.yaml data.activity_split)")
    parser.add_argument("--out", required=True, help="output root (artifacts/eval)")
    return parser.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> None:
    data, _ = resolve_configs(args.params, {"activity_dir": args.activity_dir,
                                            "activity_split": args.activity_split}, "evaluate")
    folders = [("--features", args.features)]
    if set(args.tasks) - {"activity"}:
        folders.append(("--tokens", args.tokens))
    if "activity" in args.tasks:
        folders.append(("--activity-dir", data.activity_dir))
    for label, folder in folders:
        if not folder or not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder or '(empty)'}: no such folder ({label})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_inputs(args)
        results = baselines_flow(
            out=args.out, tasks=tuple(args.tasks), params=args.params, features=args.features, tokens=args.tokens,
            activity_dir=args.activity_dir, activity_split=args.activity_split,
        )
    except INPUT_ERRORS as err:
        print(f"baselines: error: {err}", file=sys.stderr)
        return 2
    for task_name, by_name in results.items():
        for line in summary_lines(task_name, by_name):
            print(f"baselines: {line}")
    print(f"baselines: -> {args.out}/{{task}}/{PREFIX}{{name}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
