"""The fork server the study's cells are forked from (``measure.run_isolated``): what it imports once, and its start.

Imported once in the server, so that a fresh cell process starts in milliseconds instead of the ~4 s an
``import torch`` takes, and the 4.6 s of the first ``torch.optim.AdamW(...)``, which imports torch._dynamo (measured
on the 2-core development machine). Torch-free: a row's stage starts the server before its own imports
(pipelines/study_row.py), so the two import side by side.
"""

from __future__ import annotations

from multiprocessing.context import ForkServerContext

from seqvision import forkserver

PRELOAD = ["torch", "torch._dynamo", "seqvision.models", "seqvision.mingru", "seqvision.study.cells"]


def start() -> ForkServerContext:
    """The cells' fork-server context, its server started (once per process) and ended when this process exits."""
    return forkserver.start(PRELOAD)
