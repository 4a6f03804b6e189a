"""Log-likelihoods of continuations under a decoder: the one place benchmark numbers come from.

The multiple-choice harness (fmjax.eval.harness), the perplexity datasets (fmjax.eval.datasets)
and the lm-evaluation-harness adapter (fmjax.eval.lm_eval_adapter) all score through `Scorer`,
so they agree by construction.

A request is (context_ids, continuation_ids): the log-probability of the continuation tokens
given the context, summed, and whether greedy decoding would have produced exactly them. Rows
are context + continuation truncated from the left to max_len + 1 tokens (the continuation must
fit), padded to a power-of-two length (few compiles), batched `batch_size` rows at a time in
order of length, and placed with the run's batch sharding (the data-parallel axes), so scoring
is sharded like training. Text is turned into requests the way lm-evaluation-harness does it:
trailing spaces of the context move to the continuation, and the continuation's tokens are those
of encode(context + continuation) after encode(context), so a word keeps its word-start piece.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.infer import generate as generate_lib

Request = tuple[Sequence[int], Sequence[int]]
_MIN_ROW = 16


def token_logprobs(logits_BxLxV, targets_BxL):
    """(log p(target) per position, whether the target is the argmax), in float32."""
    logits = logits_BxLxV.astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    target_BxL = jnp.take_along_axis(logprobs, targets_BxL[..., None], axis=-1)[..., 0]
    return target_BxL, jnp.argmax(logits, axis=-1) == targets_BxL


def row_length(n: int, max_len: int) -> int:
    """Padded input length of a row of n inputs: a power of two (at least 16), at most max_len."""
    return min(max(_MIN_ROW, 1 << max(n - 1, 0).bit_length()), max_len)


@dataclasses.dataclass
class Scorer:
    """Scores requests with `model` (a DecoderLM) at `params`, under the current mesh and rules.

    max_len: the most input tokens a row holds (contexts are cut from the left to fit);
    batch_size: rows per forward pass, a multiple of the data-parallel size.
    """
    model: nn.Module
    params: object
    tokenizer: object
    max_len: int
    batch_size: int
    batch_sharding: jax.sharding.NamedSharding | None = None  # e.g. loop.Run.batch_sharding

    def __post_init__(self):
        out = None if self.batch_sharding is None else jax.sharding.NamedSharding(
            self.batch_sharding.mesh, jax.sharding.PartitionSpec())
        self._score = jax.jit(self._score_rows, out_shardings=out)  # replicated: every process reads all

    def _score_rows(self, params, inputs_BxL, targets_BxL, mask_BxL):
        positions = jnp.broadcast_to(jnp.arange(inputs_BxL.shape[1], dtype=jnp.int32), inputs_BxL.shape)
        segments = (positions < jnp.sum(mask_BxL > -1, axis=1, keepdims=True)).astype(jnp.int32)
        logits = self.model.apply({"params": params}, inputs_BxL, positions, segments)
        logprob_BxL, greedy_BxL = token_logprobs(logits, targets_BxL)
        scored = mask_BxL > 0
        return jnp.sum(jnp.where(scored, logprob_BxL, 0.0), axis=1), jnp.all(greedy_BxL | ~scored, axis=1)

    def _row(self, request: Request) -> tuple[np.ndarray, int]:
        """(tokens, n_continuation): context + continuation cut from the left to max_len + 1."""
        context, continuation = list(request[0]), list(request[1])
        if not continuation:
            raise ValueError("a scoring request needs at least one continuation token")
        if len(continuation) > self.max_len:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit in max_len="
                             f"{self.max_len} (a longer data.seq_len or shorter answers)")
        if not context:
            raise ValueError("a scoring request needs at least one context token (e.g. bos)")
        tokens = (context + continuation)[-(self.max_len + 1):]
        return np.asarray(tokens, np.int32), len(continuation)

    def loglikelihood(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), greedy) per request, in the order given."""
        rows = [self._row(r) for r in requests]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = row_length(len(rows[chunk[0]][0]) - 1, self.max_len)
            inputs, targets = (np.zeros((self.batch_size, width), np.int32) for _ in range(2))
            mask = np.full((self.batch_size, width), -1.0, np.float32)  # -1: padding, 0: context, 1: scored
            for r, i in enumerate(chunk):
                tokens, n_scored = rows[i]
                n = len(tokens) - 1
                inputs[r, :n], targets[r, :n] = tokens[:-1], tokens[1:]
                mask[r, :n] = 0.0
                mask[r, n - n_scored:n] = 1.0
            batch = [a if self.batch_sharding is None else
                     # every process builds the same rows, so each can fill its own shards
                     jax.make_array_from_callback(a.shape, self.batch_sharding, lambda index, a=a: a[index])
                     for a in (inputs, targets, mask)]
            logprob_B, greedy_B = jax.device_get(self._score(self.params, *batch))
            for r, i in enumerate(chunk):
                results[i] = (float(logprob_B[r]), bool(greedy_B[r]))
        return results

    def text_requests(self, pairs: Sequence[tuple[str, str]]) -> list[Request]:
        """(context, continuation) strings -> token requests; the context starts with bos."""
        requests = []
        for context, continuation in pairs:
            spaces = len(context) - len(context.rstrip(" "))
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            context_ids = [self.tokenizer.bos_id] + self.tokenizer.encode(context) if context else [self.tokenizer.bos_id]
            whole = [self.tokenizer.bos_id] + self.tokenizer.encode(context + continuation)
            requests.append((context_ids, whole[len(context_ids):]))
        return requests

    def text_loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.loglikelihood(self.text_requests(pairs))

    def rolling_requests(self, text: str) -> list[Request]:
        """Disjoint windows covering encode(text), so every token is scored exactly once: each
        predicts up to max_len tokens given the tokens before it, as many as fit in a row (the
        first window sees [bos]; a full window one token; the last, partial one more), which is
        lm-evaluation-harness's rolling windows."""
        ids = [self.tokenizer.bos_id] + self.tokenizer.encode(text)
        return [(ids[max(start - self.max_len, 0):start], ids[start:start + self.max_len])
                for start in range(1, len(ids), self.max_len)]

    def rolling_loglikelihood(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        """(log p(text), tokens scored) per text, every token scored once (see rolling_requests)."""
        windows = [self.rolling_requests(t) for t in texts]
        scores = iter(self.loglikelihood([w for ws in windows for w in ws]))
        return [(sum(next(scores)[0] for _ in ws), sum(len(c) for _, c in ws)) for ws in windows]

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        """Greedy continuations of the prompts (without the prompt), cut at the first stop string;
        batch_size prompts at a time."""
        return [text for start in range(0, len(prompts), self.batch_size)
                for text in generate_lib.generate(self.model, self.params, self.tokenizer,
                                                  prompts[start:start + self.batch_size],
                                                  max_new_tokens=max_new_tokens, stop=stop,
                                                  continuation_only=True)]

