"""Tests for fmjax.data.pipeline: batch format, packing invariants, exact resume, sharding."""

import json

import ml_collections
import numpy as np
import pytest

from fmjax.data import pipeline
from fmjax.data import sources
from tests.data.common import cache, data_config  # noqa: F401  (cache is a fixture)
from fmjax.data import tokenizer as tokenizer_lib

SEQ_LEN = 32
# Short, distinct documents: most fit in a row, so whole documents can be read back in order.
DOCS = [f"Story {i}: the {['red', 'blue', 'green'][i % 3]} fox ran {i} miles." for i in range(60)]


def make_config(cache_dir, **data) -> ml_collections.ConfigDict:
    return data_config(cache_dir, eval_batches=1000, **{"seq_len": SEQ_LEN, **data})


@pytest.fixture(scope="module")
def tokenizer(cache):
    return tokenizer_lib.get_tokenizer(make_config(cache))


@pytest.fixture(scope="module")
def stories(cache, tokenizer):
    """A config reading DOCS from a text file, tokenized by the pydoc tokenizer."""
    path = cache / "stories.txt"
    path.write_text("\n\n".join(DOCS))
    return make_config(cache, source="text", path=str(path), validation_fraction=0.3,
                       tokenizer=tokenizer.path)


def split_texts(config, split):
    source = sources.load_split(config, split)
    return [source[i]["text"] for i in range(len(source))]


def stream_documents(batches, tokenizer) -> list[str]:
    """The documents whose whole target sequence (text tokens + eos) the batches contain."""
    targets = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
    ends = np.flatnonzero(targets == tokenizer.eos_id)
    pieces = np.split(targets[:ends[-1]], ends[:-1] + 1) if len(ends) else []
    return [tokenizer.decode(p[p != tokenizer.eos_id]) for p in pieces]


def check_packing(batch, tokenizer):
    """Segments, positions, mask and the one-token shift agree in every row."""
    seg, pos, mask = batch["segment_ids"], batch["positions"], batch["loss_mask"]
    np.testing.assert_array_equal(mask, (seg > 0).astype(np.float32))
    for r in range(len(seg)):
        real = seg[r] > 0
        assert not np.any(real[np.argmin(real):]) or real.all()  # Padding only at the end.
        starts = np.flatnonzero(real & np.concatenate([[True], seg[r, 1:] != seg[r, :-1]]))
        np.testing.assert_array_equal(np.flatnonzero(real & (pos[r] == 0)), starts)
        for a, b in zip(starts, list(starts[1:]) + [real.sum()]):
            assert len(set(seg[r, a:b])) == 1
            np.testing.assert_array_equal(pos[r, a:b], np.arange(b - a))
            # Within a segment each target is the next input: the shift never crosses documents.
            np.testing.assert_array_equal(batch["targets"][r, a:b - 1], batch["inputs"][r, a + 1:b])
            if a > 0:  # A segment that starts inside a row starts a document.
                assert batch["inputs"][r, a] == tokenizer.bos_id
                assert batch["targets"][r, a - 1] == tokenizer.eos_id
        assert list(seg[r, starts]) == list(range(1, len(starts) + 1))


def test_train_batches_format_and_packing(cache, tokenizer):
    it = pipeline.make_train_iterator(make_config(cache), tokenizer)
    for _ in range(5):
        batch = next(it)
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
            k: ((4, SEQ_LEN), np.dtype(d)) for k, d in pipeline.BATCH_DTYPES.items()}
        assert batch["loss_mask"].all()  # Training rows are packed full.
        check_packing(batch, tokenizer)


def test_train_stream_is_whole_documents_reshuffled_each_epoch(stories, tokenizer):
    train = split_texts(stories, "train")
    it = pipeline.make_train_iterator(stories, tokenizer)
    docs = stream_documents([next(it) for _ in range(40)], tokenizer)
    n = len(train)
    assert len(docs) > 2 * n
    first, second = docs[:n], docs[n:2 * n]
    assert sorted(first) == sorted(second) == sorted(train)
    assert first != second
    assert first != train  # Shuffled.


def test_resume_from_json_state_is_exact(stories, tokenizer):
    reference_it = pipeline.make_train_iterator(stories, tokenizer)
    reference = [next(reference_it) for _ in range(14)]
    states = []
    for n in range(10):
        it = pipeline.make_train_iterator(stories, tokenizer)
        for _ in range(n):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        states.append(state)
        resumed = pipeline.make_train_iterator(stories, tokenizer)
        resumed.set_state(state)
        for expected in reference[n:n + 4]:
            got = next(resumed)
            for k in expected:
                np.testing.assert_array_equal(got[k], expected[k], err_msg=f"after {n}: {k}")
    # Both kinds of packing state were exercised, including the one grain's own JSON round trip
    # gets wrong (no remainder, [-1, -1]).
    assert any(s["remainder_slices"]["inputs"] == [-1, -1] for s in states)
    assert any(s["remainder_slices"]["inputs"] != [-1, -1] for s in states)


def test_read_threads_do_not_change_the_stream(stories, tokenizer):
    threaded = stories.copy_and_resolve_references()
    threaded.data.read_threads = 3
    a = pipeline.make_train_iterator(stories, tokenizer)
    b = pipeline.make_train_iterator(threaded, tokenizer)
    for _ in range(10):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_process_shards_are_disjoint_and_cover_the_split(stories, tokenizer):
    train = split_texts(stories, "train")
    seen = []
    for p in range(2):
        it = pipeline.make_train_iterator(stories, tokenizer, process_index=p, process_count=2)
        batch = next(it)
        assert batch["inputs"].shape == (2, SEQ_LEN)
        docs = stream_documents([batch] + [next(it) for _ in range(30)], tokenizer)
        seen.append(set(docs))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(train)


def test_batch_size_must_divide_among_processes(stories, tokenizer):
    with pytest.raises(ValueError, match="train.batch_size=4 must be a positive multiple of the "
                       "process count 3"):
        pipeline.make_train_iterator(stories, tokenizer, process_index=0, process_count=3)


def test_eval_batches_cover_the_split_padded_and_deterministic(stories, tokenizer):
    val = split_texts(stories, "validation")
    batches = pipeline.make_eval_batches(stories, tokenizer)
    tokens = sum(len(tokenizer.encode(t)) + 1 for t in val)
    rows = -(-tokens // SEQ_LEN)
    assert len(batches) == -(-rows // 4)
    assert sum(b["loss_mask"].sum() for b in batches) == tokens
    for b in batches:
        assert b["inputs"].shape == (4, SEQ_LEN)
        check_packing(b, tokenizer)
    last = batches[-1]
    assert not last["segment_ids"][rows % 4 or 4:].any()  # All-zero padding rows.
    assert not last["loss_mask"][rows % 4 or 4:].any()
    # Read in order: whole documents come back as the split lists them.
    assert stream_documents(batches, tokenizer) == val
    again = pipeline.make_eval_batches(stories, tokenizer)
    for a, b in zip(batches, again, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_eval_batches_limit_and_process_split(cache, tokenizer):
    config = make_config(cache)
    config.train.eval_batches = 3
    full = pipeline.make_eval_batches(config, tokenizer)
    assert len(full) == 3 and all(b["loss_mask"].all() for b in full)
    halves = [pipeline.make_eval_batches(config, tokenizer, p, 2) for p in range(2)]
    for i, b in enumerate(full):
        for k in b:
            np.testing.assert_array_equal(np.concatenate([h[i][k] for h in halves]), b[k])


def test_pack_documents():
    batch = pipeline.pack_documents([[2, 10, 11, 3], [2, 12, 3], [2, 13, 14, 15, 3]], seq_len=5)
    np.testing.assert_array_equal(batch["inputs"], [[2, 10, 11, 2, 12], [2, 13, 14, 15, 0]])
    np.testing.assert_array_equal(batch["targets"], [[10, 11, 3, 12, 3], [13, 14, 15, 3, 0]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert {k: v.dtype for k, v in batch.items()} == {
        k: np.dtype(d) for k, d in pipeline.BATCH_DTYPES.items()}
    with pytest.raises(ValueError, match="document 0 has 7 tokens"):
        pipeline.pack_documents([[2, 1, 1, 1, 1, 1, 3]], seq_len=5)


def test_validate_covers_batching(cache):
    with pytest.raises(ValueError, match="data.seq_len=0"):
        pipeline.validate(make_config(cache, seq_len=0))
    with pytest.raises(ValueError, match="process count 3"):
        pipeline.validate(make_config(cache), process_count=3)
    pipeline.validate(make_config(cache), process_count=2)
