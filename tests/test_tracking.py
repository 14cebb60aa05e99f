"""MLflow tracking (seqvision.tracking) against a temporary sqlite store; training via seqvision.train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seqvision import tracking, train
from tests.test_train import NaNAfter, config, fresh, loaders

ENV_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "SEQVISION_PARENT_RUN_ID")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """One store for the module: creating the sqlite schema is the slow part."""
    return tmp_path_factory.mktemp("repo")


@pytest.fixture
def client(repo):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking.tracking_uri(repo))


@pytest.fixture
def batch_spy(monkeypatch):
    """Records every MlflowClient.log_batch call as (run_id, n_metrics, n_params, n_tags)."""
    from mlflow import MlflowClient

    calls: list[tuple[str, int, int, int]] = []
    original = MlflowClient.log_batch

    def spy(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        calls.append((run_id, len(metrics), len(params), len(tags)))
        return original(self, run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)

    monkeypatch.setattr(MlflowClient, "log_batch", spy)
    return calls


def test_tracking_uri_is_absolute_sqlite_unless_the_environment_says_otherwise(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    uri = tracking.tracking_uri(Path("some/repo"))
    assert uri == f"sqlite:///{tmp_path / 'some/repo/mlflow.db'}" and uri.startswith("sqlite:////")
    # inside `dvc exp run --queue/--temp` the stage runs in a temporary copy; DVC names the real root
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "main"))
    assert tracking.tracking_uri(Path(".dvc/tmp/exps/tmpabc")) == f"sqlite:///{tmp_path / 'main/mlflow.db'}"
    monkeypatch.delenv("DVC_ROOT")
    assert tracking.artifact_location(uri) == (tmp_path / "some/repo/mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking.tracking_uri(Path("x")) == "http://tracking.example:5000"
    assert tracking.artifact_location("http://tracking.example:5000") is None
    with pytest.raises(ValueError, match="relative"):
        tracking.artifact_location("sqlite:///mlflow.db")


def test_parent_with_two_children_records_params_epoch_metrics_and_artifacts(repo, client, batch_spy, tmp_path):
    parent = tracking.start_parent("comparison", "cmp", repo_root=repo, tags={"kind": "test"},
                                   run_id_file=repo / "parent_run_id")
    assert tracking.start_parent("comparison", "cmp", repo_root=repo,
                                 run_id_file=repo / "parent_run_id") == parent  # reused while RUNNING
    children = {}
    for name in ("activity-gru", "activity-lstm"):
        tr, va = loaders()
        with tracking.start_child(parent_run_id=parent, run_name=name, repo_root=repo,
                                  tags={"seqvision.model": name}) as tracker:
            train.fit(fresh(), tr, va, config=config(epochs=2), out_dir=tmp_path / name, tracker=tracker,
                      metric=train.ACCURACY)
        children[name] = tracker.run_id
    tracking.end_run(parent, repo_root=repo)

    found = client.search_runs([client.get_run(parent).info.experiment_id],
                               filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert {r.info.run_name for r in found} == set(children)
    for name, run_id in children.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["train.lr"] == "0.01" and run.data.params["train.epochs"] == "2"
        assert run.data.tags["seqvision.model"] == name and run.data.tags["seqvision.device"] == "cpu"
        assert "seqvision.torch_version" in run.data.tags
        history = client.get_metric_history(run_id, "train_loss")
        assert sorted(m.step for m in history) == [1, 2]
        assert len(client.get_metric_history(run_id, "val_accuracy")) == 2
        assert [a.path for a in client.list_artifacts(run_id)] == ["history.json"]
        assert run.info.artifact_uri.startswith((repo / "mlartifacts").as_uri())
        # one log_batch per epoch carries the metrics: tracking cost does not grow with the metric count
        metric_calls = [c for c in batch_spy if c[0] == run_id and c[1] > 0]
        assert len(metric_calls) == 2 and all(c[1] >= 10 for c in metric_calls)
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).data.tags["kind"] == "test"


def test_failing_child_is_marked_failed(repo, client, tmp_path):
    parent = tracking.start_parent("comparison", "cmp-fail", repo_root=repo)
    tr, va = loaders()
    train.seed_everything(0)
    with pytest.raises(train.NonFiniteLossError):
        with tracking.start_child(parent_run_id=parent, run_name="nan", repo_root=repo) as tracker:
            train.fit(NaNAfter(bad_call=4), tr, va, config=config(epochs=2), out_dir=tmp_path, tracker=tracker)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert len(client.get_metric_history(tracker.run_id, "train_loss")) == 1  # epoch 1 was fine
    assert run.data.tags["mlflow.parentRunId"] == parent


def test_environment_run_ids_are_respected(repo, client, monkeypatch):
    parent = tracking.start_parent("comparison", "launcher-parent", repo_root=repo)
    monkeypatch.setenv("SEQVISION_PARENT_RUN_ID", parent)
    assert tracking.start_parent("comparison", "ignored", repo_root=repo) == parent

    # a launcher created the run and passes it to every rank: log into it, leave success to the launcher
    launched = client.create_run(client.get_run(parent).info.experiment_id, run_name="ddp").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", launched)
    with tracking.start_child(parent_run_id=parent, run_name="ignored", repo_root=repo) as tracker:
        tracker.log_epoch({"val_loss": 1.5, "note": "not a number"}, step=1)
    assert tracker.run_id == launched
    run = client.get_run(launched)
    assert run.info.status == "RUNNING" and run.data.metrics == {"val_loss": 1.5}
    with pytest.raises(RuntimeError):
        with tracking.start_child(parent_run_id=parent, run_name="ignored", repo_root=repo):
            raise RuntimeError("rank crashed")
    assert client.get_run(launched).info.status == "FAILED"  # never report success we did not have


def test_lineage_tags(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "data.dvc").write_text("outs:\n- md5: 0123abcd.dir\n  size: 10\n  nfiles: 2\n  path: data\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "-C", str(tmp_path), "add", "data.dvc"], check=True, env=env)
    subprocess.run(["git", "-C", str(tmp_path), "commit", "-qm", "x"], check=True, env=env)
    sha = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    tags = tracking.lineage_tags(repo_root=tmp_path, data_dvc=tmp_path / "data.dvc",
                                 params={"train": {"lr": 0.1, "epochs": 2}})
    assert tags["seqvision.git_commit"] == tags["mlflow.source.git.commit"] == sha
    assert tags["seqvision.git_dirty"] == "false"
    assert tags["seqvision.data_md5"] == "0123abcd.dir"
    assert tags["seqvision.params_hash"] == tracking.params_hash({"train": {"epochs": 2, "lr": 0.1}})
    assert tags["seqvision.params_hash"] != tracking.params_hash({"train": {"epochs": 3, "lr": 0.1}})
    assert tracking.git_commit(tmp_path / "nowhere") == ("unknown", False)
    (tmp_path / "bad.dvc").write_text("outs: []\n")
    with pytest.raises(ValueError, match="bad.dvc"):
        tracking.data_md5(tmp_path / "bad.dvc")


def test_null_tracker_is_a_silent_context_manager(tmp_path):
    with tracking.NullTracker() as tracker:
        tracker.log_params({"a": 1})
        tracker.log_epoch({"loss": 1.0}, step=1)
        tracker.log_artifact(tmp_path)
    assert tracker.run_id is None
    assert not (tmp_path / "mlflow.db").exists()


def test_importing_train_and_tracking_does_not_import_mlflow():
    code = "import json, sys, seqvision.train, seqvision.tracking; print(json.dumps('mlflow' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) is False
