"""Row 1 of the study (long-range dependencies): the cropped clips put the labelled episode exactly D frames from
either end, the controls' data hides the label from them, the length-generalisation arithmetic, the verdict rule on
fabricated results with known answers, and a tiny end-to-end row."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml

from seqvision.config import Params, SplitSizes, SynthConfig, TrainConfig, load_params
from seqvision.study.complexity import RowResult
from seqvision.study.figures import plot_long_range
from seqvision.study.fit import VERDICTS
from seqvision.blocks import ModelDims
from seqvision.models import build_model
from seqvision.study.longrange import (
    CHANCE,
    ORDER_BLIND,
    Clips,
    Prepared,
    analyse,
    clip_length,
    constant_clip_mean,
    distance_for_length,
    family_verdict,
    length_test_distances,
    run_long_range,
    synth_config,
    training_specs,
)
from seqvision.study.measure import Cell
from seqvision.study.presets import PRESETS, StudyConfig
from seqvision.synth.events import REVERSE, clip_states
from seqvision.encoders import extract_features
from seqvision.features import load_encoder
from seqvision.synth.items import item_keys, video_frames, video_spec
from tests.tiny import TINY_MODELS, TINY_TRAIN, TINY_UNMATCHED, tiny_encoder

# --------------------------------------------------------------------------------------------------------
# Data


def _alpha_clips(distance: int, count: int = 12) -> tuple[Clips, SynthConfig]:
    """Long-range clips at ``distance`` whose 'features' are the labelled object's alpha per frame: what the crops
    keep of the episode can be read off directly."""
    synth = SynthConfig(long_range=True, long_range_distance=distance, main_event_frames=6, seed=5,
                        videos=SplitSizes(train=count, val=1, test=1))
    keys = [k for k in item_keys(synth, "video") if k.split == "train"]
    alphas = []
    for key in keys:
        spec = video_spec(synth, key)
        target = len(spec.objects) - 1  # the labelled object (drawn last)
        assert spec.events[spec.main].obj == target
        alphas.append([[states[target].alpha] for states in clip_states(spec)])
    records = [{"id": f"c{i}", "file_name": f"c{i}.mp4", "label": 0} for i in range(count)]
    return Clips(distance, 6, {"train": np.array(alphas)}, {"train": records}), synth


@pytest.mark.parametrize("distance", [0, 1, 7, 20])
def test_a_crop_puts_the_episode_exactly_distance_frames_from_either_end(distance):
    clips, synth = _alpha_clips(20)
    cropped = clips.crop(distance)["train"][..., 0]
    assert cropped.shape[1] == clip_length(distance, synth.main_event_frames)
    for alpha in cropped:
        visible = np.flatnonzero(alpha > 0)
        # the labelled object is visible exactly in [D, T - 1 - D]: hidden in the first and the last D frames
        assert visible[0] == distance and visible[-1] == len(alpha) - 1 - distance
        assert len(visible) == len(alpha) - 2 * distance


def test_the_last_frames_control_never_shows_the_labelled_object():
    clips, _ = _alpha_clips(20)
    for distance in (1, 5, 20):
        last = clips.last_frames(distance)["train"]
        assert last.shape[1] == distance
        assert not last.any(), "the labelled object is visible in the frames the control sees"
    with pytest.raises(ValueError, match="outside"):
        clips.crop(21)


def test_shuffled_frames_are_a_fixed_permutation_per_clip():
    n, t = 30, 40
    base = np.arange(n * t, dtype=np.float32).reshape(n, t, 1)
    splits = ("train", "val", "test")
    clips = Clips(0, 38, dict(zip(splits, (base, base + 0.5, -base))), {s: [{}] * n for s in splits})
    shuffled = clips.shuffled(0, seed=1)
    for split in ("val", "test"):  # every split, each with its own permutations
        assert not np.array_equal(shuffled[split], clips.features[split])
        assert np.array_equal(np.sort(shuffled[split], axis=1), np.sort(clips.features[split], axis=1))
    once, again = shuffled["train"], clips.shuffled(0, seed=1)["train"]
    assert np.array_equal(once, again), "not deterministic"
    for clip, original in zip(once, base):
        assert sorted(clip[:, 0]) == sorted(original[:, 0])  # the same frames ...
    assert sum(np.array_equal(c, o) for c, o in zip(once, base)) == 0  # ... in another order
    assert len({tuple(np.argsort(c[:, 0])) for c in once}) == n  # a permutation per clip
    assert not np.array_equal(clips.shuffled(0, seed=2)["train"], once)


def test_length_generalisation_tests_clips_two_and_four_times_as_long():
    assert clip_length(8, 12) == 34 and distance_for_length(34, 12) == 8
    config = StudyConfig(long_distances=(8, 16), long_length_distance=8)
    distances = length_test_distances(config, 12)
    assert distances == {2: 25, 4: 59}
    assert [clip_length(d, 12) for d in distances.values()] == [68, 136]
    with pytest.raises(ValueError, match="long_length_distance"):
        StudyConfig(long_distances=(8, 16), long_length_distance=4)


def test_the_steps_budget_gives_every_training_the_comparisons_optimizer_steps(tmp_path):
    # 480 clips at batch 64 are 8 steps an epoch, the comparison's 1,200 are 19: 15 epochs -> 36, patience 3 -> 7.
    params = Params(train=TrainConfig(epochs=15, patience=3, batch_size=64),
                    synth=SynthConfig(videos=SplitSizes(train=1200, val=150, test=150)))
    distances = {2: 17, 4: 42}
    prepared = Prepared(labels=tmp_path, folders={(kind, d): tmp_path for kind in ("clips", "last_frames", "shuffled")
                                                  for d in (8, 64, *distances.values())},
                        length_distances=distances, num_frames={}, num_clips={}, test_ids=())
    config = StudyConfig(long_train_clips=480, long_distances=(8, 64), long_length_distance=8)
    schedules = {(spec.train_config.epochs, spec.train_config.patience)
                 for _, spec in training_specs(config, params, prepared, tmp_path)}
    assert schedules == {(36, 7)}
    steps_per_epoch = -(-480 // 64)
    assert 36 * steps_per_epoch >= 15 * -(-1200 // 64)  # at least the comparison's steps
    as_they_are = training_specs(config.replace(long_budget="epochs"), params, prepared, tmp_path)
    assert {(s.train_config.epochs, s.train_config.patience) for _, s in as_they_are} == {(15, 3)}
    capped = training_specs(config.replace(long_epochs=10), params, prepared, tmp_path)
    assert {(s.train_config.epochs, s.train_config.patience) for _, s in capped} == {(24, 7)}


# --------------------------------------------------------------------------------------------------------
# Analysis on fabricated results


def _cell(variant: str, distance: int, accuracy: float, *, seeds: int = 3, items: int = 400, seed: int = 0) -> Cell:
    rng = np.random.default_rng([seed, distance, len(variant)])
    correct = ["".join("1" if rng.random() < accuracy else "0" for _ in range(items)) for _ in range(seeds)]
    return Cell("long_range", variant, {"distance": distance, "frames": 2 * distance + 18},
                {"top_1": [s.count("1") / items for s in correct]},
                {"train_items": 600, "test_correct": correct, "length_tests": {}})


def _curve(variant: str, accuracies: dict[int, float]) -> list[Cell]:
    return [_cell(variant, d, a) for d, a in accuracies.items()]


def test_the_order_blind_ceiling_is_one_half():
    # A model blind to frame order can tell the pairs apart (which of x, y or size changes) but not a clip from its
    # reversal: an oracle that knows the pair and guesses its first class scores 1/2 on uniformly drawn labels.
    assert CHANCE == {"last_frames": pytest.approx(1 / 6), "shuffled": 0.5, "bag_of_frames": 0.5}
    assert ORDER_BLIND == 0.5
    synth = SynthConfig(long_range=True, long_range_distance=3, main_event_frames=6, seed=2,
                        videos=SplitSizes(train=600, val=1, test=1))
    labels = [video_spec(synth, k).events[1].cls for k in item_keys(synth, "video") if k.split == "train"]
    first_of_pair = {c: min(c, REVERSE[c]) for c in labels}
    order_blind = np.mean([first_of_pair[c] == c for c in labels])
    assert abs(order_blind - 0.5) < 0.06, order_blind


@pytest.mark.parametrize(("column", "interval", "label"), [
    ("RNNs", (-0.30, -0.10), "agrees"),  # a significant fall, beyond the margin
    ("RNNs", (-0.04, 0.03), "disagrees"),  # holds: at most 0.04 lost
    ("RNNs", (-0.03, -0.01), "disagrees"),  # significant, but within the margin: holds
    ("RNNs", (-0.12, 0.02), "inconclusive"),  # neither: the test cannot tell
    ("RNNs", (-0.08, -0.02), "disagrees"),  # a significant fall within the margin (0.1): holds
    ("Transformers", (-0.30, -0.10), "disagrees"),
    ("Transformers", (-0.04, 0.03), "agrees"),
    ("Transformers", (-0.12, 0.02), "inconclusive"),
    ("minGRU", (-0.30, -0.10), "agrees"),
])
def test_verdict_rule(column, interval, label):
    learned_at_shortest = _cell("gru", 8, 0.9)
    assert family_verdict(column, learned_at_shortest, interval, measured="").label == label
    # below the order-blind ceiling at the shortest distance: it never used order, whatever the fall
    assert family_verdict(column, _cell("gru", 8, 0.48), interval, measured="").label == "inconclusive"


def test_a_recurrence_that_falls_agrees_and_a_transformer_that_holds_agrees():
    cells = _curve("gru", {8: 0.95, 64: 0.35}) + _curve("transformer", {8: 0.9, 64: 0.9})
    verdicts = analyse(cells)["verdicts"]
    assert verdicts["gru"].label == "agrees" and "falls significantly" in verdicts["gru"].reason
    assert verdicts["transformer"].label == "agrees" and "holds within" in verdicts["transformer"].reason


def test_a_recurrence_that_holds_and_a_transformer_that_falls_disagree():
    cells = _curve("lstm", {8: 0.92, 64: 0.92}) + _curve("transformer", {8: 0.9, 64: 0.65})
    result = analyse(cells)
    assert result["verdicts"]["lstm"].label == "disagrees" and result["verdicts"]["transformer"].label == "disagrees"
    assert result["reach"] == {"lstm": 64, "transformer": 64}  # 0.65: fallen, but above 1/2 over the seeds
    at_64 = next(r for r in result["versus_transformer"]["lstm"] if r["distance"] == 64)
    assert at_64["symbol"] == ">"


def test_a_family_that_never_beat_the_order_blind_ceiling_is_inconclusive():
    cells = _curve("rnn", {8: 0.46, 64: 0.17}) + _curve("transformer", {8: 0.9, 64: 0.9})
    result = analyse(cells)
    verdict = result["verdicts"]["rnn"]
    assert verdict.label == "inconclusive" and "even at the shortest" in verdict.reason
    assert result["reach"]["rnn"] is None


def test_a_control_above_its_chance_is_flagged():
    cells = (_curve("control:last_frames", {8: 1 / 6, 64: 1 / 6}) + _curve("control:shuffled", {8: 0.75, 64: 0.5})
             + _curve("control:bag_of_frames", {8: 0.5, 64: 0.45}) + _curve("transformer", {8: 0.9, 64: 0.9}))
    controls = analyse(cells)["controls"]
    assert controls["last_frames"]["at_chance"] and controls["bag_of_frames"]["at_chance"]
    assert not controls["shuffled"]["at_chance"]
    assert analyse(cells[:2])["controls"]["bag_of_frames"] == {"chance": 0.5, "max_mean": None, "at_chance": False}


def test_the_gradient_profile_sees_the_recurrence_not_the_clip_mean():
    # Without the clip mean's path, an untrained GRU's gradient fades along its 60 steps; the forward is unchanged.
    torch.manual_seed(0)
    model = build_model("activity", "gru", None, dims=ModelDims(feature_dim=8, num_classes=6)).eval()
    x = torch.randn(4, 60, 8, requires_grad=True)
    lengths, labels = torch.full((4,), 60), torch.tensor([0, 1, 2, 3])
    logits, loss = model(x, lengths, labels)
    with constant_clip_mean():
        same, held = model(x, lengths, labels)
    assert torch.equal(logits, same)
    held.backward()
    norms = x.grad.norm(dim=-1).mean(0)
    assert norms[-1] > 100 * norms[0], (float(norms[0]), float(norms[-1]))
    x.grad = None
    loss.backward()  # through the mean, every frame gets at least 1/T of the others' gradient: no such fade
    norms = x.grad.norm(dim=-1).mean(0)
    assert norms[-1] < 100 * norms[0]


# --------------------------------------------------------------------------------------------------------
# A tiny row


@pytest.mark.slow
@pytest.mark.integration
def test_a_tiny_row_trains_every_cell_and_tests_longer_clips(tmp_path):
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump({"train": TINY_TRAIN | {"seeds": 1},
                                           "models": TINY_MODELS | TINY_UNMATCHED}))
    params = load_params(params_path)
    families = ("gru", "transformer")
    config = dataclasses.replace(PRESETS["ci"], long_encoder=str(tiny_encoder(tmp_path / "encoder.pt")),
                                 long_families=families,
                                 long_control_family="gru")
    result = run_long_range(config, params=params, work_dir=tmp_path / "row")
    data = json.loads(json.dumps(result.to_json()))
    cells = {(c["variant"], c["key"]["distance"]): c for c in data["cells"]}
    variants = {*families, "control:last_frames", "control:shuffled", "control:bag_of_frames"}
    assert set(cells) == {(v, d) for v in variants for d in (2, 4)}
    for (variant, distance), cell in cells.items():
        assert not cell["errors"] and len(cell["metrics"]["top_1"]) == 2, cell["name"]
        assert len(cell["settings"]["test_correct"][0]) == 12
        frames = distance if variant == "control:last_frames" else clip_length(distance, 12)
        assert cell["key"]["frames"] == frames
        shape = np.load(tmp_path / "row" / "data" / {"control:last_frames": f"D{distance}-last",
                                                     "control:shuffled": f"D{distance}-shuffled"}.get(
            variant, f"D{distance}") / "videos-test.npy", mmap_mode="r").shape
        assert shape == (12, frames, 40)
    # the features are the clips' own: a test clip rendered again, encoded, and cropped to D = 2 is its row
    synth = synth_config(config, params, 35)  # the largest distance the row rendered (the 4x test clips)
    key = [k for k in item_keys(synth, "video") if k.split == "test"][5]
    frames = video_frames(synth, key, video_spec(synth, key))
    again = extract_features(load_encoder(config.long_encoder), frames[None], batch_size=512)[0][33:-33]
    stored = np.load(tmp_path / "row" / "data" / "D2" / "videos-test.npy")[5]
    assert np.array_equal(again, stored)
    # the models of the shortest distance are also tested on clips 2x and 4x as long (22 frames -> 44, 88)
    for family in families:
        tests = cells[(family, 2)]["settings"]["length_tests"]
        assert {k: (t["distance"], t["frames"]) for k, t in tests.items()} == {"2x": (13, 44), "4x": (35, 88)}
        assert all(len(t["top_1"]) == 2 for t in tests.values())
        assert not cells[(family, 4)]["settings"]["length_tests"]
    assert {t["column"] for t in data["table"]} == {"RNNs", "Transformers"}
    assert all(t["verdict"].split(":")[0] in (*VERDICTS, "depends on the cell") for t in data["table"])
    assert set(data["extra"]["controls"]) == {"last_frames", "shuffled", "bag_of_frames"}
    gradients = data["extra"]["gradients"]  # the first seed of each family at the largest distance
    assert set(gradients) == set(families)
    for found in gradients.values():
        assert found["frames"] == clip_length(4, 12) and found["visible"] == [4, found["frames"] - 5]
        assert len(found["init"]) == len(found["trained"]) == found["frames"] and min(found["init"]) > 0
        assert found["init"] != found["trained"]
    again = RowResult.from_json(data)  # the analysis follows from the JSON alone
    redone = analyse(again.cells)
    assert json.loads(json.dumps(redone["controls"])) == data["extra"]["controls"]
    plot_long_range(again, tmp_path / "long_range.png")
    assert (tmp_path / "long_range.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "long_range.png").stat().st_size > 10_000
