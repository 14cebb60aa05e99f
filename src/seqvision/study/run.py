"""Run rows 2 and 3 of the study and write their results: ``{row}.json`` per row, ``compute.png``, ``parallelism.png``.

The JSON of a row is :meth:`RowResult.to_json`: config, environment, every cell with its repeats, every fit with its
interval and verdict, and the table cells ({column, quantity, claim, measured, verdict}).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from seqvision.io import write_json
from seqvision.study.complexity import Log, RowResult, run_compute, run_streaming
from seqvision.study.figures import plot_compute, plot_parallelism
from seqvision.study.parallelism import run_parallelism
from seqvision.study.presets import StudyConfig

ROWS = ("compute", "streaming", "parallelism")


def run_study(config: StudyConfig, out_dir: str | Path, *, rows: Sequence[str] = ROWS, log: Log = None
              ) -> dict[str, RowResult]:
    """Run ``rows`` (any of "compute", "streaming", "parallelism") and write their JSON and figures to ``out_dir``.

    ``compute.png`` holds the compute and streaming panels (both are row 3 of the table); it is drawn when
    "compute" runs, with the streaming panels when "streaming" runs too.
    """
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown study row {unknown[0]!r}; expected some of {', '.join(ROWS)}")
    out = Path(out_dir)
    results: dict[str, RowResult] = {}
    runners = {"compute": run_compute, "streaming": run_streaming, "parallelism": run_parallelism}
    for row in ROWS:
        if row in rows:
            results[row] = runners[row](config, log=log)
            write_json(out / f"{row}.json", results[row].to_json())
    if "compute" in results:
        plot_compute(results["compute"], results.get("streaming"), out / "compute.png")
    if "parallelism" in results:
        plot_parallelism(results["parallelism"], out / "parallelism.png")
    return results
