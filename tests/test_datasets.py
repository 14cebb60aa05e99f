"""Datasets over tiny frame shards and feature arrays written in tmp_path; collate; deterministic loaders."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from seqvision.annotations import ImageRecord, VideoRecord, activity_labels
from seqvision.config import TokenizeConfig
from seqvision.datasets import (
    ActivityDataset,
    CaptionBatch,
    ClipBatch,
    EpochSampler,
    ImageCaptionDataset,
    VideoCaptionDataset,
    VisualStore,
    make_loader,
)
from seqvision.vocab import BOS_ID, EOS_ID, PAD_ID, Vocab, tokenize_corpus, write_corpus

T, H, W, D, G = 4, 6, 6, 8, 5
# Train videos in two shards (3 + 2 rows, listed out of order in the index); v9 was skipped by extraction.
VIDEO_SHARDS = {0: ["v3", "v0", "v4"], 1: ["v1", "v2"]}
IMAGE_SHARDS = {0: ["i1", "i0"]}
NUM_VALID = {"v0": 4, "v1": 2, "v2": 4, "v3": 3, "v4": 1}


def value_of(item_id: str) -> int:
    """Every pixel / feature of an item holds its number, so rows can be traced back to ids."""
    return int(item_id[1:]) + 1


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artifacts")
    frames, features, tokens = root / "frames", root / "features", root / "tokens"
    frames.mkdir(), features.mkdir()
    index = {"config": {"num_frames": T}, "videos": [], "images": []}
    video_rows, image_rows = [], []
    for shard, ids in VIDEO_SHARDS.items():
        arr = np.stack([np.full((T, H, W, 3), value_of(i), np.uint8) for i in ids])
        np.save(frames / f"videos-train-{shard:03d}.npy", arr)
        for row, i in enumerate(ids):
            index["videos"].append({"id": i, "split": "train", "shard": shard, "row": row,
                                    "frame_indices": list(range(T)), "num_valid": NUM_VALID[i],
                                    "num_source_frames": 9, "decoder": "pyav"})
            video_rows.append(np.full((T, D), value_of(i), np.float16))
    for shard, ids in IMAGE_SHARDS.items():
        arr = np.stack([np.full((H, W, 3), value_of(i), np.uint8) for i in ids])
        np.save(frames / f"images-train-{shard:03d}.npy", arr)
        for row, i in enumerate(ids):
            # extract names shards by file name; an integer shard number is accepted too (videos above)
            index["images"].append({"id": i, "split": "train", "shard": f"images-train-{shard:03d}.npy", "row": row})
            image_rows.append(np.full((G, D), value_of(i), np.float16))
    index["videos"].append({"id": "v7", "split": "val", "shard": 0, "row": 0, "num_valid": T})  # other split
    index["videos"].reverse()  # entry order must not matter: rows are placed by (shard, row)
    (frames / "index.json").write_text(json.dumps(index))
    np.save(features / "videos-train.npy", np.stack(video_rows))  # (n, T, D) in shard-row order
    np.save(features / "images-train.npy", np.stack(image_rows))  # (n, G, D)
    (features / "index.json").write_text(json.dumps(index))

    p = Path("unused")
    videos = [
        VideoRecord(f"v{k}", p, "train", k % 2, tuple(f"clip {k} caption number {c}" + " more" * c for c in range(3)))
        for k in [0, 1, 2, 3, 4, 9]
    ]
    images = [ImageRecord("i0", p, "train", ("a red ball", "a ball")), ImageRecord("i1", p, "train", ("a dog",))]
    config = TokenizeConfig(min_count=1, max_length=6)
    write_corpus(tokenize_corpus(videos, config), tokens / "video")
    write_corpus(tokenize_corpus(images, config), tokens / "image")
    return {"frames": frames, "features": features, "tokens": tokens}


@pytest.fixture(params=["frames", "features"])
def source(request, artifacts) -> Path:
    return artifacts[request.param]


# ------------------------------------------------------------------------------------------ store


def test_store_maps_ids_to_rows_over_memmaps(source):
    store = VisualStore(source, kind="videos", split="train")
    assert store.source == source.name
    assert store.ids == ["v3", "v0", "v4", "v1", "v2"]  # shard-row order, val entry excluded
    for item_id in store.ids:
        row = store.row(item_id)
        assert isinstance(row, np.memmap)  # nothing loaded whole
        assert (np.asarray(row) == value_of(item_id)).all()
        assert store.length(item_id) == NUM_VALID[item_id]
    assert "v9" not in store and len(store) == 5
    copy = store.load("v0")
    assert not isinstance(copy, np.memmap) and copy.flags.writeable


def test_store_pickles_without_array_data(artifacts):
    store = VisualStore(artifacts["features"], kind="videos", split="train")
    store.row("v0")
    clone = pickle.loads(pickle.dumps(store))
    assert clone._arrays == {}  # reopened lazily in the worker, never copied through the pipe
    np.testing.assert_array_equal(clone.row("v2"), store.row("v2"))


def test_store_rejects_inconsistent_index(tmp_path, artifacts):
    index = json.loads((artifacts["features"] / "index.json").read_text())
    index["videos"] = [e for e in index["videos"] if e["id"] != "v1"]
    (tmp_path / "index.json").write_text(json.dumps(index))
    np.save(tmp_path / "videos-train.npy", np.zeros((5, T, D), np.float16))
    with pytest.raises(ValueError, match="5 rows, but .* lists 4 videos"):
        VisualStore(tmp_path, kind="videos", split="train")
    (tmp_path / "index.json").write_text(json.dumps({"videos": [{"id": "a", "split": "train", "row": 0}]}))
    with pytest.raises(ValueError, match=r"videos\[0\]: missing key 'shard'"):
        VisualStore(tmp_path, kind="videos", split="train")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


@pytest.mark.parametrize(
    ("source", "file", "stage"),
    [("frames", "videos-train-001.npy", "extract"), ("features", "videos-train.npy", "features")],
)
@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda b: b[: len(b) - 7], "truncated"),  # numpy said "mmap length is greater than file size"
        (lambda b: bytes(64) + b[64:], "not a .npy file"),  # numpy suggested allow_pickle
    ],
    ids=["truncated", "zeroed-header"],
)
def test_store_names_a_damaged_array_and_the_stage_that_rewrites_it(tmp_path, artifacts, source, file, stage,
                                                                   damage, problem):
    root = _copy(artifacts[source], tmp_path / source)
    (root / file).write_bytes(damage((root / file).read_bytes()))
    with pytest.raises(ValueError) as err:
        VisualStore(root, kind="videos", split="train")
    message = str(err.value)
    assert message.startswith(f"{root / file}: {problem}"), message
    assert message.endswith(f"rebuild it with `dvc repro {stage}` (or `dvc checkout` to restore the cached copy)")


def test_store_names_a_damaged_or_missing_index_and_shard(tmp_path, artifacts):
    root = _copy(artifacts["frames"], tmp_path / "frames")
    (root / "videos-train-000.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"videos-train-000.npy: listed in .*index.json but missing; "
                                                r"rebuild it with `dvc repro extract`"):
        VisualStore(root, kind="videos", split="train")
    (root / "index.json").write_text('{"videos": [')
    with pytest.raises(ValueError, match=r"index.json: not valid JSON .*; rebuild it with `dvc repro extract`"):
        VisualStore(root, kind="videos", split="train")
    (root / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"index.json: no such file; rebuild it with `dvc repro extract`"):
        VisualStore(root, kind="videos", split="train")


def test_store_reopened_in_a_worker_checks_the_array_again(tmp_path, artifacts):
    """A shard damaged after the store was built (and pickled to a DataLoader worker) is caught on reopen."""
    root = _copy(artifacts["frames"], tmp_path / "frames")
    clone = pickle.loads(pickle.dumps(VisualStore(root, kind="videos", split="train")))
    shard = root / "videos-train-000.npy"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(ValueError, match="videos-train-000.npy: truncated"):
        clone.row("v0")


# ------------------------------------------------------------------------------------------ datasets + collate


def test_activity_dataset_and_batch(source):
    records = [VideoRecord(f"v{k}", Path("x"), "train", k % 3, ()) for k in [0, 1, 2, 3, 4, 9]]
    records += [VideoRecord("v8", Path("x"), "train", None, ("captions only",))]
    dataset = ActivityDataset(VisualStore(source, kind="videos", split="train"), activity_labels(records, "train"))
    assert len(dataset) == 5 and dataset.dropped == ["v9"]  # skipped by extraction: dropped, not a crash
    batch = next(iter(make_loader(dataset, batch_size=4, shuffle=False)))
    assert isinstance(batch, ClipBatch) and batch.ids == ["v3", "v0", "v4", "v1"]
    if source.name == "frames":
        assert batch.visual.dtype == torch.uint8 and batch.visual.shape == (4, T, H, W, 3)
    else:
        assert batch.visual.dtype == torch.float32 and batch.visual.shape == (4, T, D)
    assert batch.visual[1].float().mean().item() == value_of("v0")
    assert batch.lengths.dtype == torch.int64 and batch.lengths.tolist() == [3, 4, 1, 2]
    assert batch.labels.dtype == torch.int64 and batch.labels.tolist() == [0, 0, 1, 1]
    moved = batch.to("cpu")
    assert isinstance(moved, ClipBatch) and moved.ids == batch.ids


def test_video_caption_dataset_and_batch(source, artifacts):
    store = VisualStore(source, kind="videos", split="train")
    dataset = VideoCaptionDataset(store, artifacts["tokens"] / "video", train=True, seed=0)
    assert len(dataset) == 5 and dataset.dropped == ["v9"]
    batch = next(iter(make_loader(dataset, batch_size=5, shuffle=False)))
    assert isinstance(batch, CaptionBatch)
    assert batch.visual.shape[:2] == (5, T) and batch.lengths.tolist() == [NUM_VALID[i] for i in batch.ids]
    assert batch.tokens.dtype == torch.int64 and batch.token_lengths.dtype == torch.int64
    assert batch.tokens.shape == (5, int(batch.token_lengths.max()))  # padding trimmed to the batch
    assert (batch.tokens[:, 0] == BOS_ID).all()
    for row, length in zip(batch.tokens, batch.token_lengths):
        assert row[length - 1] == EOS_ID and (row[length:] == PAD_ID).all()
    vocab = Vocab.load(artifacts["tokens"] / "video" / "vocab.json")
    for item_id, row in zip(batch.ids, batch.tokens):
        assert vocab.decode(row).startswith(f"clip {item_id[1:]} caption")  # tokens belong to the clip


def test_image_caption_dataset_over_grid_features_and_pixels(source, artifacts):
    store = VisualStore(source, kind="images", split="train")
    dataset = ImageCaptionDataset(store, artifacts["tokens"] / "image", train=False)
    batch = next(iter(make_loader(dataset, batch_size=2, shuffle=False)))
    assert batch.ids == ["i1", "i0"]
    if source.name == "features":
        assert batch.visual.shape == (2, G, D) and batch.visual.dtype == torch.float32
        assert batch.lengths.tolist() == [G, G]
    else:
        assert batch.visual.shape == (2, H, W, 3) and batch.visual.dtype == torch.uint8
        assert batch.lengths.tolist() == [1, 1]
    vocab = Vocab.load(artifacts["tokens"] / "image" / "vocab.json")
    assert [vocab.decode(t) for t in batch.tokens] == ["a dog", "a red ball"]  # eval: the first caption
    assert dataset.references("i0") == ["a red ball", "a ball"] and dataset.references("zz") == []
    with pytest.raises(ValueError, match="needs a videos store"):
        VideoCaptionDataset(store, artifacts["tokens"] / "image", train=False)


# ------------------------------------------------------------------------------------------ determinism


def test_caption_sampling_is_deterministic_per_seed_and_epoch(artifacts):
    store = VisualStore(artifacts["features"], kind="videos", split="train")
    a = VideoCaptionDataset(store, artifacts["tokens"] / "video", train=True, seed=3)
    b = VideoCaptionDataset(store, artifacts["tokens"] / "video", train=True, seed=3)
    picks = {e: [a.caption_row(i, e) for i in range(len(a))] for e in range(4)}
    assert picks[0] == [b.caption_row(i, 0) for i in range(len(b))]
    assert len({tuple(p) for p in picks.values()}) > 1  # a different caption in some later epoch
    np.testing.assert_array_equal(a[(2, 1)].tokens, b[(2, 1)].tokens)
    evaluation = VideoCaptionDataset(store, artifacts["tokens"] / "video", train=False)
    assert {evaluation.caption_row(2, e) for e in range(4)} == {evaluation.caption_row(2, 0)}


def _epoch_ids(loader) -> list[str]:
    return [i for batch in loader for i in batch.ids]


def test_shuffling_is_deterministic_from_the_seed(artifacts):
    store = VisualStore(artifacts["features"], kind="videos", split="train")
    dataset = ActivityDataset(store, {i: 0 for i in store.ids})
    one = make_loader(dataset, batch_size=2, shuffle=True, seed=7)
    two = make_loader(dataset, batch_size=2, shuffle=True, seed=7)
    epochs = [_epoch_ids(one) for _ in range(4)]
    assert epochs == [_epoch_ids(two) for _ in range(4)]
    assert all(sorted(e) == sorted(store.ids) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # the order changes between epochs
    one.sampler.set_epoch(2)
    assert _epoch_ids(one) == epochs[2]  # resume
    assert list(iter(EpochSampler(3, shuffle=False))) == [(0, 0), (1, 0), (2, 0)]
    other_seed = make_loader(dataset, batch_size=2, shuffle=True, seed=8)
    assert [_epoch_ids(other_seed) for _ in range(4)] != epochs


def test_loader_settings(artifacts):
    store = VisualStore(artifacts["features"], kind="videos", split="train")
    dataset = ActivityDataset(store, {"v0": 1})
    cpu = make_loader(dataset, batch_size=1, shuffle=False, workers=0, device="cpu")
    assert not cpu.pin_memory and not cpu.persistent_workers
    cuda = make_loader(dataset, batch_size=1, shuffle=False, workers=1, device="cuda:0")
    assert cuda.pin_memory and cuda.persistent_workers and cuda.num_workers == 1


@pytest.mark.slow
def test_worker_processes_sample_like_the_main_process(artifacts):
    store = VisualStore(artifacts["features"], kind="videos", split="train")
    dataset = VideoCaptionDataset(store, artifacts["tokens"] / "video", train=True, seed=1)
    in_process = make_loader(dataset, batch_size=2, shuffle=True, seed=1, workers=0)
    with_workers = make_loader(dataset, batch_size=2, shuffle=True, seed=1, workers=1)
    for _ in range(2):  # persistent workers still see each new epoch through the sampler keys
        for x, y in zip(in_process, with_workers, strict=True):
            assert x.ids == y.ids
            torch.testing.assert_close(x.tokens, y.tokens)
            torch.testing.assert_close(x.visual, y.visual)
