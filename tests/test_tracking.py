"""MLflow tracking (seqvision.tracking) against a temporary sqlite store; training via seqvision.train."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from seqvision import tracking, train
from seqvision.io import file_digest
from tests.test_train import LR, NaNAfter, config, fit, fresh, loaders

# MLflow's HTTP limits too: _client() sets them in os.environ, and monkeypatch restores the environment afterwards.
HTTP_KEYS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
             "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "MLFLOW_HTTP_REQUEST_TIMEOUT")
ENV_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "SEQVISION_PARENT_RUN_ID", *HTTP_KEYS)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mlflow_store) -> Path:
    """One store for the module, its tables already created (the slow part of a new sqlite store)."""
    root = tmp_path_factory.mktemp("repo")
    mlflow_store(root / "mlflow.db")  # where tracking.tracking_uri(root) points
    return root


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
            fit(fresh(), tr, va, config=config(epochs=2), out_dir=tmp_path / name, tracker=tracker,
                      metric=train.ACCURACY)
        children[name] = tracker.run_id
    tracking.end_run(parent, repo_root=repo)

    found = client.search_runs([client.get_run(parent).info.experiment_id],
                               filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert {r.info.run_name for r in found} == set(children)
    for name, run_id in children.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["lr"] == str(LR) and run.data.params["train.epochs"] == "2"
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
            fit(NaNAfter(bad_call=4), tr, va, config=config(epochs=2), out_dir=tmp_path, tracker=tracker)
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


def test_dvc_hash_is_dvcs_own_and_read_from_a_fresh_dvc_lock(tmp_path):
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    features = tmp_path / "artifacts" / "features"
    (features / "sub").mkdir(parents=True)
    (features / "videos-train.npy").write_bytes(b"\x00\x01" * 100)
    (features / "sub" / "index.json").write_text('{"videos": []}')
    fs = LocalFileSystem()
    _, _, tree = build(HashFileDB(fs, str(tmp_path / "odb")), str(features), fs, "md5")
    computed = tracking.compute_dvc_md5(features)
    assert computed == tree.hash_info.value and computed.endswith(".dir")  # what `dvc commit` would record
    assert tracking.compute_dvc_md5(features / "videos-train.npy") == file_digest(features / "videos-train.npy", "md5")
    assert tracking.dvc_hash(features, repo_root=tmp_path) == (computed, "computed")  # no dvc.lock

    recorded = "0123456789abcdef0123456789abcdef.dir"  # not the real hash: proves it was read, not computed
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {"features": {"outs": [
        {"path": "artifacts/features", "hash": "md5", "md5": recorded, "size": 214, "nfiles": 2}]}}}))
    assert tracking.dvc_hash(features, repo_root=tmp_path) == (recorded, "dvc.lock")
    # written after dvc.lock (outside `dvc repro`): the lock's value may be stale, so it is computed
    later = lock.stat().st_mtime + 10
    os.utime(features / "videos-train.npy", (later, later))
    assert tracking.dvc_hash(features, repo_root=tmp_path) == (computed, "computed")
    os.utime(lock, (later + 1, later + 1))
    assert tracking.dvc_hash(features, repo_root=tmp_path).source == "dvc.lock"
    (features / "extra.npy").write_bytes(b"x")  # a file more than recorded
    os.utime(features / "extra.npy", (later, later))
    assert tracking.dvc_hash(features, repo_root=tmp_path).source == "computed"


def test_a_training_run_carries_its_test_metrics_parameter_count_and_dataset_inputs(repo, client, tmp_path,
                                                                                    monkeypatch):
    """The train stage's own tasks (open_run, log_run) on a real store: what the compare view ranks on, and the
    folders the run read, each split an input with its context and the folder's DVC hash."""
    from pipelines import train as stage
    from pipelines.train_args import TrainParams
    from seqvision.config import EvaluateConfig, RecurrentModelConfig, TrainConfig
    from seqvision.metrics import seed_summary

    monkeypatch.setenv("SEQVISION_PARENT_RUN_ID", tracking.start_parent("comparison", "cmp-inputs", repo_root=repo))
    features, tokens = tmp_path / "features", tmp_path / "tokens"
    for folder in (features, tokens):
        folder.mkdir()
        (folder / "train.npz").write_bytes(folder.name.encode())
    params = TrainParams(train=TrainConfig(seeds=2), model_config=RecurrentModelConfig(), budget=None,
                         decoding=EvaluateConfig(), activity_dir="", activity_split=1)
    inputs = stage.read_folders("video_captioning", params, features=str(features), tokens=str(tokens),
                                frames=str(tmp_path / "frames"))
    assert inputs == {"features": str(features), "tokens": str(tokens)}
    tracker, _ = stage.open_run.fn("video_captioning", "gru", params, repo, inputs)

    out = tmp_path / "out"
    for k in range(2):
        (out / "train" / f"seed{k}").mkdir(parents=True)
        (out / "train" / f"seed{k}" / "history.json").write_text(json.dumps(
            [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "val_metric": 0.1 * e} for e in (1, 2)]))
    (out / "summary.json").write_text(json.dumps({"metric": "cider_d", "seeds": [{"device": "cpu"}] * 2}))
    (out / "runinfo.json").write_text(json.dumps({"seeds": [{"resumed_from_epoch": 0}, {"resumed_from_epoch": 1}]}))
    metrics = {"num_parameters": 1234, "converged": 2, "num_seeds": 2, "cider_d": seed_summary([0.4, 0.6]),
               "content_event_f1": seed_summary([0.5, 0.7]), "bleu_4": seed_summary([0.1, 0.2])}
    (out / "metrics.json").write_text(json.dumps(metrics))
    with tracker:
        stage.log_run(tracker, str(out), 2, metrics)

    run = client.get_run(tracker.run_id)
    for name in ("cider_d", "content_event_f1", "bleu_4"):  # coco and content metrics, per seed and mean
        assert run.data.metrics[f"test/{name}"] == pytest.approx(metrics[name]["mean"])
        assert [run.data.metrics[f"test/{name}/seed{k}"] for k in range(2)] == pytest.approx(metrics[name]["seeds"])
        assert run.data.metrics[f"test/{name}/ci95_low"] < metrics[name]["mean"]
    assert run.data.metrics["num_parameters"] == 1234 and run.data.params["num_parameters"] == "1234"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "seed1/val_cider_d")] == [1, 2]
    assert run.data.tags["seqvision.seed1.resumed_from_epoch"] == "1"  # from the stage's runinfo.json
    # No runtime_tags in the seeds' runinfo (the workers write them): the device of seed 0's summary
    assert run.data.tags["seqvision.device"] == "cpu" and "seqvision.torch_version" not in run.data.tags

    logged = {(i.dataset.name, i.dataset.digest, {t.key: t.value for t in i.tags}["mlflow.data.context"],
               json.loads(i.dataset.source)["uri"]) for i in run.inputs.dataset_inputs}
    digests = {name: tracking.compute_dvc_md5(folder) for name, folder in (("features", features), ("tokens", tokens))}
    assert logged == {(f"{name}/{split}", digests[name], context, str(folder))
                      for name, folder in (("features", features), ("tokens", tokens))
                      for split, context in (("train", "training"), ("val", "validation"), ("test", "test"))}


def test_the_best_model_is_registered_under_its_alias_and_loads_with_one_call(repo, client, tmp_path, monkeypatch):
    """A training checkpoint -> a pyfunc model on its child run, registered as seqvision-activity@best; loading it
    gives the same network (and no pickled code: MLFLOW_ALLOW_PICKLE_DESERIALIZATION stays unset)."""
    import mlflow
    import torch

    from seqvision import checkpoint, models
    from seqvision.blocks import ModelDims

    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)
    parent = tracking.start_parent("comparison", "cmp-registry", repo_root=repo)
    versions = []
    for k in range(2):  # a later comparison's best takes the alias over
        torch.manual_seed(k)
        model = models.build_model("activity", "gru", None, dims=ModelDims(feature_dim=6, num_classes=4))
        checkpoint.save(tmp_path / f"best{k}.pt", {"spec": models.model_spec(model, task="activity", family="gru"),
                                                   "model": model.state_dict(), "optimizer": {"step": 3}})
        with tracking.start_child(parent_run_id=parent, run_name="activity-gru", repo_root=repo) as child:
            pass
        versions.append(tracking.log_model(tmp_path / f"best{k}.pt", run_id=child.run_id, repo_root=repo,
                                           register_as="seqvision-activity", tags={"seqvision.seed": k}))
    assert versions == ["1", "2"]
    assert client.get_run(child.run_id).info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(child.run_id, "model")} >= {"model/MLmodel", "model/artifacts"}
    registered = client.get_model_version_by_alias("seqvision-activity", "best")
    assert str(registered.version) == "2" and registered.run_id == child.run_id
    assert registered.tags["seqvision.seed"] == "1"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(repo))
    loaded = mlflow.pyfunc.load_model("models:/seqvision-activity@best")  # the README's call
    module = loaded.unwrap_python_model().module
    assert isinstance(module, torch.nn.Module) and not module.training
    features = torch.randn(3, 5, 6)
    with torch.no_grad():
        expected, _ = model.eval()(features, torch.full((3,), 5))
        got, _ = module(features, torch.full((3,), 5))
    assert torch.equal(got, expected)
    assert loaded.predict(features.numpy()).tolist() == expected.argmax(-1).tolist()
    stored = client.download_artifacts(child.run_id, "model/artifacts/checkpoint.pt", str(tmp_path))
    assert set(checkpoint.load(stored)) == {"spec", "model", "format", "sha256"}  # state dict + config, no optimizer
    tracking.end_run(parent, repo_root=repo)


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


# --------------------------------------------------------------------------------------------------------
# Failing fast when the store is not there


def _dead_uri() -> str:
    """An http URI on 127.0.0.1 where nothing listens (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def _one_line(err: pytest.ExceptionInfo, uri: str) -> str:
    message = str(err.value)
    assert uri in message and "\n" not in message, message
    return message


def test_check_tracking_fails_in_a_second_on_a_port_where_nothing_listens(monkeypatch):
    uri = _dead_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.check_tracking(f"sqlite:///{Path.cwd() / 'unused.db'}")  # import mlflow outside the timing
    start = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailableError) as err:
        tracking.check_tracking(uri)
    assert time.monotonic() - start < 3
    message = _one_line(err, uri)
    assert "does not answer (" in message and "Connection refused" in message, message
    assert f"`mlflow server --host 127.0.0.1 --port {uri.rsplit(':', 1)[1]}`" in message
    assert "unset MLFLOW_TRACKING_URI to log to the local sqlite store" in message


def test_check_tracking_gives_up_on_a_server_that_never_answers():
    with socket.socket() as sock:  # accepts connections (the kernel does) but never reads or answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(tracking.TrackingUnavailableError, match=r"does not answer \(.*timed out"):
            tracking.check_tracking(uri, timeout_s=0.5)
        assert time.monotonic() - start < 3


@pytest.fixture
def http_status() -> Iterator[tuple[str, list[int]]]:
    """A plain HTTP server on 127.0.0.1 answering every request with ``statuses[0]``."""
    statuses = [404]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            self.send_response(statuses[0])
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", statuses
    finally:
        server.shutdown()
        server.server_close()


def test_check_tracking_names_what_a_server_that_is_not_mlflow_answers(http_status):
    uri, statuses = http_status
    with pytest.raises(tracking.TrackingUnavailableError) as err:
        tracking.check_tracking(uri)
    assert "answers HTTP 404 to /api/2.0/mlflow/experiments/search" in _one_line(err, uri)
    statuses[0] = 401
    with pytest.raises(tracking.TrackingUnavailableError, match="HTTP 401.*MLFLOW_TRACKING_USERNAME"):
        tracking.check_tracking(uri)
    statuses[0] = 200
    tracking.check_tracking(uri)


def test_check_tracking_on_sqlite_stores(repo, client, tmp_path, monkeypatch):
    client.search_experiments()  # the module's store exists by now
    tracking.check_tracking(tracking.tracking_uri(repo))
    tracking.check_tracking(f"sqlite:///{tmp_path / 'new.db'}")  # not there yet: MLflow creates it
    cases = {
        f"sqlite:///{tmp_path / 'no' / 'such' / 'mlflow.db'}": "folder .*no/such does not exist",
        "sqlite:///mlflow.db": "relative database path",
    }
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    cases[f"sqlite:///{tmp_path / 'junk.db'}"] = r"junk.db cannot be opened as a database \(file is not a database\)"
    (tmp_path / "a_folder.db").mkdir()
    cases[f"sqlite:///{tmp_path / 'a_folder.db'}"] = "a_folder.db is not a readable and writable file"
    for uri, problem in cases.items():
        with pytest.raises(tracking.TrackingUnavailableError, match=problem) as err:
            tracking.check_tracking(uri)
        assert _one_line(err, uri).startswith(f"MLflow tracking store {uri}: ")
    import sqlite3

    writer = sqlite3.connect(tmp_path / "busy.db", isolation_level=None)  # another stage writing right now
    writer.execute("CREATE TABLE t (x)")
    writer.execute("BEGIN EXCLUSIVE")
    try:
        tracking.check_tracking(f"sqlite:///{tmp_path / 'busy.db'}", timeout_s=0.2)  # busy, but a database
    finally:
        writer.execute("COMMIT")
        writer.close()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'junk.db'}")
    with pytest.raises(tracking.TrackingUnavailableError, match="or unset MLFLOW_TRACKING_URI to use the default"):
        tracking.check_tracking(f"sqlite:///{tmp_path / 'junk.db'}")


def test_every_call_on_a_dead_server_fails_in_seconds_with_one_line(monkeypatch, tmp_path):
    """MLflow's own defaults retried one request for ~250 s (7 retries, backoff factor 2); the module now
    bounds them unless the user set them."""
    uri = _dead_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailableError) as err:
        tracking.start_parent("comparison", "cmp", repo_root=tmp_path)
    assert time.monotonic() - start < 15  # measured: ~2-3 s (two retries after 0 s and ~2 s)
    assert "does not answer (" in _one_line(err, uri)
    assert {k: os.environ[k] for k in HTTP_KEYS} == tracking.HTTP_LIMITS
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the user's own setting wins
    tracking._client(uri)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"


def test_a_failing_run_keeps_its_own_error_when_the_store_is_gone_too(monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fast, also for the old code this guards
    tracker = tracking.Tracker(MlflowClient(_dead_uri()), "0123", owns_run=True)
    with pytest.raises(RuntimeError, match="the training's own error"):
        with tracker:
            raise RuntimeError("the training's own error")
    assert tracker.status == "FAILED"


def test_errors_from_a_store_that_answers_are_not_rephrased(repo):
    parent = tracking.start_parent("comparison", "cmp-missing", repo_root=repo)
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as err:
        tracking.start_child(parent_run_id="f" * 32, run_name="x", repo_root=repo)
    assert not isinstance(err.value, tracking.TrackingUnavailableError)
    tracking.end_run(parent, repo_root=repo)


@pytest.mark.slow
@pytest.mark.integration
def test_a_real_server_that_dies_during_a_run(tmp_path, monkeypatch):
    """check_tracking passes against a live `mlflow server`; after SIGKILL, the next log call of a run fails
    within seconds with one line, and the run's own context manager does not wait for the server again."""
    from tests.test_end_to_end import BIN, SERVER_START_TIMEOUT_S, _free_port, _start, _stop, _wait_healthy

    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    uri = f"http://127.0.0.1:{_free_port()}"
    server = _start(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", uri.rsplit(":", 1)[1], "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination",
         str(tmp_path / "mlartifacts")],
        cwd=tmp_path, env=env, log=tmp_path / "mlflow.log",
    )
    try:
        _wait_healthy(f"{uri}/health", server, tmp_path / "mlflow.log", timeout=SERVER_START_TIMEOUT_S)
        tracking.check_tracking(uri)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        parent = tracking.start_parent("comparison", "cmp", repo_root=tmp_path)
        tracker = tracking.start_child(parent_run_id=parent, run_name="activity-gru", repo_root=tmp_path)
        tracker.log_epoch({"train_loss": 1.0}, step=1)
    finally:
        _stop(server)
    start = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailableError) as err:
        with tracker:
            tracker.log_epoch({"train_loss": 0.5}, step=2)
    assert time.monotonic() - start < 15  # MLflow's defaults: ~250 s for the call, as much again for FAILED
    assert "does not answer (" in _one_line(err, uri)
    with pytest.raises(tracking.TrackingUnavailableError):
        tracking.check_tracking(uri)


def test_a_dataset_another_run_inserted_first_is_linked_on_the_second_try(repo, client, tmp_path, monkeypatch):
    """Parallel trainings of one comparison log the same folders: MLflow's SQL store can look a dataset up, lose the
    insert to another run and fail on the unique key (seen in tests/test_compare.py). That is retried once; any other
    error is not."""
    import sqlalchemy
    from mlflow.exceptions import MlflowException

    parent = tracking.start_parent("comparison", "cmp-race", repo_root=repo)
    tracker = tracking.start_child(parent_run_id=parent, run_name="race", repo_root=repo)
    folder = tmp_path / "features"
    folder.mkdir()
    (folder / "train.npy").write_bytes(b"x")

    def lost_race() -> MlflowException:  # what MLflow's managed session raises for a sqlalchemy IntegrityError
        cause = sqlalchemy.exc.IntegrityError("INSERT INTO datasets", {}, Exception(
            "UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest"))
        err = MlflowException(message=cause)
        err.__cause__ = cause
        return err

    original, calls = tracker.client.log_inputs, []

    def log_inputs(run_id, datasets=None, **kwargs):
        calls.append(run_id)
        if len(calls) == 1:
            raise lost_race()
        return original(run_id, datasets=datasets, **kwargs)

    monkeypatch.setattr(tracker.client, "log_inputs", log_inputs)
    tracker.log_datasets({"features": folder}, repo_root=repo)
    assert len(calls) == 2
    assert {i.dataset.name for i in client.get_run(tracker.run_id).inputs.dataset_inputs} == {
        "features/train", "features/val", "features/test"}

    calls.clear()
    monkeypatch.setattr(tracker.client, "log_inputs", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(
        MlflowException("RESOURCE_DOES_NOT_EXIST: no such run")))
    with pytest.raises(MlflowException, match="no such run"):
        tracker.log_datasets({"features": folder}, repo_root=repo)
    assert calls == [1]
