"""The synthetic benchmark generator: determinism, native formats, labels that match pixels, CLI, resume."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from seqvision.config import SYNTH_PRESETS, SynthConfig, from_mapping, merge, to_dict
from seqvision.synth.events import EVENT_CLASSES, REVERSAL_PAIRS
from seqvision.synth.generate import generate
from seqvision.synth.__main__ import build_parser, main, resolve_config
from seqvision.synth.events import (
    FADE_FRAMES,
    LONG_RANGE_CLASSES,
    REVERSE,
    ClipSpec,
    Event,
    apply_event,
    clip_states,
    long_range_frames,
    reverse_clip,
    sample_clip,
)
from seqvision.synth.items import (
    ItemKey,
    held_out_combinations,
    image_scene,
    item_keys,
    item_rng,
    scene_signature,
    train_signatures,
    video_record,
    video_spec,
)
from seqvision.synth.render import render_frames
from seqvision.synth.scene import COLORS, RADIUS_FRACTION, SHAPES, Background, ObjectSpec, ObjectState, margin

ALL_COLORS, ALL_SHAPES = tuple(COLORS), SHAPES

# One module-scoped tiny generation is shared; keep these tests on one xdist worker.
pytestmark = pytest.mark.xdist_group("synth")

SRC = Path(__file__).resolve().parents[1] / "src"


def config_with(**overrides) -> SynthConfig:
    base = merge(to_dict(SynthConfig()), SYNTH_PRESETS["tiny"])
    return from_mapping(SynthConfig, merge(base, overrides), where="synth")


def micro(**overrides) -> SynthConfig:
    """Even smaller than tiny: a handful of items, for tests that generate more than once."""
    sizes = {"train": 2, "val": 1, "test": 1}
    return config_with(videos=sizes, images=sizes, **overrides)


def file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def color_mask(frame: np.ndarray, color: str, tolerance: float = 60.0) -> np.ndarray:
    """Pixels within ``tolerance`` (RGB distance) of a named object colour: bool (H, W)."""
    distance = np.linalg.norm(frame.astype(np.float64) - np.asarray(COLORS[color], dtype=np.float64), axis=-1)
    return distance < tolerance


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "data"
    generate(config_with(workers=1), out, progress=False)
    return out


@pytest.fixture(scope="module")
def metadata(tiny: Path) -> dict:
    return json.loads((tiny / "annotations" / "metadata.json").read_text())


# ---------------------------------------------------------------------------------------------------------
# Determinism and decoding


@pytest.mark.slow
def test_two_worker_counts_give_identical_bytes(tiny: Path, tmp_path: Path) -> None:
    other = tmp_path / "data"
    generate(config_with(workers=2), other, progress=False)
    assert file_hashes(other) == file_hashes(tiny)


def test_videos_decode_with_decord_to_expected_frames(tiny: Path, metadata: dict) -> None:
    decord = pytest.importorskip("decord")
    for video in metadata["videos"]:
        reader = decord.VideoReader(str(tiny / "videos" / video["file_name"]))
        assert len(reader) == video["num_frames"], video["id"]
        assert reader[0].shape == (video["height"], video["width"], 3)


def test_pngs_have_configured_size(tiny: Path, metadata: dict) -> None:
    for image in metadata["images"]:
        with Image.open(tiny / "images" / image["file_name"]) as im:
            assert im.mode == "RGB" and im.size == (image["width"], image["height"])


# ---------------------------------------------------------------------------------------------------------
# Labels match pixels


def _single_event_clip(cls: str, *, frames: int = 10, size: int = 64) -> tuple[np.ndarray, Event]:
    """A red square in the middle of a grey frame doing ``cls`` (small for grow, else large), rendered
    without noise."""
    rng = np.random.default_rng(0)
    word = "small" if cls == "grow" else "large"
    state = ObjectState(
        x=size / 2, y=size / 2, radius=RADIUS_FRACTION[word] * size, angle=0.0, rgb=COLORS["red"], alpha=1.0
    )
    before, after, new_color, hop = apply_event(
        rng, cls, state, "red", taken_colors={"red"}, height=size, width=size
    )
    event = Event(0, cls, 2, 2 + frames, before, after, "red", new_color, hop)
    spec = ClipSpec(
        num_frames=frames + 4,
        objects=(ObjectSpec("square", "red", word),),
        initial=(before,),
        events=(event,),
        main=0,
        background=Background(rgb=(90.0, 90.0, 90.0), waves=()),
    )
    pixels = render_frames(spec.objects, clip_states(spec), spec.background, rng, height=size, width=size, noise_std=0)
    return pixels, event


@pytest.mark.parametrize("cls", EVENT_CLASSES)
def test_each_event_class_changes_the_pixels_it_names(cls: str) -> None:
    pixels, event = _single_event_clip(cls)
    first, last = pixels[0], pixels[-1]  # two still frames before the event, two after it
    red_first, red_last = color_mask(first, "red"), color_mask(last, "red")
    size = first.shape[0]
    if cls.startswith("move_"):
        shift = centroid(red_last) - centroid(red_first)
        axis, sign = {"move_left": (0, -1), "move_right": (0, 1), "move_up": (1, -1), "move_down": (1, 1)}[cls]
        assert sign * shift[axis] >= 0.24 * size and abs(shift[1 - axis]) < 1
    elif cls in ("grow", "shrink"):  # exactly small -> large, or large -> small ((0.16 / 0.10)^2 = 2.56 in area)
        ratio = red_last.sum() / red_first.sum()
        assert (ratio > 2.0) if cls == "grow" else (ratio < 0.5)
        end = "large" if cls == "grow" else "small"
        assert event.after.radius == RADIUS_FRACTION[end] * size
    elif cls in ("appear", "disappear"):
        visible = [color_mask(f, "red").sum() for f in pixels]
        assert visible == sorted(visible, reverse=cls == "disappear")
        assert min(visible) == 0 and max(visible) > 150
    elif cls == "rotate":
        assert abs(int(red_last.sum()) - int(red_first.sum())) < 0.1 * red_first.sum()
        assert (red_first ^ red_last).sum() > 0.2 * red_first.sum()  # a 45-degree turn changes ~30%
    elif cls == "change_color":
        assert red_last.sum() == 0 and color_mask(last, event.color_after).sum() == red_first.sum()
    elif cls == "bounce":
        heights = [centroid(color_mask(f, "red"))[1] for f in pixels]
        assert heights[0] - min(heights) >= 0.15 * size and abs(heights[-1] - heights[0]) < 0.5
    elif cls == "stay_still":
        assert all(np.array_equal(f, first) for f in pixels)


def test_generated_clips_show_their_events(tiny: Path, metadata: dict) -> None:
    """On decoded MP4s: an event's object really moves / grows / shrinks / fades as its class says."""
    decord = pytest.importorskip("decord")
    checked = set()
    for video in metadata["videos"]:
        frames = decord.VideoReader(str(tiny / "videos" / video["file_name"])).get_batch(
            list(range(video["num_frames"]))
        ).asnumpy()
        height, width = frames.shape[1:3]
        for event in video["events"]:
            cls, color = event["class"], event["color_before"]
            before = color_mask(frames[event["start"]], color)  # an event's frames span its whole change
            after = color_mask(frames[event["end"] - 1], color)
            if cls.startswith("move_"):
                shift = centroid(after) - centroid(before)
                axis, sign = {"move_left": (0, -1), "move_right": (0, 1), "move_up": (1, -1), "move_down": (1, 1)}[cls]
                assert sign * shift[axis] >= 0.15 * (width, height)[axis], (video["id"], event)
            elif cls == "grow":
                assert after.sum() > 1.5 * before.sum(), (video["id"], event)
            elif cls == "shrink":
                assert after.sum() < 0.6 * before.sum(), (video["id"], event)
            elif cls == "disappear":
                assert after.sum() < 0.2 * before.sum(), (video["id"], event)
            elif cls == "appear":
                assert after.sum() > 5 * before.sum() + 5, (video["id"], event)
            else:
                continue
            checked.add(cls)
    assert len(checked) >= 6, checked  # the tiny preset exercises most of these classes


def test_image_relations_match_object_positions(tiny: Path, metadata: dict) -> None:
    seen = 0
    for image in metadata["images"]:
        pixels = np.asarray(Image.open(tiny / "images" / image["file_name"]))
        centres = [centroid(color_mask(pixels, o["color"])) for o in image["objects"]]
        for rel in image["relations"]:
            (ax, ay), (bx, by) = centres[rel["subject"]], centres[rel["object"]]
            expected = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}
            assert expected[rel["relation"]], (image["id"], rel)
            seen += 1
        for o in image["objects"]:
            x, y, w, h = o["bbox"]
            assert 0 <= x and 0 <= y and x + w <= image["width"] and y + h <= image["height"]
    assert seen > 0


# ---------------------------------------------------------------------------------------------------------
# Classes, timelines, splits


def test_event_classes_hold_the_reversal_pairs() -> None:
    assert len(EVENT_CLASSES) >= 10 and len(set(EVENT_CLASSES)) == len(EVENT_CLASSES)
    for a, b in [("move_left", "move_right"), ("move_up", "move_down"), ("grow", "shrink"), ("appear", "disappear")]:
        assert (a, b) in REVERSAL_PAIRS
    assert all(a in EVENT_CLASSES and b in EVENT_CLASSES for a, b in REVERSAL_PAIRS)


def test_default_size_label_distribution_covers_every_class() -> None:
    config = SynthConfig()
    labels = [video_spec(config, key).label for key in item_keys(config, "video") if key.split == "train"]
    counts = np.bincount(labels, minlength=len(EVENT_CLASSES))
    assert counts.min() >= 0.5 * len(labels) / len(EVENT_CLASSES), counts  # roughly balanced


def test_timelines_are_valid_and_the_main_event_is_the_longest() -> None:
    config = config_with(min_frames=16, max_frames=32)
    for index in range(300):
        spec = sample_clip(item_rng(7, "video", "train", index, 0), config)
        h, w, m = config.height, config.width, margin(height=config.height, width=config.width)
        lengths = [e.end - e.start for e in spec.events]
        assert spec.events[0].start == 0 and spec.events[-1].end == spec.num_frames
        assert all(a.end == b.start for a, b in zip(spec.events, spec.events[1:]))
        assert lengths[spec.main] > spec.num_frames / 2
        assert all(n < lengths[spec.main] for i, n in enumerate(lengths) if i != spec.main)
        radii = {word: RADIUS_FRACTION[word] * min(h, w) for word in RADIUS_FRACTION}
        sizes = [o.size for o in spec.objects]
        assert all(s.radius == radii[size] for s, size in zip(spec.initial, sizes))
        for i, e in enumerate(spec.events):
            earlier = [x for x in spec.events[:i] if x.obj == e.obj]
            if e.cls == "appear":
                assert not earlier and spec.initial[e.obj].alpha == 0.0
            else:
                assert e.before.alpha == 1.0  # nothing happens to an invisible object
            assert not (e.cls == "rotate" and spec.objects[e.obj].shape == "circle")
            # Sizes are categorical: grow is exactly small -> large, shrink large -> small (the size word
            # a caption uses is the object's size at the start of the clip).
            assert e.before.radius == radii[sizes[e.obj]]
            if e.cls in ("grow", "shrink"):
                sizes[e.obj] = "large" if e.cls == "grow" else "small"
            assert e.after.radius == radii[sizes[e.obj]]
        for states in clip_states(spec):
            for s in states:
                assert m - 1e-6 <= s.x - s.radius and s.x + s.radius <= w - m + 1e-6
                assert m - 1e-6 <= s.y - s.radius and s.y + s.radius <= h - m + 1e-6


def test_splits_are_disjoint_and_items_unique(tiny: Path, metadata: dict) -> None:
    for kind in ("videos", "images"):
        by_split: dict[str, set[str]] = {}
        for item in metadata[kind]:
            by_split.setdefault(item["split"], set()).add(item["id"])
        assert set(by_split) == {"train", "val", "test"}
        assert sum(map(len, by_split.values())) == len(set().union(*by_split.values()))
    digests = file_hashes(tiny / "videos") | file_hashes(tiny / "images")
    assert len(set(digests.values())) == len(digests)


# ---------------------------------------------------------------------------------------------------------
# Native formats, read the way MSR-VTT, UCF101 and COCO tooling reads them


def test_msrvtt_json(tiny: Path, metadata: dict) -> None:
    data = json.loads((tiny / "annotations" / "msrvtt.json").read_text())
    assert {"info", "videos", "sentences"} <= set(data)
    captions: dict[str, list[str]] = {}
    for s in data["sentences"]:
        captions.setdefault(s["video_id"], []).append(s["caption"])
    assert len({s["sen_id"] for s in data["sentences"]}) == len(data["sentences"])
    labels = {v["id"]: v["label"] for v in metadata["videos"]}
    for v in data["videos"]:
        assert {"video_id", "split", "id", "category", "url", "start time", "end time"} <= set(v)
        assert v["split"] in ("train", "validate", "test")
        assert v["video_id"] == f"video{v['id']}" and (tiny / "videos" / f"{v['video_id']}.mp4").is_file()
        assert v["category"] == labels[v["video_id"]]
        assert len(set(captions[v["video_id"]])) >= 3


def test_ucf101_lists(tiny: Path, metadata: dict) -> None:
    folder = tiny / "annotations" / "ucf101"
    class_ind = dict(line.split() for line in (folder / "classInd.txt").read_text().splitlines())
    assert [class_ind[str(i + 1)] for i in range(len(class_ind))] == list(EVENT_CLASSES)
    labels = {v["file_name"]: v["label"] for v in metadata["videos"]}
    for split in ("train", "val", "test"):
        lines = (folder / f"{split}list01.txt").read_text().splitlines()
        assert lines
        for line in lines:
            path, label = line.split()
            assert (tiny / "videos" / path).is_file() and int(label) - 1 == labels[path]


def test_coco_captions(tiny: Path) -> None:
    annotation_ids = set()
    for split in ("train", "val", "test"):
        data = json.loads((tiny / "annotations" / "coco" / f"captions_{split}.json").read_text())
        assert {"info", "licenses", "images", "annotations"} <= set(data)
        index: dict[int, list[str]] = {img["id"]: [] for img in data["images"]}
        for ann in data["annotations"]:
            index[ann["image_id"]].append(ann["caption"])
            annotation_ids.add(ann["id"])
        for img in data["images"]:
            assert (tiny / "images" / img["file_name"]).is_file() and img["file_name"] == f"image{img['id']}.png"
            assert len(set(index[img["id"]])) >= 3
    assert len(annotation_ids) == sum(
        len(json.loads((tiny / "annotations" / "coco" / f"captions_{s}.json").read_text())["annotations"])
        for s in ("train", "val", "test")
    )


def test_video_references_name_every_event_in_order_under_five_openings(metadata: dict, tiny: Path) -> None:
    """Every reference is ``opening the SIZE COLOUR SHAPE VERB, then ...`` with the size and colour at each
    event's start, and the five differ only in their opening."""
    from seqvision.synth.captions import VERB_PHRASES, VIDEO_OPENINGS

    data = json.loads((tiny / "annotations" / "msrvtt.json").read_text())
    refs: dict[str, list[str]] = {}
    for s in data["sentences"]:
        refs.setdefault(s["video_id"], []).append(s["caption"])
    for video in metadata["videos"]:
        parts = []
        for e in video["events"]:
            shape = video["objects"][e["object"]]["shape"]
            verb = VERB_PHRASES[e["class"]].format(new=e["color_after"])
            parts.append(f"the {e['size_before']} {e['color_before']} {shape} {verb}")
        assert refs[video["id"]] == [f"{o} {', then '.join(parts)}" for o in VIDEO_OPENINGS], video["id"]


def test_event_sizes_follow_the_radius_at_each_event(metadata: dict) -> None:
    """``size_before`` / ``size_after`` (what the captions name) match the object's drawn radius, also after a
    grow or shrink changed it earlier in the clip."""
    changed_earlier = 0
    for video in metadata["videos"]:
        scale = min(video["height"], video["width"])
        resized: set[int] = set()
        for e in video["events"]:
            for when in ("before", "after"):
                assert e[when]["radius"] == pytest.approx(RADIUS_FRACTION[e[f"size_{when}"]] * scale, abs=0.01), e
            changed_earlier += e["object"] in resized
            if e["class"] in ("grow", "shrink"):
                resized.add(e["object"])
    assert changed_earlier > 0  # the tiny preset has clips where a later event's size differs from the start


def test_longest_video_caption_fits_the_token_budget() -> None:
    """Three events with the longest noun and verb phrases stay within tokenize.max_length and within what the
    decoder can emit (evaluate.max_length counts <eos>)."""
    from seqvision.config import EvaluateConfig, TokenizeConfig
    from seqvision.synth.captions import Mention, video_captions

    longest = max(
        len(caption.replace(",", " ").split())
        for cls in EVENT_CLASSES
        for caption in video_captions([Mention(0, "triangle", "magenta", "small", cls, "yellow")] * 3)
    )
    assert longest == 21
    assert longest <= min(TokenizeConfig().max_length, EvaluateConfig().max_length - 1)


# ---------------------------------------------------------------------------------------------------------
# Command line


@pytest.mark.integration
def test_cli_rejects_out_of_range_value(tmp_path: Path) -> None:
    out = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, "-m", "seqvision.synth", "--out", str(out), "--max-objects", "9"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert result.returncode == 2
    assert "max_objects" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_invalid_params_file_names_the_key(tmp_path: Path, capsys) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("synth:\n  seed: 1\n  colour: red\n")
    assert main(["--out", str(tmp_path / "data"), "--params", str(params)]) == 2
    assert "synth.colour" in capsys.readouterr().err
    params.write_text("synth:\n  height: 63\n")
    assert main(["--out", str(tmp_path / "data"), "--params", str(params)]) == 2
    assert "even" in capsys.readouterr().err and not (tmp_path / "data").exists()


def test_precedence_defaults_params_preset_flags(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("synth:\n  seed: 5\n  min_frames: 9\n  noise_std: 2.0\n")
    args = build_parser().parse_args(["--out", "x", "--params", str(params), "--preset", "tiny", "--seed", "7"])
    config = resolve_config(args)
    assert config.seed == 7  # flag beats everything
    assert config.min_frames == 8  # preset beats the params file
    assert config.noise_std == 2.0  # params file beats the embedded default
    assert config.crf == SynthConfig().crf


def test_help_documents_every_knob() -> None:
    text = build_parser().format_help()
    for flag in ("--seed", "--max-objects", "--videos.train", "--long-range", "--long-range-distance",
                 "--held-out-combinations", "--noise-std", "--overwrite"):
        assert flag in text
    assert "range [1, 3]" in text


def test_params_yaml_synth_section_equals_defaults() -> None:
    import yaml

    params = yaml.safe_load((SRC.parent / "params.yaml").read_text())
    assert params["synth"] == to_dict(SynthConfig())


# ---------------------------------------------------------------------------------------------------------
# Existing output: resume, refuse, overwrite


def test_interrupted_run_resumes_to_identical_output(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    shutil.copytree(tiny, out)
    for rel in ("videos/video3.mp4", "videos/video30.mp4", "images/image5.png", "annotations/msrvtt.json"):
        (out / rel).unlink()
    shutil.rmtree(out / "annotations" / "coco")
    (out / "videos" / ".video3.mp4.k2j4x9_a.tmp").write_bytes(b"half a video")
    summary = generate(config_with(workers=1), out, progress=False)
    assert summary.written == 3 and summary.kept == summary.videos + summary.images - 3
    assert file_hashes(out) == file_hashes(tiny)


def test_foreign_content_is_refused_then_kept_with_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    flags = ["--out", str(out), "--preset", "tiny", "--videos.train", "2", "--videos.val", "1", "--videos.test", "1",
             "--images.train", "2", "--images.val", "1", "--images.test", "1", "--workers", "1", "--quiet"]
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and "notes.txt" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(flags + ["--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "annotations" / "msrvtt.json").is_file()


def test_different_config_is_refused_unless_overwrite(tmp_path: Path) -> None:
    from seqvision.synth.generate import OutputFolderError

    out = tmp_path / "data"
    generate(micro(workers=1), out, progress=False)
    with pytest.raises(OutputFolderError, match="seed"):
        generate(micro(workers=1, seed=1), out, progress=False)
    generate(micro(workers=1, seed=1), out, overwrite=True, progress=False)
    assert json.loads((out / "synth.json").read_text())["config"]["seed"] == 1


# ---------------------------------------------------------------------------------------------------------
# Exact reversal pairs


def _specs_of(config: SynthConfig, count: int, *, seed: int) -> list[ClipSpec]:
    return [sample_clip(item_rng(seed, "video", "train", i, 0), config) for i in range(count)]


@pytest.mark.parametrize("long_range", [False, True])
def test_a_reversed_clip_renders_the_forward_frames_backwards(long_range: bool) -> None:
    config = config_with(long_range=long_range, long_range_distance=6, main_event_frames=6, noise_std=0.0)
    specs = _specs_of(config, 40, seed=5)
    assert len({REVERSE[EVENT_CLASSES[s.label]] for s in specs}) >= (6 if long_range else 10)
    for spec in specs:
        back = reverse_clip(spec)
        assert back.label == EVENT_CLASSES.index(REVERSE[EVENT_CLASSES[spec.label]])
        assert [e.end - e.start for e in back.events] == [e.end - e.start for e in reversed(spec.events)]
        assert clip_states(back) == clip_states(spec)[::-1]  # float for float
        forward, backward = (
            render_frames(s.objects, clip_states(s), s.background, np.random.default_rng(0),
                          height=config.height, width=config.width, noise_std=0.0)
            for s in (spec, back)
        )
        assert np.array_equal(backward, forward[::-1])
        again = reverse_clip(back)
        assert again.events == spec.events and again.initial == spec.initial and again.objects == spec.objects


def test_partner_classes_are_drawn_by_reversing_the_forward_class() -> None:
    """Both classes of a pair come from the same forward draws: the partner is that draw reversed."""
    config = config_with()
    seen = set()
    for index in range(200):
        rng = item_rng(3, "video", "train", index, 0)
        spec = sample_clip(rng, config)
        name = EVENT_CLASSES[spec.label]
        if name in {b for _, b in REVERSAL_PAIRS}:
            main = spec.events[spec.main]
            assert main.after == reverse_clip(spec).events[len(spec.events) - 1 - spec.main].before
            seen.add(name)
    assert seen == {b for _, b in REVERSAL_PAIRS}


# >>> order-free statistics (run verbatim against the old generator too; see the report of issue #11)


def visible_view(states: list[list[Any]], objects: int = 3) -> np.ndarray:
    """Per frame and object slot, what the pixels show: float (T, objects, 4) = x, y, radius, alpha. The
    position and size of an invisible object (alpha 0) are NaN, since no pixel shows them; absent slots are
    NaN with alpha 0."""
    out = np.full((len(states), objects, 4), np.nan)
    out[:, :, 3] = 0.0
    out[:, : len(states[0])] = [[(s.x, s.y, s.radius, s.alpha) for s in row] for row in states]
    hidden = out[:, :, 3] <= 0
    out[:, :, :3][hidden] = np.nan
    return out


def _stats(values: np.ndarray) -> list[float]:
    """min, max, mean and std of the finite values (zeros when there are none), rounded to 1e-6: a mean
    summed in the reverse order differs in the last bits, which no pixel shows but a threshold could split."""
    v = values[np.isfinite(values)]
    stats = [v.min(), v.max(), v.mean(), v.std()] if v.size else [0.0] * 4
    return [round(float(x), 6) for x in stats]


def order_free_features(view: np.ndarray, meta: Mapping[str, Any]) -> list[float]:
    """Statistics that do not change when the frames are permuted: per object slot and over all objects,
    min/max/mean/std of x, y, radius and alpha; the number of frames, objects and events; the sorted event
    durations; which colours and shapes occur at any time."""
    features: list[float] = [float(view.shape[0]), float(len(meta["objects"])), float(len(meta["events"]))]
    for j in range(view.shape[1]):
        for k in range(4):
            features += _stats(view[:, j, k])
    for k in range(4):
        features += _stats(view[:, :, k])
    durations = sorted((e["end"] - e["start"] for e in meta["events"]), reverse=True)
    features += [float(d) for d in (durations + [0, 0, 0])[:3]]
    colors = {o["color"] for o in meta["objects"]} | {e["color_after"] for e in meta["events"]}
    shapes = {o["shape"] for o in meta["objects"]}
    features += [float(c in colors) for c in ALL_COLORS] + [float(s in shapes) for s in ALL_SHAPES]
    return features


def order_features(view: np.ndarray) -> list[float]:
    """A positive control that uses frame order: per object slot, last minus first frame of x, y, radius
    (visible values, 0 when hidden) and of alpha."""
    first, last = np.nan_to_num(view[0], nan=0.0), np.nan_to_num(view[-1], nan=0.0)
    return [float(v) for v in (last - first).ravel()]


def last_frames_features(view: np.ndarray, frames: int) -> list[float]:
    """What a model that sees only the last ``frames`` frames could use: every visible quantity of those
    frames in order (hidden values as 0), plus their order-free statistics."""
    tail = view[-frames:]
    features = [float(v) for v in np.nan_to_num(tail, nan=0.0).ravel()]
    for k in range(4):
        features += _stats(tail[:, :, k])
    return features


def stump_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Test accuracy of the best single-feature threshold rule (x > t or x <= t) chosen on the train half."""
    n, best, rule = len(y_train), -1.0, (0, -np.inf, True)
    for f in range(x_train.shape[1]):
        order = np.argsort(x_train[:, f], kind="stable")
        v, y = x_train[order, f], y_train[order]
        # Threshold after position i (x <= v[i] -> 0, x > v[i] -> 1); only between distinct values.
        above = (np.sum(1 - y) - 0.0 + np.sum(y) - np.cumsum(y) + np.cumsum(1 - y) - np.sum(1 - y)) / n
        cut = np.r_[v[1:] != v[:-1], True]
        for accuracy, greater in ((above, True), (1.0 - above, False)):
            i = int(np.argmax(np.where(cut, accuracy, -1.0)))
            if accuracy[i] > best:
                best, rule = float(accuracy[i]), (f, float(v[i]), greater)
    f, threshold, greater = rule
    return float(np.mean((x_test[:, f] > threshold) == (y_test == 1) if greater else (x_test[:, f] <= threshold) == (y_test == 1)))


def logistic_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Test accuracy of an L2-regularised logistic regression (standardised features, gradient descent)."""
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-9
    a, b = (x_train - mean) / std, (x_test - mean) / std
    w, bias = np.zeros(a.shape[1]), 0.0
    for _ in range(500):
        p = 1.0 / (1.0 + np.exp(-(a @ w + bias)))
        w -= 0.5 * (a.T @ (p - y_train) / len(a) + 1e-2 * w)
        bias -= 0.5 * float(np.mean(p - y_train))
    return float(np.mean(((b @ w + bias) > 0) == (y_test == 1)))


def separability(rows: Mapping[str, list[list[float]]], a: str, b: str) -> tuple[float, float]:
    """(stump, logistic) test accuracy of telling class ``a`` from ``b`` by their feature rows: interleaved
    in a fixed random order, fit on the even rows, tested on the odd rows. Chance is about 0.5."""
    x = np.array(rows[a] + rows[b], dtype=np.float64)
    y = np.array([0] * len(rows[a]) + [1] * len(rows[b]), dtype=np.float64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    train, test = slice(0, None, 2), slice(1, None, 2)
    return (
        stump_accuracy(x[train], y[train], x[test], y[test]),
        logistic_accuracy(x[train], y[train], x[test], y[test]),
    )


# <<< order-free statistics

# With ~300 test clips per pair, one standard error of a chance-level accuracy is 0.029: 0.5 + 0.1 leaves
# more than three. (The previous generator scored 0.95 on grow/shrink, 0.72 on move_up/down and 0.64 on
# move_left/right with this very code.)
CHANCE_MARGIN = 0.1


@pytest.mark.slow
def test_no_order_free_statistic_separates_a_reversal_pair() -> None:
    config = SynthConfig()
    free: dict[str, list[list[float]]] = {c: [] for c in EVENT_CLASSES}
    ordered: dict[str, list[list[float]]] = {c: [] for c in EVENT_CLASSES}
    for i in range(3600):
        key = ItemKey("video", "train", i, i)
        spec = sample_clip(item_rng(11, "video", "train", i, 0), config)
        meta = video_record(config, key, spec).metadata
        view = visible_view(clip_states(spec))
        free[meta["label_name"]].append(order_free_features(view, meta))
        ordered[meta["label_name"]].append(order_features(view))
    for a, b in REVERSAL_PAIRS:
        assert min(len(free[a]), len(free[b])) >= 250
        stump, logistic = separability(free, a, b)
        assert max(stump, logistic) < 0.5 + CHANCE_MARGIN, (a, b, stump, logistic)
        # The same classifiers do find the pair's difference once they may look at frame order.
        assert max(separability(ordered, a, b)) > 0.8, (a, b)


# ---------------------------------------------------------------------------------------------------------
# Long-range mode


def long_range_config(**overrides) -> SynthConfig:
    return micro(long_range=True, long_range_distance=10, main_event_frames=8, **overrides)


def test_long_range_layout_puts_the_labelled_event_exactly_d_frames_from_the_end() -> None:
    config = long_range_config()
    distance, total = 10, long_range_frames(config)
    assert total == 2 * distance + 2 * FADE_FRAMES + 8 - 2
    for i, spec in enumerate(_specs_of(config, 60, seed=2)):
        meta = video_record(config, ItemKey("video", "train", 0, 0), spec).metadata
        assert meta["num_frames"] == total and meta["label_name"] in LONG_RANGE_CLASSES
        assert [e["class"] for e in meta["events"]] == ["appear", meta["label_name"], "disappear"]
        states = clip_states(spec)
        target = meta["events"][meta["main_event"]]["object"]
        visible = [t for t, row in enumerate(states) if row[target].alpha > 0]
        # The labelled object is visible in one run of frames, exactly D frames from either end.
        assert visible == list(range(distance, total - distance))
        assert meta["long_range"] == {"distance": distance, "visible_frames": [distance, total - 1 - distance]}
        first, last = meta["main_frames"]
        assert (first, last) == (distance - 1 + FADE_FRAMES, distance - 1 + FADE_FRAMES + 8 - 1)
        assert total - 1 - last == distance + FADE_FRAMES - 1  # then the fade-out, then D hidden frames
        # Distractors walk for the whole clip; the metadata holds their offsets frame by frame.
        walk = meta["distractor"]
        assert walk["kind"] == "walk" and len(walk["offsets"]) == total
        assert walk["objects"] == [j for j in range(len(meta["objects"])) if j != target]
        for j_index, j in enumerate(walk["objects"]):
            xs = [states[t][j].x for t in range(total)]
            assert max(xs) - min(xs) > 1.0  # folded at the borders, never stuck there
            assert all(abs(states[t][j].x - (meta["objects"][j]["initial"]["x"] + walk["offsets"][t][j_index][0]))
                       < 0.02 for t in range(total))


@pytest.mark.slow
def test_long_range_label_is_invisible_to_order_free_and_last_frames_views() -> None:
    """At chance: any order-free statistic (so also a bag of frames or shuffled frames), and everything in the
    last D frames; the labelled event itself is visible to the same classifiers (positive control)."""
    config = long_range_config()
    distance, total = 10, long_range_frames(config)
    free: dict[str, list[list[float]]] = {c: [] for c in LONG_RANGE_CLASSES}
    tail: dict[str, list[list[float]]] = {c: [] for c in LONG_RANGE_CLASSES}
    window: dict[str, list[list[float]]] = {c: [] for c in LONG_RANGE_CLASSES}
    for spec in _specs_of(config, 1800, seed=4):
        meta = video_record(config, ItemKey("video", "train", 0, 0), spec).metadata
        view = visible_view(clip_states(spec))
        free[meta["label_name"]].append(order_free_features(view, meta))
        tail[meta["label_name"]].append(last_frames_features(view, distance))
        window[meta["label_name"]].append(order_features(view[distance : total - distance]))
    for a, b in [p for p in REVERSAL_PAIRS if p[0] in LONG_RANGE_CLASSES]:
        for name, rows in (("order-free", free), ("last D frames", tail)):
            stump, logistic = separability(rows, a, b)
            assert max(stump, logistic) < 0.5 + CHANCE_MARGIN, (name, a, b, stump, logistic)
        assert max(separability(window, a, b)) > 0.8, (a, b)


@pytest.mark.slow
def test_long_range_clips_are_written_and_captioned(tmp_path: Path) -> None:
    decord = pytest.importorskip("decord")
    config = long_range_config(workers=1)
    out = tmp_path / "data"
    generate(config, out, progress=False)
    meta = json.loads((out / "annotations" / "metadata.json").read_text())
    sentences = json.loads((out / "annotations" / "msrvtt.json").read_text())["sentences"]
    for video in meta["videos"]:
        total = long_range_frames(config)
        assert video["num_frames"] == total
        assert len(decord.VideoReader(str(out / "videos" / video["file_name"]))) == total
        refs = [s["caption"] for s in sentences if s["video_id"] == video["id"]]
        assert len(refs) >= 3


# ---------------------------------------------------------------------------------------------------------
# Compositional image split, no copied scenes


def test_held_out_combinations_keep_every_colour_and_shape_in_training() -> None:
    combos = held_out_combinations(0, 4)
    assert len(combos) == 4 and len({c for c, _ in combos}) == 4 and {s for _, s in combos} == set(SHAPES)
    assert held_out_combinations(0, 4) == combos and held_out_combinations(1, 4) != combos
    assert held_out_combinations(0, 0) == ()


def test_test_images_are_compositional_about_half_the_time_and_never_copy_a_train_scene() -> None:
    config = SynthConfig()
    held_out = set(held_out_combinations(config.seed, config.held_out_combinations))
    train = train_signatures(config)
    compositional = 0
    for key in item_keys(config, "image"):
        scene = image_scene(config, key)
        shows = any((o.color, o.shape) in held_out for o in scene.objects)
        assert scene.compositional == shows
        if key.split == "train":
            assert not shows
            continue
        assert scene_signature(scene.objects, scene.relations, scene.regions) not in train
        if key.split == "val":
            assert not shows
        else:
            compositional += shows
    assert 0.35 * config.images.test <= compositional <= 0.65 * config.images.test


def test_metadata_records_the_compositional_split(tiny: Path, metadata: dict) -> None:
    assert [tuple(c) for c in metadata["held_out_combinations"]] == list(held_out_combinations(0, 4))
    for image in metadata["images"]:
        assert image["compositional"] == (image["split"] == "test" and any(
            [o["color"], o["shape"]] in metadata["held_out_combinations"] for o in image["objects"]))


def test_image_references_name_every_object_and_relation(tiny: Path, metadata: dict) -> None:
    from seqvision.synth.captions import IMAGE_OPENINGS

    coco = {}
    for split in ("train", "val", "test"):
        data = json.loads((tiny / "annotations" / "coco" / f"captions_{split}.json").read_text())
        for ann in data["annotations"]:
            coco.setdefault(f"image{ann['image_id']}", []).append(ann["caption"])
    for image in metadata["images"]:
        refs = coco[image["id"]]
        assert [r.split(" a ")[0] for r in refs] == list(IMAGE_OPENINGS)
        for ref in refs:
            for o in image["objects"]:
                assert f"{o['size']} {o['color']} {o['shape']}" in ref, ref
            assert ref.count(" of ") + ref.count("above") + ref.count("below") + ref.count("under") + ref.count(
                "higher") == len(image["relations"]) or len(image["objects"]) == 1, ref


def test_a_configuration_without_valid_scenes_is_one_clear_error(tmp_path: Path, monkeypatch, capsys) -> None:
    from seqvision.synth import items

    class Everything(frozenset):
        def __contains__(self, _: object) -> bool:
            return True

    monkeypatch.setattr(items, "SCENE_ATTEMPTS", 20)
    monkeypatch.setattr(items, "train_signatures", lambda config: Everything())
    flags = ["--out", str(tmp_path / "data"), "--preset", "tiny", "--videos.train", "1", "--videos.val", "1",
             "--videos.test", "1", "--images.train", "1", "--images.val", "1", "--images.test", "1",
             "--workers", "1", "--quiet"]
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert "unlike every train scene" in err and "synth.images.train" in err and "Traceback" not in err
