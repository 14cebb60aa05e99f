"""seqvision.io: the markdown section writer the benchmarks use, and the checked array reads every module uses."""

from __future__ import annotations

import os

import numpy as np
import pytest

from seqvision.io import ArtifactError, load_array, load_arrays, load_json, replace_markdown_section

REMEDY = "rebuild it with `dvc repro extract` (or `dvc checkout` to restore the cached copy)"


def test_replace_markdown_section_replaces_only_its_own_section_or_appends(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\n## A\n\nold a\n\n## B\n\nb stays\n")
    replace_markdown_section(path, "## A", "## A\n\nnew a\n")
    assert path.read_text() == "# Benchmarks\n\n## A\n\nnew a\n\n## B\n\nb stays\n"
    replace_markdown_section(path, "## C", "## C\n\nc\n")
    assert path.read_text().endswith("## B\n\nb stays\n\n## C\n\nc\n")
    replace_markdown_section(tmp_path / "new.md", "## A", "## A\n\na\n")
    assert (tmp_path / "new.md").read_text().startswith("# Benchmarks\n") and "## A\n\na\n" in (tmp_path / "new.md").read_text()


@pytest.fixture
def good_npy(tmp_path):
    path = tmp_path / "videos-train-000.npy"
    np.save(path, np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4), allow_pickle=False)
    return path


def test_load_array_memory_maps_a_good_file(good_npy):
    mapped = load_array(good_npy, stage="extract")
    assert isinstance(mapped, np.memmap) and mapped.shape == (2, 3, 4) and not mapped.flags.writeable
    whole = load_array(good_npy, stage="extract", mmap=False)
    assert not isinstance(whole, np.memmap)
    np.testing.assert_array_equal(mapped, whole)


def _corrupt(data: bytes) -> dict[str, bytes]:
    return {
        "truncated": data[:-5],  # numpy: "mmap length is greater than file size"
        "cut in the header": data[:40],
        "empty": b"",
        "random bytes": bytes(range(256)) * 2,  # numpy: "... pass allow_pickle=True"
        "trailing bytes": data + b"\0\0\0",  # numpy maps this silently
        "header bit flip": data[:20] + bytes([data[20] ^ 0x40]) + data[21:],
    }


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("truncated", "truncated: a 2x3x4 uint8 array needs 152 bytes, the file has 147"),
        ("cut in the header", "corrupt .npy header"),
        ("empty", "not a .npy file"),
        ("random bytes", "not a .npy file"),
        ("trailing bytes", "longer than its header says: a 2x3x4 uint8 array needs 152 bytes, the file has 155"),
        ("header bit flip", "corrupt .npy header"),
    ],
)
def test_a_damaged_npy_is_one_error_naming_the_file_the_problem_and_the_stage(good_npy, case, problem, mmap):
    good_npy.write_bytes(_corrupt(good_npy.read_bytes())[case])
    with pytest.raises(ArtifactError) as err:
        load_array(good_npy, stage="extract", mmap=mmap)
    message = str(err.value)
    assert message.startswith(f"{good_npy}: ") and problem in message and message.endswith(REMEDY), message
    assert "\n" not in message and "allow_pickle" not in message


def test_a_pickled_npy_is_refused(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ArtifactError, match="objects.npy: holds pickled Python objects"):
        load_array(path, stage="features")


def test_a_missing_array_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_array(tmp_path / "videos-train.npy", stage="features")
    assert str(err.value) == (
        f"{tmp_path / 'videos-train.npy'}: no such file; rebuild it with `dvc repro features` "
        "(or `dvc checkout` to restore the cached copy)"
    )
    with pytest.raises(FileNotFoundError, match="dvc repro tokenize"):
        load_arrays(tmp_path / "train.npz", ["tokens"], stage="tokenize")
    with pytest.raises(FileNotFoundError, match="dvc repro tokenize"):
        load_json(tmp_path / "references-val.json", stage="tokenize")


@pytest.fixture
def good_npz(tmp_path):
    path = tmp_path / "train.npz"
    with open(path, "wb") as f:
        np.savez(f, tokens=np.arange(12, dtype=np.int32).reshape(3, 4), ids=np.array(["a", "b", "c"]))
    return path


def test_load_arrays_reads_an_npz(good_npz):
    arrays = load_arrays(good_npz, ["ids", "tokens"], stage="tokenize")
    assert arrays["ids"].tolist() == ["a", "b", "c"] and arrays["tokens"].shape == (3, 4)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda b: b[: len(b) // 2], "corrupt .npz (File is not a zip file)"),
        (lambda b: b[:-10], "corrupt .npz"),
        (lambda b: os.urandom(64), "not an .npz file"),
        # a bit flip in the stored array data (the int32 11 of tokens): caught by the zip member's CRC-32
        (lambda b: b.replace(b"\x0b\x00\x00\x00", b"\x0a\x00\x00\x00", 1), "corrupt .npz (Bad CRC-32 for file 'tokens.npy')"),
    ],
    ids=["half", "tail-cut", "random", "data-bit-flip"],
)
def test_a_damaged_npz_is_one_error_naming_the_file_and_the_stage(good_npz, damage, problem):
    good_npz.write_bytes(damage(good_npz.read_bytes()))
    with pytest.raises(ArtifactError) as err:
        load_arrays(good_npz, ["tokens", "ids"], stage="tokenize")
    message = str(err.value)
    assert message.startswith(f"{good_npz}: {problem}") and message.endswith(
        "rebuild it with `dvc repro tokenize` (or `dvc checkout` to restore the cached copy)"
    ), message


def test_an_npz_without_a_wanted_array(good_npz):
    with pytest.raises(ArtifactError, match=r"train.npz: missing array 'lengths'; rebuild it with `dvc repro tokenize`"):
        load_arrays(good_npz, ["tokens", "lengths"], stage="tokenize")


def test_load_json_names_file_and_stage(tmp_path):
    path = tmp_path / "index.json"
    path.write_text('{"videos": [')
    with pytest.raises(ArtifactError, match=r"index.json: not valid JSON .*; rebuild it with `dvc repro extract`"):
        load_json(path, stage="extract")
    path.write_text('{"videos": []}')
    assert load_json(path, stage="extract") == {"videos": []}
