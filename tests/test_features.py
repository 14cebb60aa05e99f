"""seqvision.features and pipelines.features on the tiny synthetic preset: targets replay the metadata, the encoder
trains on the train split only, feature arrays keep the frame shards' row order, the flows run end to end, and
small_cnn without metadata fails with a clear message."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipelines import features as features_cli
from seqvision import annotations, frames
from seqvision import features as F
from seqvision.config import SYNTH_PRESETS, EncoderConfig, ExtractConfig, SynthConfig, from_mapping
from seqvision.datasets import VisualStore
from seqvision.encoders import RandomWeightsWarning, build_encoder, encoder_from_checkpoint, extract_features
from seqvision.synth import items
from seqvision.synth.events import clip_states
from seqvision.synth.generate import generate

torch.set_num_threads(1)

TINY_ENCODER = {"feature_dim": 16, "epochs": 1, "frames_per_clip": 2, "batch_size": 16}


def tiny_synth_config() -> SynthConfig:
    return from_mapping(SynthConfig, {**SYNTH_PRESETS["tiny"], "workers": 1}, where="synth")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The tiny preset (24/8/8 clips and images) generated and extracted: 6 frames per clip, shards of 5 items
    (so every split spans several shards)."""
    root = tmp_path_factory.mktemp("tiny")
    data = root / "data"
    generate(tiny_synth_config(), data, progress=False)
    notes = data / "annotations"
    videos = annotations.load_video_records(video_dir=data / "videos", video_captions=notes / "msrvtt.json")
    images = annotations.load_image_records(image_dir=data / "images", image_captions_dir=notes / "coco")
    config = dataclasses.replace(ExtractConfig(), num_frames=6, shard_size=5, workers=1)
    frames.extract(videos, images, root / "frames", config=config, progress=False)
    return {"root": root, "data": data, "metadata": notes / "metadata.json", "frames": root / "frames"}


def encoder_config(**over) -> EncoderConfig:
    return dataclasses.replace(EncoderConfig(), **{**TINY_ENCODER, **over})


# --------------------------------------------------------------------------------------------------------
# Targets


def test_video_objects_replay_the_generator_timeline(tiny):
    """Reconstructed per-frame states equal the generator's own (up to the metadata's rounding)."""
    config = tiny_synth_config()
    metadata = F.load_metadata(tiny["metadata"])
    for key in items.item_keys(config, "video"):
        truth = clip_states(items.video_spec(config, key))
        for frame, states in enumerate(truth):
            views = F.video_objects(metadata["videos"][key.id], frame)
            got = np.array([(v.x, v.y, v.radius, v.angle, v.alpha) for v in views])
            want = np.array([(s.x, s.y, s.radius, s.angle, s.alpha) for s in states])
            np.testing.assert_allclose(got, want, atol=0.06, err_msg=f"{key.id} frame {frame}")


def hand_clip() -> dict:
    """A 12-frame clip: a red square appears over frames 0-3 (hidden before), then a blue circle moves right."""
    def state(x, y, alpha=1.0):
        return {"x": x, "y": y, "radius": 6.4, "angle": 0.0, "alpha": alpha}

    return {
        "id": "hand", "height": 64, "width": 64, "num_frames": 12,
        "objects": [{"shape": "square", "color": "red", "size": "small", "initial": state(56, 8, alpha=0.0)},
                    {"shape": "circle", "color": "blue", "size": "small", "initial": state(8, 40)}],
        "events": [
            {"object": 0, "class": "appear", "start": 0, "end": 4, "color_before": "red", "color_after": "red",
             "before": state(56, 8, alpha=0.0), "after": state(56, 8)},
            {"object": 1, "class": "move_right", "start": 4, "end": 12, "color_before": "blue",
             "color_after": "blue", "before": state(8, 40), "after": state(36, 40)},
        ],
    }


def test_targets_follow_the_events():
    space = F.AttributeSpace()
    names = space.names
    meta = hand_clip()

    def targets(frame):
        return F.frame_targets(space, F.video_objects(meta, frame), height=64, width=64, grid=4)

    red, square = names.index("color:red"), names.index("shape:square")
    before, _ = targets(0)  # alpha 0: the appearing square is not there yet
    assert before[red] == 0 and before[square] == 0 and before[names.index("color:blue")] == 1
    assert targets(1)[0][red] == 0 and targets(2)[0][red] == 1  # alpha 1/3, then 2/3
    after, cells = targets(4)
    assert after[red] == 1 and after[square] == 1
    # the square sits in the top-right cell (row 0, col 3) and nowhere else; the circle at (8, 40) in row 2, col 0
    assert np.flatnonzero(cells[:, red]).tolist() == [3]
    assert np.flatnonzero(cells[:, names.index("color:blue")]).tolist() == [8]
    # the blue circle moves right: its x-bin code moves from bin 0/1 (x = 8) to bins 4/5 (x = 36); y stays
    xs = space.bins("x", "blue")
    start, end = targets(4)[0], targets(11)[0]
    assert start[xs].argmax() == 0 and end[xs].argmax() == 4 and abs(end[xs].sum() - 1) < 1e-6
    assert np.array_equal(start[space.bins("y", "blue")], end[space.bins("y", "blue")])
    assert before[space.bins("x", "red")].sum() == 0  # absent objects have no position targets


def test_perfect_predictions_score_one_and_absent_objects_score_nothing(tiny):
    space = F.AttributeSpace()
    data = F.collect_attribute_data(tiny["frames"], F.load_metadata(tiny["metadata"]), split="val", space=space,
                                    grid=4, frames_per_clip=2, seed=0)
    perfect = F.attribute_accuracy(space, data.targets * 20 - 10, data.cells * 20 - 10, data.targets, data.cells)
    assert perfect == {"colors": 1.0, "shapes": 1.0, "x": 1.0, "y": 1.0, "radius": 1.0, "cell_colors": 1.0}
    blank = F.attribute_accuracy(space, np.full_like(data.targets, -10), np.full_like(data.cells, -10),
                                 data.targets, data.cells)
    assert blank["colors"] < 0.5  # most frames show at least one object


# --------------------------------------------------------------------------------------------------------
# Encoder training


def test_training_reads_the_train_split_only(tiny, tmp_path):
    metadata = F.load_metadata(tiny["metadata"])
    index = json.loads((tiny["frames"] / "index.json").read_text())
    train = F.collect_attribute_data(tiny["frames"], metadata, split="train", space=F.AttributeSpace(), grid=4,
                                     frames_per_clip=2, seed=0)
    train_ids = {e["id"] for kind in ("videos", "images") for e in index[kind] if e["split"] == "train"}
    assert {item_id for item_id, _ in train.sources} == train_ids
    assert len(train.frames) == 2 * 24 + 24  # 2 frames per train clip + every train image

    # Same training with the test shards gone and the val pixels scrambled: identical weights.
    runs = []
    for scrambled in (False, True):
        folder = tmp_path / f"frames-{scrambled}"
        folder.mkdir()
        for path in tiny["frames"].iterdir():
            if path.name.startswith(("videos-test", "images-test")):
                continue  # the test split must never be read
            array = np.load(path) if path.suffix == ".npy" else None
            if scrambled and path.name.startswith(("videos-val", "images-val")):
                array = np.random.default_rng(1).integers(0, 256, array.shape, dtype=np.uint8)
            (np.save(folder / path.name, array) if array is not None else (folder / path.name).write_bytes(
                path.read_bytes()))
        runs.append(F.train_attribute_encoder(encoder_config(), frames_dir=folder, metadata_path=tiny["metadata"],
                                              log=lambda _: None))
    (clean, scrambled_run) = runs
    for (name, a), b in zip(clean.encoder.state_dict().items(), scrambled_run.encoder.state_dict().values()):
        assert torch.equal(a, b), name
    assert clean.history["train"] == {"frames": 72, "clips": 24, "images": 24, "frames_per_clip": 2}
    assert clean.history["val"]["frames"] == 2 * 8 + 8 and len(clean.history["epochs"]) == 1
    assert clean.metrics != scrambled_run.metrics  # val is scored (on its own pixels), not trained on


def test_attribute_training_lowers_the_loss(tiny):
    run = F.train_attribute_encoder(encoder_config(epochs=3, lr=3e-3), frames_dir=tiny["frames"],
                                    metadata_path=tiny["metadata"], log=lambda _: None)
    losses = [e["train_loss"] for e in run.history["epochs"]]
    assert losses[-1] < losses[0]


def test_small_cnn_without_metadata_says_to_use_a_torchvision_backbone(tiny, tmp_path):
    with pytest.raises(F.MetadataError, match="torchvision model .* encoder.weights"):
        F.train_attribute_encoder(encoder_config(), frames_dir=tiny["frames"], metadata_path=tmp_path / "none.json")


def test_metadata_of_another_dataset_is_refused(tiny, tmp_path):
    metadata = F.load_metadata(tiny["metadata"])
    del metadata["videos"]["video0"]
    with pytest.raises(F.MetadataError, match="video 'video0'.* not in metadata.json"):
        F.collect_attribute_data(tiny["frames"], metadata, split="train", space=F.AttributeSpace(), grid=4,
                                 frames_per_clip=1, seed=0)


def test_torchvision_backbone_needs_no_metadata_and_warns_when_random(tmp_path):
    config = encoder_config(backbone="resnet18", image_size=64)
    with pytest.warns(RandomWeightsWarning):
        run = F.pretrained_encoder(config)
    assert run.history["random_weights"] and not run.history["trained"]
    F.save_encoder(run, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)  # rebuilding from the checkpoint does not warn
        again = F.load_encoder(tmp_path / "encoder.pt")
    x = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    torch.testing.assert_close(again(x)[1], run.encoder(x)[1])


# --------------------------------------------------------------------------------------------------------
# Features


def test_features_follow_the_frame_shards_row_order(tiny, tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder(encoder_config()).eval()
    out = tmp_path / "features"
    shapes = F.write_features(encoder, tiny["frames"], out, batch_size=8, progress=False)  # 8 frames: many chunks
    assert shapes == {"videos-train.npy": (24, 6, 16), "videos-val.npy": (8, 6, 16), "videos-test.npy": (8, 6, 16),
                      "images-train.npy": (24, 16, 16), "images-val.npy": (8, 16, 16), "images-test.npy": (8, 16, 16)}
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    index = json.loads((out / "index.json").read_text())
    assert index["features"]["encoder"]["feature_dim"] == 16 and index["features"]["dtype"] == "float16"
    for kind in ("videos", "images"):
        for split in ("train", "val", "test"):
            array = np.load(out / f"{kind}-{split}.npy", mmap_mode="r")
            assert array.dtype == np.float16
            pixels, feats = VisualStore(tiny["frames"], kind=kind, split=split), VisualStore(out, kind=kind,
                                                                                              split=split)
            assert feats.source == "features" and feats.ids == pixels.ids
            assert len(pixels.ids) > 5  # several shards
            for row, item_id in enumerate(pixels.ids):
                direct = extract_features(encoder, pixels.load(item_id)[None])[0]  # the encoder on this one item
                np.testing.assert_allclose(feats.load(item_id).astype(np.float32), direct.astype(np.float32),
                                           atol=2e-3, rtol=2e-3)
                np.testing.assert_array_equal(feats.row(item_id), array[row])
                assert feats.length(item_id) == pixels.length(item_id) if kind == "videos" else True


# --------------------------------------------------------------------------------------------------------
# Flows and command line


@pytest.mark.slow
def test_flows_run_end_to_end(tiny, tmp_path, prefect_harness, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"encoder": TINY_ENCODER}))
    encoder_dir, features_dir = tmp_path / "encoder", tmp_path / "features"
    code = features_cli.main(["encoder", "--params", str(params), "--frames", str(tiny["frames"]),
                              "--metadata", str(tiny["metadata"]), "--out", str(encoder_dir), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in encoder_dir.iterdir()) == ["encoder.pt", "history.json", "metrics.json"]
    history = json.loads((encoder_dir / "history.json").read_text())
    assert history["trained"] and [e["epoch"] for e in history["epochs"]] == [1]
    assert set(json.loads((encoder_dir / "metrics.json").read_text())) == {"colors", "shapes", "x", "y", "radius",
                                                                            "cell_colors"}
    encoder = encoder_from_checkpoint(torch.load(encoder_dir / "encoder.pt", weights_only=True)).eval()

    code = features_cli.main(["features", "--encoder", str(encoder_dir / "encoder.pt"), "--frames",
                              str(tiny["frames"]), "--out", str(features_dir), "--no-progress", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    store = VisualStore(features_dir, kind="videos", split="val")
    pixels = VisualStore(tiny["frames"], kind="videos", split="val")
    first = store.ids[0]
    np.testing.assert_allclose(store.load(first).astype(np.float32),
                               extract_features(encoder, pixels.load(first)[None])[0].astype(np.float32), atol=2e-3)
    assert "features: videos-train.npy (24, 6, 16)" in capsys.readouterr().out


def test_cli_errors_are_one_clean_line(tiny, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"encoder": TINY_ENCODER}))
    code = features_cli.main(["encoder", "--params", str(params), "--frames", str(tiny["frames"]),
                              "--metadata", str(tmp_path / "metadata.json"), "--out", str(tmp_path / "enc")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("encoder: error: encoder.backbone is small_cnn") and "resnet18" in err
    params.write_text(yaml.safe_dump({"encoder": {"frames_per_clip": 0}}))
    assert features_cli.main(["encoder", "--params", str(params), "--frames", str(tiny["frames"]),
                              "--out", str(tmp_path / "enc")]) == 2
    assert "encoder.frames_per_clip" in capsys.readouterr().err
    assert features_cli.main(["features", "--encoder", str(tmp_path / "missing.pt"), "--frames",
                              str(tiny["frames"]), "--out", str(tmp_path / "feat")]) == 2
    assert "run the encoder stage first" in capsys.readouterr().err
    assert not (tmp_path / "enc").exists() and not (tmp_path / "feat").exists()
