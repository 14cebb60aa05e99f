"""Rank helpers: who writes checkpoints, history and MLflow records.

Without an initialised ``torch.distributed`` process group every helper answers as the only process
(rank 0 of 1), so single-process training needs no special casing. The DDP launcher comes later; it only
has to initialise the process group before calling :func:`seqvision.train.fit`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch.distributed as dist

P = ParamSpec("P")
R = TypeVar("R")


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


def rank0_only(fn: Callable[P, R]) -> Callable[P, R | None]:
    """Decorator: run ``fn`` on rank 0 only; other ranks skip it and get ``None``.

    No barrier is implied: callers that need the others to wait (e.g. before reading a checkpoint that
    rank 0 writes) must call ``torch.distributed.barrier()`` themselves.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        if is_rank0():
            return fn(*args, **kwargs)
        return None

    return wrapper
