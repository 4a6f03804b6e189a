"""Tests for fmjax.data.prepare.categorize: language identification and code detection."""

import pathlib

import pytest

from fmjax.data.prepare import categorize

SHARED_TEXT = pathlib.Path(__file__).resolve().parents[3].parent / "shared" / "data" / "text"
needs_shared = pytest.mark.skipif(not SHARED_TEXT.is_dir(), reason=f"{SHARED_TEXT} (offline corpora) is absent")

ENGLISH = ("The river had risen in the night, and by morning the lower fields were under water. "
           "Farmers moved their animals to the hill behind the church and waited for the rain to stop.")


@pytest.mark.parametrize("text,code", [
    (ENGLISH, "en"),
    ("Le matin, nous sommes allés au marché pour acheter du pain, des fromages et quelques fruits. "
     "Ensuite, nous avons pris un café sur la place pendant que les enfants jouaient.", "fr"),
    ("Gestern Abend haben wir mit unseren Freunden gegessen und danach lange über die Reise "
     "gesprochen, die wir im nächsten Sommer gemeinsam machen wollen.", "de"),
    ("Cuando llegamos a la estación, el tren ya había salido, así que tuvimos que esperar "
     "casi dos horas en un pequeño bar lleno de viajeros cansados.", "es"),
])
def test_language_of_hand_written_sentences(text, code):
    found, probability = categorize.language(text)
    assert found == code
    assert probability > 0.9


def test_language_of_text_without_letters_is_undetermined():
    assert categorize.language("") == ("und", 0.0)
    assert categorize.language("12 345 -- 6.7 (8)") == ("und", 0.0)


def test_language_reads_only_a_prefix():
    # Everything after max_chars is ignored: a French tail does not change an English head.
    text = ENGLISH + " " + "Nous sommes allés au marché acheter du pain et du fromage. " * 50
    assert categorize.language(text, max_chars=len(ENGLISH))[0] == "en"
    assert categorize.language(text, max_chars=len(text))[0] == "fr"


PYTHON = '''import os
from collections import Counter


def count_words(path):
    """Counts the words of a file."""
    with open(path) as f:
        words = f.read().split()
    return Counter(words)


if __name__ == "__main__":
    print(count_words(os.environ["FILE"]))
'''
C = '''#include <stdio.h>

int main(void) {
    int total = 0;
    for (int i = 0; i < 10; i++) {
        total += i;
    }
    printf("%d\\n", total);
    return 0;
}
'''
SHELL = '''#!/usr/bin/env bash
set -euo pipefail
for f in *.txt; do
  echo "$f"
done
'''
SHELL_NO_SHEBANG = '''for f in *.txt; do
  if [ -s "$f" ]; then
    echo "$f has $(wc -l < "$f") lines"
  fi
done
'''


@pytest.mark.parametrize("text,language", [
    (PYTHON, "python"), (C, "c"), (SHELL, "shell"), (SHELL_NO_SHEBANG, "shell"),
    ('{\n  "name": "fmjax",\n  "tags": ["jax", "flax"],\n  "size": 3\n}\n', "json"),
])
def test_code_language_from_content(text, language):
    assert categorize.code_language(text) == language
    assert categorize.is_code(text)


@pytest.mark.parametrize("path,language", [
    ("src/model.py", "python"), ("a/b/main.rs", "rust"), ("x.JS", "javascript"), ("lib.hpp", "cpp"),
    ("run.sh", "shell"), ("Makefile", "makefile"), ("conf.yml", "yaml"),
    ("README.md", None), ("notes.txt", None), ("paper.tex", None),
])
def test_code_language_from_path_wins(path, language):
    # The extension decides alone: prose in a .py file is Python, code in a .md file is not code.
    assert categorize.code_language(ENGLISH if language else PYTHON, path) == language


def test_unknown_extension_falls_back_to_content():
    assert categorize.code_language(PYTHON, "corpus.jsonl") == "python"
    assert categorize.code_language(ENGLISH, "corpus.jsonl") is None


def test_prose_and_documentation_are_not_code():
    assert categorize.code_language(ENGLISH) is None
    assert categorize.code_language("") is None
    # Documentation quoting a little code stays documentation.
    doc = "\n".join([ENGLISH, ENGLISH, "", "   for i in range(3):", "       print(i)", "", ENGLISH, ENGLISH])
    assert categorize.code_language(doc) is None
    # Speaker lines end in a colon but are not Python blocks.
    play = "FIRST CITIZEN:\nBefore we proceed any further, hear me speak.\n\nALL:\nSpeak, speak.\n" * 3
    assert categorize.code_language(play) is None


def test_pydoc_topics_are_documentation():
    from pydoc_data import topics
    found = {name: categorize.code_language(text) for name, text in topics.topics.items()}
    assert not {name: lang for name, lang in found.items() if lang}


@needs_shared
def test_offline_corpora_are_prose():
    from fmjax.data import sources
    for name in ("war_and_peace.txt", "tinyshakespeare.txt", "wikitext2_valid.tokens.txt"):
        docs = list(sources.text_documents(str(SHARED_TEXT / name)))
        code = [d[:80] for d in docs if categorize.code_language(d)]
        assert not code, (name, code[:3])
    paragraph = next(d for d in sources.text_documents(str(SHARED_TEXT / "war_and_peace.txt")) if len(d) > 500)
    assert categorize.code_language(paragraph) is None
    assert categorize.language(paragraph)[0] == "en"
