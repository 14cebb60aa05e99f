"""The study's rows, one registry entry each, and what runs them: ``{row}.json`` per row, one figure per row of the
seed's table drawn by :mod:`seqvision.study.figures` (the report's, not the rows': a figure change reruns only the
report).

- :data:`ROWS`           row name -> :class:`Row` (its runner, whether it trains, its table columns and notes)
- :func:`check_inputs`   what the training rows read exists, before any row runs
- :func:`run_row`        one row -> ``{row}.json`` (a training row also keeps its trainings, in ``{row}.tar``)
- :func:`pack_trainings` a training row's folder -> ``{row}.tar`` (the same trainings, the same bytes)
- :func:`load_results`   the row JSONs of a folder back as :class:`RowResult` (:meth:`RowResult.from_json`)
- :func:`run_study`      rows in order (``python -m seqvision.study``, which then draws the figures)

The JSON of a row is :meth:`RowResult.to_json`: config, environment, every cell with its repeats (or seeds), every
fit or comparison with its interval and verdict, and the table cells ({column, quantity, claim, measured, verdict}).
"""

from __future__ import annotations

import json
import shutil
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from seqvision.config import ConfigError, Params
from seqvision.io import RUNINFO, atomic_path, write_json
from seqvision.study import complexity
from seqvision.study.bias import run_inductive_bias
from seqvision.study.bias import summary_lines as bias_notes
from seqvision.study.bias import COLUMNS as BIAS_COLUMNS
from seqvision.study.complexity import Log, RowResult, run_compute, run_streaming
from seqvision.study.longrange import COLUMNS as LONG_COLUMNS
from seqvision.study.longrange import run_long_range
from seqvision.study.longrange import summary_lines as long_notes
from seqvision.study.parallelism import run_parallelism
from seqvision.study.presets import StudyConfig


@dataclass(frozen=True)
class Row:
    """One row of the study.

    ``run(config, *, log)`` measures it; a row that ``trains`` runs as ``run(config, *, params, work_dir, log)``
    with the pipeline's params, on the features stage's output, and keeps its trainings in ``work_dir``.
    ``notes(result)`` lists what the row found beside its verdicts (crossovers, controls...). ``seed_row``
    names the row of the seed's table it measures; ``columns`` maps each column of the table to the variants whose
    measurements make that cell.
    """

    run: Callable[..., RowResult]
    seed_row: str
    trains: bool = False
    columns: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(complexity.COLUMNS))
    notes: Callable[[RowResult], list[str]] | None = None  # findings beside the verdicts, one line each


# In the order they run (python -m seqvision.study, the all-rows flow); the report orders them as the seed's table.
ROWS: dict[str, Row] = {
    "compute": Row(run_compute, "compute & memory"),
    "streaming": Row(run_streaming, "compute & memory"),
    "parallelism": Row(run_parallelism, "parallelizability"),
    "inductive_bias": Row(run_inductive_bias, "inductive bias", trains=True, columns=BIAS_COLUMNS, notes=bias_notes),
    "long_range": Row(run_long_range, "long-range dependencies", trains=True, columns=LONG_COLUMNS, notes=long_notes),
}
TRAINING_ROWS = tuple(name for name, row in ROWS.items() if row.trains)


def check_rows(rows: Sequence[str]) -> None:
    """``ConfigError`` for a row name that is not in :data:`ROWS`."""
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ConfigError(f"unknown study row {unknown[0]!r}; expected some of {', '.join(ROWS)}")


def check_inputs(rows: Sequence[str], config: StudyConfig, params: Params) -> None:
    """Before any row runs (rows 2 and 3 take minutes): ``ConfigError`` naming the first input a training row of
    ``rows`` needs and does not find (row 4: the features stage's output and the activity label lists; row 1: the
    encoder)."""
    if "long_range" in rows and not Path(config.long_encoder).is_file():
        raise ConfigError(f"{config.long_encoder}: missing; the long_range row encodes its clips with the encoder "
                          "stage's output (study knob long_encoder)")
    if "inductive_bias" in rows:
        labels = Path(config.bias_activity_dir or params.data.activity_dir)
        for needed in (Path(config.bias_features) / "index.json", Path(config.bias_features) / "videos-train.npy",
                       labels / "classInd.txt"):
            if not needed.is_file():
                raise ConfigError(f"{needed}: missing; the inductive_bias row needs the features stage's output "
                                  "(study knob bias_features) and the activity label lists (data.activity_dir or "
                                  "the knob bias_activity_dir)")


def run_row(name: str, config: StudyConfig, out_dir: str | Path, *, params: Params | None = None,
            log: Log = None) -> RowResult:
    """Run row ``name`` and write ``out_dir/{name}.json``. A training row (``params`` required) trains in
    ``out_dir/{name}/``, which it empties first (no cell of an earlier run stays beside this run's JSON), and
    packs its trainings into ``out_dir/{name}.tar`` (:func:`pack_trainings`)."""
    check_rows([name])
    row, out = ROWS[name], Path(out_dir)
    if row.trains:
        if params is None:
            raise ValueError(f"the {name} row trains with the pipeline's params: pass params")
        shutil.rmtree(out / name, ignore_errors=True)
        trainings_file(out, name).unlink(missing_ok=True)
        result = row.run(config, params=params, work_dir=out / name, log=log)
        archive = pack_trainings(out, name)
        if log:
            log(f"{name}: its trainings packed into {archive} ({archive.stat().st_size / 2**20:.0f} MiB; "
                f"tar -xf {archive} -C {out} unpacks them)")
    else:
        result = row.run(config, log=log)
    write_json(row_file(out, name), result.to_json())
    return result


def row_file(folder: str | Path, row: str) -> Path:
    """Where row ``row``'s JSON lives in ``folder`` (the stages' ``artifacts/study``): ``{folder}/{row}.json``."""
    return Path(folder) / f"{row}.json"


def trainings_file(folder: str | Path, row: str) -> Path:
    """Where training row ``row`` keeps its trainings in ``folder``: ``{folder}/{row}.tar``."""
    return Path(folder) / f"{row}.tar"


def pack_trainings(folder: str | Path, row: str) -> Path:
    """Move the trainings in ``{folder}/{row}/`` into one uncompressed tar, ``{folder}/{row}.tar``, with members
    ``{row}/...`` (``tar -xf {row}.tar -C {folder}`` puts them back where they were).

    One file for DVC to hash and check instead of a tree of ~1,100 files in ~450 folders per row: every no-op
    ``dvc repro`` walked those (docs/benchmarks.md). Members are sorted and carry no times, owners or permissions,
    so the same trainings pack to the same bytes. The ``runinfo.json`` files (wall-clock times, memory: never
    hashed, :mod:`seqvision.io`) stay in the folder; everything else leaves it."""
    folder = Path(folder)
    names = sorted(p.relative_to(folder).as_posix() for p in (folder / row).rglob("*")
                   if p.is_file() and p.name != RUNINFO)
    files = [folder / name for name in names]
    archive = trainings_file(folder, row)
    with atomic_path(archive) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in zip(names, files):
            info = tarfile.TarInfo(name)
            info.size, info.mode = path.stat().st_size, 0o644  # mtime 0, uid/gid 0, no owner names: the defaults
            with open(path, "rb") as f:
                tar.addfile(info, f)
    for path in files:
        path.unlink()
    for path in sorted((p for p in (folder / row).rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(path.iterdir()):
            path.rmdir()
    return archive


def load_results(folder: str | Path, rows: Sequence[str] = tuple(ROWS)) -> dict[str, RowResult]:
    """``{row: RowResult}`` for every ``folder/{row}.json`` of ``rows`` that exists, in :data:`ROWS` order."""
    found = {}
    for name in ROWS:
        path = row_file(folder, name)
        if name in rows and path.is_file():
            found[name] = RowResult.from_json(json.loads(path.read_text()))
    return found


def run_study(config: StudyConfig, out_dir: str | Path, *, rows: Sequence[str] = tuple(ROWS),
              params: Params | None = None, log: Log = None) -> dict[str, RowResult]:
    """Run ``rows`` (any of :data:`ROWS`, in its order) one after another, each into ``out_dir/{row}.json``."""
    check_rows(rows)
    if any(ROWS[r].trains for r in rows) and params is None:
        raise ValueError(f"the {', '.join(r for r in rows if ROWS[r].trains)} row trains with the pipeline's params: "
                         "pass params")
    return {name: run_row(name, config, out_dir, params=params, log=log) for name in ROWS if name in rows}
