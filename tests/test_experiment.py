"""The train stage: seqvision.experiment on tiny fake artifacts, and pipelines.train (flow, MLflow, CLI)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import yaml

from seqvision import checkpoint, experiment, io, models, train
from seqvision.config import TASKS, EvaluateConfig, ModelsConfig, TrainConfig, check_names
from seqvision.tasks import task_spec
from tests.tiny import (
    TINY_CLASSES,
    TINY_DIM,
    TINY_IMAGE_IDS,
    TINY_MODELS,
    TINY_UNMATCHED,
    TINY_TRAIN,
    TINY_VIDEO_IDS,
    tiny_params,
)

CLASSES = TINY_CLASSES
DIM = TINY_DIM
PIXEL_DIM = 40  # a small_cnn's features: 8 colour slots of 4 values and 8 colour-blind values
VAL_ITEMS = {"videos": len(TINY_VIDEO_IDS["val"]), "images": len(TINY_IMAGE_IDS["val"])}
TRAIN_ITEMS = {"videos": len(TINY_VIDEO_IDS["train"]), "images": len(TINY_IMAGE_IDS["train"])}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded, and the test workers share the CPU (see pipelines.train --threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def artifacts(tiny_artifacts) -> dict[str, Path]:
    return {**tiny_artifacts._asdict(), "activity_dir": tiny_artifacts.labels}


def configs(**train_overrides) -> tuple[TrainConfig, ModelsConfig]:
    params = tiny_params(**train_overrides)
    return params.train, params.models


DECODING = EvaluateConfig(beam_size=2, max_length=10)


def train_one(task: str, family: str, *, models_config: ModelsConfig, lr: float | None = None,
              **kwargs) -> experiment.TrainSummary:
    """``experiment.run`` as the train stage calls it: the family's section (``lr`` overriding its learning rate),
    its task's budget, and for captioners the decoder."""
    section = models_config.family(family)
    if lr is not None:
        section = dataclasses.replace(section, lr=lr)
    return experiment.run(task, family, model_config=section, budget=models_config.match_params.budget(task),
                          decoding=None if task == "activity" else DECODING, **kwargs)


def load(task: str, artifacts: dict[str, Path]) -> experiment.TaskData:
    return experiment.load_task_data(task, features_dir=artifacts["features"], tokens_dir=artifacts["tokens"],
                                     activity_dir=artifacts["activity_dir"])


class RecordingTracker:
    """A TrackerLike that keeps what it is given."""

    run_id = "recording"

    def __init__(self) -> None:
        self.params: dict = {}
        self.epochs: list[tuple[int, dict]] = []
        self.artifacts: list[Path] = []

    def log_params(self, params) -> None:
        self.params.update(params)

    def set_tags(self, tags) -> None:
        pass

    def log_epoch(self, metrics, *, step: int) -> None:
        self.epochs.append((step, dict(metrics)))

    def log_steps(self, rows) -> None:
        for step, metrics in rows:
            self.log_epoch(metrics, step=step)

    def log_artifact(self, path, artifact_path=None) -> None:
        self.artifacts.append(Path(path))


def write_params(path: Path, **train_overrides) -> Path:
    path.write_text(yaml.safe_dump({"train": {**TINY_TRAIN, **train_overrides}, "models": TINY_MODELS | TINY_UNMATCHED}))
    return path


# --------------------------------------------------------------------------------------------------------
# seqvision.experiment


@pytest.mark.parametrize("task", TASKS)
def test_every_family_trains_and_writes_all_outputs(task, artifacts, tmp_path):
    data = load(task, artifacts)
    kind = task_spec(task).kind
    assert len(data.train) == TRAIN_ITEMS[kind] and len(data.val) == VAL_ITEMS[kind] and data.feature_dim == DIM
    train_config, models_config = configs()
    for family in experiment.FAMILIES:
        out = tmp_path / family
        summary = train_one(task, family, data=data, train_config=train_config, models_config=models_config,
                                 out_dir=out, log=lambda _: None)
        assert sorted(p.name for p in out.iterdir()) == sorted(experiment.OUTPUT_FILES)
        assert summary.epochs_run == 2 and summary.resumed_from_epoch == 0 and summary.device == "cpu"
        assert summary.metric == ("accuracy" if task == "activity" else "cider_d")
        assert summary.train_time_s > 0 and summary.samples_per_s > 0 and summary.peak_memory_mb > 0

        written = json.loads((out / "summary.json").read_text())
        assert written["num_parameters"] == summary.num_parameters and written["family"] == family
        curve = json.loads((out / "learning_curve.json").read_text())
        assert [sorted(row) for row in curve] == [["epoch", "train_loss", "val_loss", "val_metric"]] * 2
        assert [row["epoch"] for row in curve] == [1, 2]

        # best.pt alone rebuilds the model: same class, same size, same predictions as the weights it holds
        ckpt = checkpoint.load(out / "best.pt")
        assert (ckpt["spec"]["task"], ckpt["spec"]["family"]) == (task, family)
        assert ckpt["epoch"] == summary.best_epoch
        model = models.build_from_checkpoint(ckpt).eval()
        assert models.count_parameters(model) == summary.num_parameters
        visual = torch.from_numpy(np.load(artifacts["features"] / f"{kind}-val.npy"))
        lengths = torch.full((len(visual),), visual.shape[1])
        with torch.no_grad():
            if task == "activity":
                logits, _ = model(visual.float(), lengths)
                assert logits.shape == (VAL_ITEMS[kind], len(CLASSES))
            else:
                memory = model.encode(visual.float(), lengths)
                logits, _ = model.step(torch.ones(len(visual), dtype=torch.long), model.init_state(memory), memory)
                assert logits.shape == (VAL_ITEMS[kind], len(data.vocab))


def test_models_beat_what_an_input_blind_model_scores(artifacts, tmp_path):
    train_config, models_config = configs(epochs=20)
    models_config = dataclasses.replace(models_config, gru=dataclasses.replace(models_config.gru, lr=0.03),
                                        lstm=dataclasses.replace(models_config.lstm, lr=0.03))
    activity = train_one("activity", "gru", data=load("activity", artifacts), train_config=train_config,
                              models_config=models_config, out_dir=tmp_path / "a", log=lambda _: None)
    assert activity.input_blind_metric == pytest.approx(1 / 4)  # the val classes are balanced
    assert activity.best_val_metric == 1.0
    captions = train_one("video_captioning", "lstm", data=load("video_captioning", artifacts),
                              train_config=train_config, models_config=models_config, out_dir=tmp_path / "c",
                              log=lambda _: None)
    assert captions.input_blind_metric > 0  # the most frequent caption is right for a quarter of the items
    assert captions.best_val_metric > 1.8 * captions.input_blind_metric


def test_match_params_resizes_each_family_to_its_tasks_budget(artifacts):
    data = load("video_captioning", artifacts)
    _, models_config = configs()
    budget = 6000
    matched = dataclasses.replace(models_config, match_params=dataclasses.replace(
        models_config.match_params, video_captioning=budget))
    for family in ("gru", "transformer", "meanpool"):
        config = experiment.sized_config("video_captioning", family, matched.family(family),
                                         matched.match_params.budget("video_captioning"), data=data)
        assert config.hidden_size != models_config.family(family).hidden_size
        count = models.count_parameters(experiment.build("video_captioning", family, config, data=data))
        assert abs(count - budget) <= 0.1 * budget, family
    assert experiment.sized_config("video_captioning", "gru", models_config.gru, None, data=data) == models_config.gru
    assert matched.match_params.budget("activity") is None  # another task's budget is its own


def test_resume_after_a_kill_continues_from_last_pt_and_matches_an_uninterrupted_run(artifacts, tmp_path,
                                                                                      monkeypatch):
    data = load("video_captioning", artifacts)
    train_config, models_config = configs(epochs=3)
    kwargs = {"data": data, "train_config": train_config, "models_config": models_config, "log": lambda _: None}
    reference = train_one("video_captioning", "gru", out_dir=tmp_path / "reference", **kwargs)

    original, calls = train.train_one_epoch, []

    def killed_in_epoch_2(*args, **kw):
        calls.append(kw["epoch"])
        if kw["epoch"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kw)

    monkeypatch.setattr(train, "train_one_epoch", killed_in_epoch_2)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_one("video_captioning", "gru", out_dir=out, **kwargs)
    assert checkpoint.load(out / "last.pt")["epoch"] == 1
    monkeypatch.setattr(train, "train_one_epoch", original)

    (out / "best.pt").unlink()  # epoch 1 was the best so far: last.pt holds its weights
    notes: list[str] = []
    tracker = RecordingTracker()
    resumed = train_one("video_captioning", "gru", out_dir=out, tracker=tracker,
                             **{**kwargs, "log": notes.append})
    assert resumed.resumed_from_epoch == 1 and resumed.epochs_run == 3
    # the new run gets epoch 1 too (logged from the checkpoint's history), so its curve is complete
    assert sorted(step for step, metrics in tracker.epochs if "val_cider_d" in metrics and "val_loss" in metrics) \
        == [1, 2, 3]
    assert any("resuming" in n for n in notes)
    assert (out / "best.pt").is_file()
    last, ref = checkpoint.load(out / "last.pt"), checkpoint.load(tmp_path / "reference" / "last.pt")
    for name, tensor in ref["model"].items():  # CPU + deterministic: bit for bit the uninterrupted run
        assert torch.equal(last["model"][name], tensor), name
    assert resumed.best_val_metric == reference.best_val_metric


def test_changed_params_or_inputs_start_afresh(artifacts, tmp_path):
    data = load("activity", artifacts)
    train_config, models_config = configs()
    out = tmp_path / "out"
    train_one("activity", "lstm", data=data, train_config=train_config, models_config=models_config, out_dir=out,
                   log=lambda _: None)
    notes: list[str] = []
    again = train_one("activity", "lstm", data=data, train_config=train_config, models_config=models_config,
                           out_dir=out, log=notes.append)
    assert again.resumed_from_epoch == 2 and again.epochs_run == 2  # finished: nothing to do

    fresh = train_one("activity", "lstm", data=data, train_config=train_config, models_config=models_config, lr=0.02,
                           out_dir=out, log=notes.append)
    assert fresh.resumed_from_epoch == 0 and any("other params or inputs" in n for n in notes)

    # num_workers, device & co. do not change the maths: still resumable
    workers, _ = configs(log_every=2)
    assert train_one("activity", "lstm", data=data, train_config=workers, models_config=models_config, lr=0.02,
                          out_dir=out, log=notes.append).resumed_from_epoch == 2
    # and --no-resume always starts afresh
    assert train_one("activity", "lstm", data=data, train_config=workers, models_config=models_config, lr=0.02,
                          out_dir=out, resume=False, log=notes.append).resumed_from_epoch == 0


def test_changed_code_starts_afresh(artifacts, tmp_path, monkeypatch):
    """DVC reruns a training stage when its code changed and keeps its checkpoints (persist): a finished last.pt of
    the old code must not be resumed from, or the stage would hand back the old model under the new code."""
    data = load("activity", artifacts)
    train_config, models_config = configs()
    kwargs = {"data": data, "train_config": train_config, "models_config": models_config, "out_dir": tmp_path / "out"}
    train_one("activity", "lstm", log=lambda _: None, **kwargs)
    before = checkpoint.load(tmp_path / "out" / "last.pt")["fingerprint"]
    monkeypatch.setattr(experiment, "code_digest", lambda: "the code after an edit")
    notes: list[str] = []
    again = train_one("activity", "lstm", log=notes.append, **kwargs)
    assert again.resumed_from_epoch == 0 and again.epochs_run == 2
    assert any("written by other code" in n for n in notes)
    # the code is checked beside the checkpoints, not inside them: an edit elsewhere does not change their bytes
    assert checkpoint.load(tmp_path / "out" / "last.pt")["fingerprint"] == before
    assert json.loads((tmp_path / "out" / "runinfo.json").read_text())["code"] == "the code after an edit"


def test_bad_names_and_missing_inputs_give_clear_errors(artifacts, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'captioning'; expected one of activity, image_captioning"):
        check_names("captioning", "lstm")
    with pytest.raises(ValueError, match="unknown model family 'cnn'; expected one of rnn, lstm, gru, transformer"):
        check_names("activity", "cnn")
    with pytest.raises(FileNotFoundError, match="videos-train.npy: no such feature array; run the features"):
        experiment.load_task_data("activity", features_dir=tmp_path, activity_dir=artifacts["activity_dir"])
    with pytest.raises(ValueError, match="needs the tokenized captions"):
        experiment.load_task_data("video_captioning", features_dir=artifacts["features"])


# --------------------------------------------------------------------------------------------------------
# pipelines.train: CLI errors (before Prefect starts) and the flow with MLflow


def test_cli_errors_are_one_line_with_exit_2(artifacts, tmp_path, capsys):
    from pipelines import train as stage

    params = write_params(tmp_path / "params.yaml")
    common = ["--params", str(params), "--features", str(artifacts["features"]), "--tokens", str(artifacts["tokens"]),
              "--activity-dir", str(artifacts["activity_dir"]), "--out", str(tmp_path / "out")]
    cases = {
        ("--task", "activities", "--model", "lstm"): "argument --task: invalid choice: 'activities'",
        ("--task", "activity", "--model", "LSTM"): "argument --model: invalid choice: 'LSTM'",
    }
    for args, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            stage.main([*args, *common])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.strip().splitlines()[-1].startswith("python -m pipelines.train: error:")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"epochs": 0}}))
    assert stage.main(["--task", "activity", "--model", "gru", *common, "--params", str(bad)]) == 2
    assert "train.epochs: expected a value in [1, 10000]" in capsys.readouterr().err
    assert stage.main(["--task", "image_captioning", "--model", "gru", *common[:4],
                       "--tokens", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "image/vocab.json: no such file" in capsys.readouterr().err


@pytest.fixture
def mlflow_env(tmp_path, monkeypatch, mlflow_store):
    for key in ("MLFLOW_RUN_ID", "SEQVISION_PARENT_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    uri = mlflow_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.mark.slow
def test_flow_trains_every_seed_in_parallel_under_one_child_run_and_marks_failures(artifacts, tmp_path, mlflow_env,
                                                                                   prefect_harness):
    from pipelines import train as stage

    client = mlflow_env
    params = write_params(tmp_path / "params.yaml", seeds=2)
    raw = yaml.safe_load(params.read_text())
    raw["data"] = {"activity_dir": str(artifacts["activity_dir"])}
    params.write_text(yaml.safe_dump(raw))
    common = {"params_path": str(params), "features": str(artifacts["features"]),
              "tokens": str(artifacts["tokens"]), "repo_root": str(tmp_path), "parallel": 2}
    first = stage.train_flow("activity", "gru", out=str(tmp_path / "a"), **common)
    second = stage.train_flow("video_captioning", "transformer", out=str(tmp_path / "v"), **common)  # own call

    # every seed trained into train/seed{k} and was evaluated into test/seed{k}; metrics.json aggregates them
    for out in (tmp_path / "a", tmp_path / "v"):
        assert sorted(p.name for p in (out / "train").iterdir()) == ["seed0", "seed1"]
        assert sorted(p.name for p in (out / "test").iterdir()) == ["seed0", "seed1"]
        assert (out / "train" / "seed1" / "best.pt").is_file() and (out / "test" / "seed1" / "metrics.json").is_file()
    seed_values = [json.loads((tmp_path / "a" / "test" / f"seed{k}" / "metrics.json").read_text())["top_1"]
                   for k in range(2)]
    assert first["top_1"]["seeds"] == seed_values and first["num_seeds"] == 2
    assert first["top_1"]["mean"] == pytest.approx(sum(seed_values) / 2)
    seeds_trained = [s["seed"] for s in json.loads((tmp_path / "a" / "summary.json").read_text())["seeds"]]
    assert seeds_trained == [TrainConfig().seed, TrainConfig().seed + 1]  # train.seed + k
    assert "cider_d" in second and len(second["cider_d"]["seeds"]) == 2

    summaries = [io.read_runinfo(tmp_path / name) for name in ("a", "v")]  # the run ids: runinfo.json
    parent = (tmp_path / ".seqvision" / "parent_run_id").read_text().strip()
    assert summaries[0]["mlflow_parent_run_id"] == summaries[1]["mlflow_parent_run_id"] == parent
    assert client.get_run(parent).info.status == "RUNNING"  # the report stage ends it
    assert client.get_run(parent).info.run_name == "comparison"
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert {r.info.run_name for r in children} == {"activity-gru", "video_captioning-transformer"}
    run = client.get_run(summaries[1]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["models.transformer.lr"] == str(TINY_MODELS["transformer"]["lr"])
    assert run.data.params["train.seeds"] == "2"
    assert run.data.params["num_parameters"] == str(second["num_parameters"])
    assert run.data.tags["seqvision.device"] == "cpu" and "seqvision.torch_version" in run.data.tags
    assert "seqvision.params_hash" in run.data.tags and "seqvision.git_commit" in run.data.tags
    for k in range(2):  # every seed's learning curve, and its test score
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"seed{k}/val_cider_d")] == [1, 2]
        assert run.data.metrics[f"test/cider_d/seed{k}"] == pytest.approx(second["cider_d"]["seeds"][k])
    assert run.data.metrics["test/cider_d"] == pytest.approx(second["cider_d"]["mean"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"summary.json", "metrics.json"}

    # a seed that fails fails the stage, marks its child FAILED, under the same (still RUNNING) parent
    empty = tmp_path / "no-features"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="seed 0 exited with status 2"):
        stage.train_flow("activity", "lstm", out=str(tmp_path / "f"), **{**common, "features": str(empty)})
    failed = client.search_runs([client.get_run(parent).info.experiment_id],
                                filter_string="attributes.run_name = 'activity-lstm'")
    assert [r.info.status for r in failed] == ["FAILED"]
    assert failed[0].data.tags["mlflow.parentRunId"] == parent

    # once the parent has ended, the next training starts a new comparison
    client.set_terminated(parent)
    stage.train_flow("activity", "meanpool", out=str(tmp_path / "m"), **{**common, "parallel": 1})
    third = io.read_runinfo(tmp_path / "m")
    assert third["mlflow_parent_run_id"] != parent
    assert (tmp_path / ".seqvision" / "parent_run_id").read_text().strip() == third["mlflow_parent_run_id"]


def test_finetune_encoder_trains_the_encoder_with_the_model_from_pixels(artifacts, tmp_path, prefect_harness):
    from pipelines import train as stage
    from seqvision.encoders import SmallCNN, SmallCNNConfig, encoder_state

    frames = artifacts["frames"]
    encoder = SmallCNN(SmallCNNConfig(feature_dim=PIXEL_DIM, grid=2, width=4, slot_dim=4))
    torch.save(encoder_state(encoder), tmp_path / "encoder.pt")
    params = write_params(tmp_path / "params.yaml", epochs=1)
    raw = yaml.safe_load(params.read_text())
    raw["train"]["finetune_encoder"] = True
    params.write_text(yaml.safe_dump(raw))

    raw["data"] = {"activity_dir": str(artifacts["activity_dir"])}
    params.write_text(yaml.safe_dump(raw))
    summary = stage.train_flow("activity", "gru", out=str(tmp_path / "out"), params_path=str(params),
                               features=str(artifacts["features"]), frames=str(frames),
                               encoder=str(tmp_path / "encoder.pt"), tracking=False)
    best = checkpoint.load(tmp_path / "out" / "train" / "seed0" / "best.pt")
    assert "encoder" in best["spec"]  # the checkpoint says which encoder it fine-tuned (weights in "model")
    rebuilt = models.build_from_checkpoint(best)
    assert isinstance(rebuilt, models.PixelModel)
    before = dict(encoder.state_dict())
    after = rebuilt.pixels.encoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    assert summary["num_parameters"] == models.count_parameters(rebuilt)
    assert summary["num_parameters"] > models.count_parameters(rebuilt.model)  # the encoder's weights count too

    # missing --frames/--encoder with the knob on: one clean line, exit 2
    code = stage.main(["--task", "activity", "--model", "gru", "--params", str(params), "--features",
                       str(artifacts["features"]), "--activity-dir", str(artifacts["activity_dir"]), "--out",
                       str(tmp_path / "x"), "--no-tracking"])
    assert code == 2 and not (tmp_path / "x").exists()


def test_a_different_starting_encoder_is_a_different_training():
    from seqvision.encoders import SmallCNN, SmallCNNConfig

    train_config, models_config = configs()
    args = ("activity", "gru", models_config.gru, train_config, [])  # type: ignore[var-annotated]
    first, second = (SmallCNN(SmallCNNConfig(feature_dim=PIXEL_DIM, grid=2, width=4, slot_dim=4)) for _ in range(2))
    with torch.no_grad():
        second.project[0].weight.add_(1.0)
    assert experiment.fingerprint(*args) != experiment.fingerprint(*args, encoder=first)
    assert experiment.fingerprint(*args, encoder=first) != experiment.fingerprint(*args, encoder=second)
    assert experiment.fingerprint(*args, encoder=first) == experiment.fingerprint(*args, encoder=first)


def test_the_same_seed_twice_is_identical_and_two_seeds_differ(artifacts, tmp_path):
    data = load("activity", artifacts)
    weights = {}
    for name, seed in (("first", 0), ("again", 0), ("other", 1)):
        train_config, models_config = configs(epochs=1, seed=seed)
        train_one("activity", "gru", data=data, train_config=train_config, models_config=models_config,
                  out_dir=tmp_path / name, log=lambda _: None)
        weights[name] = checkpoint.load(tmp_path / name / "last.pt")["model"]
    assert all(torch.equal(weights["first"][k], weights["again"][k]) for k in weights["first"])
    assert not all(torch.equal(weights["first"][k], weights["other"][k]) for k in weights["first"])


REPO = Path(__file__).resolve().parents[1]
_STAGE_PROCESS = """
import json, sys
from pipelines import train
from seqvision import config, results, runtime

train.check_nproc(1, config.TrainConfig(device="auto"))
slots = runtime.parallel_slots(3, device="auto", per_core=2)
print(json.dumps({"torch": "torch" in sys.modules, "driver": runtime.gpu_driver_present(), "slots": len(slots)}))
"""


def test_the_train_stage_process_plans_its_seeds_without_torch():
    # The seeds train in the fork server's children; the stage's own process imported torch only to plan them and to
    # tag the run: about 1.3 s of CPU per train stage (18 in the demo). Without a GPU driver it now needs none.
    out = subprocess.run([sys.executable, "-c", _STAGE_PROCESS], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout
    planned = json.loads(out)
    assert planned["slots"] >= 1
    assert planned["torch"] is planned["driver"]  # torch is asked only where a GPU driver might give it a device


def test_check_nproc_names_what_cannot_share_the_work(monkeypatch):
    from pipelines import train as stage
    from seqvision.config import ConfigError

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device 'cuda' requested, but no CUDA device is visible"):
            stage.check_nproc(1, TrainConfig(device="cuda"))
    monkeypatch.setattr(stage, "visible_gpus", lambda device="auto": [] if device == "cpu" else ["0"])  # one GPU
    with pytest.raises(ConfigError, match="--nproc-per-node 2 but only 1 GPU"):
        stage.check_nproc(2, TrainConfig(device="auto", batch_size=8))
    with pytest.raises(ConfigError, match="must divide by --nproc-per-node"):
        stage.check_nproc(3, TrainConfig(device="cpu", batch_size=8))
    stage.check_nproc(2, TrainConfig(device="cpu", batch_size=8))  # gloo on CPU: any number of ranks


def test_a_forked_seed_worker_writes_the_bytes_of_a_fresh_interpreter(artifacts, tmp_path):
    """The stage forks its seeds from a fork server that has their imports done (pipelines.seed_server): a forked
    seed writes, byte for byte, the files of ``python -m pipelines.train_worker`` in a fresh interpreter, and its
    output lines and exit status reach the stage as a subprocess's do (a bad input: status 2, one error line)."""
    from pipelines import seed_server
    from pipelines import train as stage

    params = write_params(tmp_path / "params.yaml", seeds=1, epochs=2)
    args = ["--task", "video_captioning", "--model", "gru", "--params", str(params), "--seed-index", "0",
            "--features", str(artifacts["features"]), "--tokens", str(artifacts["tokens"]), "--no-tracking",
            "--no-progress", "--threads", "1"]
    env = stage.worker_env(None)
    lines: list[str] = []
    status, _ = stage.stream(seed_server.ForkedWorker([*args, "--out", str(tmp_path / "forked")], env),
                             log=lines.append)
    assert status == 0 and any("train_worker: video_captioning/gru seed 0: val cider_d" in line for line in lines)
    # What a GPU seed gets: a fresh interpreter (fork=False)
    fresh_status, fresh_tail = stage.stream(stage.start_worker(1, [*args, "--out", str(tmp_path / "fresh")], env,
                                                               fork=False), log=lambda _: None)
    assert fresh_status == 0, fresh_tail

    def files(root: Path) -> dict[str, bytes]:  # runinfo.json holds the timings, which differ between any two runs
        return {str(p.relative_to(root)): p.read_bytes().replace(str(root).encode(), b"OUT")
                for p in sorted(root.rglob("*")) if p.is_file() and p.name != io.RUNINFO}

    forked, fresh_files = files(tmp_path / "forked"), files(tmp_path / "fresh")
    assert "train/seed0/best.pt" in forked and "test/seed0/predictions.jsonl" in forked
    assert forked.keys() == fresh_files.keys()
    assert [name for name in forked if forked[name] != fresh_files[name]] == []

    status, tail = stage.stream(seed_server.ForkedWorker(
        [*args, "--features", str(tmp_path / "no-features"), "--out", str(tmp_path / "bad")], env), log=lines.append)
    assert status == 2 and "train_worker: error:" in tail and "no-features" in tail


def test_a_corrupt_checkpoint_is_never_resumed_from_nor_kept(artifacts, tmp_path):
    data = load("activity", artifacts)
    notes: list[str] = []
    kwargs = {"data": data, "log": notes.append, "out_dir": tmp_path}
    train_config, models_config = configs(epochs=2)
    train_one("activity", "gru", train_config=train_config, models_config=models_config, **kwargs)
    more = train_config  # the same params: a verified last.pt is resumable

    # best.pt damaged while the last epoch was the best one: restored from last.pt, training continues.
    best = checkpoint.load(tmp_path / "best.pt")
    last = checkpoint.load(tmp_path / "last.pt")
    if best["epoch"] == last["epoch"]:
        (tmp_path / "best.pt").write_bytes((tmp_path / "best.pt").read_bytes()[:1000])
        summary = train_one("activity", "gru", train_config=more, models_config=models_config, **kwargs)
        assert summary.resumed_from_epoch == 2 and any("restored from" in n for n in notes), notes
        checkpoint.load(tmp_path / "best.pt")  # verifies

    # last.pt damaged: named, not resumed from; the run starts afresh and leaves verified checkpoints only.
    notes.clear()
    raw = bytearray((tmp_path / "last.pt").read_bytes())
    weights = next(t for t in checkpoint.load(tmp_path / "last.pt")["model"].values() if t.numel() >= 16)
    at = bytes(raw).index(weights.numpy().tobytes())  # a bit flip inside the stored weights
    raw[at + 5] ^= 0x01
    (tmp_path / "last.pt").write_bytes(bytes(raw))
    summary = train_one("activity", "gru", train_config=more, models_config=models_config, **kwargs)
    assert not summary.resumed_from_epoch
    assert any(str(tmp_path / "last.pt") in n and "starting afresh" in n for n in notes), notes
    checkpoint.load(tmp_path / "last.pt"), checkpoint.load(tmp_path / "best.pt")
