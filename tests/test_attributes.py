"""seqvision.attributes: targets replay the metadata and bind every attribute to its object's colour; the size word
and region follow the generator's own definitions; the accuracies score what the captions name; the encoder trains on
the train split only and, on the tiny preset, beats chance on every attribute."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seqvision import annotations, frames
from seqvision import attributes as A
from seqvision.config import SYNTH_PRESETS, EncoderConfig, ExtractConfig, SynthConfig, from_mapping
from seqvision.io import MetadataError
from seqvision.synth import items
from seqvision.synth.events import clip_states
from seqvision.synth.generate import generate
from seqvision.synth.scene import RADIUS_FRACTION, ObjectState, region

torch.set_num_threads(1)

TINY_ENCODER = {"feature_dim": 40, "slot_dim": 4, "width": 4, "epochs": 1, "frames_per_clip": 2, "batch_size": 16}


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


def view(shape: str, color: str, x: float, y: float, *, radius: float = 6.4, alpha: float = 1.0) -> A.ObjectView:
    return A.ObjectView(shape, color, x, y, radius, 0.0, alpha)


# --------------------------------------------------------------------------------------------------------
# Targets


def test_every_attribute_is_bound_to_its_objects_colour():
    """A red square with a blue circle and a red circle with a blue square have the same presence labels; the
    colour-bound shape, size and region targets tell them apart."""
    space = A.AttributeSpace()
    names = space.names
    assert len(names) == space.size == len(set(names))
    first = A.frame_targets(space, [view("square", "red", 10, 10), view("circle", "blue", 54, 54, radius=10.24)],
                            height=64, width=64, grid=4).frame
    second = A.frame_targets(space, [view("circle", "red", 10, 10), view("square", "blue", 54, 54, radius=10.24)],
                             height=64, width=64, grid=4).frame
    presence = slice(0, space.num_presence)
    assert np.array_equal(first[presence], second[presence])
    on = {names[i] for i in np.flatnonzero(first == 1.0) if names[i].split(":")[0] in ("shape", "size", "region")}
    assert on == {"shape:square", "shape:circle", "shape:red:square", "shape:blue:circle", "size:red:small",
                  "size:blue:large", "region:red:top left", "region:blue:bottom right"}
    assert first[names.index("shape:red:circle")] == 0 and second[names.index("shape:red:circle")] == 1
    # exactly one label per categorical group of a present colour, none for an absent one
    for kind in ("shape", "size", "region"):
        assert first[space.span(kind, "red")].sum() == 1 and first[space.span(kind, "green")].sum() == 0


def test_tent_bins_share_the_weight_between_neighbours():
    np.testing.assert_allclose(A.tent(0.5 / 8, 8), np.eye(8)[0])  # on the centre of bin 0
    np.testing.assert_allclose(A.tent(1.0 / 8, 8)[:2], [0.5, 0.5])  # half-way between the centres of bins 0 and 1
    np.testing.assert_allclose(A.tent(0.0, 8), np.eye(8)[0])  # before the first centre: all on bin 0
    np.testing.assert_allclose(A.tent(1.0, 8), np.eye(8)[7])
    for position in np.linspace(0, 1, 37):
        weights = A.tent(float(position), 8)
        assert abs(weights.sum() - 1) < 1e-6 and np.count_nonzero(weights) <= 2


def test_size_word_is_the_nearest_category():
    side = 64
    word = lambda fraction: A.size_word(fraction * side, height=side, width=side)  # noqa: E731
    assert word(RADIUS_FRACTION["small"]) == "small" and word(RADIUS_FRACTION["large"]) == "large"
    assert word(0.06) == "small" and word(0.272) == "large"  # a small object shrunk, a large one grown
    assert word(0.129) == "small" and word(0.131) == "large"  # the switch is half-way between 0.10 and 0.16
    assert A.size_word(0.12 * 48, height=48, width=96) == "small"  # relative to the shorter side


def test_regions_follow_the_captions_3x3_grid():
    def scene_region(x: float, y: float) -> str:
        return region(ObjectState(x, y, 6.4, 0.0, (0.0, 0.0, 0.0), 1.0), height=64, width=96)

    centres = [((col + 0.5) * 96 / 3, (row + 0.5) * 64 / 3) for row in range(3) for col in range(3)]
    assert tuple(scene_region(x, y) for x, y in centres) == A.REGIONS
    for x, y in [(0, 0), (31.9, 21.3), (32.1, 21.4), (95.9, 63.9), (48, 32)]:
        assert A.region_of(view("circle", "red", x, y), height=64, width=96) == scene_region(x, y)


def test_video_objects_replay_the_generator_timeline(tiny):
    """Reconstructed per-frame states equal the generator's own (up to the metadata's rounding)."""
    config = tiny_synth_config()
    metadata = A.load_metadata(tiny["metadata"])
    for key in items.item_keys(config, "video"):
        truth = clip_states(items.video_spec(config, key))
        for frame, states in enumerate(truth):
            views = A.video_objects(metadata["videos"][key.id], frame)
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
    space = A.AttributeSpace()
    names = space.names
    meta = hand_clip()

    def targets(frame):
        return A.frame_targets(space, A.video_objects(meta, frame), height=64, width=64, grid=4)

    red, square = names.index("color:red"), names.index("shape:square")
    before = targets(0).frame  # alpha 0: the appearing square is not there yet
    assert before[red] == 0 and before[square] == 0 and before[names.index("color:blue")] == 1
    assert targets(1).frame[red] == 0 and targets(2).frame[red] == 1  # alpha 1/3, then 2/3
    after, cells, _ = targets(4)
    assert after[red] == 1 and after[square] == 1 and after[names.index("shape:red:square")] == 1
    # each object is described in the cell holding its centre: the square at (56, 8) in row 0, col 3; the circle
    # at (8, 40) in row 2, col 0
    assert np.flatnonzero(cells[:, red]).tolist() == [3]
    assert np.flatnonzero(cells[:, names.index("color:blue")]).tolist() == [8]
    assert cells[3, names.index("shape:red:square")] == 1 and cells[3, names.index("region:red:top right")] == 1
    # the blue circle moves right: its x-bin code moves from bin 0/1 (x = 8) to bins 4/5 (x = 36); y stays; its
    # region goes from "left" (x = 8 < 64/3) to "center" (x = 36)
    xs = space.span("x", "blue")
    start, end = targets(4).frame, targets(11).frame
    assert start[xs].argmax() == 0 and end[xs].argmax() == 4 and abs(end[xs].sum() - 1) < 1e-6
    assert np.array_equal(start[space.span("y", "blue")], end[space.span("y", "blue")])
    assert start[names.index("region:blue:left")] == 1 and end[names.index("region:blue:center")] == 1
    assert before[space.span("x", "red")].sum() == 0  # absent objects have no position targets


def test_pixel_labels_show_the_colour_on_top():
    """Labels are 0 (background) or 1 + colour index, rendered as the generator paints: later objects on top, and
    an object below half opacity shows nowhere."""
    space = A.AttributeSpace()
    red, blue, green = (1 + space.colors.index(c) for c in ("red", "blue", "green"))
    objects = [view("square", "red", 20, 20, radius=10.24), view("circle", "blue", 28, 20, radius=6.4),
               view("circle", "green", 50, 50, alpha=0.4)]
    pixels = A.frame_targets(space, objects, height=64, width=64, grid=4).pixels
    assert pixels.dtype == np.uint8 and pixels.shape == (64, 64)
    assert pixels[20, 14] == red and pixels[20, 28] == blue and pixels[20, 22] == blue  # blue drawn over red
    assert pixels[2, 2] == 0 and pixels[50, 50] == 0  # background; the faint green circle
    assert set(np.unique(pixels)) == {0, red, blue}
    # the square (half side 0.7 R, axis-aligned at angle 0) covers about (2 * 0.7 * 10.24)^2 px, less what blue hides
    assert 110 < (pixels == red).sum() < (2 * 0.7 * 10.24) ** 2


# --------------------------------------------------------------------------------------------------------
# Accuracy


def scored_frames() -> tuple[A.AttributeSpace, np.ndarray, np.ndarray]:
    """Three frames (targets (3, A), cells (3, 16, A)): two objects, one object, none."""
    space = A.AttributeSpace()
    scenes = [[view("square", "red", 10, 10), view("circle", "blue", 54, 54, radius=10.24)],
              [view("triangle", "green", 32, 32)], []]
    pairs = [A.frame_targets(space, objects, height=64, width=64, grid=4) for objects in scenes]
    return space, np.stack([p.frame for p in pairs]), np.stack([p.cells for p in pairs])


def test_perfect_predictions_score_one():
    space, targets, cells = scored_frames()
    scores = A.attribute_accuracy(space, targets * 20 - 10, cells * 20 - 10, targets, cells)
    assert scores == dict.fromkeys(scores, 1.0)
    assert {"colors", "shape", "size", "region", "objects", "grid_shape", "grid_size", "grid_region"} <= set(scores)


def test_a_shape_on_the_wrong_object_is_wrong():
    """Swapping the shapes of the two objects keeps the set of shapes (shape_set 1) but names both wrongly."""
    space, targets, cells = scored_frames()
    swapped = targets.copy()
    red, blue = space.span("shape", "red"), space.span("shape", "blue")
    swapped[0, red], swapped[0, blue] = targets[0, blue], targets[0, red]
    scores = A.attribute_accuracy(space, swapped * 20 - 10, cells * 20 - 10, targets, cells)
    assert scores["shape_set"] == 1.0 and scores["colors"] == 1.0 and scores["size"] == 1.0
    assert scores["shape"] == pytest.approx(1 / 3) and scores["objects"] == pytest.approx(1 / 3)  # green is right
    assert scores["grid_shape"] == 1.0  # the cell head was not touched


def test_wrong_size_region_and_colours_each_count_where_they_should():
    space, targets, cells = scored_frames()
    names = space.names
    logits, cell_logits = targets * 20 - 10, cells * 20 - 10
    wrong = logits.copy()
    wrong[1, space.span("size", "green")] = [-10, 10]  # the small green triangle called large
    wrong[0, space.span("region", "blue")] = -10
    wrong[0, names.index("region:blue:center")] = 10
    scores = A.attribute_accuracy(space, wrong, cell_logits, targets, cells)
    assert scores["size"] == pytest.approx(2 / 3) and scores["region"] == pytest.approx(2 / 3)
    assert scores["objects"] == pytest.approx(1 / 3) and scores["shape"] == 1.0
    missed = logits.copy()
    missed[2, names.index("color:white")] = 10  # a white object seen in the empty frame
    missed[0, names.index("color:red")] = -10  # the red square missed
    scores = A.attribute_accuracy(space, missed, cell_logits, targets, cells)
    assert scores["colors"] == pytest.approx(1 / 3) and scores["objects"] == pytest.approx(2 / 3)
    cell_wrong = cell_logits.copy()
    cell_wrong[1, :, space.span("shape", "green")] = np.array([10, -10, -10, -10])  # every cell: a green circle
    assert A.attribute_accuracy(space, logits, cell_wrong, targets, cells)["grid_shape"] == pytest.approx(2 / 3)


def test_perfect_predictions_on_real_frames_score_one_and_blank_ones_do_not(tiny):
    space = A.AttributeSpace()
    data = A.collect_attribute_data(tiny["frames"], A.load_metadata(tiny["metadata"]), split="val", space=space,
                                    grid=4, frames_per_clip=2, seed=0)
    perfect = A.attribute_accuracy(space, data.targets * 20 - 10, data.cells * 20 - 10, data.targets, data.cells)
    assert perfect == dict.fromkeys(perfect, 1.0)
    blank = A.attribute_accuracy(space, np.full_like(data.targets, -10), np.full_like(data.cells, -10),
                                 data.targets, data.cells)
    assert blank["colors"] < 0.5 and blank["objects"] == 0.0  # most frames show at least one object


# --------------------------------------------------------------------------------------------------------
# Encoder training


def test_training_reads_the_train_split_only(tiny, tmp_path):
    metadata = A.load_metadata(tiny["metadata"])
    index = json.loads((tiny["frames"] / "index.json").read_text())
    train = A.collect_attribute_data(tiny["frames"], metadata, split="train", space=A.AttributeSpace(), grid=4,
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
        runs.append(A.train_attribute_encoder(encoder_config(epochs=3, lr=1e-2, batch_size=4), frames_dir=folder,
                                              metadata_path=tiny["metadata"], log=lambda _: None))
    (clean, scrambled_run) = runs
    for (name, a), b in zip(clean.encoder.state_dict().items(), scrambled_run.encoder.state_dict().values()):
        assert torch.equal(a, b), name
    assert clean.history["train"] == {"frames": 72, "clips": 24, "images": 24, "frames_per_clip": 2}
    assert clean.history["val"]["frames"] == 2 * 8 + 8 and len(clean.history["epochs"]) == 3
    assert clean.metrics != scrambled_run.metrics  # val is scored (on its own pixels), not trained on


def test_small_cnn_without_metadata_says_to_use_a_torchvision_backbone(tiny, tmp_path):
    with pytest.raises(MetadataError, match="torchvision model .* encoder.weights"):
        A.train_attribute_encoder(encoder_config(), frames_dir=tiny["frames"], metadata_path=tmp_path / "none.json")


def test_metadata_of_another_dataset_is_refused(tiny, tmp_path):
    metadata = A.load_metadata(tiny["metadata"])
    del metadata["videos"]["video0"]
    with pytest.raises(MetadataError, match="video 'video0'.* not in metadata.json"):
        A.collect_attribute_data(tiny["frames"], metadata, split="train", space=A.AttributeSpace(), grid=4,
                                 frames_per_clip=1, seed=0)
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps({"videos": []}))
    with pytest.raises(MetadataError, match="metadata.json: not the synthetic benchmark's"):
        A.load_metadata(broken)


def test_a_tiny_training_learns_every_attribute(tiny):
    """The stage's own functions on the tiny preset (168 frames, 15 epochs, seconds): on the frames it saw, the encoder
    and heads beat the best constant guess on every attribute the captions name. (Generalisation needs the default
    data: docs/encoder.md.)"""
    space = A.AttributeSpace()
    data = A.collect_attribute_data(tiny["frames"], A.load_metadata(tiny["metadata"]), split="train", space=space,
                                    grid=4, frames_per_clip=6, seed=0)
    encoder = A.build_encoder(encoder_config(feature_dim=128, slot_dim=8, width=8), num_colors=len(space.colors))
    heads = A.build_heads(space, encoder)
    losses = A.fit_attribute_encoder(encoder, heads, data, epochs=15, lr=1e-2, batch_size=16, weight_decay=1e-4,
                                     seed=0)
    assert losses[-1] < losses[0] / 2
    logits, cell_logits = A.predict_attributes(heads, *A.encode_frames(encoder, data.frames))
    scores = A.attribute_accuracy(space, logits, cell_logits, data.targets, data.cells)

    frames, colors = np.nonzero(data.targets[:, len(space.shapes) : space.num_presence] >= 0.5)  # every object

    def best_constant(kind: str) -> float:  # the share of the most common label among the objects
        labels = len(space.group(kind).labels)
        block = data.targets[:, space.block(kind)][:, : len(space.colors) * labels].reshape(-1, len(space.colors),
                                                                                          labels)
        return np.bincount(block[frames, colors].argmax(axis=1)).max() / len(frames)

    color_sets = {tuple(row) for row in data.targets[:, len(space.shapes) : space.num_presence] >= 0.5}
    chance = {"colors": max(np.mean(np.all((data.targets[:, len(space.shapes) : space.num_presence] >= 0.5)
                                           == np.array(s), axis=1)) for s in color_sets),
              **{kind: best_constant(kind) for kind in ("shape", "size", "region")}}
    for name, level in chance.items():
        assert scores[name] > level + 0.1, (name, scores[name], level)
