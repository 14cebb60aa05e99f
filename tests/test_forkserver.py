"""seqvision.forkserver: the fork server a stage forks its workers from ends with the stage."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_STAGE = """
import os, sys, time
from seqvision import forkserver

if __name__ == "__main__":
    ctx = forkserver.start(["slow_teardown"])
    if sys.argv[1:] == ["--leave-it"]:  # what happened before: the server left to exit by itself
        forkserver._STOP.cancel()
    worker = ctx.Process(target=os.getpid)
    worker.start()
    worker.join()
    print(time.monotonic(), flush=True)
"""


def _exit_seconds(tmp_path: Path, *args: str) -> float:
    """How long the stage process took to end after its last line."""
    (tmp_path / "slow_teardown.py").write_text("import atexit, time\natexit.register(time.sleep, 3)\n")
    (tmp_path / "stage.py").write_text(_STAGE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO / "src")])}
    done = subprocess.run([sys.executable, str(tmp_path / "stage.py"), *args], env=env, capture_output=True,
                          text=True, timeout=120)
    ended = time.monotonic()
    assert done.returncode == 0, done.stderr
    return ended - float(done.stdout.split()[-1])


def test_the_stage_does_not_wait_for_its_fork_server_to_tear_down(tmp_path):
    # A fork server with torch preloaded tore it down after the stage's last line, and the stage waited: 1.2 s
    # against 0.5 s per study row process (measured). Here the server's teardown takes 3 s.
    assert _exit_seconds(tmp_path, "--leave-it") > 2.8  # the check can see the wait
    assert _exit_seconds(tmp_path) < 1.5


_CHILD = """
import sys, time
from seqvision import forkserver

def work(path):
    time.sleep(1.0)
    open(path, "w").close()

if __name__ == "__main__":
    forkserver.start([]).Process(target=work, args=(sys.argv[1],)).start()
"""


def test_the_stage_still_waits_for_its_children_at_exit(tmp_path):
    # multiprocessing joins a process's non-daemonic children at exit; the server is killed only after that (killed
    # first, it made the child look finished: the stage exited at once and left it running).
    (tmp_path / "stage.py").write_text(_CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO / "src")])}
    with (tmp_path / "stderr").open("wb") as err:  # not a pipe: run() would wait for the child to close it too
        done = subprocess.run([sys.executable, str(tmp_path / "stage.py"), str(tmp_path / "done")], env=env,
                              stdout=subprocess.DEVNULL, stderr=err, timeout=120)
    assert done.returncode == 0, (tmp_path / "stderr").read_text()
    assert (tmp_path / "done").exists(), "the stage exited before its child had finished"
