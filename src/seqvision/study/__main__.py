"""``python -m seqvision.study --out DIR [--preset ci|default|gpu] [--rows ...] [--<knob> V ...]``.

Runs rows 2 (parallelism) and 3 (compute and memory vs N, and streaming) of the seed's table and writes
``DIR/{compute,streaming,parallelism}.json`` and ``DIR/{compute,parallelism}.png``. Every knob of
:class:`seqvision.study.presets.StudyConfig` is a flag that overrides the preset. Method: docs/study.md.
"""

from __future__ import annotations

import argparse
import sys
import time

from seqvision.config import ConfigError, add_config_arguments, from_mapping, merge, overrides_from_args, to_dict
from seqvision.study.complexity import describe
from seqvision.study.presets import PRESETS, StudyConfig
from seqvision.study.run import ROWS, run_study


def parse_config(args: argparse.Namespace) -> StudyConfig:
    """The preset with the flags the user gave on top, validated (errors name the flag's key)."""
    return from_mapping(StudyConfig, merge(to_dict(PRESETS[args.preset]), overrides_from_args(args)), where="study")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqvision.study", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the JSON results and PNG figures")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="ci: seconds; default: make study on 2 CPU cores (~5 min); gpu: CUDA, bfloat16")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which rows to run")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_config_arguments(parser, StudyConfig)
    args = parser.parse_args(argv)
    try:
        config = parse_config(args)
    except ConfigError as err:
        parser.error(str(err))
    start = time.perf_counter()
    log = None if args.quiet else (lambda line: print(f"[{time.perf_counter() - start:7.1f} s] {line}",
                                                      file=sys.stderr, flush=True))
    results = run_study(config, args.out, rows=args.rows, log=log)
    for result in results.values():
        for line in describe(result.findings):
            print(line)
        for cell in result.table:
            print(f"{cell['column']} {cell['quantity']}: claim {cell['claim']} -> {cell['verdict']}")
    print(f"study: {', '.join(results)} in {time.perf_counter() - start:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
