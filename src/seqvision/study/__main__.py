"""``python -m seqvision.study --out DIR [--preset ci|default|gpu] [--rows ...] [--params FILE] [--<knob> V ...]``.

Runs the rows of the seed's table (``seqvision.study.run.ROWS``): 1 (long-range dependencies: accuracy vs distance),
2 (parallelism), 3 (compute and memory vs N, and streaming) and 4 (inductive bias: accuracy vs training-set size),
and writes ``DIR/{row}.json`` and one figure per row. Rows 1 and 4 train with the training protocol and model
sections of ``--params``: row 4 on the features stage's output, row 1 on long-range clips it renders and encodes
with the encoder stage's output. Every knob of :class:`seqvision.study.presets.StudyConfig` is a flag
that overrides the preset. Method: docs/study.md.
"""

from __future__ import annotations

import argparse
import sys
import time

from seqvision.config import (
    ConfigError,
    Params,
    add_config_arguments,
    from_mapping,
    load_params,
    merge,
    overrides_from_args,
    to_dict,
)
from seqvision.study.complexity import describe
from seqvision.study.figures import write_figures
from seqvision.study.presets import PRESETS, StudyConfig
from seqvision.study.report import notes
from seqvision.study.run import ROWS, check_inputs, run_study


def parse_config(args: argparse.Namespace) -> StudyConfig:
    """The preset with the flags the user gave on top, validated (errors name the flag's key)."""
    return from_mapping(StudyConfig, merge(to_dict(PRESETS[args.preset]), overrides_from_args(args)), where="study")


def training_params(path: str, config: StudyConfig, rows: list[str]) -> Params:
    """The pipeline's params for the training rows, read once, after checking their inputs (before any row runs:
    rows 2 and 3 take minutes). Raises ``ConfigError`` naming what is missing."""
    params = load_params(path)
    check_inputs(rows, config, params)
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqvision.study", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the JSON results and PNG figures")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="ci: seconds; default: make study on 2 CPU cores (27 min from a fresh clone, "
                             "docs/study.md); gpu: CUDA, bfloat16")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="which rows to run")
    parser.add_argument("--params", default="params.yaml",
                        help="the pipeline's params file: rows 1 and 4's training protocol and model sections, row 4's "
                             "label lists, row 1's synth section")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_config_arguments(parser, StudyConfig)
    args = parser.parse_args(argv)
    try:
        config = parse_config(args)
        params = training_params(args.params, config, args.rows) if any(ROWS[r].trains for r in args.rows) else None
    except ConfigError as err:
        parser.error(str(err))
    start = time.perf_counter()
    log = None if args.quiet else (lambda line: print(f"[{time.perf_counter() - start:7.1f} s] {line}",
                                                      file=sys.stderr, flush=True))
    results = run_study(config, args.out, rows=args.rows, params=params, log=log)
    write_figures(results, args.out)
    for result in results.values():
        for line in describe(result.findings):
            print(line)
        for cell in result.table:
            print(f"{cell['column']} {cell['quantity']}: claim {cell['claim']} -> {cell['verdict']}")
        for line in notes(result.row, result):
            print(line)
    print(f"study: {', '.join(results)} in {time.perf_counter() - start:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
