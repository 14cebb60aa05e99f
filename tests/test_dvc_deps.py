"""dvc.yaml lists exactly what each stage reads, so DVC reruns exactly what changed.

- Code: a stage depends on ``artifacts/code/{module}.txt``, which the ``code`` stage writes for the module its
  command runs (pipelines/code_deps.py): the SHA-256 of every first-party source file that module imports,
  transitively, lazy (in-function) imports included, and of the modules it starts as processes
  (``-m pipelines.train_worker`` under torchrun), found statically from the source. The code stage depends on every
  first-party source file; no stage lists one directly.
- Params: the params.yaml keys a stage reads, recorded while the stage's own ``dvc.yaml`` command runs in-process
  on the tiny synthetic preset (every stage of the pipeline in order, six train@ stages that cover
  every family and task: ``COVERING_TRAINS``). Every key read must be covered by the
  stage's ``params`` (``train`` covers ``train.lr``), and every listed entry must be read by it.

The checkers and the import closure are plain functions, tested on the drifts they exist to catch (a module or a
param missing, a fingerprint not depended on).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import shlex
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import yaml

from pipelines import code_deps
from tests.tiny import TINY_PIPELINE_PARAMS

REPO = Path(__file__).resolve().parents[1]
WHOLE_FILE = "*"  # a params entry that tracks the whole file
CODE_STAGE = "code"  # writes {CODE_DIR}/{module}.txt, the fingerprint of what `python -m module` runs
CODE_DIR = "artifacts/code"


# --------------------------------------------------------------------------------------------------------
# Stages as DVC resolves them


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    deps: tuple[str, ...]  # paths, as listed
    params: tuple[str, ...]  # params.yaml keys, as listed
    outs: tuple[str, ...] = ()  # paths, as listed (metrics and plots included)

    @property
    def module(self) -> str:
        """The module the command runs (``python -m <module> ...``)."""
        argv = shlex.split(self.cmd)
        if argv[:2] != ["python", "-m"]:
            raise AssertionError(f"{self.name}: command does not start with 'python -m': {self.cmd}")
        return argv[2]

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.cmd)[3:]


def dvc_stages(root: Path = REPO) -> list[Stage]:
    """Every pipeline stage of ``root``'s dvc.yaml, matrices expanded and variables interpolated, in dvc.yaml order."""
    from dvc.repo import Repo

    stages = []
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            if not getattr(stage, "cmd", None):
                continue  # data.dvc
            deps, params = [], []
            for dep in stage.deps:
                if hasattr(dep, "params"):
                    params += list(dep.params) or [WHOLE_FILE]  # `- params.yaml:` with no keys: every key
                else:
                    deps.append(str(dep.def_path))
            outs = tuple(str(out.def_path) for out in stage.outs)
            stages.append(Stage(stage.addressing, stage.cmd, tuple(deps), tuple(params), outs))
    return stages


# --------------------------------------------------------------------------------------------------------
# Code: every stage depends on the fingerprint of the module it runs (pipelines/code_deps.py)


def code_problems(stage: Stage, code_stage: Stage) -> list[str]:
    """What dvc.yaml gets wrong about ``stage``'s code: the fingerprint of the module it runs missing from its deps
    or not written by the code stage, and first-party source files listed directly (they are the fingerprint's)."""
    fingerprint = f"{CODE_DIR}/{stage.module}.txt"
    problems = []
    if fingerprint not in stage.deps:
        problems.append(f"{stage.name}: runs {stage.module} but does not depend on {fingerprint}")
    if stage.module not in code_stage.argv or fingerprint not in code_stage.outs:
        problems.append(f"{stage.name}: runs {stage.module}, which the {CODE_STAGE} stage does not fingerprint "
                        f"(add it to its command and its outs)")
    problems += [f"{stage.name}: lists {dep} in deps; its code is in {fingerprint}" for dep in stage.deps
                 if dep.endswith(".py") and dep.split("/")[0] in ("pipelines", "src")]
    return problems


def code_stage_problems(code_stage: Stage, root: Path = REPO) -> list[str]:
    """The code stage must depend on every first-party source file (a new module included), so any edit reruns it,
    and DVC must see each one: a file that ``.dvcignore`` hides from DVC is not part of a folder's hash."""
    from dvc.repo import Repo

    sources = [p.relative_to(root).as_posix() for top in ("pipelines", "src/seqvision") for p in (root / top).rglob("*.py")
               if "__pycache__" not in p.parts]

    def covered(path: str) -> bool:
        return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in code_stage.deps)

    with Repo(str(root)) as repo:
        hidden = {path for path in sources if repo.dvcignore.is_ignored_file(str(root / path))}
    return ([f"{CODE_STAGE}: does not depend on {path}" for path in sorted(sources) if not covered(path)]
            + [f"{CODE_STAGE}: .dvcignore hides {path} from DVC" for path in sorted(hidden)])


# --------------------------------------------------------------------------------------------------------
# Params: which keys a stage reads


def param_problems(stage: Stage, reads: set[str]) -> list[str]:
    """What dvc.yaml gets wrong about ``stage``'s params: keys it ``reads`` that no listed entry covers, and listed
    entries it never reads."""
    listed = set(stage.params)

    if WHOLE_FILE in listed:
        return []  # check_params: tracks (and validates) every key, whether or not it reads it as a field

    def covers(entry: str, key: str) -> bool:
        return key == entry or key.startswith(entry + ".")

    problems = [f"{stage.name}: reads params.yaml {key} but does not list it in params" for key in sorted(reads)
                if not any(covers(entry, key) for entry in listed)]
    problems += [f"{stage.name}: lists params.yaml {entry} but never reads it" for entry in sorted(listed)
                 if not any(covers(entry, key) for key in reads)]
    return problems


@contextlib.contextmanager
def recorded_param_reads() -> Iterator[set[str]]:
    """Record the dotted params.yaml key of every config field read by first-party code while the block runs.

    Configs that ``config.load_params`` returns are tagged with their key (``models.lstm``); a field read counts
    when the first caller outside ``dataclasses``/``copy`` is seqvision or pipelines code (so ``to_dict`` counts,
    while Prefect and pydantic serializing a flow's parameters do not)."""
    from seqvision import config

    reads: set[str] = set()
    classes: set[type] = set()

    def collect(cls: type) -> None:
        if cls in classes:
            return
        classes.add(cls)
        hints = __import__("typing").get_type_hints(cls)
        for f in dataclasses.fields(cls):
            for tp in (hints[f.name], *__import__("typing").get_args(hints[f.name])):
                if dataclasses.is_dataclass(tp):
                    collect(tp)

    collect(config.Params)
    quiet = ("/dataclasses.py", "/copy.py")

    def ours() -> bool:
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.endswith(quiet):
            frame = frame.f_back
        if frame is None:
            return False
        filename = frame.f_code.co_filename
        return filename.startswith((str(REPO / "src"), str(REPO / "pipelines")))

    originals = {cls: cls.__getattribute__ for cls in classes}

    def make(cls: type):
        fields = {f.name for f in dataclasses.fields(cls)}
        original = originals[cls]

        def getattribute(self, name):  # type: ignore[no-untyped-def]
            value = original(self, name)
            if name in fields and not dataclasses.is_dataclass(value):
                key = object.__getattribute__(self, "__dict__").get("_params_key")
                if key is not None and ours():
                    reads.add(f"{key}.{name}")
            return value

        return getattribute

    def tag(obj: object, key: str) -> None:
        object.__setattr__(obj, "_params_key", key)
        for f in dataclasses.fields(obj):  # type: ignore[arg-type]
            value = object.__getattribute__(obj, f.name)
            if dataclasses.is_dataclass(value):
                tag(value, f"{key}.{f.name}" if key else f.name)

    real_load = config.load_params

    def load_params(path):  # type: ignore[no-untyped-def]
        params = real_load(path)
        tag(params, "")
        return params

    patched = [m for m in list(sys.modules.values())
               if getattr(m, "__name__", "").startswith(code_deps.FIRST_PARTY) and getattr(m, "load_params", None) is real_load]
    try:
        for cls in classes:
            cls.__getattribute__ = make(cls)  # type: ignore[method-assign]
        for module in patched:
            module.load_params = load_params  # type: ignore[attr-defined]
        yield reads
    finally:
        for cls, original in originals.items():
            cls.__getattribute__ = original  # type: ignore[method-assign]
        for module in patched:
            module.load_params = real_load  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------------
# Tests


def test_every_stage_depends_on_the_fingerprint_of_the_code_it_runs() -> None:
    stages = dvc_stages()
    code_stage = next(s for s in stages if s.name == CODE_STAGE)
    problems = code_stage_problems(code_stage)
    problems += [p for stage in stages if stage is not code_stage for p in code_problems(stage, code_stage)]
    entries = {s.module for s in stages if s is not code_stage}
    problems += [f"{CODE_STAGE}: fingerprints {m}, which no stage runs" for m in sorted(set(code_stage.argv) - entries)
                 if m.startswith("pipelines.")]
    assert not problems, "dvc.yaml deps drifted from the code:\n" + "\n".join(problems)


def test_the_study_report_depends_on_every_rows_json_and_nothing_else_of_the_study() -> None:
    """It reads ``{row}.json`` of every row (and logs those to MLflow), not the rows' trainings: their ~1,800 files
    would be walked on every no-op ``dvc repro`` for nothing."""
    from seqvision.study.run import ROWS, row_file

    stages = {s.name: s for s in dvc_stages()}
    rows = {row_file("artifacts/study", row).as_posix() for row in ROWS}
    assert {d for d in stages["study_report"].deps if not d.startswith(CODE_DIR)} == rows
    written = {o for s in stages.values() if s.name != "study_report" for o in s.outs}
    assert rows <= written, sorted(rows - written)


def test_the_checkers_catch_the_drifts_they_exist_for(tmp_path: Path) -> None:
    stages = {s.name: s for s in dvc_stages()}
    code_stage, captioner = stages[CODE_STAGE], stages["train@video_captioning-gru"]
    fingerprint = f"{CODE_DIR}/pipelines.train.txt"
    without = dataclasses.replace(captioner, deps=tuple(d for d in captioner.deps if d != fingerprint))
    assert code_problems(without, code_stage) == [
        f"train@video_captioning-gru: runs pipelines.train but does not depend on {fingerprint}"]
    unwritten = dataclasses.replace(code_stage, outs=tuple(o for o in code_stage.outs if o != fingerprint))
    assert code_problems(captioner, unwritten) == [
        "train@video_captioning-gru: runs pipelines.train, which the code stage does not fingerprint (add it to its "
        "command and its outs)"]
    listed = dataclasses.replace(captioner, deps=(*captioner.deps, "src/seqvision/report.py"))
    assert code_problems(listed, code_stage) == [
        f"train@video_captioning-gru: lists src/seqvision/report.py in deps; its code is in {fingerprint}"]
    narrow = dataclasses.replace(code_stage, deps=("pipelines",))
    assert "code: does not depend on src/seqvision/vocab.py" in code_stage_problems(narrow)
    # A broad ignore pattern (runinfo.* for the run measurements) would hide a source file named like them.
    root = _package(tmp_path, {".dvc/config": "[core]\n    no_scm = true\n", ".dvcignore": "runinfo.*\n",
                               "pipelines/__init__.py": "", "src/seqvision/__init__.py": "",
                               "src/seqvision/runinfo.py": ""})
    assert code_stage_problems(code_stage, root) == ["code: .dvcignore hides src/seqvision/runinfo.py from DVC"]
    (root / ".dvcignore").write_text((REPO / ".dvcignore").read_text())
    assert code_stage_problems(code_stage, root) == []
    # The drifts #10 found by reading: test captions are decoded with vocab.py and checkpoints loaded by train.py
    # (the old evaluate stages), and fine-tuning reads the frames through features.py and encoders.py.
    closure = {p.relative_to(REPO).as_posix() for p in code_deps.import_closure("pipelines.train", REPO)}
    for path in ("src/seqvision/vocab.py", "src/seqvision/train.py", "src/seqvision/features.py",
                 "src/seqvision/encoders.py", "pipelines/train_worker.py"):
        assert path in closure, path
    # A training resized by a family-name budget would read that family's section too (the old match_params):
    train = stages["train@activity-lstm"]
    reads = {"train.lr", "models.lstm.hidden_size", "models.transformer.hidden_size"}
    assert param_problems(dataclasses.replace(train, params=("train", "models.lstm")), reads) == [
        "train@activity-lstm: reads params.yaml models.transformer.hidden_size but does not list it in params"]
    assert param_problems(dataclasses.replace(train, params=("train", "models.lstm", "encoder")), reads - {
        "models.transformer.hidden_size"}) == ["train@activity-lstm: lists params.yaml encoder but never reads it"]


def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_closure_follows_lazy_imports_and_started_modules_but_not_type_checking(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "pipelines/__init__.py": "",
        "pipelines/stage.py": "from seqvision import a\n\ndef main():\n    from seqvision.sub import b\n"
                              "    return ['python', '-m', 'pipelines.worker']\n",
        "pipelines/worker.py": "from . import helper\n",
        "pipelines/helper.py": "",
        "src/seqvision/__init__.py": "",
        "src/seqvision/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from seqvision import typed\n"
                              "else:\n    from seqvision import untyped\n",
        "src/seqvision/typed.py": "",
        "src/seqvision/untyped.py": "",
        "src/seqvision/unused.py": "",
        "src/seqvision/sub/__init__.py": "",
        "src/seqvision/sub/b.py": "import numpy\nfrom ..a import TYPE_CHECKING\nfrom seqvision import both\n",
        "src/seqvision/both.py": "",  # shadowed: Python imports the package both/
        "src/seqvision/both/__init__.py": "",
    })
    closure = {p.relative_to(root).as_posix() for p in code_deps.import_closure("pipelines.stage", root)}
    assert closure == {"pipelines/__init__.py", "pipelines/stage.py", "pipelines/worker.py", "pipelines/helper.py",
                       "src/seqvision/__init__.py", "src/seqvision/a.py", "src/seqvision/untyped.py",
                       "src/seqvision/sub/__init__.py", "src/seqvision/sub/b.py", "src/seqvision/both/__init__.py"}
    with pytest.raises(ModuleNotFoundError, match="pipelines.nope"):
        code_deps.import_closure("pipelines.nope", root)


def test_a_package_run_with_dash_m_includes_its_main(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "pipelines/__init__.py": "", "pipelines/stage.py": "CMD = ['python', '-m', 'seqvision.tool']\n",
        "src/seqvision/__init__.py": "", "src/seqvision/tool/__init__.py": "",
        "src/seqvision/tool/__main__.py": "from seqvision import cli\n", "src/seqvision/cli.py": ""})
    tool = {"src/seqvision/__init__.py", "src/seqvision/tool/__init__.py", "src/seqvision/tool/__main__.py",
            "src/seqvision/cli.py"}
    assert {p.relative_to(root).as_posix() for p in code_deps.import_closure("seqvision.tool", root)} == tool
    assert {p.relative_to(root).as_posix() for p in code_deps.import_closure("pipelines.stage", root)} == {
        "pipelines/__init__.py", "pipelines/stage.py", *tool}


def test_a_fingerprint_changes_exactly_when_a_file_it_covers_does(tmp_path: Path) -> None:
    files = {"pipelines/__init__.py": "", "pipelines/one.py": "from seqvision import shared\n",
             "pipelines/two.py": "import seqvision.other\n", "src/seqvision/__init__.py": "",
             "src/seqvision/shared.py": "X = 1\n", "src/seqvision/other.py": "Y = 1\n"}

    def fingerprints(root: Path) -> dict[str, str]:
        paths = code_deps.write_fingerprints(["pipelines.one", "pipelines.two"], root / "out", root=root)
        return {p.name: p.read_text() for p in paths}

    before = fingerprints(_package(tmp_path / "a", files))
    edited = fingerprints(_package(tmp_path / "b", {**files, "src/seqvision/shared.py": "X = 2\n"}))
    assert edited["pipelines.one.txt"] != before["pipelines.one.txt"]
    assert edited["pipelines.two.txt"] == before["pipelines.two.txt"]
    lines = before["pipelines.one.txt"].splitlines()
    assert [line.split("  ")[1] for line in lines] == ["pipelines/__init__.py", "pipelines/one.py",
                                                       "src/seqvision/__init__.py", "src/seqvision/shared.py"]
    assert all(len(line.split("  ")[0]) == 64 for line in lines)  # sha256sum's format: `sha256sum -c` reads it


def test_the_code_stage_cli_refuses_an_unknown_module_and_writes_nothing(tmp_path: Path, capsys) -> None:
    assert code_deps.main(["--root", str(REPO), "--out", str(tmp_path / "code"), "pipelines.train",
                           "pipelines.nope"]) == 2
    assert "pipelines.nope" in capsys.readouterr().err
    assert not (tmp_path / "code").exists()


def test_recorder_sees_reads_by_project_code_only(tmp_path: Path) -> None:
    from seqvision import config

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 7}}))
    with recorded_param_reads() as reads:
        params = config.load_params(path)
        assert params.train.epochs == 7  # read here, in a test: not project code
        assert reads == set()
        config.to_dict(params.models.match_params)  # read by project code (config.py), through dataclasses
    assert reads == {"models.match_params.activity", "models.match_params.image_captioning",
                     "models.match_params.video_captioning"}


TINY_PARAMS = TINY_PIPELINE_PARAMS  # one seed: worker processes read params outside this recorder anyway


# The train@ stages share one dvc.yaml template (params: train, models.${item.model}, ...), so the recorder runs six of
# the eighteen (~6 s each): every family once and every task twice, a recurrent and a non-recurrent family per task.
# A read that depends on the family or on the task is caught; one that depends on a (task, family) pair outside
# these six is not.
COVERING_TRAINS = ("train@activity-rnn", "train@activity-transformer", "train@image_captioning-lstm",
                   "train@image_captioning-meanpool", "train@video_captioning-gru", "train@video_captioning-mingru")


def task_family(name: str) -> tuple[str, str]:
    """``("image_captioning", "lstm")`` for ``"train@image_captioning-lstm"``."""
    task, family = name.split("@", 1)[1].split("-")
    return task, family


def run_stage(stage: Stage) -> None:
    """``stage``'s dvc.yaml command, in this process (the cwd is the repository)."""
    module = importlib.import_module(stage.module)
    code = module.main(stage.argv)
    assert code == 0, f"{stage.name} exited with {code}"


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.xdist_group("dvc_deps")
def test_every_param_a_stage_reads_is_exactly_its_params_list(tmp_path: Path, monkeypatch, prefect_harness,
                                                               mlflow_store) -> None:
    from seqvision.config import SYNTH_PRESETS, SynthConfig, from_mapping
    from seqvision.synth.generate import generate
    from tests.test_pipeline import copy_repository

    copy_repository(tmp_path)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    no_scm = true\n    analytics = false\n")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    for section, values in TINY_PARAMS.items():
        for key, value in values.items():
            params[section][key] = {**params[section][key], **value} if isinstance(value, Mapping) else value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    generate(from_mapping(SynthConfig, {**SYNTH_PRESETS["tiny"], "workers": 1}, where="synth"), tmp_path / "data",
             progress=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store(tmp_path / "mlflow.db"))
    for key in ("MLFLOW_RUN_ID", "SEQVISION_PARENT_RUN_ID"):
        monkeypatch.delenv(key, raising=False)

    problems: list[str] = []
    stages = dvc_stages(tmp_path)
    assert set(COVERING_TRAINS) <= {s.name for s in stages}
    skipped = []
    for stage in stages:  # dvc.yaml order is a valid run order
        if stage.name.startswith("train@") and stage.name not in COVERING_TRAINS:
            skipped.append(stage)
            continue
        with recorded_param_reads() as reads:
            run_stage(stage)
        problems += param_problems(stage, reads)
    # Every skipped train@ stage must list what a checked one of its task lists, with its own family's section.
    checked = {task_family(s.name)[0]: s for s in stages if s.name in COVERING_TRAINS}
    for stage in skipped:
        task, family = task_family(stage.name)
        model = task_family(checked[task].name)[1]
        expected = {p.replace(f"models.{model}", f"models.{family}") for p in checked[task].params}
        if set(stage.params) != expected:
            problems.append(f"{stage.name}: lists params {sorted(stage.params)}, unlike {checked[task].name} "
                            f"(expected {sorted(expected)})")
    assert not problems, "dvc.yaml params drifted from what the stages read:\n" + "\n".join(problems)


def test_dvc_lock_has_no_entry_of_a_stage_dvc_yaml_no_longer_has() -> None:
    """DVC keeps a removed stage's dvc.lock entry for ever; every no-op `dvc repro` then parses it (15 stale
    evaluate@* entries were 20% of the lock). Delete such an entry when its stage goes."""
    stages = {stage.name for stage in dvc_stages()}
    locked = yaml.safe_load((REPO / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    assert not sorted(set(locked) - stages), "dvc.lock entries without a dvc.yaml stage: remove them"
