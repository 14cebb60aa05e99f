"""Prefect flows: thin wrappers over seqvision, one per pipeline stage."""

import seqvision  # noqa: F401 - first, so that its CPU kernel pins apply before any stage imports torch

from pathlib import Path

# The folder holding this package: the processes a stage starts (seed workers, their fork server, the comparison's
# stages) import `pipelines` from there whatever their PYTHONPATH.
CODE_ROOT = Path(__file__).resolve().parent.parent
