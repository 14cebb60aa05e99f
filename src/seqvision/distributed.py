"""Rank helpers and the few collectives the DDP training loop needs.

Without an initialised ``torch.distributed`` process group every helper answers as the only process
(rank 0 of 1) and every collective is the identity, so single-process training needs no special casing.
Under ``torchrun`` the seed worker (``python -m pipelines.train_worker``) opens the group with
:func:`process_group` before calling :func:`seqvision.experiment.run`; ``docs/ddp.md`` describes the whole
path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_initialized() -> bool:
    """True when a ``torch.distributed`` process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank; 0 without a process group."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes in the group; 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def is_rank0() -> bool:
    """True on the process that owns side effects (files, MLflow)."""
    return rank() == 0


# --------------------------------------------------------------------------------------------------------
# Collectives (identity without a process group)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks, in place, and return it. The tensor must live on the backend's device
    (CUDA for NCCL, CPU for gloo)."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_floats(values: Sequence[float], *, device: torch.device) -> list[float]:
    """Rank 0's ``values`` on every rank (float64, so a Python float arrives bit for bit).

    Used for numbers only rank 0 computes (validation), so that every rank takes the same decisions.
    """
    if not is_initialized():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def barrier() -> None:
    """Wait until every rank gets here (nothing without a process group)."""
    if is_initialized():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank. Also a synchronisation point: no rank returns before
    rank 0 has called it."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------------------------------------
# Process group


@contextlib.contextmanager
def process_group(*, device_type: str) -> Iterator[torch.device]:
    """Open the default process group from ``torchrun``'s environment and close it on exit.

    ``device_type`` ``"cuda"``: NCCL, and this process drives GPU ``$LOCAL_RANK`` (made the current device,
    so ``"cuda"`` means that GPU everywhere below); ``"cpu"``: gloo. ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` come from the environment (``init_method="env://"``), as torchrun
    sets them. Yields this process's device.
    """
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    if is_initialized():
        raise RuntimeError("a torch.distributed process group is already initialised")
    missing = [key for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
    if missing:
        raise RuntimeError(f"not launched by torchrun: {', '.join(missing)} unset (see docs/ddp.md)")
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        # device_id binds the NCCL communicator to this GPU at once (instead of guessing at the first
        # collective), which also keeps barrier()/broadcast_object_list off GPU 0.
        dist.init_process_group("nccl", init_method="env://", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", init_method="env://")
    try:
        yield device
    finally:
        dist.destroy_process_group()
