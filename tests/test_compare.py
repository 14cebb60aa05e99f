"""The compare flow: the whole comparison on the tiny synthetic preset (trainings in their own processes, one
crashing on purpose), the bound on concurrent trainings and their devices, the deployment path with a fake
``run_deployment``, and the CLI."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import yaml

from pipelines import compare
from seqvision.config import SYNTH_PRESETS, ConfigError, SynthConfig, from_mapping
from tests.test_report import Page
from tests.tiny import TINY_PIPELINE_PARAMS

# One xdist worker runs the whole module, so the comparison below runs once and its artifacts are shared.
pytestmark = pytest.mark.xdist_group("compare")

ENV_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "SEQVISION_PARENT_RUN_ID", "CUDA_VISIBLE_DEVICES")

TINY_PARAMS = TINY_PIPELINE_PARAMS  # train.seeds 1

# Test hooks shared by the two stand-ins for the train command below: each process appends when it starts and
# ends (with the device and hand-over variables it was given) to $COMPARE_TEST_EVENTS.
HOOKS = r'''
import json, os, sys, time

argv = sys.argv[1:]
model = argv[argv.index("--model") + 1]


def note(event):
    with open(os.environ["COMPARE_TEST_EVENTS"], "a") as f:
        f.write(json.dumps({"model": model, "event": event, "time": time.time(),
                            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                            "parent": os.environ.get("SEQVISION_PARENT_RUN_ID"),
                            "prefect": os.environ.get("PREFECT_API_URL")}) + "\n")
'''

# The train stage's own command line (pipelines.train.main); the seed worker of the model named by
# $COMPARE_TEST_CRASH crashes as a failing training does (its error line, exit status 1).
TRAIN_SHIM = HOOKS + r'''
note("start")
code = 1
try:
    from pipelines import train

    if model == os.environ.get("COMPARE_TEST_CRASH"):
        crash = ("import sys; print('train_worker: error: activity/' + sys.argv[1] + ' seed 0: RuntimeError: "
                 "simulated crash', file=sys.stderr); sys.exit(1)")
        import subprocess

        train.start_worker = lambda n, args, env, fork=True: subprocess.Popen(
            [sys.executable, "-c", crash, model], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    code = train.main(argv)
finally:
    note("end")
sys.exit(code)
'''

# Stands in for the train command where only the scheduling is under test: sleeps, and rnn fails the way the
# train CLI does (one "train: error:" line, exit 1).
FAKE_TRAIN = HOOKS + r'''
note("start")
time.sleep(0.5)
note("end")
if model == "rnn":
    print("train: error: activity/rnn: ValueError: boom", file=sys.stderr)
    sys.exit(1)
'''


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def intervals(events: list[dict]) -> dict[str, tuple[float, float, str | None]]:
    starts = {e["model"]: e for e in events if e["event"] == "start"}
    ends = {e["model"]: e for e in events if e["event"] == "end"}
    return {m: (starts[m]["time"], ends[m]["time"], starts[m]["cuda"]) for m in starts}


def peak_in_flight(spans: dict[str, tuple[float, float, str | None]]) -> int:
    # an end sorts before a start at the same instant: back-to-back is not concurrent
    points = sorted([(s, 1) for s, _, _ in spans.values()] + [(e, -1) for _, e, _ in spans.values()])
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    return peak


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The tiny synthetic preset (24/8/8 clips and images) and a params file sized for it."""
    from seqvision.synth.generate import generate

    root = tmp_path_factory.mktemp("compare")
    data = root / "data"
    generate(from_mapping(SynthConfig, {**SYNTH_PRESETS["tiny"], "workers": 1}, where="synth"), data, progress=False)
    notes = data / "annotations"
    params = {**TINY_PARAMS, "data": {
        "video_dir": str(data / "videos"), "image_dir": str(data / "images"),
        "video_captions": str(notes / "msrvtt.json"), "activity_dir": str(notes / "ucf101"),
        "image_captions_dir": str(notes / "coco"), "metadata": str(notes / "metadata.json"),
    }}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return {"root": root, "params": root / "params.yaml", "metadata": notes / "metadata.json"}


def stage_paths(root: Path, run: str) -> dict[str, str]:
    """The flow's path arguments: data-stage outputs shared by every run, trainings and report per run."""
    return {"frames": str(root / "frames"), "tokens": str(root / "tokens"), "encoder": str(root / "encoder"),
            "features": str(root / "features"), "runs": str(root / run / "runs"),
            "evals": str(root / run / "eval"), "reports": str(root / run / "reports")}


@pytest.fixture(scope="module")
def local_run(tiny, prefect_harness, mlflow_store) -> dict:
    """One comparison, every stage: activity x {gru, lstm}, two at once, lstm crashing inside its training."""
    root = tiny["root"]
    events = root / "events.jsonl"
    (root / "train_shim.py").write_text(TRAIN_SHIM)
    uri = mlflow_store(root / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the repo root of the trainings (lineage, .seqvision/): nothing lands in the checkout
        for key in ENV_KEYS:
            mp.delenv(key, raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("COMPARE_TEST_EVENTS", str(events))
        mp.setenv("COMPARE_TEST_CRASH", "lstm")
        mp.setattr(compare, "TRAIN_COMMAND", (sys.executable, str(root / "train_shim.py")))
        state = compare.compare_flow(
            params=str(tiny["params"]), tasks=["activity"], models=["gru", "lstm"], max_parallel=2,
            train_timeout_s=300, return_state=True, **stage_paths(root, "local"),
        )
    paths = {k: Path(v) for k, v in stage_paths(root, "local").items()}
    status = json.loads((paths["reports"] / compare.STATUS_FILE).read_text())
    return {"state": state, "events": read_events(events), "paths": paths, "status": status, "uri": uri}


def report_rows(reports: Path) -> dict[tuple[str, str], dict]:
    page = Page()
    page.feed((reports / "report.html").read_text(encoding="utf-8"))
    page.close()
    return page.rows


# --------------------------------------------------------------------------------------------------------
# Locally, end to end


@pytest.mark.slow
@pytest.mark.integration
def test_local_comparison_runs_every_stage_and_reports_the_failed_training(local_run):
    paths, status = local_run["paths"], local_run["status"]
    state = local_run["state"]
    assert state.is_failed()
    assert ("1 of 2 trainings failed: activity/lstm (seed 0 exited with status 1: activity/lstm seed 0: "
            "RuntimeError: simulated crash)") in state.message
    assert str(paths["reports"] / "report.html") in state.message

    # every data stage ran
    for produced in ("frames/index.json", "tokens/video/vocab.json", "encoder/encoder.pt", "features/index.json"):
        assert (paths["frames"].parent / produced).is_file(), produced
    # the good training was trained and tested, and the baselines scored
    assert (paths["runs"] / "activity/gru/train/seed0/best.pt").is_file()
    gru_metrics = json.loads((paths["runs"] / "activity/gru/test/seed0/metrics.json").read_text())
    assert gru_metrics["num_items"] == 8
    assert json.loads((paths["runs"] / "activity/gru/metrics.json").read_text())["top_1"]["seeds"] == [
        gru_metrics["top_1"]]
    assert (paths["evals"] / "activity/baseline_majority/metrics.json").is_file()
    # the crashed one is recorded as failed where the report reads it, with no test results
    summary = json.loads((paths["runs"] / "activity/lstm/summary.json").read_text())
    assert summary["status"] == "failed" and "simulated crash" in summary["error"]
    assert not (paths["runs"] / "activity/lstm/test").exists()

    rows = report_rows(paths["reports"])
    assert rows["task-activity", "gru"]["status"] == "ok"
    assert rows["task-activity", "lstm"]["status"] == "failed"
    assert "train failed: seed 0 exited with status 1: activity/lstm seed 0: RuntimeError: simulated crash" in rows[
        "task-activity", "lstm"]["text"]
    assert rows["task-activity", "baseline_majority"]["status"] == "ok"
    assert {section for section, _ in rows} == {"task-activity"}  # only the tasks asked for
    assert "| **lstm** | **failed: train failed" in (paths["reports"] / "report.md").read_text()

    by_model = {t["model"]: t for t in status["trainings"]}
    assert by_model["gru"]["status"] == "ok" and by_model["lstm"]["status"] == "failed"
    assert by_model["gru"]["where"] == "cpu" and status["mode"] == "local" and status["max_parallel"] == 2
    assert status["baselines"] == "ok" and status["failed"] == [state.message.split(". Report:")[0]]


@pytest.mark.slow
@pytest.mark.integration
def test_local_trainings_run_side_by_side_in_their_own_processes(local_run):
    events = local_run["events"]
    spans = intervals(events)
    assert set(spans) == {"gru", "lstm"}
    assert peak_in_flight(spans) == 2  # max_parallel=2: both at once
    parent = local_run["status"]["parent_run_id"]
    assert {e["parent"] for e in events} == {parent}  # handed over in the environment
    assert all(e["prefect"] for e in events)  # one Prefect server for the whole comparison
    assert all(e["cuda"] is None for e in events)  # CPU: the device is left alone


@pytest.mark.slow
@pytest.mark.integration
def test_every_training_is_a_child_of_the_comparisons_parent_run(local_run):
    client = mlflow_client(local_run["uri"])
    parent = client.get_run(local_run["status"]["parent_run_id"])
    assert parent.info.run_name == "comparison" and parent.data.tags["seqvision.stage"] == "compare"
    assert parent.info.status == "FAILED"  # a training failed: the comparison is incomplete
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {r.info.run_name: r.info.status for r in children} == {"activity-gru": "FINISHED",
                                                                  "activity-lstm": "FAILED"}
    assert parent.data.metrics["activity.gru.top1"] == pytest.approx(
        json.loads((local_run["paths"]["runs"] / "activity/gru/metrics.json").read_text())["top_1"]["mean"])
    assert "activity.lstm.top1" not in parent.data.metrics
    assert {f.path for f in client.list_artifacts(parent.info.run_id, "report")} >= {"report/report.html"}


# --------------------------------------------------------------------------------------------------------
# Scheduling: the bound and the devices


@pytest.mark.slow
@pytest.mark.integration
def test_trainings_never_exceed_the_bound_and_each_gets_its_own_device(tmp_path, prefect_harness, monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner

    events = tmp_path / "events.jsonl"
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    monkeypatch.setenv("COMPARE_TEST_EVENTS", str(events))
    monkeypatch.setattr(compare, "TRAIN_COMMAND", (sys.executable, str(tmp_path / "fake_train.py")))
    jobs = [compare.Training("activity", m) for m in ("rnn", "lstm", "gru", "transformer", "meanpool")]
    settings = compare.TrainSettings(
        params="p.yaml", features="f", tokens="t", activity_dir="a", activity_split=1, metadata="m.json",
        runs=str(tmp_path / "runs"), parallel=1, resume=True, mlflow=True, parent_run_id="parent-123", tracking_uri="sqlite:////x.db",
        prefect_api_url="http://127.0.0.1:1/api", deployment=None, timeout_s=60.0,
    )
    slots = ["3", "5"]  # two GPUs, as CUDA_VISIBLE_DEVICES names them
    bounded = compare.trainings_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=len(slots)))
    results = bounded(jobs, settings, slots)

    spans = intervals(read_events(events))
    assert peak_in_flight(spans) == 2
    for a, (start_a, end_a, cuda_a) in spans.items():
        assert cuda_a in slots
        for b, (start_b, end_b, cuda_b) in spans.items():
            if a < b and start_a < end_b and start_b < end_a:
                assert cuda_a != cuda_b, f"{a} and {b} ran at once on device {cuda_a}"
    assert [(r.model, r.status) for r in results] == [(j.model, "failed" if j.model == "rnn" else "ok") for j in jobs]
    assert results[0].error == "ValueError: boom"
    assert all(r.where == f"CUDA_VISIBLE_DEVICES={spans[r.model][2]}" for r in results)


def test_slots_follow_the_devices_and_cores(monkeypatch):
    from seqvision import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    # GPUs: one training per device, its seeds one after another there
    assert compare.training_slots(None, train_device="auto", num_trainings=15, seeds=3) == (["3", "5"], 1)
    assert compare.training_slots(3, train_device="cuda", num_trainings=15, seeds=3) == (["3", "5", "3"], 1)
    assert compare.training_slots(None, train_device="auto", num_trainings=1, seeds=1) == (["3"], 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert compare.training_slots(None, train_device="auto", num_trainings=15, seeds=3) == (["0", "1"], 1)
    # CPU: one worker per core, shared as trainings x seeds at once
    monkeypatch.setattr(runtime, "usable_cores", lambda: 6)
    assert compare.training_slots(None, train_device="cpu", num_trainings=15, seeds=3) == ([None] * 2, 3)
    assert compare.training_slots(None, train_device="cpu", num_trainings=15, seeds=1) == ([None] * 6, 1)
    assert compare.training_slots(None, train_device="cpu", num_trainings=1, seeds=3) == ([None], 3)
    assert compare.training_slots(None, train_device="cpu", num_trainings=4, seeds=4) == ([None], 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compare.training_slots(2, train_device="auto", num_trainings=15, seeds=3) == ([None], 2)
    assert compare.training_slots(2, train_device="auto", num_trainings=15, seeds=1) == ([None, None], 1)
    with pytest.raises(ConfigError, match="no CUDA device"):
        compare.training_slots(None, train_device="cuda", num_trainings=15, seeds=3)
    with pytest.raises(ConfigError, match="max_parallel must be >= 1"):
        compare.training_slots(0, train_device="cpu", num_trainings=15, seeds=3)


def test_cpu_seeds_share_the_cores_up_to_two_per_core(monkeypatch):
    """The train stage's seeds (per_core=2): 3 seeds on 2 cores run at once instead of as 2 then 1."""
    from seqvision import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    assert runtime.parallel_slots(3, device="auto", per_core=2) == [None] * 3
    assert runtime.parallel_slots(6, device="auto", per_core=2) == [None] * 4
    assert runtime.parallel_slots(3, device="auto") == [None] * 2  # the comparison flow's default: one per core
    assert runtime.parallel_slots(3, device="cpu", wanted=1, per_core=2) == [None]


def test_failure_reasons_are_one_line():
    assert compare.failure_reason(1, "noise\ntrain: error: activity/gru: RuntimeError: nan loss\n") == (
        "activity/gru: RuntimeError: nan loss")
    assert compare.failure_reason(-9, "") == "killed by SIGKILL (out of memory?)"
    assert compare.failure_reason(3, "Traceback ...\nImportError: no torch\n") == "exit status 3: ImportError: no torch"


# --------------------------------------------------------------------------------------------------------
# On a work pool: run_deployment, faked


@pytest.mark.slow
def test_deployment_runs_are_submitted_waited_for_and_their_failures_recorded(local_run, tiny, monkeypatch, capsys):
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Failed, Running

    from pipelines import train as train_stage

    root = tiny["root"]
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local_run["uri"])
    with get_client(sync_client=True) as client:  # the deployment exists; no worker will ever pick it up
        client.create_deployment(flow_id=client.create_flow_from_name("train"), name="train-gpu")

    calls = []

    def fake_run_deployment(name, *, parameters, timeout, job_variables, idempotency_key, **_):
        calls.append({"name": name, "parameters": parameters, "timeout": timeout, "env": job_variables["env"],
                      "key": idempotency_key})
        model = parameters["model"]
        if model == "gru":  # what the worker would do: run the train flow with these parameters and env
            with mock.patch.dict(os.environ, job_variables["env"]):
                train_stage.train_flow(**parameters)
            state = Completed()
        elif model == "meanpool":
            state = Failed(message="pod OOMKilled")
        else:  # still running when the wait ends
            state = Running()
        return SimpleNamespace(id=f"id-{model}", name=f"run-{model}", state=state)

    monkeypatch.setattr(compare, "run_deployment", fake_run_deployment)
    paths = stage_paths(root, "cluster")
    flags = [f"--{'eval' if k == 'evals' else k}={v}" for k, v in paths.items()]
    code = compare.main(["--params", str(tiny["params"]), "--tasks", "activity", "--models", "gru", "lstm", "meanpool",
                         "--deployment", "train/train-gpu", "--no-prepare", "--train-timeout", "120", *flags])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("compare: error: 2 of 3 trainings failed: activity/lstm (flow run still Running")
    assert err.endswith(f"Report: {Path(paths['reports']) / 'report.html'}")
    status = json.loads((Path(paths["reports"]) / compare.STATUS_FILE).read_text())
    parent = status["parent_run_id"]

    assert sorted(c["parameters"]["model"] for c in calls) == ["gru", "lstm", "meanpool"]
    signature = inspect.signature(train_stage.train_flow.fn)
    for call in calls:
        assert call["name"] == "train/train-gpu" and call["timeout"] == 120
        signature.bind(**call["parameters"])  # exactly what the deployment's flow accepts
        assert call["parameters"]["out"] == str(Path(paths["runs"]) / "activity" / call["parameters"]["model"])
        assert call["env"] == {"SEQVISION_PARENT_RUN_ID": parent, "MLFLOW_TRACKING_URI": local_run["uri"]}
    assert len({c["key"] for c in calls}) == 3

    by_model = {t["model"]: t for t in status["trainings"]}
    assert by_model["gru"]["status"] == "ok"
    assert by_model["gru"]["where"] == "deployment train/train-gpu, flow run run-gru (id-gru)"
    assert by_model["meanpool"]["error"] == "flow run ended Failed: pod OOMKilled"
    assert by_model["lstm"]["error"].startswith("flow run still Running after 120 s")
    assert status["mode"] == "deployment train/train-gpu"

    rows = report_rows(Path(paths["reports"]))
    assert rows["task-activity", "gru"]["status"] == "ok"
    assert rows["task-activity", "meanpool"]["status"] == "failed" and "pod OOMKilled" in rows[
        "task-activity", "meanpool"]["text"]
    assert rows["task-activity", "lstm"]["status"] == "failed"
    assert json.loads((Path(paths["runs"]) / "activity/gru/test/seed0/metrics.json").read_text())["num_items"] == 8

    client = mlflow_client(local_run["uri"])
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [r.info.run_name for r in children] == ["activity-gru"]
    assert parent != local_run["status"]["parent_run_id"]  # one parent per comparison


def test_an_unknown_deployment_stops_the_flow_before_any_work(tiny, prefect_harness, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = stage_paths(tmp_path, "none")
    with pytest.raises(ConfigError, match="deployment 'train/nowhere' not found"):
        compare.compare_flow(params=str(tiny["params"]), tasks=["activity"], models=["gru"],
                             deployment="train/nowhere", mlflow=False, **paths)
    assert not any(Path(p).exists() for p in paths.values())


# --------------------------------------------------------------------------------------------------------
# Command line


def test_cli_help_and_one_line_errors(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        compare.parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--max-parallel" in out and "--deployment" in out and "CUDA_VISIBLE_DEVICES" in out

    params = str(tiny["params"])
    cases = [
        (["--params", params, "--tasks", "activity", "dancing"], "unknown task 'dancing'; choose from activity"),
        (["--params", params, "--models", "lstm", "mamba"], "unknown model 'mamba'; choose from rnn"),
        (["--params", str(tmp_path / "missing.yaml")], "missing.yaml: no such params file"),
        (["--params", params, "--deployment", "train-gpu"], "expected 'flow name/deployment name'"),
        (["--params", params, "--max-parallel", "0"], "max_parallel must be >= 1"),
        (["--params", params, "--no-prepare", "--features", str(tmp_path / "nope")], "nope/index.json: no such file"),
        (["--params", params, "--metadata", str(tmp_path / "none.json")], "none.json, but there is no such file"),
    ]
    for argv, message in cases:
        assert compare.main([*argv, "--reports", str(tmp_path / "r")]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("compare: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_plan_keeps_dvc_order_and_refuses_repeats():
    jobs = compare.plan_trainings(["video_captioning", "activity"], ["meanpool", "gru"])
    assert [j.name for j in jobs] == ["activity/gru", "activity/meanpool", "video_captioning/gru",
                                      "video_captioning/meanpool"]
    assert len(compare.plan_trainings(None, None)) == 18  # 3 tasks x 6 families
    with pytest.raises(ConfigError, match="repeat"):
        compare.plan_trainings(["activity", "activity"], None)
    with pytest.raises(ConfigError, match="no model"):
        compare.plan_trainings(None, [])
    assert dataclasses.asdict(jobs[0]) == {"task": "activity", "model": "gru"}
