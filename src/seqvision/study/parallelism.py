"""Row 2 of the seed's table: parallelizability, as a critical path and as what it buys in wall time.

- :func:`critical_path`: sequential steps per layer over a sequence of N: a recurrence N (h_t needs h_{t-1});
  attention 1 (every position in one batched product; the softmax's sums over N are log-depth trees, which the
  slide counts as one step, and so do we); minGRU's scan 2 * ceil(log2 N)
  (a work-efficient Blelloch scan: an up-sweep and a down-sweep of log2 N levels each; Blelloch 1990) - PyTorch's
  CPU ``cumsum``/``logcumsumexp`` are in fact sequential loops, so on CPU the scan's benefit is fewer, larger
  kernels rather than a shorter path.
- :func:`run_threads`: a whole training step (forward, backward, AdamW) at batch 1 for each variant at a few N,
  with 1 and 2 (``thread_counts``) torch threads, in fresh processes; speedup = time(fewest) / time(most threads).
- :func:`run_token_budget`: step time vs N at a fixed number of frames per batch (batch = tokens // N), bfloat16,
  on CUDA when present: the GPU fills its cores with the batch, so what remains is how the critical path grows
  with N. Reports tokens/s and, for the Transformer, model FLOPs utilisation (MFU) from :func:`transformer_flops`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from seqvision.config import to_dict
from seqvision.study.cells import StepSpec, run_cells, step_cell
from seqvision.study.variants import ModelSizes, family_of
from seqvision.study.complexity import COLUMNS, Finding, Log, RowResult, analyse
from seqvision.study.fit import ratio_interval
from seqvision.study.measure import Cell
from seqvision.study.presets import StudyConfig


def critical_path(variant: str, n: int) -> int:
    """Sequential steps per layer to process N positions in training (the longest dependency chain)."""
    if variant in ("rnn", "lstm", "gru", "mingru_sequential"):
        return n
    if family_of(variant) == "transformer":
        return 1
    if variant == "mingru":
        return 2 * math.ceil(math.log2(n)) if n > 1 else 1
    raise ValueError(f"no critical path known for variant {variant!r}")


def transformer_flops(n: int, *, batch_size: int, sizes: ModelSizes, backward: bool = True) -> float:
    """Matmul FLOPs of one forward (+ backward) of the Transformer activity model on (B, N) frames.

    Per layer and sequence of S = N + 1 tokens (with CLS): 2 S d^2 (4 + 2 ffn_mult) for the projections and the
    feed-forward, 4 S^2 d for QK^T and AV over all heads; plus the input projection 2 N D d and the head 2 d C.
    The backward pass costs twice the forward, except for the input projection, whose input needs no gradient.
    Elementwise work, softmax and layer norms are not counted (the convention of MFU, Chowdhery et al. 2022).
    Analytic because ``torch.utils.flop_counter`` does not count the fused CPU attention kernel; it matches that
    counter exactly on the naive path (tested).
    """
    s, d = n + 1, sizes.hidden_size
    per_layer = 2 * s * d * d * (4 + 2 * sizes.ffn_mult) + 4 * s * s * d
    body = sizes.num_layers * per_layer + 2 * d * sizes.num_classes
    stem = 2 * n * sizes.feature_dim * d
    if not backward:
        return float(batch_size * (body + stem))
    return float(batch_size * (3 * body + 2 * stem))


def run_threads(config: StudyConfig, *, log: Log = None) -> list[Cell]:
    """Training step time at batch 1 for every (variant, N, threads) of the parallelism settings."""
    specs = [
        (v, {"n": n, "threads": t}, StepSpec(variant=v, n=n, batch_size=1, threads=t, optimizer=True,
                                             iterations=config.iterations, sizes=config.sizes, seed=config.seed))
        for v in config.parallel_variants for n in config.parallel_n_values for t in config.thread_counts
    ]
    return run_cells(specs, step_cell, row="parallelism", rounds=config.repeats, metrics=("time_s",),
                     timeout_s=config.cell_timeout_s, seed=config.seed, log=log)


def speedups(cells: Sequence[Cell], *, seed: int = 0) -> list[dict[str, Any]]:
    """time(fewest threads) / time(most threads) per (variant, N), with a bootstrap 95% interval."""
    out = []
    for variant in dict.fromkeys(c.variant for c in cells):
        for n in sorted({c.key["n"] for c in cells if c.variant == variant}):
            by_threads = {c.key["threads"]: c for c in cells if c.variant == variant and c.key["n"] == n}
            lo, hi = min(by_threads), max(by_threads)
            if lo == hi:
                continue
            ratio, low, high = ratio_interval(by_threads[lo].metrics.get("time_s", []),
                                              by_threads[hi].metrics.get("time_s", []), seed=seed)
            out.append({"variant": variant, "n": n, "threads": [lo, hi], "speedup": ratio, "low": low, "high": high,
                        "critical_path": critical_path(variant, n)})
    return out


def parallel_label(speedup: Mapping[str, Any], *, min_speedup: float = 1.1) -> str:
    """'parallel' when the whole interval is above ``min_speedup``; 'slower' when it is below 1 / min_speedup
    (more threads cost time: the cores were busy, or the work is too small to split); 'sequential' when it lies
    in between; else 'unclear'."""
    if math.isnan(speedup["low"]):
        return "unclear"
    if speedup["low"] > min_speedup:
        return "parallel"
    if speedup["high"] < 1 / min_speedup:
        return "slower"
    if speedup["high"] < min_speedup:
        return "sequential"
    return "unclear"


# What the slide claims each column does with more threads.
PARALLEL_CLAIMS = {"RNNs": "sequential", "Transformers": "parallel", "minGRU": "parallel"}


def parallelism_table(rows: Sequence[Mapping[str, Any]], *, min_speedup: float = 1.1) -> list[dict[str, str]]:
    """Table cells from the speedups at each variant's largest N: the claim and whether the measurement shows it.

    minGRU's claim is the paper's (its scan parallelizes); the slide says "no" for every RNN.
    """
    out = []
    for column, variants in COLUMNS.items():
        mine = [r for r in rows if r["variant"] in variants]
        if not mine:
            continue
        largest = {v: max((r for r in mine if r["variant"] == v), key=lambda r: r["n"])
                   for v in dict.fromkeys(r["variant"] for r in mine)}
        labels = {v: parallel_label(r, min_speedup=min_speedup) for v, r in largest.items()}
        claim = PARALLEL_CLAIMS[column]
        agree = {v: (lab == claim) for v, lab in labels.items() if lab in ("parallel", "sequential")}
        slower = [v for v, lab in labels.items() if lab == "slower"]
        if slower:
            # A slowdown says nothing about the model: the extra threads had no free core (or nothing to split).
            label = f"inconclusive: {', '.join(slower)} ran slower with more threads"
        elif not agree:
            label = "inconclusive"
        elif all(agree.values()) and len(agree) == len(labels):
            label = "agrees"
        elif not any(agree.values()) and len(agree) == len(labels):
            label = "disagrees"
        else:
            label = "depends on the variant: " + ", ".join(f"{v} {labels[v]}" for v in labels)
        measured = "; ".join(
            f"{v} x{r['speedup']:.2f} [{r['low']:.2f}, {r['high']:.2f}] with {r['threads'][1]} vs {r['threads'][0]}"
            f" threads at N={r['n']} (critical path {r['critical_path']})" for v, r in largest.items()
        )
        out.append({"column": column, "quantity": "parallelizability", "claim": claim, "measured": measured,
                    "verdict": label})
    return out


def run_token_budget(config: StudyConfig, *, device: str = "cuda", log: Log = None) -> tuple[list[Cell], list[Finding]]:
    """Training step time vs N at ``gpu_tokens`` frames per batch, bfloat16 autocast, on ``device``.

    Exponents are fitted over the whole ladder without a claim: at a fixed token budget an ideally parallel model
    takes constant time per step, a recurrence time proportional to its critical path.
    """
    specs = [
        (v, {"n": n}, StepSpec(variant=v, n=n, batch_size=max(1, config.gpu_tokens // n), threads=config.threads,
                               device=device, precision="bfloat16", optimizer=True,
                               iterations=max(3, config.iterations), sizes=config.sizes, seed=config.seed))
        for v in config.parallel_variants for n in config.gpu_n_values
    ]
    cells = run_cells(specs, step_cell, row="gpu", rounds=config.repeats, metrics=("time_s", "peak_bytes"),
                      timeout_s=config.cell_timeout_s, seed=config.seed, log=log)
    out = []
    for cell in cells:
        batch = cell.settings.get("batch_size", max(1, config.gpu_tokens // cell.key["n"]))
        extra: dict[str, Any] = {"tokens_per_s": batch * cell.key["n"] / cell.median("time_s")}
        if family_of(cell.variant) == "transformer" and config.gpu_peak_tflops > 0:
            flops = transformer_flops(cell.key["n"], batch_size=batch, sizes=config.sizes)
            extra["model_flops"] = flops
            extra["mfu"] = flops / cell.median("time_s") / (config.gpu_peak_tflops * 1e12)
        out.append(Cell(cell.row, cell.variant, cell.key, cell.metrics, {**cell.settings, **extra}, cell.errors))
    claims = {"time_s": {}, "peak_bytes": {}}
    findings = analyse(out, claims, min_n=min(config.gpu_n_values), tolerance=config.tolerance, seed=config.seed)
    return out, findings


def run_parallelism(config: StudyConfig, *, log: Log = None, gpu: bool | None = None) -> RowResult:
    """Row 2: critical paths over the compute ladder, the threads experiment, and the GPU one when CUDA is present
    (``gpu=None``: detect; the GPU cells then sit in ``cells`` under row "gpu")."""
    paths = {v: {str(n): critical_path(v, n) for n in config.n_values} for v in config.parallel_variants}
    cells = run_threads(config, log=log)
    rows = speedups(cells, seed=config.seed)
    table = parallelism_table(rows)
    findings: list[Finding] = []
    extra: dict[str, Any] = {"critical_path": paths, "speedups": rows}
    if gpu is None:
        gpu = torch.cuda.is_available()
    if gpu and config.gpu_n_values:
        gpu_cells, findings = run_token_budget(config, device="cuda", log=log)
        cells = [*cells, *gpu_cells]
        extra["gpu"] = torch.cuda.get_device_name(0)
    else:
        extra["gpu"] = None
    return RowResult("parallelism", cells, findings, table, extra=extra, config=to_dict(config))
