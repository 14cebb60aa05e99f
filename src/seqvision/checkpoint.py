"""Training checkpoints: one layout, written atomically with a content digest, verified whenever read.

Layout (a plain dict, ``torch.save``'d; ``torch.load(path, weights_only=True)`` opens it without this module)::

    format       CHECKPOINT_FORMAT
    spec         what rebuilds the model (``models.model_spec``: task, family, dims, config[, encoder])
    model        the state dict
    ...          the training state ``train.fit`` adds (optimizer, scheduler, epoch, rng, history, ...)
    sha256       hex digest of everything above, in a canonical encoding (:func:`digest`)

The digest makes corruption visible: a truncated file fails to unpickle, and a file whose bytes changed
inside (a bit flip, a block of garbage that still unpickles) no longer matches its digest. Either way
:func:`load` raises :class:`CorruptCheckpoint` naming the file, so nothing resumes from it or evaluates it.
"""

from __future__ import annotations

import hashlib
import io
import struct
import sys
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seqvision.io import write_bytes

if TYPE_CHECKING:  # torch is imported where it is used, so stages that only need the error class stay light
    import torch

CHECKPOINT_FORMAT = 2
DIGEST_KEY = "sha256"


class CorruptCheckpoint(ValueError):
    """A checkpoint file cannot be read, or its content does not match its digest. The message names the file."""


def _feed(h: Any, obj: Any) -> None:
    """Canonical, type-tagged encoding of checkpoint content into hash ``h`` (dict keys sorted)."""
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(b"T" + str(t.dtype).encode() + repr(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, Mapping):
        h.update(b"D" + struct.pack("<q", len(obj)))
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update((b"L" if isinstance(obj, list) else b"U") + struct.pack("<q", len(obj)))
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, bytes):
        h.update(b"B" + struct.pack("<q", len(obj)) + obj)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        text = repr(obj).encode()
        h.update(b"S" + type(obj).__name__.encode() + struct.pack("<q", len(text)) + text)
    else:
        raise TypeError(f"cannot digest a {type(obj).__name__} in a checkpoint")


def digest(state: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's content (its own ``sha256`` entry excluded)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != DIGEST_KEY})
    return h.hexdigest()


def _canonical(obj: Any) -> Any:
    """``obj`` rebuilt with fresh containers and interned strings, so that its pickle depends on its values only.

    Pickle writes a repeated object once and refers back to it, by identity: a key that is one shared (interned)
    string in a fresh run but a new string per dict in a resumed one (the history read back from ``last.pt``)
    gives other bytes for equal values, and DVC would see another checkpoint."""
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, OrderedDict):  # a state dict: keep its type and the module versions in _metadata
        out = OrderedDict((_canonical(k), _canonical(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = _canonical(obj._metadata)  # type: ignore[attr-defined]
        return out
    if isinstance(obj, Mapping):
        return {_canonical(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_canonical(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_canonical(v) for v in obj)
    return obj


def to_bytes(state: Mapping[str, Any]) -> bytes:
    """``state`` with its digest, serialized (what :func:`save` writes): the same bytes for equal content."""
    import torch

    state = {**state, "format": CHECKPOINT_FORMAT}
    buffer = io.BytesIO()
    torch.save(_canonical({**state, DIGEST_KEY: digest(state)}), buffer)
    return buffer.getvalue()


def save(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` and its digest to ``path`` atomically (a crash leaves the old file or the new one)."""
    write_bytes(path, to_bytes(state))


def load(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`save`, verified; plain data only (``weights_only=True``, no pickled code).

    Raises ``FileNotFoundError`` when there is no file and :class:`CorruptCheckpoint` (naming the file) when it
    cannot be unpickled, lacks a digest, or its content does not match the digest.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, garbage, a pickle that is not plain data ...
        raise CorruptCheckpoint(f"{path}: unreadable checkpoint ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(state, dict) or DIGEST_KEY not in state:
        raise CorruptCheckpoint(f"{path}: not a seqvision checkpoint (no {DIGEST_KEY!r} entry); retrain it")
    if digest(state) != state[DIGEST_KEY]:
        raise CorruptCheckpoint(f"{path}: content does not match its digest (the file was corrupted or edited)")
    return state
