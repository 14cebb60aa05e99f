"""Shared test fixtures. Tests are tiny, synthetic, CPU-only; each writes only under its own tmp_path."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

# Offline, quiet tools; set before anything imports prefect or mlflow.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# The Prefect servers of the tests (prefect_test_harness, the end-to-end module's, scripts/with-prefect-server) run
# without the background services no test uses (schedules, late runs, automations, storing events, ...): each polls
# the server's database every few seconds, and together they took a third of a server's CPU time. Task runs are
# still recorded.
for _service in ("CANCELLATION_CLEANUP", "CLEANUP_RECONCILER", "EVENT_PERSISTER", "FOREMAN", "LATE_RUNS",
                 "PAUSE_EXPIRATIONS", "REPOSSESSOR", "SCHEDULER", "TRIGGERS"):
    os.environ.setdefault(f"PREFECT_SERVER_SERVICES_{_service}_ENABLED", "false")

import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server per test session (per xdist worker); flow tests request it. Flows called
    directly run without heartbeats, as the stages run them (pipelines.common.without_default_heartbeats)."""
    from prefect.testing.utilities import prefect_test_harness

    from pipelines.common import without_default_heartbeats

    # 120 s, not Prefect's 30: on a loaded 2-core machine (CI, or several test workers) the server can take longer.
    with prefect_test_harness(server_startup_timeout=120), without_default_heartbeats():
        yield


# --------------------------------------------------------------------------------------------------------
# The tiny artifacts (tests/tiny.py), built once per session (per xdist worker). Tests must not modify them.

from tests.tiny import TinyArtifacts, train_tiny, write_tiny_artifacts  # noqa: E402


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory) -> TinyArtifacts:
    """The tiny artifacts, written once per session (per xdist worker); tests must not modify them."""
    return write_tiny_artifacts(tmp_path_factory.mktemp("tiny-artifacts"))


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_artifacts, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """``{(task, family): best.pt}`` trained for two epochs on the tiny artifacts, for the families the evaluation
    and report tests read; tests must not modify them."""
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return {(task, family): train_tiny(tiny_artifacts, task, family, root / task / family)
            for task in ("activity", "image_captioning", "video_captioning")
            for family in ("gru", "transformer", "meanpool")}


# --------------------------------------------------------------------------------------------------------
# MLflow stores


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store with its tables created, once per session (per xdist worker). Creating them
    runs MLflow's alembic migrations, about 3 s on a loaded 2-core machine; copying the file takes milliseconds.
    Created from its own folder, so the default experiment's artifact location points there, not at the checkout.
    Copy it (:func:`mlflow_store`), never write it."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow-template")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


@pytest.fixture(scope="session")
def mlflow_store(mlflow_template) -> Callable[[Path], str]:
    """``mlflow_store(path)`` puts an empty MLflow store with its tables created at ``path`` (a copy of
    :func:`mlflow_template`) and returns its absolute sqlite URI, as a fresh store would be after its first use."""

    def make(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mlflow_template, path)
        return f"sqlite:///{path}"

    return make
