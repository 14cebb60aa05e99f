"""Caption normalisation, vocabulary, encode/decode, and the ``tokenize`` stage's work.

Normalisation follows what coco-caption (pycocoevalcap) does before scoring: Stanford's PTBTokenizer with
``-lowerCase``, then removal of the tokens in ``PUNCTUATIONS`` (pycocoevalcap/tokenizer/ptbtokenizer.py).
Training on the same normalised text the metrics see means the model is never scored on distinctions it was
never taught (case, punctuation). This is a pure-Python approximation of PTB (no Java):

- Unicode NFKC, curly quotes -> ASCII quotes, dashes -> ``-``, lowercase; control characters become spaces;
- words are runs of letters, digits, marks and ``_`` joined by single inner ``- . & / '`` (``t-shirt``,
  ``3.5``, ``o'clock``, ``and/or``), or ``, :`` between digits (``1,000``, ``10:30``);
- PTB clitics are split off: ``don't`` -> ``do n't``, ``man's`` -> ``man 's`` (also ``'re 've 'll 'd 'm``);
- every other character is a one-character token; the PTB punctuation (``. , ? ! : ; - ' `` ...``) and the
  brackets and double quotes (PTB turns them into ``-LRB-``, `````` etc.) are dropped, other symbols
  (``$ % & # +``) stay, as in coco-caption.

Known differences from Stanford PTB: no ``cannot`` -> ``can not`` / ``gonna`` -> ``gon na`` splits, a final
period is always split off (``u.s.`` -> ``u.s``), and square brackets are dropped (PTB keeps ``-lsb-``).
``normalize`` is idempotent (``normalize(normalize(x)) == normalize(x)``), which is what makes
``decode(encode(x)) == normalize(x)`` hold for in-vocabulary text.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from seqvision import io
from seqvision.config import TokenizeConfig, to_dict

# pycocoevalcap/tokenizer/ptbtokenizer.py
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
# Characters PTB rewrites into the bracket/quote tokens above (or -LSB-/-RSB-, which we drop as well).
_DROPPED = PUNCTUATIONS | frozenset('"()[]{}')
_INNER = frozenset("-./&'")  # may join two word characters
_INNER_DIGITS = frozenset(",:")  # may join two digits
_CLITICS = ("'s", "'re", "'ve", "'ll", "'d", "'m")
_ASCII = str.maketrans(
    {
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',
        "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-", "\u2212": "-",
    }
)

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


# --------------------------------------------------------------------------------------------------------
# Normalisation


def _is_word_char(ch: str) -> bool:
    return ch == "_" or unicodedata.category(ch)[0] in "LNM"


def _canonical(text: str) -> str:
    """NFKC + ASCII quotes/dashes + lowercase, iterated to a fixed point (``lower`` can un-normalise:
    ``"İ".lower()`` is ``i`` + a combining dot; NFKC can produce capitals: ``"ℌ"`` -> ``H``)."""
    for _ in range(4):
        new = unicodedata.normalize("NFKC", text).translate(_ASCII).lower()
        if new == text:
            break
        text = new
    # Control, format, private-use and unassigned characters separate words; they never form one.
    return "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in text)


def _split_clitics(word: str) -> list[str]:
    """``don't`` -> ``[do, n't]``; ``man's`` -> ``[man, 's]``; repeated (``x's's``), so output is stable."""
    tail: list[str] = []
    while True:
        if len(word) > 3 and word.endswith("n't") and _is_word_char(word[-4]):
            tail.append("n't")
            word = word[:-3]
            continue
        clitic = next((c for c in _CLITICS if word.endswith(c) and len(word) > len(c)), None)
        if clitic is None:
            break
        tail.append(clitic)
        word = word[: -len(clitic)]
    return [word, *reversed(tail)]


def _scan(chunk: str) -> list[str]:
    """One whitespace-free chunk -> PTB-like tokens (punctuation not yet removed)."""
    out: list[str] = []
    i, n = 0, len(chunk)
    while i < n:
        # A clitic standing alone ("'s" after "man 's" was re-joined) stays one token.
        clitic = next((c for c in _CLITICS if chunk.startswith(c, i)), None)
        if clitic and (i + len(clitic) == n or not _is_word_char(chunk[i + len(clitic)])):
            out.append(clitic)
            i += len(clitic)
            continue
        if not _is_word_char(chunk[i]):
            out.append(chunk[i])
            i += 1
            continue
        j = i + 1
        while j < n:
            ch = chunk[j]
            if _is_word_char(ch):
                j += 1
            elif j + 1 < n and _is_word_char(chunk[j + 1]) and (
                ch in _INNER or (ch in _INNER_DIGITS and chunk[j - 1].isdigit() and chunk[j + 1].isdigit())
            ):
                j += 2
            else:
                break
        out.extend(_split_clitics(chunk[i:j]))
        i = j
    return out


def tokenize(text: str) -> list[str]:
    """Raw caption -> normalised word tokens (lowercase, PTB-split, PTB punctuation removed)."""
    return [tok for chunk in _canonical(text).split() for tok in _scan(chunk) if tok not in _DROPPED]


def normalize(text: str) -> str:
    """Raw caption -> normalised caption: the tokens of :func:`tokenize` joined by single spaces."""
    return " ".join(tokenize(text))


# --------------------------------------------------------------------------------------------------------
# Vocabulary


class Vocab:
    """Word <-> id. Ids 0..3 are ``<pad> <bos> <eos> <unk>``; words follow by descending training count.

    Special tokens cannot collide with words: ``<`` and ``>`` never join a word, so ``"<unk>"`` in a caption
    tokenizes to ``< unk >``.
    """

    def __init__(self, itos: Sequence[str], *, config: Mapping[str, Any] | None = None) -> None:
        itos = list(itos)
        if itos[:4] != [PAD, BOS, EOS, UNK]:
            raise ValueError(f"a vocabulary must start with {[PAD, BOS, EOS, UNK]}, got {itos[:4]}")
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


def count_words(captions: Iterable[str]) -> Counter[str]:
    return Counter(tok for caption in captions for tok in tokenize(caption))


def build_vocab(captions: Iterable[str], *, min_count: int = 1, max_size: int | None = None) -> Vocab:
    """Training captions -> :class:`Vocab` of the words seen at least ``min_count`` times, most frequent
    first (ties by word, so the result never depends on input order), cut to ``max_size`` entries in total
    (specials included; ``None`` for no limit)."""
    return vocab_from_counts(count_words(captions), min_count=min_count, max_size=max_size)


def vocab_from_counts(counts: Mapping[str, int], *, min_count: int = 1, max_size: int | None = None) -> Vocab:
    """:func:`build_vocab` from word counts already made."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if max_size is not None and max_size < len(SPECIALS):
        raise ValueError(f"max_size must be >= {len(SPECIALS)} (the special tokens), got {max_size}")
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    if max_size is not None:
        words = words[: max_size - len(SPECIALS)]
    return Vocab([PAD, BOS, EOS, UNK, *words], config={"min_count": min_count, "max_size": max_size})


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
