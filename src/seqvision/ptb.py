"""coco-caption's caption tokenization in pure Python: the one tokenizer of the project.

coco-caption (pycocoevalcap) runs ``java edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase``
(CoreNLP 3.4.1, default options) over every caption, then drops the tokens in :data:`PUNCTUATIONS`.
:func:`ptb_tokenize` reproduces that without Java. The vocabulary (``vocab.py``) is built from exactly these
tokens and the metrics (``metrics.py``) score exactly these tokens, so a model is never scored on a distinction
it was never taught (case, punctuation, clitics).
"""

from __future__ import annotations

import functools
import re
from typing import Any

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
