"""prefect.yaml, the work pools and the Kubernetes job template (fast checks), and one real deployment run:
a ``prefect server`` on loopback, the pools from deploy/create-pools.sh, ``prefect deploy`` of the committed
train deployment, a process worker, a run triggered through the API, its MLflow child run in a sqlite store."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.test_experiment import write_params
from tests.tiny import write_tiny_artifacts

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "prefect.yaml"
K8S_TEMPLATE = REPO / "deploy" / "k8s-base-job-template.json"
CREATE_POOLS = REPO / "deploy" / "create-pools.sh"
POOLS = {"seqvision-process": "process", "seqvision-k8s": "kubernetes"}

# Parameters a deployment leaves to the caller on purpose (prefect.yaml says why); every other required
# flow parameter must have a default there.
CALLER_SUPPLIES = {
    "train": {"task", "model", "out"},
    "train-gpu": {"task", "model", "out"},
    "evaluate": {"task_name", "model", "checkpoint", "out"},
    "study-row": {"row"},
}
# Flow parameter -> the stage CLI flag dvc.yaml passes it with, where the two names differ.
CLI_FLAG = {"evals": "--eval", "params_path": "--params"}

# Every wait in the integration test is bounded by one of these (seconds).
SERVER_START_TIMEOUT = 90
CLI_TIMEOUT = 120
RUN_TIMEOUT = 240
STOP_TIMEOUT = 20
MARKER = "SEQVISION_TEST_RUN"  # an environment variable every process the integration test starts inherits


def load_deployments() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}


def dvc_commands() -> dict[str, str]:
    """Every stage's command with params.yaml's ``${data.*}`` values filled in; a foreach stage's template
    (``${item.*}`` left in) stands for each of its items."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    data = yaml.safe_load((REPO / "params.yaml").read_text())["data"]
    commands = {}
    for name, stage in stages.items():
        command = " ".join(stage.get("do", stage)["cmd"].split())
        for key, value in data.items():
            command = command.replace(f'"${{data.{key}}}"', str(value)).replace(f"${{data.{key}}}", str(value))
        commands[name] = command
    return commands


# --------------------------------------------------------------------------------------------------------
# prefect.yaml and the job template, without a server


@pytest.mark.parametrize("name", list(load_deployments()))
def test_every_deployment_loads_its_flow_with_valid_parameters(name):
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    deployment = load_deployments()[name]
    path, function = deployment["entrypoint"].split(":")
    if path == "pipelines/compare.py" and not (REPO / path).is_file():
        pytest.skip("pipelines/compare.py (the comparison flow) is not in the tree yet")
    flow = load_flow_from_entrypoint(f"{REPO / path}:{function}", use_placeholder_flow=False)
    assert isinstance(flow, Flow)

    given = deployment.get("parameters", {})
    schema = flow.parameters
    assert set(given) <= set(schema.properties), f"{name}: not parameters of {function}"
    assert set(schema.required) - set(given) == CALLER_SUPPLIES.get(name, set())
    # Types: the flow's own validation (pydantic, from its signature) accepts the defaults.
    flow.validate_parameters({**given, **{key: "x" for key in CALLER_SUPPLIES.get(name, ())}})


def test_default_parameters_are_the_paths_dvc_passes():
    commands = dvc_commands()
    checked = 0
    for name, deployment in load_deployments().items():
        stage = name.removesuffix("-gpu")
        if stage not in commands:
            continue  # the comparison is not one dvc stage
        for key, value in deployment.get("parameters", {}).items():
            flag = CLI_FLAG.get(key, "--" + key.replace("_", "-"))
            assert f"{flag} {value}" in commands[stage], f"{name}.{key}: dvc.yaml's {stage} does not pass {value}"
            checked += 1
    assert checked >= 20


def test_the_study_row_deployment_runs_what_the_study_stages_run():
    """Its defaults are what dvc.yaml's study_trained@ stages pass (the timing rows' stage passes the same minus
    --features, which they ignore; study_long_range passes --encoder, whose default is the study knob's), and
    `python -m pipelines.study --deployment` fills in every row the registry has."""
    from seqvision.study.run import ROWS

    deployment = load_deployments()["study-row"]
    assert deployment["entrypoint"] == "pipelines/study_row.py:study_row_flow"
    commands = dvc_commands()
    for key, value in deployment["parameters"].items():
        assert f"--{key} {value}" in commands["study_trained"], f"study-row.{key}: dvc.yaml passes something else"
        if key != "features":
            assert f"--{key} {value}" in commands["study_timing"], f"study-row.{key}: dvc.yaml passes something else"
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "--encoder artifacts/encoder/encoder.pt" in commands["study_long_range"]
    timing = stages["study_timing"]["cmd"].split("pipelines.study_row ", 1)[1].split(" --", 1)[0].split()
    staged = [*timing, *stages["study_trained"]["foreach"], "long_range"]
    assert sorted(staged) == sorted(ROWS), "every row of seqvision.study.run.ROWS is in one study stage, once"
    assert {*timing} == {name for name, row in ROWS.items() if not row.trains}
    assert {*stages["study_trained"]["foreach"], "long_range"} == {name for name, row in ROWS.items() if row.trains}


def test_pools_schedule_and_working_directory():
    from prefect.client.schemas.schedules import CronSchedule

    config = yaml.safe_load(PREFECT_YAML.read_text())
    deployments = load_deployments()
    assert config["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $SEQVISION_ROOT }}"}}
    ]
    script = CREATE_POOLS.read_text()
    for deployment in deployments.values():
        assert deployment["work_pool"]["name"] in POOLS
    for pool, kind in POOLS.items():
        assert f"work-pool create {pool} --type {kind} --overwrite" in script

    gpu = deployments["train-gpu"]
    assert gpu["work_pool"]["name"] == "seqvision-k8s" and gpu["work_pool"]["job_variables"] == {"gpu_count": 1}
    assert gpu["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/seqvision"}}]
    assert gpu["entrypoint"] == deployments["train"]["entrypoint"]
    assert {n for n, d in deployments.items() if d["work_pool"]["name"] == "seqvision-k8s"} == {"train-gpu"}

    compare = deployments["compare"]
    assert compare["entrypoint"] == "pipelines/compare.py:compare_flow"
    [schedule] = compare["schedules"]
    assert schedule["active"] is False
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises on a malformed cron
    assert schedule["cron"].split()[2:] == ["*", "*", "*"]  # every day
    assert all("schedules" not in d for n, d in deployments.items() if n != "compare")


def test_k8s_template_requests_gpu_count_gpus():
    from prefect.utilities.templating import apply_values, find_placeholders

    template = json.loads(K8S_TEMPLATE.read_text())
    config, variables = template["job_configuration"], template["variables"]
    # The fields prefect-kubernetes' KubernetesWorkerJobConfiguration reads.
    assert {"command", "env", "labels", "name", "namespace", "job_manifest", "cluster_config",
            "job_watch_timeout_seconds", "pod_watch_timeout_seconds", "stream_output"} <= set(config)
    [container] = config["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    gpu_count = variables["properties"]["gpu_count"]
    assert (gpu_count["type"], gpu_count["default"], gpu_count["minimum"]) == ("integer", 1, 0)
    # The server refuses a template that uses an undeclared variable; fail here first, naming it.
    used = {p.name for p in find_placeholders(json.dumps(config))}
    assert used <= set(variables["properties"]), used - set(variables["properties"])

    # Render as the worker does: defaults, then the deployment's job variables; unset ones drop out.
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    rendered = apply_values(config, {**defaults, "gpu_count": 2, "memory_limit": "32Gi"})
    spec = rendered["job_manifest"]["spec"]["template"]["spec"]
    [container] = spec["containers"]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 2, "memory": "32Gi"},  # an integer quantity
                                      "requests": {}}
    assert container["image"] == "seqvision:latest" and container["imagePullPolicy"] == "IfNotPresent"
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    assert volumes["workspace"]["persistentVolumeClaim"] == {"claimName": "seqvision-workspace"}
    pvc = yaml.safe_load((REPO / "deploy" / "k8s-workspace-pvc.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "seqvision-workspace"
    # The stages' relative paths land on the shared volume, inside the checkout the pull step enters.
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    workdir = load_deployments()["train-gpu"]["pull"][0]["prefect.deployments.steps.set_working_directory"]
    for folder in ("data", "artifacts", "reports"):
        assert mounts[f"{workdir['directory']}/{folder}"] == {"name": "workspace", "subPath": folder,
                                                              "mountPath": f"/opt/seqvision/{folder}"}
    assert "nodeSelector" not in spec


# --------------------------------------------------------------------------------------------------------
# A real server, worker and deployment run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start(command: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``command`` in its own session (so its process group can be stopped as a whole)."""
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=REPO)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL after STOP_TIMEOUT seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=STOP_TIMEOUT)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # children that outlived their leader


def marked_processes(marker: str) -> list[int]:
    """Ids of live processes whose environment carries ``marker`` (everything this test started, however
    deeply it was spawned, e.g. the worker's flow-run subprocess)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if f"{MARKER}={marker}".encode() in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"


def run(command: list[str], *, env: dict[str, str]) -> str:
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=CLI_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def wait_healthy(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prefect server exited {server.returncode}:\n{tail(log)}"
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.25)
    pytest.fail(f"prefect server not healthy after {SERVER_START_TIMEOUT} s:\n{tail(log)}")


@contextlib.contextmanager
def prefect_services(tmp_path: Path) -> Iterator[tuple[str, dict[str, str], list[subprocess.Popen]]]:
    """Starts a Prefect server on a free loopback port (its own PREFECT_HOME) and yields at once, so the caller
    can prepare while it boots: (API URL, the environment for CLI calls and workers, the started processes,
    server first; add to it). Stops them all afterwards and fails if anything this test started is still
    alive or the port still answers."""
    port, marker = free_port(), uuid.uuid4().hex
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "SEQVISION_"))}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # this venv's prefect
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",  # no UI build at start-up
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # the worker polls every second instead of every 10
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "OMP_NUM_THREADS": "1",  # the flow run shares the CPU with the other test workers
        MARKER: marker,
    })
    processes: list[subprocess.Popen] = []
    try:
        log = tmp_path / "server.log"
        server = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                        "--port", str(port)], env=env, log=log)
        processes.append(server)
        yield url, env, processes
    finally:
        for process in reversed(processes):
            stop(process)
        leftovers = marked_processes(marker)
        for pid in leftovers:  # started by this test (they carry its marker), so ours to end
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"processes left running after stop: {leftovers}"
        assert not listening(port), f"port {port} still answers after the server was stopped"


class Clock:
    """Prints how long each phase took (pytest shows it when the test fails, e.g. on a timeout)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def lap(self, what: str) -> None:
        now = time.monotonic()
        print(f"{what}: {now - self.last:.1f} s", flush=True)
        self.last = now


async def read_back(deployment_id):
    """(every work pool as {name: type}, the deployment) as the server holds them."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        pools = {pool.name: pool.type for pool in await client.read_work_pools()}
        return pools, await client.read_deployment(deployment_id)


@pytest.mark.integration
@pytest.mark.slow
def test_deployed_training_runs_on_a_process_worker_and_logs_to_mlflow(tmp_path, mlflow_store):
    from mlflow import MlflowClient
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    clock = Clock()
    # A store with its tables created (creating them inside the flow run would cost seconds of its time limit).
    mlflow_uri = mlflow_store(tmp_path / "mlflow.db")  # tmp_path is absolute: sqlite:////...
    with prefect_services(tmp_path) as (url, env, processes):
        # While the server boots: the tiny inputs, and this process's MLflow client.
        artifacts = write_tiny_artifacts(tmp_path / "inputs")._asdict()
        params = write_params(tmp_path / "params.yaml")
        client = MlflowClient(tracking_uri=mlflow_uri)
        client.search_experiments()
        wait_healthy(url, processes[0], tmp_path / "server.log")
        clock.lap("server up, inputs and MLflow store ready")
        run(["bash", str(CREATE_POOLS)], env=env)
        clock.lap("pools created")
        # SEQVISION_ROOT only on the worker (docs/cluster.md): the deployment keeps the placeholder.
        worker_env = {**env, "SEQVISION_ROOT": str(REPO), "MLFLOW_TRACKING_URI": mlflow_uri}
        worker_log = tmp_path / "worker.log"
        processes.append(start([sys.executable, "-m", "prefect", "worker", "start", "--pool", "seqvision-process",
                                "--name", "test-worker"], env=worker_env, log=worker_log))
        run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", str(PREFECT_YAML),
             "-n", "train"], env=env)
        clock.lap("deployed")

        parameters = {"task": "activity", "model": "gru", "out": str(tmp_path / "out"), "params_path": str(params),
                      "features": str(artifacts["features"]), "tokens": str(artifacts["tokens"]),
                      "activity_dir": str(artifacts["labels"]), "repo_root": str(tmp_path),
                      "progress": False}
        with temporary_settings({PREFECT_API_URL: url}):
            flow_run = run_deployment("train/train", parameters=parameters, timeout=RUN_TIMEOUT, poll_interval=1)
            clock.lap(f"flow run {flow_run.state.name if flow_run.state else None}")
            assert flow_run.state is not None and flow_run.state.is_completed(), (
                f"flow run ended {flow_run.state!r}\nworker log:\n{tail(worker_log, 80)}")
            pools, deployment = asyncio.run(read_back(flow_run.deployment_id))
        assert flow_run.work_pool_name == "seqvision-process"
        assert pools == POOLS  # both pools: the server accepted the kubernetes template
        # SEQVISION_ROOT was resolved by the worker's flow run, not baked in at deploy time
        assert deployment.pull_steps == yaml.safe_load(PREFECT_YAML.read_text())["pull"]
        assert deployment.parameters == load_deployments()["train"]["parameters"]
    clock.lap("stopped")

    run_ids = json.loads((tmp_path / "out" / "runinfo.json").read_text())  # the MLflow ids: runinfo.json
    parent = (tmp_path / ".seqvision" / "parent_run_id").read_text().strip()
    [child] = client.search_runs([client.get_experiment_by_name("seqvision").experiment_id],
                                 filter_string="attributes.run_name = 'activity-gru'")
    assert child.info.run_id == run_ids["mlflow_run_id"]
    assert child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.data.tags["seqvision.stage"] == "train"
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert child.data.metrics["test/top_1"] == pytest.approx(metrics["top_1"]["mean"])
    assert (tmp_path / "out" / "train" / "seed0" / "best.pt").is_file()
