"""Caption normalisation, vocabulary, encode/decode, and the ``tokenize`` stage's work.

Normalisation is coco-caption's own (:func:`seqvision.ptb.ptb_tokenize`: PTB tokens, lower case, punctuation
removed), the same function the metrics score with, so a model is trained on exactly the text it is scored on.
``normalize`` is idempotent (``normalize(normalize(x)) == normalize(x)``), which is what makes
``decode(encode(x)) == normalize(x)`` hold for in-vocabulary text.

Special tokens: ids :data:`PAD_ID` ... :data:`UNK_ID` (0-3) are owned here and imported by every model, decoder
and dataset; their strings are :data:`PAD_TOKEN` ... :data:`UNK_TOKEN`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from seqvision import io
from seqvision.config import TokenizeConfig, to_dict
from seqvision.ptb import ptb_tokenize

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<bos>", "<eos>", "<unk>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIALS = {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "unk": UNK_ID}
_SPECIAL_TOKENS = frozenset({PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN})


# --------------------------------------------------------------------------------------------------------
# Normalisation


def tokenize(text: str) -> list[str]:
    """Raw caption -> normalised word tokens, exactly as coco-caption tokenizes it for scoring.

    Applied until nothing changes (at most a few passes; only odd inputs such as emoticons take more than one:
    ``":)"`` -> ``":-rrb-"`` -> ``"-rrb-"``), so a decoded caption, re-tokenized by the metrics, is scored on
    exactly the tokens the model generated. A token that spells a special token (PTB keeps ``<eos>`` whole, like
    any SGML-style tag) is dropped: a caption cannot smuggle an end-of-sentence or padding id into training."""
    line = ptb_tokenize(text)
    for _ in range(8):
        again = ptb_tokenize(line)
        if again == line:
            break
        line = again
    return [tok for tok in line.split() if tok not in _SPECIAL_TOKENS]


def normalize(text: str) -> str:
    """Raw caption -> normalised caption: the tokens of :func:`tokenize` joined by single spaces."""
    return " ".join(tokenize(text))


# --------------------------------------------------------------------------------------------------------
# Vocabulary


class Vocab:
    """Word <-> id. Ids 0..3 are ``<pad> <bos> <eos> <unk>``; words follow by descending training count.

    Special tokens cannot collide with words: :func:`tokenize` drops a token that spells one.
    """

    def __init__(self, itos: Sequence[str], *, config: Mapping[str, Any] | None = None) -> None:
        itos = list(itos)
        if itos[:4] != [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]:
            raise ValueError(f"a vocabulary must start with {[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]}, got {itos[:4]}")
        if len(set(itos)) != len(itos):
            raise ValueError("a vocabulary must not repeat a word")
        self.itos = itos
        self.stoi = {word: i for i, word in enumerate(itos)}
        self.config = dict(config or {})

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: object) -> bool:
        return word in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocab({len(self)} tokens)"

    def encode_tokens(self, tokens: Sequence[str], *, max_length: int | None = None) -> list[int]:
        """Normalised tokens -> ``[<bos>, w1 .. wn, <eos>]`` with ``n <= max_length``; unknown -> ``<unk>``."""
        words = tokens if max_length is None else tokens[:max_length]
        return [BOS_ID, *(self.stoi.get(w, UNK_ID) for w in words), EOS_ID]

    def encode(self, text: str, *, max_length: int | None = None) -> list[int]:
        """Raw caption -> ids ``[<bos>, w1 .. wn, <eos>]`` (unpadded; at most ``max_length`` words)."""
        return self.encode_tokens(tokenize(text), max_length=max_length)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; stops at the first ``<eos>``, skips ``<pad> <bos> <unk>``. Accepts lists, arrays,
        1-D tensors."""
        words = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID, UNK_ID):
                continue
            words.append(self.itos[i])
        return " ".join(words)

    def to_json(self) -> dict[str, Any]:
        return {"itos": self.itos, "specials": dict(SPECIALS), "config": self.config}

    def save(self, path: str | Path) -> None:
        io.write_json(path, self.to_json(), indent=None)

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        path = Path(path)
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, Mapping) or not isinstance(data.get("itos"), list):
            raise ValueError(f"{path}: missing key 'itos' (a list of words)")
        if data.get("specials", SPECIALS) != SPECIALS:
            raise ValueError(f"{path}: specials {data.get('specials')} differ from {SPECIALS}")
        try:
            return cls(data["itos"], config=data.get("config"))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def vocab_from_counts(counts: Mapping[str, int], *, min_count: int = 1, max_size: int | None = None) -> Vocab:
    """Word counts of the training captions -> :class:`Vocab` of the words seen at least ``min_count`` times,
    most frequent first (ties by word, so the result never depends on counting order), cut to ``max_size``
    entries in total (specials included; ``None`` for no limit)."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if max_size is not None and max_size < len(SPECIALS):
        raise ValueError(f"max_size must be >= {len(SPECIALS)} (the special tokens), got {max_size}")
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    if max_size is not None:
        words = words[: max_size - len(SPECIALS)]
    return Vocab([PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, *words], config={"min_count": min_count, "max_size": max_size})


# --------------------------------------------------------------------------------------------------------
# The tokenize stage: records -> vocab + padded ids + references + stats


class HasCaptions(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def split(self) -> str: ...
    @property
    def captions(self) -> tuple[str, ...]: ...


class EncodedSplit(NamedTuple):
    tokens: np.ndarray  # int32 (C, L): <bos> w1 .. wn <eos> <pad> ..., L = max_length + 2
    lengths: np.ndarray  # int32 (C,), incl. <bos>/<eos>
    ids: np.ndarray  # <U (C,), the record id of each caption


class TokenizedCorpus(NamedTuple):
    vocab: Vocab
    splits: dict[str, EncodedSplit]
    references: dict[str, dict[str, list[str]]]  # split -> id -> raw captions (non-empty ones)
    stats: dict[str, Any]


SPLITS = ("train", "val", "test")


def tokenize_corpus(records: Iterable[HasCaptions], config: TokenizeConfig) -> TokenizedCorpus:
    """Build the vocabulary from the *train* captions only, then encode every split.

    Captions that normalise to nothing are dropped (from the ids and the references) and counted; captions
    longer than ``config.max_length`` words are truncated and counted. Every split is present in the
    result, possibly with zero rows.
    """
    by_split: dict[str, list[tuple[str, str, list[str]]]] = {s: [] for s in SPLITS}
    for record in sorted(records, key=lambda r: r.id):
        if record.split not in by_split:
            raise ValueError(f"record {record.id!r}: split {record.split!r} is not one of {SPLITS}")
        for caption in record.captions:
            by_split[record.split].append((record.id, caption, tokenize(caption)))

    train_counts = Counter(tok for _, _, toks in by_split["train"] for tok in toks)
    vocab = vocab_from_counts(train_counts, min_count=config.min_count, max_size=config.max_size)
    vocab.config = to_dict(config)
    width = config.max_length + 2  # <bos> + words + <eos>

    splits: dict[str, EncodedSplit] = {}
    references: dict[str, dict[str, list[str]]] = {}
    split_stats: dict[str, dict[str, int]] = {}
    for split, rows in by_split.items():
        kept = [(i, raw, toks) for i, raw, toks in rows if toks]
        tokens = np.full((len(kept), width), PAD_ID, dtype=np.int32)
        lengths = np.zeros(len(kept), dtype=np.int32)
        unk = words = 0
        refs: dict[str, list[str]] = {}
        for row, (record_id, raw, toks) in enumerate(kept):
            ids = vocab.encode_tokens(toks, max_length=config.max_length)
            tokens[row, : len(ids)] = ids
            lengths[row] = len(ids)
            unk += ids.count(UNK_ID)
            words += len(ids) - 2
            refs.setdefault(record_id, []).append(raw)
        splits[split] = EncodedSplit(tokens, lengths, np.array([i for i, _, _ in kept], dtype=str))
        references[split] = refs
        split_stats[split] = {
            "captions": len(kept),
            "items": len(refs),
            "truncated": sum(len(t) > config.max_length for _, _, t in kept),
            "dropped_empty": len(rows) - len(kept),
            "words": words,
            "unk": unk,
        }

    stats = {
        "truncated": sum(s["truncated"] for s in split_stats.values()),
        "dropped_empty": sum(s["dropped_empty"] for s in split_stats.values()),
        "vocab_size": len(vocab),
        "train_distinct_words": len(train_counts),
        "max_length": config.max_length,
        "splits": split_stats,
    }
    return TokenizedCorpus(vocab, splits, references, stats)


def write_corpus(corpus: TokenizedCorpus, out_dir: str | Path) -> None:
    """Write ``vocab.json``, ``{split}.npz``, ``references-{split}.json`` and ``stats.json`` atomically
    (layout in docs/design.md)."""
    out_dir = Path(out_dir)
    for split, encoded in corpus.splits.items():
        with io.atomic_path(out_dir / f"{split}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, tokens=encoded.tokens, lengths=encoded.lengths, ids=encoded.ids)
        io.write_json(out_dir / f"references-{split}.json", corpus.references[split])
    io.write_json(out_dir / "stats.json", corpus.stats)
    corpus.vocab.save(out_dir / "vocab.json")


def load_split(tokens_dir: str | Path, split: str) -> EncodedSplit:
    """``{tokens_dir}/{split}.npz`` -> :class:`EncodedSplit` (small: loaded whole). A missing or corrupt file
    raises one error naming it and the stage that rewrites it (``tokenize``)."""
    path = Path(tokens_dir) / f"{split}.npz"
    arrays = io.load_arrays(path, EncodedSplit._fields, stage="tokenize")
    encoded = EncodedSplit(**arrays)
    if encoded.tokens.ndim != 2 or encoded.lengths.ndim != 1 or encoded.ids.ndim != 1 or not (
        encoded.tokens.shape[0] == encoded.lengths.shape[0] == encoded.ids.shape[0]
    ):
        shapes = ", ".join(f"{k} {a.shape}" for k, a in arrays.items())
        raise io.ArtifactError(f"{path}: arrays disagree ({shapes}); {io.remedy('tokenize')}")
    return encoded


def load_references(tokens_dir: str | Path, split: str) -> dict[str, list[str]]:
    """``{tokens_dir}/references-{split}.json`` -> {id: [raw reference, ...]}. A missing or malformed file raises
    one error naming it and the stage that rewrites it (``tokenize``)."""
    path = Path(tokens_dir) / f"references-{split}.json"
    data = io.load_json(path, stage="tokenize")
    if not isinstance(data, dict) or not all(
        isinstance(refs, list) and all(isinstance(r, str) for r in refs) for refs in data.values()
    ):
        raise io.ArtifactError(f"{path}: expected {{id: [caption, ...]}}; {io.remedy('tokenize')}")
    return data
