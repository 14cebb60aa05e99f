"""pipelines.common's stage timings ($SEQVISION_TIMINGS), read by benchmarks/pipeline.py.

Each test runs the writer in a fresh interpreter: the record is written by an atexit handler, and whether
one is registered at all is decided when pipelines.common is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.test_extract_flow import tiny_dataset

REPO = Path(__file__).resolve().parents[1]

# Sleeps never end early, so every lower bound below is exact; the upper bounds leave ~0.5 s for a busy machine.
SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pipelines import common

    class Tracker:  # stands in for seqvision.tracking.Tracker
        run_id = "run-1"
        def log_epoch(self, metrics, *, step):
            time.sleep(0.6)

    time.sleep(0.2)  # orchestration before the work
    with common.stage_work("tokenize"):
        time.sleep(0.4)
        plain = Tracker()
        tracker = common.untimed(plain)
        assert tracker.run_id == "run-1"
        tracker.log_epoch({"loss": 1.0}, step=1)  # MLflow from inside the work: not work
        with common.stage_work("tokenize"):  # nested: counted once
            time.sleep(0.2)
    time.sleep(0.1)
    print(tracker is plain, os.environ.get(common.TIMINGS_OWNER_ENV))
""")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SEQVISION_TIMINGS", "SEQVISION_TIMINGS_OWNER",
                                                              "DVC_STAGE")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return {**env, **extra}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_record_has_the_work_blocks_without_tracker_calls_and_the_whole_process_age(tmp_path: Path) -> None:
    timings = tmp_path / "timings.jsonl"
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                            env=_env(SEQVISION_TIMINGS=str(timings), DVC_STAGE="tokenize"))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert out.split() == ["False", str(proc.pid)]  # a proxy while timing; this process owns the timings

    [record] = _records(timings)
    assert record["stage"] == "tokenize" and record["kind"] == "tokenize"
    assert record["pid"] == proc.pid and record["owner_pid"] is None
    # 0.4 + 0.2 s of work; the nested block is not counted twice, the 0.6 s tracker call not at all.
    assert 0.6 <= record["work_s"] < 1.1
    # The age covers the whole process: the interpreter start, 0.3 s outside the work and the tracker call.
    assert record["age_from"] == "proc"
    assert record["age_s"] >= record["work_s"] + 0.9
    assert started <= record["written_at"] - record["age_s"] + 0.05  # it started after we started it
    assert record["written_at"] <= time.time()


def test_nothing_is_written_or_wrapped_when_unset(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, check=False,
                          env=_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "None"]  # untimed() hands the object back, no owner is set
    assert list(tmp_path.iterdir()) == []


def test_children_are_marked_and_idle_helpers_write_nothing(tmp_path: Path) -> None:
    """A worker that does stage work (torchrun rank) names its owner; one that does none (a spawn-pool worker,
    which imports the stage module too) writes nothing; lines of concurrent writers stay whole."""
    timings = tmp_path / "timings.jsonl"
    child = ("import sys, time; from pipelines import common\n"
             "if sys.argv[1] == 'work':\n"
             "    with common.stage_work('train'): time.sleep(0.1)\n")
    parent = textwrap.dedent(f"""
        import subprocess, sys
        from pipelines import common
        with common.stage_work("train"):
            procs = [subprocess.Popen([sys.executable, "-c", {child!r}, kind])
                     for kind in ["work", "idle"] * 3]
            assert all(p.wait(timeout=60) == 0 for p in procs)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=tmp_path,
                            env=_env(SEQVISION_TIMINGS=str(timings)))
    assert proc.wait(timeout=60) == 0

    records = _records(timings)
    owners = [r for r in records if r["owner_pid"] is None]
    workers = [r for r in records if r["owner_pid"] is not None]
    assert [r["pid"] for r in owners] == [proc.pid]
    assert len(workers) == 3 and all(r["owner_pid"] == proc.pid and r["kind"] == "train" for r in workers)
    assert all(0.1 <= r["work_s"] <= r["age_s"] for r in workers)
    # The owner's work contains its workers' lives.
    assert owners[0]["work_s"] >= max(r["age_s"] for r in workers)


@pytest.mark.slow
@pytest.mark.integration
def test_a_real_stage_records_its_library_work(tmp_path: Path, prefect_harness) -> None:
    from prefect.settings import PREFECT_API_URL

    data = tiny_dataset(tmp_path / "data")
    params = tmp_path / "params.yaml"
    params.write_text("tokenize:\n  min_count: 1\n")
    timings = tmp_path / "timings.jsonl"
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in data.items()]
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.tokenize", "--params", str(params), "--out", str(tmp_path / "tokens"),
         *flags],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        env=_env(SEQVISION_TIMINGS=str(timings), PREFECT_API_URL=str(PREFECT_API_URL.value())),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "tokens" / "video" / "vocab.json").is_file()

    [record] = _records(timings)
    assert record["kind"] == "tokenize" and record["stage"] is None  # not started by DVC
    assert record["argv"][0].endswith("tokenize.py")
    # Some work was timed, and less than the process's life: imports and the flow run are not work.
    assert 0 < record["work_s"] < record["age_s"]
    assert record["age_s"] - record["work_s"] > 0.5
