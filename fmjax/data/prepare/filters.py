"""Per-document filters of data preparation: quality heuristics, blocklist, PII scrubbing, licences.

Pure functions of (text, settings) -> decision, deterministic and free of Beam, so that the pipeline
(`fmjax.data.prepare.pipeline`) can map them over any number of documents and count what each one
removed or replaced. Regular expressions are compiled once, at import.

`quality_problems` implements the MassiveText quality and repetition filters of Gopher (Rae et al.
2021, appendix A.1.1, table A1), plus C4's "lorem ipsum" rule. They are meant for natural language:
code has few stop words, many duplicate lines ("}") and "#" comments, so the caller routes
documents that `categorize.code_language` recognises around them (the pipeline does); nothing
here looks at whether a text is code.

Definitions where the paper leaves room (the n-gram ones are RedPajama-V2's; datatrove's differ:
NLTK words, repeats after the first occurrence only, fractions of len(text)):
- words are the whitespace-separated tokens with punctuation stripped from both ends; tokens that
  are only punctuation are not words. No NLTK: the rules must be cheap and language-agnostic.
- line rules (bullets, ellipses, duplicate lines) look at non-blank lines only, so a blank line
  between paragraphs is not a "duplicate line".
- paragraphs are separated by blank lines.
- duplicate lines / paragraphs count every occurrence after the first; their character fraction
  is over the characters of all lines / paragraphs.
- n-grams are over lower-cased words; an n-gram's characters are its words' characters (no
  spaces), and fractions are over the characters of all words.
- top n-gram (n = 2..4): the most frequent n-gram's occurrences times its characters, when it
  occurs more than once (ties: the one that occurs first).
- duplicate n-grams (n = 5..10): the characters of words covered by any n-gram that occurs more
  than once, all its occurrences included, each word counted once (the paper's "taking care not
  to count characters that occur in overlapping n-grams more than once").
- stop words: occurrences (not distinct words) of the listed words, case-insensitive.
"""

import collections
import functools
import ipaddress
import itertools
import operator
import re
import string
from typing import Iterable, Mapping

import numpy as np

# Gopher's values (table A1); a threshold set to None switches its rule off.
DEFAULT_QUALITY = dict(
    min_words=50,
    max_words=100_000,
    min_mean_word_length=3.0,
    max_mean_word_length=10.0,
    max_symbol_word_ratio=0.1,  # "#" per word, and "..." / "…" per word, each
    max_bullet_lines=0.9,  # fraction of non-blank lines starting with a bullet
    max_ellipsis_lines=0.3,  # fraction of non-blank lines ending with an ellipsis
    min_alpha_words=0.8,  # fraction of words with at least one alphabetic character
    min_stop_words=2,
    stop_words=("the", "be", "to", "of", "and", "that", "have", "with"),
    max_dup_line_frac=0.3,
    max_dup_line_char_frac=0.2,
    max_dup_para_frac=0.3,
    max_dup_para_char_frac=0.2,
    max_top_ngram_char_frac=((2, 0.20), (3, 0.18), (4, 0.16)),
    max_dup_ngram_char_frac=((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)),
    drop_lorem_ipsum=True,  # C4: placeholder text
)
# Configs name their own terms (or a file, see load_blocklist); nothing is blocked by default.
DEFAULT_BLOCKLIST: tuple[str, ...] = ()

_PUNCT = string.punctuation + "“”‘’«»„‚‹›…–—¡¿·•"
_BULLETS = ("•", "●", "○", "◦", "▪", "▫", "■", "□", "‣", "⁃", "-", "*")
_ELLIPSES = ("...", "…")
_LETTER = re.compile(r"[^\W\d_]")
_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")
_LOREM = re.compile(r"lorem ipsum", re.IGNORECASE)


def validate_quality(q: Mapping) -> None:
    """ValueError naming any missing or unknown quality setting (call once, before the pipeline)."""
    missing, unknown = set(DEFAULT_QUALITY) - set(q), set(q) - set(DEFAULT_QUALITY)
    if missing or unknown:
        raise ValueError(f"quality settings: missing {sorted(missing)}, unknown {sorted(unknown)}; "
                         f"valid fields are {sorted(DEFAULT_QUALITY)}")


def _duplicates(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of characters in those repeats)."""
    if not items:
        return 0.0, 0.0
    counts = collections.Counter(items)
    dup_chars = sum(len(s) * (c - 1) for s, c in counts.items() if c > 1)
    return (len(items) - len(counts)) / len(items), dup_chars / max(1, sum(map(len, items)))


def _ngrams_small(words: list[str], lengths: list[int], top: set, dup: set, max_n: int):
    """(n, top n-gram (count, characters), words covered by repeated n-grams) for n = 2..max_n;
    with Counters of word tuples, the faster way below a few hundred words."""
    for n in range(2, min(max_n, len(words)) + 1):
        grams = list(zip(*(words[i:] for i in range(n))))
        counts = collections.Counter(grams)
        best = None
        if n in top:
            # Ties go to the n-gram that occurs first (Counter keeps first-occurrence order).
            gram, most = max(counts.items(), key=operator.itemgetter(1))
            best = most, sum(map(len, gram))
        covered = 0
        if n in dup and len(counts) < len(grams):
            repeated = {g for g, c in counts.items() if c > 1}
            mask, ones = bytearray(len(words)), b"\x01" * n
            for i in [i for i, g in enumerate(grams) if g in repeated]:
                mask[i:i + n] = ones
            covered = sum(itertools.compress(lengths, mask))
        yield n, best, covered


def _ngrams_large(words: list[str], lengths: list[int], top: set, dup: set, max_n: int):
    """The same as _ngrams_small with numpy, for long documents: an n-gram's exact integer id is
    its (n-1)-gram's id and its last word, renumbered by a stable sort (no lossy hashing)."""
    vocab = dict(zip(dict.fromkeys(words), itertools.count()))
    ids = np.fromiter(map(vocab.__getitem__, words), np.int64, len(words))
    lens = np.asarray(lengths, np.int64)
    cum = np.concatenate(([0], np.cumsum(lens)))
    gram, positions = ids, np.arange(len(words))
    for n in range(2, min(max_n, len(words)) + 1):
        keys = gram[:-1] * len(vocab) + ids[n - 1:]
        order = np.argsort(keys, kind="stable")
        new = np.diff(keys[order], prepend=-1) != 0
        starts = np.flatnonzero(new)
        gram = np.empty_like(keys)
        gram[order] = np.cumsum(new) - 1
        counts = np.diff(starts, append=len(keys))
        best = None
        if n in top:
            most = int(counts.max())
            i = int(order[starts[counts == most]].min())  # ties: the one that occurs first
            best = most, int(cum[i + n] - cum[i])
        covered = 0
        if n in dup and len(starts) < len(keys):
            repeated = np.concatenate(([0], np.cumsum(counts[gram] > 1)))
            # Word j is covered when an n-gram starting in [j - n + 1, j] repeats.
            hit = repeated[np.minimum(positions, len(keys) - 1) + 1] > repeated[np.maximum(positions - n + 1, 0)]
            covered = int(lens[hit].sum())
        yield n, best, covered


_NUMPY_FROM_WORDS = 300  # measured crossover: numpy's per-call cost loses below, wins 7x at 50k words


def quality_problems(text: str, q: Mapping, first_only: bool = False) -> list[str]:
    """Names of the quality rules `text` breaks, in this order; empty: keep the document.

    min_words, max_words, min_mean_word_length, max_mean_word_length, hash_ratio, ellipsis_ratio,
    bullet_lines, ellipsis_lines, alpha_words, stop_words, dup_para_frac, dup_para_char_frac,
    dup_line_frac, dup_line_char_frac, top_{2,3,4}gram, dup_{5..10}gram, lorem_ipsum.

    q has the fields of DEFAULT_QUALITY (a dict or ConfigDict). first_only returns at the first
    problem: the same first name, cheaper (a short document skips everything after the word
    count). Natural language only (see above).
    """
    problems: list[str] = []

    def fail(name: str) -> bool:
        problems.append(name)
        return first_only

    def over(value: float, key: str) -> bool:
        return q[key] is not None and value > q[key]

    def under(value: float, key: str) -> bool:
        return q[key] is not None and value < q[key]

    words = [w for w in (t.strip(_PUNCT) for t in text.split()) if w]
    n = max(1, len(words))
    if (under(len(words), "min_words") and fail("min_words")
            or over(len(words), "max_words") and fail("max_words")):
        return problems
    lengths = list(map(len, words))
    total = max(1, sum(lengths))
    mean_length = total / n
    if (under(mean_length, "min_mean_word_length") and fail("min_mean_word_length")
            or over(mean_length, "max_mean_word_length") and fail("max_mean_word_length")
            or over(text.count("#") / n, "max_symbol_word_ratio") and fail("hash_ratio")
            or over(sum(map(text.count, _ELLIPSES)) / n, "max_symbol_word_ratio") and fail("ellipsis_ratio")):
        return problems
    lines = [s for s in (line.strip() for line in text.splitlines()) if s]
    num_lines = max(1, len(lines))
    if (over(sum(s.startswith(_BULLETS) for s in lines) / num_lines, "max_bullet_lines") and fail("bullet_lines")
            or over(sum(s.endswith(_ELLIPSES) for s in lines) / num_lines, "max_ellipsis_lines")
            and fail("ellipsis_lines")):
        return problems
    # Most words are all letters (str.isalpha, in C); only the others need the regex.
    with_letter = sum(map(str.isalpha, words)) + sum(
        1 for w in itertools.filterfalse(str.isalpha, words) if _LETTER.search(w))
    if under(with_letter / n, "min_alpha_words") and fail("alpha_words"):
        return problems
    lower = " ".join(words).lower().split()
    if q["min_stop_words"] is not None:
        stops = sum(map(lower.count, q["stop_words"]))
        if stops < q["min_stop_words"] and fail("stop_words"):
            return problems
    paragraphs = [s for s in (p.strip() for p in _PARAGRAPH_BREAK.split(text)) if s]
    para_frac, para_char_frac = _duplicates(paragraphs)
    line_frac, line_char_frac = _duplicates(lines)
    if (over(para_frac, "max_dup_para_frac") and fail("dup_para_frac")
            or over(para_char_frac, "max_dup_para_char_frac") and fail("dup_para_char_frac")
            or over(line_frac, "max_dup_line_frac") and fail("dup_line_frac")
            or over(line_char_frac, "max_dup_line_char_frac") and fail("dup_line_char_frac")):
        return problems
    top, dup = dict(q["max_top_ngram_char_frac"] or ()), dict(q["max_dup_ngram_char_frac"] or ())
    ngrams = _ngrams_small if len(lower) < _NUMPY_FROM_WORDS else _ngrams_large
    if len(lower) == len(words):  # lower() may lengthen a word ("İ"); then count its characters again
        lower_lengths, lower_total = lengths, total
    else:
        lower_lengths = list(map(len, lower))
        lower_total = max(1, sum(lower_lengths))
    for gram_n, best, covered in ngrams(lower, lower_lengths, set(top), set(dup), max((*top, *dup), default=0)):
        top_frac = 0.0 if best is None or best[0] < 2 else min(1.0, best[0] * best[1] / lower_total)
        if gram_n in top and top_frac > top[gram_n] and fail(f"top_{gram_n}gram"):
            return problems
        if gram_n in dup:
            if covered / lower_total > dup[gram_n] and fail(f"dup_{gram_n}gram"):
                return problems
            # A word covered by a repeated longer n-gram is covered by repeated shorter ones, so the
            # fraction only falls with n: once it is under every remaining limit, all of them pass.
            remaining = min(v for m, v in dup.items() if m >= gram_n)
            if gram_n >= max(top, default=0) and covered / lower_total <= remaining:
                break
    if q["drop_lorem_ipsum"] and _LOREM.search(text):
        fail("lorem_ipsum")
    return problems


class Blocklist:
    """Compiled terms: a set lookup on word tokens, with phrase and odd-term fallbacks.

    A term matches as whole words, case-insensitively (casefold). A multi-word term matches its
    words in sequence, separated by any non-word characters (spaces, punctuation, line breaks).
    Terms with characters outside words ("a$$") are matched by one regular expression instead.
    """

    _TOKEN = re.compile(r"\w+")

    def __init__(self, terms: Iterable[str]):
        self.terms = tuple(terms)
        self._single: dict[str, str] = {}
        self._phrases: dict[str, list[tuple[tuple[str, ...], str]]] = collections.defaultdict(list)
        odd = []
        for term in self.terms:
            tokens = tuple(self._TOKEN.findall(term.casefold()))
            if not tokens:
                continue
            if " ".join(tokens) != " ".join(term.casefold().split()):
                odd.append(term)
            elif len(tokens) == 1:
                self._single.setdefault(tokens[0], term)
            else:
                self._phrases[tokens[0]].append((tokens, term))
        self._odd = None  # searched in the casefolded text, like the tokens, so positions agree
        if odd:
            folded = sorted({" ".join(t.casefold().split()) for t in odd}, key=len, reverse=True)
            alternation = "|".join(r"\s+".join(map(re.escape, t.split())) for t in folded)
            self._odd = re.compile(rf"(?<!\w)(?:{alternation})(?!\w)")
        self._odd_terms = {" ".join(t.casefold().split()): t for t in reversed(odd)}
        self._first_words = set(self._single) | set(self._phrases)

    def first(self, text: str) -> str | None:
        """The term whose match starts earliest in text (the list's spelling), or None."""
        folded = text.casefold()
        best: tuple[int, str] | None = None
        if self._odd is not None and (m := self._odd.search(folded)):
            best = (m.start(), self._odd_terms[" ".join(m.group().split())])
        tokens = self._TOKEN.findall(folded)
        if self._first_words.isdisjoint(tokens):
            return best and best[1]
        starts = [m.start() for m in self._TOKEN.finditer(folded)] if best else None
        for i, token in enumerate(tokens):
            if best is not None and starts[i] >= best[0]:
                break
            if token in self._single:
                return self._single[token]
            for words, term in self._phrases.get(token, ()):
                if tuple(tokens[i:i + len(words)]) == words:
                    return term
        return best and best[1]


@functools.lru_cache(maxsize=16)
def compile_blocklist(terms: tuple[str, ...]) -> Blocklist:
    """A Blocklist of terms, compiled once per distinct tuple."""
    return Blocklist(terms)


def load_blocklist(path: str) -> tuple[str, ...]:
    """Terms of a file, one a line; blank lines and lines starting with '#' are skipped."""
    with open(path, encoding="utf-8") as f:
        return tuple(s for s in (line.strip() for line in f) if s and not s.startswith("#"))


def blocklisted(text: str, words: Iterable[str] | Blocklist) -> str | None:
    """The first blocklisted term in text (whole words, case-insensitive, phrases allowed), or None.

    words: the terms, or a Blocklist. A tuple is compiled once and cached; passing the same
    tuple object for every document (as the pipeline does) or a Blocklist costs no re-hashing.
    """
    if not isinstance(words, Blocklist):
        words = _cached(words)
    return words.first(text)


_LAST: tuple = (None, None)  # (terms object, its Blocklist): the pipeline passes one object throughout


def _cached(words: Iterable[str]) -> Blocklist:
    global _LAST
    last = _LAST  # one read: another thread may replace it meanwhile
    if words is not last[0]:
        last = _LAST = (words, compile_blocklist(tuple(words)))
    return last[1]


# PII. Conservative: a false positive corrupts clean text, so every pattern asks for the shape of
# the real thing (separators, digit counts, valid octets) rather than any long number.
_EMAIL = re.compile(r"(?=\w)(?<![\w.%+-])[A-Za-z0-9_][\w.%+-]{0,63}@"  # local part
                    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])")  # domain
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"  # no leading zeros: "01.02.03.04" is not an address
_IPV4 = re.compile(rf"(?=\d)(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?!\w|\.\d)")
# Candidates with at least two colons; ipaddress decides whether they are IPv6 addresses.
_IPV6 = re.compile(r"(?=[0-9A-Fa-f:])(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}"
                   r"(?:(?:\.\d{1,3}){3})?(?![\w:]|\.\d)")
_PHONE = re.compile(
    r"(?=[\d+(])(?<![\w+])(?<!\d[.,-])(?:"  # lookahead first: a fast scan
    # International: +CC then groups, each after a separator (so a digit run splits one way only),
    # or the compact E.164 form +CCNNNNNNNN.
    r"\+[1-9]\d{0,2}(?:[ .-]?\(\d{1,4}\)\d{0,4})?(?:[ .-]\d{1,8}){1,6}|\+[1-9]\d{6,14}"
    r"|\(\d{3}\) ?\d{3}[ .-]\d{4}"  # (NNN) NNN-NNNN
    r"|\(0\d{1,4}\) ?\d{3,4}[ .-]?\d{3,4}"  # (0AA) NNNN NNNN
    r"|(?:1[ .-])?\d{3}([ .-])\d{3}\1\d{4}"  # [1-]NNN-NNN-NNNN, one separator throughout
    r"|0\d{1,4}([ .-])\d{2,4}(?:\2\d{2,4}){1,4}"  # national, trunk 0: 020 7946 0958, 06 12 34 56 78
    r"|0\d{1,4}[ -]\d{5,8}"  # national, two groups: 030-1234567
    r")(?!\w|[.,-]?\d)")
PII_KINDS = ("email", "phone", "ip_address")


def _ipv6(match: re.Match) -> str:
    s = match.group()
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return s
    groups = [g for g in re.split(r"[:.]", s) if g]
    # "a::b", "1::2" (slices, C++ scopes) are valid syntax but rarely addresses: ask for a digit and
    # either three groups or a group of 3+ characters. Misses "::1" (loopback, not personal).
    plausible = any(c.isdigit() for c in s) and (len(groups) >= 3 or max(map(len, groups), default=0) >= 3)
    return "<IP_ADDRESS>" if plausible else s


def _phone(match: re.Match) -> str:
    s = match.group()
    return "<PHONE>" if 9 <= sum(c.isdigit() for c in s) <= 15 else s


def scrub_pii(text: str) -> tuple[str, dict[str, int]]:
    """(text with e-mails, phone numbers and IP addresses replaced by <EMAIL>, <PHONE>,
    <IP_ADDRESS>, {kind: replacements} for every kind in PII_KINDS).

    Detected: e-mail addresses with an ASCII domain and TLD; IPv4 dotted quads of valid octets
    (also version-like "1.2.3.4", which cannot be told apart); IPv6 in full, "::"-compressed and
    IPv4-suffixed forms (validated by `ipaddress`); phone numbers with 9-15 digits in the usual
    written shapes: +CC international, (NNN) NNN-NNNN, NNN-NNN-NNNN / NNN.NNN.NNNN / NNN NNN NNNN
    (one separator throughout, optional leading 1), national numbers with a trunk 0 in groups.
    Not detected (on purpose, they look like ordinary numbers): bare digit runs without "+"
    ("5551234567"), groups not starting with 0 ("12 34 56 78 90"), names and street addresses.
    """
    counts = dict.fromkeys(PII_KINDS, 0)
    if "@" in text:
        text, counts["email"] = _EMAIL.subn("<EMAIL>", text)
    if "::" in text or text.count(":") >= 7:
        text, counts["ip_address"] = _count_changed(_IPV6, _ipv6, text, "<IP_ADDRESS>")
    if "." in text:
        text, n = _IPV4.subn("<IP_ADDRESS>", text)
        counts["ip_address"] += n
    text, counts["phone"] = _count_changed(_PHONE, _phone, text, "<PHONE>")
    return text, counts


def _count_changed(pattern: re.Pattern, replace, text: str, tag: str) -> tuple[str, int]:
    n = 0

    def sub(match: re.Match) -> str:
        nonlocal n
        out = replace(match)
        n += out == tag
        return out
    return pattern.sub(sub, text), n


def licence_allowed(licence: str, allow: Iterable[str]) -> bool:
    """Whether a source's licence tag is in the allow-list (case-insensitive); an empty list allows all."""
    allowed = {a.strip().casefold() for a in allow}
    return not allowed or (licence or "").strip().casefold() in allowed
