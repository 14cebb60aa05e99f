"""Choose the captioners' decoder (``evaluate.beam_size``, ``evaluate.length_penalty``) on the validation split.

    python scripts/decoder_sweep.py [--runs artifacts/runs] [--beams 1 3 5] [--length-penalties 0 0.6]
                                    [--tasks ...] [--docs docs/tuning.md] [--apply]

Run it from the repository root after a ``make demo`` (it reads every captioning training's
``artifacts/runs/<task>/<family>/train/seed<k>/best.pt``, ``artifacts/features`` and ``artifacts/tokens``). Every
checkpoint decodes the whole val split with every decoder of the grid (beam sizes x GNMT length penalties; beam
1 is greedy search, where the penalty changes nothing, so it runs once) and is scored by CIDEr-D, as the
training scores its epochs. The test split is never read.

A decoder's score is the mean over checkpoints of its CIDEr-D divided by the best CIDEr-D of that checkpoint
under any decoder (1.0 = best for every checkpoint), so every (task, family, seed) weighs the same. The chosen
decoder is the best by that score, and among decoders within ``--tie`` of it the cheapest (smallest beam, then no
penalty): a wider beam has to earn its cost. The table and the choice replace the "## Decoder" section of
``--docs``; ``--apply`` writes them into params.yaml (comments kept). Bias to know: each checkpoint was chosen
with the decoder params.yaml had when it trained, which favours that decoder a little.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = ("image_captioning", "video_captioning")
HEADING = "## Decoder"


def decoders(beams: list[int], penalties: list[float]) -> list[tuple[int, float]]:
    """The grid, cheapest first; greedy search (beam 1) once, with no penalty."""
    grid = {(b, 0.0 if b == 1 else p) for b in beams for p in penalties}
    return sorted(grid)


def choose(cells: list[dict], grid: list[tuple[int, float]], *, tie: float) -> tuple[tuple[int, float], dict]:
    """(chosen decoder, ``{decoder: mean normalised score}``). ``cells``: one per (checkpoint, decoder) with
    ``checkpoint``, ``beam``, ``length_penalty`` and ``cider_d``."""
    best: dict[str, float] = {}
    for c in cells:
        best[c["checkpoint"]] = max(best.get(c["checkpoint"], 0.0), c["cider_d"])
    scores = {}
    for d in grid:
        rows = [c for c in cells if (c["beam"], c["length_penalty"]) == d]
        scores[d] = sum(c["cider_d"] / best[c["checkpoint"]] if best[c["checkpoint"]] > 0 else 1.0
                        for c in rows) / len(rows)
    top = max(scores.values())
    return min(d for d in grid if scores[d] >= top - tie), scores  # the grid is sorted cheapest first


def sweep(task: str, checkpoints: list[Path], grid: list[tuple[int, float]], *, max_length: int) -> list[dict]:
    """CIDEr-D on the whole val split of every checkpoint under every decoder."""
    import torch

    from seqvision import checkpoint as ckpt_io
    from seqvision import experiment
    from seqvision.config import EvaluateConfig
    from seqvision.datasets import make_loader
    from seqvision.models import build_from_checkpoint

    torch.set_num_threads(1)
    data = experiment.load_task_data(task, features_dir=REPO / "artifacts/features", tokens_dir=REPO / "artifacts/tokens")
    loader = make_loader(data.val, batch_size=64, shuffle=False)
    cells = []
    for path in checkpoints:
        model = build_from_checkpoint(ckpt_io.load(path)).eval()
        for beam, penalty in grid:
            config = EvaluateConfig(beam_size=beam, length_penalty=penalty, max_length=max_length, batch_size=64)
            metric = experiment.caption_cider(data.vocab, config, max_items=len(data.val))
            started = time.perf_counter()
            with torch.no_grad():
                value = metric.fn(model, loader, torch.device("cpu"))
            cells.append({"task": task, "family": path.parents[2].name, "seed": path.parent.name,
                          "checkpoint": str(path.relative_to(REPO)), "beam": beam, "length_penalty": penalty,
                          "cider_d": value, "seconds": time.perf_counter() - started})
            print(f"{task} {path.parents[2].name} {path.parent.name} beam {beam} lp {penalty:g}: CIDEr-D "
                  f"{value:.3f} ({cells[-1]['seconds']:.1f} s)", flush=True)
    return cells


def markdown(cells: list[dict], grid: list[tuple[int, float]], chosen: tuple[int, float], scores: dict,
             commit: str, tie: float) -> str:
    label = {d: f"beam {d[0]}" + (f", lp {d[1]:g}" if d[0] > 1 else " (greedy)") for d in grid}
    lines = [HEADING, "",
             f"Measured with `python scripts/decoder_sweep.py` on {datetime.date.today()} (commit {commit}) over "
             f"the {len({c['checkpoint'] for c in cells})} captioning checkpoints of a `make demo` run (every seed "
             "of every family below). Validation split only, CIDEr-D over all of it; each cell is the mean over "
             "seeds.", ""]
    for task in sorted({c["task"] for c in cells}):
        lines += [f"**{task}** (val CIDEr-D)", "", "| family | " + " | ".join(label[d] for d in grid) + " |",
                  "|---|" + "---:|" * len(grid)]
        for family in sorted({c["family"] for c in cells if c["task"] == task}):
            values = []
            for d in grid:
                rows = [c["cider_d"] for c in cells
                        if c["task"] == task and c["family"] == family and (c["beam"], c["length_penalty"]) == d]
                values.append(f"{sum(rows) / len(rows):.3f}")
            lines.append(f"| {family} | " + " | ".join(values) + " |")
        lines.append("")
    seconds = {d: sum(c["seconds"] for c in cells if (c["beam"], c["length_penalty"]) == d) for d in grid}
    lines += ["| decoder | mean normalised val CIDEr-D | decoding time, all checkpoints (s) |", "|---|---:|---:|"]
    lines += [f"| {label[d]} | {scores[d]:.3f} | {seconds[d]:.1f} |" for d in grid]
    lines += ["", f"Chosen: **{label[chosen]}** (`evaluate.beam_size` {chosen[0]}, `evaluate.length_penalty` "
              f"{chosen[1]:g}): the cheapest decoder within {tie:g} of the best mean normalised score. Each "
              "checkpoint was selected with the decoder params.yaml had when it trained, a small bias towards it."]
    return "\n".join(lines) + "\n"


def apply(params_path: Path, chosen: tuple[int, float]) -> None:
    text = params_path.read_text(encoding="utf-8")
    for key, value in (("beam_size", f"{chosen[0]}"), ("length_penalty", f"{chosen[1]:.1f}")):
        text, count = re.subn(rf"(?m)(^evaluate:\n(?:  .*\n|#.*\n)*?  {key}: )[^\n]*", lambda m: m.group(1) + value,
                              text, count=1)
        if count != 1:
            raise SystemExit(f"{params_path}: no evaluate.{key} line to rewrite")
    params_path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="artifacts/runs", help="the train stages' outputs (default: %(default)s)")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--length-penalties", type=float, nargs="+", default=[0.0, 0.6])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--tie", type=float, default=0.01,
                        help="decoders within this much of the best normalised score count as tied (default 0.01)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="artifacts/decoder_sweep.json", help="the cells, as JSON")
    parser.add_argument("--docs", default=None, help="replace the '## Decoder' section of this file")
    parser.add_argument("--apply", action="store_true", help="write the chosen decoder into --params")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    from seqvision.config import load_params

    params = load_params(REPO / args.params)
    grid = decoders(args.beams, args.length_penalties)
    cells: list[dict] = []
    for task in args.tasks:
        checkpoints = sorted((REPO / args.runs / task).glob("*/train/seed*/best.pt"))
        if not checkpoints:
            raise SystemExit(f"decoder_sweep: error: no {REPO / args.runs / task}/*/train/seed*/best.pt; "
                             "run `make demo` first")
        cells += sweep(task, checkpoints, grid, max_length=params.evaluate.max_length)
    chosen, scores = choose(cells, grid, tie=args.tie)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    text = markdown(cells, grid, chosen, scores, commit, args.tie)
    print(text)
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cells, indent=1), encoding="utf-8")
    if args.docs:
        from seqvision.io import replace_markdown_section

        replace_markdown_section(REPO / args.docs, HEADING, text)
    if args.apply:
        apply(REPO / args.params, chosen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
