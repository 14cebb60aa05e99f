"""The study's measurements as cell workers (each runs in a fresh process) and the loop that interleaves them.

- :func:`step_cell`   one training step of an activity model at sequence length N: forward + backward (and the
  optimizer step with ``optimizer=True``); wall time and peak memory.
- :func:`stream_cell` one decoding step of a video captioner after N earlier tokens: the recurrent families carry
  an O(1) state, the Transformer a KV cache of N positions; wall time and state bytes.
- :func:`run_cells`   runs every spec ``rounds`` times, each round in a new shuffled order and every run in a
  fresh process, so slow drifts of a shared machine spread over all cells instead of biasing some.

The variants and their sizes are :mod:`seqvision.study.variants` (torch-free).
"""

from __future__ import annotations

import dataclasses
import random
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from seqvision import models
from seqvision.blocks import ModelDims
from seqvision.vocab import BOS_ID as BOS
from seqvision.study.measure import Cell, CellError, peak_memory, run_isolated, tensor_bytes, time_call
from seqvision.study.variants import VARIANTS, ModelSizes, family_of


def build_variant(task: str, variant: str, sizes: ModelSizes) -> nn.Module:
    """A fresh model of ``variant`` for ``task``, through ``models.build_model`` where the family is registered."""
    family, extra = VARIANTS[variant][0], VARIANTS[variant][1]
    s = sizes
    if family == "transformer":
        knobs: dict[str, Any] = {"hidden_size": s.hidden_size, "num_layers": s.num_layers, "num_heads": s.num_heads,
                                 "ffn_mult": s.ffn_mult, "dropout": s.dropout, **extra}
    else:
        knobs = {"hidden_size": s.hidden_size, "num_layers": s.num_layers, "embed_size": s.embed_size,
                 "dropout": s.dropout, "attention": True, **extra}
    if family == "meanpool":
        knobs.pop("attention")
    dims = ModelDims(feature_dim=s.feature_dim, vocab_size=s.vocab_size, num_classes=s.num_classes)
    return models.build_model(task, family, knobs, dims=dims)


# --------------------------------------------------------------------------------------------------------
# Workers (module-level functions: they are pickled by name into the fresh process)


@dataclass(frozen=True)
class StepSpec:
    variant: str
    n: int  # frames per clip
    batch_size: int = 1
    threads: int = 1
    device: str = "cpu"
    precision: str = "float32"  # "float32" | "bfloat16" (autocast)
    optimizer: bool = False  # False: forward + backward; True: + AdamW step (a whole training step)
    iterations: int = 1  # timed steps in the process; their median is the repeat's value
    sizes: ModelSizes = ModelSizes()
    seed: int = 0


def step_cell(spec: StepSpec) -> dict[str, Any]:
    """One fresh process: build, warm up at a tiny N, then one step at N under :func:`peak_memory`, then timed steps.

    Returns ``time_s`` (median of the timed steps), ``times_s``, ``cold_time_s`` (the measured first step),
    ``peak_bytes`` (peak above the model, its gradients, optimizer state and the input batch), ``memory_method``,
    ``parameters``.
    """
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    device = torch.device(spec.device)
    model = build_variant("activity", spec.variant, spec.sizes).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if spec.optimizer else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.precision == "bfloat16")

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        visual = torch.randn(spec.batch_size, n, spec.sizes.feature_dim, device=device)  # (B, N, D)
        lengths = torch.full((spec.batch_size,), n, device=device)
        labels = torch.randint(0, spec.sizes.num_classes, (spec.batch_size,), device=device)
        return visual, lengths, labels

    def step(inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        with autocast:
            _, loss = model(*inputs)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=False)  # gradients stay allocated: the measured peak is what grows with N

    step(batch(min(spec.n, 8)))  # lazy initialisation (thread pools, kernels, gradients, optimizer state)
    inputs = batch(spec.n)
    with peak_memory(device) as probe:
        cold = time_call(lambda: step(inputs), device=device)
    times = [time_call(lambda: step(inputs), device=device) for _ in range(spec.iterations)]
    return {
        "time_s": statistics.median(times), "times_s": times, "cold_time_s": cold, "peak_bytes": probe.peak_bytes,
        "memory_method": probe.method, "parameters": models.count_parameters(model),
    }


@dataclass(frozen=True)
class StreamSpec:
    variant: str
    n: int  # tokens decoded before the measured step
    batch_size: int = 1
    threads: int = 1
    device: str = "cpu"
    steps: int = 20  # timed steps, each from the same state at position n
    memory_frames: int = 16  # the clip the decoder attends over (fixed, so only n varies)
    sizes: ModelSizes = ModelSizes()
    seed: int = 0


def stream_cell(spec: StreamSpec) -> dict[str, Any]:
    """Time one ``step`` of a video captioner at position n and measure the decoding state it returns.

    The recurrent families' state does not depend on n. The Transformer's KV cache is filled with n random
    positions (the values do not change the cost); each step attends over them and appends one position.
    Returns ``time_s`` (median step), ``times_s``, ``state_bytes`` (after the step), ``parameters``.
    """
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    device = torch.device(spec.device)
    model = build_variant("video_captioning", spec.variant, spec.sizes).to(device).eval()
    visual = torch.randn(spec.batch_size, spec.memory_frames, spec.sizes.feature_dim, device=device)
    lengths = torch.full((spec.batch_size,), spec.memory_frames, device=device)
    with torch.inference_mode():
        memory = model.encode(visual, lengths)
        state = model.init_state(memory)
        if family_of(spec.variant) == "transformer":  # (B, heads, n, d/heads) per layer, keys and values
            state = tuple(torch.randn(*s.shape[:2], spec.n, s.shape[3], device=device) for s in state)
        prev = torch.full((spec.batch_size,), BOS, device=device)
        for _ in range(2):  # warm-up
            model.step(prev, state, memory)
        times = [time_call(lambda: model.step(prev, state, memory), device=device) for _ in range(spec.steps)]
        _, new_state = model.step(prev, state, memory)
    return {"time_s": statistics.median(times), "times_s": times, "state_bytes": tensor_bytes(new_state),
            "parameters": models.count_parameters(model)}


# --------------------------------------------------------------------------------------------------------
# Interleaved repeats


def run_cells(
    specs: Sequence[tuple[str, Mapping[str, Any], Any]],
    worker: Callable[[Any], Mapping[str, Any]],
    *,
    row: str,
    rounds: int,
    metrics: Iterable[str],
    timeout_s: float = 600.0,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[Cell]:
    """Run ``worker(spec)`` for every ``(variant, key, spec)`` once per round, each in a fresh process.

    Rounds shuffle the order (seeded). A repeat that fails is recorded in the cell's ``errors``; once a spec
    has failed it is not retried in later rounds (a cell that ran out of memory or time will again).
    Returns one :class:`Cell` per spec, metrics holding one value per successful repeat.
    """
    metrics = tuple(metrics)
    values: list[dict[str, list[float]]] = [{m: [] for m in metrics} for _ in specs]
    settings: list[dict[str, Any]] = [{} for _ in specs]
    errors: list[list[str]] = [[] for _ in specs]
    for r in range(rounds):
        order = list(range(len(specs)))
        random.Random(seed + r).shuffle(order)
        for i in order:
            if errors[i]:
                continue
            variant, key, spec = specs[i]
            try:
                result = run_isolated(worker, spec, timeout_s=timeout_s)
            except CellError as err:
                errors[i].append(f"round {r}: {str(err).splitlines()[0]}")
                if log:
                    log(f"{row}/{variant} {dict(key)}: FAILED {str(err).splitlines()[0]}")
                continue
            for m in metrics:
                values[i][m].append(float(result[m]))
            if not settings[i]:
                settings[i] = {**_plain(spec), **{k: v for k, v in result.items() if k not in metrics
                                                  and not isinstance(v, list)}}
            if log:
                log(f"{row}/{variant} {dict(key)} round {r + 1}/{rounds}: "
                    + ", ".join(f"{m}={result[m]:.4g}" for m in metrics))
    return [Cell(row=row, variant=v, key=dict(k), metrics=values[i], settings=settings[i] or _plain(s),
                 errors=errors[i]) for i, (v, k, s) in enumerate(specs)]


def _plain(spec: Any) -> dict[str, Any]:
    return dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else dict(spec)
