"""A stage stops when the process that started it dies (a killed `dvc repro`), and stops the workers it started
(pipelines/common.py: follow_parent, run_main, CHILDREN). #13: no orphan keeps writing into a stage's outputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A stage: run_main with a worker (a long sleep) registered as the train stage registers its seed workers.
STAGE = textwrap.dedent("""
    import subprocess, sys, pathlib
    from pipelines import common
    common.PARENT_POLL_S = 0.1
    def work():
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        common.CHILDREN.add(worker)
        pathlib.Path(sys.argv[1]).write_text(str(worker.pid))
        worker.wait()
        return 0
    sys.exit(common.run_main("stage", work))
""")

# What dvc is to a stage: starts it, then waits; killed with SIGKILL below, so it cannot pass anything on.
PARENT = textwrap.dedent("""
    import subprocess, sys
    with open(sys.argv[3], "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=log, stderr=log)
    print(proc.pid, flush=True)
    proc.wait()
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its new parent) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
# SIGINT ignored: what a stage inherits from a background job of a non-interactive shell (`make test &` in a
# script); the lifeline must not depend on it.
@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_a_stage_whose_parent_is_killed_stops_and_stops_its_workers(tmp_path: Path, sigint: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    pid_file, log = tmp_path / "worker.pid", tmp_path / "stage.log"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, STAGE, str(pid_file), str(log)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, text=True,
                              preexec_fn=_ignore_sigint if sigint == "ignored" else None)
    assert parent.stdout is not None
    stage = int(parent.stdout.readline())
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "the stage never started its worker"
        time.sleep(0.1)
    worker = int(pid_file.read_text())

    parent.send_signal(signal.SIGKILL)  # dvc dies without a word to its children
    parent.wait()
    assert _wait_gone(stage, 30), "the stage outlived its parent"
    assert _wait_gone(worker, 30), "the stage's worker outlived the stage"
    assert "stage: interrupted" in log.read_text()


def test_sigterm_interrupts_a_stage_like_ctrl_c(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    pid_file = tmp_path / "worker.pid"
    stage = subprocess.Popen([sys.executable, "-c", STAGE, str(pid_file)], env=env, cwd=REPO,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    stage.terminate()
    _, err = stage.communicate(timeout=60)
    assert stage.returncode == 130 and "stage: interrupted" in err
    assert _wait_gone(worker, 30)
