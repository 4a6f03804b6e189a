"""Perplexity dataset specs: readers, names and errors; WikiText articles."""
import pathlib

import pytest

from fmjax.eval import datasets

WIKITEXT2 = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "text" / "wikitext2_test.tokens.txt"

WIKITEXT = """ 
 = Alpha = 
 
 Alpha is a letter . 
 
 = = History = = 
 
 It came first . 
 
 = Beta = 
 
 Beta follows . 
"""


def test_wikitext_documents_are_articles(tmp_path):
    path = tmp_path / "wiki.tokens.txt"
    path.write_text(WIKITEXT)
    docs = list(datasets.wikitext_documents(str(path)))
    assert len(docs) == 2
    assert docs[0].startswith("= Alpha =") and "= = History = =" in docs[0] and "came first" in docs[0]
    assert docs[1].startswith("= Beta =")
    name, documents = datasets.parse(f"wikitext:{path}")
    assert name == "wiki" and list(documents) == docs


def test_specs_name_their_reader_and_fail_clearly(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("one\n\ntwo\n")
    name, documents = datasets.parse(f"text:{text}")
    assert name == "notes" and list(documents) == ["one", "two"]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"body": "x y"}\n{"body": "z"}\n')
    name, documents = datasets.parse(f"jsonl:{jsonl}:body")
    assert name == "rows" and list(documents) == ["x y", "z"]
    assert datasets.parse("tfds:wikitext/wikitext-2-raw-v1:test")[0] == "wikitext_wikitext-2-raw-v1_test"
    for bad in ("wikitext2", "text:", "csv:a.csv", "jsonl:rows.jsonl", "tfds:lm1b"):
        with pytest.raises(ValueError, match="eval.datasets: .* is not one of"):
            datasets.parse(bad)
    with pytest.raises(ValueError, match="no file .*missing.txt"):
        datasets.parse(f"text:{tmp_path}/missing.txt")


@pytest.mark.skipif(not WIKITEXT2.exists(), reason=f"{WIKITEXT2} is absent (../shared/data not beside the repo)")
def test_the_shared_wikitext2_test_split_is_62_articles():
    name, documents = datasets.parse(f"wikitext:{WIKITEXT2}")
    docs = list(documents)
    assert name == "wikitext2_test" and len(docs) == 62
    assert docs[0].startswith("= Robert <unk> =")
    assert sum(len(d.split()) for d in docs) == 241_211  # every token of the file (its README's count)
