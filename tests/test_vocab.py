"""Caption normalisation, vocabulary and the tokenize stage's plain function."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqvision.annotations import VideoRecord
from seqvision.config import TokenizeConfig
from seqvision.ptb import ptb_tokenize
from seqvision.vocab import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Vocab,
    load_references,
    load_split,
    normalize,
    tokenize,
    tokenize_corpus,
    vocab_from_counts,
    write_corpus,
)


def vocab_of(captions: list[str], *, min_count: int = 1, max_size: int | None = None) -> Vocab:
    """The vocabulary the tokenize stage builds from these training captions."""
    records = [VideoRecord(f"v{i:03d}", Path("x.mp4"), "train", None, (c,)) for i, c in enumerate(captions)]
    return tokenize_corpus(records, TokenizeConfig(min_count=min_count, max_size=max_size)).vocab


# ------------------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A man is Playing a guitar.", "a man is playing a guitar"),
        ("  a dog runs   \n", "a dog runs"),
        ("Wait... what?! Yes; no: maybe -- ok - fine, 'quoted' \"double\" `tick`",
         "wait what ?! yes no maybe ok fine quoted double tick"),  # coco-caption keeps "?!"
        ("two dogs (running) [fast]", "two dogs -lrb- running -rrb- -lsb- fast -rsb-"),  # and lowercased brackets
        ("A man's hat; he doesn't know", "a man 's hat he does n't know"),
        ("we're they've I'll she'd I'm", "we 're they 've i 'll she 'd i 'm"),
        ("I can't, I cannot", "i ca n't i can not"),  # PTB: ca n't, can not
        ("a t-shirt at 10:30 costs $3.50 or 1,000 yen & more / less",
         "a t-shirt at 10:30 costs $ 3.50 or 1,000 yen & more / less"),
        ("end of sentence.", "end of sentence"),
        ("he don\u2019t \u201cknow\u201d \u2014 really\u2026", "he do n't know really"),  # curly quotes, dashes
    ],
)
def test_normalize_is_coco_captions_tokenization(raw, expected):
    # The vocabulary is built from exactly the tokens the metrics score (seqvision.ptb, checked against
    # CoreNLP in tests/test_metrics.py), quirks included.
    assert normalize(raw) == expected == ptb_tokenize(raw)


@pytest.mark.parametrize("raw", ["", "   ", "\n\t", "...", " -- ", "''", ". , ; :"])
def test_empty_and_punctuation_only_captions_have_no_tokens(raw):
    assert tokenize(raw) == []


def test_special_token_text_cannot_become_a_special():
    assert ptb_tokenize("<unk> a <eos> b <pad>") == "<unk> a <eos> b <pad>"  # PTB keeps tag-like tokens whole
    assert tokenize("<unk> a <eos> b <pad>") == ["a", "b"]
    vocab = vocab_of(["<pad> <bos> x", "x <eos>"], min_count=1)
    assert vocab.itos[4:] == ["x"]


# Raw Unicode, caption-like ASCII, and concatenations of the pieces the tokenizer has rules for.
_ascii_like = st.text(alphabet="abcnst '\"-.,:;&/01()[]?!`", max_size=40)
_pieces = st.lists(
    st.sampled_from(
        ["a", "man", "s", "t", "n", "'s", "'re", "'d", "n't", "'", "''", "-", "--", ".", "...", ",", ":", " ",
         "1", "0", "&", "/", "(", ")", '"', "`", "\u2019", "\u0301", "\u200b", "\uff21", "İ", "ß", "猫"]
    ),
    max_size=12,
).map("".join)
_captions = st.one_of(st.text(max_size=40), _ascii_like, _pieces)


@settings(max_examples=200, deadline=None)
@given(_captions)
def test_normalize_is_idempotent(text):
    once = normalize(text)
    assert normalize(once) == once


@settings(max_examples=200, deadline=None)
@given(_captions)
def test_decode_encode_round_trip_for_in_vocabulary_text(text):
    vocab = vocab_of([text], min_count=1)
    ids = vocab.encode(text)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert UNK_ID not in ids
    assert vocab.decode(ids) == normalize(text)


# ------------------------------------------------------------------------------------------ vocabulary


def test_specials_come_first():
    vocab = vocab_of(["a b"])
    assert vocab.itos[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)


def test_vocab_min_count_and_order():
    captions = ["b a c", "a b", "a d", "e"]  # a:3 b:2 c:1 d:1 e:1
    assert vocab_of(captions, min_count=1).itos[4:] == ["a", "b", "c", "d", "e"]  # ties by word
    assert vocab_of(captions, min_count=2).itos[4:] == ["a", "b"]
    assert vocab_of(captions, min_count=4).itos[4:] == []


def test_vocab_max_size_counts_specials():
    captions = ["b a c", "a b", "a d", "e"]
    vocab = vocab_of(captions, min_count=1, max_size=6)
    assert len(vocab) == 6 and vocab.itos[4:] == ["a", "b"]
    with pytest.raises(ValueError, match="max_size"):
        vocab_from_counts({"a": 1}, max_size=3)
    with pytest.raises(ValueError, match="min_count"):
        vocab_from_counts({"a": 1}, min_count=0)


def test_vocab_does_not_depend_on_input_order():
    captions = [f"w{i % 7} w{i % 3} common" for i in range(40)]
    shuffled = list(captions)
    random.Random(1).shuffle(shuffled)
    assert vocab_of(captions).itos == vocab_of(shuffled).itos


def test_encode_unknown_words_and_truncation():
    vocab = vocab_of(["a man walks"])
    ids = vocab.encode("A woman walks", max_length=10)
    assert ids == [BOS_ID, vocab.stoi["a"], UNK_ID, vocab.stoi["walks"], EOS_ID]
    long = " ".join(["man"] * 50)
    ids = vocab.encode(long, max_length=5)
    assert len(ids) == 7 and ids[-1] == EOS_ID and ids[1:-1] == [vocab.stoi["man"]] * 5


def test_decode_stops_at_eos_and_skips_specials():
    vocab = vocab_of(["a man walks"])
    a, man, walks = (vocab.stoi[w] for w in ["a", "man", "walks"])
    assert vocab.decode([BOS_ID, a, UNK_ID, man, EOS_ID, walks, PAD_ID]) == "a man"
    assert vocab.decode(np.array([a, PAD_ID, walks])) == "a walks"
    assert vocab.decode([]) == ""


def test_vocab_save_load(tmp_path):
    vocab = vocab_of(["a man walks", "a dog"], min_count=1)
    vocab.save(tmp_path / "vocab.json")
    data = json.loads((tmp_path / "vocab.json").read_text())
    assert data["specials"] == {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
    assert Vocab.load(tmp_path / "vocab.json") == vocab
    (tmp_path / "bad.json").write_text(json.dumps({"itos": ["a", "b"]}))
    with pytest.raises(ValueError, match="bad.json"):
        Vocab.load(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------ tokenize_corpus


def _records() -> list[VideoRecord]:
    p = Path("x.mp4")
    return [
        VideoRecord("v1", p, "train", None, ("A dog runs.", "a dog", "   ")),
        VideoRecord("v0", p, "train", 0, ("the dog runs fast and far away today",)),
        VideoRecord("v2", p, "val", None, ("A zebra runs",)),
        VideoRecord("v3", p, "test", None, ("...",)),
    ]


def test_tokenize_corpus_counts_and_arrays():
    corpus = tokenize_corpus(_records(), TokenizeConfig(min_count=1, max_length=4))
    vocab, splits, stats = corpus.vocab, corpus.splits, corpus.stats
    assert "zebra" not in vocab  # val words never enter the vocabulary
    train = splits["train"]
    assert train.tokens.dtype == np.int32 and train.tokens.shape == (3, 6)
    assert train.lengths.dtype == np.int32 and train.ids.dtype.kind == "U"
    assert train.ids.tolist() == ["v0", "v1", "v1"]  # sorted by record id; the blank caption is dropped
    assert train.lengths.tolist() == [6, 5, 4]
    assert vocab.decode(train.tokens[0]) == "the dog runs fast"  # truncated to max_length
    assert (train.tokens[2, 4:] == PAD_ID).all()
    val = splits["val"]
    assert vocab.decode(val.tokens[0]) == "a runs" and UNK_ID in val.tokens[0].tolist()
    assert splits["test"].tokens.shape == (0, 6)
    assert stats["truncated"] == 1 and stats["dropped_empty"] == 2
    assert stats["splits"]["val"]["unk"] == 1
    assert corpus.references["train"] == {
        "v0": ["the dog runs fast and far away today"],
        "v1": ["A dog runs.", "a dog"],
    }
    assert corpus.references["test"] == {}


def test_write_corpus_layout(tmp_path):
    corpus = tokenize_corpus(_records(), TokenizeConfig(min_count=1, max_length=4))
    write_corpus(corpus, tmp_path / "video")
    names = sorted(p.name for p in (tmp_path / "video").iterdir())
    assert names == [
        "references-test.json", "references-train.json", "references-val.json",
        "stats.json", "test.npz", "train.npz", "val.npz", "vocab.json",
    ]
    loaded = load_split(tmp_path / "video", "train")
    np.testing.assert_array_equal(loaded.tokens, corpus.splits["train"].tokens)
    assert load_references(tmp_path / "video", "val") == {"v2": ["A zebra runs"]}
    vocab = Vocab.load(tmp_path / "video" / "vocab.json")
    assert vocab == corpus.vocab and vocab.config["max_length"] == 4
    assert json.loads((tmp_path / "video" / "stats.json").read_text())["dropped_empty"] == 2


def test_damaged_token_files_name_the_file_and_the_tokenize_stage(tmp_path):
    write_corpus(tokenize_corpus(_records(), TokenizeConfig(min_count=1, max_length=4)), tmp_path)
    remedy = "rebuild it with `dvc repro tokenize` (or `dvc checkout` to restore the cached copy)"
    npz = tmp_path / "train.npz"
    npz.write_bytes(npz.read_bytes()[:-40])  # numpy: zipfile.BadZipFile "File is not a zip file", no name
    with pytest.raises(ValueError) as err:
        load_split(tmp_path, "train")
    assert str(err.value) == f"{npz}: corrupt .npz (File is not a zip file); {remedy}"
    npz.write_bytes(b"\x00" * 200)  # numpy: "... pass allow_pickle=True"
    with pytest.raises(ValueError, match=r"train.npz: not an .npz file \(no zip header\)"):
        load_split(tmp_path, "train")
    with open(npz, "wb") as f:  # readable, but not what tokenize writes
        np.savez(f, tokens=np.zeros((2, 3), np.int32), lengths=np.zeros(3, np.int32), ids=np.array(["a", "b"]))
    with pytest.raises(ValueError, match=r"train.npz: arrays disagree \(tokens \(2, 3\), lengths \(3,\), ids \(2,\)\)"):
        load_split(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"nope.npz: no such file; rebuild it with `dvc repro tokenize`"):
        load_split(tmp_path, "nope")

    refs = tmp_path / "references-val.json"
    refs.write_text('{"v2": ["A zebra')
    with pytest.raises(ValueError, match=r"references-val.json: not valid JSON .*dvc repro tokenize"):
        load_references(tmp_path, "val")
    refs.write_text('{"v2": "A zebra runs"}')
    with pytest.raises(ValueError, match=r"references-val.json: expected \{id: \[caption, ...\]\}; rebuild"):
        load_references(tmp_path, "val")


# ------------------------------------------------------------------------------------------ the flow


def _tiny_raw_data(root: Path) -> dict[str, str]:
    """A few videos and images in the real formats: MSR-VTT JSON, UCF101 lists, COCO caption files."""
    ann = root / "annotations"
    (ann / "ucf101").mkdir(parents=True)
    (ann / "coco").mkdir()
    videos = [("video0", "train"), ("video1", "train"), ("video2", "validate"), ("video3", "test")]
    sentences = [("video0", "A man cooks."), ("video0", "a man is cooking pasta in a big kitchen today"),
                 ("video1", "A MAN runs"), ("video1", " ... "), ("video2", "a woman cooks"), ("video3", "a man")]
    (ann / "msrvtt.json").write_text(json.dumps({
        "videos": [{"video_id": v, "split": s} for v, s in videos],
        "sentences": [{"video_id": v, "caption": c, "sen_id": i} for i, (v, c) in enumerate(sentences)],
    }))
    (ann / "ucf101" / "classInd.txt").write_text("1 cook\n2 run\n")
    (ann / "ucf101" / "trainlist01.txt").write_text("video0.mp4 1\nvideo1.mp4 2\n")
    (ann / "ucf101" / "vallist01.txt").write_text("video2.mp4 1\n")
    (ann / "ucf101" / "testlist01.txt").write_text("video3.mp4 1\n")
    for split, items in {"train": [(0, "A red ball."), (1, "a blue ball")], "val": [(2, "a red cube")],
                         "test": [(3, "a ball")]}.items():
        (ann / "coco" / f"captions_{split}.json").write_text(json.dumps({
            "images": [{"id": i, "file_name": f"image{i}.png", "width": 8, "height": 8} for i, _ in items],
            "annotations": [{"id": i, "image_id": i, "caption": c} for i, c in items],
        }))
    return {
        "--video-dir": str(root / "videos"), "--video-captions": str(ann / "msrvtt.json"),
        "--video-captions-format": "msrvtt", "--activity-dir": str(ann / "ucf101"), "--activity-split": "1",
        "--image-dir": str(root / "images"), "--image-captions-dir": str(ann / "coco"), "--karpathy-split": "",
    }


def _flags(paths: dict[str, str]) -> list[str]:
    return [x for kv in paths.items() for x in kv]


@pytest.mark.slow
def test_tokenize_flow_end_to_end(tmp_path, prefect_harness, capsys):
    from pipelines.tokenize import main

    paths = _tiny_raw_data(tmp_path / "data")
    params = tmp_path / "params.yaml"
    params.write_text("tokenize:\n  min_count: 1\n  max_size: null\n  max_length: 6\n")
    out = tmp_path / "artifacts" / "tokens"
    assert main(["--params", str(params), "--out", str(out), *_flags(paths)]) == 0

    printed = capsys.readouterr().out
    assert "video: 5 captions (3 train)" in printed and "1 truncated to 6 words; 1 empty captions dropped" in printed
    assert "image: 4 captions (2 train)" in printed
    video = out / "video"
    vocab = Vocab.load(video / "vocab.json")
    assert "woman" not in vocab and vocab.config == {"min_count": 1, "max_size": None, "max_length": 6}
    train = load_split(video, "train")
    assert train.tokens.shape == (3, 8) and train.ids.tolist() == ["video0", "video0", "video1"]
    assert vocab.decode(train.tokens[1]) == "a man is cooking pasta in"
    assert load_references(video, "val") == {"video2": ["a woman cooks"]}
    assert json.loads((video / "stats.json").read_text())["dropped_empty"] == 1
    image = out / "image"
    assert load_references(image, "train") == {"image0": ["A red ball."], "image1": ["a blue ball"]}
    assert Vocab.load(image / "vocab.json").itos[4:] == ["a", "ball", "blue", "red"]
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary files left


def test_tokenize_cli_config_and_missing_file_errors_are_one_line(tmp_path, capsys):
    from pipelines.tokenize import main

    paths = _tiny_raw_data(tmp_path / "data")
    params = tmp_path / "params.yaml"
    params.write_text("tokenize:\n  min_count: 0\n")
    assert main(["--params", str(params), "--out", str(tmp_path / "out"), *_flags(paths)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenize.min_count" in err

    params.write_text("tokenize:\n  max_length: 5\n")
    paths["--video-captions"] = str(tmp_path / "missing.json")
    assert main(["--params", str(params), "--out", str(tmp_path / "out"), *_flags(paths)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.json" in err

    paths["--video-captions-format"] = "youtube"
    assert main(["--params", str(params), "--out", str(tmp_path / "out"), *_flags(paths)]) == 2
    assert "video_captions_format" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
