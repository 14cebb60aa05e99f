"""pipelines.common: the retry policy of the stages' I/O tasks."""

from __future__ import annotations

import pytest
from prefect import flow, task

from pipelines.common import IO_RETRIES


def test_io_tasks_retry_on_os_errors_only(prefect_harness):
    calls = {"io": 0, "bug": 0}

    @task(**{**IO_RETRIES, "retry_delay_seconds": 0})
    def flaky_write() -> str:
        calls["io"] += 1
        if calls["io"] < 3:
            raise OSError("disk hiccup")
        return "written"

    @task(**{**IO_RETRIES, "retry_delay_seconds": 0})
    def buggy() -> None:
        calls["bug"] += 1
        raise ValueError("a bug: retrying cannot help")

    @flow
    def run() -> str:
        return flaky_write()

    @flow
    def run_bug() -> None:
        buggy()

    assert run() == "written" and calls["io"] == 3  # two retries, then success
    with pytest.raises(ValueError):
        run_bug()
    assert calls["bug"] == 1  # no retry for a non-I/O error
