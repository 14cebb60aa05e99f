"""seqvision.frames: shards, index and skips on tiny synthesized videos and images (no annotations needed)."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from seqvision import frames, sampling
from seqvision.config import ExtractConfig
from tests.test_video import BAD_KINDS, STEP, brightness, make_bad, write_video


class Rec(NamedTuple):
    id: str
    path: Path
    split: str


def tiny_config(**overrides) -> ExtractConfig:
    base = dict(num_frames=6, resize=(32, 32), shard_size=8, workers=1, max_skipped_fraction=0.0)
    return dataclasses.replace(ExtractConfig(), **{**base, **overrides})


def load_index(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())


@pytest.mark.parametrize("method", ["uniform", "segment", "dense"])
def test_extracted_frames_are_the_sampled_frames(tmp_path, method):
    lengths = {"a": 24, "b": 13, "c": 4}  # c is shorter than num_frames
    records = [Rec(v, write_video(tmp_path / f"{v}.mp4", num_frames=n), split)
               for (v, n), split in zip(lengths.items(), ["train", "train", "val"])]
    config = tiny_config(sampling=method, frame_stride=2, seed=5)
    out = tmp_path / "frames"
    result = frames.extract(records, [], out, config=config, progress=False)

    assert sorted(p.name for p in out.iterdir()) == ["index.json", "skipped.json", "videos-train-000.npy",
                                                     "videos-val-000.npy"]
    index = load_index(out)
    assert index["config"]["sampling"] == method and index["images"] == []
    assert [e["id"] for e in index["videos"]] == ["a", "b", "c"] == [e.id for e in result.videos]
    for entry in index["videos"]:
        shard = np.load(out / entry["shard"], mmap_mode="r")
        assert shard.dtype == np.uint8 and shard.shape[1:] == (6, 32, 32, 3)
        clip = np.asarray(shard[entry["row"]])
        n = lengths[entry["id"]]
        expected = sampling.sample(n, method=method, num_frames=6, frame_stride=2,
                                   train=entry["split"] == "train", seed=5, key=entry["id"])
        assert entry["frame_indices"] == expected.indices.tolist()
        assert entry["num_valid"] == expected.num_valid and entry["num_source_frames"] == n
        assert entry["decoder"] == "decord"
        # the pixels are the frames the index claims
        np.testing.assert_allclose(brightness(clip), STEP * np.array(entry["frame_indices"]), atol=4)
    short = next(e for e in index["videos"] if e["id"] == "c")  # 4 frames, 6 wanted: the short-clip rule
    if method == "dense":  # stride 2 fits two real frames
        assert short["num_valid"] == 2 and short["frame_indices"] == [0, 2, 2, 2, 2, 2]
    else:
        assert short["num_valid"] == 4 and short["frame_indices"] == [0, 1, 2, 3, 3, 3]
    assert json.loads((out / "skipped.json").read_text()) == []


def test_every_awkward_video_is_decoded_or_skipped_with_a_reason(tmp_path, caplog):
    records = []
    for kind in BAD_KINDS:
        folder = tmp_path / kind
        folder.mkdir()
        records.append(Rec(kind, make_bad(kind, folder), "train"))
    records.append(Rec("missing", tmp_path / "missing.mp4", "train"))
    out = tmp_path / "frames"
    with caplog.at_level(logging.WARNING, logger="seqvision.frames"):
        result = frames.extract(records, [], out, config=tiny_config(max_skipped_fraction=1.0), progress=False)

    skipped = {s["id"]: s for s in json.loads((out / "skipped.json").read_text())}
    decoded = {e["id"]: e for e in load_index(out)["videos"]}
    for kind, (outcome, expected) in BAD_KINDS.items():
        if outcome == "skipped":
            assert kind in skipped and kind not in decoded, kind
            assert skipped[kind]["path"] == str(records[list(BAD_KINDS).index(kind)].path)
            assert expected is not None and re.search(expected, skipped[kind]["reason"]), kind
        else:
            assert kind in decoded and kind not in skipped, (kind, skipped.get(kind))
            if expected is not None:
                assert decoded[kind]["decoder"] == expected, kind
    assert skipped["missing"]["reason"] == "file not found"
    assert len(result.skipped) == len(skipped) == 1 + sum(o == "skipped" for o, _ in BAD_KINDS.values())

    # one warning line per skipped file, no traceback
    warnings = [r for r in caplog.records if r.name == "seqvision.frames" and r.levelno == logging.WARNING]
    assert len(warnings) == len(skipped)
    for record in warnings:
        assert record.exc_info is None and "\n" not in record.getMessage()

    # rows were compacted: each shard holds exactly its decoded videos, with no gaps
    for name in {e["shard"] for e in decoded.values()}:
        rows = sorted(e["row"] for e in decoded.values() if e["shard"] == name)
        assert rows == list(range(len(np.load(out / name, mmap_mode="r")))), name


def test_too_many_skipped_fails_naming_fraction_limit_and_file(tmp_path):
    records = [Rec("good1", write_video(tmp_path / "g1.mp4"), "train"),
               Rec("good2", write_video(tmp_path / "g2.mp4"), "test"),
               Rec("bad", make_bad("not_a_video", tmp_path), "train")]
    out = tmp_path / "frames"
    with pytest.raises(frames.TooManySkipped) as err:
        frames.extract(records, [], out, config=tiny_config(max_skipped_fraction=0.05), progress=False)
    message = str(err.value)
    assert "1 of 3 videos (33.3%)" in message and "max_skipped_fraction = 0.05" in message
    assert str(out / "skipped.json") in message
    assert not (out / "index.json").exists(), "a failed run must not publish an index"
    assert json.loads((out / "skipped.json").read_text())[0]["id"] == "bad"
    # exactly at the limit is fine
    frames.extract(records, [], out, config=tiny_config(max_skipped_fraction=1 / 3), progress=False)
    assert (out / "index.json").exists()


def test_shards_fill_in_order_and_stale_shards_are_removed(tmp_path):
    records = [Rec(f"v{i}", write_video(tmp_path / f"v{i}.mp4", num_frames=8), "train") for i in range(5)]
    out = tmp_path / "frames"
    out.mkdir()
    (out / "videos-train-007.npy").write_bytes(b"stale")  # from an earlier run with other settings
    (out / "keep-me.txt").write_text("not ours")
    ran, lines = [], []

    def run_shard(extractor, plan):  # what the extract flow passes: its per-shard Prefect task
        ran.append(plan.name)
        return extractor.extract_shard(plan)

    frames.extract(records, [], out, config=tiny_config(shard_size=2), progress=False, run_shard=run_shard,
                   log_line=lines.append)
    assert ran == ["videos-train-000.npy", "videos-train-001.npy", "videos-train-002.npy"]
    assert lines == ["5 videos, 0 images -> 3 shards, 1 worker(s)"]
    index = load_index(out)
    assert [(e["shard"], e["row"]) for e in index["videos"]] == [
        ("videos-train-000.npy", 0), ("videos-train-000.npy", 1),
        ("videos-train-001.npy", 0), ("videos-train-001.npy", 1), ("videos-train-002.npy", 0)]
    assert [len(np.load(out / f"videos-train-00{k}.npy", mmap_mode="r")) for k in range(3)] == [2, 2, 1]
    assert not (out / "videos-train-007.npy").exists() and (out / "keep-me.txt").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def _write_images(folder: Path) -> list[Rec]:
    folder.mkdir()
    red = np.zeros((20, 30, 3), np.uint8)
    red[..., 0] = 200
    Image.fromarray(red).save(folder / "red.png")
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(folder / "grey.jpg", quality=95)
    Image.fromarray(np.full((12, 12), 150, np.uint8), mode="L").save(folder / "gray8.png")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 2], rgba[..., 3] = 220, 255
    Image.fromarray(rgba, mode="RGBA").save(folder / "rgba.png")
    tall = np.zeros((40, 20, 3), np.uint8)
    tall[:10] = 255  # white band at the top of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display -> the band ends up on the right
    Image.fromarray(tall).save(folder / "exif.jpg", exif=exif, quality=95)
    data = (folder / "red.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "text.png").write_text("not an image")
    names = ["red", "grey", "gray8", "rgba", "exif", "truncated", "text"]
    return [Rec(n, next(folder.glob(f"{n}.*")), "val" if n == "grey" else "train") for n in names]


def test_images_are_decoded_resized_and_bad_ones_skipped(tmp_path):
    records = _write_images(tmp_path / "images")
    out = tmp_path / "frames"
    result = frames.extract([], records, out, config=tiny_config(max_skipped_fraction=0.5), progress=False)
    skipped = {s.id: s.reason for s in result.skipped}
    assert set(skipped) == {"truncated", "text"}
    assert skipped["text"] == "not a readable image"
    index = load_index(out)
    assert [e["id"] for e in index["images"]] == ["red", "gray8", "rgba", "exif", "grey"]
    train = np.load(out / "images-train-000.npy")
    assert train.dtype == np.uint8 and train.shape == (4, 32, 32, 3)
    assert np.abs(train[0].astype(int) - [200, 0, 0]).max() <= 1  # red
    assert np.abs(train[1].astype(int) - 150).max() <= 1  # grayscale -> three equal channels
    assert np.abs(train[2].astype(int) - [0, 0, 220]).max() <= 1  # alpha dropped
    exif = train[3].mean(axis=(0, 2))  # column brightness after applying EXIF orientation
    assert exif[-4:].min() > 200 and exif[:16].max() < 30
    assert np.abs(np.load(out / "images-val-000.npy")[0].astype(int) - 90).max() <= 3


def test_plan_rejects_duplicate_ids_and_unknown_splits(tmp_path):
    with pytest.raises(ValueError, match="appears twice"):
        frames.plan_shards([Rec("a", tmp_path, "train"), Rec("a", tmp_path, "val")], kind="videos", shard_size=4)
    with pytest.raises(ValueError, match="split 'dev'"):
        frames.plan_shards([Rec("a", tmp_path, "dev")], kind="videos", shard_size=4)


@pytest.mark.slow
def test_process_pool_gives_the_same_shards_as_in_process(tmp_path):
    records = [Rec(f"v{i}", write_video(tmp_path / f"v{i}.mp4", num_frames=10 + i), "train") for i in range(6)]
    records.append(Rec("bad", make_bad("zero_byte", tmp_path), "train"))
    config = tiny_config(sampling="segment", max_skipped_fraction=0.5)
    one = frames.extract(records, [], tmp_path / "one", config=config, workers=1, progress=False)
    two = frames.extract(records, [], tmp_path / "two", config=config, workers=2, progress=False)
    assert one == two
    assert np.array_equal(np.load(tmp_path / "one" / "videos-train-000.npy"),
                          np.load(tmp_path / "two" / "videos-train-000.npy"))
