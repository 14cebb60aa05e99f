"""study_row stage: rows of the seed's table, measured (docs/study.md) -> ``{out}/{row}.json`` each.

    python -m pipelines.study_row compute streaming parallelism --params params.yaml \\
        --out artifacts/study                                                        # study_timing
    python -m pipelines.study_row inductive_bias --params params.yaml --features artifacts/features \\
        --out artifacts/study                                                        # study_trained@inductive_bias
    python -m pipelines.study_row long_range --params params.yaml --encoder artifacts/encoder/encoder.pt \\
        --out artifacts/study                                                        # study_long_range

Rows of ``seqvision.study.run.ROWS``, one after another (one flow run each), with params.yaml's ``study:`` section (a
preset and knobs over it); every row's config and inputs are checked before the first runs. A training
row trains with the ``train`` and ``models`` params and packs its trainings into ``{out}/{row}.tar``: row 4 on
``--features`` with the ``data.activity_dir`` / ``activity_split`` labels, row 1 on long-range clips it renders
(``synth`` params) and encodes with ``--encoder``. The row's figure and MLflow runs are the study_report stage's
(pipelines/study_report.py); ``python -m pipelines.study`` runs every row, then the report.

Exit status: 0 done; 1 a row failed (the rows after it do not run); 2 bad arguments, params or inputs (one line on
stderr, before any row runs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from seqvision.study import cellserver

if __name__ == "__main__" and not {"-h", "--help"} & set(sys.argv[1:]):
    # The cells' fork server imports torch (about 3 s) while this process imports its own: the row's first cell
    # does not wait for it.
    cellserver.start()

from prefect import flow, get_run_logger  # noqa: E402 - after the fork server's start, on purpose

from pipelines.common import add_params_argument, exit_fast, read_params, resolve_params, run_main
from seqvision.config import ConfigError, Params
from seqvision.study.params import study_config
from seqvision.study.presets import StudyConfig
from seqvision.study.run import ROWS, check_inputs, check_rows, run_row


def row_config(params: Params, row: str, *, params_path: str, features: str | None, encoder: str | None = None,
               check: bool = True) -> StudyConfig:
    """The study's config for ``row`` from ``params``, with its inputs checked (``check``): ``ConfigError`` naming the
    params file and key, or the missing input. ``features`` (the features stage's folder) replaces the training rows'
    knob bias_features, ``encoder`` (the encoder stage's ``encoder.pt``) the knob long_encoder."""
    check_rows([row])
    try:
        config = study_config(params.study)
    except ConfigError as err:
        raise ConfigError(f"{params_path}: {err}") from None
    if ROWS[row].trains:
        if features is not None:
            config = config.replace(bias_features=features)
        if encoder is not None:
            config = config.replace(long_encoder=encoder)
        if check:
            check_inputs([row], config, params)
    return config


@flow(name="study-row", flow_run_name="study-{row}")
def study_row_flow(*, row: str, params: Params | str = "params.yaml", params_path: str = "params.yaml",
                   out: str = "artifacts/study", features: str | None = None, encoder: str | None = None
                   ) -> dict[str, Any]:
    """Row ``row`` -> ``{out}/{row}.json`` (a training row's trainings in ``{out}/{row}.tar``). ``params``: the
    validated params (``params_path`` names their file in errors), or a params file, read once here (a deployment run);
    ``features``: a training row's input folder (default: the study's knob). Returns the row's table cells."""
    logger = get_run_logger()
    if not isinstance(params, Params):
        params_path = str(params)
    params = resolve_params(params)
    config = row_config(params, row, params_path=params_path, features=features, encoder=encoder)
    started = time.perf_counter()
    result = run_row(row, config, out, params=params if ROWS[row].trains else None, log=logger.info)
    for cell in result.table:
        logger.info(f"{row}: {cell['column']} {cell['quantity']}: claim {cell['claim']} -> {cell['verdict']}")
    return {"row": row, "json": str(Path(out) / f"{row}.json"), "table": [dict(t) for t in result.table],
            "seconds": time.perf_counter() - started}


def add_row_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out``, ``--features`` and ``--encoder``: where rows write, and the training rows' inputs (this flow's and
    the all-rows flow's)."""
    parser.add_argument("--out", default="artifacts/study", help="the rows' JSON (and trainings) folder "
                                                                   "(default: %(default)s)")
    parser.add_argument("--features", default=None,
                        help="the features stage's folder the inductive_bias row trains on (default: the study's "
                             "knob bias_features)")
    parser.add_argument("--encoder", default=None,
                        help="the encoder stage's encoder.pt the long_range row encodes its clips with (default: the "
                             "study's knob long_encoder)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.study_row", description=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="+", choices=list(ROWS), metavar="ROW",
                        help=f"the rows, run in this order (of: {', '.join(ROWS)})")
    add_params_argument(parser, sections="study; a training row also train, models and data.activity_dir/"
                                         "activity_split")
    add_row_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> int:
        params = read_params(args)
        for row in args.rows:  # every row's config and inputs, before Prefect starts and before any row runs
            row_config(params, row, params_path=args.params, features=args.features, encoder=args.encoder)
        for row in args.rows:
            done = study_row_flow(row=row, params=params, params_path=args.params, out=args.out,
                                  features=args.features, encoder=args.encoder)
            for cell in done["table"]:
                print(f"study_row: {row}: {cell['column']} {cell['quantity']}: claim {cell['claim']} -> "
                      f"{cell['verdict']}")
            print(f"study_row: {row} in {done['seconds']:.0f} s -> {done['json']}")
        return 0

    return run_main("study_row", work, debug=args.debug)


if __name__ == "__main__":
    exit_fast(main())  # pipelines.common: skips the interpreter teardown
