"""Scorer: log-likelihoods equal a numpy computation from the model's own logits, on one device
and sharded over 8; text requests split like lm-evaluation-harness; rolling windows score every
token once; perplexity datasets (fmjax.eval.datasets) follow from the same numbers."""
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from fmjax import sharding
from fmjax.eval import datasets, scoring
from tests.infer.generate_test import CharTokenizer, init


@pytest.fixture(scope="module")
def model_params():
    return init()


def numpy_logprobs(model, params, ids):
    """log p(ids[t] | ids[:t]) for t >= 1 from one forward pass over the whole sequence, in numpy."""
    inputs = np.asarray(ids[:-1], np.int32)[None]
    positions = np.arange(inputs.shape[1], dtype=np.int32)[None]
    logits = np.asarray(jax.jit(model.apply)({"params": params}, inputs, positions, np.ones_like(inputs)),
                        np.float64)[0]
    logits -= logits.max(-1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return logprobs[np.arange(len(ids) - 1), ids[1:]], logprobs.argmax(-1) == np.asarray(ids[1:])


REQUESTS = [([2, 5, 9, 11], [7, 8]), ([2], [40, 41, 42, 43, 44]), ([2, 30] + list(range(4, 24)), [9]),
            ([2, 6], [6, 6, 6])]


@pytest.mark.parametrize("sharded", [False, True])
def test_loglikelihood_equals_numpy_from_the_logits(model_params, sharded):
    model, params = model_params
    if sharded:  # rows over 8 devices: data=4 x fsdp=2
        mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
        rules = sharding.rules_from_config(sharding.DEFAULT_RULES)
        scorer = scoring.Scorer(model, params, CharTokenizer(), max_len=32, batch_size=8,
                                batch_sharding=sharding.batch_sharding(mesh, rules))
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            got = scorer.loglikelihood(REQUESTS)
    else:
        got = scoring.Scorer(model, params, CharTokenizer(), max_len=32, batch_size=8).loglikelihood(REQUESTS)
    for (context, continuation), (logprob, greedy) in zip(REQUESTS, got):
        ref, argmax_hits = numpy_logprobs(model, params, context + continuation)
        n = len(continuation)
        np.testing.assert_allclose(logprob, ref[-n:].sum(), rtol=1e-5, atol=1e-5)
        assert greedy == bool(argmax_hits[-n:].all())


def test_contexts_are_cut_from_the_left_to_max_len(model_params):
    model, params = model_params
    scorer = scoring.Scorer(model, params, CharTokenizer(), max_len=8, batch_size=2)
    context, continuation = [2] + list(range(4, 24)), [30, 31]
    (logprob, _), = scorer.loglikelihood([(context, continuation)])
    ref, _ = numpy_logprobs(model, params, (context + continuation)[-9:])  # 8 inputs, 9 tokens
    np.testing.assert_allclose(logprob, ref[-2:].sum(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit in max_len=8"):
        scorer.loglikelihood([([2], list(range(4, 13)))])


class SpaceTokenizer(CharTokenizer):
    """Word-start pieces as sentencepiece: a space belongs to the character after it."""

    def encode(self, text):
        return [60 if c == " " else 4 + ord(c) % 50 for c in text]


def test_text_requests_move_trailing_spaces_and_split_the_whole_encoding():
    scorer = scoring.Scorer(None, None, SpaceTokenizer(), max_len=32, batch_size=2)
    tok = SpaceTokenizer()
    (context, continuation), = scorer.text_requests([("The sky is ", "blue")])
    assert context == [2] + tok.encode("The sky is")
    assert continuation == tok.encode(" blue")
    (context, continuation), = scorer.text_requests([("", "hello")])
    assert context == [2] and continuation == tok.encode("hello")


def test_rolling_windows_score_every_token_once(model_params):
    model, params = model_params
    tok = CharTokenizer()
    text = "abcdefghijklmnopqrstu"  # 21 tokens: windows of 8, 8, 5
    scorer = scoring.Scorer(model, params, tok, max_len=8, batch_size=4)
    windows = scorer.rolling_requests(text)
    ids = [tok.bos_id] + tok.encode(text)
    assert [len(c) for _, c in windows] == [8, 8, 5]
    assert [t for _, c in windows for t in c] == ids[1:]
    assert [ctx[-4:] for ctx, _ in windows] == [[ids[0]], ids[5:9], ids[13:17]]
    assert [len(ctx) for ctx, _ in windows] == [1, 8, 8]  # rows keep 1, 1 and 4 of them (max_len + 1)
    (logprob, tokens), = scorer.rolling_loglikelihood([text])
    ref = sum(numpy_logprobs(model, params, ctx + c)[0][-len(c):].sum() for ctx, c in
              [([ids[0]], ids[1:9]), ([ids[8]], ids[9:17]), (ids[13:17], ids[17:])])
    assert tokens == 21
    np.testing.assert_allclose(logprob, ref, rtol=1e-5)


def test_dataset_perplexity_and_bits_per_byte_equal_numpy(model_params):
    """Acceptance: perplexity and bits per byte from an independent numpy computation."""
    model, params = model_params
    tok = CharTokenizer()
    docs = ["first document", "the second one is longer than that", "caf\u00e9 \u00fcber"]  # multi-byte chars
    scorer = scoring.Scorer(model, params, tok, max_len=64, batch_size=4)
    got = datasets.evaluate(docs, scorer)
    nats = tokens = 0
    for doc in docs:
        logprobs, _ = numpy_logprobs(model, params, [tok.bos_id] + tok.encode(doc))
        nats -= logprobs.sum()
        tokens += len(logprobs)
    num_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert got["tokens"] == tokens and got["bytes"] == num_bytes == sum(len(d) for d in docs) + 2
    np.testing.assert_allclose(got["perplexity"], math.exp(nats / tokens), rtol=1e-5)
    np.testing.assert_allclose(got["bits_per_byte"], nats / math.log(2) / num_bytes, rtol=1e-5)
    np.testing.assert_allclose(got["word_perplexity"], math.exp(nats / 11), rtol=1e-5)
    assert datasets.evaluate(docs, scorer, limit=1)["documents"] == 1
