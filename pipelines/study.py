"""study flow: the seed's table, measured (docs/study.md) in one run: every row, then the report.

    python -m pipelines.study --params params.yaml                          # every row here, then the report
    python -m pipelines.study --rows compute streaming                      # some rows (the report shows every JSON)
    python -m pipelines.study --deployment study-row/study-row              # each row as a run of that deployment

The same code as the DVC stages (``dvc repro study_report``, ``make study``): the row flow of pipelines/study_row.py,
then the report flow of pipelines/study_report.py. Locally the rows run in this process one after another: rows 2 and
3 time training steps and must not share the CPU with other work. With --deployment each row is a run of that
deployment of the row flow (prefect.yaml: study-row), all submitted at once, so a work pool runs them side by side;
``--out`` and the params file then resolve on the workers, and the rows' JSON must land on storage this process
reads (the report is made here).

A failed row does not stop the others: the report shows what exists, and the flow ends Failed naming the row.
Exit status: 0 done; 1 a row or the MLflow logging failed; 2 bad arguments, params or inputs (one line on stderr,
before anything runs).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import FailedRun, ObjectNotFound
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from pipelines.common import StageFailed, add_params_argument, read_params, resolve_params, run_main
from pipelines.study_report import print_summary, study_report_flow
from pipelines.study_row import add_row_arguments, row_config, study_row_flow
from seqvision.config import ConfigError, Params
from seqvision.study.run import ROWS

DEFAULT_ROW_TIMEOUT_S = 6 * 3600.0  # a bound on waiting for a deployed row; the default preset's rows take minutes


@task(cache_policy=NO_CACHE, task_run_name="submit-{row}")
def row_on_deployment(row: str, deployment: str, parameters: dict[str, Any], timeout_s: float) -> str | State:
    """One run of the row deployment, waited for; anything but Completed is a Failed task run naming why."""
    try:
        flow_run = run_deployment(deployment, parameters={**parameters, "row": row}, timeout=timeout_s)
    except Exception as err:  # noqa: BLE001 - e.g. the server refused the run; the other rows go on
        return Failed(message=f"{row}: could not submit to {deployment}: {type(err).__name__}: {err}")
    state, where = flow_run.state, f"{deployment}, flow run {flow_run.name} ({flow_run.id})"
    if state is not None and state.is_completed():
        return where
    if state is None or not state.is_final():
        return Failed(message=f"{row}: {where} still {state.name if state else 'without a state'} after "
                              f"{timeout_s:.0f} s; not cancelled")
    return Failed(message=f"{row}: {where} ended {state.name}" + (f": {state.message}" if state.message else ""))


@flow(name="study-deployed-rows")
def deployed_rows_flow(rows: list[str], deployment: str, parameters: dict[str, Any], timeout_s: float
                       ) -> dict[str, str]:
    """Every row submitted at once (the caller sizes the task runner); ``{row: error}`` for those that failed."""
    futures = {row: row_on_deployment.submit(row, deployment, parameters, timeout_s) for row in rows}
    failed = {}
    for row, future in futures.items():
        future.wait()
        if not future.state.is_completed():
            failed[row] = future.state.message or future.state.name
    return failed


def check_deployment(deployment: str) -> None:
    """``ConfigError`` for a malformed name or a deployment the Prefect server does not know."""
    if deployment.count("/") != 1 or not all(deployment.split("/")):
        raise ConfigError(f"deployment {deployment!r}: expected 'flow name/deployment name', e.g. study-row/study-row")
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise ConfigError(f"deployment {deployment!r} not found on the Prefect server (`prefect deployment ls`; "
                              "docs/cluster.md)") from None


@flow(name="study")
def study_flow(*, params: Params | str = "params.yaml", params_path: str = "params.yaml", rows: list[str] | None = None,
               out: str = "artifacts/study", reports: str = "reports", features: str | None = None,
               encoder: str | None = None, deployment: str | None = None, row_timeout_s: float = DEFAULT_ROW_TIMEOUT_S, mlflow: bool = True,
               repo_root: str = ".") -> dict[str, Any] | State:
    """``rows`` (default: all of ``ROWS``), then the report of whatever rows are in ``out``. Locally each row is a
    subflow run in this process, one after another; with ``deployment`` each is a run of it, all at once
    (``params_path``, ``out``, ``features`` and ``encoder`` then resolve on the workers). A failed row does not stop the others;
    the flow then ends Failed naming it, after the report."""
    logger = get_run_logger()
    if not isinstance(params, Params):
        params_path = str(params)
    params = resolve_params(params)
    rows = list(ROWS) if rows is None else list(rows)
    if not rows:
        raise ConfigError("no study row to run")
    for row in rows:  # every row's config and inputs, before any row runs
        row_config(params, row, params_path=params_path, features=features, encoder=encoder,
                   check=deployment is None)
    failed: dict[str, str] = {}
    if deployment is None:
        for row in rows:
            try:
                study_row_flow(row=row, params=params, params_path=params_path, out=out, features=features,
                               encoder=encoder)
            except Exception as err:  # noqa: BLE001 - the other rows go on; the flow ends Failed below
                failed[row] = f"{type(err).__name__}: {err}"
                logger.error(f"{row} failed: {failed[row]}")
    else:
        check_deployment(deployment)
        bounded = deployed_rows_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=len(rows)))
        parameters = {"params": params_path, "out": out, **({"features": features} if features else {}),
                      **({"encoder": encoder} if encoder else {})}
        failed = bounded(rows, deployment, parameters, row_timeout_s)
    summary = study_report_flow(rows=out, out=reports, mlflow=mlflow, repo_root=repo_root)
    summary["failed"] = failed
    if failed:
        message = "; ".join(f"{row}: {why}" for row, why in failed.items()) + f". Report: {summary['markdown']}"
        logger.error(message)
        return Failed(message=message, data=summary)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.study", description=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_params_argument(parser, sections="study; the training rows also train, models and data.activity_dir/"
                                         "activity_split")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=None,
                        help=f"rows to run (default: all of {' '.join(ROWS)})")
    add_row_arguments(parser)
    parser.add_argument("--reports", default="reports", help="report folder: study.md, study.html, study/ "
                                                               "(default: %(default)s)")
    parser.add_argument("--deployment", default=None, metavar="FLOW/DEPLOYMENT",
                        help="run each row as a run of this deployment of the row flow, e.g. study-row/study-row "
                             "(default: here, one after another)")
    parser.add_argument("--row-timeout", dest="row_timeout_s", type=float, default=DEFAULT_ROW_TIMEOUT_S,
                        metavar="SECONDS", help="seconds to wait for a deployed row (default: %(default)s)")
    parser.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=True,
                        help="log the report on a new parent run with a child per table cell (default: on)")
    parser.add_argument("--repo-root", default=".", help="where mlflow.db lives unless MLFLOW_TRACKING_URI is set "
                                                         "(default: .)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> int:
        params = read_params(args)
        rows = args.rows or list(ROWS)
        for row in rows:  # every error a user can fix, before any work (a deployed row's inputs are the worker's)
            row_config(params, row, params_path=args.params, features=args.features, encoder=args.encoder,
                       check=args.deployment is None)
        try:
            summary = study_flow(params=params, params_path=args.params, rows=rows, out=args.out,
                                 reports=args.reports, features=args.features, encoder=args.encoder,
                                 deployment=args.deployment,
                                 row_timeout_s=args.row_timeout_s, mlflow=args.mlflow, repo_root=args.repo_root)
        except FailedRun as err:
            raise StageFailed(str(err)) from None
        print_summary(summary, "study")
        return 0

    return run_main("study", work, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
