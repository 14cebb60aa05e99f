"""Checkpoint integrity (seqvision/checkpoint.py): every damage is named and refused, never loaded (#13 items 1, 5)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from seqvision import checkpoint


def _state() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"epoch": 3, "best_epoch": 2, "model": {"w": torch.randn(100, 100, generator=generator)},
            "history": [{"epoch": 1, "val_loss": 0.5}], "fingerprint": "abc"}


def _damage(data: bytes, how: str) -> bytes:
    middle = len(data) // 2
    if how == "truncated":
        return data[:middle]
    if how == "bit flip":
        return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:]
    if how == "4 KB of random bytes":
        return data[:middle] + os.urandom(4096) + data[middle + 4096:]
    raise AssertionError(how)


def test_a_saved_checkpoint_loads_back_exactly(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    checkpoint.save(path, _state())
    loaded = checkpoint.load(path)
    assert torch.equal(loaded["model"]["w"], _state()["model"]["w"]) and loaded["epoch"] == 3


def test_equal_content_gives_equal_bytes_whatever_the_object_identities() -> None:
    # A resumed run's history comes back from last.pt as new string objects; pickle memoizes by identity, so
    # without canonicalisation the same values gave other bytes (and DVC another hash).
    fresh = _state()
    rebuilt = _state()
    rebuilt["history"] = [{"".join(["ep", "och"]): 1, "".join(["val_", "loss"]): 0.5}]
    assert checkpoint.to_bytes(fresh) == checkpoint.to_bytes(rebuilt)
    assert checkpoint.to_bytes(fresh) != checkpoint.to_bytes({**fresh, "epoch": 4})


@pytest.mark.parametrize("how", ["truncated", "bit flip", "4 KB of random bytes"])
def test_damage_is_named_and_refused(tmp_path: Path, how: str) -> None:
    path = tmp_path / "best.pt"
    checkpoint.save(path, _state())
    path.write_bytes(_damage(path.read_bytes(), how))
    with pytest.raises(checkpoint.CorruptCheckpoint, match=str(path)):
        checkpoint.load(path)
