"""Labelled examples: passages, balance, stable splits, batch format, exact resume, eval padding, errors."""
import json
import pathlib
import types

import numpy as np
import pytest

from configs.encoder import classify_domains
from fmjax.data import labelled, sources

SEQ_LEN = 24
SHARED_TEXT = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "text"
WORDS = [["thee", "thou", "hath", "doth", "lord", "sweet", "heaven"],
         ["little", "happy", "mommy", "played", "park", "ball", "smiled"],
         ["prince", "army", "count", "moscow", "battle", "french", "officer"]]


def stub_tokenizer():
    """One id per word of write_domains' texts, "." its own token, 1 for any other word."""
    vocab = {w: 5 + i for i, w in enumerate(["."] + sum(WORDS, []))}

    def encode(text):
        return [vocab.get(w, 1) for w in text.replace(".", " .").split()]
    return types.SimpleNamespace(encode=encode, pad_id=0, bos_id=2, eos_id=3, vocab_size=len(vocab) + 5)


def write_domains(root: pathlib.Path, lines_per_file=(300, 200, 120)) -> list[str]:
    paths = []
    for k, n in enumerate(lines_per_file):
        words = WORDS[k]
        lines = [" ".join(words[(i + j) % 7] for j in range(3 + i % 5)) + ("." if i % 3 else "")
                 for i in range(n)]
        path = root / f"domain{k}.txt"
        path.write_text("\n".join(lines) + "\n")
        paths.append(str(path))
    return paths


def make_config(root, **data):
    c = classify_domains.get_config()
    c.model.max_len = 64
    c.task.labels = []
    c.data.update(paths=write_domains(root), passage_chars=60, max_per_class=0, validation_fraction=0.3,
                  seq_len=SEQ_LEN, cache_dir=str(root / "cache"))
    c.data.update(**data)
    c.train.batch_size = 8
    return c


def test_passages_are_normalised_sized_and_keep_every_word_in_order():
    text = "\n".join(f"  Line {i}  has\tsome words. And a second sentence {i}!  " for i in range(40))
    text += "\n" + "x" * 150  # one over-long word is cut hard
    cut = labelled.passages(text, 80)
    assert all("  " not in p and "\n" not in p and p == p.strip() for p in cut)
    assert all(40 <= len(p) <= 120 for p in cut[:-3]), [len(p) for p in cut]
    assert " ".join(cut).replace(" ", "") == "".join(text.split())


def test_classes_are_balanced_capped_and_deterministic(tmp_path):
    examples = labelled.validate(make_config(tmp_path))
    assert examples.labels == ("domain0", "domain1", "domain2")  # file stems
    counts = np.bincount([r["label"] for r in examples.train + examples.validation])
    assert len(set(counts)) == 1  # every class cut to the smallest
    capped = labelled.load(make_config(tmp_path, max_per_class=10))
    assert np.bincount([r["label"] for r in capped.train + capped.validation]).tolist() == [10, 10, 10]
    labelled._load.cache_clear()
    assert labelled.load(make_config(tmp_path, max_per_class=10)) == capped
    # A smaller cap keeps a subset, so a larger unlabelled corpus can hold out the same validation texts.
    assert {r["text"] for r in capped.train} <= {r["text"] for r in examples.train}


def test_splits_are_disjoint_and_follow_the_text_hash(tmp_path):
    examples = labelled.load(make_config(tmp_path))
    train, validation = ({r["text"] for r in split} for split in (examples.train, examples.validation))
    assert train and validation and not train & validation
    assert all(sources.is_validation(t, 0.3) for t in validation)
    assert not any(sources.is_validation(t, 0.3) for t in train)


def test_labels_name_files_and_repeated_labels_merge_them(tmp_path):
    config = make_config(tmp_path, max_per_class=12)
    config.task.labels = ["a", "b", "a"]
    examples = labelled.load(config)
    assert examples.labels == ("a", "b")
    merged = [r["text"] for r in examples.train + examples.validation if r["label"] == 0]
    assert len(merged) == 12 and {t.split()[0] for t in merged} <= set(WORDS[0] + WORDS[2])
    assert {t.split()[0] in WORDS[0] for t in merged} == {True, False}


def test_jsonl_with_string_or_int_labels(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": f"example number {i}", "label": ["neg", "pos"][i % 2]} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    config = make_config(tmp_path, source="jsonl", path=str(path))
    examples = labelled.load(config)
    assert examples.labels == ("neg", "pos")
    by_text = {r["text"]: r["label"] for r in examples.train + examples.validation}
    assert by_text == {r["text"]: i % 2 for i, r in enumerate(rows)}
    path.write_text("\n".join(json.dumps({"text": r["text"], "label": i % 3}) for i, r in enumerate(rows)))
    assert labelled.load(config).labels == ("0", "1", "2")
    config.task.labels = ["x", "y", "z"]
    assert labelled.load(config).labels == ("x", "y", "z")


def test_rows_are_bos_tokens_eos_then_padding(tmp_path):
    config = make_config(tmp_path)
    tok = stub_tokenizer()
    batch = next(labelled.make_train_iterator(config, tok, labelled.load(config)))
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "inputs": ((8, SEQ_LEN), "int32"), "segment_ids": ((8, SEQ_LEN), "int32"),
        "positions": ((8, SEQ_LEN), "int32"), "labels": ((8,), "int32"), "weight": ((8,), "float32")}
    long_row = labelled.tokenize(tok, SEQ_LEN)({"text": "word " * 100, "label": 1})
    assert long_row["inputs"][0] == 2 and long_row["inputs"][-1] == 3 and long_row["segment_ids"].all()
    short = labelled.tokenize(tok, SEQ_LEN)({"text": "three short words", "label": 2})
    n = 5  # bos, 3 words, eos
    np.testing.assert_array_equal(short["segment_ids"], np.arange(SEQ_LEN) < n)
    np.testing.assert_array_equal(short["positions"][:n], np.arange(n))
    assert short["inputs"][n - 1] == 3 and not short["inputs"][n:].any() and not short["positions"][n:].any()


def test_train_iterator_resumes_exactly_after_a_json_round_trip(tmp_path):
    config = make_config(tmp_path)
    examples, tok = labelled.load(config), stub_tokenizer()
    it = labelled.make_train_iterator(config, tok, examples)
    for _ in range(7):  # past an epoch boundary (train split < 7 batches)
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    resumed = labelled.make_train_iterator(config, tok, examples)
    resumed.set_state(state)
    for want, got in zip(expected, (next(resumed) for _ in range(5))):
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])


def test_processes_read_disjoint_shards_covering_the_split(tmp_path):
    config = make_config(tmp_path)
    examples, tok = labelled.load(config), stub_tokenizer()
    row = labelled.tokenize(tok, SEQ_LEN)
    seen = []
    for index in range(2):
        size = len(examples.train[index::2])  # the first epoch of a shard is its first `size` rows
        it = labelled.make_train_iterator(config, tok, examples, index, 2)
        rows = np.concatenate([next(it)["inputs"] for _ in range(-(-size // 4))])[:size]
        seen.append({tuple(r) for r in rows})
        assert len(seen[-1]) == size
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {tuple(row(r)["inputs"]) for r in examples.train}


def test_eval_batches_hold_every_example_once_padding_weighted_zero(tmp_path):
    config = make_config(tmp_path)
    examples, tok = labelled.load(config), stub_tokenizer()
    n = len(examples.validation)
    assert n % 8, "the test needs a padded last batch"
    batches = labelled.make_eval_batches(config, tok, examples)
    weight = np.concatenate([b["weight"] for b in batches])
    assert len(weight) == -(-n // 8) * 8 and weight[:n].all() and not weight[n:].any()
    labels = np.concatenate([b["labels"] for b in batches])[:n]
    np.testing.assert_array_equal(labels, [r["label"] for r in examples.validation])
    halves = [labelled.make_eval_batches(config, tok, examples, i, 2) for i in range(2)]
    for whole, first, second in zip(batches, *halves):
        np.testing.assert_array_equal(whole["inputs"], np.concatenate([first["inputs"], second["inputs"]]))


def test_corpus_train_split_is_exactly_the_train_texts(tmp_path):
    config = make_config(tmp_path, max_per_class=40)
    examples = labelled.load(config)
    corpus = config.copy_and_resolve_references()
    corpus.data.update(source="jsonl", path=str(labelled.write_corpus(config)), doc_separator="")
    train = sources.load_split(corpus, "train")
    assert sorted(train[i]["text"] for i in range(len(train))) == sorted(r["text"] for r in examples.train)


@pytest.mark.parametrize("change, message", [
    (dict(paths=["/nonexistent/a.txt"]), "data.paths: '/nonexistent/a.txt' does not exist"),
    (dict(seq_len=65), "data.seq_len=65 must be in [3, model.max_len=64]"),
    (dict(source="csv"), "data.source='csv' is not a labelled source"),
    (dict(validation_fraction=1.0), "data.validation_fraction=1.0"),
    (dict(labels=["a", "b"]), "task.labels has 2 names but data.paths has 3 files"),
    (dict(empty_file=True), "empty.txt gives no passage"),
    (dict(jsonl='{"text": "a b", "label": "maybe"}', labels=["yes", "no"]),
     "data.jsonl:1: label 'maybe' is not one of task.labels=['yes', 'no']"),
    (dict(jsonl='{"text": "a b", "label": 0}\n{"text": "c d", "label": 2}'), "class '1' has no examples"),
    (dict(jsonl='{"txt": "a b", "label": 0}'), "data.jsonl:1: has no field data.text_field='text'"),
])
def test_bad_inputs_name_the_field_or_file(tmp_path, change, message):
    config = make_config(tmp_path)
    if change.pop("empty_file", False):
        (tmp_path / "empty.txt").write_text("\n\n")
        config.data.paths = [*config.data.paths[:2], str(tmp_path / "empty.txt")]
    if "jsonl" in change:
        (tmp_path / "data.jsonl").write_text(change.pop("jsonl"))
        config.data.update(source="jsonl", path=str(tmp_path / "data.jsonl"))
    config.task.labels = change.pop("labels", list(config.task.labels))
    config.data.update(**change)
    with pytest.raises(ValueError, match=None) as error:
        labelled.validate(config)
    assert message in str(error.value)


@pytest.mark.skipif(not SHARED_TEXT.is_dir(), reason=f"the offline corpora are not at {SHARED_TEXT}")
def test_the_shipped_domains_are_four_balanced_classes():
    config = classify_domains.get_config()
    config.data.max_per_class = 300
    examples = labelled.validate(config)
    assert examples.labels == ("shakespeare", "tinystories", "war_and_peace", "wikitext")
    assert np.bincount([r["label"] for r in examples.train + examples.validation]).tolist() == [300] * 4
