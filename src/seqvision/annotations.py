"""Readers for the annotation formats of the real datasets -> typed, sorted records.

The synthetic generator writes the same formats (see docs/design.md), so real data drops in through these
functions unchanged. Every reader:

- returns records sorted by id, with splits normalised to ``train`` / ``val`` / ``test``;
- keeps captions verbatim apart from stripping surrounding whitespace (normalisation is ``vocab.py``'s job),
  in file order, empty ones included (``tokenize`` drops and counts them);
- does not require the media files to exist: a missing file is reported by ``extract`` in ``skipped.json``;
- keeps every media path inside its folder (``video_dir`` / ``image_dir``): a path from an annotation that is
  absolute, climbs out with ``..`` or resolves through a symlink to a file outside the folder is an
  :class:`AnnotationError` naming the file and line (or record). DVC tracks the folder, not what lies outside
  it, and an annotation file must not be able to make a stage read ``/etc/passwd``;
- raises :class:`AnnotationError` naming the file, the record and the missing or malformed key, and
  :class:`FileNotFoundError` naming a missing annotation file.

Supported formats
-----------------
Videos with captions (``video_captions``):

``msrvtt``
    MSR-VTT JSON ``{"videos": [{"video_id", "split", ...}], "sentences": [{"video_id", "caption", ...}]}``;
    ``split`` may be ``validate``. The official release ships train/val and test in two files: point
    ``video_captions`` at a folder and every ``*.json`` in it is merged. File: ``{video_dir}/{video_id}.mp4``.
``msvd``
    ``AllVideoDescriptions.txt``: one ``{youtube_id}_{start}_{end} caption`` per line, ``#`` comments;
    or the official ``MSR Video Description Corpus.csv`` (columns ``VideoID, Start, End, ..., Language,
    Description``; English rows only); or a ``.json`` file in the MSR-VTT schema. YouTube ids contain ``_``
    and ``-``, so the clip id is split from the right. Splits for ``.txt``/``.csv``: the standard
    1200 / 100 / 670 split (Venugopalan et al. 2015): if ``youtube_mapping.txt`` (``{clip} vid{N}`` per line)
    sits beside the caption file, ``vid1``-``vid1200`` are train, ``vid1201``-``vid1300`` val and the rest test;
    without it, clips in order of first appearance (the order of the official files) get the same split.
    File: ``{video_dir}/{clip}.avi``, or the clip's file with another video extension if that exists.

Activity labels (``activity_dir``, UCF101 layout):
    ``classInd.txt`` (``1 ApplyEyeMakeup``, 1-based), ``trainlist0N.txt`` (``path label``, 1-based),
    ``testlist0N.txt`` (``path``; the label comes from an optional label column, else the class folder
    ``ApplyEyeMakeup/...``, else the ``v_ApplyEyeMakeup_gNN_cMM`` file name), optional ``vallist0N.txt``
    (``path label``). Paths are relative to ``video_dir``; the id is the file stem. Without a val list, val
    is carved out of train *by group* (``v_{Class}_g{NN}``; see :func:`_carve_val_by_group`), and every
    split is checked so that no group spans two splits: clips of one group share actor and background.

Images (``image_captions_dir`` and/or ``karpathy_split``):
    COCO captions ``captions_*.json`` (``{"images": [{"id", "file_name"}], "annotations": [{"image_id",
    "caption"}]}``), split from the file name (``captions_train2014.json`` -> train, ``captions_val2014`` ->
    val, ``captions_test`` -> test). A Karpathy split file (``dataset_coco.json``: ``{"images": [{"filepath",
    "filename", "split", "sentences": [{"raw"}]}]}``, ``restval`` -> train) overrides the splits: when given,
    it lists the images; captions come from the COCO files where present, else from its ``raw`` sentences.
    The image id is the file stem.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

SPLITS = ("train", "val", "test")

# Spellings found in the wild -> the three splits used everywhere in seqvision.
_SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "restval": "train",  # Karpathy: the rest of COCO val2014, trained on by convention
    "val": "val",
    "valid": "val",
    "validate": "val",  # MSR-VTT
    "validation": "val",
    "test": "test",
    "testing": "test",
}

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".3gp")

# MSVD standard split (Venugopalan et al. 2015, "Sequence to Sequence - Video to Text"): vid1..vid1200 train,
# vid1201..vid1300 val, vid1301..vid1970 test.
MSVD_TRAIN, MSVD_VAL = 1200, 100

# UCF101 clip names: v_{Class}_g{group:02d}_c{clip:02d}; clips of one group come from one long video.
_UCF_NAME = re.compile(r"^v_(?P<cls>.+)_g(?P<group>\d+)_c(?P<clip>\d+)$")


class AnnotationError(ValueError):
    """Malformed annotation content. The message names the file, the record and the key."""


class VideoRecord(NamedTuple):
    id: str
    path: Path
    split: str  # train | val | test
    label: int | None  # 0-based activity class; None for a clip with captions only
    captions: tuple[str, ...]


class ImageRecord(NamedTuple):
    id: str
    path: Path
    split: str
    captions: tuple[str, ...]


# --------------------------------------------------------------------------------------------------------
# Small helpers


def normalize_split(name: Any, *, source: str | Path, where: str) -> str:
    """``"validate"`` -> ``"val"`` etc.; anything unknown is an :class:`AnnotationError`."""
    if isinstance(name, str) and name.strip().lower() in _SPLIT_NAMES:
        return _SPLIT_NAMES[name.strip().lower()]
    raise AnnotationError(
        f"{source}: {where}: unknown split {name!r}; expected one of {', '.join(sorted(_SPLIT_NAMES))}"
    )


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such annotation file")
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from Windows editors
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not UTF-8 text: {err}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: not valid JSON: {err}") from None


def _field(obj: Any, key: str, kind: type | tuple[type, ...], *, source: Path, where: str) -> Any:
    """``obj[key]`` checked for presence and type, with an error that names file, record and key."""
    if not isinstance(obj, Mapping):
        raise AnnotationError(f"{source}: {where}: expected an object, got {type(obj).__name__}")
    if key not in obj:
        raise AnnotationError(f"{source}: {where}: missing key {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise AnnotationError(f"{source}: {where}.{key}: expected {names}, got {value!r}")
    return value


def _clean(caption: str) -> str:
    return caption.strip()


def _files_by_stem(folder: Path, extensions: Iterable[str]) -> dict[str, Path]:
    """One directory listing -> {stem: path} for the given extensions (first extension wins)."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    rank = {ext: i for i, ext in enumerate(extensions)}
    best: dict[str, int] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, ext = os.path.splitext(entry.name)
            ext = ext.lower()
            if ext in rank and (stem not in best or rank[ext] < best[stem]):
                best[stem] = rank[ext]
                found[stem] = folder / entry.name
    return found


class _MediaFolder:
    """``folder / relative`` for paths taken from annotations, refused unless the result stays inside
    ``folder`` once ``..`` and symlinks are resolved (as the OS would when opening it).

    Costs one ``lstat`` per path and one ``realpath`` per distinct parent folder (about 12 us of CPU per path
    on a slow shared machine: ~1.5 s for COCO's 120k images).
    """

    def __init__(self, folder: Path, what: str) -> None:
        self.folder = folder
        self.what = what  # "video" or "image", for the message
        self._folder = os.fspath(folder)
        self._real = os.path.realpath(folder)
        self._real_parents: dict[str, str] = {}

    def _realpath(self, path: str) -> str:
        parent, name = os.path.split(path)
        if name in ("", ".", ".."):
            return os.path.realpath(path)
        real_parent = self._real_parents.get(parent)
        if real_parent is None:
            real_parent = self._real_parents[parent] = os.path.realpath(parent)
        candidate = os.path.join(real_parent, name)
        return os.path.realpath(candidate) if os.path.islink(candidate) else candidate

    def path(self, relative: str, *, source: Path, where: str) -> Path:
        """The media path ``folder / relative``; :class:`AnnotationError` naming ``source`` and ``where`` when
        it leads outside the folder."""
        joined = os.path.join(self._folder, relative)
        real = self._realpath(joined)
        if _within(real, self._real):
            return Path(joined)
        if os.path.isabs(relative):
            problem = "is an absolute path"
        elif not _within(os.path.normpath(joined), os.path.normpath(self._folder)):
            problem = f"leads outside the {self.what} folder {self.folder} (to {os.path.abspath(joined)})"
        else:
            problem = f"resolves through a symlink to {real}, outside the {self.what} folder {self.folder}"
        raise AnnotationError(
            f"{source}: {where}: {relative!r} {problem}; media files must lie inside {self.folder}, which DVC "
            f"tracks: write the path relative to that folder, or copy the file into it"
        )


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# --------------------------------------------------------------------------------------------------------
# Captioned videos


class _Captioned(NamedTuple):
    split: str
    captions: list[str]
    source: Path
    where: str  # the record in source: "videos[3]", "line 12"


def _read_msrvtt(path: Path) -> dict[str, _Captioned]:
    """One MSR-VTT-schema JSON -> {video_id: (split, captions in file order)}."""
    data = _read_json(path)
    if not isinstance(data, Mapping):
        raise AnnotationError(f"{path}: expected a JSON object with 'videos' and 'sentences'")
    videos = _field(data, "videos", list, source=path, where="top level")
    sentences = _field(data, "sentences", list, source=path, where="top level")
    out: dict[str, _Captioned] = {}
    for i, video in enumerate(videos):
        where = f"videos[{i}]"
        video_id = _field(video, "video_id", str, source=path, where=where)
        split = normalize_split(_field(video, "split", str, source=path, where=where), source=path, where=where)
        if video_id in out:
            raise AnnotationError(f"{path}: {where}: video_id {video_id!r} listed twice")
        out[video_id] = _Captioned(split, [], path, where)
    for i, sentence in enumerate(sentences):
        where = f"sentences[{i}]"
        video_id = _field(sentence, "video_id", str, source=path, where=where)
        caption = _field(sentence, "caption", str, source=path, where=where)
        if video_id not in out:
            raise AnnotationError(f"{path}: {where}: video_id {video_id!r} has no entry in 'videos'")
        out[video_id].captions.append(_clean(caption))
    return out


def _msvd_clip(clip: str, *, source: Path, where: str) -> str:
    # YouTube ids may themselves contain "_" and "-": split the two numbers off the right.
    parts = clip.rsplit("_", 2)
    if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not parts[2].isdigit():
        raise AnnotationError(f"{source}: {where}: clip id {clip!r} is not '{{youtube_id}}_{{start}}_{{end}}'")
    return clip


def _read_msvd_txt(path: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """AllVideoDescriptions.txt -> ({clip: captions}, {clip: its first line}), clips in order of first
    appearance."""
    out: dict[str, list[str]] = {}
    first: dict[str, str] = {}
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(maxsplit=1)
        clip = _msvd_clip(parts[0], source=path, where=f"line {lineno}")
        out.setdefault(clip, []).append(_clean(parts[1]) if len(parts) > 1 else "")
        first.setdefault(clip, f"line {lineno}")
    return out, first


def _read_msvd_csv(path: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """MSR Video Description Corpus.csv -> ({clip: English captions}, {clip: its first line}), clips in order
    of first appearance."""
    rows = csv.DictReader(_read_text(path).splitlines())
    required = ("VideoID", "Start", "End", "Language", "Description")
    missing = [k for k in required if k not in (rows.fieldnames or [])]
    if missing:
        raise AnnotationError(f"{path}: header: missing column {missing[0]!r}")
    out: dict[str, list[str]] = {}
    first: dict[str, str] = {}
    for lineno, row in enumerate(rows, start=2):
        if (row["Language"] or "").strip().lower() != "english":
            continue
        clip = f"{row['VideoID']}_{row['Start']}_{row['End']}"
        _msvd_clip(clip, source=path, where=f"line {lineno}")
        out.setdefault(clip, []).append(_clean(row["Description"] or ""))
        first.setdefault(clip, f"line {lineno}")
    return out, first


def _msvd_splits(clips: list[str], path: Path) -> dict[str, str]:
    """Standard 1200/100/670 split: by ``youtube_mapping.txt`` when present, else by first appearance."""
    mapping_file = path.parent / "youtube_mapping.txt"
    if mapping_file.is_file():
        number: dict[str, int] = {}
        for lineno, line in enumerate(_read_text(mapping_file).splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not re.fullmatch(r"vid\d+", parts[1]):
                raise AnnotationError(f"{mapping_file}: line {lineno}: expected '{{clip}} vid{{N}}', got {line!r}")
            number[parts[0]] = int(parts[1][3:])
        unmapped = [c for c in clips if c not in number]
        if unmapped:
            raise AnnotationError(f"{mapping_file}: clip {unmapped[0]!r} of {path} has no vidN entry")
    else:
        number = {clip: i + 1 for i, clip in enumerate(clips)}

    def split(n: int) -> str:
        return "train" if n <= MSVD_TRAIN else "val" if n <= MSVD_TRAIN + MSVD_VAL else "test"

    return {clip: split(number[clip]) for clip in clips}


def _read_captioned_videos(path: Path, fmt: str) -> tuple[dict[str, _Captioned], str]:
    """-> ({id: captioned}, default file extension)."""
    if fmt == "msrvtt":
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise FileNotFoundError(f"{path}: folder has no *.json caption files")
        merged: dict[str, _Captioned] = {}
        for file in files:
            for video_id, item in _read_msrvtt(file).items():
                if video_id in merged:
                    raise AnnotationError(f"{file}: video_id {video_id!r} also appears in {merged[video_id].source}")
                merged[video_id] = item
        return merged, ".mp4"
    if fmt == "msvd":
        suffix = path.suffix.lower()
        if suffix == ".json":
            return _read_msrvtt(path), ".avi"
        if suffix == ".csv":
            captions, first = _read_msvd_csv(path)
        else:
            captions, first = _read_msvd_txt(path)
        splits = _msvd_splits(list(captions), path)
        return {clip: _Captioned(splits[clip], caps, path, first[clip]) for clip, caps in captions.items()}, ".avi"
    raise AnnotationError(f"{path}: unknown video caption format {fmt!r}; expected 'msrvtt' or 'msvd'")


# --------------------------------------------------------------------------------------------------------
# Activity labels (UCF101 layout)


def load_class_names(activity_dir: str | Path) -> list[str]:
    """``classInd.txt`` -> class names in 0-based label order (``names[label]``)."""
    path = Path(activity_dir) / "classInd.txt"
    by_index: dict[int, str] = {}
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise AnnotationError(f"{path}: line {lineno}: expected '{{index}} {{ClassName}}', got {line!r}")
        index = int(parts[0])
        if index in by_index:
            raise AnnotationError(f"{path}: line {lineno}: class index {index} listed twice")
        by_index[index] = parts[1]
    if sorted(by_index) != list(range(1, len(by_index) + 1)):
        raise AnnotationError(f"{path}: class indices must be 1..{len(by_index)} (1-based, no gaps)")
    if not by_index:
        raise AnnotationError(f"{path}: no classes")
    return [by_index[i] for i in range(1, len(by_index) + 1)]


class _Labelled(NamedTuple):
    rel_path: str
    split: str
    label: int
    source: Path
    where: str  # "line 12" of source


def _ucf_group(stem: str) -> str:
    """``v_X_gNN_cMM`` -> ``v_X_gNN`` (one source video); any other name is a group of its own."""
    m = _UCF_NAME.match(stem)
    return f"v_{m['cls']}_g{m['group']}" if m else stem


def _ucf_label_from_name(rel_path: str, classes: Mapping[str, int]) -> int | None:
    parts = rel_path.replace("\\", "/").split("/")
    if len(parts) > 1 and parts[-2] in classes:
        return classes[parts[-2]]
    m = _UCF_NAME.match(Path(parts[-1]).stem)
    if m and m["cls"] in classes:
        return classes[m["cls"]]
    return None


def _read_ucf_list(path: Path, split: str, classes: Mapping[str, int], *, label_required: bool) -> list[_Labelled]:
    out = []
    num_classes = len(classes)
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        where = f"line {lineno}"
        if len(parts) > 2:
            raise AnnotationError(f"{path}: {where}: expected '{{path}} [{{label}}]', got {line!r}")
        rel_path = parts[0]
        from_name = _ucf_label_from_name(rel_path, classes)
        if len(parts) == 2:
            if not parts[1].isdigit() or not 1 <= int(parts[1]) <= num_classes:
                raise AnnotationError(f"{path}: {where}: label {parts[1]!r} is not a class index 1..{num_classes}")
            label = int(parts[1]) - 1  # classInd and the lists are 1-based
            if from_name is not None and from_name != label:
                raise AnnotationError(
                    f"{path}: {where}: label {parts[1]} disagrees with the class in the path {rel_path!r}"
                )
        elif label_required:
            raise AnnotationError(f"{path}: {where}: missing label column in {line!r}")
        elif from_name is not None:
            label = from_name
        else:
            raise AnnotationError(
                f"{path}: {where}: cannot tell the class of {rel_path!r}: no label column, no class folder, "
                "and the name is not v_{Class}_gNN_cMM; write it as '{path} {label}' or '{Class}/{file}'"
            )
        out.append(_Labelled(rel_path, split, label, path, where))
    return out


def _carve_val_by_group(train: list[_Labelled], *, val_fraction: float) -> list[_Labelled]:
    """Move whole groups from train to val: per class, the last ``round(val_fraction * groups)`` groups in
    sorted order (at least one when a class has two or more groups). Deterministic, and group-safe by
    construction, so no clip of a val group's source video is trained on."""
    groups_by_class: dict[int, set[str]] = defaultdict(set)
    for item in train:
        groups_by_class[item.label].add(_ucf_group(Path(item.rel_path).stem))
    val_groups: set[str] = set()
    for groups in groups_by_class.values():
        ordered = sorted(groups)
        if len(ordered) < 2:
            continue
        take = min(len(ordered) - 1, max(1, round(val_fraction * len(ordered))))
        val_groups.update(ordered[-take:])
    return [
        item._replace(split="val") if _ucf_group(Path(item.rel_path).stem) in val_groups else item for item in train
    ]


def _check_groups(items: Iterable[_Labelled]) -> None:
    seen: dict[str, _Labelled] = {}
    for item in items:
        group = _ucf_group(Path(item.rel_path).stem)
        other = seen.setdefault(group, item)
        if other.split != item.split:
            raise AnnotationError(
                f"group {group!r} spans two splits: {other.rel_path!r} in {other.source} ({other.split}) and "
                f"{item.rel_path!r} in {item.source} ({item.split}); clips of one group must share a split"
            )


def _read_activity(activity_dir: Path, activity_split: int, *, val_fraction: float) -> list[_Labelled]:
    names = load_class_names(activity_dir)
    classes = {name: i for i, name in enumerate(names)}
    train = _read_ucf_list(activity_dir / f"trainlist0{activity_split}.txt", "train", classes, label_required=True)
    test = _read_ucf_list(activity_dir / f"testlist0{activity_split}.txt", "test", classes, label_required=False)
    val_file = activity_dir / f"vallist0{activity_split}.txt"
    if val_file.is_file():
        val = _read_ucf_list(val_file, "val", classes, label_required=True)
    else:
        train, val = [], _carve_val_by_group(train, val_fraction=val_fraction)
    items = train + val + test
    _check_groups(items)
    return items


# --------------------------------------------------------------------------------------------------------
# Public API: videos


def load_video_records(
    *,
    video_dir: str | Path,
    video_captions: str | Path = "",
    video_captions_format: str = "msrvtt",
    activity_dir: str | Path = "",
    activity_split: int = 1,
    val_fraction: float = 0.1,
) -> list[VideoRecord]:
    """Union of captioned videos (MSR-VTT or MSVD) and labelled clips (UCF101 lists), joined by id.

    ``""`` means a source is absent. A video in both must be in the same split in both (else
    :class:`AnnotationError`: a clip captioned in train and classified in test would leak). ``val_fraction``
    only matters for UCF101 splits without a ``vallist0N.txt``. Sorted by id.
    """
    video_dir = Path(video_dir)
    folder = _MediaFolder(video_dir, "video")
    existing = _files_by_stem(video_dir, VIDEO_EXTENSIONS)
    captioned: dict[str, _Captioned] = {}
    default_ext = ".mp4"
    if str(video_captions):
        captioned, default_ext = _read_captioned_videos(Path(video_captions), video_captions_format)

    labelled: dict[str, _Labelled] = {}
    if str(activity_dir):
        if activity_split not in (1, 2, 3):
            raise AnnotationError(f"{activity_dir}: activity_split must be 1, 2 or 3, got {activity_split!r}")
        for item in _read_activity(Path(activity_dir), activity_split, val_fraction=val_fraction):
            stem = Path(item.rel_path).stem
            if stem in labelled:
                raise AnnotationError(
                    f"{item.source}: clip {item.rel_path!r} also listed in {labelled[stem].source}"
                )
            labelled[stem] = item

    records = []
    for video_id in sorted(set(captioned) | set(labelled)):
        cap, lab = captioned.get(video_id), labelled.get(video_id)
        if cap and lab and cap.split != lab.split:
            raise AnnotationError(
                f"video {video_id!r} is {cap.split} in {cap.source} but {lab.split} in {lab.source}"
            )
        if lab is not None:
            path = folder.path(lab.rel_path, source=lab.source, where=lab.where)
        else:
            only = captioned[video_id]
            name = existing[video_id].name if video_id in existing else f"{video_id}{default_ext}"
            path = folder.path(name, source=only.source, where=only.where)
        records.append(
            VideoRecord(
                id=video_id,
                path=path,
                split=(cap or lab).split,  # type: ignore[union-attr]
                label=lab.label if lab else None,
                captions=tuple(cap.captions) if cap else (),
            )
        )
    return records


# --------------------------------------------------------------------------------------------------------
# Public API: images

_COCO_FILE = re.compile(r"^captions_(?P<split>[a-z]+?)(?P<year>\d*)\.json$")


class _CocoImage(NamedTuple):
    split: str
    file_name: str
    captions: list[str]
    source: Path
    where: str  # "images[7]" of source


def _read_coco_dir(image_captions_dir: Path) -> dict[str, _CocoImage]:
    """-> {stem: image} over every captions_*.json."""
    if not image_captions_dir.is_dir():
        raise FileNotFoundError(f"{image_captions_dir}: no such image caption folder")
    files = sorted(image_captions_dir.glob("captions_*.json"))
    if not files:
        raise FileNotFoundError(f"{image_captions_dir}: no captions_*.json files")
    out: dict[str, _CocoImage] = {}
    for path in files:
        m = _COCO_FILE.match(path.name)
        if not m:
            raise AnnotationError(f"{path}: cannot tell the split from the file name (captions_{{split}}[year].json)")
        split = normalize_split(m["split"], source=path, where="file name")
        data = _read_json(path)
        images = _field(data, "images", list, source=path, where="top level")
        annotations = _field(data, "annotations", list, source=path, where="top level")
        by_id: dict[Any, str] = {}
        for i, image in enumerate(images):
            where = f"images[{i}]"
            image_id = _field(image, "id", (int, str), source=path, where=where)
            file_name = _field(image, "file_name", str, source=path, where=where)
            stem = Path(file_name).stem
            if stem in out:
                raise AnnotationError(f"{path}: {where}: image {stem!r} also appears in {out[stem].source}")
            by_id[image_id] = stem
            out[stem] = _CocoImage(split, file_name, [], path, where)
        for i, ann in enumerate(annotations):
            where = f"annotations[{i}]"
            image_id = _field(ann, "image_id", (int, str), source=path, where=where)
            caption = _field(ann, "caption", str, source=path, where=where)
            if image_id not in by_id:
                raise AnnotationError(f"{path}: {where}: image_id {image_id!r} has no entry in 'images'")
            out[by_id[image_id]].captions.append(_clean(caption))
    return out


def _image_path(folder: _MediaFolder, file_name: str, *subdirs: str, source: Path, where: str) -> Path:
    """``{image_dir}/{file_name}``, or ``{image_dir}/{subdir}/{file_name}`` when only that exists; each
    candidate is checked to stay inside the folder before it is looked at."""
    direct = folder.path(file_name, source=source, where=where)
    if direct.exists():
        return direct
    for sub in subdirs:
        if sub:
            candidate = folder.path(f"{sub}/{file_name}", source=source, where=where)
            if candidate.exists():
                return candidate
    return direct


def load_image_records(
    *,
    image_dir: str | Path,
    image_captions_dir: str | Path = "",
    karpathy_split: str | Path = "",
) -> list[ImageRecord]:
    """COCO caption files and/or a Karpathy split file -> image records sorted by id (see module doc)."""
    folder = _MediaFolder(Path(image_dir), "image")
    coco = _read_coco_dir(Path(image_captions_dir)) if str(image_captions_dir) else {}
    records: dict[str, ImageRecord] = {}
    if str(karpathy_split):
        path = Path(karpathy_split)
        data = _read_json(path)
        for i, image in enumerate(_field(data, "images", list, source=path, where="top level")):
            where = f"images[{i}]"
            filename = _field(image, "filename", str, source=path, where=where)
            filepath = image.get("filepath", "") if isinstance(image, Mapping) else ""
            split = normalize_split(_field(image, "split", str, source=path, where=where), source=path, where=where)
            stem = Path(filename).stem
            if stem in records:
                raise AnnotationError(f"{path}: {where}: image {stem!r} listed twice")
            if stem in coco:
                captions = tuple(coco[stem].captions)
            else:
                sentences = _field(image, "sentences", list, source=path, where=where)
                captions = tuple(
                    _clean(_field(s, "raw", str, source=path, where=f"{where}.sentences[{j}]"))
                    for j, s in enumerate(sentences)
                )
            file = _image_path(folder, filename, str(filepath), source=path, where=where)
            records[stem] = ImageRecord(stem, file, split, captions)
    else:
        for stem, image in coco.items():
            # Real COCO keeps images in train2014/ and val2014/, named like the caption file's suffix.
            m = _COCO_FILE.match(image.source.name)
            subdir = f"{m['split']}{m['year']}" if m else ""
            file = _image_path(folder, image.file_name, subdir, source=image.source, where=image.where)
            records[stem] = ImageRecord(stem, file, image.split, tuple(image.captions))
    return [records[k] for k in sorted(records)]


def check_sources(
    *,
    video_captions: str | Path = "",
    activity_dir: str | Path = "",
    activity_split: int = 1,
    image_captions_dir: str | Path = "",
    karpathy_split: str | Path = "",
) -> None:
    """Cheap up-front check that every configured annotation source exists; raises
    :class:`FileNotFoundError` naming the first missing path. Does not parse anything."""
    required: list[Path] = []
    if str(video_captions):
        required.append(Path(video_captions))
    if str(activity_dir):
        base = Path(activity_dir)
        required += [base / "classInd.txt"] + [base / f"{s}list0{activity_split}.txt" for s in ("train", "test")]
    if str(image_captions_dir):
        required.append(Path(image_captions_dir))
    if str(karpathy_split):
        required.append(Path(karpathy_split))
    for path in required:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
    if str(image_captions_dir) and not any(Path(image_captions_dir).glob("captions_*.json")):
        raise FileNotFoundError(f"{image_captions_dir}: no captions_*.json files")


# --------------------------------------------------------------------------------------------------------
# Public API: every split present

# How each format spells a split, for the advice in an empty-split error.
_MSRVTT_SPELLING = {"train": "train", "val": "validate", "test": "test"}
_WHY = "every task trains on train, picks each model's best epoch on val and reports on test"


def _counts(splits: Iterable[str]) -> dict[str, int]:
    counts = dict.fromkeys(SPLITS, 0)
    for split in splits:
        counts[split] += 1
    return counts


def _empty_split(counts: Mapping[str, int]) -> str | None:
    return next((split for split in SPLITS if counts[split] == 0), None)


def _summary(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{counts[split]} {split}" for split in SPLITS)


def check_video_splits(
    records: Iterable[VideoRecord],
    *,
    video_captions: str | Path = "",
    video_captions_format: str = "msrvtt",
    activity_dir: str | Path = "",
    activity_split: int = 1,
) -> None:
    """:class:`AnnotationError` naming the annotation source (and its ``data.`` key) that leaves a split empty,
    and what to do; ``records`` from :func:`load_video_records` with the same sources.

    Every task trains on train, picks each model's best epoch on val and reports on test, so the captioned videos
    (when ``video_captions`` is set) and the labelled clips (when ``activity_dir`` is set) each need all three.
    Checked by the first stages (``extract``, ``tokenize``) so an empty split is not found by ``train`` only.
    """
    records = list(records)
    if str(video_captions):
        counts = _counts(r.split for r in records if r.captions)
        split = _empty_split(counts)
        if split is not None:
            advice = _caption_split_advice(Path(video_captions), video_captions_format, split, counts)
            raise AnnotationError(
                f"{video_captions} (data.video_captions): no captioned video in the {split} split "
                f"({_summary(counts)}); {_WHY}: {advice}"
            )
    if str(activity_dir):
        counts = _counts(r.split for r in records if r.label is not None)
        split = _empty_split(counts)
        if split is not None:
            advice = _activity_split_advice(Path(activity_dir), activity_split, split)
            raise AnnotationError(
                f"{activity_dir} (data.activity_dir, activity_split {activity_split}): no labelled clip in the "
                f"{split} split ({_summary(counts)}); {_WHY}: {advice}"
            )


def _caption_split_advice(path: Path, fmt: str, split: str, counts: Mapping[str, int]) -> str:
    if fmt == "msvd" and path.suffix.lower() != ".json":
        first, last = {"train": (1, MSVD_TRAIN), "val": (MSVD_TRAIN + 1, MSVD_TRAIN + MSVD_VAL),
                       "test": (MSVD_TRAIN + MSVD_VAL + 1, None)}[split]
        numbers = f"vid{first}-vid{last}" if last else f"vid{first} and above"
        return (
            f"MSVD's standard split puts {numbers} in {split}: number the clips so in youtube_mapping.txt beside "
            f"{path.name} ('{{clip}} vid{{N}}' per line); without that file, clips are numbered in order of first "
            f"appearance, and {path.name} has {sum(counts.values())}"
        )
    advice = f'give some videos "split": "{_MSRVTT_SPELLING[split]}" in {path}'
    if split == "test" and not path.is_dir():
        advice += (" (the official MSR-VTT release ships train/val and test in two files: point "
                   "data.video_captions at a folder holding both)")
    return advice


def _activity_split_advice(activity_dir: Path, activity_split: int, split: str) -> str:
    lists = {s: activity_dir / f"{s}list0{activity_split}.txt" for s in SPLITS}
    if split != "val" or lists["val"].is_file():
        return f"{lists[split]} lists no clips: add '{{path}} {{label}}' lines to it"
    return (
        f"there is no {lists['val'].name}, and carving val out of {lists['train'].name} by group (whole "
        "v_{Class}_gNN source videos, about a tenth of each class's groups) finds no class with clips from two or "
        f"more groups: add a {lists['val'].name} ('{{path}} {{label}}' lines), or list clips of two or more groups "
        f"per class in {lists['train'].name}"
    )


def check_image_splits(
    records: Iterable[ImageRecord],
    *,
    image_captions_dir: str | Path = "",
    karpathy_split: str | Path = "",
) -> None:
    """:class:`AnnotationError` naming the annotation source (and its ``data.`` key) that leaves a split empty,
    and what to do; ``records`` from :func:`load_image_records` with the same sources (see
    :func:`check_video_splits`)."""
    counts = _counts(r.split for r in records)
    split = _empty_split(counts)
    if split is None:
        return
    if str(karpathy_split):
        raise AnnotationError(
            f"{karpathy_split} (data.karpathy_split): no image in the {split} split ({_summary(counts)}); {_WHY}: "
            f'give some images "split": "{split}" (the usual dataset_coco.json has 5000 val and 5000 test images)'
        )
    folder = Path(image_captions_dir)
    files = [p.name for p in sorted(folder.glob("captions_*.json"))
             if (m := _COCO_FILE.match(p.name)) and _SPLIT_NAMES.get(m["split"]) == split]
    fix = f"{', '.join(files)} lists no images" if files else f"there is no captions_{split}*.json: add one"
    raise AnnotationError(
        f"{folder} (data.image_captions_dir): no image in the {split} split ({_summary(counts)}); {_WHY}: {fix}, "
        f"or set data.karpathy_split to a Karpathy split file (dataset_coco.json), which assigns train, val and "
        f"test (COCO's own test images have no public captions)"
    )


def activity_labels(records: Iterable[VideoRecord], split: str) -> dict[str, int]:
    """``{id: label}`` (0-based) of the labelled video records of one split."""
    return {r.id: r.label for r in records if r.split == split and r.label is not None}
