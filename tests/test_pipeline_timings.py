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


# --------------------------------------------------------------------------------------------------------
# benchmarks/pipeline.py: the arithmetic and the params edit (the benchmark itself runs the whole pipeline)


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_pipeline", REPO / "benchmarks" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_bump_integer_changes_that_one_value_and_no_other_byte() -> None:
    import yaml

    bench = _bench()
    text = (REPO / "params.yaml").read_text()
    bumped, old, new = bench.bump_integer(text, ["models", "gru", "hidden_size"])
    assert new == old + 1
    changed = [(a, b) for a, b in zip(text.splitlines(), bumped.splitlines(), strict=True) if a != b]
    assert changed == [(f"    hidden_size: {old}", f"    hidden_size: {new}")]
    was, now = yaml.safe_load(text), yaml.safe_load(bumped)
    assert now["models"]["gru"]["hidden_size"] == was["models"]["gru"]["hidden_size"] + 1
    now["models"]["gru"]["hidden_size"] -= 1
    assert now == was  # rnn, lstm, ... keep their hidden_size
    with pytest.raises(KeyError):
        bench.bump_integer(text, ["models", "gru", "no_such_knob"])


def test_the_wall_time_splits_into_its_parts_in_the_order_the_stages_ran(tmp_path: Path) -> None:
    bench = _bench()
    t0 = 1000.0
    # Two stage processes (listed out of order) and a torchrun-like child, which must not be counted.
    lines = [
        {"stage": "train@activity-gru", "kind": "train", "work_s": 3.0, "age_s": 5.0, "written_at": t0 + 19.0,
         "pid": 2, "owner_pid": None, "age_from": "proc", "argv": ["train.py"]},
        {"stage": "extract", "kind": "extract", "work_s": 1.0, "age_s": 4.0, "written_at": t0 + 12.0,
         "pid": 1, "owner_pid": None, "age_from": "proc", "argv": ["extract.py"]},
        {"stage": "train@activity-gru", "kind": "train", "work_s": 2.0, "age_s": 3.0, "written_at": t0 + 18.0,
         "pid": 3, "owner_pid": 2, "age_from": "proc", "argv": ["train_ddp.py"]},
    ]
    timings = tmp_path / "timings.jsonl"
    timings.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = bench.read_records(timings)
    assert sorted(r["pid"] for r in records) == [1, 2]
    streamed = bench.Streamed(returncode=0, started_at=t0, ended_at=t0 + 25.0, server_ready_at=t0 + 6.0,
                              last_line_at=t0 + 24.0,
                              stage_lines=[("extract", t0 + 7.9), ("train@activity-gru", t0 + 13.9),
                                           ("report", t0 + 21.0)])
    run = bench.analyse(streamed, records, {1: t0 + 12.5, 2: t0 + 20.0}, command="dvc repro -f",
                        log=tmp_path / "log", exit_observed=True)

    assert [s.stage for s in run.stages] == ["extract", "train@activity-gru"]
    extract, train = run.stages
    assert (extract.started_at, extract.exit_s, extract.between_s) == (t0 + 8.0, 0.5, 1.5)  # train starts at 14
    assert (train.started_at, train.exit_s, train.between_s) == (t0 + 14.0, 1.0, 4.0)  # DVC's last line at 24
    assert (run.server_start_s, run.dvc_start_s, run.server_stop_s) == (6.0, 2.0, 1.0)
    parts = run.server_start_s + run.dvc_start_s + run.server_stop_s + sum(
        s.age_s + s.exit_s + s.between_s for s in run.stages)
    assert parts == pytest.approx(run.wall_s) and run.wall_s == 25.0
    assert run.work_s == 4.0 and run.share == pytest.approx(21 / 25)
    assert run.missing == ["report"]
    markdown = bench.full_markdown(run)
    assert "| train | 1 | 3.0 | 2.0 (2.00) | 1.0 (1.00) | 4.0 (4.00) | 10.0 | 70% |" in markdown
    assert "No timing line from report" in markdown


def test_expected_reruns_are_the_models_train_and_evaluate_stages_and_the_report() -> None:
    bench = _bench()
    stages = ["extract", "train@activity-gru", "train@activity-rnn", "evaluate@video_captioning-gru",
              "evaluate@activity-lstm", "baselines", "report"]
    assert bench.expected_reruns(stages, "gru") == ["evaluate@video_captioning-gru", "report", "train@activity-gru"]
