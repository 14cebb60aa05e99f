"""Atomic file writes, checked reads of the project's arrays, the frame artifact's row order, and the synthetic
benchmark's metadata.json.

Writes: everything is written to a temporary name in the destination folder, flushed, then renamed with
``os.replace`` (atomic on POSIX within one filesystem), so a crash never leaves half an artifact behind.

Reads: :func:`load_array` (``.npy``) and :func:`load_arrays` (``.npz``) are the one place that opens a
project array. A file that is missing, truncated, padded or not an array at all (a disk that filled up, an
interrupted copy, a bad ``dvc pull``) raises one error that names the file, says what is wrong and which
``dvc repro`` stage writes it again, instead of numpy's "mmap length is greater than file size" or its
advice to pass ``allow_pickle``.

Measurements of a run (wall-clock times, throughput, peak memory, resumed epochs, MLflow run ids) differ on
every run, so they never go into a hashed artifact: :func:`write_runinfo` keeps them in ``runinfo.json`` beside
it, a name ``.dvcignore`` hides from DVC (not hashed, not cached, not restored by ``dvc checkout``/``pull``).
Everything else a stage writes is a function of its inputs (docs/reproducibility.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; give the artifact the permissions a plain open() would (0666 & ~umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> None:
    """Deterministic JSON (sorted keys, UTF-8, trailing newline), written atomically."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n")


RUNINFO = "runinfo.json"


def write_runinfo(folder: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into ``{folder}/runinfo.json`` (created when missing; an unreadable one is replaced) and
    return the merged content. For measurements of a run only: DVC ignores the file (see the module docstring)."""
    merged = {**read_runinfo(folder), **fields}
    write_json(Path(folder) / RUNINFO, merged)
    return merged


def read_runinfo(folder: str | Path) -> dict[str, Any]:
    """``{folder}/runinfo.json`` as a dict; ``{}`` when missing or unreadable (it is never restored from the DVC
    cache, so a pulled artifact has none)."""
    try:
        data = json.loads((Path(folder) / RUNINFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (read in 1 MiB chunks); ``algorithm`` is a :mod:`hashlib` name."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def replace_markdown_section(path: str | Path, heading: str, section: str) -> None:
    """Replace the section of markdown file ``path`` that starts with the line ``heading`` (up to the next
    ``## `` heading) by ``section``, or append it; write atomically. A missing file starts as a short header."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n\nOne section per script in `benchmarks/`.\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_text(path, text)


def is_temporary(path: str | Path) -> bool:
    """True for leftovers of an interrupted atomic write."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(".tmp")


# --------------------------------------------------------------------------------------------------------
# Checked reads


class ArtifactError(ValueError):
    """A project artifact exists but cannot be read as what it should be. The message names the file, what
    is wrong and the ``dvc repro`` stage that writes it."""


def remedy(stage: str) -> str:
    """How a user gets a good copy of an output of ``stage`` back: the tail of every artifact error."""
    return f"rebuild it with `dvc repro {stage}` (or `dvc checkout` to restore the cached copy)"


def missing_artifact(path: str | Path, *, stage: str) -> FileNotFoundError:
    """The error for an artifact of ``stage`` that is not there (raise it)."""
    return FileNotFoundError(f"{path}: no such file; {remedy(stage)}")


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data offset)`` from a ``.npy`` header; raises :class:`ArtifactError` for a file that
    is not one, or whose size disagrees with its header (truncated or with trailing bytes)."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        try:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(f)
            else:  # 3.0 only exists for non-latin-1 field names, which no project array has
                raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
        except ValueError as err:
            kind = "not a .npy file" if "magic" in str(err) else "corrupt .npy header"
            raise ArtifactError(f"{path}: {kind} ({err})") from None
        offset = f.tell()
    if dtype.hasobject:  # no stage writes one (numeric open_memmap arrays): this file did not come from us
        raise ArtifactError(f"{path}: holds pickled Python objects ({dtype}), not a numeric array")
    expected = offset + math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise ArtifactError(
            f"{path}: {what}: a {'x'.join(map(str, shape)) or 'scalar'} {dtype} array needs {expected} bytes, "
            f"the file has {size}"
        )
    return tuple(shape), dtype, offset


def load_array(path: str | Path, *, stage: str, mmap: bool = True) -> np.ndarray:
    """A ``.npy`` written by ``stage`` -> its array, memory-mapped read-only (``np.memmap``) unless ``mmap`` is
    False. The header is checked against the file size first (cost: one small read and a ``stat``).

    Raises :class:`FileNotFoundError` (missing) or :class:`ArtifactError` (anything else), both naming
    ``path`` and ending with how to rebuild it (``dvc repro {stage}``).
    """
    path = Path(path)
    if not path.is_file():
        raise missing_artifact(path, stage=stage)
    try:
        _npy_layout(path)
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ArtifactError as err:
        raise ArtifactError(f"{err}; {remedy(stage)}") from None
    except (OSError, ValueError, EOFError) as err:  # e.g. unreadable sectors; the header check caught the rest
        raise ArtifactError(f"{path}: cannot read the array ({err}); {remedy(stage)}") from None


def load_arrays(path: str | Path, keys: Sequence[str], *, stage: str) -> dict[str, np.ndarray]:
    """An ``.npz`` written by ``stage`` -> ``{key: array}`` for ``keys``, loaded whole.

    ``np.savez`` stores each array with a CRC-32, so a flipped bit is caught here as well as truncation.
    Raises :class:`FileNotFoundError` (missing) or :class:`ArtifactError` (corrupt, or a key absent), both
    naming ``path`` and ending with how to rebuild it (``dvc repro {stage}``).
    """
    path = Path(path)
    if not path.is_file():
        raise missing_artifact(path, stage=stage)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip's first local header, or an empty zip
        raise ArtifactError(f"{path}: not an .npz file (no zip header); {remedy(stage)}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise ArtifactError(f"{path}: missing array {missing[0]!r}; {remedy(stage)}")
            return {k: data[k] for k in keys}
    except ArtifactError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError) as err:
        raise ArtifactError(f"{path}: corrupt .npz ({err}); {remedy(stage)}") from None


def load_json(path: str | Path, *, stage: str) -> Any:
    """A JSON artifact written by ``stage`` -> its value; missing or invalid files raise one error naming
    ``path`` and how to rebuild it."""
    path = Path(path)
    if not path.is_file():
        raise missing_artifact(path, stage=stage)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path}: not valid JSON ({err}); {remedy(stage)}") from None


# --------------------------------------------------------------------------------------------------------
# The frames artifact's row order (index.json)


def _natural(name: str) -> tuple[Any, ...]:
    """Sort key comparing the digit runs of a name as numbers: ``x-999.npy`` < ``x-1000.npy``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def shard_name(kind: str, split: str, shard: int | str) -> str:
    """File name of a frame shard as ``index.json`` refers to it (a number, or the name itself)."""
    return shard if isinstance(shard, str) else f"{kind}-{split}-{int(shard):03d}.npy"


def ordered_entries(index: Mapping[str, Any], kind: str, split: str) -> list[dict[str, Any]]:
    """The ``index.json`` entries of one kind and split in feature-row order: shard by shard (numerically: shard
    1000 after 999), then row. The one definition of that order: the features stage writes its arrays in it and
    ``datasets.VisualStore`` reads them in it."""
    entries = [e for e in index[kind] if e["split"] == split]
    return sorted(entries, key=lambda e: (_natural(shard_name(kind, split, e["shard"])), int(e["row"])))


# --------------------------------------------------------------------------------------------------------
# The synthetic benchmark's metadata.json


class MetadataError(ValueError):
    """metadata.json is missing, malformed, or does not describe the items asked about. The message says which."""


def load_metadata(path: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"videos": {id: VideoMeta}, "images": {id: ImageMeta}}`` from the generator's metadata.json."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path}: no such file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {kind: {str(m["id"]): m for m in raw[kind]} for kind in ("videos", "images")}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise MetadataError(f"{path}: not the synthetic benchmark's metadata.json ({type(err).__name__}: {err})") \
            from None
