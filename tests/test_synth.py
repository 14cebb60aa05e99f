"""The synthetic benchmark generator: determinism, native formats, labels that match pixels, CLI, resume."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seqvision.config import SYNTH_PRESETS, SynthConfig, from_mapping, merge, to_dict
from seqvision.synth.events import EVENT_CLASSES, REVERSAL_PAIRS
from seqvision.synth.generate import generate
from seqvision.synth.__main__ import build_parser, main, resolve_config
from seqvision.synth.events import (
    JITTER_FRACTION,
    ClipSpec,
    Event,
    apply_event,
    clip_states,
    sample_clip,
)
from seqvision.synth.items import item_keys, item_rng, video_spec
from seqvision.synth.render import render_frames
from seqvision.synth.scene import COLORS, Background, ObjectSpec, ObjectState, margin

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
    """A large red square in the middle of a grey frame doing ``cls``, rendered without noise."""
    rng = np.random.default_rng(0)
    state = ObjectState(x=size / 2, y=size / 2, radius=0.16 * size, angle=0.0, rgb=COLORS["red"], alpha=1.0)
    before, after, new_color, hop = apply_event(
        rng, cls, state, "red", taken_colors={"red"}, height=size, width=size
    )
    event = Event(0, cls, 2, 2 + frames, before, after, "red", new_color, hop)
    spec = ClipSpec(
        num_frames=frames + 4,
        objects=(ObjectSpec("square", "red", "large"),),
        initial=(before,),
        events=(event,),
        main=0,
        background=Background(rgb=(90.0, 90.0, 90.0), waves=()),
        distractor_start=None,
        jitter=None,
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
    elif cls in ("grow", "shrink"):
        ratio = red_last.sum() / red_first.sum()
        assert (ratio > 1.7**2 * 0.85) if cls == "grow" else (ratio < 0.6**2 * 1.2)
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
        for i, e in enumerate(spec.events):
            earlier = [x for x in spec.events[:i] if x.obj == e.obj]
            if e.cls == "appear":
                assert not earlier and spec.initial[e.obj].alpha == 0.0
            else:
                assert e.before.alpha == 1.0  # nothing happens to an invisible object
            assert not (e.cls == "rotate" and spec.objects[e.obj].shape == "circle")
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


def test_video_captions_name_the_events_in_order(metadata: dict, tiny: Path) -> None:
    from seqvision.synth.captions import VERB_PHRASES

    data = json.loads((tiny / "annotations" / "msrvtt.json").read_text())
    first: dict[str, str] = {}
    for s in data["sentences"]:
        first.setdefault(s["video_id"], s["caption"])  # reference 1: "the X <verb>, then the Y <verb>"
    for video in metadata["videos"]:
        parts = first[video["id"]].split(", then ")
        assert len(parts) == len(video["events"]), first[video["id"]]
        for i, (part, e) in enumerate(zip(parts, video["events"])):
            shape = video["objects"][e["object"]]["shape"]
            if part.startswith("it "):
                assert i > 0 and video["events"][i - 1]["object"] == e["object"]
            else:
                assert part.startswith("the ") and f"{e['color_before']} {shape}" in part, part
            verbs = [v.format(old=e["color_before"], new=e["color_after"]) for v, _ in VERB_PHRASES[e["class"]]]
            assert any(part.endswith(" " + v) for v in verbs), part


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
    for flag in ("--seed", "--max-objects", "--videos.train", "--long-range", "--noise-std", "--overwrite"):
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
# Long-range mode


@pytest.mark.slow
def test_long_range_clip_puts_the_labelled_event_first(tmp_path: Path) -> None:
    decord = pytest.importorskip("decord")
    config = micro(workers=1, long_range=True, long_range_frames=128, main_event_frames=12)
    out = tmp_path / "data"
    generate(config, out, progress=False)
    meta = json.loads((out / "annotations" / "metadata.json").read_text())
    sentences = json.loads((out / "annotations" / "msrvtt.json").read_text())["sentences"]
    for video in meta["videos"]:
        assert video["num_frames"] == 128 and len(decord.VideoReader(str(out / "videos" / video["file_name"]))) == 128
        (event,) = video["events"]
        assert (event["start"], event["end"]) == (0, 12) and video["label_name"] == event["class"]
        assert video["distractor"]["start"] == 12 and video["distractor"]["end"] == 128
        refs = [s["caption"] for s in sentences if s["video_id"] == video["id"]]
        assert len(refs) >= 3 and all(" then " not in r and " after " not in r for r in refs)
    # The tail only jitters: every object stays within the jitter bound of where the main event left it.
    for index in range(20):
        spec = sample_clip(item_rng(3, "video", "train", index, 0), config)
        states = clip_states(spec)
        rest = states[spec.distractor_start - 1]
        limit = JITTER_FRACTION * min(config.height, config.width) + 1e-9
        for frame in states[spec.distractor_start :]:
            for j, (s, r) in enumerate(zip(frame, rest)):
                assert abs(s.x - r.x) <= limit and abs(s.y - r.y) <= limit and s.radius == r.radius
                if j == spec.events[0].obj and len(spec.objects) > 1:
                    assert (s.x, s.y) == (r.x, r.y)
