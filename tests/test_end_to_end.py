"""End to end: the whole `dvc repro` on the tiny preset against a real MLflow server, then what a team does
with the result: load the registered best models, run the walkthrough notebook, push to and pull from the DVC
remote, rerun, change one model, `dvc exp run` (also queued).

Everything happens in one scratch copy of the repository (module scope: the full repro is the expensive part,
so the tests share it and run in file order in one xdist worker). Two servers run for the whole module, on
127.0.0.1 at free ports, and are stopped at its end:

- ``mlflow server`` with a sqlite backend and an artifact destination under the module's temporary folder;
  every stage reaches it through ``MLFLOW_TRACKING_URI=http://...`` (absolute, so experiments that run in a
  temporary copy of the repository log to it too);
- one Prefect server (``PREFECT_API_URL``), so the ~40 stage processes do not each start a temporary one.

params.yaml is shrunk in the scratch copy only (2 epochs, 16-unit models, greedy decoding, no METEOR), so each
stage costs little more than its process start-up; every stage of dvc.yaml still runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from seqvision.study.run import TRAINING_ROWS
from tests.test_pipeline import copy_repository
from tests.tiny import TINY_PIPELINE_PARAMS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")

_spec = importlib.util.spec_from_file_location("run_notebook", REPO / "scripts" / "run_notebook.py")
run_notebook = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebook)

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.xdist_group("end_to_end")]

TASKS = ("activity", "image_captioning", "video_captioning")
FAMILIES = ("rnn", "lstm", "gru", "transformer", "meanpool", "mingru")
# The test metric each task is ranked by: (key in metrics.json, short name on the MLflow parent run).
HEADLINE = {"activity": ("top_1", "top1"), "image_captioning": ("cider_d", "cider_d"),
            "video_captioning": ("cider_d", "cider_d")}
# The validation metric each task picks its best epoch by (logged per seed and epoch as seed<k>/val_<name>).
VAL_METRIC = {"activity": "accuracy", "image_captioning": "cider_d", "video_captioning": "cider_d"}
EPOCHS = 2  # >1, so "per-epoch metrics" is a history, not one point
SERVER_START_TIMEOUT_S = 180  # MLflow's first start migrates a fresh sqlite schema: ~15 s on a busy 2-core box
REPRO_TIMEOUT_S = 1800  # the full repro: ~40 stage processes at 5-20 s each on a shared 2-core machine
STEP_TIMEOUT_S = 900
NOTEBOOK_CELL_TIMEOUT_S = 300  # its slowest cell takes seconds on the tiny preset; a cold import of torch and
# mlflow on a loaded 2-core machine up to a minute


# --------------------------------------------------------------------------------------------------------
# Processes


def _run(args: list[str], cwd: Path, env: dict[str, str], *, timeout: float = STEP_TIMEOUT_S,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if check:
        assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} before {url} answered:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server and every process it started (its own session, so its own process group), and check
    that none is left."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 30
    while True:
        try:  # workers can outlive their parent's exit for a moment
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        proc.poll()  # reap the server itself (a zombie still counts as a member of its group)
        assert time.monotonic() < deadline, f"processes of group {proc.pid} survived SIGKILL"
        time.sleep(0.2)


@dataclass(frozen=True)
class Servers:
    mlflow_uri: str
    prefect_api_url: str
    mlflow_artifacts: Path
    wait_ready: Callable[[], None]  # returns once both answer /health; the scratch repository is built meanwhile


def _start(args: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a server in its own session (so `_stop` can end it with everything it spawned), output to log."""
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """A real MLflow tracking server (sqlite backend, proxied artifacts) and a Prefect server."""
    base = tmp_path_factory.mktemp("servers")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(base / "prefect"),
           # MLflow 3's job runner (six huey consumer processes, for GenAI jobs) has nothing to do here.
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("PREFECT_API_URL", None)
    mlflow_uri, prefect_url = f"http://127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}/api"
    artifacts = base / "mlartifacts"
    started: list[subprocess.Popen[bytes]] = []
    try:
        started.append(_start(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", mlflow_uri.rsplit(":", 1)[1],
             "--workers", "1",  # one request at a time is plenty here; four would cost memory and CPU
             "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}",  # base is absolute: sqlite:////...
             "--artifacts-destination", str(artifacts)],
            cwd=base, env=env, log=base / "mlflow.log",
        ))
        started.append(_start(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", prefect_url.rsplit(":", 1)[1].removesuffix("/api")],
            cwd=base, env=env, log=base / "prefect.log",
        ))

        def wait_ready() -> None:
            _wait_healthy(f"{mlflow_uri}/health", started[0], base / "mlflow.log", timeout=SERVER_START_TIMEOUT_S)
            _wait_healthy(f"{prefect_url}/health", started[1], base / "prefect.log", timeout=SERVER_START_TIMEOUT_S)

        yield Servers(mlflow_uri=mlflow_uri, prefect_api_url=prefect_url, mlflow_artifacts=artifacts,
                      wait_ready=wait_ready)
    finally:
        for proc in started:
            _stop(proc)


# --------------------------------------------------------------------------------------------------------
# The scratch repository


def _shrink_params(path: Path) -> None:
    """Smallest settings that still run every stage for real. Keys are indexed, not .get(): a renamed knob
    fails here instead of silently making the module slow."""
    params = yaml.safe_load(path.read_text())
    params["extract"]["num_frames"] = 4
    params["encoder"]["epochs"] = 1
    params["encoder"]["feature_dim"] = 40  # small_cnn: 8 colour slots of 4 values, 8 colour-blind values
    params["encoder"]["slot_dim"] = 4
    params["encoder"]["frames_per_clip"] = 1
    params["train"]["epochs"] = EPOCHS
    params["models"]["match_params"] = dict.fromkeys(TASKS, "off")  # the 16-unit sizes below, not the budgets
    params["train"]["seeds"] = 1  # the seed protocol is tested in test_experiment.py; here, every stage once
    for family in FAMILIES:
        section = params["models"][family]
        section["hidden_size"] = 16
        if "embed_size" in section:
            section["embed_size"] = 16
        if "num_heads" in section:
            section["num_heads"] = 2
    params["evaluate"]["beam_size"] = 1
    params["evaluate"]["max_length"] = 8
    params["report"]["compute_meteor"] = "never"  # METEOR starts a JVM per scoring call: ~10 s each
    params["study"]["preset"] = TINY_PIPELINE_PARAMS["study"]["preset"]  # the study's stages: seconds
    params["study"]["overrides"] = TINY_PIPELINE_PARAMS["study"]["overrides"]
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _commit_all(root: Path, env: dict[str, str], message: str) -> None:
    """Commit what Git sees (the repository's .gitignore decides), as a user sharing the state would."""
    _run(["git", "add", "-A"], root, env)
    if _run(["git", "status", "--porcelain"], root, env).stdout.strip():
        _run(["git", "commit", "-q", "-m", message], root, env)


@dataclass(frozen=True)
class Scratch:
    root: Path
    env: dict[str, str]
    servers: Servers
    head: str  # the commit the first repro ran on


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory, servers: Servers) -> Iterator[Scratch]:
    """The repository's files (minus data.dvc and dvc.lock), git+dvc initialised with the repository's
    .dvc/config, tiny data in data/ tracked by a fresh data.dvc, shrunk params, all committed."""
    # The repository sits one level down so that the default remote of .dvc/config (`../seqvision-dvc-remote`
    # from the repository root) lands inside this temporary folder, beside it.
    root = tmp_path_factory.mktemp("e2e") / "seqvision"
    copy_repository(root)
    env = dict(os.environ)
    for key in ("PREFECT_API_URL", "SEQVISION_PARENT_RUN_ID", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(key, None)
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        # Stages import the scratch copy's seqvision (relative: a queued experiment's temporary copy imports
        # its own), not the editable install of the working tree other people are changing meanwhile.
        "PYTHONPATH": os.pathsep.join(p for p in ("src", env.get("PYTHONPATH", "")) if p),
        "PYTHON": sys.executable,
        "PREFECT_HOME": str(root.parent / "prefect-client"),
        "PREFECT_API_URL": servers.prefect_api_url,
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MLFLOW_TRACKING_URI": servers.mlflow_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "GIT_AUTHOR_NAME": "seqvision tests", "GIT_AUTHOR_EMAIL": "tests@seqvision.invalid",
        "GIT_COMMITTER_NAME": "seqvision tests", "GIT_COMMITTER_EMAIL": "tests@seqvision.invalid",
    })
    _run(["git", "init", "-q"], root, env)
    # DVC's experiments commit through its own Git backend, which reads the identity from the config.
    _run(["git", "config", "user.name", "seqvision tests"], root, env)
    _run(["git", "config", "user.email", "tests@seqvision.invalid"], root, env)
    _run([DVC, "init", "-q"], root, env)
    shutil.copy2(REPO / ".dvc" / "config", root / ".dvc" / "config")  # the documented default remote
    _shrink_params(root / "params.yaml")
    _run([sys.executable, "-m", "seqvision.synth", "--out", "data", "--preset", "tiny", "--quiet"], root, env)
    _run([DVC, "add", "-q", "data"], root, env)
    _commit_all(root, env, "scratch copy of seqvision, tiny data")
    head = _run(["git", "rev-parse", "HEAD"], root, env).stdout.strip()
    yield Scratch(root=root, env=env, servers=servers, head=head)
    # Queued experiments run in `dvc queue start` workers, detached from this process: stop any left.
    if (root / ".dvc" / "tmp" / "exps").exists():
        _run([DVC, "queue", "stop", "--kill"], root, env, timeout=120, check=False)


def _repro(scratch: Scratch, *targets: str, timeout: float = STEP_TIMEOUT_S) -> str:
    return _run([DVC, "repro", *targets], scratch.root, scratch.env, timeout=timeout).stdout


def _ran(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def first_repro(scratch: Scratch) -> str:
    """The log of the full `dvc repro` (shared: it is the expensive part)."""
    scratch.servers.wait_ready()  # they started before the scratch repository was built
    return _repro(scratch, timeout=REPRO_TIMEOUT_S)


# --------------------------------------------------------------------------------------------------------
# MLflow


def _client(scratch: Scratch) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=scratch.servers.mlflow_uri)


def _all_runs(client: Any) -> list[Any]:
    experiment = client.get_experiment_by_name("seqvision")
    assert experiment is not None, "no MLflow experiment 'seqvision' on the server"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert len(runs) < 1000
    return runs


def _artifact_files(client: Any, run_id: str, path: str | None = None) -> set[str]:
    files: set[str] = set()
    for entry in client.list_artifacts(run_id, path):
        files |= _artifact_files(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return files


def _children(runs: list[Any], parent_id: str) -> list[Any]:
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]


# --------------------------------------------------------------------------------------------------------
# Tests (in file order: each builds on the state the previous one left)


def test_full_repro_runs_every_stage_and_mlflow_holds_the_comparison(scratch: Scratch, first_repro: str) -> None:
    root = scratch.root
    stages = set(_run([DVC, "stage", "list", "--name-only"], root, scratch.env).stdout.split())
    # code, check_params .. features, the trainings, baselines and report, one stage for the study's timing rows and
    # one per training row, study_report
    assert len(stages) == 6 + len(TASKS) * len(FAMILIES) + 2 + 1 + len(TRAINING_ROWS) + 1, sorted(stages)
    assert _ran(first_repro) == stages
    for name in ("report.html", "report.md"):
        assert (root / "reports" / name).stat().st_size > 0
    assert not (root / "data" / "artifacts").exists()  # no stage writes under data/

    # `dvc metrics show` lists every (task, model) run with its headline metric.
    shown = json.loads(_run([DVC, "metrics", "show", "--json"], root, scratch.env).stdout)
    metric_files = {path: entry["data"] for rev in shown.values() for path, entry in rev["data"].items()}
    headline_values: dict[tuple[str, str], float] = {}
    for task in TASKS:
        for family in FAMILIES:
            data = metric_files.get(f"artifacts/runs/{task}/{family}/metrics.json")
            assert data is not None, f"dvc metrics show lacks {task}/{family}: {sorted(metric_files)}"
            headline_values[task, family] = data[HEADLINE[task][0]]["mean"]
            assert isinstance(headline_values[task, family], (int, float))

    client = _client(scratch)
    runs = _all_runs(client)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [(r.info.run_name, r.info.run_id) for r in parents]
    parent = parents[0]
    assert parent.info.run_name == "comparison" and parent.info.status == "FINISHED"
    children = _children(runs, parent.info.run_id)
    assert len(runs) == 1 + len(children)
    assert sorted(r.info.run_name for r in children) == sorted(f"{t}-{f}" for t in TASKS for f in FAMILIES)

    data_md5 = yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]
    for run in [parent, *children]:
        tags = run.data.tags
        assert tags["seqvision.git_commit"] == tags["mlflow.source.git.commit"] == scratch.head, run.info.run_name
        assert tags["seqvision.git_dirty"] == "false", run.info.run_name
        assert tags["seqvision.data_md5"] == data_md5, run.info.run_name
    for child in children:
        task, family = child.info.run_name.split("-")
        name = child.info.run_name
        assert child.info.status == "FINISHED", name
        assert re.fullmatch(r"[0-9a-f]{16}", child.data.tags["seqvision.params_hash"]), name
        assert child.data.params["train.epochs"] == str(EPOCHS), name
        for metric in ("seed0/train_loss", "seed0/val_loss", f"seed0/val_{VAL_METRIC[task]}"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, metric)]
            assert sorted(steps) == list(range(1, EPOCHS + 1)), (name, metric, steps)
        assert {"summary.json", "metrics.json"} <= _artifact_files(client, child.info.run_id), name
        # The report put every child's headline test metric on the parent, equal to what DVC shows.
        key, short = HEADLINE[task]
        on_parent = parent.data.metrics[f"{task}.{family}.{short}"]
        assert on_parent == pytest.approx(headline_values[task, family]), name
        assert child.data.metrics[f"test/{key}"] == pytest.approx(on_parent), name
    assert {"report/report.html", "report/report.md"} <= _artifact_files(client, parent.info.run_id)
    # ...stored by the server in its artifact destination, not in some local ./mlruns.
    assert any(scratch.servers.mlflow_artifacts.rglob("report.html"))
    assert not (root / "mlruns").exists() and not (root / "mlflow.db").exists()


# The test split's feature array each task's registered model predicts from (README, "Loading the best model").
TEST_FEATURES = {"activity": "videos-test.npy", "image_captioning": "images-test.npy",
                 "video_captioning": "videos-test.npy"}


def test_each_task_best_model_is_registered_and_loads_as_the_readme_shows(
    scratch: Scratch, first_repro: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    import numpy as np
    import torch

    from seqvision import checkpoint
    from seqvision.vocab import Vocab

    readme = (REPO / "README.md").read_text(encoding="utf-8")  # the calls below are the README's
    assert 'if "MLFLOW_TRACKING_URI" not in os.environ:' in readme  # a pasted snippet keeps the user's server
    assert 'model = mlflow.pyfunc.load_model("models:/seqvision-activity@best")' in readme
    assert "module = model.unwrap_python_model().module" in readme
    assert 'model.predict(np.load("artifacts/features/videos-test.npy")[:4])' in readme
    monkeypatch.setenv("MLFLOW_TRACKING_URI", scratch.servers.mlflow_uri)  # the README keeps it when set
    monkeypatch.chdir(scratch.root)
    client = _client(scratch)
    for task in TASKS:
        version = client.get_model_version_by_alias(f"seqvision-{task}", "best")  # raises when the alias is absent
        family, seed = version.tags["seqvision.family"], version.tags["seqvision.seed"]
        assert family in FAMILIES and version.tags["seqvision.task"] == task, version.tags
        model = mlflow.pyfunc.load_model(f"models:/seqvision-{task}@best")
        module = model.unwrap_python_model().module
        assert not module.training
        # The registered weights are the report's pick: that family's seed's best.pt.
        trained = checkpoint.load(f"artifacts/runs/{task}/{family}/train/seed{seed}/best.pt")["model"]
        weights = module.state_dict()
        assert weights.keys() == trained.keys() and all(torch.equal(weights[k], trained[k]) for k in weights), task
        predicted = model.predict(np.load(f"artifacts/features/{TEST_FEATURES[task]}")[:1])
        if task == "activity":  # a class index
            assert predicted.shape == (1,) and 0 <= int(predicted[0]) < module.dims.num_classes
        else:  # token ids of a caption, which the task's vocabulary reads back as words
            corpus = "image" if task == "image_captioning" else "video"
            vocab = Vocab.load(f"artifacts/tokens/{corpus}/vocab.json")
            assert predicted.ndim == 2 and predicted.shape[0] == 1 and int(predicted.max()) < len(vocab), task
            assert isinstance(vocab.decode(predicted[0]), str)


def test_walkthrough_notebook_runs_on_the_pipeline_outputs(scratch: Scratch, first_repro: str, tmp_path: Path) -> None:
    env = {**scratch.env, "MLFLOW_TRACKING_URI": scratch.servers.mlflow_uri}
    out = tmp_path / "walkthrough.ipynb"
    try:
        run_notebook.execute(REPO / "notebooks" / "walkthrough.ipynb", root=scratch.root, out=out,
                             timeout=NOTEBOOK_CELL_TIMEOUT_S, env=env)
    except run_notebook.NotebookCellError as err:
        pytest.fail(str(err)[:6000])  # names the cell and its section
    import nbformat

    cells = [c for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in cells)
    # One picture per figure the notebook draws (the cells also assert their by-hand maths against torch).
    pictures = sum("image/png" in o.get("data", {}) for c in cells for o in c.outputs)
    assert pictures == sum(c.source.count("plt.subplots(") for c in cells)
    printed = "".join(o.get("text", "") for c in cells for o in c.outputs if o.output_type == "stream")
    for family in FAMILIES:
        assert f"\n{family} " in printed, f"the comparison tables lack {family}"
    # "Try your own" on the dataset's own clip reproduces the features stage's cached features.
    found = re.search(r"largest difference from the features stage's cached features: (\S+)", printed)
    assert found and float(found.group(1)) < 1e-2, printed[-2000:]


def _dvc_files(root: Path) -> dict[str, bytes]:
    """Every file DVC produces or tracks: data/, artifacts/, reports/, less the measurements of the runs
    (runinfo.*, which .dvcignore keeps out of DVC: they stay on the machine that ran the stages)."""
    return {str(p.relative_to(root)): p.read_bytes()
            for top in ("data", "artifacts", "reports") for p in sorted((root / top).rglob("*"))
            if p.is_file() and not p.name.startswith("runinfo.")}


def test_push_then_pull_into_a_fresh_clone_through_the_default_local_remote(
    scratch: Scratch, first_repro: str
) -> None:
    root, env = scratch.root, scratch.env
    # The repository's default remote: `local`, outside the repository (beside it).
    assert _run([DVC, "remote", "default"], root, env).stdout.strip() == "local"
    url = _run([DVC, "config", "remote.local.url"], root, env).stdout.strip()
    remote = (root / ".dvc" / url).resolve()  # DVC resolves a relative url against .dvc/ (an absolute one stays)
    assert remote == root.parent / "seqvision-dvc-remote"
    assert not remote.is_relative_to(root)

    _commit_all(root, env, "pipeline results")
    _run([DVC, "push"], root, env)
    assert json.loads(_run([DVC, "status", "--cloud", "--json"], root, env).stdout) == {}
    assert any(remote.rglob("*"))

    clone = root.parent / "seqvision-clone"  # beside the original: the same relative remote
    _run(["git", "clone", "-q", str(root), str(clone)], root.parent, env)
    _run([DVC, "pull"], clone, env)
    original, pulled = _dvc_files(root), _dvc_files(clone)
    for rel, content in pulled.items():
        assert original.get(rel) == content, f"{rel} differs after the round trip"
    missing = sorted(set(original) - set(pulled))
    status = json.loads(_run([DVC, "status", "--json"], clone, env).stdout)
    assert missing == [], f"{len(missing)} outputs did not come back with dvc pull: {missing[:5]}"
    assert status == {}
    for row in TRAINING_ROWS:  # the study's trainings came back too, one tar per training row
        assert tarfile.is_tarfile(clone / "artifacts" / "study" / f"{row}.tar"), row
    assert not list(clone.rglob("runinfo.json"))  # measurements stay where the stages ran (and in MLflow)


def test_second_repro_is_a_noop_and_one_model_param_reruns_only_that_model(
    scratch: Scratch, first_repro: str
) -> None:
    root, env = scratch.root, scratch.env
    assert _ran(_repro(scratch)) == set()
    assert json.loads(_run([DVC, "status", "--json"], root, env).stdout) == {}

    params_path = root / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["models"]["gru"]["hidden_size"] = 24
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    started_ms = int(time.time() * 1000)
    ran = _ran(_repro(scratch, "report"))  # make demo's command
    assert ran == {f"train@{task}-gru" for task in TASKS} | {"check_params", "report"}
    # The study's training rows track the whole models section, so they are stale now, and nothing else is:
    # `make study` (or a plain `dvc repro`) would rerun them, then study_report.
    stale = json.loads(_run([DVC, "status", "--json"], root, env).stdout)
    assert set(stale) == {"study_long_range" if row == "long_range" else f"study_trained@{row}"
                          for row in TRAINING_ROWS}, stale

    # The three retrainings reached MLflow, with the new size.
    retrained = [r for r in _all_runs(_client(scratch)) if r.info.start_time >= started_ms
                 and "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.info.run_name for r in retrained) == sorted(f"{t}-gru" for t in TASKS)
    assert all(r.info.status == "FINISHED" and r.data.params["models.gru.hidden_size"] == "24" for r in retrained)


def _exp_names_and_epochs(root: Path, env: dict[str, str]) -> dict[str, int]:
    """``{experiment name: its train.epochs}`` from `dvc exp show --json` (experiments on HEAD)."""
    shown = json.loads(_run([DVC, "exp", "show", "--json"], root, env).stdout)
    found: dict[str, int] = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                params = (rev.get("data") or {}).get("params", {}).get("params.yaml", {}).get("data", {})
                if rev.get("name"):
                    found[rev["name"]] = params.get("train", {}).get("epochs")
    return found


def _queue_task_status(root: Path, env: dict[str, str], name: str) -> str | None:
    for line in _run([DVC, "queue", "status"], root, env).stdout.splitlines():
        fields = line.split()
        if name in fields:
            return fields[-1]
    return None


def _child_runs_with_epochs(scratch: Scratch, epochs: int, since_ms: int) -> list[Any]:
    return [r for r in _all_runs(_client(scratch)) if r.info.start_time >= since_ms
            and "mlflow.parentRunId" in r.data.tags and r.data.params.get("train.epochs") == str(epochs)]


def test_exp_run_and_queued_experiments_reach_mlflow(scratch: Scratch, first_repro: str) -> None:
    root, env = scratch.root, scratch.env
    _commit_all(root, env, "before experiments")  # queued experiments start from a commit
    target = "train@activity-gru"

    # In the workspace.
    since = int(time.time() * 1000)
    proc = _run([DVC, "exp", "run", "-n", "e2e-workspace", "-S", f"train.epochs={EPOCHS + 1}", target],
                root, env, check=False)
    assert proc.returncode == 0, f"dvc exp run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert _ran(proc.stdout) == {"check_params", target}
    [run] = _child_runs_with_epochs(scratch, EPOCHS + 1, since)
    assert run.info.run_name == "activity-gru" and run.info.status == "FINISHED"
    assert sorted(m.step for m in _client(scratch).get_metric_history(run.info.run_id, "seed0/val_loss")) == list(
        range(1, EPOCHS + 2))

    # Queued: runs in a temporary copy of the repository, in a detached `dvc queue start` worker.
    since = int(time.time() * 1000)
    _run([DVC, "exp", "run", "--queue", "-n", "e2e-queued", "-S", f"train.epochs={EPOCHS + 2}", target], root, env)
    assert _queue_task_status(root, env, "e2e-queued") == "Queued"
    _run([DVC, "queue", "start"], root, env)
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while (status := _queue_task_status(root, env, "e2e-queued")) in ("Queued", "Running"):
        assert time.monotonic() < deadline, "the queued experiment did not finish in time"
        time.sleep(3)
    if status != "Success":
        logs = _run([DVC, "queue", "logs", "e2e-queued"], root, env, check=False).stdout
        assert status == "Success", f"queued experiment ended {status}:\n{logs[-4000:]}"
    [run] = _child_runs_with_epochs(scratch, EPOCHS + 2, since)
    assert run.info.run_name == "activity-gru" and run.info.status == "FINISHED"
    shown = _exp_names_and_epochs(root, env)
    assert shown.get("e2e-workspace") == EPOCHS + 1 and shown.get("e2e-queued") == EPOCHS + 2, shown

    # The worker exits once the queue is empty (DVC: after up to 10 s idle); nothing is left running.
    deadline = time.monotonic() + 120
    while "Worker status: 0 active, 0 idle" not in _run([DVC, "queue", "status"], root, env).stdout:
        assert time.monotonic() < deadline, "the dvc queue worker is still running"
        time.sleep(3)
