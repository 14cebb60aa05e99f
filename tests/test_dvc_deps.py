"""dvc.yaml lists exactly what each stage reads, so DVC reruns exactly what changed.

- Code: the first-party modules a stage's command imports, transitively, lazy (in-function) imports included, and
  the modules it starts as processes (``-m pipelines.train_worker`` under torchrun), found statically from the source.
  Every one must be a dependency of the stage, and no other first-party module may be.
- Params: the params.yaml keys a stage reads, recorded while the stage's own ``dvc.yaml`` command runs in-process
  on the tiny synthetic preset (every stage of the pipeline in order, six train@ stages that cover
  every family and task: ``COVERING_TRAINS``). Every key read must be covered by the
  stage's ``params`` (``train`` covers ``train.lr``), and every listed entry must be read by it.

The checkers are plain functions, tested on the drifts they exist to catch (a module or a param missing).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import importlib
import shlex
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import yaml

from tests.tiny import TINY_PIPELINE_PARAMS

REPO = Path(__file__).resolve().parents[1]
WHOLE_FILE = "*"  # a params entry that tracks the whole file
FIRST_PARTY = ("seqvision", "pipelines")
SOURCE_ROOTS = {"seqvision": REPO / "src", "pipelines": REPO}


# --------------------------------------------------------------------------------------------------------
# Stages as DVC resolves them


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    deps: tuple[str, ...]  # paths, as listed
    params: tuple[str, ...]  # params.yaml keys, as listed

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
            stages.append(Stage(stage.addressing, stage.cmd, tuple(deps), tuple(params)))
    return stages


# --------------------------------------------------------------------------------------------------------
# The import closure


def module_file(name: str) -> Path | None:
    """The source file of a first-party module (a package's __init__.py), or None when there is none."""
    top = name.split(".")[0]
    if top not in SOURCE_ROOTS:
        return None
    base = SOURCE_ROOTS[top].joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


@functools.cache
def imported_modules(name: str) -> frozenset[str]:
    """First-party modules that module ``name`` imports anywhere in its body (not under ``if TYPE_CHECKING``), or
    names as a whole string (``"pipelines.train_worker"``: a module it runs as a process)."""
    path = module_file(name)
    assert path is not None, name
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    skip: set[int] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if _is_type_checking(node):
            skip.update(id(child) for child in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.count(".") >= 1:
            found.add(node.value)
    return frozenset(m for m in found if m.split(".")[0] in FIRST_PARTY and module_file(m) is not None)


@functools.cache
def import_closure(entry: str) -> frozenset[Path]:
    """Source files of ``entry`` and every first-party module it reaches, parent packages' __init__.py included."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for k in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            parent = ".".join(parts[:k])
            if parent not in seen and module_file(parent) is not None:
                seen.add(parent)
                todo.append(parent)
        if name not in seen:
            seen.add(name)
        todo.extend(m for m in imported_modules(name) if m not in seen)
    return frozenset(module_file(m) for m in seen) - {None}  # type: ignore[return-value]


def code_problems(stage: Stage) -> list[str]:
    """What dvc.yaml gets wrong about ``stage``'s code: first-party source files it runs but does not list, and
    listed first-party source files it never runs."""
    needed = {str(p.relative_to(REPO)) for p in import_closure(stage.module)}
    listed = set(stage.deps)

    def covered(path: str) -> bool:
        return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in listed)

    problems = [f"{stage.name}: imports {path} but does not list it in deps" for path in sorted(needed)
                if not covered(path)]
    source_deps = {d for d in listed if d.endswith(".py")}
    problems += [f"{stage.name}: lists {path} in deps but never imports it" for path in sorted(source_deps - needed)]
    return problems


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
               if getattr(m, "__name__", "").startswith(FIRST_PARTY) and getattr(m, "load_params", None) is real_load]
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


def test_every_module_a_stage_runs_is_exactly_its_dependency_list() -> None:
    problems = [p for stage in dvc_stages() for p in code_problems(stage)]
    assert not problems, "dvc.yaml deps drifted from the code:\n" + "\n".join(problems)


def test_the_checkers_catch_the_drifts_they_exist_for() -> None:
    stages = {s.name: s for s in dvc_stages()}
    captioner = stages["train@video_captioning-gru"]
    assert "src/seqvision/vocab.py" in captioner.deps  # a fixed drift: test captions are decoded with it
    without = dataclasses.replace(captioner, deps=tuple(d for d in captioner.deps if d != "src/seqvision/vocab.py"))
    assert code_problems(without) == [
        "train@video_captioning-gru: imports src/seqvision/vocab.py but does not list it in deps"]
    train = stages["train@activity-lstm"]
    extra = dataclasses.replace(train, deps=(*train.deps, "src/seqvision/report.py"))
    assert code_problems(extra) == ["train@activity-lstm: lists src/seqvision/report.py in deps but never imports it"]
    # A training resized by a family-name budget would read that family's section too (the old match_params):
    reads = {"train.lr", "models.lstm.hidden_size", "models.transformer.hidden_size"}
    assert param_problems(dataclasses.replace(train, params=("train", "models.lstm")), reads) == [
        "train@activity-lstm: reads params.yaml models.transformer.hidden_size but does not list it in params"]
    assert param_problems(dataclasses.replace(train, params=("train", "models.lstm", "encoder")), reads - {
        "models.transformer.hidden_size"}) == ["train@activity-lstm: lists params.yaml encoder but never reads it"]


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
def test_every_param_a_stage_reads_is_exactly_its_params_list(tmp_path: Path, monkeypatch, prefect_harness) -> None:
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
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
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
