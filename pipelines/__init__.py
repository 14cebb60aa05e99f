"""Prefect flows: thin wrappers over seqvision, one per pipeline stage."""

import seqvision  # noqa: F401 - first, so that its CPU kernel pins apply before any stage imports torch
