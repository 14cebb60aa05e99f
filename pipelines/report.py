"""report stage: every training's seeds and every baseline -> ``reports/report.html``, ``report.md``, ``summary.json``.

    python -m pipelines.report --runs artifacts/runs --baselines artifacts/eval --frames artifacts/frames \\
        --features artifacts/features --tokens artifacts/tokens --metadata data/annotations/metadata.json --out reports

Per task: the runs (seeds, convergence, parameter count against the budget, training cost), every metric as a mean
over seeds with its 95% interval (content metrics first on the synthetic benchmark, then coco-caption), pairwise
verdicts from a paired two-level bootstrap over seeds and test items with Holm's correction (ties print as "~"),
learning curves per seed, confusion matrices (activity), the per-template CIDEr-D ceiling (image captioning, with
--metadata) and correct and failed test examples with their frames; for captioning, each example also shows where the
best model looked for each word of its caption (its attention, replayed with the checkpoint of the seed shown; needs
--features and --tokens). report.html is self-contained (opens offline); report.md links the figures in figures/;
summary.json holds every number the summary states. METEOR is scored here, for every captioning seed in one Java
process (--meteor, which dvc.yaml sets from params.yaml report.compute_meteor); the train and baselines stages leave
it null.

MLflow: the report files are logged on the comparison's parent run (--parent-run-id, else
$SEQVISION_PARENT_RUN_ID, else every parent run named by the train summaries), with every run's headline and verdict
metrics (mean over seeds and interval: ``activity.lstm.top1``, ``...top1.ci95_low``) on the parent, each model's
test metrics scored here (METEOR: ``test/meteor`` mean, ``test/meteor/seed<k>``) on its child run, and the attention
figures of a task's examples under ``attention/`` on the child run of the family they show; then the parent run is
ended FINISHED. Then each task's best model (the family ranked first on the primary metric, its seed with the best
validation metric) is logged on its child run and registered as ``seqvision-{task}`` with alias ``best`` (README,
"Loading the best model from MLflow"). Without a parent run id, nothing is logged.

Exit status: 0 done; 1 the report was written but MLflow logging failed; 2 a missing input folder or a bad
metadata.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from pipelines.common import IO_RETRIES, exit_fast, run_main
from seqvision import report, tracking
from seqvision.config import MODEL_FAMILIES, TASKS


class TrackingError(RuntimeError):
    """The report exists, but it could not be logged to MLflow."""


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def collect(runs: str, baselines: str | None, tasks: tuple[str, ...], models: tuple[str, ...]) -> dict[str, list[Any]]:
    return report.load_runs(runs_dir=runs, baselines_dir=baselines, tasks=tasks, models=models)


@task(cache_policy=NO_CACHE)
def score_meteor(runs: dict[str, list[Any]], mode: str) -> tuple[dict[str, list[Any]], str]:
    return report.add_meteor(runs, mode=mode)


@task(cache_policy=NO_CACHE)
def analyse(runs: dict[str, list[Any]], frames: str | None, metadata: str | None, examples: int, resamples: int,
            seed: int, features: str | None, tokens: str | None) -> list[Any]:
    return report.build_sections(runs, frames_dir=frames, examples=examples, metadata=metadata,
                                 features_dir=features, tokens_dir=tokens, resamples=resamples, seed=seed)


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def render(sections: list[Any], out: str, resamples: int, seed: int) -> dict[str, Path]:
    return report.write_report(sections, out, resamples=resamples, seed=seed)


@task(cache_policy=NO_CACHE, tags=["orchestration"])  # MLflow bookkeeping, not work (benchmarks/pipeline.py)
def publish(runs: dict[str, list[Any]], sections: list[Any], paths: dict[str, Path], parent_run_id: str,
            repo_root: str) -> int:
    metrics = report.parent_metrics(runs)
    try:
        tracking.publish_comparison(
            parent_run_id, repo_root=repo_root, metrics=metrics,
            child_metrics=report.child_metrics(runs, parent_run_id=parent_run_id),
            files=[paths["html"], paths["md"], paths["summary"], paths["runinfo"]],
            folders={"report/figures": paths["figures"]} if paths.get("figures") else None,
            child_artifacts=report.child_artifacts(sections, paths["figures"], parent_run_id=parent_run_id),
        )
        return len(metrics)
    except Exception as err:  # noqa: BLE001 - any store error: the report itself is done
        raise TrackingError(f"report written, but logging it on MLflow run {parent_run_id} failed: "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err


@task(cache_policy=NO_CACHE)
def register_best(sections: list[Any], repo_root: str) -> list[str]:
    """Each task's best model (``report.best_models``) logged on its child run and registered as
    ``seqvision-{task}`` with alias ``best``; returns one line per task."""
    logger = get_run_logger()
    lines = []
    for best in report.best_models(sections):
        what = f"{best.task}: {best.family} seed {best.seed} ({best.metric} {best.mean:.3f} on test, mean over seeds)"
        if best.run_id is None or not best.checkpoint.is_file():
            missing = "MLflow child run" if best.run_id is None else str(best.checkpoint)
            logger.warning(f"{what}: not registered (no {missing})")
            continue
        try:
            version = tracking.log_model(
                best.checkpoint, run_id=best.run_id, repo_root=repo_root,
                register_as=tracking.registered_model_name(best.task),
                tags={"seqvision.task": best.task, "seqvision.family": best.family, "seqvision.seed": best.seed,
                      "seqvision.metric": best.metric, f"test/{best.metric}": best.mean},
            )
        except Exception as err:  # noqa: BLE001 - any store error: the report itself is done
            raise TrackingError(f"report written, but registering the best {best.task} model failed: "
                                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
        lines.append(f"{tracking.registered_model_name(best.task)}@{tracking.BEST_ALIAS} = version {version}: {what}")
        logger.info(lines[-1])
    return lines


@flow(name="report")
def report_flow(
    *,
    out: str,
    runs: str = "artifacts/runs",
    baselines: str | None = "artifacts/eval",
    frames: str | None = "artifacts/frames",
    features: str | None = "artifacts/features",
    tokens: str | None = "artifacts/tokens",
    metadata: str | None = None,
    tasks: tuple[str, ...] = TASKS,
    models: tuple[str, ...] = MODEL_FAMILIES,
    examples: int = 3,
    parent_run_id: str | None = None,
    mlflow: bool = True,
    repo_root: str = ".",
    meteor: str = "auto",
    resamples: int = report.RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the report; log it on the MLflow parent run. Returns paths, parent run id and counts."""
    logger = get_run_logger()
    loaded = collect(runs, baselines, tasks, models)
    # quote(): the runs and sections go to the tasks as they are; Prefect would otherwise walk every seed's records
    # in them looking for futures, 0.9 s of each report (docs/benchmarks.md, "Flow-run heartbeats").
    loaded, note = score_meteor(quote(loaded), meteor)
    logger.info(note)
    for task_name, task_runs in loaded.items():
        absent = [f"{r.name} ({r.status})" for r in task_runs if not r.ok]
        if absent:
            logger.warning(f"{task_name}: not available: {', '.join(absent)}")
    sections = analyse(quote(loaded), frames, metadata, examples, resamples, seed, features, tokens)
    for section in sections:
        logger.info(f"{section.task}: {section.verdict[0]}")
        if section.task != "activity" and section.examples:
            shown = len(report.attention_figures(section))
            logger.info(f"{section.task}: attention of {section.best} for {shown} of {len(section.examples)} examples"
                        + ("" if shown else " (no attention in the family, or no checkpoint, features or vocabulary)"))
    paths = render(quote(sections), out, resamples, seed)
    result: dict[str, Any] = {"paths": paths, "parent_run_ids": [], "logged_metrics": 0, "registered": [],
                              "runs": sum(len(v) for v in loaded.values()),
                              "ok": sum(r.ok for v in loaded.values() for r in v)}
    if not mlflow:
        return result
    # Usually one parent; a partial retrain after the parent was ended starts another one, and then every
    # parent named by a summary gets the whole report, so whichever comparison run one opens has it.
    explicit = parent_run_id or os.environ.get(tracking.PARENT_RUN_ENV)
    parents = [explicit] if explicit else report.parent_run_ids(loaded)
    if not parents:
        logger.warning("no MLflow parent run id (train summaries, $SEQVISION_PARENT_RUN_ID or --parent-run-id): "
                       "the report is not logged to MLflow")
        return result
    result["parent_run_ids"] = parents
    root = str(Path(repo_root).resolve())
    for parent in parents:
        result["logged_metrics"] = publish(quote(loaded), quote(sections), paths, parent, root)
    result["registered"] = register_best(quote(sections), root)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.report",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", default="artifacts/runs", help="train stage outputs: {task}/{model}/ (every seed)")
    parser.add_argument("--baselines", default="artifacts/eval",
                        help="baselines stage outputs: {task}/baseline_{name}/ ('' for none)")
    parser.add_argument("--frames", default="artifacts/frames", help="frame shards for the examples ('' for none)")
    parser.add_argument("--features", default="artifacts/features",
                        help="features the captioners read, for the attention of the examples ('' for none)")
    parser.add_argument("--tokens", default="artifacts/tokens",
                        help="vocabularies of the captioners, for the attention of the examples ('' for none)")
    parser.add_argument("--metadata", default="",
                        help="the synthetic benchmark's metadata.json, for the per-template CIDEr-D ceiling of image "
                             "captioning ('' for none: real data; params.yaml data.metadata)")
    parser.add_argument("--out", required=True, help="output folder (reports)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, metavar="TASK",
                        help=f"tasks in the report (default: {' '.join(TASKS)})")
    parser.add_argument("--models", nargs="+", default=list(MODEL_FAMILIES), choices=MODEL_FAMILIES, metavar="MODEL",
                        help=f"model families expected per task; absent ones are marked (default: "
                             f"{' '.join(MODEL_FAMILIES)})")
    parser.add_argument("--examples", type=int, default=3, help="correct and failed examples per task (default: 3)")
    parser.add_argument("--resamples", type=int, default=report.RESAMPLES,
                        help=f"bootstrap resamples per comparison (default: {report.RESAMPLES})")
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's seed (default: 0)")
    parser.add_argument("--parent-run-id", default=None, help="MLflow parent run (default: from the train summaries)")
    parser.add_argument("--no-mlflow", dest="mlflow", action="store_false", help="do not log to MLflow")
    parser.add_argument("--meteor", default="auto", choices=("auto", "always", "never"),
                        help="METEOR for every captioning seed, in one Java process: auto = when java is on PATH "
                             "(else the table says unavailable), always = fail without Java (params.yaml "
                             "report.compute_meteor; default: auto)")
    parser.add_argument("--repo-root", default=".", help="where mlflow.db lives unless MLFLOW_TRACKING_URI is set")
    parser.add_argument("--debug", action="store_true", help="print tracebacks with errors (also: SEQVISION_DEBUG=1)")
    args = parser.parse_args(argv)
    if args.examples < 0:
        parser.error(f"--examples must be >= 0, got {args.examples}")
    if args.resamples < 100:
        parser.error(f"--resamples must be >= 100 (a 95% interval needs its tails), got {args.resamples}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> int:
        if not Path(args.runs).is_dir():
            raise FileNotFoundError(f"{args.runs}: no such folder (--runs); run the train stages first")
        if args.metadata and not Path(args.metadata).is_file():
            raise FileNotFoundError(f"{args.metadata}: no such file (--metadata); pass --metadata '' for real data")
        try:
            result = report_flow(
                out=args.out, runs=args.runs, baselines=args.baselines or None, frames=args.frames or None,
                features=args.features or None, tokens=args.tokens or None,
                metadata=args.metadata or None, tasks=tuple(args.tasks), models=tuple(args.models),
                examples=args.examples, parent_run_id=args.parent_run_id, mlflow=args.mlflow,
                repo_root=args.repo_root, meteor=args.meteor, resamples=args.resamples, seed=args.seed,
            )
        except TrackingError as err:
            print(f"report: error: {err}", file=sys.stderr)
            return 1
        paths = result["paths"]
        print(f"report: {result['ok']}/{result['runs']} runs available")
        print(f"report: {paths['html']} (self-contained), {paths['md']} and {paths['summary']}; "
              f"what the runs cost: {paths['runinfo']}")
        if result["parent_run_ids"]:
            print(f"report: logged on MLflow parent run {', '.join(result['parent_run_ids'])} "
                  f"({result['logged_metrics']} metrics, run ended FINISHED); browse with `make mlflow-ui`")
            for line in result["registered"]:
                print(f"report: registered {line}")
        else:
            print("report: not logged to MLflow (no parent run id); `make mlflow-ui` shows the training runs")
        return 0

    return run_main("report", work, debug=args.debug)


if __name__ == "__main__":
    exit_fast(main())  # pipelines.common: skips the interpreter teardown
