"""Shared test fixtures. Tests are tiny, synthetic, CPU-only; each writes only under its own tmp_path."""

from __future__ import annotations

import os

# Offline, quiet tools; set before anything imports prefect or mlflow.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server per test session (per xdist worker); flow tests request it."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield
