"""One training loop for every model: ``train_one_epoch``, ``evaluate_loss``, ``fit``.

The loop knows models only through the contract in ``docs/design.md``:

- activity: ``model(visual, lengths, labels=...) -> (logits (B, C), loss)``;
- captioning: ``model(visual, lengths, tokens=..., token_lengths=...) -> (logits (B, L-1, V), loss)``,
  teacher-forced on ``tokens[:, :-1]`` against ``tokens[:, 1:]``.

Batches are ``ClipBatch`` / ``CaptionBatch`` NamedTuples; a batch with a ``tokens`` field is a captioning
batch. One optional keyword argument reaches ``forward`` during training only: ``label_smoothing=`` when
``train.label_smoothing > 0`` (a model that lacks it is an error, so no model silently trains with a different
loss than the others). Truncated BPTT is an architecture knob of the recurrent families
(``models.<family>.tbptt_steps``), implemented by their frame encoders (``rnn.RecurrentEncoder``).

Scheduled sampling uses the two-pass scheme of Mihaylova & Martins (2019, "Scheduled Sampling for
Transformers", ACL SRW), which works for any teacher-forced model, recurrent or not: pass 1 runs teacher
forcing without gradients, its argmax predictions replace each gold input token with probability ``p``,
pass 2 trains on the mixed inputs against the gold targets. ``p`` ramps linearly from 0 to
``train.scheduled_sampling`` over training (a schedule in the spirit of Bengio et al. 2015).

``fit`` writes into ``out_dir``: ``last.pt`` after every epoch, ``best.pt`` when the validation metric
improves (both in the :mod:`seqvision.checkpoint` layout), ``history.json`` (all atomically, rank 0 only), and the
epochs' times, throughput and peak memory in ``runinfo.json`` (``io.write_runinfo``: kept out of the checkpoints
and history.json, so their bytes depend on the inputs only). ``resume=True`` continues from ``last.pt``,
restoring model, optimizer, scheduler, RNG and data-order state, so on CPU with ``deterministic`` an
interrupted-and-resumed run equals an uninterrupted one bit for bit.

Under DDP (a ``torch.distributed`` process group is up, see ``docs/ddp.md``) ``fit`` wraps the model in
``DistributedDataParallel`` and expects a train loader sharded by ``datasets.make_loader(..., shard=True)``.
Each step's loss is normalised by the *global* weight (target tokens or clips summed over ranks), so the
gradient is that of the single-process global batch, not a mean of per-rank means. Validation runs on rank
0 alone over the whole val set (the metric, e.g. CIDEr-D, is a corpus statistic that does not decompose
into per-shard parts) and its numbers are broadcast, so every rank takes the same best-epoch and
early-stopping decisions. Only rank 0 writes files and talks to the tracker.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from seqvision import checkpoint, distributed, io
from seqvision.blocks import caption_loss
from seqvision.config import ConfigError, TrainConfig, flatten, to_dict
from seqvision.runtime import configure_backends, resolve_device, seed_everything
from seqvision.tracking import NullTracker, TrackerLike, runtime_tags

# Knobs that may change between an interrupted run and its resumption: they do not change the maths.
_RESUMABLE_CHANGES = frozenset({"device", "compile", "num_workers", "log_every", "patience"})


class NonFiniteLossError(RuntimeError):
    """A loss or gradient norm became NaN/inf. Names where; ``fit`` adds the checkpoint that was kept."""

    def __init__(self, what: str, value: float, *, epoch: int, step: int | None = None,
                 steps_in_epoch: int | None = None, global_step: int | None = None) -> None:
        self.what, self.value, self.epoch = what, value, epoch
        self.step, self.steps_in_epoch, self.global_step = step, steps_in_epoch, global_step
        self.checkpoint: Path | None = None
        super().__init__(what)

    def __str__(self) -> str:
        where = f"epoch {self.epoch}"
        if self.step is not None:
            where += f", step {self.step}/{self.steps_in_epoch} (global step {self.global_step})"
        kept = (
            f"the last good checkpoint {self.checkpoint} was kept"
            if self.checkpoint is not None
            else "no checkpoint had been written yet"
        )
        return f"non-finite {self.what} ({self.value}) at {where}; training stopped, {kept}"


# --------------------------------------------------------------------------------------------------------
# Validation metrics


MetricFn = Callable[[nn.Module, DataLoader, torch.device], float]


class ValidationMetric(NamedTuple):
    """What picks ``best.pt`` and drives early stopping. ``fn=None`` means the validation loss.

    ``fn(model, val_loader, device) -> float`` runs with the model in eval mode under ``torch.no_grad``
    (e.g. greedy-decode CIDEr for captioners, supplied by the caller).
    """

    name: str
    fn: MetricFn | None
    higher_is_better: bool


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 accuracy of an activity model over ``loader`` (fraction in [0, 1])."""
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    for batch in loader:
        batch = to_device(batch, device)
        logits, _ = model(batch.visual, batch.lengths)  # (B, C)
        correct += (logits.argmax(dim=-1) == batch.labels).sum()
        total += len(batch.labels)
    return correct.item() / max(total, 1)


VAL_LOSS = ValidationMetric("loss", None, higher_is_better=False)
ACCURACY = ValidationMetric("accuracy", accuracy, higher_is_better=True)


# --------------------------------------------------------------------------------------------------------
# Device, seeds, determinism, data loading


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor field of a NamedTuple batch to ``device`` (asynchronously from pinned memory)."""
    moved = [x.to(device, non_blocking=True) if isinstance(x, Tensor) else x for x in batch]
    return type(batch)(*moved)


def _is_caption_batch(batch: Any) -> bool:
    return hasattr(batch, "tokens")


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    # bf16 has fp32's exponent range, so no GradScaler / loss scaling is needed (unlike fp16).
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule


def make_optimizer(model: nn.Module, config: TrainConfig, *, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW at peak learning rate ``lr``; weight decay on matrices (dim >= 2) only, not on biases and norm gains
    (as in nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warmup to 1, then cosine to
    ``min_lr_ratio``, reached exactly at the last step ``total_steps - 1``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, *, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR with :func:`warmup_cosine`; ``scheduler.step()`` after every optimizer step."""
    warmup_steps = round(config.warmup_fraction * total_steps)
    schedule = functools.partial(
        warmup_cosine, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=config.min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


# --------------------------------------------------------------------------------------------------------
# Losses


def scheduled_sampling_prob(step: int, *, total_steps: int, max_prob: float) -> float:
    """Probability of feeding the model's own prediction at 0-based ``step``: 0 -> ``max_prob``, linear."""
    if max_prob <= 0.0:
        return 0.0
    return max_prob * min(1.0, step / max(1, total_steps - 1))


def mix_tokens(
    tokens: Tensor, predicted: Tensor, token_lengths: Tensor, *, prob: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Replace gold decoder inputs by predictions with probability ``prob``.

    ``tokens`` (B, L) gold ``<bos> w1 .. wn <eos> <pad>..``; ``predicted`` (B, L-1) argmax of a teacher-forced
    pass, ``predicted[:, t-1]`` being the guess for ``tokens[:, t]``. Only real input positions after
    ``<bos>`` (1 .. token_lengths-2) can change; ``<bos>`` and padding stay gold. Returns (B, L) int64.
    """
    B, L = tokens.shape
    guesses = torch.cat([tokens[:, :1], predicted.to(tokens.dtype)], dim=1)  # (B, L), aligned with tokens
    positions = torch.arange(L, device=tokens.device).unsqueeze(0)  # (1, L)
    replaceable = (positions >= 1) & (positions < (token_lengths - 1).unsqueeze(1))  # (B, L)
    coin = torch.rand(B, L, device=tokens.device, generator=generator) < prob
    return torch.where(replaceable & coin, guesses, tokens)


def scheduled_sampling_loss(
    model: nn.Module, batch: Any, *, prob: float, model_kwargs: Mapping[str, Any] | None = None
) -> Tensor:
    """Two-pass scheduled sampling (Mihaylova & Martins 2019) for any teacher-forced captioner.

    Pass 1 (no gradient) predicts every next token under teacher forcing; :func:`mix_tokens` swaps gold
    inputs for those predictions with probability ``prob``; pass 2 runs on the mixed inputs and is scored
    against the *gold* targets (the model's own loss would score against the mixed ones, so it is
    recomputed here with :func:`seqvision.blocks.caption_loss`). With ``prob=0`` this equals teacher forcing.
    """
    kwargs = dict(model_kwargs or {})
    with torch.no_grad():
        logits, _ = model(batch.visual, batch.lengths, tokens=batch.tokens, token_lengths=batch.token_lengths,
                          **kwargs)  # (B, L-1, V)
    mixed = mix_tokens(batch.tokens, logits.argmax(dim=-1), batch.token_lengths, prob=prob)  # (B, L)
    logits, _ = model(batch.visual, batch.lengths, tokens=mixed, token_lengths=batch.token_lengths, **kwargs)
    return caption_loss(logits, batch.tokens[:, 1:], label_smoothing=float(kwargs.get("label_smoothing", 0.0)))


def batch_loss(
    model: nn.Module, batch: Any, *, sampling_prob: float = 0.0, model_kwargs: Mapping[str, Any] | None = None
) -> tuple[Tensor, Tensor | int]:
    """``(mean loss, weight)`` of one batch already on the device; the weight (target tokens for
    captions, clips for activity) turns batch means into an exact epoch mean."""
    kwargs = dict(model_kwargs or {})
    if _is_caption_batch(batch):
        weight: Tensor | int = (batch.token_lengths - 1).sum()
        if sampling_prob > 0.0:
            return scheduled_sampling_loss(model, batch, prob=sampling_prob, model_kwargs=kwargs), weight
        _, loss = model(batch.visual, batch.lengths, tokens=batch.tokens, token_lengths=batch.token_lengths,
                        **kwargs)
    else:
        weight = len(batch.labels)
        _, loss = model(batch.visual, batch.lengths, labels=batch.labels, **kwargs)
    if loss is None:
        raise TypeError(f"{type(model).__name__}.forward returned no loss although targets were given")
    return loss, weight


def _accepts_kwarg(fn: Callable[..., Any], name: str) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def training_kwargs(model: nn.Module, config: TrainConfig) -> dict[str, Any]:
    """The optional forward() keywords for training (see the module docstring)."""
    kwargs: dict[str, Any] = {}
    if config.label_smoothing > 0.0:
        if not _accepts_kwarg(model.forward, "label_smoothing"):
            raise TypeError(
                f"train.label_smoothing={config.label_smoothing} but {type(model).__name__}.forward "
                "takes no label_smoothing argument"
            )
        kwargs["label_smoothing"] = config.label_smoothing
    return kwargs


# --------------------------------------------------------------------------------------------------------
# One epoch


class EpochStats(NamedTuple):
    loss: float  # weighted mean training loss
    steps: int
    samples: int
    seconds: float
    lr: float  # learning rate of the last step
    grad_norm: float  # mean global gradient norm before clipping
    sampling_prob: float  # scheduled-sampling probability at the last step


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    device: torch.device,
    config: TrainConfig,
    epoch: int = 1,
    global_step: int = 0,
    total_steps: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
    seed: int | None = None,
) -> EpochStats:
    """One pass over ``loader``: forward, backward, clip, step, schedule.

    ``global_step`` counts optimizer steps before this epoch (for the scheduled-sampling ramp and
    messages). Losses and gradient norms stay on the device and are checked every ``config.log_every``
    steps (one sync each); the first non-finite one raises :class:`NonFiniteLossError` naming its step.
    ``seed``: reseed torch once the loader's iterator exists (see :func:`epoch_seed`).

    With a process group (``model`` wrapped in DDP, ``loader`` sharded) each rank's loss is rescaled to the
    global weight of the step before ``backward``, and the returned loss and sample count are sums over
    ranks, so every rank returns the same :class:`EpochStats` numbers (times excepted).
    """
    sharded = distributed.is_initialized()
    world = distributed.world_size()
    model.train()
    steps_in_epoch = len(loader)
    total_steps = total_steps or steps_in_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    weight_sum = torch.zeros((), dtype=torch.float64, device=device)
    norm_sum = 0.0
    pending: list[tuple[int, Tensor, Tensor]] = []  # (step in epoch, loss, grad norm), not yet checked
    samples, prob, lr = 0, 0.0, optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    batches = iter(loader)
    if seed is not None:
        torch.manual_seed(seed)
    bar = tqdm(batches, total=steps_in_epoch, desc=f"epoch {epoch}", disable=not progress, leave=False,
               dynamic_ncols=True)
    for step, batch in enumerate(bar, start=1):
        samples += len(batch.lengths)
        batch = to_device(batch, device)
        prob = scheduled_sampling_prob(global_step + step - 1, total_steps=total_steps,
                                       max_prob=config.scheduled_sampling if _is_caption_batch(batch) else 0.0)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            loss, weight = batch_loss(model, batch, sampling_prob=prob, model_kwargs=model_kwargs)
        if sharded:
            # DDP averages the ranks' gradients, i.e. weighs each rank's *mean* loss equally; captioning ranks
            # hold different numbers of target tokens, so that would not be the global per-token mean. With
            # loss_r * (w_r * W / sum w) DDP's average is exactly grad(sum_r w_r * loss_r / sum w).
            local = weight.float() if isinstance(weight, Tensor) else torch.tensor(float(weight), device=device)
            total = distributed.all_reduce_sum(local.clone())
            (loss * (local * world / total)).backward()
        else:
            loss.backward()
        if config.clip_grad_norm > 0:
            grad_norm = nn.utils.clip_grad_norm_(params, config.clip_grad_norm, foreach=True)
        else:
            grad_norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        loss = loss.detach().float()
        loss_sum += loss * weight
        weight_sum += weight
        pending.append((step, loss, grad_norm.detach().float()))
        if step % config.log_every == 0 or step == steps_in_epoch:
            losses, norm_total = _check_finite(pending, epoch=epoch, steps_in_epoch=steps_in_epoch,
                                               global_step=global_step)
            norm_sum += norm_total
            pending.clear()
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}", lr=f"{lr:.2e}",
                            samples_s=f"{samples / (time.perf_counter() - start):.0f}")
    if sharded:  # one all-reduce per epoch: the epoch's loss over every rank's items
        samples_t = torch.tensor(float(samples), dtype=torch.float64, device=device)
        loss_sum, weight_sum, samples_t = distributed.all_reduce_sum(torch.stack([loss_sum, weight_sum, samples_t]))
        samples = round(samples_t.item())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return EpochStats(
        loss=(loss_sum / weight_sum.clamp_min(1)).item(), steps=steps_in_epoch, samples=samples,
        seconds=seconds, lr=lr, grad_norm=norm_sum / max(steps_in_epoch, 1), sampling_prob=prob,
    )


def _check_finite(
    pending: list[tuple[int, Tensor, Tensor]], *, epoch: int, steps_in_epoch: int, global_step: int
) -> tuple[list[float], float]:
    values = torch.stack([torch.stack((loss, norm)) for _, loss, norm in pending]).tolist()  # one sync
    for (step, _, _), (loss, norm) in zip(pending, values):
        for what, value in (("training loss", loss), ("gradient norm", norm)):
            if not math.isfinite(value):
                raise NonFiniteLossError(what, value, epoch=epoch, step=step, steps_in_epoch=steps_in_epoch,
                                         global_step=global_step + step)
    return [loss for loss, _ in values], sum(norm for _, norm in values)


@torch.no_grad()
def evaluate_loss(model: nn.Module, loader: DataLoader, *, device: torch.device) -> float:
    """Weighted mean loss over ``loader`` (per target token for captions, per clip for activity), in eval
    mode, teacher-forced, without label smoothing."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    weight_sum = torch.zeros((), dtype=torch.float64, device=device)
    for batch in loader:
        batch = to_device(batch, device)
        with _autocast(device):
            loss, weight = batch_loss(model, batch)
        loss_sum += loss.detach().float() * weight
        weight_sum += weight
    return (loss_sum / weight_sum.clamp_min(1)).item()


# --------------------------------------------------------------------------------------------------------
# Checkpoints


def _loader_generators(loader: DataLoader) -> list[torch.Generator]:
    """The distinct torch.Generators that decide a loader's order (loader, sampler, batch sampler)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    owners = (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None))
    found: list[torch.Generator] = []
    for owner in owners:
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


def _set_sampler_epoch(loader: DataLoader, epoch: int) -> None:
    # Epoch-keyed samplers (DistributedSampler, datasets.EpochSampler) shuffle from (seed, epoch); they
    # count epochs from 0, fit from 1.
    for owner in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(owner, "set_epoch"):
            owner.set_epoch(epoch - 1)


def epoch_seed(seed: int, epoch: int, *, rank: int = 0) -> int:
    """The torch seed for one training epoch, a function of ``(seed, epoch, rank)`` only.

    A DataLoader draws from the global torch RNG when it creates its iterator (worker base seed) unless
    it has its own generator, and a persistent worker pool does so only once, so a resumed run would
    otherwise shift every later dropout mask and scheduled-sampling coin. Reseeding per epoch after the
    iterator exists removes that dependence (fairseq reseeds per step for the same reason). DDP ranks get
    their own seeds: with one seed, row i of every rank's batch would share its dropout mask, which a
    single process drawing one mask per row never does. Rank 0's seed is the single-process one.
    """
    return (seed * 1_000_003 + epoch + rank * 2**40) % 2**63


def rng_state(loader: DataLoader | None = None) -> dict[str, Any]:
    """Every random state a resumed run needs, in types that ``torch.load(weights_only=True)`` accepts.

    Not Python's ``random``: training never draws from it, while other threads of the process do (Prefect's event
    client: websockets' keepalive calls ``random.getrandbits``), so its state is process noise that would make two
    runs of the same training save different checkpoint bytes."""
    np_state = np.random.get_state(legacy=False)
    return {
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": [g.get_state() for g in _loader_generators(loader)] if loader is not None else [],
    }


def set_rng_state(state: Mapping[str, Any], loader: DataLoader | None = None) -> None:
    """Inverse of :func:`rng_state` (a checkpoint written before it left Python's state out still has it)."""
    if "python" in state:
        random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": np_state["bit_generator"],
        "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
        "has_gauss": np_state["has_gauss"],
        "gauss": np_state["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader is not None:
        generators = _loader_generators(loader)
        if len(generators) != len(state["loader"]):
            raise ValueError(
                f"the train loader has {len(generators)} random generator(s), the checkpoint "
                f"{len(state['loader'])}; build it the same way as the interrupted run (see make_loader)"
            )
        for gen, gen_state in zip(generators, state["loader"]):
            gen.set_state(gen_state)


def _check_resumable(saved: Mapping[str, Any], config: TrainConfig, path: Path) -> None:
    current = to_dict(config)
    changed = sorted(k for k in current if k not in _RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        key = changed[0]
        raise ConfigError(
            f"cannot resume from {path}: train.{key} was {saved.get(key)!r}, now {current[key]!r} "
            f"(changed: {', '.join('train.' + k for k in changed)}); restore them or start a fresh run"
        )


# --------------------------------------------------------------------------------------------------------
# fit


@dataclass
class FitResult:
    history: list[dict[str, float]]  # per epoch, with the TIMING_KEYS measurements (absent when not recorded)
    metric: str  # name of the validation metric, e.g. "loss", "accuracy", "cider"
    best_metric: float | None
    best_epoch: int | None
    stopped_early: bool
    last_checkpoint: Path
    best_checkpoint: Path | None
    epochs_since_best: int = 0  # trailing epochs in which neither the val metric nor the val loss improved


# Measurements in a history entry: they differ on every run, so they go to runinfo.json (io.write_runinfo), never
# into the checkpoints or history.json, whose bytes must be a function of the inputs.
TIMING_KEYS = ("samples_per_s", "train_time_s", "epoch_time_s", "peak_memory_mb")


def _untimed(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]


def _timings(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{"epoch": h["epoch"], **{k: h[k] for k in TIMING_KEYS if k in h}} for h in history]


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return float("nan")
    # ru_maxrss: KiB on Linux, bytes on macOS; the process-lifetime peak (cannot be reset per epoch).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _validate(
    eval_model: nn.Module, raw: nn.Module, loader: DataLoader, *, metric: ValidationMetric, device: torch.device
) -> tuple[float, float]:
    """``(validation loss, metric value)`` of the current weights, computed on rank 0 and broadcast (the
    metric only when the loss is finite; NaN otherwise). Other ranks idle meanwhile: their weights equal
    rank 0's, and the same numbers everywhere keep best-epoch and early-stopping decisions identical."""
    val_loss = value = math.nan
    if distributed.is_rank0():
        val_loss = evaluate_loss(eval_model, loader, device=device)
        if metric.fn is None:
            value = val_loss
        elif math.isfinite(val_loss):
            raw.eval()
            with torch.no_grad(), _autocast(device):
                value = float(metric.fn(raw, loader, device))
    val_loss, value = distributed.broadcast_floats([val_loss, value], device=device)
    return val_loss, value


def _weights_finite(model: nn.Module) -> bool:
    flags = [torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    config: TrainConfig,
    lr: float,
    out_dir: str | Path,
    tracker: TrackerLike | None = None,
    metric: ValidationMetric = VAL_LOSS,
    spec: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> FitResult:
    """Train ``model`` for ``config.epochs`` epochs (fewer with early stopping) at peak learning rate ``lr`` and
    checkpoint it.

    Seed with :func:`seed_everything` before building ``model`` so its initial weights are reproducible;
    ``fit`` seeds again for data order and dropout. ``metric`` picks ``best.pt`` and drives ``patience``.
    ``tracker`` receives params, tags, one batch of metrics per epoch and ``history.json``.
    ``spec`` (``models.model_spec``) is stored in every checkpoint, so
    ``models.build_from_checkpoint(checkpoint.load(path))`` rebuilds the model; ``extra`` (e.g. the resume
    fingerprint) is stored beside it.
    ``resume=True`` continues from ``out_dir/last.pt`` (a fresh start when there is none; a finished or
    early-stopped run returns at once); knobs that change the maths must match the checkpoint's.
    ``progress=None`` shows a tqdm bar only when stderr is a terminal.
    Raises :class:`NonFiniteLossError` (without overwriting ``last.pt``) when a loss turns NaN/inf.
    """
    out_dir = Path(out_dir)
    last_path, best_path, history_path = out_dir / "last.pt", out_dir / "best.pt", out_dir / "history.json"
    tracker = tracker if tracker is not None else NullTracker()
    rank0, sharded = distributed.is_rank0(), distributed.is_initialized()
    if progress is None:
        progress = sys.stderr.isatty()
    progress = progress and rank0

    device = resolve_device(config.device)
    if sharded and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (distributed.process_group)
    configure_backends(device, deterministic=config.deterministic, compile_model=config.compile)
    seed_everything(config.seed)
    raw = model.module if isinstance(getattr(model, "module", None), nn.Module) else model
    raw.to(device)
    if sharded and not isinstance(model, DistributedDataParallel):
        # Broadcasts rank 0's weights now; all-reduces (averages) gradients during every backward.
        model = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)
    forward_model = torch.compile(model) if config.compile else model
    # Rank 0 validates alone, so not through DDP: its forward may broadcast buffers, a collective the other
    # ranks would never join.
    eval_model = raw if sharded else forward_model
    optimizer = make_optimizer(raw, config, lr=lr, device=device)
    total_steps = config.epochs * len(train_loader)
    scheduler = make_scheduler(optimizer, config, total_steps=total_steps)
    kwargs = training_kwargs(raw, config)

    epoch, step, since_best, stopped = 0, 0, 0, False
    best_metric: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, float]] = []
    if resume and last_path.is_file():
        ckpt = checkpoint.load(last_path)  # verified; CPU; load_state_dict copies onto the model's device
        _check_resumable(ckpt["train_config"], config, last_path)
        if ckpt.get("lr", lr) != lr:
            raise ConfigError(f"cannot resume from {last_path}: the learning rate was {ckpt['lr']}, now {lr}; "
                              "restore it or start a fresh run")
        if ckpt["metric"] != metric.name:
            raise ValueError(f"cannot resume from {last_path}: it tracked {ckpt['metric']!r}, not {metric.name!r}")
        raw.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"], train_loader)
        epoch, step, since_best = ckpt["epoch"], ckpt["step"], ckpt["epochs_since_best"]
        best_metric, best_epoch, stopped = ckpt["best_metric"], ckpt["best_epoch"], ckpt["stopped_early"]
        timed = {t["epoch"]: t for t in io.read_runinfo(out_dir).get("epochs", []) if isinstance(t, dict)}
        history = [{**h, **timed.get(h["epoch"], {})} for h in ckpt["history"]]
    best_loss = min((h["val_loss"] for h in history), default=None)

    if rank0:
        tracker.log_params({**flatten({"train": to_dict(config)}), "lr": lr})
        tracker.set_tags({**runtime_tags(device), "seqvision.metric": metric.name,
                          "seqvision.resumed_from_epoch": epoch, "seqvision.world_size": distributed.world_size()})

    while epoch < config.epochs and not stopped:
        epoch += 1
        _set_sampler_epoch(train_loader, epoch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        try:
            stats = train_one_epoch(
                forward_model, train_loader, optimizer, scheduler, device=device, config=config, epoch=epoch,
                global_step=step, total_steps=total_steps, model_kwargs=kwargs, progress=progress,
                seed=epoch_seed(config.seed, epoch, rank=distributed.rank()),
            )
            step += stats.steps
            val_loss, value = _validate(eval_model, raw, val_loader, metric=metric, device=device)
            if not math.isfinite(val_loss):
                raise NonFiniteLossError("validation loss", val_loss, epoch=epoch)
        except NonFiniteLossError as err:
            err.checkpoint = last_path if last_path.is_file() else None
            raise
        improved = best_metric is None or (value > best_metric if metric.higher_is_better else value < best_metric)
        if improved:
            best_metric, best_epoch = value, epoch
        # Patience counts epochs in which neither the metric nor the validation loss improved: a decoded metric
        # (CIDEr-D) can plateau for epochs while the loss still falls and the captions are about to improve
        # (measured in the learning-rate sweep, docs/tuning.md), so the metric alone stopped runs too early.
        loss_improved = best_loss is None or val_loss < best_loss
        if loss_improved:
            best_loss = val_loss
        since_best = 0 if improved or loss_improved else since_best + 1
        stopped = config.patience > 0 and since_best >= config.patience and epoch < config.epochs
        entry = {
            "epoch": epoch, "step": step, "train_loss": stats.loss, "val_loss": val_loss, "val_metric": value,
            "lr": stats.lr, "grad_norm": stats.grad_norm, "scheduled_sampling": stats.sampling_prob,
            "samples_per_s": stats.samples / max(stats.seconds, 1e-9), "train_time_s": stats.seconds,
            "epoch_time_s": time.perf_counter() - started, "peak_memory_mb": _peak_memory_mb(device),
        }
        history.append(entry)
        if not _weights_finite(raw):  # on every rank: their weights are equal, so all of them stop here
            err = NonFiniteLossError("model weights", float("nan"), epoch=epoch)
            err.checkpoint = last_path if last_path.is_file() else None
            raise err
        if not rank0:
            continue
        blob = checkpoint.to_bytes({
            **(extra or {}), "spec": dict(spec or {}), "model": raw.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "step": step, "best_metric": best_metric, "best_epoch": best_epoch,
            "epochs_since_best": since_best, "stopped_early": stopped, "metric": metric.name,
            "history": _untimed(history), "train_config": to_dict(config), "lr": lr, "rng": rng_state(train_loader),
            "torch_version": str(torch.__version__),
        })
        if improved:
            io.write_bytes(best_path, blob)
        io.write_bytes(last_path, blob)
        io.write_json(history_path, _untimed(history))
        io.write_runinfo(out_dir, epochs=_timings(history))
        logged = {k: v for k, v in entry.items() if k != "epoch"}
        if metric.fn is not None:
            logged[f"val_{metric.name}"] = value
        tracker.log_epoch(logged, step=epoch)

    if rank0:
        # Rewritten here too: a run resumed after it had already finished (DVC removes the non-persistent
        # outputs before rerunning a stage) trains no epoch but must still leave its history behind.
        io.write_json(history_path, _untimed(history))
        tracker.log_artifact(history_path)
    distributed.barrier()  # DDP: no rank returns before rank 0's files are written
    return FitResult(
        history=history, metric=metric.name, best_metric=best_metric, best_epoch=best_epoch,
        stopped_early=stopped, last_checkpoint=last_path,
        best_checkpoint=best_path if best_path.is_file() else None, epochs_since_best=since_best,
    )

