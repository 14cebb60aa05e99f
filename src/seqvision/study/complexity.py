"""Row 3 of the seed's table: compute and memory vs sequence length N, training and streaming inference.

Training (:func:`run_compute`): forward + backward of each variant's activity model (its sequence encoder plus a
linear head) on one clip of N random frame features, over a doubling ladder of N; every point in a fresh process,
``repeats`` interleaved rounds. Time is the median wall time of a warm step; memory the peak above the model, its
gradients and the input (:func:`seqvision.study.measure.peak_memory`). Exponents are fitted on N >= ``fit_min_n``.

Streaming (:func:`run_streaming`): one decoding step of each variant's video captioner after N tokens, the
Transformer with its KV cache of N positions, the recurrent families with their fixed-size state.

The slide's claims, as exponents of N: RNN O(N) time and O(N) memory (backpropagation through time keeps every
step's activations); Transformer O(N^2) time and O(N) memory. The memory claim holds only for fused attention
(``F.scaled_dot_product_attention``, which never materialises the N x N weights; Dao et al. 2022, Rabe & Staats
2021); naive softmax(QK^T)V stores them, O(N^2). The main comparison (``transformer``) uses the fused kernel.
For streaming: RNN state O(1) and step time O(1); Transformer KV cache O(N) and step time O(N).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from seqvision.study.cells import StepSpec, StreamSpec, run_cells, step_cell, stream_cell
from seqvision.config import to_dict
from seqvision.study.fit import PowerFit, Verdict, combine, fit_power_law, verdict
from seqvision.study.measure import Cell, environment
from seqvision.study.presets import StudyConfig
from seqvision.study.variants import family_of

Log = Callable[[str], None] | None

# (metric, family) -> claimed exponent of N
TRAIN_CLAIMS: dict[str, dict[str, float]] = {
    "time_s": {"rnn": 1, "lstm": 1, "gru": 1, "mingru": 1, "transformer": 2},
    "peak_bytes": {"rnn": 1, "lstm": 1, "gru": 1, "mingru": 1, "transformer": 1},
}
STREAM_CLAIMS: dict[str, dict[str, float]] = {
    "time_s": {"rnn": 0, "lstm": 0, "gru": 0, "mingru": 0, "transformer": 1},
    "state_bytes": {"rnn": 0, "lstm": 0, "gru": 0, "mingru": 0, "transformer": 1},
}
# The table's columns: the slide's two, plus the parallel-scan RNN.
COLUMNS: dict[str, tuple[str, ...]] = {
    "RNNs": ("rnn", "lstm", "gru"),
    "Transformers": ("transformer", "transformer_naive"),
    "minGRU": ("mingru", "mingru_sequential"),
}


@dataclass(frozen=True)
class Finding:
    """The fit and verdict for one (variant, metric) over a row's ladder; ``error`` when it could not be fitted."""

    row: str
    variant: str
    metric: str
    fit: PowerFit | None
    verdict: Verdict | None
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"row": self.row, "variant": self.variant, "metric": self.metric,
                "fit": self.fit.to_json() if self.fit else None,
                "verdict": self.verdict.to_json() if self.verdict else None, "error": self.error}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Finding:
        return cls(data["row"], data["variant"], data["metric"],
                   PowerFit.from_json(data["fit"]) if data["fit"] else None,
                   Verdict(**data["verdict"]) if data["verdict"] else None, data["error"])


@dataclass(frozen=True)
class RowResult:
    """Everything one row of the study produced: its cells, fits/verdicts, the table cells and the environment."""

    row: str
    cells: Sequence[Cell]
    findings: Sequence[Finding]
    table: Sequence[Mapping[str, str]] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"row": self.row, "config": dict(self.config), "environment": environment(),
                "cells": [c.to_json() for c in self.cells], "findings": [f.to_json() for f in self.findings],
                "table": [dict(t) for t in self.table], "extra": dict(self.extra)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RowResult:
        """Back from :meth:`to_json` (e.g. a report stage re-plotting a row); the environment is not kept."""
        return cls(data["row"], [Cell.from_json(c) for c in data["cells"]],
                   [Finding.from_json(f) for f in data["findings"]], data["table"], data["extra"], data["config"])


def analyse(cells: Sequence[Cell], claims: Mapping[str, Mapping[str, float]], *, min_n: int, tolerance: float,
            seed: int = 0) -> list[Finding]:
    """Fit every (variant, metric) of ``cells`` (keyed by ``n``) and judge it against ``claims[metric][family]``."""
    findings = []
    for variant in dict.fromkeys(c.variant for c in cells):
        mine = sorted((c for c in cells if c.variant == variant), key=lambda c: c.key["n"])
        for metric, by_family in claims.items():
            n = [c.key["n"] for c in mine]
            values = [c.metrics.get(metric, []) for c in mine]
            try:
                fit = fit_power_law(n, values, min_n=min_n, seed=seed)
            except ValueError as err:
                findings.append(Finding(mine[0].row, variant, metric, None, None, str(err)))
                continue
            claimed = by_family.get(family_of(variant))
            judged = verdict(fit, claimed, tolerance=tolerance) if claimed is not None else None
            findings.append(Finding(mine[0].row, variant, metric, fit, judged))
    return findings


def table_cells(findings: Sequence[Finding], metrics: Mapping[str, str], *, depends_on: Mapping[str, str]
                ) -> list[dict[str, str]]:
    """One entry per (column, metric): claim, measured exponents per variant, combined verdict.

    ``metrics`` maps metric -> its label ("time", "memory"); ``depends_on`` maps column -> what a split verdict
    depends on ("the attention kernel").
    """
    out = []
    for column, variants in COLUMNS.items():
        for metric, label in metrics.items():
            judged = {f.variant: f.verdict for f in findings
                      if f.metric == metric and f.variant in variants and f.verdict is not None}
            if not judged:
                continue
            claim = next(iter(judged.values())).claim
            out.append({
                "column": column, "quantity": label, "claim": claim,
                "measured": "; ".join(f"{name} {v.measured}" for name, v in judged.items()),
                "verdict": combine(judged, depends_on=depends_on.get(column, "the variant")),
            })
    return out


def run_compute(config: StudyConfig, *, log: Log = None) -> RowResult:
    """Training cost vs N (forward + backward) for ``config.variants``; fits, verdicts and table cells."""
    specs = [
        (v, {"n": n}, StepSpec(variant=v, n=n, batch_size=config.batch_size, threads=config.threads,
                               device=config.device, precision=config.precision, iterations=config.iterations,
                               sizes=config.sizes, seed=config.seed))
        for v in config.variants for n in config.n_values
    ]
    cells = run_cells(specs, step_cell, row="compute", rounds=config.repeats, metrics=("time_s", "peak_bytes"),
                      timeout_s=config.cell_timeout_s, seed=config.seed, log=log)
    findings = analyse(cells, TRAIN_CLAIMS, min_n=config.fit_min_n, tolerance=config.tolerance, seed=config.seed)
    table = table_cells(findings, {"time_s": "time", "peak_bytes": "memory"},
                        depends_on={"RNNs": "the cell", "Transformers": "the attention kernel",
                                    "minGRU": "scan vs loop"})
    return RowResult("compute", cells, findings, table, config=_config_json(config))


def run_streaming(config: StudyConfig, *, log: Log = None) -> RowResult:
    """Streaming decoding cost per new token vs the number of earlier tokens N; fits and verdicts."""
    specs = [
        (v, {"n": n}, StreamSpec(variant=v, n=n, threads=config.threads, device=config.device,
                                 steps=config.stream_steps, sizes=config.sizes, seed=config.seed))
        for v in config.variants for n in config.stream_n_values
    ]
    cells = run_cells(specs, stream_cell, row="streaming", rounds=config.repeats, metrics=("time_s", "state_bytes"),
                      timeout_s=config.cell_timeout_s, seed=config.seed, log=log)
    findings = analyse(cells, STREAM_CLAIMS, min_n=config.fit_min_n, tolerance=config.tolerance, seed=config.seed)
    table = table_cells(findings, {"time_s": "time per token", "state_bytes": "state"},
                        depends_on={"RNNs": "the cell", "Transformers": "the attention kernel",
                                    "minGRU": "scan vs loop"})
    return RowResult("streaming", cells, findings, table, config=_config_json(config))


def _config_json(config: StudyConfig) -> dict[str, Any]:
    return to_dict(config)


def describe(findings: Sequence[Finding]) -> list[str]:
    """One line per finding, for logs and the CLI."""
    lines = []
    for f in findings:
        if f.fit is None and f.verdict is not None:  # a verdict without a power law (row 4's comparisons)
            lines.append(f"{f.row}/{f.variant} {f.metric}: {f.verdict.measured}: {f.verdict.label}")
            continue
        if f.fit is None:
            lines.append(f"{f.row}/{f.variant} {f.metric}: not fitted ({f.error})")
            continue
        judged = f" vs {f.verdict.claim}: {f.verdict.label}" if f.verdict else ""
        lines.append(f"{f.row}/{f.variant} {f.metric}: N^{f.fit.exponent:.2f} [{f.fit.low:.2f}, {f.fit.high:.2f}]"
                     f"{judged}")
    return lines
