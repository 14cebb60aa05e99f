"""The train stage's seed workers, forked from a fork server that has done their imports once.

A seed worker (``pipelines.train_worker``) started as a fresh interpreter spends about 3 s of CPU before it trains:
torch (1.3-1.6 s), ``torch._dynamo`` (1.0-1.3 s; ``torch.optim`` imports it on the first optimizer) and the
package. Three seeds on two cores paid that three times per training stage, 18 times per demo. Here a
multiprocessing fork server imports them once per stage (``python -m pipelines.train`` starts it before its own
imports, so the two overlap) and every seed is a fork of it: docs/benchmarks.md, "Seeds forked from a fork server".

:class:`ForkedWorker` has the interface of ``subprocess.Popen`` that the stage uses (``stdout``, ``poll``, ``wait``,
``terminate``, ``kill``), so it streams and stops a forked seed as it did a subprocess; ``torchrun`` (DDP) keeps
its own processes. This module imports only the standard library, the package roots and :mod:`seqvision.forkserver`
(all torch-free): the stage imports it before torch.
"""

from __future__ import annotations

import gc
import io
import os
import subprocess
import sys
from multiprocessing.context import ForkServerContext
from typing import Any, BinaryIO

from pipelines import CODE_ROOT
from seqvision import forkserver

# What the fork server imports for its children: the worker module (torch, seqvision) and what torch.optim loads
# lazily on the first optimizer.
PRELOAD = ["pipelines.train_worker", "torch._dynamo"]


def start() -> ForkServerContext:
    """The fork-server context, its server started (at most once per process) with :data:`PRELOAD` imported and
    ended when this process exits (:mod:`seqvision.forkserver`). Returns at once: the server imports in the
    background, and the first fork waits for it."""
    if str(CODE_ROOT) not in sys.path:  # the server and its children import `pipelines` from this checkout
        sys.path.insert(0, str(CODE_ROOT))
    return forkserver.start(PRELOAD)


class ForkedWorker:
    """``pipelines.train_worker.main(argv)`` in a process forked from the seed server, with environment ``env``,
    its stdout and stderr merged into :attr:`stdout` (bytes), like ``Popen(..., stdout=PIPE, stderr=STDOUT)``."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        from seqvision.runtime import main_not_rerun

        ctx = start()
        receive, send = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=_run, args=(list(argv), dict(env), send), name="seed-worker")
        with main_not_rerun(_run):  # the stage's main module (Prefect) is not imported again in the child
            self._process.start()
        send.close()  # the child holds the write end: end of file when it exits
        self.stdout: BinaryIO = os.fdopen(os.dup(receive.fileno()), "rb")
        receive.close()
        self.pid = self._process.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(f"seed worker {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def terminate(self) -> None:
        self._process.terminate()

    def kill(self) -> None:
        self._process.kill()

    def __enter__(self) -> ForkedWorker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stdout.close()
        self.wait()


def _run(argv: list[str], env: dict[str, str], out: Any) -> None:
    """The forked child: this seed's environment, its output into ``out``'s pipe, then the worker's ``main``."""
    os.environ.clear()
    os.environ.update(env)  # e.g. CUDA_VISIBLE_DEVICES, read when CUDA first initialises (not in the server)
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    out.close()
    # Line by line, as PYTHONUNBUFFERED does for a fresh interpreter: the stage streams each line as it comes.
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="replace",
                                  line_buffering=True, write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="replace",
                                  line_buffering=True, write_through=True)
    # The objects inherited from the server (all of torch) never become garbage here: without freezing them every
    # collection walks them (0.3 s each, measured for the study's cells: seqvision.study.measure).
    gc.freeze()
    from pipelines.train_worker import main

    sys.exit(main(argv))
