"""Evaluation metrics: caption metrics exactly as the coco-caption toolkit computes them, and accuracy.

Captioning
    BLEU-1..4, CIDEr-D, ROUGE-L (and METEOR when a Java runtime is present) come straight from
    ``pycocoevalcap``'s scorer classes, the field's reference implementation (Chen et al. 2015,
    "Microsoft COCO Captions: Data Collection and Evaluation Server", arXiv:1504.00325). Only its
    tokenizer is replaced: ``pycocoevalcap.tokenizer.PTBTokenizer`` shells out to Stanford CoreNLP 3.4.1
    (Java); :func:`ptb_tokenize` is a pure-Python port of that lexer's behaviour on ordinary English,
    followed by the toolkit's own punctuation filter (:data:`PUNCTUATIONS`).

    Scale: every figure is the toolkit's raw value, never multiplied by 100. BLEU, METEOR and ROUGE-L lie
    in [0, 1]. CIDEr-D is reported as coco-caption returns it (the toolkit multiplies by 10 internally, so
    it lies in [0, 10] and is typically 0-1.5 on real data); papers print 100x these numbers.
    METEOR is ``None`` when it could not be computed (no ``java`` on PATH); it is never estimated.

Classification
    top-1 / top-5 accuracy, mean-class accuracy, per-class accuracy, confusion matrix (rows = true class,
    columns = predicted class) and accuracy restricted to the time-reversed class pairs.

Predictions files (JSON Lines, one object per line)
    captioning: ``{"id", "hypothesis", "references": [...], "score"}``
    activity:   ``{"id", "predicted", "label", "score", "topk": [...]}`` (class names; ``topk`` optional,
    ranked best first; it is needed for top-5).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from seqvision.io import write_json

MeteorMode = Literal["auto", "always", "never"]

CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d")

# --------------------------------------------------------------------------------------------------------
# Tokenization: a pure-Python stand-in for coco-caption's PTBTokenizer.
#
# coco-caption runs `java edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase` (CoreNLP 3.4.1,
# default options) over the captions, then drops every token in PUNCTUATIONS. The lexer below reproduces
# what that produces for ordinary English captions; it follows PTBLexer.flex: JFlex semantics (at each
# position the longest match wins, ties go to the earlier rule; trailing context counts towards the length).
# Faithfully reproduced quirks of the original pipeline:
#   * brackets become -LRB- -RRB- -LSB- -RSB- -LCB- -RCB-, lowercased by -lowerCase to "-lrb-" etc., which
#     no longer match the upper-case entries of PUNCTUATIONS, so coco-caption keeps them as words;
#   * "?!", "!!!", "&", "%", "$", "#" ... are tokens not in PUNCTUATIONS, so they stay;
#   * contractions split ("don't" -> "do n't", "can't" -> "ca n't", "cannot" -> "can not", "gonna" -> "gon na");
#   * the currency normalisation of CoreNLP 3.4.1 ("£" -> "#", "€" -> "$", "¢" -> "cents");
#   * characters CoreNLP cannot tokenize (e.g. emoji, outside the Basic Multilingual Plane) are deleted.
# Checked against the real jar: the captions in tests/test_metrics.py (re-run there whenever Java is
# installed), and ~11k randomly assembled captions (words, contractions, numbers, abbreviations, quotes,
# brackets, dashes, symbols, non-ASCII), all identical except a few pathological ones. Known differences:
#   * a caption ending in a one-letter abbreviation ("... a.") keeps "a." here; CoreNLP splits off the
#     period when the *next* caption in its batch starts with a capital letter (so coco-caption's own
#     output depends on caption order there);
#   * stacked quote characters ("`'x", "'`x"), SGML-like tags ("<b a>"), e-mail addresses followed by
#     punctuation.

# Copied verbatim from pycocoevalcap/tokenizer/ptbtokenizer.py.
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# Python's \w also covers numeric symbols (½, ², Ⅳ, ①) that Java's [:letter:] / [:digit:] do not.
_NUMERIC_SYMBOL = r"[\u00B2\u00B3\u00B9\u00BC-\u00BE\u2070-\u209F\u2150-\u218F\u2460-\u24FF\u2776-\u2793]"
_LETTER = rf"(?:(?!{_NUMERIC_SYMBOL})[^\W\d_]|[\u00AD\u0300-\u036F])"  # + soft hyphen, combining accents
_DIGIT = r"\d"
_ALNUM = rf"(?:(?!{_NUMERIC_SYMBOL})[^\W_])"
_APOS = r"(?:['\u0092\u2019]|&apos;)"
_APOSETC = r"(?:['\u0092\u2019`\u0091\u2018\u201B]|&apos;)"
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_HYPHEN = r"[-_\u058A\u2010\u2011]"
_WORD = rf"{_LETTER}(?:{_LETTER}|{_DIGIT})*(?:[.!?]{_LETTER}(?:{_LETTER}|{_DIGIT})*)*"
_NUM = rf"(?:{_DIGIT}*(?:[.:,\u00AD\u066B\u066C]{_DIGIT}+)+|{_DIGIT}+)"
_ACRO = r"[A-Za-z](?:\.[A-Za-z])*"
_ACRO2 = r"[A-Za-z](?:\.[A-Za-z])+"
_REDAUX = rf"{_APOS}(?:[msdMSD]|[rR][eE]|[vV][eE]|[lL][lL])"

# Abbreviation lists of PTBLexer.flex. The lexer is JFlex %caseless: string literals match in any case,
# character classes ("[M]iss") do not.
_ABMONTH = r"jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec"
_ABDAYS = r"mon|tue|tues|wed|thu|thurs|fri"
_ABSTATE = (
    r"(?i:ala|ariz|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn|tenn|va|vt|"
    r"wisc?|wyo?|usaf)|Az|Ark|Del|Ill|La|Mass|Miss|Ore|Pa|Tex|Wash"
)
_ABCOMP = r"(?i:inc|cos?|corp|pp?t[ye]s?|ltd|plc|rt|bancorp|dept|bhd|assn|univ|intl|sys)"
_ABTITLE = (
    r"(?i:mr|mrs|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|capt|ste?|"
    r"ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc|ens|insp|mlle|mme|msgr|sfc)|Miss"
)
_ABBREV1 = (
    rf"(?:(?i:{_ABMONTH}|{_ABDAYS}|jr|bros|(?:ed|ph)\.d|esq|etc|al|seq)|{_ABSTATE}|{_ABCOMP})\."
)
_ABBREV2 = rf"(?:{_ABTITLE}|(?i:vs|alex|wm|jos|cie|a\.k\.a|cf|treas|invt|elec|natl|m[ft]g)|{_ACRO})\."
_ABBREV3 = r"(?i:(?:ca|figs?|prop|nos?|art|bldg|pp|op)\.)"

_FULLURL = r"(?i:https?)://[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-]"
_LIKELYURL = (
    r"(?:(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+"
    r"(?i:com|net|org|edu)))(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?"
)
_EMAIL = (
    r"[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*"
    r"[^ \t\n\f\r\"<>|(){}\[\].,;:\u00A0]+"
)

_APOWORD = (
    rf"{_APOS}(?i:n)(?:{_APOS}|(?!{_LETTER}))|[lLdDjJ]{_APOS}|(?i:dunkin){_APOS}|(?i:somethin){_APOS}|(?i:ol){_APOS}|"
    rf"{_APOS}(?i:em)|[A-HJ-XZn]{_APOSETC}{_LETTER}{{2}}{_LETTER}*|{_APOS}[2-9]0(?i:s)|{_APOS}(?i:till?)|"
    rf"{_LETTER}+[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_LETTER}*|{_APOS}(?i:cause)|"
    r"(?i:cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l|o'o)"
)
_THING = (
    rf"(?:[dDoOlL]{_APOSETC}{_ALNUM})?{_ALNUM}+(?:{_HYPHEN}(?:[dDoOlL]{_APOSETC}{_ALNUM})?{_ALNUM}+)*"
)
_QUOTES = r"(?:['\u0092\u2019]|&apos;)|[`\u2018-\u201F\u0082\u0084\u0091-\u0094\u2039\u203A\u00AB\u00BB]{1,2}"
_DBLQUOT = r"\"|&quot;"
_MISC = (
    r"[+%&~^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00B3\u00B4-\u00BA\u00D7\u00F7\u0387"
    r"\u2016\u2017\u2020-\u2025\u2030-\u2038\u203B\u203C\u203E-\u2044\u207A-\u207F\u208A-\u208E"
    r"\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF\u3001-\u3006\u3008-\u3020\u30FB\uFF01-\uFF0F\uFF1A-\uFF20"
    r"\uFF3B-\uFF40\uFF5B-\uFF65]"
)

_NAME = r"[A-Za-z][A-Za-z0-9_:.\-]*"
_SGML = (
    rf"<(?:[!?][A-Za-z\-][^>\r\n]*|{_NAME}(?: +(?:{_NAME}|{_NAME} *= *(?:'[^'\r\n]*'|\"[^\"\r\n]*\"|{_NAME})))*"
    rf" */?|/{_NAME}) *>"
)

_LEFT_SINGLE = re.compile("[\u0082\u008B\u0091\u2018\u201A\u201B\u2039]")
_RIGHT_SINGLE = re.compile("[\u0092\u009B\u00B4\u2019\u203A]")
_LEFT_DOUBLE = re.compile("[\u0084\u0093\u201C\u201E\u00AB]|[\u0091\u2018]'")
_RIGHT_DOUBLE = re.compile("[\u0094\u201D\u00BB]|[\u0092\u2019]'")
_CURRENCY = {"\u00A2": "cents", "\u00A3": "#", "\u0080": "$", "\u20AC": "$"}
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}


def _latex_quotes(tok: str, probably_left: bool) -> str:
    """PTBLexer.latexQuotes: ASCII and curly quotes -> `` ` ' ''."""
    if probably_left:
        tok = re.sub(r"&apos;|'", "`", tok)
        tok = re.sub(r"\"|''|'`|`'|&quot;", "``", tok)
    else:
        tok = re.sub(r"&apos;|'", "'", tok)
        tok = re.sub(r"\"|''|'`|`'|&quot;", "''", tok)
    tok = _LEFT_SINGLE.sub("`", tok)
    tok = _RIGHT_SINGLE.sub("'", tok)
    tok = _LEFT_DOUBLE.sub("``", tok)
    return _RIGHT_DOUBLE.sub("''", tok)


def _split_tail(n: int):  # ASSIMILATIONS: emit all but the last n characters; those are lexed again
    return lambda text: ([text[:-n]], len(text) - n)


def _same(text: str) -> tuple[list[str], int]:
    return [text], len(text)


def _to(token: str):
    return lambda text: ([token], len(text))


def _right_quote(text: str) -> tuple[list[str], int]:
    return [_latex_quotes(text, False)], len(text)


def _left_quote(text: str) -> tuple[list[str], int]:
    return [_latex_quotes(text, True)], len(text)


def _hyphens(text: str) -> tuple[list[str], int]:
    return ["--" if 3 <= len(text) <= 4 else text], len(text)


# (pattern, action). A pattern's optional group "tok" is what the rule consumes; anything after it is
# JFlex trailing context (counted for longest match, then lexed again). Actions map the consumed text to
# (tokens, consumed length); a shorter consumed length is JFlex's yypushback.
_RULES: list[tuple[str, Any]] = [
    # SGML/XML-like tags stay whole (so a decoded "<unk>" is one token); inner spaces become no-break spaces
    (_SGML, lambda t: ([t.replace(" ", "\u00A0")], len(t))),
    (r"&(?:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", _to("--")),
    (r"&amp;", _to("&")),
    (r"&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);", _same),
    (r"(?i:cannot|'twas)", _split_tail(3)),
    (r"(?i:'tis|gonna|gotta|lemme|gimme|wanna)", _split_tail(2)),
    (rf"(?P<tok>{_WORD}){_REDAUX}", _same),
    (rf"(?P<tok>[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*)[nN]{_APOSETC}[tT]", _same),
    (_WORD, _same),
    (_APOWORD, _right_quote),
    (rf"(?P<tok>[yY]{_APOS}){_LETTER}", _same),
    (_FULLURL, _same),
    (_LIKELYURL, _same),
    (_EMAIL, _same),
    (rf"(?P<tok>{_REDAUX})(?:[^A-Za-z]|$)", _right_quote),  # JFlex's \p{Alpha} here is ASCII-only
    (rf"(?P<tok>[nN]{_APOSETC}[tT])(?:[^A-Za-z]|$)", _right_quote),
    (rf"{_DIGIT}{{1,2}}[-/]{_DIGIT}{{1,2}}[-/]{_DIGIT}{{2,4}}", _same),
    (rf"[-+]?{_NUM}", _same),
    (rf"(?:{_DIGIT}{{1,4}}[- \u00A0])?{_DIGIT}{{1,4}}(?:\\?/|\u2044){_DIGIT}{{1,4}}",
     lambda t: ([t.replace(" ", "\u00A0")], len(t))),
    ("[\u00BC\u00BD\u00BE\u2153-\u215E]",
     lambda t: ([{"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4"}.get(t, t)], 1)),
    (r"(?i:-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|pro-|anti-|S&P-500|S&Ls|Cap'n|c'est)", _same),
    (_THING, _right_quote),
    (r"[A-Z]+(?:[+&][A-Z]+)+", _same),
    (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", _same),
    (r"[A-Z]*\$|#", _same),
    (rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{_LETTER}+", _same),  # Twitter names and hashtags
    ("[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]",
     lambda t: ([_CURRENCY.get(t, t)], 1)),
    (rf"(?P<tok>{_ABBREV3}){_SPACE}?{_DIGIT}", _same),
    (_ABBREV1, _same),
    (_ABBREV2, _same),
    (rf"(?P<tok>{_ACRO})(?:\s|$)", _same),
    (rf"(?P<tok>{_APOS}[0-9][0-9])(?:\s|$)", _same),
    (rf"(?P<tok>{_WORD}\.)[,;:]", _same),
    (rf"(?P<tok>{_DBLQUOT})(?:[^\W_]|\$)", _left_quote),
    (_DBLQUOT, _right_quote),
    (r"''", _same),
    (r"<", _to("<")),
    (r">", _to(">")),
    (r"(?P<tok>[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]])(?:[^\w]|_|$)",
     lambda t: ([t.replace("(", "-LRB-").replace(")", "-RRB-")], len(t))),
    (r"[(){}\[\]]", lambda t: ([_BRACKETS[t]], 1)),
    (r"-+", _hyphens),
    (r"\.\.\.+|[\u0085\u2026]", _to("...")),
    (r"\.[ \u00A0](?:\.[ \u00A0])+\.", _to("...")),
    (r"@+|#+|_+", _same),
    (r"\*+", _same),
    (r"[,;:\u3001]", _same),
    (r"[?!]+", _same),
    ("[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]", _same),
    (r"=+", _same),
    (r"/", _same),
    (rf"[A-Za-z0-9][A-Za-z0-9%.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|{_ACRO2}\.))+", _same),
    (rf"(?P<tok>{_THING}\.)[,;:]", _right_quote),
    (rf"(?P<tok>{_QUOTES}){_LETTER}", _left_quote),
    (_QUOTES, _right_quote),
    (_MISC, _same),
]
_COMPILED = [(re.compile(pattern), action) for pattern, action in _RULES]
_PLAIN_WORD = re.compile(r"[A-Za-z]+(?= |$)")  # fast path: a plain ASCII word before a space or the end
_ASSIMILATED = frozenset({"cannot", "gonna", "gotta", "lemme", "gimme", "wanna"})
_WHITESPACE = re.compile(r"\s+")


def _lex(text: str) -> list[str]:
    """PTB tokens of one line (original case)."""
    tokens: list[str] = []
    pos, end = 0, len(text)
    while pos < end:
        space = _WHITESPACE.match(text, pos)
        if space:
            pos = space.end()
            continue
        plain = _PLAIN_WORD.match(text, pos)
        if plain and plain.group().lower() not in _ASSIMILATED:
            tokens.append(plain.group())
            pos = plain.end()
            continue
        best_len, best = 0, None
        for pattern, action in _COMPILED:
            m = pattern.match(text, pos)
            if m and m.end() - pos > best_len:
                best_len, best = m.end() - pos, (m, action)
        if best is None:
            # CoreNLP's "untokenizable" characters (its default policy deletes them)
            pos += 1
            continue
        m, action = best
        consumed = m.group("tok") if "tok" in m.re.groupindex else m.group()
        out, length = action(consumed)
        tokens.extend(t for t in out if t)
        pos += max(length, 1)
    return tokens


@functools.lru_cache(maxsize=1 << 16)
def ptb_tokenize(caption: str) -> str:
    """One caption as coco-caption tokenizes it: lowercase PTB tokens without punctuation, space-joined.

    Equivalent to pycocoevalcap's ``PTBTokenizer`` (CoreNLP 3.4.1 ``-preserveLines -lowerCase``, then the
    ``PUNCTUATIONS`` filter) for ordinary English captions, without Java.
    """
    line = " ".join(tok.lower() for tok in _lex(caption.replace("\n", " ")))
    # The toolkit's own post-processing, verbatim: rstrip, split on single spaces, drop punctuation.
    return " ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)


def tokenize_captions(captions: Mapping[Any, Sequence[str]]) -> dict[Any, list[str]]:
    """``{id: [caption, ...]}`` -> ``{id: [tokenized caption, ...]}`` (drop-in for ``PTBTokenizer.tokenize``
    after its ``{"caption": ...}`` wrapping)."""
    return {key: [ptb_tokenize(c) for c in caps] for key, caps in captions.items()}


# --------------------------------------------------------------------------------------------------------
# Caption metrics


def java_available() -> bool:
    """True when a ``java`` executable is on PATH (pycocoevalcap's METEOR needs it)."""
    return shutil.which("java") is not None


def _meteor(gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> float:
    return meteor_scores({"corpus": (gts, res)})["corpus"]


def meteor_scores(corpora: Mapping[str, tuple[Mapping[Any, list[str]], Mapping[Any, list[str]]]]) -> dict[str, float]:
    """METEOR of several corpora with one Java process: ``{name: (gts, res)}`` -> ``{name: score}``.

    ``gts`` / ``res`` are coco-caption's dicts of PTB-tokenized captions (``{id: [refs...]}``, ``{id: [hyp]}``).
    Starting METEOR (the JVM plus its paraphrase table, on the first call) costs 10-25 s here while scoring
    150 items then takes about a second, so the report stage scores every run in one process rather than each
    evaluate stage starting its own (docs/benchmarks.md, "Whole demo").
    """
    from pycocoevalcap.meteor.meteor import Meteor

    if not java_available():
        raise RuntimeError("METEOR needs a Java runtime ('java' on PATH)")
    scorer = Meteor()  # starts `java -jar meteor-1.5.jar` in a subprocess
    try:
        return {name: float(scorer.compute_score(dict(gts), dict(res))[0]) for name, (gts, res) in corpora.items()}
    finally:
        del scorer  # its __del__ kills the subprocess


def tokenized_corpus(records: Sequence[Mapping[str, Any]]) -> tuple[dict[Any, list[str]], dict[Any, list[str]]]:
    """(gts, res) of prediction records ``{"id", "hypothesis", "references"}``, PTB-tokenized as coco-caption does."""
    gts = {r["id"]: [ptb_tokenize(str(c)) for c in r["references"]] for r in records}
    res = {r["id"]: [ptb_tokenize(str(r["hypothesis"]))] for r in records}
    return gts, res


def caption_scores(
    hypotheses: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    *,
    meteor: MeteorMode = "auto",
) -> dict[str, float | None]:
    """coco-caption metrics of one hypothesis per item against its references.

    ``hypotheses``: ``{id: caption}``; ``references``: ``{id: [caption, ...]}`` (raw text; both are tokenized
    with :func:`ptb_tokenize` first, as coco-caption does). The id sets must be equal.
    ``meteor``: ``"auto"`` computes METEOR when Java is present and returns ``None`` otherwise; ``"always"``
    raises without Java; ``"never"`` returns ``None``.

    Returns ``{"bleu_1".."bleu_4", "meteor", "rouge_l", "cider_d": float | None}``, raw toolkit values (not
    x100): BLEU/METEOR/ROUGE-L in [0, 1], CIDEr-D in [0, 10]. BLEU is corpus-level (clipped counts summed
    over items, brevity penalty from the closest reference length); ROUGE-L and CIDEr-D are item means.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(hypotheses) != set(references):
        missing = sorted(map(str, set(references) - set(hypotheses)))[:5]
        extra = sorted(map(str, set(hypotheses) - set(references)))[:5]
        raise ValueError(f"hypotheses and references must cover the same ids; missing {missing}, extra {extra}")
    if not hypotheses:
        raise ValueError("no captions to score")
    empty = [key for key, refs in references.items() if len(refs) == 0]
    if empty:
        raise ValueError(f"items without references: {sorted(map(str, empty))[:5]}")
    if meteor not in ("auto", "always", "never"):
        raise ValueError(f"meteor must be 'auto', 'always' or 'never', got {meteor!r}")

    keys = list(references)  # the scorers iterate gts.keys(); keep one order for both dicts
    gts = {key: [ptb_tokenize(r) for r in references[key]] for key in keys}
    res = {key: [ptb_tokenize(hypotheses[key])] for key in keys}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # option="closest", coco-caption's choice
    cider, _ = Cider().compute_score(gts, res)  # CIDEr-D: n=4, sigma=6, clipped, idf from these references
    rouge, _ = Rouge().compute_score(gts, res)  # ROUGE-L, beta=1.2

    meteor_score: float | None = None
    if meteor == "always" and not java_available():
        raise RuntimeError("METEOR needs a Java runtime ('java' on PATH); use meteor='auto' to skip it")
    if meteor != "never" and java_available():
        meteor_score = _meteor(gts, res)

    return {
        "bleu_1": float(bleu[0]),
        "bleu_2": float(bleu[1]),
        "bleu_3": float(bleu[2]),
        "bleu_4": float(bleu[3]),
        "meteor": meteor_score,
        "rouge_l": float(rouge),
        "cider_d": float(cider),
    }


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every non-empty line of a JSON Lines file, parsed; errors name the file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON: {err}") from None
    return records


def score_predictions_jsonl(path: str | Path, *, meteor: MeteorMode = "auto") -> dict[str, Any]:
    """Caption metrics of a predictions file with lines ``{"id", "hypothesis", "references": [...], ...}``.

    Returns :func:`caption_scores` plus ``"num_items"``.
    """
    hypotheses: dict[str, str] = {}
    references: dict[str, list[str]] = {}
    for number, record in enumerate(read_jsonl(path), 1):
        try:
            key, hyp, refs = str(record["id"]), record["hypothesis"], record["references"]
        except (KeyError, TypeError):
            raise ValueError(f"{path}: record {number} needs 'id', 'hypothesis' and 'references'") from None
        if key in hypotheses:
            raise ValueError(f"{path}: id {key!r} appears twice")
        hypotheses[key], references[key] = str(hyp), [str(r) for r in refs]
    metrics: dict[str, Any] = dict(caption_scores(hypotheses, references, meteor=meteor))
    metrics["num_items"] = len(hypotheses)
    return metrics


def write_metrics(path: str | Path, metrics: Mapping[str, Any]) -> None:
    """Write a metrics mapping as deterministic JSON, atomically. ``None`` becomes ``null``."""
    write_json(path, dict(metrics))


# --------------------------------------------------------------------------------------------------------
# Classification metrics


def topk_accuracy(scores: Any, labels: Any, k: int) -> float:
    """Fraction of rows whose true label is among the ``k`` highest scores. ``scores`` (N, C), ``labels`` (N,).

    Ties are broken towards the lower class index (as ``argmax``). With ``k >= C`` the result is 1.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"expected scores (N, C) and labels (N,), got {scores.shape} and {labels.shape}")
    if len(labels) == 0:
        raise ValueError("no predictions to score")
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (N, k), best first
    return float((ranked == labels[:, None]).any(axis=1).mean())


def confusion_matrix(labels: Any, predicted: Any, num_classes: int) -> np.ndarray:
    """int64 (C, C): entry [i, j] counts items of true class i predicted as class j."""
    labels, predicted = np.asarray(labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    if labels.shape != predicted.shape or labels.ndim != 1:
        raise ValueError(f"labels and predictions must be 1-d and equal in length: {labels.shape}, {predicted.shape}")
    for name, values in (("labels", labels), ("predictions", predicted)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got [{values.min()}, {values.max()}]")
    return np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def classification_report(
    labels: Any,
    predicted: Any,
    *,
    class_names: Sequence[str],
    reversal_pairs: Sequence[tuple[str, str]] = (),
    topk: Any | None = None,
) -> dict[str, Any]:
    """Activity-recognition metrics from true and predicted class indices (N,).

    ``topk``: optional (N, k) int array of class indices ranked best first (k >= 5 unless there are fewer
    classes); without it ``top_5`` is ``None``. ``reversal_pairs``: pairs of class names that are each
    other's time reversal (e.g. ``("move_left", "move_right")``).

    Returns ``top_1``; ``top_5``; ``mean_class_accuracy`` (mean of per-class recall over classes that occur
    in ``labels``); ``per_class_accuracy`` ``{name: float | None}`` (``None`` for a class with no items);
    ``confusion`` (rows = true, columns = predicted, as nested lists); ``reversal_pair_accuracy`` (top-1
    over items whose true class is in any pair; ``None`` without such items); ``reversal_swap_rate``
    (fraction of those items predicted as the partner class, i.e. fooled by the direction of time);
    ``num_items``; ``class_names``.
    """
    names = list(class_names)
    num_classes = len(names)
    labels, predicted = np.asarray(labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("no predictions to score")
    confusion = confusion_matrix(labels, predicted, num_classes)
    counts = confusion.sum(axis=1)  # (C,) items per true class
    correct = np.diag(confusion)
    per_class = {name: (float(correct[i] / counts[i]) if counts[i] else None) for i, name in enumerate(names)}
    present = counts > 0

    top_5: float | None = None
    if topk is not None:
        topk = np.asarray(topk, dtype=np.int64)
        if topk.ndim != 2 or topk.shape[0] != len(labels):
            raise ValueError(f"topk must be (N, k) with N = {len(labels)}, got {topk.shape}")
        if topk.shape[1] < min(5, num_classes):
            raise ValueError(f"top-5 needs 5 ranked classes per item (or all {num_classes}); got {topk.shape[1]}")
        if not np.array_equal(topk[:, 0], predicted):
            raise ValueError("topk[:, 0] must equal the predicted class")
        top_5 = float((topk[:, :5] == labels[:, None]).any(axis=1).mean())

    index = {name: i for i, name in enumerate(names)}
    partner = np.full(num_classes, -1, dtype=np.int64)
    for a, b in reversal_pairs:
        for name in (a, b):
            if name not in index:
                raise ValueError(f"reversal pair ({a!r}, {b!r}): unknown class {name!r}")
        partner[index[a]], partner[index[b]] = index[b], index[a]
    in_pair = partner[labels] >= 0
    pair_accuracy = swap_rate = None
    if in_pair.any():
        pair_accuracy = float((predicted[in_pair] == labels[in_pair]).mean())
        swap_rate = float((predicted[in_pair] == partner[labels[in_pair]]).mean())

    return {
        "top_1": float(correct.sum() / len(labels)),
        "top_5": top_5,
        "mean_class_accuracy": float((correct[present] / counts[present]).mean()),
        "per_class_accuracy": per_class,
        "confusion": confusion.tolist(),
        "reversal_pair_accuracy": pair_accuracy,
        "reversal_swap_rate": swap_rate,
        "num_items": int(len(labels)),
        "class_names": names,
    }


def classification_scores(
    scores: Any,
    labels: Any,
    *,
    class_names: Sequence[str],
    reversal_pairs: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """:func:`classification_report` from scores or logits (N, C) and true labels (N,)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != len(class_names):
        raise ValueError(f"scores must be (N, {len(class_names)}), got {scores.shape}")
    topk = np.argsort(-scores, axis=1, kind="stable")[:, :5]  # (N, min(5, C)), best first; [:, 0] == argmax
    return classification_report(
        labels, topk[:, 0], class_names=class_names, reversal_pairs=reversal_pairs, topk=topk
    )


def score_activity_jsonl(
    path: str | Path,
    *,
    class_names: Sequence[str],
    reversal_pairs: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """:func:`classification_report` of a predictions file with lines ``{"id", "predicted", "label", ...}``
    (class names; an optional ``"topk"`` list of class names, best first, enables top-5)."""
    index = {name: i for i, name in enumerate(class_names)}
    records = read_jsonl(path)

    def lookup(name: Any, number: int) -> int:
        if name not in index:
            raise ValueError(f"{path}: record {number}: unknown class {name!r}")
        return index[name]

    labels, predicted, topk = [], [], []
    for number, record in enumerate(records, 1):
        try:
            labels.append(lookup(record["label"], number))
            predicted.append(lookup(record["predicted"], number))
        except (KeyError, TypeError):
            raise ValueError(f"{path}: record {number} needs 'predicted' and 'label'") from None
        if "topk" in record:
            topk.append([lookup(name, number) for name in record["topk"][:5]])
    have_topk = bool(records) and len(topk) == len(records) and len({len(t) for t in topk}) == 1
    return classification_report(
        labels,
        predicted,
        class_names=class_names,
        reversal_pairs=reversal_pairs,
        topk=np.asarray(topk) if have_topk else None,
    )
