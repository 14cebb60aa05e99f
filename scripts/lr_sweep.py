"""One learning-rate sweep per model family, on the validation split, the same for every family.

    python scripts/lr_sweep.py [--lrs 0.002 ... 0.032] [--seeds 3] [--tasks ...] [--models ...]
                               [--parallel 2] [--out artifacts/sweep] [--docs docs/tuning.md] [--apply]

Run it from the repository root after ``dvc repro features tokenize`` (it reads ``artifacts/features`` and
``artifacts/tokens``). Every (task, family, lr) cell trains seeds 0..``--seeds``-1 with the train stage's own
worker (``python -m pipelines.train_worker``: params.yaml as it is, only ``models.<family>.lr`` replaced, the
family resized to its task's ``match_params`` budget), ``--parallel`` workers at a time, one torch thread each. A
cell is scored by the mean over its seeds of the best validation metric (activity: accuracy; captioning: CIDEr-D
of the test decoder on the val clips), never by the test split (the worker still writes its test predictions;
nothing here reads them).

``models.<family>.lr`` is one value for all three tasks, so the lr chosen for a family is the one with the best
mean over tasks of the cell's score divided by the best score of any cell of that task (1.0 = the best cell of
every task). The table and the choice replace the "## Learning rate" section of ``--docs``; ``--apply`` also
writes the chosen values into params.yaml (every other line, comments included, kept). Every family gets the
same grid, the same epochs and the same seeds: no family gets more tuning than another.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TASKS = ("activity", "image_captioning", "video_captioning")
FAMILIES = ("rnn", "lstm", "gru", "transformer", "meanpool", "mingru")
HEADING = "## Learning rate"


def cell_params(params: dict, family: str, lr: float, seeds: int, folder: Path) -> Path:
    """params.yaml with ``models.<family>.lr`` = ``lr`` and ``seeds`` seeds (each run alone: ``--seed-index``)."""
    changed = json.loads(json.dumps(params))
    changed["models"][family]["lr"] = lr
    changed["train"]["seeds"] = seeds
    path = folder / f"params-{family}-{lr:g}.yaml"
    path.write_text(yaml.safe_dump(changed, sort_keys=False), encoding="utf-8")
    return path


def cell_dir(out: Path, task: str, family: str, lr: float) -> Path:
    return out / task / family / f"lr{lr:g}"


def read_cell(out: Path, task: str, family: str, lr: float, seed: int) -> dict:
    """One seed of a cell, from the summary its worker wrote (raises FileNotFoundError when it has none)."""
    path = cell_dir(out, task, family, lr) / "train" / f"seed{seed}" / "summary.json"
    summary = json.loads(path.read_text(encoding="utf-8"))
    return {"task": task, "family": family, "lr": lr, "seed": seed, "val": summary["best_val_metric"],
            "metric": summary["metric"], "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"],
            "converged": summary["converged"], "parameters": summary.get("num_parameters")}


def run_cell(task: str, family: str, lr: float, seed: int, params_file: Path, out: Path, data: dict) -> dict:
    """Train one seed of a cell (a finished one is cheap: the worker resumes from its last.pt); its summary."""
    command = [sys.executable, "-m", "pipelines.train_worker", "--task", task, "--model", family,
               "--params", str(params_file), "--features", "artifacts/features", "--tokens", "artifacts/tokens",
               "--activity-dir", data["activity_dir"], "--activity-split", str(data["activity_split"]),
               "--out", str(cell_dir(out, task, family, lr)), "--seed-index", str(seed), "--no-tracking",
               "--no-progress", "--threads", "1"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])})
    if proc.returncode != 0:
        raise RuntimeError(f"{task}/{family} lr {lr:g} seed {seed} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return read_cell(out, task, family, lr, seed)


def summarise(cells: list[dict]) -> dict[tuple[str, str, float], dict]:
    """``{(task, family, lr): {"mean", "sd", "n", "capped"}}`` over the seeds of each cell."""
    groups: dict[tuple[str, str, float], list[dict]] = {}
    for cell in cells:
        groups.setdefault((cell["task"], cell["family"], cell["lr"]), []).append(cell)
    return {key: {"mean": statistics.fmean(c["val"] for c in group),
                  "sd": statistics.stdev(c["val"] for c in group) if len(group) > 1 else 0.0,
                  "n": len(group), "capped": sum(not c["converged"] for c in group)}
            for key, group in groups.items()}


def choose(cells: list[dict], families: list[str], tasks: list[str],
           lrs: list[float]) -> dict[str, tuple[float, float]]:
    """``{family: (lr, mean normalised score)}``: the seed means of each cell, divided by the task's best mean."""
    means = {key: value["mean"] for key, value in summarise(cells).items()}
    best = {t: max(v for (task, _, _), v in means.items() if task == t) or 1.0 for t in tasks}  # all 0: no scale
    chosen = {}
    for family in families:
        scores = {lr: sum(means[t, family, lr] / best[t] for t in tasks) / len(tasks) for lr in lrs}
        lr = max(scores, key=lambda k: (scores[k], -abs(k - 0.002)))
        chosen[family] = (lr, scores[lr])
    return chosen


def markdown(cells: list[dict], chosen: dict, tasks: list[str], lrs: list[float], epochs: int, commit: str) -> str:
    table = summarise(cells)
    seeds = sorted({c["seed"] for c in cells})
    lines = [HEADING, "",
             f"Measured with `python scripts/lr_sweep.py` on {datetime.date.today()} (commit {commit}), default data "
             f"and params.yaml (`train.epochs` {epochs}, patience as set, seeds {', '.join(map(str, seeds))}, each "
             "family at its task's `match_params` budget). Validation split only: activity accuracy, captioning "
             "CIDEr-D of the test decoder. Each cell is the mean ± standard deviation over the seeds; `*k` marks a "
             "cell in which k seeds hit the epoch cap while still improving (not converged).", ""]
    for task in tasks:
        metric = next(c["metric"] for c in cells if c["task"] == task)
        lines += [f"**{task}** ({metric} on val)", "",
                  "| family | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
                  "|---|" + "---:|" * len(lrs)]
        for family in chosen:
            values = []
            for lr in lrs:
                cell = table[task, family, lr]
                mark = f" *{cell['capped']}" if cell["capped"] else ""
                spread = f" ± {cell['sd']:.3f}" if cell["n"] > 1 else ""
                values.append(f"{cell['mean']:.3f}{spread}{mark}")
            lines.append(f"| {family} | " + " | ".join(values) + " |")
        lines.append("")
    lines += ["Chosen (`models.<family>.lr` in params.yaml; the mean over tasks of the cell's seed mean / the best "
              "seed mean of the task):", "", "| family | lr | mean normalised val score |", "|---|---:|---:|"]
    lines += [f"| {family} | {lr:g} | {score:.3f} |" for family, (lr, score) in chosen.items()]
    lines += ["", "A difference between two lrs smaller than the standard deviations beside them is noise; exact "
              "ties go to the lr nearest the former default 0.002."]
    return "\n".join(lines) + "\n"


def apply(params_path: Path, chosen: dict) -> None:
    text = params_path.read_text(encoding="utf-8")
    for family, (lr, _) in chosen.items():
        pattern = re.compile(rf"(?m)(^  {family}:\n(?:    .*\n)*?    lr: )[^\n]*")
        text, count = pattern.subn(lambda m: f"{m.group(1)}{lr:g}", text, count=1)
        if count != 1:
            raise SystemExit(f"{params_path}: no models.{family}.lr line to rewrite")
    params_path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.002, 0.004, 0.008, 0.016, 0.032])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell (default 3)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--models", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--parallel", type=int, default=os.cpu_count() or 1, help="cells at once (default: cores)")
    parser.add_argument("--out", default="artifacts/sweep", help="where the cells train (kept: a rerun resumes)")
    parser.add_argument("--docs", default=None, help="replace the '## Learning rate' section of this file")
    parser.add_argument("--apply", action="store_true", help="write the chosen lrs into --params")
    parser.add_argument("--from-cells", action="store_true",
                        help="train nothing: choose from the summaries the cells' workers left in --out")
    args = parser.parse_args(argv)
    for folder in ("artifacts/features", "artifacts/tokens"):
        if not (REPO / folder).is_dir() and not args.from_cells:
            raise SystemExit(f"lr_sweep: error: {folder} is missing; run `dvc repro features tokenize` first")
    params = yaml.safe_load((REPO / args.params).read_text(encoding="utf-8"))
    out = (REPO / args.out).resolve()
    grid = [(t, f, lr, seed) for seed in range(args.seeds) for t in args.tasks for f in args.models for lr in args.lrs]
    cells: list[dict] = []
    failed: list[str] = []
    if args.from_cells:
        for t, f, lr, seed in grid:
            try:
                cells.append(read_cell(out, t, f, lr, seed))
            except FileNotFoundError:
                failed.append(f"{t}/{f} lr {lr:g} seed {seed}: no summary in {cell_dir(out, t, f, lr)}")
    else:
        with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            files = {(f, lr): cell_params(params, f, lr, args.seeds, Path(tmp)) for f in args.models for lr in args.lrs}
            jobs = {pool.submit(run_cell, t, f, lr, seed, files[f, lr], out, params["data"]): (t, f, lr, seed)
                    for t, f, lr, seed in grid}
            for k, job in enumerate(concurrent.futures.as_completed(jobs), 1):
                t, f, lr, seed = jobs[job]
                try:
                    cell = job.result()
                except Exception as err:  # noqa: BLE001 - one cell failing must not hide the others' progress
                    failed.append(str(err).splitlines()[0])
                    print(f"[{k}/{len(jobs)}] FAILED {err}", flush=True)
                    continue
                cells.append(cell)
                print(f"[{k}/{len(jobs)}] {t} {f} lr {lr:g} seed {seed}: val {cell['metric']} {cell['val']:.3f} "
                      f"(best epoch {cell['best_epoch']} of {cell['epochs_run']})", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cells.json").write_text(json.dumps(cells, indent=1), encoding="utf-8")
    if failed:
        print(f"lr_sweep: error: {len(failed)} of {len(grid)} cells have no result (rerun: finished cells resume):",
              *failed, sep="\n  ", file=sys.stderr)
        return 1
    chosen = choose(cells, args.models, args.tasks, args.lrs)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    text = markdown(cells, chosen, args.tasks, args.lrs, params["train"]["epochs"], commit)
    print(text)
    if args.docs:
        sys.path.insert(0, str(REPO / "src"))
        from seqvision.io import replace_markdown_section

        replace_markdown_section(REPO / args.docs, HEADING, text)
    if args.apply:
        apply(REPO / args.params, chosen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
