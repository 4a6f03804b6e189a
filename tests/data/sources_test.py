"""Tests for fmjax.data.sources: the pydoc corpus, local files as TFDS, and input errors."""

import json
import re

import ml_collections
import pytest

from fmjax.data import sources
from tests.data.common import data_config


def make_config(cache_dir, **data) -> ml_collections.ConfigDict:
    return data_config(cache_dir, **data)


def texts(source) -> list[str]:
    return [source[i]["text"] for i in range(len(source))]


def splits(config) -> tuple[list[str], list[str]]:
    return (texts(sources.load_split(config, "train")),
            texts(sources.load_split(config, "validation")))


DOCS = [f"Document number {i}.\nIt has two lines about topic {i * 7 % 13}." for i in range(40)]


def test_pydoc_splits_are_disjoint_complete_and_deterministic(tmp_path):
    train, val = splits(make_config(tmp_path / "a"))
    assert train and val
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(sources.pydoc_documents())
    assert all(sources.is_validation(t, 0.05) for t in val)
    assert all(not sources.is_validation(t, 0.05) for t in train)
    # A separately prepared copy reads back in the same order: nothing depends on an RNG.
    assert splits(make_config(tmp_path / "b")) == (train, val)


def test_pydoc_documents_are_whole_paragraphs_of_bounded_size():
    docs = list(sources.pydoc_documents())
    assert 200 < len(docs) < 1000
    for doc in docs:
        assert doc.strip() and doc == doc.rstrip()
        # Only a single paragraph longer than the limit may exceed it.
        assert len(doc) <= 1500 or "\n\n" not in doc


def test_text_file_blank_line_blocks(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n\n".join(DOCS) + "\n")
    train, val = splits(make_config(tmp_path, source="text", path=str(path),
                                    validation_fraction=0.3))
    assert train and val and sorted(train + val) == sorted(DOCS)


def test_text_file_with_separator(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text("<|endoftext|>\n".join(d + "\n" for d in DOCS))
    train, val = splits(make_config(tmp_path, source="text", path=str(path),
                                    doc_separator="<|endoftext|>", validation_fraction=0.3))
    assert sorted(train + val) == sorted(DOCS)


def test_jsonl_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "body": d}) for i, d in enumerate(DOCS)))
    train, val = splits(make_config(tmp_path, source="jsonl", path=str(path), text_field="body",
                                    validation_fraction=0.3))
    assert sorted(train + val) == sorted(DOCS)


def test_same_input_is_reused_and_changed_input_is_not(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(DOCS))
    config = make_config(tmp_path / "cache", source="text", path=str(path),
                         validation_fraction=0.3)
    first = sources.dataset_id(config)
    sources.load_split(config, "train")
    assert sources.dataset_id(config) == first
    path.write_text("\n\n".join(DOCS[:-1]))
    assert sources.dataset_id(config) != first
    assert len(texts(sources.load_split(config, "train"))) + len(
        texts(sources.load_split(config, "validation"))) == len(DOCS) - 1
    prepared = list((tmp_path / "cache" / "tfds" / "local_text").iterdir())
    assert len(prepared) == 2


def test_unknown_source_lists_valid_ones(tmp_path):
    valid = r"\['jsonl', 'pile', 'pydoc', 'text', 'tfds'\]"
    with pytest.raises(ValueError, match="data.source=.wiki. is unknown; valid sources are " + valid):
        sources.validate(make_config(tmp_path, source="wiki"))


def test_missing_or_empty_path(tmp_path):
    with pytest.raises(ValueError, match="data.path, which is empty"):
        sources.validate(make_config(tmp_path, source="text"))
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match=f"data.path='{missing}' does not exist"):
        sources.validate(make_config(tmp_path, source="text", path=missing))
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="contains no documents"):
        sources.validate(make_config(tmp_path, source="text", path=str(tmp_path / "blank.txt")))


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=f"{path}:2: not valid JSON"):
        sources.validate(make_config(tmp_path, source="jsonl", path=str(path)))
    path.write_text('{"text": "fine"}\n\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=f"{path}:3: has no field data.text_field='text'.*body"):
        sources.validate(make_config(tmp_path, source="jsonl", path=str(path)))


@pytest.mark.parametrize("line, message", [
    ('{"text": 7}', "field 'text' (data.text_field) is a number, not a string"),
    ('{"text": null}', "field 'text' (data.text_field) is null, not a string"),
    ('["text"]', "has no field data.text_field='text'; the line is an array, not an object"),
    ('"text"', "has no field data.text_field='text'; the line is a string, not an object"),
])
def test_jsonl_wrong_types_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(f'{{"text": "fine"}}\n{line}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: {message}")):
        sources.validate(make_config(tmp_path, source="jsonl", path=str(path)))


def test_non_utf8_text_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{path}:2: not valid UTF-8"):
        sources.validate(make_config(tmp_path, source="text", path=str(path)))
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "ok"}\n\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=f"{path}:3: not valid UTF-8 .*at byte offset 13 of the line"):
        sources.validate(make_config(tmp_path, source="jsonl", path=str(path)))


def test_empty_file_or_directory_as_data_path(tmp_path):
    for source, name in (("text", "empty.txt"), ("jsonl", "empty.jsonl")):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(ValueError, match="contains no documents .the file is empty or blank"):
            sources.validate(make_config(tmp_path, source=source, path=str(tmp_path / name)))
    with pytest.raises(ValueError, match=f"data.path='{tmp_path}' is a directory"):
        sources.validate(make_config(tmp_path, source="jsonl", path=str(tmp_path)))


# Malformed lines of every kind, between the good ones: lines 3, 5, 7, 9 and 11.
BAD_LINES = ['{"text": oops}', '{"body": "no text field"}', '{"text": ["not", "a string"]}',
             '[1, 2]', '{"text": "caf\u00e9"}']


def mixed_jsonl(path) -> None:
    lines = [json.dumps({"text": d}).encode() for d in DOCS[:2]]
    for bad, doc in zip(BAD_LINES, DOCS[2:]):
        lines += [bad.encode("latin-1"), json.dumps({"text": doc}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_skip_bad_records_reports_once_and_keeps_the_good_lines(tmp_path, capsys):
    path = tmp_path / "corpus.jsonl"
    mixed_jsonl(path)
    with pytest.raises(ValueError, match=f"{path}:3: not valid JSON"):  # the default: fail at the first
        sources.validate(make_config(tmp_path, source="jsonl", path=str(path)))
    config = make_config(tmp_path, source="jsonl", path=str(path), skip_bad_records=True,
                         validation_fraction=0.3)
    sources.validate(config)
    train, val = splits(config)  # validates again for each split
    assert sorted(train + val) == sorted(DOCS[:2 + len(BAD_LINES)])
    assert [line for line in capsys.readouterr().err.splitlines() if "fmjax" in line] == [
        f"fmjax: warning: skipped 5 malformed records of {path} (first: line 3: not valid JSON "
        "(Expecting value)); data.skip_bad_records=True"]


def test_skip_bad_records_of_a_text_file_drops_the_lines(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("one\ncaf\u00e9\ntwo\n\nthree\n".encode("latin-1"))
    docs = sources.text_documents(str(path), skipped=(skipped := sources.BadRecords()))
    assert list(docs) == ["one\ntwo", "three"]
    assert skipped.describe("x.txt") == ("skipped 1 malformed record of x.txt (first: line 2: not valid "
                                         "UTF-8 (invalid continuation byte at byte offset 3 of the line))")
    sources.validate(make_config(tmp_path, source="text", path=str(path), skip_bad_records=True))
    assert "skipped 1 malformed record" in capsys.readouterr().err


def test_skip_bad_records_with_no_good_line_fails(tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_text("\n".join(BAD_LINES[:4]))
    with pytest.raises(ValueError, match=re.escape(
            f"data.path='{path}' contains no documents (data.skip_bad_records: skipped 4 malformed "
            f"records of {path} (first: line 1: not valid JSON (Expecting value)))")):
        sources.validate(make_config(tmp_path, source="jsonl", path=str(path), skip_bad_records=True))


def test_empty_validation_split_says_to_raise_fraction(tmp_path):
    path = tmp_path / "few.txt"
    path.write_text("one\n\ntwo\n\nthree")
    config = make_config(tmp_path, source="text", path=str(path), validation_fraction=0.01)
    assert not any(sources.is_validation(d, 0.01) for d in ["one", "two", "three"])
    with pytest.raises(ValueError, match="validation split .* empty.*; raise data.validation_"):
        sources.load_split(config, "train")


def test_bad_fraction_and_split_names(tmp_path):
    with pytest.raises(ValueError, match="data.validation_fraction=0.0 must be in"):
        sources.validate(make_config(tmp_path, validation_fraction=0.0))
    with pytest.raises(ValueError, match=r"data.eval_split='test'.*\['train', 'validation'\]"):
        sources.validate(make_config(tmp_path, eval_split="test"))


def test_tfds_source_is_checked_without_downloading(tmp_path):
    sources.validate(make_config(tmp_path, source="tfds", tfds_name="lm1b"))
    with pytest.raises(ValueError, match="data.tfds_name='lm1bb' is not a registered TFDS "
                       r"dataset; did you mean one of \['lm1b'"):
        sources.validate(make_config(tmp_path, source="tfds", tfds_name="lm1bb"))
    with pytest.raises(ValueError, match=r"data.text_field='story'.*\['text'\]"):
        sources.validate(make_config(tmp_path, source="tfds", tfds_name="lm1b", text_field="story"))
    assert not (tmp_path / "tfds" / "lm1b").exists() or not any(
        (tmp_path / "tfds" / "lm1b").rglob("*.array_record*"))
