"""Reliability: a training killed with SIGKILL mid-epoch resumes from its last checkpoint when rerun, through the
flow (``python -m pipelines.train``) and through ``dvc repro``, and ends bit for bit where an uninterrupted run
ends (CPU, ``train.deterministic``).

Real processes, real kills: each killed command runs in its own session and its whole process group gets
SIGKILL (no handler runs, nothing is flushed), while the child is inside the training loop of the epoch after
its first checkpoint. The reference is one uninterrupted run of the same command; it runs in the background
while the first kill test runs. Every process reports to the session's Prefect test server (``prefect_harness``)
instead of starting its own (6-9 s each).

The inputs are small fake feature and caption artifacts (no synthetic video, extract or encoder stage: those
take minutes), sized so that an epoch of the GRU captioner takes about a second: long enough to land a kill
inside one. The model has dropout and the run uses scheduled sampling and per-epoch caption sampling, so every
random stream of training is in play. A resume that drops the optimizer moments or restarts the LR schedule
fails here (checked by breaking each on purpose in the stage process); one that restores no random state at
all would pass, because fit reseeds torch per epoch and the sampler is keyed by (seed, epoch), so the saved
random state is not what makes a resume exact (tests/test_train.py covers its restore in-process).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import yaml

from pipelines.code_deps import write_fingerprints
from seqvision import checkpoint
from seqvision.io import file_digest, read_runinfo
from seqvision.config import TokenizeConfig
from seqvision.vocab import tokenize_corpus, write_corpus
from tests.tiny import TINY_UNMATCHED

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Both tests compare against one reference run (a module fixture), so they share an xdist worker.
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.xdist_group("kill_resume")]

TASK, FAMILY = "video_captioning", "gru"
EPOCHS = 3
TRAIN_ITEMS, VAL_ITEMS, TEST_ITEMS, FRAMES, DIM = 480, 64, 16, 8, 32
# Batch 2: 240 steps an epoch, about 3 s each here, so that both tests can kill the training mid-epoch after its MLflow
# run opened (open_run took ~8 s beside a 3-s training on a busy machine at batch 16, and the training ended first;
# the seeds, forked with their imports done, now start at once: 1.3-1.6 s an epoch at batch 4 was too close).
TRAIN = {"epochs": EPOCHS, "batch_size": 2, "device": "cpu", "deterministic": True, "patience": 0, "seeds": 1,
         "scheduled_sampling": 0.25, "log_every": 5, "num_workers": 0, "seed": 0}
GRU = {"lr": 0.01, "hidden_size": 64, "embed_size": 32, "dropout": 0.2, "attention": True}
SEED = Path("train") / "seed0"  # where the stage trains its one seed, under --out

# What differs by design between a killed-and-resumed run and an uninterrupted one (wall times, throughput, peak
# RSS, the resumed epoch, the MLflow runs) lives in runinfo.json; every file DVC hashes must be equal byte for byte.
HASHED = ("best.pt", "last.pt", "history.json", "learning_curve.json", "config.json", "summary.json")

TIMEOUT_S = 240  # per process: generous for a busy 2-core machine; a hang still ends the test


class Record(NamedTuple):
    id: str
    split: str
    captions: tuple[str, ...]


COLOURS = ("red", "green", "blue", "yellow")
MOTIONS = ("left", "right", "up", "down")


def make_inputs(root: Path) -> tuple[Path, Path]:
    """``features/`` (index.json + float16 ``videos-{train,val,test}.npy`` (n, FRAMES, DIM)) and ``tokens/video/``.

    Item i has a colour (a constant offset in one feature dimension) and a direction (a ramp over time in
    another), and three captions naming both, so the captioner has something to learn and CIDEr-D moves.
    """
    features, tokens = root / "features", root / "tokens"
    features.mkdir(parents=True)
    rng = np.random.default_rng(0)
    index: dict[str, list[dict[str, Any]]] = {"videos": [], "images": []}
    records: list[Record] = []
    ramp = np.linspace(-1.0, 1.0, FRAMES, dtype=np.float32)  # (T,)
    offset = 0
    for split, n in (("train", TRAIN_ITEMS), ("val", VAL_ITEMS), ("test", TEST_ITEMS)):
        colour, motion = rng.integers(0, len(COLOURS), n), rng.integers(0, len(MOTIONS), n)
        visual = 0.3 * rng.standard_normal((n, FRAMES, DIM)).astype(np.float32)  # (n, T, D)
        visual[np.arange(n), :, colour] += 1.0
        visual[np.arange(n), :, len(COLOURS) + motion] += ramp
        np.save(features / f"videos-{split}.npy", visual.astype(np.float16))
        for row in range(n):
            item_id = f"video{offset + row}"
            # some clips shorter than FRAMES, so the length masks are exercised too
            index["videos"].append({"id": item_id, "split": split, "shard": 0, "row": row,
                                    "num_valid": FRAMES - row % 3})
            c, m = COLOURS[colour[row]], MOTIONS[motion[row]]
            records.append(Record(item_id, split, (f"a {c} shape moves {m}", f"the {c} shape is moving {m}",
                                                   f"one {c} object going {m}")))
        offset += n
    (features / "index.json").write_text(json.dumps(index))
    write_corpus(tokenize_corpus(records, TokenizeConfig(min_count=1)), tokens / "video")
    return features, tokens


def train_command(params: Path | str, features: Path | str, tokens: Path | str, out: str,
                  *extra: str) -> list[str]:
    # --progress: the per-epoch bar on stderr is how the kill finds the middle of an epoch.
    return [sys.executable, "-m", "pipelines.train", "--task", TASK, "--model", FAMILY, "--params", str(params),
            "--features", str(features), "--tokens", str(tokens), "--out", out, "--progress", *extra]


def stage_env(root: Path, api_url: str) -> dict[str, str]:
    """The environment of a stage process: this checkout importable, the shared Prefect server (and a Prefect home
    under ``root``), MLflow in ``root/mlflow.db``, INFO logs (the resume note is an INFO line)."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"MLFLOW_RUN_ID", "SEQVISION_PARENT_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"}}
    env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_LOGGING_LEVEL": "INFO",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
    })
    return env


def run_to_end(cmd: list[str], *, cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-4000:]}"
    return output


class Background:
    """A command running while the test does something else; ``wait()`` checks it succeeded."""

    def __init__(self, cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> None:
        self.cmd, self.log = cmd, log
        with open(log, "wb") as sink:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)

    def wait(self) -> None:
        returncode = self.proc.wait(timeout=TIMEOUT_S)
        assert returncode == 0, f"{' '.join(self.cmd)} exited {returncode}:\n{self.log.read_text()[-4000:]}"


def checkpoint_epoch(path: Path) -> int:
    """The epoch ``last.pt`` was written after; 0 when there is none yet (written atomically, so never torn)."""
    return int(checkpoint.load(path)["epoch"]) if path.is_file() else 0


def session_pids(session: int) -> set[int]:
    """Live (non-zombie) processes of a session; a SIGKILLed group's orphans may linger as zombies here."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if os.getsid(int(entry.name)) == session and stat.rsplit(")", 1)[1].split()[0] != "Z":
                pids.add(int(entry.name))
        except (OSError, IndexError):  # it ended while we looked
            continue
    return pids


def kill_mid_training(cmd: list[str], *, cwd: Path, env: dict[str, str], out: Path, log: Path,
                      ready: Callable[[int, str], bool]) -> int:
    """Start ``cmd`` in a new session; once ``out/last.pt`` holds epoch k >= 1 and ``ready(k, log text)``, SIGKILL
    the whole process group. Returns k as read just before the kill; fails if the command ends first."""
    deadline = time.monotonic() + TIMEOUT_S
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        seen_mtime, epoch = 0.0, 0
        while True:
            assert proc.poll() is None, f"{' '.join(cmd)} ended ({proc.returncode}) before it could be killed " \
                                        f"mid-training:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no checkpoint within {TIMEOUT_S} s:\n{log.read_text()[-4000:]}"
            last = out / "last.pt"
            mtime = last.stat().st_mtime if last.is_file() else 0.0
            if mtime != seen_mtime:
                seen_mtime, epoch = mtime, checkpoint_epoch(last)
            if epoch >= 1 and ready(epoch, log.read_text(errors="replace")):
                break
            time.sleep(0.02)
        members = session_pids(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        # every process of the command (dvc's stage child included) is gone, so nothing trains on behind our back
        end = time.monotonic() + 30
        while session_pids(proc.pid) and time.monotonic() < end:
            time.sleep(0.05)
        assert not session_pids(proc.pid), f"survived SIGKILL of the group: {session_pids(proc.pid)} of {members}"
        return epoch
    finally:
        if proc.poll() is None:  # an assertion above failed: do not leave it running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def in_epoch_after(epoch: int, text: str) -> bool:
    """True while tqdm's bar (one ``\\r``-separated update each, ``epoch 2:  40%|...| 12/30 [...]``) shows epoch
    ``epoch + 1`` started but at most half done: the kill then lands in that epoch's training loop, half an
    epoch before its checkpoint."""
    updates = [u for u in re.split(r"[\r\n]", text) if f"epoch {epoch + 1}:" in u]
    counts = re.search(rf"epoch {epoch + 1}:.*?(\d+)/(\d+)", updates[-1]) if updates else None
    if counts is None:
        return False
    done, total = map(int, counts.groups())
    return 0 < done <= total // 2


# --------------------------------------------------------------------------------------------------------
# Comparison with the reference


def _assert_same_tensors(a: Any, b: Any, where: str) -> None:
    """Nested dicts / lists / tensors equal exactly (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training(run: Path, reference: Path) -> None:
    """``run`` ended exactly where the uninterrupted ``reference`` did: every per-epoch loss, LR, gradient norm
    and val metric, the summary, and everything in best.pt / last.pt (weights, optimizer, schedule, counters,
    random states), compared as values (to name what differs) and as bytes (what DVC hashes)."""
    for name in ("best.pt", "last.pt"):
        got, ref = checkpoint.load(run / name), checkpoint.load(reference / name)
        _assert_same_tensors(got, ref, name)
    for name in HASHED:
        assert file_digest(run / name) == file_digest(reference / name), name


def assert_mlflow_runs(db: Path, *, rerun: dict[str, Any]) -> dict[str, str]:
    """The killed training's child run was marked KILLED by the rerun, whose own child run is FINISHED under the
    same parent with the full per-epoch curve. Returns {run id: status} of the training's child runs."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    parent = client.get_run(rerun["mlflow_parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    statuses = {r.info.run_id: r.info.status for r in children}
    assert all(r.info.run_name == f"{TASK}-{FAMILY}" for r in children)
    assert len(children) == 2 and statuses[rerun["mlflow_run_id"]] == "FINISHED", statuses
    (killed,) = (r for r in children if r.info.run_id != rerun["mlflow_run_id"])
    # SIGKILL runs no handler: the rerun found the run RUNNING and ended it
    assert killed.info.status == "KILLED" and "process had died" in killed.data.tags["seqvision.ended_by"]
    run = client.get_run(rerun["mlflow_run_id"])
    resumed = rerun["seeds"][0]["resumed_from_epoch"]  # runinfo.json of the stage
    assert run.data.tags["seqvision.seed0.resumed_from_epoch"] == str(resumed)
    curve = client.get_metric_history(run.info.run_id, "seed0/val_cider_d")
    assert sorted(m.step for m in curve) == list(range(1, EPOCHS + 1))  # earlier epochs replayed from last.pt
    return statuses


def run_open_and_in_epoch_after(epoch: int, text: str) -> bool:
    """:func:`in_epoch_after`, once the training's MLflow child run exists (its ``open_run`` task finished; it runs
    beside the seeds, and a kill before it leaves no RUNNING run for the rerun to mark KILLED)."""
    return bool(re.search(r"Task run 'open_run-[^']*' - Finished in state Completed", text)) and \
        in_epoch_after(epoch, text)


# --------------------------------------------------------------------------------------------------------
# Fixtures


class Inputs(NamedTuple):
    root: Path
    params: Path
    features: Path
    tokens: Path
    api_url: str
    reference: Path  # the uninterrupted run's --out; call reference_run.wait() before reading it
    reference_run: Background
    mlflow_db: Path  # an empty MLflow store with its tables created; copy it, never write it

    def fresh_mlflow_store(self, root: Path) -> None:
        """``root/mlflow.db`` (where :func:`stage_env` points MLflow), ready to use."""
        shutil.copyfile(self.mlflow_db, root / "mlflow.db")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, prefect_harness, mlflow_template: Path) -> Inputs:
    from prefect.settings import PREFECT_API_URL

    root = tmp_path_factory.mktemp("kill")
    features, tokens = make_inputs(root)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"train": TRAIN, "models": {FAMILY: GRU, **TINY_UNMATCHED}}))
    api_url = PREFECT_API_URL.value()
    assert api_url, "prefect_harness should have set PREFECT_API_URL"
    # The reference needs no MLflow run: its numbers are in its files, and it keeps the comparison's MLflow
    # store to the killed and resumed runs.
    reference = Background(train_command(params, features, tokens, "reference", "--no-tracking"), cwd=root,
                           env=stage_env(root, api_url), log=root / "reference.log")
    yield Inputs(root, params, features, tokens, api_url, root / "reference", reference, mlflow_template)
    if reference.proc.poll() is None:
        reference.proc.kill()
        reference.proc.wait(timeout=30)


# --------------------------------------------------------------------------------------------------------
# Tests


def test_flow_killed_mid_epoch_resumes_and_matches_an_uninterrupted_run(inputs: Inputs) -> None:
    root, env = inputs.root, stage_env(inputs.root, inputs.api_url)
    cmd = train_command(inputs.params, inputs.features, inputs.tokens, "killed")
    out = root / "killed" / SEED
    inputs.fresh_mlflow_store(root)

    epoch = kill_mid_training(cmd, cwd=root, env=env, out=out, log=root / "killed.log",
                              ready=run_open_and_in_epoch_after)
    # died inside epoch `epoch + 1`: its checkpoint was never written, and the run never finished
    assert checkpoint_epoch(out / "last.pt") == epoch < EPOCHS
    assert not (out / "summary.json").exists()
    assert json.loads((out / "history.json").read_text())[-1]["epoch"] == epoch

    log = run_to_end(cmd, cwd=root, env=env)
    assert f"resuming from {Path('killed') / SEED / 'last.pt'} (epoch {epoch})" in log, log[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert read_runinfo(out)["resumed_from_epoch"] == epoch and summary["epochs_run"] == EPOCHS

    inputs.reference_run.wait()
    assert read_runinfo(inputs.reference / SEED)["resumed_from_epoch"] == 0
    assert_same_training(out, inputs.reference / SEED)
    assert_mlflow_runs(root / "mlflow.db", rerun=read_runinfo(root / "killed"))


def scratch_repo(root: Path, inputs: Inputs) -> Path:
    """This checkout's pipeline (dvc.yaml, params.yaml with the tiny train and gru sections, the code the train
    stage runs) in a fresh git + DVC repo, with the fake artifacts where the features and tokenize stages would have
    written them, and the train stage's code fingerprint where the code stage writes it."""
    repo = root / "repo"
    # tracked and new (not ignored) files, as tests/test_pipeline.py copies: the working tree is what runs
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "dvc.yaml",
                              "params.yaml", "pipelines", "src"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout
    for rel in filter(None, tracked.split("\0")):
        if (REPO / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, repo / rel)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(TRAIN)
    params["models"][FAMILY].update(GRU)
    params["models"]["match_params"] = TINY_UNMATCHED["match_params"]  # GRU's size as set
    params["data"]["metadata"] = ""  # fake features: no synthetic ground truth, no content metrics
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(inputs.features, repo / "artifacts" / "features")
    shutil.copytree(inputs.tokens, repo / "artifacts" / "tokens")
    # A dependency of every train stage, read only with train.finetune_encoder (off here): any bytes do.
    (repo / "artifacts" / "params").mkdir(parents=True)  # check_params' marker, a dependency of every stage
    write_fingerprints(["pipelines.train"], repo / "artifacts" / "code", root=repo)  # the code stage's output
    (repo / "artifacts" / "params" / "valid.txt").write_text("params.yaml is valid\n")
    (repo / "artifacts" / "encoder").mkdir(parents=True)
    (repo / "artifacts" / "encoder" / "encoder.pt").write_bytes(b"unused unless train.finetune_encoder")
    activity_dir = repo / params["data"]["activity_dir"]  # a dependency of every train stage; unread by captioning
    activity_dir.mkdir(parents=True)
    (activity_dir / "classInd.txt").write_text("1 move_left\n")
    env = stage_env(repo, inputs.api_url)
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"],
                [str(BIN / "dvc"), "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, timeout=120)
    return repo


def test_dvc_repro_killed_mid_epoch_resumes_from_the_persisted_checkpoint(inputs: Inputs) -> None:
    repo = scratch_repo(inputs.root / "dvc", inputs)
    env = stage_env(repo, inputs.api_url)
    inputs.fresh_mlflow_store(repo)
    stage = f"train@{TASK}-{FAMILY}"
    # --single-item: the upstream stages (extract .. features) have no lock here; their outputs are the fakes
    cmd = [str(BIN / "dvc"), "repro", "--single-item", stage]
    out = repo / "artifacts" / "runs" / TASK / FAMILY / SEED

    def into_next_epoch(epoch: int, text: str) -> bool:
        # Once the MLflow child run exists (the seeds, forked with their imports done, can reach epoch 1 before it
        # opens): the stage's stderr is no terminal, so no progress bar: wait 40% of the last epoch's training
        # time after its checkpoint (runinfo.json, with the epoch's times, is written right after last.pt), i.e.
        # into the next epoch's loop.
        if not re.search(r"Task run 'open_run-[^']*' - Finished in state Completed", text):
            return False
        timed = read_runinfo(out).get("epochs") or [{}]
        if timed[-1].get("epoch") != epoch:
            return False
        time.sleep(0.4 * timed[-1]["train_time_s"])
        return True

    epoch = kill_mid_training(cmd, cwd=repo, env=env, out=out, log=repo / "killed.log", ready=into_next_epoch)
    at_kill = checkpoint_epoch(out / "last.pt")
    assert epoch <= at_kill < EPOCHS and not (out / "summary.json").exists()

    log = run_to_end(cmd, cwd=repo, env=env)
    # DVC removes a stage's outputs before rerunning it, except the persisted checkpoints (dvc.yaml persist: true)
    assert f"resuming from {Path('artifacts/runs') / TASK / FAMILY / SEED / 'last.pt'} (epoch {at_kill})" in log, \
        log[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert read_runinfo(out)["resumed_from_epoch"] == at_kill and summary["epochs_run"] == EPOCHS
    assert stage in yaml.safe_load((repo / "dvc.lock").read_text())["stages"]

    inputs.reference_run.wait()
    assert_same_training(out, inputs.reference / SEED)
    assert_mlflow_runs(repo / "mlflow.db", rerun=read_runinfo(out.parent.parent))
