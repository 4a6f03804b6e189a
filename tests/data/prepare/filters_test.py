"""Tests for fmjax.data.prepare.filters: Gopher quality rules, blocklist, PII scrubbing, licences."""

import collections
import itertools
import pathlib
import re

import ml_collections
import pytest

from fmjax.data.prepare import filters

SHARED_TEXT = pathlib.Path(__file__).resolve().parents[3].parent / "shared" / "data" / "text"
needs_shared = pytest.mark.skipif(not SHARED_TEXT.is_dir(), reason=f"{SHARED_TEXT} (offline corpora) is absent")
Q = filters.DEFAULT_QUALITY

PROSE = """The old mill stood at the bend of the river, where the water slowed before the weir.
Nobody had ground flour there for forty years, yet every spring children from the village
walked out along the towpath to watch herons fishing below its broken wheel. In autumn the
miller's granddaughter returned from the city with a sketchbook and a borrowed camera. She
spent three weeks drawing beams, measuring windows and listening to neighbours describe how
busy the yard had once been. Her notes became a small exhibition in the library, and later
a plan to restore the building as a workshop for carpenters and apprentices."""


SYLLABLES = [c + v for c, v in itertools.product("bdfgklmnprstvz", "aeiou")]


def pseudo_words(count: int, start: int = 0, syllables: int = 3) -> list[str]:
    """Made-up words number start, start + 1, ...: the digits of the number in base 70 are the
    syllables, so words with different numbers differ and no n-gram repeats by accident."""
    base = len(SYLLABLES)
    assert start + count <= base ** syllables
    return ["".join(SYLLABLES[i // base ** k % base] for k in range(syllables))
            for i in range(start, start + count)]


def lines_of(words: list[str], per_line: int = 10) -> str:
    return "\n".join(" ".join(words[i:i + per_line]) for i in range(0, len(words), per_line))


def filler(count: int, start: int = 0) -> list[str]:
    """Unique words with two stop words in them: passes every rule when long enough."""
    words = pseudo_words(count, start)
    return ["the", *words[:count // 2], "and", *words[count // 2:]]


def repeated_phrase(n: int, low: float, high: float) -> str:
    """A text where one n-word phrase occurs 4 times between unique words (so no longer n-gram
    repeats), with its duplicate-n-gram character fraction in (low, high]."""
    phrase = pseudo_words(n, start=10_000)
    for count in range(40, 400):
        words = filler(count)
        step = len(words) // 4
        doc = [w for i in range(4) for w in (*words[i * step:(i + 1) * step], *phrase)] + words[4 * step:]
        covered = 4 * sum(map(len, phrase)) / sum(map(len, doc))
        if low < covered <= high:
            return lines_of(doc)
    raise AssertionError("no filler length gives the wanted fraction")


def test_clean_prose_passes():
    assert filters.quality_problems(PROSE, Q) == []
    assert filters.quality_problems(lines_of(filler(80)), Q) == []


@pytest.mark.parametrize("topic", ["for", "if", "with", "class", "import", "lambda", "try", "lists"])
def test_pydoc_prose_passes(topic):
    from pydoc_data import topics
    # The prose paragraphs of a topic (no code blocks, grammar or tables), 50+ words together.
    paragraphs = [p for p in topics.topics[topic].split("\n\n")
                  if p.strip() and not p.startswith((" ", "*", "+", "|", "=")) and len(p.split()) >= 8]
    doc = "\n\n".join(paragraphs)
    assert len(doc.split()) >= 50
    assert filters.quality_problems(doc, Q) == []


def _numbers_doc() -> str:
    return lines_of(filler(60) + [str(1000 + 7 * i) for i in range(25)])


def _indented_duplicate_paragraphs() -> str:
    # A short paragraph twice among long ones: its indentation counts as paragraph characters but
    # not as line characters (lines are stripped), so only the paragraph rule sees 20%.
    short = "\n".join(" " * 120 + w for w in pseudo_words(3, start=20_000))
    words = filler(90)
    return "\n\n".join([lines_of(words[:45]), short, lines_of(words[45:]), short])


def _long_duplicate_line() -> str:
    # One very long word on a line of its own, twice: 20%+ of the line characters, but a single
    # word makes no repeated n-gram.
    words = pseudo_words(70, syllables=2)
    long = "".join(pseudo_words(30, start=3))
    return "\n".join([lines_of(["the", *words[:35]]), long, lines_of(["and", *words[35:]]), long])


def _dup_lines() -> str:
    words, lines = filler(60), []
    for i in range(6):
        lines += [" ".join(words[i * 10:(i + 1) * 10]), "Yes."]
    return "\n".join(lines)


def _dup_paragraphs() -> str:
    words = filler(120)
    return "\n\n".join(x for i in range(3) for x in (lines_of(words[i * 40:(i + 1) * 40], 8), "Yes."))


def _top_ngram(n: int, times: int) -> str:
    phrase = pseudo_words(n, start=30_000)
    words = filler(100)
    step = len(words) // times
    return lines_of([w for i in range(times) for w in (*words[i * step:(i + 1) * step], *phrase)])


CASES = {
    "min_words": lambda: " ".join(filler(30)),
    "min_mean_word_length": lambda: lines_of(["the", "and", *pseudo_words(60, syllables=1)]),
    "max_mean_word_length": lambda: lines_of(["the", "and", *pseudo_words(60, syllables=6)]),
    "hash_ratio": lambda: lines_of(filler(80)).replace(" ", " #", 12),
    "ellipsis_ratio": lambda: lines_of(filler(80)).replace(" ", "... ", 12),
    "bullet_lines": lambda: "\n".join("- " + line for line in lines_of(filler(80)).splitlines()),
    "ellipsis_lines": lambda: "\n".join(line + "..." for line in lines_of(filler(80), 20).splitlines()),
    "alpha_words": _numbers_doc,
    "stop_words": lambda: lines_of(pseudo_words(80)),
    "dup_para_frac": _dup_paragraphs,
    "dup_para_char_frac": _indented_duplicate_paragraphs,
    "dup_line_frac": _dup_lines,
    "dup_line_char_frac": _long_duplicate_line,
    "top_2gram": lambda: _top_ngram(2, 14),
    "top_3gram": lambda: _top_ngram(3, 9),
    "top_4gram": lambda: _top_ngram(4, 6),
    **{f"dup_{n}gram": (lambda n=n, low=low, high=high: repeated_phrase(n, low, high))
       for n, low, high in [(5, 0.15, 0.16), (6, 0.14, 0.15), (7, 0.13, 0.14), (8, 0.12, 0.13),
                            (9, 0.11, 0.12), (10, 0.10, 0.11)]},
    "lorem_ipsum": lambda: PROSE + "\nLorem ipsum dolor sit amet.",
}


@pytest.mark.parametrize("rule", CASES)
def test_each_rule_alone(rule):
    doc = CASES[rule]()
    assert filters.quality_problems(doc, Q) == [rule]
    assert filters.quality_problems(doc, Q, first_only=True) == [rule]
    # Switching the rule off keeps the document (the n-gram rules come as a table).
    if rule.startswith(("top_", "dup_")) and rule.endswith("gram"):
        field = "max_top_ngram_char_frac" if rule.startswith("top_") else "max_dup_ngram_char_frac"
        n = int(re.search(r"\d+", rule).group())
        off = {**Q, field: tuple((m, v) for m, v in Q[field] if m != n)}
    else:
        field = {"hash_ratio": "max_symbol_word_ratio", "ellipsis_ratio": "max_symbol_word_ratio",
                 "bullet_lines": "max_bullet_lines", "ellipsis_lines": "max_ellipsis_lines",
                 "alpha_words": "min_alpha_words", "stop_words": "min_stop_words",
                 "lorem_ipsum": "drop_lorem_ipsum"}.get(rule, rule if rule in Q else "max_" + rule)
        off = {**Q, field: None}
    assert filters.quality_problems(doc, off) == []


def test_max_words_and_config_dict():
    doc = lines_of(filler(80))
    q = ml_collections.ConfigDict({**Q, "max_words": 60})
    filters.validate_quality(q)
    assert filters.quality_problems(doc, q) == ["max_words"]


def test_validate_quality_names_bad_fields():
    with pytest.raises(ValueError, match="missing.*min_words.*unknown.*min_wrds"):
        filters.validate_quality({**{k: v for k, v in Q.items() if k != "min_words"}, "min_wrds": 5})


def test_several_problems_in_a_fixed_order():
    doc = " ".join(["#"] * 5 + pseudo_words(10, syllables=1))
    assert filters.quality_problems(doc, Q) == ["min_words", "min_mean_word_length", "hash_ratio", "stop_words"]
    assert filters.quality_problems(doc, Q, first_only=True) == ["min_words"]


def _reference_dup_fraction(words: list[str], n: int) -> float:
    """The definition, quadratic and obvious: characters of words inside any repeated n-gram."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts = collections.Counter(grams)
    covered = {j for i, g in enumerate(grams) if counts[g] > 1 for j in range(i, i + n)}
    return sum(len(words[j]) for j in covered) / sum(map(len, words))


@pytest.mark.parametrize("num_words", [40, 299, 300, 1000])
def test_small_and_large_ngram_paths_agree_with_the_definition(num_words):
    # Repeats of several lengths at several places; both implementations against the reference.
    vocab = pseudo_words(30, syllables=2)
    words = [vocab[(i * i + i // 7) % 23 if i % 5 else i % 4] for i in range(num_words)]
    lengths = list(map(len, words))
    ns = set(range(2, 11))
    small = list(filters._ngrams_small(words, lengths, ns, ns, 10))
    large = list(filters._ngrams_large(words, lengths, ns, ns, 10))
    assert small == large
    for n, best, covered in small:
        assert covered / sum(lengths) == pytest.approx(_reference_dup_fraction(words, n))
        assert best[0] == max(collections.Counter(zip(*(words[i:] for i in range(n)))).values())


def test_blocklist_whole_words_case_insensitive_and_phrases():
    terms = ("blockword1", "Bad Phrase here", "x$y")
    assert filters.blocklisted("some text with BlockWord1 inside", terms) == "blockword1"
    assert filters.blocklisted("blockword1x and xblockword1 and blockword1_2", terms) is None
    assert filters.blocklisted("a bad\nphrase HERE, yes", terms) == "Bad Phrase here"
    assert filters.blocklisted("a bad phrase, not here", terms) is None
    assert filters.blocklisted("pay x$y now", terms) == "x$y"
    assert filters.blocklisted("pay ax$y now", terms) is None
    # The earliest match wins, whichever kind it is.
    assert filters.blocklisted("x$y then blockword1", terms) == "x$y"
    assert filters.blocklisted("blockword1 then x$y", terms) == "blockword1"
    assert filters.blocklisted("anything", filters.DEFAULT_BLOCKLIST) is None
    assert filters.blocklisted("a blockword1", filters.compile_blocklist(terms)) == "blockword1"


def test_blocklist_of_thousands_of_terms(tmp_path):
    terms = tuple(f"blockword{i}" for i in range(5000)) + ("two words",)
    path = tmp_path / "terms.txt"
    path.write_text("# one term a line\n\n" + "\n".join(terms) + "\n")
    assert filters.load_blocklist(str(path)) == terms
    text = PROSE * 20
    assert filters.blocklisted(text, terms) is None
    assert filters.blocklisted(text + " blockword4999", terms) == "blockword4999"
    assert filters.blocklisted(text + " two  words", terms) == "two words"


PII_TEXT = ("Write to jane.doe@example.com or j_smith+news@mail.co.uk, call +44 20 7946 0958, (555) 123-4567, "
            "555-123-4567, 555.123.4567 or +1 555 123 4567. The server 192.168.1.20 and 10.0.0.1 answer; "
            "so do 2001:db8:85a3::8a2e:370:7334 and 2001:0db8:0000:0000:0000:ff00:0042:8329.")


def test_scrub_pii_replaces_every_kind():
    text, counts = filters.scrub_pii(PII_TEXT)
    assert counts == {"email": 2, "phone": 5, "ip_address": 4}
    assert text == ("Write to <EMAIL> or <EMAIL>, call <PHONE>, <PHONE>, <PHONE>, <PHONE> or <PHONE>. "
                    "The server <IP_ADDRESS> and <IP_ADDRESS> answer; so do <IP_ADDRESS> and <IP_ADDRESS>.")


@pytest.mark.parametrize("clean", [
    "1812", "in 1805-1812", "(1805-1812)", "Python 3.11.7", "page 123-456", "pp. 123-145", "pi is 3.14159",
    "3.141592653589", "at 10:30", "10:30:45", "a 3:2 ratio", "ISBN 978-0-14-044793-4", "ISBN 0-14-044793-4",
    "2023-01-15", "15.01.2023", "1,234,567 people", "1.234.567.890", "12 345 678 901", "256.1.1.1",
    "01.02.03.04", "x[::2]", "a[1::2]", "std::vector", "Class::method", "1 2 3 4 5 6 7 8 9 10",
    "5551234567", "v1.2.3", "'{:+d}'.format(+3)", "+000000120", "1.5e+10", "chapters 12-14",
    "1234-5678-9012-3456", "-1234567890", "user@localhost", "@decorator", "a @ b", "12:00 - 13:30",
])
def test_scrub_pii_leaves_numbers_alone(clean):
    text = f"See {clean} here."
    assert filters.scrub_pii(text) == (text, {"email": 0, "phone": 0, "ip_address": 0})


def test_scrub_pii_leaves_pydoc_unchanged():
    from pydoc_data import topics
    for name, text in topics.topics.items():
        assert filters.scrub_pii(text)[0] == text, name


@needs_shared
def test_scrub_pii_leaves_offline_corpora_unchanged():
    for path in sorted(SHARED_TEXT.glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        scrubbed, counts = filters.scrub_pii(text)
        assert scrubbed == text, (path.name, counts)


@pytest.mark.parametrize("licence,allow,allowed", [
    ("CC-BY-SA-3.0", ("cc-by-sa-3.0", "public-domain"), True),
    ("public-domain", ("CC-BY-SA-3.0",), False),
    ("proprietary", (), True),
    ("", ("Apache-2.0",), False),
    (" Apache-2.0 ", ["apache-2.0"], True),
])
def test_licence_allowed(licence, allow, allowed):
    assert filters.licence_allowed(licence, allow) is allowed
