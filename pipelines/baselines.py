"""baselines stage: non-learned reference points, scored like the models, in ``{out}/{task}/baseline_{name}/``.

    python -m pipelines.baselines --params params.yaml --features artifacts/features \\
        --tokens artifacts/tokens --out artifacts/eval

Activity: ``majority`` (most frequent training class) and ``nearest_neighbour`` (1-NN on mean-pooled frame
features, cosine). Image and video captioning: ``frequent_caption`` (most frequent training caption) and
``nearest_neighbour`` (the closest training item's consensus caption). Fitted on train, scored on test.
See seqvision/baselines.py.

Reads no params but ``data.activity_dir`` / ``activity_split`` (``--activity-dir`` / ``--activity-split`` override
them). Writes the evaluation layout of seqvision/results.py, as the trainings' test evaluations do.

Exit status: 0 done; 2 bad params or a missing input (one line on stderr).
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
    exit_fast,
    run_main,
)
from seqvision.baselines import BASELINES, PREFIX, run_baselines
from seqvision.config import load_params
from seqvision.io import load_metadata
from seqvision.results import HEADLINE, load_activity_labels


@task(**IO_RETRIES, cache_policy=NO_CACHE, task_run_name="baselines-{task_name}")
def task_baselines(task_name: str, **kwargs: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(r.name, r.metrics) for r in run_baselines([task_name], **kwargs)]


@flow(name="baselines")
def baselines_flow(
    *,
    out: str,
    tasks: tuple[str, ...] = tuple(BASELINES),
    activity_dir: str | None = None,
    activity_split: int | None = None,
    params: str = "params.yaml",
    features: str = "artifacts/features",
    tokens: str = "artifacts/tokens",
    metadata: str | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Every baseline of ``tasks``; returns ``{task: {name: metrics}}``. ``activity_dir`` / ``activity_split``
    (``main`` passes them, read once): the only params used; not given, they are read from the ``params`` file.
    ``metadata``: the synthetic benchmark's metadata.json (content metrics for the captioning baselines)."""
    logger = get_run_logger()
    activity = None
    if "activity" in tasks:
        if activity_dir is None or activity_split is None:
            loaded = load_params(params).data
            activity_dir = loaded.activity_dir if activity_dir is None else activity_dir
            activity_split = loaded.activity_split if activity_split is None else activity_split
        activity = load_activity_labels(activity_dir, activity_split)
    truth = load_metadata(metadata) if metadata else None
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for task_name in tasks:
        done = task_baselines(task_name, features_dir=features, tokens_dir=tokens, activity=activity,
                              out_root=out, metadata=truth)
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
    add_params_argument(parser, sections="data.activity_dir/activity_split")
    parser.add_argument("--tasks", nargs="+", default=list(BASELINES), choices=tuple(BASELINES), metavar="TASK",
                        help=f"tasks to run (default: all of {', '.join(BASELINES)})")
    parser.add_argument("--features", default="artifacts/features", help="feature arrays (artifacts/features)")
    parser.add_argument("--tokens", default="artifacts/tokens", help="vocabularies and references (captioning)")
    add_data_arguments(parser, ("activity_dir", "activity_split"))
    parser.add_argument("--metadata", default=None,
                        help="the synthetic benchmark's metadata.json: adds the content metrics to the captioning "
                             "baselines (a real dataset has none: leave it out)")
    parser.add_argument("--out", required=True, help="output root (artifacts/eval)")
    return parser.parse_args(argv)


def check_inputs(args: argparse.Namespace, activity_dir: str) -> None:
    folders = [("--features", args.features)]
    if set(args.tasks) - {"activity"}:
        folders.append(("--tokens", args.tokens))
    if "activity" in args.tasks:
        folders.append(("--activity-dir", activity_dir))
    for label, folder in folders:
        if not folder or not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder or '(empty)'}: no such folder ({label})")
    if args.metadata and not Path(args.metadata).is_file():
        raise FileNotFoundError(f"{args.metadata}: no such file (--metadata); leave it out for a real dataset")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> int:
        params = load_params(args.params)  # the only read of params.yaml in this process
        activity_dir, activity_split = (data_value(args, params, k) for k in ("activity_dir", "activity_split"))
        check_inputs(args, activity_dir)
        results = baselines_flow(out=args.out, tasks=tuple(args.tasks), activity_dir=activity_dir,
                                 activity_split=activity_split, features=args.features, tokens=args.tokens,
                                 metadata=args.metadata or None)
        for task_name, by_name in results.items():
            for line in summary_lines(task_name, by_name):
                print(f"baselines: {line}")
        print(f"baselines: -> {args.out}/{{task}}/{PREFIX}{{name}}")
        return 0

    return run_main("baselines", work, debug=args.debug)


if __name__ == "__main__":
    exit_fast(main())  # pipelines.common: skips the interpreter teardown
