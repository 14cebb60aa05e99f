"""The train stage: seqvision.experiment on tiny fake artifacts, and pipelines.train (flow, MLflow, CLI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import yaml

from seqvision import experiment, models, train
from seqvision.config import ModelsConfig, TokenizeConfig, TrainConfig, from_mapping
from seqvision.vocab import tokenize_corpus, write_corpus

CLASSES = ("red", "green", "blue")
FRAMES, GRID, DIM = 4, 4, 8
PIXEL_DIM = 40  # a small_cnn's features: 8 colour slots of 4 values and 8 colour-blind values
SPLITS = {"train": 18, "val": 6}

TINY_MODELS = {
    "rnn": {"hidden_size": 16, "embed_size": 8},
    "lstm": {"hidden_size": 16, "embed_size": 8},
    "gru": {"hidden_size": 16, "embed_size": 8},
    "transformer": {"hidden_size": 16, "num_heads": 2, "num_layers": 1, "ffn_mult": 2},
    "meanpool": {"hidden_size": 16, "embed_size": 8},
}
TINY_TRAIN = {"epochs": 2, "batch_size": 6, "lr": 0.01, "num_workers": 0, "log_every": 1, "device": "cpu",
              "patience": 0}


class Record(NamedTuple):
    id: str
    split: str
    captions: tuple[str, ...]


def label_of(index: int) -> int:
    return index % len(CLASSES)


def make_artifacts(root: Path) -> dict[str, Path]:
    """features/ (index.json + float16 arrays), tokens/{video,image}/, ucf101/ lists: item i of a split has class
    ``i % 3``, a feature that says so in dimension ``class`` (rising over a clip's frames), and captions naming the
    class's colour."""
    features, tokens, ucf = root / "features", root / "tokens", root / "ucf101"
    for folder in (features, ucf):
        folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    index: dict[str, list[dict]] = {"videos": [], "images": []}
    records: dict[str, list[Record]] = {"video": [], "image": []}
    lists = {"train": [], "val": []}
    offset = 0
    for split, n in SPLITS.items():
        labels = np.array([label_of(i) for i in range(n)])
        signal = np.eye(DIM, dtype=np.float32)[labels]  # (n, D)
        for kind, width in (("videos", FRAMES), ("images", GRID)):
            # Clips: the class's dimension rises over time (the activity models see the change, rnn.center_clip;
            # the captioners also its mean); images: a constant signal.
            ramp = np.linspace(0.0, 2.0, width, dtype=np.float32) if kind == "videos" else np.ones(width, np.float32)
            array = 0.1 * rng.standard_normal((n, width, DIM)).astype(np.float32) + signal[:, None, :] * ramp[None, :, None]
            np.save(features / f"{kind}-{split}.npy", array.astype(np.float16))
            stem = "video" if kind == "videos" else "image"
            for row in range(n):
                entry = {"id": f"{stem}{offset + row}", "split": split, "shard": 0, "row": row}
                index[kind].append({**entry, "num_valid": FRAMES - row % 2} if kind == "videos" else entry)
        for row, label in enumerate(labels):
            colour = CLASSES[label]
            caps = (f"a {colour} shape moves", f"the {colour} shape is moving")
            records["video"].append(Record(f"video{offset + row}", split, caps))
            records["image"].append(Record(f"image{offset + row}", split, (f"a {colour} shape", f"one {colour} shape")))
            lists[split].append(f"video{offset + row}.mp4 {label + 1}")
        offset += n
    (features / "index.json").write_text(json.dumps(index))
    for corpus, recs in records.items():
        write_corpus(tokenize_corpus(recs, TokenizeConfig(min_count=1)), tokens / corpus)
    (ucf / "classInd.txt").write_text("".join(f"{i + 1} {name}\n" for i, name in enumerate(CLASSES)))
    (ucf / "trainlist01.txt").write_text("\n".join(lists["train"]) + "\n")
    (ucf / "vallist01.txt").write_text("\n".join(lists["val"]) + "\n")
    (ucf / "testlist01.txt").write_text("")
    return {"features": features, "tokens": tokens, "activity_dir": ucf}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded, and the test workers share the CPU (see pipelines.train --threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    return make_artifacts(tmp_path_factory.mktemp("artifacts"))


def configs(**train_overrides) -> tuple[TrainConfig, ModelsConfig]:
    return (from_mapping(TrainConfig, {**TINY_TRAIN, **train_overrides}, where="train"),
            from_mapping(ModelsConfig, TINY_MODELS, where="models"))


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

    def log_artifact(self, path, artifact_path=None) -> None:
        self.artifacts.append(Path(path))


def write_params(path: Path, **train_overrides) -> Path:
    path.write_text(yaml.safe_dump({"train": {**TINY_TRAIN, **train_overrides}, "models": TINY_MODELS}))
    return path


# --------------------------------------------------------------------------------------------------------
# seqvision.experiment


@pytest.mark.parametrize("task", experiment.TASKS)
def test_every_family_trains_and_writes_all_outputs(task, artifacts, tmp_path):
    data = load(task, artifacts)
    assert len(data.train) == SPLITS["train"] and len(data.val) == SPLITS["val"] and data.feature_dim == DIM
    train_config, models_config = configs()
    for family in experiment.FAMILIES:
        out = tmp_path / family
        summary = experiment.run(task, family, data=data, train_config=train_config, models_config=models_config,
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
        ckpt = train.load_checkpoint(out / "best.pt")
        assert (ckpt["task"], ckpt["family"]) == (task, family) and ckpt["epoch"] == summary.best_epoch
        model = models.build_from_checkpoint(ckpt).eval()
        assert models.count_parameters(model) == summary.num_parameters
        visual = torch.from_numpy(np.load(artifacts["features"] / f"{experiment._visual_kind(task)}-val.npy"))
        lengths = torch.full((len(visual),), visual.shape[1])
        with torch.no_grad():
            if task == "activity":
                logits, _ = model(visual.float(), lengths)
                assert logits.shape == (SPLITS["val"], len(CLASSES))
            else:
                memory = model.encode(visual.float(), lengths)
                logits, _ = model.step(torch.ones(len(visual), dtype=torch.long), model.init_state(memory), memory)
                assert logits.shape == (SPLITS["val"], len(data.vocab))


def test_models_beat_their_trivial_baselines(artifacts, tmp_path):
    train_config, models_config = configs(epochs=20, lr=0.03)
    activity = experiment.run("activity", "gru", data=load("activity", artifacts), train_config=train_config,
                              models_config=models_config, out_dir=tmp_path / "a", log=lambda _: None)
    assert activity.trivial_baseline == pytest.approx(1 / 3)  # the classes are balanced
    assert activity.best_val_metric == 1.0
    captions = experiment.run("image_captioning", "lstm", data=load("image_captioning", artifacts),
                              train_config=train_config, models_config=models_config, out_dir=tmp_path / "c",
                              log=lambda _: None)
    assert captions.trivial_baseline > 0  # "a <colour> shape" is right for a third of the items
    assert captions.best_val_metric > 2.5 * captions.trivial_baseline  # every caption right: 3x


def test_match_params_resizes_to_the_reference_family(artifacts):
    data = load("video_captioning", artifacts)
    _, models_config = configs()
    matched = ModelsConfig(**{**models_config.__dict__, "match_params": "transformer"})
    budget = models.count_parameters(experiment.build("video_captioning", "transformer",
                                                      experiment.model_config("video_captioning", "transformer",
                                                                              matched, data=data), data=data))
    config = experiment.model_config("video_captioning", "gru", matched, data=data)
    assert config.hidden_size != models_config.gru.hidden_size
    count = models.count_parameters(experiment.build("video_captioning", "gru", config, data=data))
    assert abs(count - budget) <= 0.1 * budget
    assert experiment.model_config("video_captioning", "gru", models_config, data=data) == models_config.gru


def test_resume_after_a_kill_continues_from_last_pt_and_matches_an_uninterrupted_run(artifacts, tmp_path,
                                                                                      monkeypatch):
    data = load("video_captioning", artifacts)
    train_config, models_config = configs(epochs=3)
    kwargs = {"data": data, "train_config": train_config, "models_config": models_config, "log": lambda _: None}
    reference = experiment.run("video_captioning", "gru", out_dir=tmp_path / "reference", **kwargs)

    original, calls = train.train_one_epoch, []

    def killed_in_epoch_2(*args, **kw):
        calls.append(kw["epoch"])
        if kw["epoch"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kw)

    monkeypatch.setattr(train, "train_one_epoch", killed_in_epoch_2)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        experiment.run("video_captioning", "gru", out_dir=out, **kwargs)
    assert train.load_checkpoint(out / "last.pt")["epoch"] == 1
    monkeypatch.setattr(train, "train_one_epoch", original)

    (out / "best.pt").unlink()  # epoch 1 was the best so far: last.pt holds its weights
    notes: list[str] = []
    tracker = RecordingTracker()
    resumed = experiment.run("video_captioning", "gru", out_dir=out, tracker=tracker,
                             **{**kwargs, "log": notes.append})
    assert resumed.resumed_from_epoch == 1 and resumed.epochs_run == 3
    # the new run gets epoch 1 too (logged from the checkpoint's history), so its curve is complete
    assert sorted(step for step, metrics in tracker.epochs if "val_cider_d" in metrics and "val_loss" in metrics) \
        == [1, 2, 3]
    assert any("resuming" in n for n in notes)
    assert (out / "best.pt").is_file()
    last, ref = train.load_checkpoint(out / "last.pt"), train.load_checkpoint(tmp_path / "reference" / "last.pt")
    for name, tensor in ref["model"].items():  # CPU + deterministic: bit for bit the uninterrupted run
        assert torch.equal(last["model"][name], tensor), name
    assert resumed.best_val_metric == reference.best_val_metric


def test_changed_params_or_inputs_start_afresh(artifacts, tmp_path):
    data = load("activity", artifacts)
    train_config, models_config = configs()
    out = tmp_path / "out"
    experiment.run("activity", "lstm", data=data, train_config=train_config, models_config=models_config, out_dir=out,
                   log=lambda _: None)
    notes: list[str] = []
    again = experiment.run("activity", "lstm", data=data, train_config=train_config, models_config=models_config,
                           out_dir=out, log=notes.append)
    assert again.resumed_from_epoch == 2 and again.epochs_run == 2  # finished: nothing to do

    changed, _ = configs(lr=0.02)
    fresh = experiment.run("activity", "lstm", data=data, train_config=changed, models_config=models_config,
                           out_dir=out, log=notes.append)
    assert fresh.resumed_from_epoch == 0 and any("other params or inputs" in n for n in notes)

    # num_workers, device & co. do not change the maths: still resumable
    workers, _ = configs(lr=0.02, log_every=2)
    assert experiment.run("activity", "lstm", data=data, train_config=workers, models_config=models_config,
                          out_dir=out, log=notes.append).resumed_from_epoch == 2
    # and --no-resume always starts afresh
    assert experiment.run("activity", "lstm", data=data, train_config=workers, models_config=models_config,
                          out_dir=out, resume=False, log=notes.append).resumed_from_epoch == 0


def test_bad_names_and_missing_inputs_give_clear_errors(artifacts, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'captioning'; expected one of activity, image_captioning"):
        experiment.check_names("captioning", "lstm")
    with pytest.raises(ValueError, match="unknown model 'cnn'; expected one of rnn, lstm, gru, transformer"):
        experiment.check_names("activity", "cnn")
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
        ("--task", "activities", "--model", "lstm"): "unknown task 'activities'",
        ("--task", "activity", "--model", "LSTM"): "unknown model 'LSTM'",
    }
    for args, message in cases.items():
        assert stage.main([*args, *common]) == 2
        err = capsys.readouterr().err
        assert err.startswith("train: error: ") and message in err and err.count("\n") == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"epochs": 0}}))
    assert stage.main(["--task", "activity", "--model", "gru", *common, "--params", str(bad)]) == 2
    assert "train.epochs: expected a value in [1, 10000]" in capsys.readouterr().err
    assert stage.main(["--task", "image_captioning", "--model", "gru", *common[:4],
                       "--tokens", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "image/vocab.json: no such file" in capsys.readouterr().err


@pytest.fixture
def mlflow_env(tmp_path, monkeypatch):
    for key in ("MLFLOW_RUN_ID", "SEQVISION_PARENT_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.slow
def test_flow_runs_are_children_of_one_parent_and_failures_are_marked(artifacts, tmp_path, mlflow_env,
                                                                      prefect_harness, monkeypatch):
    from pipelines import train as stage

    client = mlflow_env
    params = write_params(tmp_path / "params.yaml")
    common = {"params": str(params), "features": str(artifacts["features"]), "tokens": str(artifacts["tokens"]),
              "activity_dir": str(artifacts["activity_dir"]), "repo_root": str(tmp_path)}
    first = stage.train_flow("activity", "gru", out=str(tmp_path / "a"), **common)
    second = stage.train_flow("video_captioning", "transformer", out=str(tmp_path / "v"), **common)  # own call

    parent = (tmp_path / ".seqvision" / "parent_run_id").read_text().strip()
    assert first["mlflow_parent_run_id"] == second["mlflow_parent_run_id"] == parent
    assert client.get_run(parent).info.status == "RUNNING"  # the report stage ends it
    assert client.get_run(parent).info.run_name == "comparison"
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert {r.info.run_name for r in children} == {"activity-gru", "video_captioning-transformer"}
    run = client.get_run(second["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["model.hidden_size"] == "16"
    assert run.data.params["num_parameters"] == str(second["num_parameters"])
    assert run.data.tags["seqvision.device"] == "cpu" and "seqvision.torch_version" in run.data.tags
    assert "seqvision.params_hash" in run.data.tags and "seqvision.git_commit" in run.data.tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_cider_d")] == [1, 2]
    assert run.data.metrics["best_val_cider_d"] == pytest.approx(second["best_val_metric"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"best.pt", "config.json", "summary.json",
                                                                        "history.json"}

    # a training that fails marks its child FAILED and lands under the same (still RUNNING) parent
    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(train, "train_one_epoch", broken)
    with pytest.raises(RuntimeError, match="simulated crash"):
        stage.train_flow("activity", "lstm", out=str(tmp_path / "f"), **common)
    failed = client.search_runs([client.get_run(parent).info.experiment_id],
                                filter_string="attributes.run_name = 'activity-lstm'")
    assert [r.info.status for r in failed] == ["FAILED"]
    assert failed[0].data.tags["mlflow.parentRunId"] == parent

    # once the parent has ended, the next training starts a new comparison
    monkeypatch.undo()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.set_terminated(parent)
    third = stage.train_flow("activity", "meanpool", out=str(tmp_path / "m"), **common)
    assert third["mlflow_parent_run_id"] != parent
    assert (tmp_path / ".seqvision" / "parent_run_id").read_text().strip() == third["mlflow_parent_run_id"]



def make_frames(root: Path, artifacts: dict[str, Path]) -> Path:
    """A frame folder with the same items as the tiny features: uint8 clips (n, FRAMES, 16, 16, 3) whose
    brightness encodes the class, one shard per kind and split."""
    frames = root / "frames"
    frames.mkdir()
    index = json.loads((artifacts["features"] / "index.json").read_text())
    for split, n in SPLITS.items():
        labels = np.array([label_of(i) for i in range(n)])
        clips = np.broadcast_to((40 + 80 * labels).astype(np.uint8)[:, None, None, None, None], (n, FRAMES, 16, 16, 3))
        np.save(frames / f"videos-{split}-000.npy", np.ascontiguousarray(clips))
    (frames / "index.json").write_text(json.dumps({"videos": index["videos"], "images": []}))
    return frames


def test_finetune_encoder_trains_the_encoder_with_the_model_from_pixels(artifacts, tmp_path, prefect_harness):
    from pipelines import train as stage
    from seqvision.encoders import SmallCNN, SmallCNNConfig, encoder_state

    frames = make_frames(tmp_path, artifacts)
    encoder = SmallCNN(SmallCNNConfig(feature_dim=PIXEL_DIM, grid=2, width=4, slot_dim=4))
    torch.save(encoder_state(encoder), tmp_path / "encoder.pt")
    params = write_params(tmp_path / "params.yaml", epochs=1)
    raw = yaml.safe_load(params.read_text())
    raw["encoder"] = {"finetune_encoder": True, "feature_dim": PIXEL_DIM, "slot_dim": 4}
    params.write_text(yaml.safe_dump(raw))

    summary = stage.train_flow("activity", "gru", out=str(tmp_path / "out"), params=str(params),
                               features=str(artifacts["features"]), activity_dir=str(artifacts["activity_dir"]),
                               frames=str(frames), encoder=str(tmp_path / "encoder.pt"), tracking=False)
    best = torch.load(tmp_path / "out" / "best.pt", map_location="cpu", weights_only=False)
    assert "encoder" in best  # the checkpoint carries its own (fine-tuned) encoder
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
    args = ("activity", "gru", models_config.gru, train_config, [])
    first, second = (SmallCNN(SmallCNNConfig(feature_dim=PIXEL_DIM, grid=2, width=4, slot_dim=4)) for _ in range(2))
    with torch.no_grad():
        second.project[0].weight.add_(1.0)
    assert experiment.fingerprint(*args) != experiment.fingerprint(*args, encoder=first)
    assert experiment.fingerprint(*args, encoder=first) != experiment.fingerprint(*args, encoder=second)
    assert experiment.fingerprint(*args, encoder=first) == experiment.fingerprint(*args, encoder=first)
