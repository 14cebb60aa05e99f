"""The multiprocessing fork server a stage forks its workers from: started early, its imports done once, ended at exit.

A stage that runs its work in fresh processes (the train stage's seeds, the study's cells) would pay an
``import torch`` in every one of them. A fork server imports ``preload`` once and every worker is a fork of it. The
stage starts it first thing (before its own imports, so the two overlap on a second core) and kills it when the stage
exits: left alone it notices its parent is gone and tears down a whole torch interpreter, 1-2 s of CPU taken from
the next stage.

This module imports only the standard library, so a stage can start the server before it imports torch.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.util
import os
import signal
from multiprocessing.context import ForkServerContext

_STOP: multiprocessing.util.Finalize | None = None  # the kill at exit, registered once


def start(preload: list[str]) -> ForkServerContext:
    """The fork-server context, its server started (at most once per process) with ``preload`` imported.

    Returns at once: the server imports in the background, and the first fork waits for it. A process has one fork
    server: the first call's ``preload`` is the one it imports; later calls return the same server."""
    global _STOP
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(preload)
    multiprocessing.forkserver.ensure_running()
    if _STOP is None:
        # A negative priority: after multiprocessing's own exit handling has stopped the daemonic children and
        # joined the others (killed first, the server would make them look finished, and they would be left running).
        _STOP = multiprocessing.util.Finalize(None, _stop, exitpriority=-100)
    return ctx  # type: ignore[return-value]


def _stop() -> None:
    """At exit, after the children: end the fork server at once."""
    pid = getattr(getattr(multiprocessing.forkserver, "_forkserver", None), "_forkserver_pid", None)
    if pid:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
