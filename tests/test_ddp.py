"""DDP training: 2 gloo processes on CPU against one process with the same global batch.

Tolerance (measured on the tiny GRU models below, 2 epochs = 6 optimizer steps): losses and gradient norms
agree to ~5e-8 relative and the validation numbers exactly; weights to <= 1e-5 absolute, the largest gaps in
attention parameters whose gradient is ~0 (an additive key bias cannot change a softmax), where Adam's
division by sqrt(v) + eps magnifies the float32 summation-order noise of the all-reduce. We assert 1e-5
relative on losses and 1e-4 absolute on weights. Averaging per-rank mean losses instead of normalising by the
global token count misses these by far (measured: 7e-4 relative on val_loss, 3e-2 on weights), and so does a
data order other than the single-process one (another shuffle: 1e-2 relative on train_loss). Dropout is 0
here: each rank draws its own dropout masks, so runs with dropout agree only in distribution.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from torch.utils.data import DistributedSampler

from seqvision import checkpoint, distributed, experiment, train
from seqvision.io import read_runinfo
from seqvision.config import EvaluateConfig, ModelsConfig, TrainConfig, from_mapping
from seqvision.datasets import DistributedEpochSampler, EpochSampler
from tests.test_experiment import RecordingTracker
from tests.tiny import TINY_TRAIN, TINY_UNMATCHED, write_tiny_artifacts

REPO = Path(__file__).resolve().parent.parent
MODELS = {"gru": {"lr": 0.01, "hidden_size": 16, "embed_size": 8, "dropout": 0.0}}  # no dropout: see the docstring
DECODING = EvaluateConfig(beam_size=2, max_length=10)


def make_artifacts(root: Path) -> dict[str, Path]:
    art = write_tiny_artifacts(root)
    return {**art._asdict(), "activity_dir": art.labels}
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-4
OUTPUTS = {"best.pt", "last.pt", "history.json", "learning_curve.json", "config.json", "summary.json", "runinfo.json"}
WORLD = 2
TIMEOUT_S = 180


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def configs() -> tuple[TrainConfig, ModelsConfig]:
    return (from_mapping(TrainConfig, TINY_TRAIN, where="train"), from_mapping(ModelsConfig, MODELS, where="models"))


def load(task: str, artifacts: dict[str, Path]) -> experiment.TaskData:
    return experiment.load_task_data(task, features_dir=artifacts["features"], tokens_dir=artifacts["tokens"],
                                     activity_dir=artifacts["activity_dir"])


def run(task: str, artifacts: dict[str, Path], out: Path, **kwargs) -> experiment.TrainSummary:
    train_config, models_config = configs()
    return experiment.run(task, "gru", data=load(task, artifacts), train_config=train_config,
                          model_config=models_config.gru, decoding=None if task == "activity" else DECODING,
                          out_dir=out, log=lambda _: None, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_training(single: Path, ddp: Path) -> None:
    """history.json and the final weights of two output folders agree within the module's tolerance."""
    a, b = (json.loads((d / "history.json").read_text()) for d in (single, ddp))
    assert [(e["epoch"], e["step"], e["lr"]) for e in a] == [(e["epoch"], e["step"], e["lr"]) for e in b]
    for key in ("train_loss", "val_loss", "grad_norm"):
        assert [e[key] for e in b] == pytest.approx([e[key] for e in a], rel=LOSS_RTOL), key
    assert [e["val_metric"] for e in b] == pytest.approx([e["val_metric"] for e in a], abs=1e-9)
    wa, wb = (checkpoint.load(d / "last.pt")["model"] for d in (single, ddp))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=WEIGHT_ATOL, msg=name)


# --------------------------------------------------------------------------------------------------------
# Sharding (no processes needed)


@pytest.mark.parametrize(("size", "batch", "world"), [(18, 6, 2), (20, 8, 2), (21, 6, 3), (20, 4, 4)])
def test_ranks_batches_of_a_step_are_the_single_process_batch(size, batch, world):
    per_rank, orders = batch // world, []
    for epoch in (0, 1):
        reference = EpochSampler(size, shuffle=True, seed=7)
        reference.set_epoch(epoch)
        single = list(reference)
        samplers = [DistributedEpochSampler(size, num_replicas=world, rank=r, shuffle=True, seed=7)
                    for r in range(world)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        shards = [list(sampler) for sampler in samplers]
        assert all(isinstance(s, DistributedSampler) and len(s) == size // world for s in samplers)
        assert [len(shard) for shard in shards] == [size // world] * world
        for step in range(-(-size // batch)):  # the last step may be short, on every rank alike
            together = [key for shard in shards for key in shard[step * per_rank:(step + 1) * per_rank]]
            assert sorted(together) == sorted(single[step * batch:(step + 1) * batch]), (epoch, step)
        assert {e for shard in shards for _, e in shard} == {epoch}  # caption sampling sees the epoch
        orders.append(single)
    assert orders[0] != orders[1]


def test_uneven_sizes_pad_by_repeating_the_head_so_every_rank_runs_the_same_steps():
    samplers = [DistributedEpochSampler(19, num_replicas=2, rank=r, shuffle=True, seed=0) for r in range(2)]
    shards = [list(s) for s in samplers]
    assert [len(s) for s in shards] == [10, 10]
    order = list(EpochSampler(19, shuffle=True, seed=0))
    assert shards[1][-1] == order[0]  # the one extra item is the epoch's first, seen twice
    assert sorted({k for s in shards for k in s}) == sorted(order)


def test_make_loader_without_a_process_group_ignores_shard():
    from seqvision.datasets import make_loader

    class Items(list):
        collate = staticmethod(list)

    loader = make_loader(Items(range(10)), batch_size=4, shuffle=True, shard=True)  # type: ignore[arg-type]
    assert isinstance(loader.sampler, EpochSampler) and loader.batch_size == 4


# --------------------------------------------------------------------------------------------------------
# 2 processes (gloo) vs 1, through seqvision.experiment.run


def _writes(event: str, args: tuple) -> str | None:
    """The path an audited file operation creates, replaces or deletes; None for reads and anything else."""
    if event == "open" and len(args) >= 3:
        path, mode, flags = args[:3]
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
        return str(path) if writing and isinstance(path, (str, bytes, os.PathLike)) else None
    if event == "os.rename":
        return str(args[1])
    if event == "os.remove":
        return str(args[0])
    return None


def _ddp_worker(rank: int, port: int, root: str, artifacts: dict[str, Path]) -> None:
    """One rank: train every job of the module fixture under the process group, recording what it writes."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # before any op: a forked child must not use the parent's OpenMP pool
    observed, written, recording = str(Path(root) / "out"), [], [True]

    def audit(event: str, args: tuple) -> None:
        path = _writes(event, args) if recording[0] else None
        if path is not None and path.startswith(observed):
            written.append(os.path.relpath(path, observed))

    sys.addaudithook(audit)  # lives as long as this forked process
    trackers = {name: RecordingTracker() for name in ("activity", "video_captioning", "resumed")}
    with distributed.process_group(device_type="cpu"):
        for name, task in (("activity", "activity"), ("video_captioning", "video_captioning"),
                           ("resumed", "video_captioning")):
            run(task, artifacts, Path(observed) / name, tracker=trackers[name])
    recording[0] = False
    (Path(root) / f"rank{rank}.json").write_text(json.dumps({
        "written": written,
        "tracked": {name: {"params": len(t.params), "epochs": [step for step, _ in t.epochs],
                           "artifacts": [p.name for p in t.artifacts]} for name, t in trackers.items()},
    }))


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[str, Path]:
    """Single-process references, then the same trainings on 2 processes: into out/{activity,
    video_captioning} fresh, and out/resumed continuing a single-process run killed after epoch 1."""
    root = tmp_path_factory.mktemp("ddp")
    artifacts = make_artifacts(root / "artifacts")
    single = root / "single"
    for task in ("activity", "video_captioning"):
        run(task, artifacts, single / task)

    original = train.train_one_epoch

    def killed_in_epoch_2(*args, **kwargs):
        if kwargs["epoch"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    train.train_one_epoch = killed_in_epoch_2
    try:
        with pytest.raises(KeyboardInterrupt):
            run("video_captioning", artifacts, root / "out" / "resumed")
    finally:
        train.train_one_epoch = original
    assert checkpoint.load(root / "out" / "resumed" / "last.pt")["epoch"] == 1
    (root / "out" / "resumed" / "best.pt").unlink()  # restored from last.pt on resume: by rank 0 only

    # fork, not spawn: the children inherit torch and seqvision already imported (spawn re-imports them, ~10 s
    # per child on a busy 2-core machine); the one_thread fixture left no OpenMP pool running to inherit.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    started = time.monotonic()
    context = mp.start_processes(_ddp_worker, args=(free_port(), str(root), artifacts), nprocs=WORLD,
                                 start_method=method, join=False)
    try:
        while not context.join(timeout=1):
            if time.monotonic() - started > TIMEOUT_S:
                pytest.fail(f"2-process DDP training did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return root


@pytest.mark.xdist_group("ddp")  # the module fixture runs once, on one xdist worker
def test_two_processes_match_one_process_with_the_same_global_batch(ddp_runs):
    for task in ("activity", "video_captioning"):
        assert_same_training(ddp_runs / "single" / task, ddp_runs / "out" / task)
        one, two = (json.loads((ddp_runs / d / task / "summary.json").read_text()) for d in ("single", "out"))
        assert (two["best_epoch"], two["epochs_run"], two["train_items"]) == \
            (one["best_epoch"], one["epochs_run"], one["train_items"])
    # a single-process run killed after epoch 1, resumed on 2 processes, ends where one process ends
    assert_same_training(ddp_runs / "single" / "video_captioning", ddp_runs / "out" / "resumed")
    summary = json.loads((ddp_runs / "out" / "resumed" / "summary.json").read_text())
    assert read_runinfo(ddp_runs / "out" / "resumed")["resumed_from_epoch"] == 1 and summary["epochs_run"] == 2


@pytest.mark.xdist_group("ddp")
def test_only_rank_0_writes_files_and_tracks(ddp_runs):
    rank0, rank1 = (json.loads((ddp_runs / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert rank1["written"] == []  # no file created, replaced or removed under out/
    assert all(t == {"params": 0, "epochs": [], "artifacts": []} for t in rank1["tracked"].values())
    for name in ("activity", "video_captioning"):
        replaced = {Path(p).name for p in rank0["written"] if Path(p).parent.name == name}
        assert OUTPUTS <= replaced, name
        assert rank0["tracked"][name]["params"] > 0 and rank0["tracked"][name]["epochs"][:2] == [1, 2]
        assert {"best.pt", "summary.json", "history.json", "config.json"} <= set(rank0["tracked"][name]["artifacts"])
    assert "resumed/best.pt" in rank0["written"]  # restored from last.pt before training went on
    assert rank0["tracked"]["resumed"]["epochs"][:2] == [2, 1]  # epoch 2 trained, then epoch 1 from the checkpoint


# --------------------------------------------------------------------------------------------------------
# pipelines.train --nproc-per-node


def write_params(path: Path) -> Path:
    path.write_text(yaml.safe_dump({"train": TINY_TRAIN, "models": MODELS | TINY_UNMATCHED}))
    return path


@pytest.fixture
def cli_env(tmp_path, monkeypatch, mlflow_store):
    """A repository-like cwd (parent-run file), a sqlite MLflow store and tiny artifacts in tmp_path."""
    for key in ("MLFLOW_RUN_ID", "SEQVISION_PARENT_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    uri = mlflow_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    artifacts = make_artifacts(tmp_path / "artifacts")
    args = ["--model", "gru", "--params", str(write_params(tmp_path / "params.yaml")),
            "--features", str(artifacts["features"]), "--tokens", str(artifacts["tokens"]),
            "--activity-dir", str(artifacts["activity_dir"])]
    from mlflow import MlflowClient

    return args, MlflowClient(tracking_uri=uri)


def test_cli_refuses_bad_process_counts_with_exit_2(cli_env, tmp_path, capsys):
    from pipelines import train as stage

    args, _ = cli_env
    out = ["--task", "activity", "--out", str(tmp_path / "o"), "--no-tracking"]
    assert stage.main([*args, *out, "--nproc-per-node", "0"]) == 2
    assert "--nproc-per-node must be >= 1" in capsys.readouterr().err
    assert stage.main([*args, *out, "--nproc-per-node", "3"]) == 2  # train.batch_size 4
    assert "must divide by --nproc-per-node (3)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_worker_refuses_a_seed_index_outside_train_seeds(cli_env, tmp_path, capsys):
    from pipelines import train_worker

    args, _ = cli_env
    out = ["--task", "activity", "--out", str(tmp_path / "o"), "--no-tracking"]
    assert train_worker.main([*args, *out, "--seed-index", "1"]) == 2  # train.seeds is 1
    assert "--seed-index 1: train.seeds is 1" in capsys.readouterr().err
    assert train_worker.main([*args, *out, "--seed-index", "-1"]) == 2
    assert "--seed-index must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_failed_torchrun_fails_the_stage_marks_the_run_failed_and_exits_1(cli_env, tmp_path, prefect_harness,
                                                                        monkeypatch, capsys):
    from pipelines import train as stage

    args, client = cli_env
    seen = tmp_path / "seen.json"
    # Stands in for torchrun: shows what a worker would get, then fails like a crashed rank.
    script = (f"import json, os, sys; json.dump({{k: os.environ.get(k) for k in ('MLFLOW_RUN_ID', "
              f"'MLFLOW_TRACKING_URI')}}, open({str(seen)!r}, 'w')); "
              "print('error: rank 1 crashed'); sys.exit(3)")
    monkeypatch.setattr(stage, "start_worker", lambda n, worker_args, env, fork=True: subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    code = stage.main([*args, "--task", "activity", "--out", str(tmp_path / "o"), "--nproc-per-node", "2"])
    assert code == 1
    err = capsys.readouterr().err
    assert "train: error: seed 0 exited with status 3: rank 1 crashed" in err
    env = json.loads(seen.read_text())
    assert env["MLFLOW_RUN_ID"] is None  # workers write files only; the stage process tracks
    assert env["MLFLOW_TRACKING_URI"] == os.environ["MLFLOW_TRACKING_URI"]
    runs = client.search_runs([client.get_experiment_by_name("seqvision").experiment_id],
                              filter_string="attributes.run_name = 'activity-gru'")
    assert [r.info.status for r in runs] == ["FAILED"]


@pytest.mark.slow
@pytest.mark.integration
def test_cli_with_two_processes_matches_one_process_and_logs_one_run(cli_env, tmp_path, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    from pipelines import train as stage

    args, client = cli_env
    task = ["--task", "video_captioning"]
    assert stage.main([*args, *task, "--out", str(tmp_path / "one")]) == 0
    # The 2-process run in a real subprocess, as DVC would start it; it reports to this session's Prefect server.
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    done = subprocess.run([sys.executable, "-m", "pipelines.train", *args, *task, "--out", str(tmp_path / "two"),
                           "--nproc-per-node", "2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    seed = Path("train") / "seed0"
    assert_same_training(tmp_path / "one" / seed, tmp_path / "two" / seed)
    assert {p.name for p in (tmp_path / "two" / seed).iterdir()} == OUTPUTS
    assert (tmp_path / "two" / "test" / "seed0" / "metrics.json").is_file()  # rank 0 evaluated the seed
    one, two = (read_runinfo(tmp_path / d) for d in ("one", "two"))  # the MLflow run ids
    assert two["mlflow_parent_run_id"] == one["mlflow_parent_run_id"]

    parent = client.get_run(two["mlflow_parent_run_id"])
    runs = client.search_runs([parent.info.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["comparison", "video_captioning-gru", "video_captioning-gru"]
    run = client.get_run(two["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "seed0/val_loss")] == [1, 2]  # once
    assert run.data.params["train.batch_size"] == str(TINY_TRAIN["batch_size"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"summary.json", "metrics.json"}


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nccl_worker_on_one_gpu_matches_one_process(tmp_path):
    # The NCCL plumbing (process group bound to $LOCAL_RANK, broadcasts and all-reduces of CUDA tensors, DDP with
    # device_ids) on the one GPU every CUDA machine has; one rank, so the numbers must be the in-process ones.
    artifacts = make_artifacts(tmp_path / "artifacts")
    train_config = from_mapping(TrainConfig, {**TINY_TRAIN, "device": "auto"}, where="train")
    models_config = from_mapping(ModelsConfig, MODELS, where="models")
    experiment.run("video_captioning", "gru", data=load("video_captioning", artifacts), train_config=train_config,
                   model_config=models_config.gru, decoding=DECODING, out_dir=tmp_path / "one", log=lambda _: None)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {**TINY_TRAIN, "device": "auto"}, "models": MODELS | TINY_UNMATCHED}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.ddp_launch", "--nproc-per-node=1", "-m",
         "pipelines.train_worker", "--task", "video_captioning", "--model", "gru", "--params", str(params),
         "--features", str(artifacts["features"]), "--tokens", str(artifacts["tokens"]),
         "--out", str(tmp_path / "nccl"), "--no-tracking"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seed = Path("train") / "seed0"
    assert json.loads((tmp_path / "nccl" / seed / "summary.json").read_text())["device"] == "cuda"
    assert_same_training(tmp_path / "one", tmp_path / "nccl" / seed)


# A rank that lists every listening TCP socket of the launcher and its ranks (/proc), after gloo is up.
LISTENERS = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    value = torch.ones(1)
    dist.all_reduce(value)
    if dist.get_rank() == 0:
        agent = os.getppid()
        pids = [agent] + [int(p) for p in open(f"/proc/{agent}/task/{agent}/children").read().split()]
        inodes = set()
        for pid in pids:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        found = [line.split()[1] for name in ("tcp", "tcp6") for line in open(f"/proc/net/{name}").read().splitlines()[1:]
                 if line.split()[3] == "0A" and line.split()[9] in inodes]
        json.dump(found, open(sys.argv[1], "w"))
    dist.barrier()
    dist.destroy_process_group()
""")
LOOPBACK = ("0100007F:", "00000000000000000000000001000000:")  # 127.0.0.1 and ::1 in /proc/net/tcp{,6}


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("launcher", [["pipelines.ddp_launch"], ["torch.distributed.run", "--standalone"]])
def test_the_ddp_launcher_listens_on_loopback_only(tmp_path, launcher):
    script, out = tmp_path / "rank.py", tmp_path / "listening.json"
    script.write_text(LISTENERS)
    env = {k: v for k, v in os.environ.items() if k not in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO)])
    done = subprocess.run([sys.executable, "-m", *launcher, "--nproc-per-node=2", str(script), str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    listening = json.loads(out.read_text())
    assert listening, "no listening socket seen: the check would prove nothing"
    exposed = [address for address in listening if not address.startswith(LOOPBACK)]
    if launcher[0] == "pipelines.ddp_launch":
        assert exposed == [], f"listening beyond loopback: {exposed}"
    else:  # the control: plain torchrun's store listens on every interface (why ddp_launch exists)
        assert exposed, listening
