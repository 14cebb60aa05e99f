"""Generate the whole benchmark into an output folder: guard the folder, fan items out, write annotations.

Output folder rules (what ``--help`` promises):

* empty or missing: generate;
* holds an earlier run with the same ``synth.json``: resume; complete files are kept (they were written
  atomically), temporary leftovers of interrupted writes are removed, missing files are written;
* holds anything else (a different ``synth.json``, or files the generator does not write): refused,
  unless ``overwrite``. Overwriting deletes only paths the generator itself writes (``synth.json``,
  ``videos/video{N}.mp4``, ``images/image{N}.png``, the known annotation files, and temporary leftovers
  of these); every other file is left where it is, untouched.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import time
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from .. import io
from ..config import SynthConfig, flatten
from .items import ItemKey, ItemRecord, image_item, item_keys, video_frames, video_record, video_spec
from .writers import ANNOTATION_FILES, synth_manifest, write_annotations, write_mp4, write_png

MANIFEST = "synth.json"
_OWN_FILE = re.compile(
    r"^(?:synth\.json|videos/video\d+\.mp4|images/image\d+\.png|"
    + "|".join(re.escape(p) for p in ANNOTATION_FILES)
    + r")$"
)
_OWN_DIRS = {"videos", "images", "annotations", "annotations/ucf101", "annotations/coco"}
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp$")  # seqvision.io.atomic_path's names


class OutputFolderError(Exception):
    """The output folder holds content this run must not touch without ``overwrite``."""


class Summary(NamedTuple):
    out: Path
    videos: int
    images: int
    written: int
    kept: int
    seconds: float

    def line(self) -> str:
        return (
            f"synth: {self.videos} videos and {self.images} images in {self.out} "
            f"({self.written} written, {self.kept} kept) in {self.seconds:.1f} s"
        )


class FolderContents(NamedTuple):
    own: list[Path]  # files the generator writes
    temporary: list[Path]  # leftovers of interrupted atomic writes of those files
    foreign: list[Path]  # everything else (files, links, unknown folders)


def inspect_folder(out: Path) -> FolderContents:
    """Sort everything under ``out`` into the generator's own files, its temp leftovers, and the rest."""
    own, temporary, foreign = [], [], []
    if not out.exists():
        return FolderContents(own, temporary, foreign)

    def walk(folder: Path) -> None:
        for path in sorted(folder.iterdir()):
            rel = path.relative_to(out).as_posix()
            if path.is_dir() and not path.is_symlink():
                if rel in _OWN_DIRS:
                    walk(path)
                else:
                    foreign.append(path)
                continue
            temp = _TEMP_NAME.match(path.name)
            parent = path.parent.relative_to(out).as_posix()
            if _OWN_FILE.match(rel) and path.is_file() and not path.is_symlink():
                own.append(path)
            elif temp and io.is_temporary(path) and _OWN_FILE.match(
                temp["target"] if parent == "." else f"{parent}/{temp['target']}"
            ):
                temporary.append(path)
            else:
                foreign.append(path)

    walk(out)
    return FolderContents(own, temporary, foreign)


def prepare_folder(out: Path, manifest: dict, *, overwrite: bool) -> None:
    """Apply the output folder rules (module docstring); raises OutputFolderError when refused."""
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{out} exists and is not a folder")
    contents = inspect_folder(out)
    if overwrite:
        for path in contents.own + contents.temporary:
            path.unlink()
        for rel in sorted(_OWN_DIRS, key=len, reverse=True):  # deepest first; only if now empty
            folder = out / rel
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        return
    if contents.foreign:
        shown = ", ".join(p.relative_to(out).as_posix() for p in contents.foreign[:3])
        more = f" and {len(contents.foreign) - 3} more" if len(contents.foreign) > 3 else ""
        raise OutputFolderError(
            f"{out} holds content the generator did not write ({shown}{more}); "
            "choose an empty --out folder, or pass --overwrite to generate there anyway "
            "(only the generator's own files are replaced; other files are kept)"
        )
    if not contents.own:
        for path in contents.temporary:
            path.unlink()
        return
    existing = _read_manifest(out / MANIFEST)
    if existing != manifest:
        differs = _differences(existing, manifest)
        raise OutputFolderError(
            f"{out} holds a generation with a different configuration ({differs}); "
            "pass --overwrite to replace it, or choose another --out folder"
        )
    for path in contents.temporary:  # resume: drop half-written leftovers, keep complete files
        path.unlink()


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _differences(old: dict | None, new: dict) -> str:
    if old is None:
        return f"no readable {MANIFEST}"
    a, b = flatten(old), flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "differs in " + ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")


# ---------------------------------------------------------------------------------------------------------
# Work items. Module-level functions and state, so that spawned workers can unpickle them.

_CONFIG: SynthConfig | None = None
_OUT: Path | None = None


def _init_worker(config: SynthConfig, out: str) -> None:
    global _CONFIG, _OUT
    _CONFIG, _OUT = config, Path(out)


def _build(task: tuple[ItemKey, bool]) -> tuple[ItemRecord, bool]:
    """Build one item, writing its file unless it already exists. Returns (record, written)."""
    key, exists = task
    assert _CONFIG is not None and _OUT is not None, "worker not initialised"
    config = _CONFIG
    if key.kind == "video":
        spec = video_spec(config, key)
        record = video_record(config, key, spec)
        if not exists:
            write_mp4(_OUT / "videos" / key.file_name, video_frames(config, key, spec), fps=config.fps, crf=config.crf)
    else:
        record, pixels = image_item(config, key)
        if not exists:
            write_png(_OUT / "images" / key.file_name, pixels)
    return record, not exists


def generate(config: SynthConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> Summary:
    """Generate (or resume) the benchmark described by ``config`` into ``out``.

    Raises OutputFolderError, before any work, when the folder rules refuse ``out``.
    """
    start = time.perf_counter()
    out = Path(out)
    manifest = synth_manifest(config)
    prepare_folder(out, manifest, overwrite=overwrite)
    io.write_json(out / MANIFEST, manifest)  # first, so an interrupted run is recognised and resumed

    tasks = []
    for kind, folder in (("video", "videos"), ("image", "images")):
        for key in item_keys(config, kind):
            tasks.append((key, (out / folder / key.file_name).is_file()))

    workers = min(config.workers or os.cpu_count() or 1, len(tasks))
    bar = tqdm(total=len(tasks), desc="synth", unit="item", disable=None if progress else True)
    results: list[tuple[ItemRecord, bool]] = []
    if workers <= 1:
        _init_worker(config, str(out))
        for task in tasks:
            results.append(_build(task))
            bar.update()
    else:
        chunksize = max(1, min(16, len(tasks) // (workers * 8)))
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(config, str(out))) as pool:
            for result in pool.imap(_build, tasks, chunksize=chunksize):  # imap keeps task order
                results.append(result)
                bar.update()
    bar.close()

    videos = [r for r, _ in results if r.key.kind == "video"]
    images = [r for r, _ in results if r.key.kind == "image"]
    write_annotations(out, config, videos, images)
    written = sum(w for _, w in results)
    return Summary(out, len(videos), len(images), written, len(results) - written, time.perf_counter() - start)
