"""End to end: `dvc repro` on the tiny synthetic preset, in a scratch copy of the repository.

Checks what a user relies on: the stages run through DVC, a second `dvc repro` is a no-op, and a param
change reruns exactly the stages that read it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    return [p for p in out.split("\0") if p and (REPO / p).is_file()]


def copy_repository(root: Path) -> None:
    """The repository's files into ``root``, without data.dvc, dvc.lock, .dvc/ and tests/ (a scratch repo
    starts its own DVC state)."""
    for rel in _tracked_files():
        if rel in {"data.dvc", "dvc.lock"} or rel.startswith((".dvc/", "tests/")):
            continue
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest)


@pytest.fixture(scope="module")
def scratch_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The repository's files (minus data.dvc and dvc.lock), git+dvc initialised, tiny data in data/."""
    root = tmp_path_factory.mktemp("repo")
    copy_repository(root)
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHON"] = sys.executable  # scripts/with-prefect-server runs the server with it
    env["PREFECT_HOME"] = str(root / ".prefect")
    env.pop("PREFECT_API_URL", None)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    _run(["git", "init", "-q"], root, env)
    _run([str(BIN / "dvc"), "init", "-q"], root, env)
    _run([str(BIN / "dvc"), "config", "core.analytics", "false"], root, env)
    _run([sys.executable, "-m", "seqvision.synth", "--out", "data", "--preset", "tiny", "--quiet"], root, env)
    return root, env


@pytest.fixture(scope="module")
def served(scratch_repo: tuple[Path, dict[str, str]], prefect_harness) -> dict[str, str]:
    """scratch_repo's environment with PREFECT_API_URL set to the test session's Prefect server, so that
    scripts/with-prefect-server runs the command against it instead of starting a server of its own (seconds of
    CPU time per start). The first repro of the module starts its own, as `make demo` does."""
    from prefect.settings import PREFECT_API_URL

    return {**scratch_repo[1], "PREFECT_API_URL": PREFECT_API_URL.value()}


def _repro_args(*targets: str) -> list[str]:
    """`dvc repro` through the wrapper, as `make demo` runs it: one Prefect server for the whole repro."""
    return ["scripts/with-prefect-server", str(BIN / "dvc"), "repro", *targets]


def _repro(root: Path, env: dict[str, str], *targets: str) -> str:
    return _run(_repro_args(*targets), root, env).stdout


def _ran(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage '")}


def test_repro_runs_data_stages_then_is_a_noop_then_reruns_only_what_changed(scratch_repo, served) -> None:
    root, env = scratch_repo
    first = _run(_repro_args("extract", "tokenize"), root, env)
    assert "(starting beside the command;" in first.stderr  # the wrapper's own server, as in `make demo`
    log = first.stdout
    assert {"extract", "tokenize"} <= _ran(log)
    assert (root / "artifacts/frames/index.json").is_file()
    assert (root / "artifacts/tokens/video/vocab.json").is_file()
    assert not any(p.name.endswith(".tmp") for p in (root / "artifacts").rglob("*"))
    # No stage writes under data/.
    assert not (root / "data" / "artifacts").exists()

    log = _repro(root, served, "extract", "tokenize")
    assert _ran(log) == set(), log

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tokenize"]["min_count"] = params["tokenize"]["min_count"] + 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = _repro(root, served, "extract", "tokenize")
    assert _ran(log) == {"check_params", "tokenize"}, log  # the gate reruns on any change; its output is the same

    # A code edit reruns the stages that run the edited file (tokenize imports vocab.py; extract does not), after
    # the code stage that fingerprints it (pipelines/code_deps.py).
    vocab = root / "src" / "seqvision" / "vocab.py"
    vocab.write_text(vocab.read_text() + "\n# an edit\n")
    log = _repro(root, served, "extract", "tokenize")
    assert _ran(log) == {"code", "tokenize"}, log
    # Bytecode is not code to DVC (.dvcignore): Python writes it on import, differently per version.
    (root / "src" / "seqvision" / "__pycache__").mkdir(exist_ok=True)
    (root / "src" / "seqvision" / "__pycache__" / "vocab.cpython-311.pyc").write_bytes(b"not the source")
    assert _ran(_repro(root, served, "extract", "tokenize")) == set()


@pytest.mark.parametrize(("section", "key", "value", "named"), [
    ("extract", "num_frames", "four", "extract.num_frames"),  # a typo in a value the stage reads
    ("trian", None, {"epochs": 3}, "trian: unknown section"),  # a section no stage reads
])
def test_a_params_typo_stops_repro_before_any_output_is_deleted(scratch_repo, served, section, key, value,
                                                                named) -> None:
    root, _ = scratch_repo
    _repro(root, served, "extract", "tokenize")
    index = (root / "artifacts/frames/index.json").read_bytes()
    path = root / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    if key is None:
        params[section] = value
    else:
        params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proc = subprocess.run(_repro_args("extract", "tokenize"), cwd=root, env=served, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode != 0
        assert named in proc.stdout + proc.stderr
        assert _ran(proc.stdout) == {"check_params"}
        assert (root / "artifacts/frames/index.json").read_bytes() == index  # the last good outputs are kept
    finally:
        path.write_text(original)
    assert _ran(_repro(root, served, "extract", "tokenize")) == set()  # the lock never saw the typo: nothing to rerun


def test_bad_params_stop_the_stage_with_one_clear_line(scratch_repo, tmp_path: Path) -> None:
    root, env = scratch_repo
    bad = tmp_path / "params.yaml"
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["extract"]["num_frames"] = "sixteen"
    bad.write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.extract", "--params", str(bad), "--video-dir", "data/videos",
         "--video-captions", "data/annotations/msrvtt.json", "--out", str(tmp_path / "frames")],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "extract.num_frames" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "frames").exists()
