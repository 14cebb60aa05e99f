"""study_report stage: the study's row JSONs -> "The seed's table, measured" (docs/study.md), and its MLflow runs.

    python -m pipelines.study_report --rows artifacts/study --out reports

Writes ``{out}/study.md``, a self-contained ``{out}/study.html`` and the figures in ``{out}/study/``, drawn from the
JSON alone (``RowResult.from_json``); a row without its JSON is reported as not run. Then MLflow: a new parent run
"study" (experiment seqvision-study) with the report and the rows' JSON, and one child run per table cell (row x
column, e.g. compute/RNNs), tagged claim / measured / verdict, with the fitted exponents, speedups or differences and
their interval ends as metrics and the row's JSON and figure as artifacts.

Exit status: 0 done; 1 the report was written but MLflow logging failed; 2 no row JSON, or a bad argument.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipelines.common import IO_RETRIES, StageFailed, exit_fast, run_main
from seqvision import tracking
from seqvision.study.report import mlflow_cells, read_environments, write_report
from seqvision.study.run import ROWS, load_results, row_file

REPORT_FILES = ("study.md", "study.html")
FIGURES = "study"  # {out}/study/{row}.png


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def render(rows_dir: str, out: str) -> dict[str, Any]:
    results = load_results(rows_dir)
    if not results:
        raise FileNotFoundError(f"{rows_dir}: no row JSON ({', '.join(f'{r}.json' for r in ROWS)}); run the study's "
                                "rows first (dvc repro study_report, or python -m pipelines.study all)")
    written = write_report(results, markdown=Path(out) / REPORT_FILES[0], html=Path(out) / REPORT_FILES[1],
                           figures_dir=Path(out) / FIGURES, environments=read_environments(rows_dir, list(results)))
    return {"results": results, "written": written}


@task(cache_policy=NO_CACHE, tags=["orchestration"])  # MLflow bookkeeping, not work
def publish(rendered: dict[str, Any], rows_dir: str, repo_root: str) -> tuple[str, dict[str, str]]:
    results, written = rendered["results"], rendered["written"]
    cells = mlflow_cells(results, figures=written.figures, rows_dir=rows_dir)
    # The rows' JSON, which the report is drawn from; not their trainings' folders (hundreds of MB of checkpoints).
    files = {"report": [written.markdown, written.html], "rows": [row_file(rows_dir, r) for r in results]}
    return tracking.publish_study(
        cells, repo_root=repo_root, files=files,
        folders={"report/study": Path(written.markdown).parent / FIGURES},
        tags={"seqvision.study.rows": ",".join(results)},
    )


@flow(name="study-report")
def study_report_flow(*, rows: str = "artifacts/study", out: str = "reports", mlflow: bool = True,
                      repo_root: str = ".") -> dict[str, Any]:
    """The row JSONs in ``rows`` -> ``{out}/study.md``, ``study.html``, ``study/*.png``; logged on a new MLflow parent
    run with a child per table cell (``repo_root`` anchors the store unless MLFLOW_TRACKING_URI is set). Returns the
    paths, the rows reported and the MLflow run ids."""
    logger = get_run_logger()
    rendered = render(rows, out)
    results, written = rendered["results"], rendered["written"]
    missing = [r for r in ROWS if r not in results]
    if missing:
        logger.warning(f"not in {rows}, so reported as not run: {', '.join(missing)}")
    summary: dict[str, Any] = {"markdown": str(written.markdown), "html": str(written.html),
                               "figures": {k: str(v) for k, v in written.figures.items()}, "rows": list(results),
                               "parent_run_id": None, "child_run_ids": {}}
    if mlflow:
        summary["parent_run_id"], summary["child_run_ids"] = publish(rendered, rows, str(Path(repo_root).resolve()))
        logger.info(f"MLflow: parent run {summary['parent_run_id']} with {len(summary['child_run_ids'])} cells")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.study_report", description=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="artifacts/study", help="folder of the rows' JSON (default: %(default)s)")
    parser.add_argument("--out", default="reports", help="report folder (default: %(default)s)")
    parser.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=True,
                        help="log the report on a new parent run with a child per table cell (default: on)")
    parser.add_argument("--repo-root", default=".", help="where mlflow.db lives unless MLFLOW_TRACKING_URI is set "
                                                         "(default: .)")
    parser.add_argument("--debug", action="store_true", help="print tracebacks with errors (also: SEQVISION_DEBUG=1)")
    return parser.parse_args(argv)


def print_summary(summary: dict[str, Any], stage: str) -> None:
    print(f"{stage}: {summary['markdown']} and {summary['html']} (rows: {', '.join(summary['rows'])})")
    if summary["parent_run_id"]:
        print(f"{stage}: MLflow parent run {summary['parent_run_id']} with {len(summary['child_run_ids'])} cells "
              f"(experiment {tracking.STUDY_EXPERIMENT}); browse with `make mlflow-ui`")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> int:
        if not Path(args.rows).is_dir():
            raise FileNotFoundError(f"{args.rows}: no such folder (--rows); run the study's rows first")
        try:
            summary = study_report_flow(rows=args.rows, out=args.out, mlflow=args.mlflow, repo_root=args.repo_root)
        except tracking.TrackingUnavailableError as err:
            raise StageFailed(f"report written, but not logged to MLflow: {err}") from None
        print_summary(summary, "study_report")
        return 0

    return run_main("study_report", work, debug=args.debug)


if __name__ == "__main__":
    exit_fast(main())  # pipelines.common: skips the interpreter teardown
