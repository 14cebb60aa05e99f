"""One learning-rate sweep per model family, on the validation split, the same for every family.

    python scripts/lr_sweep.py [--lrs 0.001 0.002 0.004] [--tasks ...] [--models ...] [--parallel 2]
                               [--out artifacts/sweep] [--docs docs/tuning.md] [--apply]

Run it from the repository root after ``dvc repro features tokenize`` (it reads ``artifacts/features`` and
``artifacts/tokens``). Every (task, family, lr) cell trains seed 0 with the train stage's own worker
(``python -m pipelines.train_worker``: params.yaml as it is, only ``models.<family>.lr`` replaced, the family
resized to its task's ``match_params`` budget), ``--parallel`` workers at a time, one torch thread each. A cell
is scored by its best validation metric (activity: accuracy; captioning: CIDEr-D of the test decoder on the val
clips), never by the test split (the worker still writes its test predictions; nothing here reads them).

``models.<family>.lr`` is one value for all three tasks, so the lr chosen for a family is the one with the best
mean over tasks of the cell's score divided by the best score of any cell of that task (1.0 = the best cell of
every task). The table and the choice replace the "## Learning rate" section of ``--docs``; ``--apply`` also
writes the chosen values into params.yaml (comments kept). Every family gets the same grid, the same epochs and
the same seed: no family gets more tuning than another.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TASKS = ("activity", "image_captioning", "video_captioning")
FAMILIES = ("rnn", "lstm", "gru", "transformer", "meanpool", "mingru")
HEADING = "## Learning rate"


def cell_params(params: dict, family: str, lr: float, folder: Path) -> Path:
    """params.yaml with ``models.<family>.lr`` = ``lr`` and one seed."""
    changed = json.loads(json.dumps(params))
    changed["models"][family]["lr"] = lr
    changed["train"]["seeds"] = 1
    path = folder / f"params-{family}-{lr:g}.yaml"
    path.write_text(yaml.safe_dump(changed, sort_keys=False), encoding="utf-8")
    return path


def run_cell(task: str, family: str, lr: float, params_file: Path, out: Path, data: dict) -> dict:
    """Train one cell (resuming a finished one is free: the worker finds its last.pt); returns its summary."""
    folder = out / task / family / f"lr{lr:g}"
    command = [sys.executable, "-m", "pipelines.train_worker", "--task", task, "--model", family,
               "--params", str(params_file), "--features", "artifacts/features", "--tokens", "artifacts/tokens",
               "--activity-dir", data["activity_dir"], "--activity-split", str(data["activity_split"]),
               "--out", str(folder), "--no-tracking", "--no-progress", "--threads", "1"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])})
    if proc.returncode != 0:
        raise RuntimeError(f"{task}/{family} lr {lr:g} failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
                           f"{proc.stderr[-2000:]}")
    summary = json.loads((folder / "train" / "seed0" / "summary.json").read_text(encoding="utf-8"))
    return {"task": task, "family": family, "lr": lr, "val": summary["best_val_metric"],
            "metric": summary["metric"], "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"],
            "converged": summary["converged"], "parameters": summary.get("num_parameters")}


def choose(cells: list[dict], families: list[str], tasks: list[str], lrs: list[float]) -> dict[str, tuple[float, float]]:
    """``{family: (lr, mean normalised score)}``."""
    best = {t: max(c["val"] for c in cells if c["task"] == t) for t in tasks}
    chosen = {}
    for family in families:
        scores = {lr: sum(c["val"] / best[c["task"]] for c in cells if c["family"] == family and c["lr"] == lr)
                  / len(tasks) for lr in lrs}
        lr = max(scores, key=lambda k: (scores[k], -abs(k - 0.002)))
        chosen[family] = (lr, scores[lr])
    return chosen


def markdown(cells: list[dict], chosen: dict, tasks: list[str], lrs: list[float], epochs: int, commit: str) -> str:
    lines = [HEADING, "",
             f"Measured with `python scripts/lr_sweep.py` on {datetime.date.today()} (commit {commit}), default data "
             f"and params.yaml (`train.epochs` {epochs}, patience as set, seed 0, each family at its task's "
             "`match_params` budget). Validation split only: activity accuracy, captioning CIDEr-D of the test "
             "decoder. A `*` marks a cell that hit the epoch cap while still improving (not converged).", ""]
    for task in tasks:
        rows = [c for c in cells if c["task"] == task]
        lines += [f"**{task}** ({rows[0]['metric']} on val)", "",
                  "| family | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
                  "|---|" + "---:|" * len(lrs)]
        for family in chosen:
            values = []
            for lr in lrs:
                cell = next(c for c in rows if c["family"] == family and c["lr"] == lr)
                values.append(f"{cell['val']:.3f}{'' if cell['converged'] else '*'}")
            lines.append(f"| {family} | " + " | ".join(values) + " |")
        lines.append("")
    lines += ["Chosen (`models.<family>.lr` in params.yaml; the mean over tasks of score / best score of the task):",
              "", "| family | lr | mean normalised val score |", "|---|---:|---:|"]
    lines += [f"| {family} | {lr:g} | {score:.3f} |" for family, (lr, score) in chosen.items()]
    lines += ["", "One seed per cell: a difference between two lrs smaller than the seed-to-seed spread of the "
              "report (its 95% intervals) is noise, and ties go to the lr nearest the former default 0.002."]
    return "\n".join(lines) + "\n"


def apply(params_path: Path, chosen: dict) -> None:
    text = params_path.read_text(encoding="utf-8")
    for family, (lr, _) in chosen.items():
        pattern = re.compile(rf"(?ms)(^  {family}:\n(?:    .*\n)*?    lr: )[^\n]*")
        text, count = pattern.subn(lambda m: f"{m.group(1)}{lr:g}", text, count=1)
        if count != 1:
            raise SystemExit(f"{params_path}: no models.{family}.lr line to rewrite")
    params_path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.001, 0.002, 0.004])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--models", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--parallel", type=int, default=os.cpu_count() or 1, help="cells at once (default: cores)")
    parser.add_argument("--out", default="artifacts/sweep", help="where the cells train (kept: a rerun resumes)")
    parser.add_argument("--docs", default=None, help="replace the '## Learning rate' section of this file")
    parser.add_argument("--apply", action="store_true", help="write the chosen lrs into --params")
    parser.add_argument("--from-cells", action="store_true",
                        help="train nothing: choose from the cells.json a finished sweep left in --out")
    args = parser.parse_args(argv)
    for folder in ("artifacts/features", "artifacts/tokens"):
        if not (REPO / folder).is_dir() and not args.from_cells:
            raise SystemExit(f"lr_sweep: error: {folder} is missing; run `dvc repro features tokenize` first")
    params = yaml.safe_load((REPO / args.params).read_text(encoding="utf-8"))
    out = (REPO / args.out).resolve()
    cells: list[dict] = []
    if args.from_cells:
        cells = json.loads((out / "cells.json").read_text(encoding="utf-8"))
        args.tasks = [t for t in args.tasks if any(c["task"] == t for c in cells)]
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        files = {(f, lr): cell_params(params, f, lr, Path(tmp)) for f in args.models for lr in args.lrs}
        jobs = [] if args.from_cells else [pool.submit(run_cell, t, f, lr, files[f, lr], out, params["data"])
                                           for t in args.tasks for f in args.models for lr in args.lrs]
        for k, job in enumerate(concurrent.futures.as_completed(jobs), 1):
            cell = job.result()
            cells.append(cell)
            print(f"[{k}/{len(jobs)}] {cell['task']} {cell['family']} lr {cell['lr']:g}: val {cell['metric']} "
                  f"{cell['val']:.3f} (best epoch {cell['best_epoch']} of {cell['epochs_run']})", flush=True)
    chosen = choose(cells, args.models, args.tasks, args.lrs)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    text = markdown(cells, chosen, args.tasks, args.lrs, params["train"]["epochs"], commit)
    print(text)
    (out / "cells.json").write_text(json.dumps(cells, indent=1), encoding="utf-8")
    if args.docs:
        sys.path.insert(0, str(REPO / "src"))
        from seqvision.io import replace_markdown_section

        replace_markdown_section(REPO / args.docs, HEADING, text)
    if args.apply:
        apply(REPO / args.params, chosen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
