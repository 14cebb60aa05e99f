"""pipelines.extract: the Prefect flow end to end on a tiny folder, and the CLI's clean errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines import extract, tokenize
from seqvision import frames
from seqvision.annotations import AnnotationError
from seqvision.config import DataConfig
from tests.test_video import STEP, brightness, write_video


def tiny_dataset(root: Path, *, bad_videos: int = 0) -> dict[str, str]:
    """MSR-VTT-style captioned videos + COCO-style captioned images; returns the data flags."""
    videos, images, notes = root / "videos", root / "images", root / "annotations"
    for folder in (videos, images, notes / "coco"):
        folder.mkdir(parents=True)
    splits = {"video0": "train", "video1": "train", "video2": "validate", "video3": "test"}
    for i, name in enumerate(splits):
        write_video(videos / f"{name}.mp4", num_frames=10 + 2 * i)
    for i in range(bad_videos):
        splits[f"broken{i}"] = "train"
        (videos / f"broken{i}.mp4").write_text("not a video")
    msrvtt = {
        "videos": [{"video_id": v, "split": s} for v, s in splits.items()],
        "sentences": [{"video_id": v, "caption": f"a clip called {v}", "sen_id": i} for i, v in enumerate(splits)],
    }
    (notes / "msrvtt.json").write_text(json.dumps(msrvtt))
    for k, split in enumerate(["train", "val", "test"]):
        Image.fromarray(np.full((20, 24, 3), 40 * (k + 1), np.uint8)).save(images / f"image{k}.png")
        coco = {"images": [{"id": k, "file_name": f"image{k}.png", "width": 24, "height": 20}],
                "annotations": [{"id": k, "image_id": k, "caption": "a flat grey square"}]}
        (notes / "coco" / f"captions_{split}.json").write_text(json.dumps(coco))
    return dict(video_dir=str(videos), video_captions=str(notes / "msrvtt.json"), video_captions_format="msrvtt",
                activity_dir="", image_dir=str(images), image_captions_dir=str(notes / "coco"), karpathy_split="")


def tiny_params(path: Path, **extract_section) -> Path:
    section = {"num_frames": 4, "resize": [32, 32], "workers": 1, **extract_section}
    path.write_text(yaml.safe_dump({"extract": section}))
    return path


@pytest.mark.slow
def test_flow_writes_shards_index_and_skips(tmp_path, prefect_harness):
    data = tiny_dataset(tmp_path / "data", bad_videos=1)
    out = tmp_path / "frames"
    params = tiny_params(tmp_path / "params.yaml", max_skipped_fraction=0.5)
    stats = extract.extract_flow(params=str(params), out=str(out), progress=False, data=DataConfig(**data))

    assert stats["videos"] == 4 and stats["images"] == 3 and stats["skipped"] == 1
    assert stats["decoders"] == {"decord": 4}
    names = sorted(p.name for p in out.iterdir())
    assert names == ["images-test-000.npy", "images-train-000.npy", "images-val-000.npy", "index.json",
                     "skipped.json", "videos-test-000.npy", "videos-train-000.npy", "videos-val-000.npy"]
    index = json.loads((out / "index.json").read_text())
    assert index["config"]["num_frames"] == 4
    by_id = {e["id"]: e for e in index["videos"]}
    assert by_id["video2"]["split"] == "val" and by_id["video3"]["split"] == "test"
    for entry in index["videos"]:
        clip = np.load(out / entry["shard"], mmap_mode="r")[entry["row"]]
        assert clip.shape == (4, 32, 32, 3)
        np.testing.assert_allclose(brightness(np.asarray(clip)), STEP * np.array(entry["frame_indices"]), atol=4)
    image = np.load(out / "images-val-000.npy")
    assert image.shape == (1, 32, 32, 3) and abs(int(image.mean()) - 80) <= 1
    skipped = json.loads((out / "skipped.json").read_text())
    assert [s["id"] for s in skipped] == ["broken0"] and "not a readable video" in skipped[0]["reason"]


@pytest.mark.slow
def test_flow_fails_cleanly_when_too_many_files_are_skipped(tmp_path, prefect_harness, capsys):
    data = tiny_dataset(tmp_path / "data", bad_videos=2)
    params = tiny_params(tmp_path / "params.yaml", max_skipped_fraction=0.2)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in data.items()]
    code = extract.main(["--params", str(params), "--out", str(tmp_path / "frames"), "--no-progress", *flags])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("extract: error: 2 of 6 videos (33.3%) could not be decoded")
    assert "max_skipped_fraction = 0.2" in err and "skipped.json" in err
    assert not (tmp_path / "frames" / "index.json").exists()


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("unknown_key", "extract.num_frame: unknown key"),
        ("missing_params", "no such params file"),
        ("missing_video_dir", "no such folder"),
        ("missing_captions", "no such file or folder"),
    ],
)
def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys, problem, expected):
    data = tiny_dataset(tmp_path / "data")
    params = tiny_params(tmp_path / "params.yaml")
    if problem == "unknown_key":
        params.write_text("extract:\n  num_frame: 8\n")
    elif problem == "missing_params":
        params = tmp_path / "nope.yaml"
    elif problem == "missing_video_dir":
        data["video_dir"] = str(tmp_path / "no-videos")
    elif problem == "missing_captions":
        data["video_captions"] = str(tmp_path / "no-captions.json")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in data.items()]
    code = extract.main(["--params", str(params), "--out", str(tmp_path / "frames"), *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("extract: error: ") and expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "frames").exists()


def test_help_documents_inputs_and_outputs(capsys):
    with pytest.raises(SystemExit) as exit_:
        extract.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--params", "--video-dir", "--karpathy-split", "--out", "index.json", "skipped.json",
                   "videos-{split}-{k:03d}.npy"):
        assert needle in text


@pytest.mark.slow
def test_shard_tasks_retry_io_errors_only(tmp_path, prefect_harness, monkeypatch):
    from seqvision import frames

    data = tiny_dataset(tmp_path / "data")
    params = tiny_params(tmp_path / "params.yaml")
    calls: dict[str, int] = {}
    real = frames.FrameExtractor.extract_shard

    def flaky(self, plan, error=OSError):
        calls[plan.name] = calls.get(plan.name, 0) + 1
        if calls[plan.name] == 1:
            raise error("disk hiccup")
        return real(self, plan)

    monkeypatch.setattr(extract, "extract_shard", extract.extract_shard.with_options(retry_delay_seconds=0))
    monkeypatch.setattr(frames.FrameExtractor, "extract_shard", flaky)
    stats = extract.extract_flow(params=str(params), out=str(tmp_path / "a"), progress=False, data=DataConfig(**data))
    assert stats["videos"] == 4 and set(calls.values()) == {2}  # every shard failed once, then succeeded

    calls.clear()
    monkeypatch.setattr(frames.FrameExtractor, "extract_shard",
                        lambda self, plan: flaky(self, plan, error=ValueError))
    with pytest.raises(ValueError, match="disk hiccup"):
        extract.extract_flow(params=str(params), out=str(tmp_path / "b"), progress=False, data=DataConfig(**data))
    assert list(calls.values()) == [1], "a non-I/O error must not be retried"


@pytest.mark.parametrize("empty", ["video_captions", "image_captions_dir"])
def test_an_empty_val_split_stops_extract_and_tokenize_naming_its_source(tmp_path, empty):
    """#13 item 9: MSR-VTT without "validate" videos, or COCO without a val captions file, used to pass extract,
    tokenize, encoder and features, and stop only train ("the data has no videos in its val split"). Now the first
    stages refuse it, naming the file and its data key. The tasks' functions run here without Prefect (fast); the
    one-line output of a usage error raised in a task is test_common.py's
    test_a_bad_annotation_file_is_one_line_without_tracebacks."""
    data = tiny_dataset(tmp_path / "data")
    notes = tmp_path / "data" / "annotations"
    if empty == "video_captions":
        msrvtt = json.loads((notes / "msrvtt.json").read_text())
        for video in msrvtt["videos"]:
            video["split"] = video["split"].replace("validate", "train")
        (notes / "msrvtt.json").write_text(json.dumps(msrvtt))
        named = f"{notes / 'msrvtt.json'} (data.video_captions): no captioned video in the val split (3 train, 0 val"
    else:
        (notes / "coco" / "captions_val.json").unlink()
        named = f"{notes / 'coco'} (data.image_captions_dir): no image in the val split (1 train, 0 val, 1 test)"
    for load in (extract.load_records, tokenize.load_corpora):
        with pytest.raises(AnnotationError, match="^" + re.escape(named)):
            load.fn(DataConfig(**data))
