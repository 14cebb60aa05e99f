"""Atomic file writes: a crash never leaves half an artifact behind.

Everything is written to a temporary name in the destination folder, flushed, then renamed with
``os.replace`` (atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
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


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` atomically; the result is memory-mappable with ``np.load(path, mmap_mode="r")``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def is_temporary(path: str | Path) -> bool:
    """True for leftovers of an interrupted atomic write."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(".tmp")
