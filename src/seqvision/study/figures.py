"""The study's figures (matplotlib, Agg): one PNG per row, written atomically."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from seqvision.io import atomic_path  # noqa: E402
from seqvision.study.variants import VARIANTS  # noqa: E402
from seqvision.study.complexity import Finding, RowResult  # noqa: E402
from seqvision.study.measure import Cell  # noqa: E402

COLORS = dict(zip(VARIANTS, plt.get_cmap("tab10").colors))
STYLES = {"transformer_naive": "--", "mingru_sequential": ":"}


def _ladder(ax: plt.Axes, cells: Sequence[Cell], findings: Sequence[Finding], metric: str, *, scale: float = 1.0,
            title: str, ylabel: str) -> None:
    """Medians vs N (bars: min-max of the repeats) per variant, with the fitted power law over its range."""
    for variant in dict.fromkeys(c.variant for c in cells):
        mine = sorted((c for c in cells if c.variant == variant and c.metrics.get(metric)), key=lambda c: c.key["n"])
        if not mine:
            continue
        n = np.array([c.key["n"] for c in mine], dtype=float)
        med = np.array([c.median(metric) for c in mine]) * scale
        lo = med - np.array([min(c.metrics[metric]) for c in mine]) * scale
        hi = np.array([max(c.metrics[metric]) for c in mine]) * scale - med
        fit = next((f.fit for f in findings if f.variant == variant and f.metric == metric and f.fit), None)
        label = variant if fit is None else f"{variant}  N^{fit.exponent:.2f}"
        color = COLORS.get(variant)
        ax.errorbar(n, med, yerr=[lo, hi], fmt="o", ms=3, color=color, capsize=2, label=label,
                    linestyle=STYLES.get(variant, "-"), lw=0.8)
        if fit is not None:
            xs = np.array([min(fit.n_fitted), max(fit.n_fitted)], dtype=float)
            ax.plot(xs, np.exp(fit.intercept) * xs**fit.exponent * scale, color=color, lw=2.5, alpha=0.35)
    ax.set(yscale="log", title=title, xlabel="N", ylabel=ylabel)
    _n_axis(ax, [c.key["n"] for c in cells])
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7)


def _n_axis(ax: plt.Axes, n_values: Sequence[float]) -> None:
    """Log-2 N axis labelled with the ladder's own values (16, 32, ... rather than 2 x 10^1)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(n_values)), [f"{int(n)}" for n in sorted(set(n_values))], fontsize=7)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _save(fig: plt.Figure, path: str | Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_compute(compute: RowResult, streaming: RowResult | None, path: str | Path) -> None:
    """Row 3: training time and peak memory vs N; streaming step time and state bytes vs N."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    device = next((c.settings.get("device") for c in compute.cells), "cpu")
    _ladder(axes[0, 0], compute.cells, compute.findings, "time_s", scale=1e3,
            title=f"forward + backward time ({device})", ylabel="ms per step")
    _ladder(axes[0, 1], compute.cells, compute.findings, "peak_bytes", scale=2.0**-20,
            title="peak memory above model + input", ylabel="MiB")
    if streaming is not None:
        _ladder(axes[1, 0], streaming.cells, streaming.findings, "time_s", scale=1e3,
                title="streaming: one decoding step after N tokens", ylabel="ms per token")
        _ladder(axes[1, 1], streaming.cells, streaming.findings, "state_bytes", scale=2.0**-10,
                title="streaming: decoding state (RNN state / KV cache)", ylabel="KiB")
    else:
        for ax in axes[1]:
            ax.axis("off")
    fig.suptitle("Compute and memory vs sequence length N (thick lines: fitted power laws)")
    _save(fig, path)


def plot_parallelism(result: RowResult, path: str | Path) -> None:
    """Row 2: critical path vs N, speedup from more threads, and (with a GPU) step time at a fixed token budget."""
    gpu_cells = [c for c in result.cells if c.row == "gpu"]
    fig, axes = plt.subplots(1, 3 if gpu_cells else 2, figsize=(16 if gpu_cells else 11, 4.5))
    ax = axes[0]
    for variant, path_by_n in result.extra["critical_path"].items():
        n = np.array([int(k) for k in path_by_n], dtype=float)
        ax.plot(n, list(path_by_n.values()), marker="o", ms=3, color=COLORS.get(variant), label=variant,
                linestyle=STYLES.get(variant, "-"))
    ax.set(yscale="log", title="critical path (sequential steps per layer)", xlabel="N", ylabel="steps")
    _n_axis(ax, [int(k) for p in result.extra["critical_path"].values() for k in p])
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7)

    ax = axes[1]
    rows = result.extra["speedups"]
    ns = sorted({r["n"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / max(1, len(ns))
    for j, n in enumerate(ns):
        for i, variant in enumerate(variants):
            r = next((r for r in rows if r["variant"] == variant and r["n"] == n), None)
            if r is None or np.isnan(r["speedup"]):
                continue
            ax.bar(i + j * width, r["speedup"], width, color=COLORS.get(variant), alpha=0.4 + 0.6 * j / len(ns),
                   yerr=[[r["speedup"] - r["low"]], [r["high"] - r["speedup"]]], capsize=2)
    if rows:
        lo, hi = rows[0]["threads"]
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(hi / lo, color="k", lw=0.8, ls=":")
        ax.set_title(f"training step speedup, {hi} vs {lo} threads, batch 1 (bars: N = {', '.join(map(str, ns))})")
    ax.set_xticks(np.arange(len(variants)) + 0.4 - width / 2, variants, rotation=30, fontsize=8)
    ax.set_ylabel("time(fewer threads) / time(more threads)")

    if gpu_cells:
        _ladder(axes[2], gpu_cells, result.findings, "time_s", scale=1e3,
                title=f"GPU step time at a fixed token budget ({result.extra.get('gpu')})", ylabel="ms per step")
    _save(fig, path)


def plot_inductive_bias(result: RowResult, path: str | Path) -> None:
    """Row 4: test accuracy (mean over seeds, band: 95% t-interval) vs training clips, one line per family; chance
    dashed, the samples-to-target accuracy dotted."""
    extra = result.extra
    fig, ax = plt.subplots(figsize=(10, 5.5))
    sizes: set[int] = set()
    curves = extra["curves"]  # in the config's order of families (the JSON's keys are sorted)
    order = [f for f in result.config.get("bias_families", ()) if f in curves] + \
        [f for f in curves if f not in result.config.get("bias_families", ())]
    for family in order:
        rows = [r for r in curves[family] if r["mean"] is not None]
        if not rows:
            continue
        n = np.array([r["train_items"] for r in rows], dtype=float)
        mean = np.array([r["mean"] for r in rows])
        color = COLORS.get(family, "0.35")  # meanpool has no study variant colour: grey
        style = ":" if family == "meanpool" else "-"
        ax.plot(n, mean, marker="o", ms=4, color=color, linestyle=style, label=family)
        banded = [(x, r["ci95"]) for x, r in zip(n, rows) if r["ci95"] is not None]
        if banded:
            ax.fill_between([x for x, _ in banded], [c[0] for _, c in banded], [c[1] for _, c in banded],
                            color=color, alpha=0.15, lw=0)
        sizes.update(int(x) for x in n)
    ax.axhline(extra["chance"], color="k", ls="--", lw=0.8, label=f"chance (1/{extra['num_classes']})")
    target = extra["target"]
    if target["accuracy"] is not None:
        ax.axhline(target["accuracy"], color="k", ls=":", lw=0.8,
                   label=f"target: {target['fraction']:g} x best at the largest size")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(sizes), [str(n) for n in sorted(sizes)], fontsize=8)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set(xlabel="training clips (nested, class-stratified subsets)", ylabel="test top-1 accuracy",
           title="Inductive bias: accuracy vs training-set size (bands: 95% interval over seeds)")
    ax.set_ylim(0, 1)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the bands fill the axes
    _save(fig, path)


def plot_long_range(result: RowResult, path: str | Path) -> None:
    """Row 1: test accuracy (mean over seeds, band: 95% t-interval) vs distance D per family, the controls dashed in
    grey with their chance levels (left); the models trained at ``long_length_distance`` tested on clips 2x and 4x as
    long (middle); the gradient reaching each frame of the longest clips, trained and at initialisation (right)."""
    extra = result.extra
    fig, (ax, gen, grad) = plt.subplots(1, 3, figsize=(18, 6.2), gridspec_kw={"width_ratios": [3, 2, 2]})
    curves = extra["curves"]
    families = [f for f in result.config.get("long_families", ()) if f in curves]
    controls = sorted(v for v in curves if v.startswith("control:"))
    greys = dict(zip(controls, ("0.25", "0.45", "0.65")))
    distances: set[int] = set()
    for variant in [*families, *controls]:
        rows = [r for r in curves[variant] if r["mean"] is not None]
        if not rows:
            continue
        d = np.array([r["distance"] for r in rows], dtype=float)
        color = greys.get(variant) or COLORS.get(variant, "0.35")
        ax.plot(d, [r["mean"] for r in rows], marker="o", ms=4, color=color,
                linestyle="--" if variant in greys else "-", label=variant)
        banded = [(x, r["ci95"]) for x, r in zip(d, rows) if r["ci95"] is not None]
        if banded:
            ax.fill_between([x for x, _ in banded], [c[0] for _, c in banded], [c[1] for _, c in banded],
                            color=color, alpha=0.12, lw=0)
        distances.update(int(x) for x in d)
    ax.axhline(1 / extra["num_classes"], color="k", ls=":", lw=0.8, label=f"chance (1/{extra['num_classes']})")
    ax.axhline(extra["chance"]["shuffled"], color="k", ls="-.", lw=0.8,
               label=f"order-blind ceiling ({extra['chance']['shuffled']:g}: the pair, not its direction)")
    _n_axis(ax, sorted(distances))
    ax.set(xlabel="distance D (frames between the labelled event and either end)", ylabel="test top-1 accuracy",
           title="Long-range dependencies: accuracy vs distance\n(bands: 95% interval over seeds)", ylim=(0, 1))
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4)  # below: the curves stay visible

    lengths = extra["length_generalisation"]
    for variant in [f for f in families if f in lengths]:
        found = lengths[variant]
        frames = [found["frames"], *(t["frames"] for t in found["tests"].values())]
        means = [found["train"]["mean"], *(t["mean"] for t in found["tests"].values())]
        gen.plot(frames, means, marker="o", ms=4, color=COLORS.get(variant, "0.35"), label=variant)
    if lengths:
        first = next(iter(lengths.values()))
        ticks = [first["frames"], *(t["frames"] for t in first["tests"].values())]
        _n_axis(gen, ticks)
        gen.axvline(first["frames"], color="k", lw=0.6, alpha=0.5)
    gen.axhline(1 / extra["num_classes"], color="k", ls=":", lw=0.8)
    gen.axhline(extra["chance"]["shuffled"], color="k", ls="-.", lw=0.8)
    gen.set(xlabel="test clip length (frames; trained at the first)", ylabel="test top-1 accuracy (mean of seeds)",
            title="Length generalisation:\ntrained at N frames, tested at 2N and 4N", ylim=(0, 1))
    gen.grid(True, which="both", alpha=0.25)
    gen.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)

    for family, found in extra.get("gradients", {}).items():
        color = COLORS.get(family, "0.35")
        frames = np.arange(found["frames"])
        for name, style in (("trained", "-"), ("init", ":")):
            values = np.array(found[name])  # relative to its own largest value: the losses differ in scale
            values = np.maximum(values / max(values.max(), 1e-30), 1e-12)
            grad.plot(frames, values, color=color, linestyle=style, lw=1,
                      label=family if name == "trained" else None)
        grad.axvspan(*found["visible"], color="0.85", lw=0)
    grad.set(yscale="log", xlabel="frame t (grey: the labelled object visible)",
             ylabel="mean ||dL/dc_t|| / its largest value",
             title="Gradient reaching frame t at the largest D\n(solid: trained, dotted: at initialisation)")
    grad.grid(True, which="both", alpha=0.25)
    if extra.get("gradients"):
        grad.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)
    _save(fig, path)


# --------------------------------------------------------------------------------------------------------
# One figure per row of the seed's table (the report's; the rows' stages never import this module)

Plot = Callable[[Mapping[str, RowResult], Path], None]

PLOTS: dict[str, Plot] = {  # row -> its figure; streaming's panels are in compute.png (one compute-and-memory row)
    "compute": lambda results, path: plot_compute(results["compute"], results.get("streaming"), path),
    "parallelism": lambda results, path: plot_parallelism(results["parallelism"], path),
    "inductive_bias": lambda results, path: plot_inductive_bias(results["inductive_bias"], path),
    "long_range": lambda results, path: plot_long_range(results["long_range"], path),
}


def write_figures(results: Mapping[str, RowResult], out_dir: str | Path) -> dict[str, Path]:
    """``{row: out_dir/{row}.png}`` for every row in ``results`` that draws a figure (:data:`PLOTS`)."""
    written = {}
    for name, plot in PLOTS.items():
        if name in results:
            path = Path(out_dir) / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            plot(results, path)
            written[name] = path
    return written
