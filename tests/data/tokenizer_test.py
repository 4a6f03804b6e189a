"""Tests for fmjax.data.tokenizer: exact round trips, special ids, byte counts, caching."""

import ml_collections
import numpy as np
import pytest

from fmjax.data import sources
from tests.data.common import cache, data_config  # noqa: F401  (cache is a fixture)
from fmjax.data import tokenizer as tokenizer_lib


def make_config(cache_dir, vocab_size=512, **data) -> ml_collections.ConfigDict:
    return data_config(cache_dir, vocab_size, **data)


@pytest.fixture(scope="module")
def tokenizer(cache):
    return tokenizer_lib.get_tokenizer(make_config(cache))


@pytest.fixture(scope="module")
def val_texts(cache):
    source = sources.load_split(make_config(cache), "validation")
    return [source[i]["text"] for i in range(len(source))]


SAMPLES = ["hello world", "  indented code:\n    return x\n", "\nstarts with a newline",
           "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f389", "x", "tabs\tand  double  spaces "]


def test_round_trip_is_exact(tokenizer, val_texts):
    for text in val_texts + SAMPLES:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(np.array(tokenizer.encode("numpy ids"))) == "numpy ids"


def test_compresses_held_out_pydoc_text(tokenizer, val_texts):
    text = "\n\n".join(val_texts)
    assert len(text.encode()) / len(tokenizer.encode(text)) > 2.0


def test_special_ids(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert tokenizer.mask_id == 4 and tokenizer.decode([4]) == ""
    assert tokenizer.vocab_size == 512
    assert tokenizer.decode([tokenizer.bos_id, *tokenizer.encode("hi"), tokenizer.eos_id,
                             tokenizer.pad_id]) == "hi"
    ids = tokenizer.encode("\n\n".join(SAMPLES))
    assert min(ids) > 8  # Byte fallback: never unk, never a control id (mask, chat markers).
    chat = [tokenizer.piece_id(p) for p in tokenizer_lib.CHAT_PIECES]
    assert chat == [5, 6, 7, 8] and tokenizer.decode(chat) == ""
    assert not set(chat) & set(tokenizer.encode("<|user|> hi <|end|>"))  # text cannot forge a turn


def test_token_bytes_count_utf8_bytes_plus_dummy_prefix(tokenizer, val_texts):
    tb = tokenizer.token_bytes
    assert tb.shape == (512,) and tb.dtype == np.int32
    assert list(tb[:9]) == [0] * 9
    assert list(tb[9:9 + 256]) == [1] * 256  # <0x00> .. <0xFF>
    for text in val_texts + SAMPLES:
        # Sentencepiece prepends one "\u2581" (the dummy prefix) to every non-empty text.
        assert tb[tokenizer.encode(text)].sum() == len(text.encode()) + 1, text
    assert tokenizer.encode("") == []


def test_word_starts(tokenizer):
    ids = tokenizer.encode("the value of x")
    starts = [i for i in ids if tokenizer.word_start[i]]
    assert len(starts) == 4 and tokenizer.word_start[ids[0]]


def test_cache_hit_returns_same_file(cache, tokenizer):
    path = tokenizer_lib.tokenizer_path(make_config(cache))
    mtime = path.stat().st_mtime_ns
    again = tokenizer_lib.get_tokenizer(make_config(cache))
    assert again.path == tokenizer.path == str(path)
    assert path.stat().st_mtime_ns == mtime
    assert tokenizer_lib.tokenizer_path(make_config(cache, vocab_size=600)) != path
    assert tokenizer_lib.tokenizer_path(make_config(cache, tokenizer_type="unigram")) != path


def test_training_is_deterministic(tmp_path, tokenizer):
    other = tokenizer_lib.get_tokenizer(make_config(tmp_path))
    assert other.path != tokenizer.path
    with open(other.path, "rb") as a, open(tokenizer.path, "rb") as b:
        assert a.read() == b.read()


def test_unigram(tmp_path):
    tok = tokenizer_lib.get_tokenizer(make_config(tmp_path, tokenizer_type="unigram"))
    assert tok.vocab_size == 512
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text


def test_configured_tokenizer_must_match_vocab_size(cache, tokenizer):
    config = make_config(cache, tokenizer=tokenizer.path)
    assert tokenizer_lib.get_tokenizer(config).path == tokenizer.path
    config = make_config(cache, vocab_size=1024, tokenizer=tokenizer.path)
    with pytest.raises(ValueError, match=r"data.tokenizer=.* has 512 pieces but "
                       r"model.vocab_size=1024"):
        tokenizer_lib.get_tokenizer(config)
    with pytest.raises(ValueError, match="data.tokenizer: .* does not exist"):
        tokenizer_lib.validate(make_config(cache, tokenizer=str(cache / "missing.model")))


def test_user_errors(tmp_path):
    with pytest.raises(ValueError, match=r"data.tokenizer_type='wordpiece'.*\['bpe', 'unigram'\]"):
        tokenizer_lib.validate(make_config(tmp_path, tokenizer_type="wordpiece"))
    with pytest.raises(ValueError, match="model.vocab_size=100 is too small"):
        tokenizer_lib.validate(make_config(tmp_path, vocab_size=100))
    with pytest.raises(ValueError, match=r"model.vocab_size=40000 .*value <= \d+"):
        tokenizer_lib.get_tokenizer(make_config(tmp_path, vocab_size=40000))
