"""benchmarks/pipeline.py: attributing a repro's wall time to work and orchestration from fabricated process and
Prefect records, and the params edit (the benchmark itself runs the whole pipeline)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
T0 = 1000.0


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_pipeline", REPO / "benchmarks" / "pipeline.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _task(bench: ModuleType, name: str, start: float, end: float, *, flow: str = "f1", tags: tuple[str, ...] = (),
          last_line: float | None = None) -> object:
    return bench.TaskRunRecord(id=name, name=name, flow_run_id=flow, started_at=T0 + start, ended_at=T0 + end,
                               tags=tags, last_line_at=None if last_line is None else T0 + last_line)


def _proc(bench: ModuleType, pid: int, ppid: int, module: str, start: float, end: float) -> object:
    return bench.Proc(pid=pid, ppid=ppid, argv=("python", "-m", module), started_at=T0 + start, ended_at=T0 + end)


def test_union_counts_overlapping_intervals_once(bench: ModuleType) -> None:
    assert bench.merge([(5.0, 7.0), (0.0, 2.0), (1.0, 3.0), (4.0, 4.0)]) == [(0.0, 3.0), (5.0, 7.0)]
    assert bench.union_s([(0.0, 2.0), (1.0, 3.0), (5.0, 7.0)]) == 5.0
    assert bench.union_s([]) == 0.0


def test_a_train_stage_with_parallel_seeds_counts_their_overlap_once(bench: ModuleType) -> None:
    """Two seeds training at once for ~22 s are 22 s of work, not 44; the MLflow task is not work; a seed task
    is work from its worker's start plus its start-up to the worker's last output line."""
    procs = [
        _proc(bench, 10, 1, "pipelines.extract", 2.0, 9.0),  # no flow run of its own: all start-up
        _proc(bench, 20, 1, "pipelines.train", 10.0, 50.0),
        _proc(bench, 21, 20, "pipelines.train_worker", 16.1, 39.9),
        _proc(bench, 22, 20, "pipelines.train_worker", 16.2, 40.9),
    ]
    records = bench.PrefectRecords(
        flows=[bench.FlowRunRecord("f1", "train", T0 + 15.0, T0 + 45.0)],
        tasks=[
            _task(bench, "open_run", 16.0, 19.0, tags=("orchestration",)),
            _task(bench, "seed-0", 16.0, 40.0, last_line=39.5),
            _task(bench, "seed-1", 16.0, 41.0, last_line=40.5),
            _task(bench, "aggregate", 41.0, 42.0),
            _task(bench, "log_run", 42.0, 44.0, tags=("orchestration",)),
            _task(bench, "elsewhere", 46.0, 47.0, flow="another"),  # not a flow run of this process
        ],
        unfinished=0,
    )
    streamed = bench.Streamed(returncode=0, started_at=T0, ended_at=T0 + 54.0, server_ready_at=T0 + 1.0,
                              last_line_at=T0 + 53.0,
                              stage_lines=[("check_params", T0 + 1.9), ("train@activity-gru", T0 + 9.9)])
    run = bench.analyse(streamed, procs, records, startup_s={"pipelines.train_worker": 2.0}, command="dvc repro -f",
                        log=Path("log"))

    check, train = run.stages
    assert (check.stage, check.startup_s, check.flow_s, check.work_s, check.exit_s) == ("check_params", 7.0, 0, 0, 0)
    assert check.between_s == pytest.approx(1.0)
    assert train.stage == "train@activity-gru" and train.kind == "train" and train.workers == 2
    # seed-0 works over [18.1, 39.5], seed-1 over [18.2, 40.5]: their union is [18.1, 40.5]; aggregate adds 1 s.
    assert train.work_s == pytest.approx(22.4 + 1.0)
    summed = (39.5 - 18.1) + (40.5 - 18.2) + 1.0
    assert train.work_s < summed - 20  # a sum would count the parallel seeds twice
    assert (train.startup_s, train.flow_s, train.exit_s, train.between_s) == pytest.approx((5.0, 30.0, 5.0, 3.0))
    assert train.worker_tail_s == pytest.approx(0.5 + 0.5)
    assert run.work_s == pytest.approx(23.4)
    parts = run.server_start_s + run.dvc_start_s + run.server_stop_s + sum(s.total_s for s in run.stages)
    assert parts == pytest.approx(run.wall_s) and run.wall_s == 54.0
    assert run.share == pytest.approx((54.0 - 23.4) / 54.0)
    assert run.missing == []

    markdown = bench.full_markdown(run)
    assert "| train | 1 | 23.4 | 5.0 (5.00) | 6.6 (6.60) | 5.0 (5.00) | 3.0 (3.00) | 43.0 | 46% |" in markdown
    assert "2 worker processes" in markdown


def test_a_seed_waiting_for_a_slot_gets_the_worker_that_starts_when_one_frees(bench: ModuleType) -> None:
    """Three seeds on two slots: all three tasks start at once, the third one's worker only when the first ends."""
    tasks = [_task(bench, f"seed-{k}", 0.0, end) for k, end in enumerate((10.0, 11.0, 20.0))]
    workers = [_proc(bench, 1, 0, "w", 0.1, 9.9), _proc(bench, 2, 0, "w", 0.2, 10.9), _proc(bench, 3, 0, "w", 10.0, 19.9)]
    matched = bench.worker_of(tasks, workers)
    assert {task: proc.pid for task, proc in matched.items()} == {"seed-0": 1, "seed-1": 2, "seed-2": 3}
    # The third seed's wait for a slot is not work; without the match it would be.
    with_wait = bench.work_interval(tasks[2], None, 0.0)
    assert bench.work_interval(tasks[2], matched["seed-2"], 1.0) == (T0 + 11.0, T0 + 20.0)
    assert with_wait == (T0, T0 + 20.0)


def test_bump_integer_changes_that_one_value_and_no_other_byte(bench: ModuleType) -> None:
    text = (REPO / "params.yaml").read_text()
    bumped, old, new = bench.bump_integer(text, ["models", "gru", "hidden_size"])
    assert new == old + 1
    changed = [(a, b) for a, b in zip(text.splitlines(), bumped.splitlines(), strict=True) if a != b]
    assert changed == [(f"    hidden_size: {old}", f"    hidden_size: {new}")]
    was, now = yaml.safe_load(text), yaml.safe_load(bumped)
    now["models"]["gru"]["hidden_size"] -= 1
    assert now == was  # rnn, lstm, ... keep their hidden_size
    with pytest.raises(KeyError):
        bench.bump_integer(text, ["models", "gru", "no_such_knob"])


def test_expected_reruns_are_the_params_check_the_models_trainings_and_the_report(bench: ModuleType) -> None:
    stages = ["check_params", "extract", "train@activity-gru", "train@activity-rnn", "train@video_captioning-gru",
              "baselines", "report"]
    assert bench.expected_reruns(stages, "gru") == ["check_params", "report", "train@activity-gru",
                                                    "train@video_captioning-gru"]
    # The study rows that train every family (they read the whole models section) rerun too, and so their report.
    study = [*stages, "study_timing", "study_trained@inductive_bias", "study_long_range", "study_report"]
    assert bench.expected_reruns(study, "gru", ["study_long_range", "study_trained@inductive_bias"]) == [
        "check_params", "report", "study_long_range", "study_report", "study_trained@inductive_bias",
        "train@activity-gru", "train@video_captioning-gru"]


def test_a_short_stage_is_named_by_its_module_not_by_the_next_stages_line(bench: ModuleType) -> None:
    def proc(pid: int, module: str, start: float) -> object:
        return bench.Proc(pid, 1, ("python", "-m", module), T0 + start, T0 + start + 0.2)

    procs = [proc(10, "pipelines.code_deps", 0.5), proc(11, "pipelines.check_params", 1.5),
             proc(12, "pipelines.extract", 2.3)]
    # check_params ends 0.2 s after its start and DVC runs the next stage 0.5 s later, within the reader's slack.
    lines = [("code", T0 + 0.4), ("check_params", T0 + 1.4), ("extract", T0 + 2.2)]
    modules = {"code": "pipelines.code_deps", "check_params": "pipelines.check_params", "extract": "pipelines.extract"}
    assert bench.name_processes(procs, lines, modules=modules) == ["code", "check_params", "extract"]
    assert bench.name_processes(procs, lines)[1] == "extract"  # what the time alone said
