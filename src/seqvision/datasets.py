"""Task datasets over memory-mapped visual arrays + collate functions -> the typed batches of design.md.

Visual input comes from one :class:`VisualStore`, which maps a record id to one row of a ``.npy`` array opened
memory-mapped by :func:`seqvision.io.load_array` (so nothing is loaded whole, the page cache is shared by workers, and
a truncated or corrupt file is an error naming it and the stage to rerun):

- frame shards (``artifacts/frames/``): ``{kind}-{split}-{k:03d}.npy`` uint8, rows located by ``index.json``;
- feature arrays (``artifacts/features/``): ``{kind}-{split}.npy`` float16 in the frame shards' row order
  (shard by shard), with ``index.json`` copied from frames.

Three datasets, one per task: :class:`ActivityDataset` (clip -> label), :class:`VideoCaptionDataset`
(clip -> captions) and :class:`ImageCaptionDataset` (image -> captions). A training caption dataset yields
one item per video/image and samples one of its captions per epoch, deterministically from ``(seed, epoch,
index)``; an evaluation one yields the first caption and keeps every reference in :meth:`references`.
Records whose frames were skipped by ``extract`` are absent from ``index.json``; datasets drop them and
list them in ``dropped``.

Epochs reach the datasets through the sampler (:class:`EpochSampler`, built by :func:`make_loader`), which
yields ``(index, epoch)`` keys from the main process, so caption sampling stays deterministic with
persistent workers too. Under DDP, ``make_loader(..., shard=True)`` uses :class:`DistributedEpochSampler`
instead: the same permutation, split across ranks, so that the ranks' batches of one step together are the
single-process batch of that step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from seqvision import distributed, io
from seqvision.io import ordered_entries, shard_name
from seqvision.tasks import Kind, task_spec
from seqvision.vocab import load_references, load_split

_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------------------
# Typed batches


class ClipBatch(NamedTuple):
    """Activity recognition."""

    ids: list[str]
    visual: Tensor  # (B, T, D) float32 features or (B, T, H, W, 3) uint8 frames
    lengths: Tensor  # (B,) int64, real frames per clip
    labels: Tensor  # (B,) int64, 0-based

    def to(self, device: torch.device | str, non_blocking: bool = True) -> ClipBatch:
        return _batch_to(self, device, non_blocking)


class CaptionBatch(NamedTuple):
    """Image and video captioning."""

    ids: list[str]
    visual: Tensor  # video (B, T, D) / image grid (B, G, D) float32; or uint8 frames (B, T, H, W, 3) / (B, H, W, 3)
    lengths: Tensor  # (B,) int64: real frames (video), grid cells (image features), 1 (image pixels)
    tokens: Tensor  # (B, L) int64: <bos> ... <eos> <pad>..., L = longest caption in the batch
    token_lengths: Tensor  # (B,) int64, incl. <bos>/<eos>

    def to(self, device: torch.device | str, non_blocking: bool = True) -> CaptionBatch:
        return _batch_to(self, device, non_blocking)


def _batch_to(batch: Any, device: torch.device | str, non_blocking: bool) -> Any:
    return batch._replace(
        **{
            name: value.to(device, non_blocking=non_blocking)
            for name, value in zip(batch._fields, batch)
            if isinstance(value, Tensor)
        }
    )


class ClipItem(NamedTuple):
    id: str
    visual: np.ndarray  # (T, D) or (T, H, W, 3), a private copy of the memmapped row
    length: int
    label: int


class CaptionItem(NamedTuple):
    id: str
    visual: np.ndarray
    length: int
    tokens: np.ndarray  # int32 (L,), padded
    token_length: int


# --------------------------------------------------------------------------------------------------------
# Visual store


class VisualStore:
    """``id -> row`` of memory-mapped frame shards or feature arrays, for one kind and split.

    ``root`` is ``artifacts/frames`` or ``artifacts/features``; the source is detected by file name: a
    ``{kind}-{split}.npy`` file means features, otherwise the shards named in ``index.json`` are used.
    ``ids`` follows row order (sequential reads). Arrays are opened lazily per process and never pickled.
    """

    def __init__(self, root: str | Path, *, kind: Kind, split: str) -> None:
        if kind not in ("videos", "images"):
            raise ValueError(f"kind must be 'videos' or 'images', got {kind!r}")
        self.root, self.kind, self.split = Path(root), kind, split
        features = self.root / f"{kind}-{split}.npy"
        self.source: Literal["frames", "features"] = "features" if features.is_file() else "frames"
        # The stage whose outputs these are, named in every error so the user knows what to rerun.
        self.stage = "features" if self.source == "features" else "extract"
        index_path = self.root / "index.json"
        index = io.load_json(index_path, stage=self.stage)
        if not isinstance(index, Mapping) or not isinstance(index.get(kind), list):
            raise self._corrupt(index_path, f"missing key {kind!r} (a list of entries)")
        for i, entry in enumerate(index[kind]):
            for key in ("id", "split", "shard", "row"):
                if not isinstance(entry, Mapping) or key not in entry:
                    raise self._corrupt(index_path, f"{kind}[{i}]: missing key {key!r}")
        entries = ordered_entries(index, kind, split)

        self._arrays: dict[Path, np.memmap] = {}
        self._rows: dict[str, tuple[Path, int]] = {}
        self._num_valid: dict[str, int] = {}
        for rank, entry in enumerate(entries):
            entry_id = str(entry["id"])
            if entry_id in self._rows:
                raise self._corrupt(index_path, f"{kind} id {entry_id!r} listed twice in split {split!r}")
            if self.source == "features":
                self._rows[entry_id] = (features, rank)  # features keep the shards' row order
            else:
                shard = self.root / self._shard_name(entry["shard"])
                if shard.parent != self.root:  # the index names files of this folder only
                    raise self._corrupt(index_path, f"{kind} {entry_id!r}: shard {entry['shard']!r} is not a file name")
                self._rows[entry_id] = (shard, int(entry["row"]))
            if "num_valid" in entry:
                self._num_valid[entry_id] = int(entry["num_valid"])
        self.ids: list[str] = list(self._rows)
        self._validate(index_path)

    def _corrupt(self, path: Path, problem: str) -> io.ArtifactError:
        return io.ArtifactError(f"{path}: {problem}; {io.remedy(self.stage)}")

    def _shard_name(self, shard: int | str) -> str:
        return shard_name(self.kind, self.split, shard)

    def _validate(self, index_path: Path) -> None:
        rows_needed: dict[Path, int] = {}
        for path, row in self._rows.values():
            rows_needed[path] = max(rows_needed.get(path, 0), row + 1)
        for path, needed in rows_needed.items():
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in {index_path} but missing; {io.remedy(self.stage)}")
            available = self._array(path).shape[0]
            if self.source == "features" and available != len(self._rows):
                raise self._corrupt(path, f"{available} rows, but {index_path} lists {len(self._rows)} {self.kind}")
            if available < needed:
                raise self._corrupt(path, f"{available} rows, but {index_path} points at row {needed - 1}")

    def _array(self, path: Path) -> np.memmap:
        array = self._arrays.get(path)
        if array is None:
            array = self._arrays[path] = io.load_array(path, stage=self.stage)
        return array

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = {}  # a pickled memmap would be a full copy; reopen in the worker instead
        return state

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._rows

    def row(self, item_id: str) -> np.memmap:
        """The memory-mapped row of ``item_id`` (no copy): video (T, D) / (T, H, W, 3), image (G, D) /
        (H, W, 3)."""
        path, row = self._rows[item_id]
        return self._array(path)[row]

    def length(self, item_id: str) -> int:
        """Real positions in the row: frames that are not short-clip padding (videos), grid cells (image
        features), 1 (image pixels)."""
        if self.kind == "videos":
            return self._num_valid.get(item_id, self.row(item_id).shape[0])
        return self.row(item_id).shape[0] if self.source == "features" else 1

    def load(self, item_id: str) -> np.ndarray:
        """A private, writable copy of the row (safe to hand to ``torch.from_numpy``)."""
        return np.array(self.row(item_id))


# --------------------------------------------------------------------------------------------------------
# Deterministic sampling


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """Hash integers into one 64-bit seed; the same inputs give the same seed in every process."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (v & _MASK64))
    return h


def _key(key: int | tuple[int, int]) -> tuple[int, int]:
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)


class EpochSampler(Sampler):
    """Yields ``(index, epoch)`` keys; shuffled with a ``torch.Generator`` seeded from ``(seed, epoch)``.

    Each ``iter()`` uses the current epoch and then advances it, so a plain ``for epoch ...: for batch in
    loader`` sees epochs 0, 1, 2...; :meth:`set_epoch` sets the next one explicitly (e.g. on resume).
    """

    def __init__(self, size: int, *, shuffle: bool, seed: int = 0) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return iter([(i, epoch) for i in epoch_order(self.size, shuffle=self.shuffle, seed=self.seed, epoch=epoch)])


def epoch_order(size: int, *, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """The visiting order of one epoch: a permutation of ``range(size)`` drawn from ``(seed, epoch)`` (or the
    identity without ``shuffle``). Shared by both samplers, so one and N processes see the same order."""
    if not shuffle:
        return list(range(size))
    generator = torch.Generator()
    generator.manual_seed(mix_seed(seed, epoch))
    return torch.randperm(size, generator=generator).tolist()


class DistributedEpochSampler(DistributedSampler):
    """:class:`EpochSampler`'s order, sharded over ``num_replicas`` ranks; yields ``(index, epoch)`` keys.

    Rank ``r`` takes positions ``r, r + W, r + 2W, ...`` of the epoch's order, so with per-rank batches of
    ``B / W`` the W batches of step k are exactly positions ``kB .. kB + B - 1``: the single-process batch of
    step k. Like :class:`torch.utils.data.DistributedSampler` (whose ``set_epoch``, ``num_samples`` and
    ``total_size`` it keeps), the order is padded by repeating its head until it divides by W, so every rank
    runs the same number of steps (a rank that ran out would hang the others in the gradient all-reduce);
    when ``size % W != 0`` up to W - 1 items are therefore seen twice per epoch. Unlike EpochSampler the
    epoch does not advance by itself: call :meth:`set_epoch` before each epoch (``train.fit`` does).
    """

    def __init__(self, size: int, *, num_replicas: int, rank: int, shuffle: bool, seed: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self.size = size

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        order = epoch_order(self.size, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch)
        if order:
            order += (order * math.ceil(self.total_size / len(order)))[: self.total_size - len(order)]
        return iter([(i, self.epoch) for i in order[self.rank : self.total_size : self.num_replicas]])


# --------------------------------------------------------------------------------------------------------
# Collate


def _stack(arrays: Sequence[np.ndarray]) -> Tensor:
    """Stack rows (zero-padding dim 0 if lengths differ); float16 features -> float32, uint8 frames stay."""
    longest = max(a.shape[0] for a in arrays)
    if any(a.shape[0] != longest for a in arrays):
        arrays = [np.pad(a, [(0, longest - a.shape[0])] + [(0, 0)] * (a.ndim - 1)) for a in arrays]
    stacked = torch.from_numpy(np.stack(arrays))
    return stacked.float() if stacked.is_floating_point() else stacked


def collate_clips(items: Sequence[ClipItem]) -> ClipBatch:
    return ClipBatch(
        ids=[it.id for it in items],
        visual=_stack([it.visual for it in items]),
        lengths=torch.tensor([it.length for it in items], dtype=torch.int64),
        labels=torch.tensor([it.label for it in items], dtype=torch.int64),
    )


def collate_captions(items: Sequence[CaptionItem]) -> CaptionBatch:
    token_lengths = torch.tensor([it.token_length for it in items], dtype=torch.int64)
    width = int(token_lengths.max())  # trim the shared padding: (B, L_max of this batch)
    return CaptionBatch(
        ids=[it.id for it in items],
        visual=_stack([it.visual for it in items]),
        lengths=torch.tensor([it.length for it in items], dtype=torch.int64),
        tokens=torch.from_numpy(np.stack([it.tokens[:width] for it in items])).long(),
        token_lengths=token_lengths,
    )


# --------------------------------------------------------------------------------------------------------
# Datasets


class ActivityDataset(Dataset):
    """Clip -> 0-based label, for the ids of ``labels`` (one split) that ``store`` holds; the rest (skipped
    by extraction) are listed in ``dropped``."""

    collate = staticmethod(collate_clips)

    def __init__(self, store: VisualStore, labels: Mapping[str, int]) -> None:
        if store.kind != "videos":
            raise ValueError(f"activity recognition needs a video store, got {store.kind!r}")
        self.store = store
        self.labels = {k: int(v) for k, v in labels.items()}
        self.ids = [i for i in store.ids if i in self.labels]
        self.dropped = sorted(set(self.labels) - set(store.ids))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int | tuple[int, int]) -> ClipItem:
        index, _ = _key(key)
        item_id = self.ids[index]
        return ClipItem(item_id, self.store.load(item_id), self.store.length(item_id), self.labels[item_id])


class _CaptionDataset(Dataset):
    kind: Kind
    collate = staticmethod(collate_captions)

    def __init__(self, store: VisualStore, tokens_dir: str | Path, *, train: bool, seed: int = 0) -> None:
        if store.kind != self.kind:
            raise ValueError(f"{type(self).__name__} needs a {self.kind} store, got {store.kind!r}")
        self.store, self.train, self.seed = store, train, seed
        encoded = load_split(tokens_dir, store.split)
        self._tokens, self._lengths = encoded.tokens, encoded.lengths
        self._rows: dict[str, list[int]] = {}
        for row, item_id in enumerate(encoded.ids.tolist()):
            self._rows.setdefault(item_id, []).append(row)
        self._references = load_references(tokens_dir, store.split)
        self.ids = [i for i in store.ids if i in self._rows]
        self.dropped = sorted(set(self._rows) - set(store.ids))

    def __len__(self) -> int:
        return len(self.ids)

    def references(self, item_id: str) -> list[str]:
        """Every raw reference caption of ``item_id`` (for the metrics)."""
        return list(self._references.get(item_id, []))

    def caption_row(self, index: int, epoch: int = 0) -> int:
        """Which encoded caption item ``index`` uses: sampled from ``(seed, epoch, index)`` when training,
        the first one when evaluating."""
        rows = self._rows[self.ids[index]]
        if not self.train:
            return rows[0]
        return rows[mix_seed(self.seed, epoch, index) % len(rows)]

    def __getitem__(self, key: int | tuple[int, int]) -> CaptionItem:
        index, epoch = _key(key)
        item_id = self.ids[index]
        row = self.caption_row(index, epoch)
        return CaptionItem(
            item_id,
            self.store.load(item_id),
            self.store.length(item_id),
            self._tokens[row],
            int(self._lengths[row]),
        )


class VideoCaptionDataset(_CaptionDataset):
    """Clip -> one caption per item (sampled per epoch when ``train``); ``references(id)`` -> all of them."""

    kind = "videos"


class ImageCaptionDataset(_CaptionDataset):
    """Image -> one caption per item (sampled per epoch when ``train``); ``references(id)`` -> all of them."""

    kind = "images"


# --------------------------------------------------------------------------------------------------------
# Tasks: each task's dataset (what it reads: seqvision.tasks)


def task_dataset(
    task: str,
    store: VisualStore,
    *,
    labels: Mapping[str, int] | None = None,
    tokens_dir: str | Path | None = None,
    train: bool = False,
    seed: int = 0,
) -> ActivityDataset | _CaptionDataset:
    """The dataset of ``task`` over one split's ``store``: activity needs that split's ``labels``, captioning the
    tokens root ``tokens_dir`` (``artifacts/tokens``; the task's corpus sub-folder is picked here). ``train``:
    sample one caption per item per epoch (with ``seed``) instead of always the first."""
    spec = task_spec(task)
    if spec.corpus is None:
        if labels is None:
            raise ValueError("activity datasets need the split's class labels")
        return ActivityDataset(store, labels)
    if tokens_dir is None:
        raise ValueError(f"{task} datasets need the tokens folder")
    captions = VideoCaptionDataset if spec.kind == "videos" else ImageCaptionDataset
    return captions(store, Path(tokens_dir) / spec.corpus, train=train, seed=seed)


# --------------------------------------------------------------------------------------------------------
# Loader


def make_loader(
    dataset: ActivityDataset | _CaptionDataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    workers: int = 0,
    device: torch.device | str = "cpu",
    drop_last: bool = False,
    shard: bool = False,
) -> DataLoader:
    """A DataLoader yielding :class:`ClipBatch` / :class:`CaptionBatch`, shuffled by :class:`EpochSampler`
    (``loader.sampler.set_epoch`` to resume). Pinned memory only for CUDA; workers persist across epochs.

    ``shard=True`` with a ``torch.distributed`` process group of W ranks: ``batch_size`` is the *global* batch
    (it must divide by W); this rank gets ``batch_size / W`` items per step from its 1/W of the order
    (:class:`DistributedEpochSampler`). Without a process group ``shard`` changes nothing.
    """
    sampler: Sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed)
    if shard and distributed.is_initialized():
        world = distributed.world_size()
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} (the global batch) does not divide by the {world} DDP ranks")
        sampler = DistributedEpochSampler(len(dataset), num_replicas=world, rank=distributed.rank(),
                                          shuffle=shuffle, seed=seed)
        batch_size //= world
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=dataset.collate,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=workers > 0,
        drop_last=drop_last,
    )
