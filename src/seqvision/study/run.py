"""Run rows 2, 3 and 4 of the study and write their results: ``{row}.json`` per row, ``compute.png``,
``parallelism.png``, ``inductive_bias.png``.

The JSON of a row is :meth:`RowResult.to_json`: config, environment, every cell with its repeats (or seeds), every
fit or comparison with its interval and verdict, and the table cells ({column, quantity, claim, measured, verdict}).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from seqvision.config import Params
from seqvision.io import write_json
from seqvision.study.bias import run_inductive_bias
from seqvision.study.complexity import Log, RowResult, run_compute, run_streaming
from seqvision.study.figures import plot_compute, plot_inductive_bias, plot_parallelism
from seqvision.study.parallelism import run_parallelism
from seqvision.study.presets import StudyConfig

ROWS = ("compute", "streaming", "parallelism", "inductive_bias")


def run_study(config: StudyConfig, out_dir: str | Path, *, rows: Sequence[str] = ROWS, params: Params | None = None,
              log: Log = None) -> dict[str, RowResult]:
    """Run ``rows`` (any of :data:`ROWS`) and write their JSON and figures to ``out_dir``.

    ``compute.png`` holds the compute and streaming panels (both are row 3 of the table); it is drawn when
    "compute" runs, with the streaming panels when "streaming" runs too. "inductive_bias" trains with the
    pipeline's ``params`` (required for it) and keeps its trainings in ``out_dir/inductive_bias/``.
    """
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown study row {unknown[0]!r}; expected some of {', '.join(ROWS)}")
    if "inductive_bias" in rows and params is None:
        raise ValueError("the inductive_bias row trains with the pipeline's params: pass params")
    out = Path(out_dir)
    results: dict[str, RowResult] = {}
    runners = {"compute": run_compute, "streaming": run_streaming, "parallelism": run_parallelism}
    for row in ROWS:
        if row not in rows:
            continue
        if row == "inductive_bias":
            assert params is not None
            results[row] = run_inductive_bias(config, params=params, work_dir=out / row, log=log)
        else:
            results[row] = runners[row](config, log=log)
        write_json(out / f"{row}.json", results[row].to_json())
    if "compute" in results:
        plot_compute(results["compute"], results.get("streaming"), out / "compute.png")
    if "parallelism" in results:
        plot_parallelism(results["parallelism"], out / "parallelism.png")
    if "inductive_bias" in results:
        plot_inductive_bias(results["inductive_bias"], out / "inductive_bias.png")
    return results
