"""KV-cache generation for DecoderLM: prefill the prompts, then one jitted step per token.

Prompts are left-padded into one B x P block, so every row's next token goes to the same cache
slot; each row's RoPE positions start at 0 at its first real token, so its numbers are those of
the prompt run alone. `prefill` runs the block through the model once (filling a cache of P + N
slots) and draws the first new token; `decode` then feeds one token per row per step under
`lax.while_loop` until every row is done: eos, a stop sequence, or its max_new_tokens. Finished
rows keep stepping with the batch (their tokens are ignored).

Every setting a row may choose (temperature, top-k, top-p, key, token budget, eos, stop
sequences) is a per-row array inside the jitted functions, so one batch can mix requests.
Randomness: token i of a row is drawn with fold_in(row_key, i); a row's tokens depend on its
prompt, its settings and its key only, not on the other rows, the batch size or the padding (up
to float rounding, which padding and batch shapes can change in the last bits of the logits). A
scalar seed gives row r the key fold_in(PRNGKey(seed), r); one seed per prompt makes a row
independent of its position too.

P and N are rounded up to multiples of 16, the stop array to multiples of 4, and B to a power of
two (then to a multiple of the mesh's data-parallel size, when a mesh is set), so few shapes
compile.
Shapes: B batch (rows), P prompt block, N new-token budget, V vocabulary, S stop sequences,
M longest stop sequence.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.models.decoder import init_cache

LENGTH_BUCKET = 16
STOP_BUCKET = 4


@flax.struct.dataclass
class Requests:
    """What each row asks for (arrays over B)."""
    temperature_B: jax.Array  # 0: greedy
    top_k_B: jax.Array  # 0: off
    top_p_B: jax.Array  # 1: off
    key_B: jax.Array  # B x 2 uint32 PRNG keys
    max_new_B: jax.Array  # new-token budget (0: the row is done at once)
    eos_B: jax.Array  # the id that ends a row (-1: none)
    stops_BxSxM: jax.Array  # stop sequences, right-aligned, -1 before a shorter sequence and in unused ones


@flax.struct.dataclass
class DecodeState:
    cache: dict
    step: jax.Array  # new tokens drawn so far (scalar)
    prompt_len_B: jax.Array
    token_B: jax.Array  # the newest token: the next step's input
    tokens_BxN: jax.Array  # every new token
    recent_BxM: jax.Array  # the newest M tokens (-1 before the first), for the stop-sequence check
    done_B: jax.Array
    length_B: jax.Array  # once done: new tokens to keep (eos and a stop sequence excluded)
    stop_len_B: jax.Array  # length of the stop sequence that ended the row (0: none)


def filter_top_k_top_p(logits_BxV, top_k_B, top_p_B):
    """-inf outside each row's k most likely tokens and outside its nucleus (the fewest most likely
    tokens whose probability reaches top_p). top_k 0 and top_p 1 turn a filter off; ties at the
    boundary stay in."""
    vocab = logits_BxV.shape[-1]
    sorted_BxV = jnp.flip(jnp.sort(logits_BxV, axis=-1), axis=-1)
    k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, vocab), vocab)
    in_top_k_BxV = jnp.arange(vocab)[None, :] < k_B[:, None]
    sorted_BxV = jnp.where(in_top_k_BxV, sorted_BxV, -jnp.inf)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    in_nucleus_BxV = (mass_before_BxV < top_p_B[:, None]) | (top_p_B[:, None] >= 1.0)
    keep_BxV = in_top_k_BxV & in_nucleus_BxV
    threshold_B = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1)
    return jnp.where(logits_BxV >= threshold_B[:, None], logits_BxV, -jnp.inf)


def sample_tokens(logits_BxV, requests: Requests, step):
    """Token `step` of every row: argmax where temperature is 0, else a draw with fold_in(row key, step)."""
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    def draw():
        sampling_B = requests.temperature_B > 0
        temperature_B = jnp.where(sampling_B, requests.temperature_B, 1.0)
        logits = filter_top_k_top_p(logits_BxV / temperature_B[:, None], requests.top_k_B, requests.top_p_B)
        keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(requests.key_B, step)
        drawn_B = jax.vmap(jax.random.categorical)(keys_B, logits).astype(jnp.int32)
        return jnp.where(sampling_B, drawn_B, greedy_B)

    return jax.lax.cond(jnp.any(requests.temperature_B > 0), draw, lambda: greedy_B)


def matched_stop_length(recent_BxM, stops_BxSxM):
    """Length of the longest stop sequence that the newest tokens end with (0: none)."""
    real_BxSxM = stops_BxSxM >= 0
    lengths_BxS = jnp.sum(real_BxSxM, axis=-1)
    hit_BxS = jnp.all((stops_BxSxM == recent_BxM[:, None, :]) | ~real_BxSxM, axis=-1) & (lengths_BxS > 0)
    return jnp.max(jnp.where(hit_BxS, lengths_BxS, 0), axis=-1)


def record(state: DecodeState, token_B, requests: Requests) -> DecodeState:
    """Appends token `state.step` of every row and ends the rows it finishes."""
    i = state.step
    recent_BxM = jnp.concatenate([state.recent_BxM[:, 1:], token_B[:, None]], axis=1)
    stop_len_B = matched_stop_length(recent_BxM, requests.stops_BxSxM)
    eos_B = token_B == requests.eos_B
    finished_B = ~state.done_B & (eos_B | (stop_len_B > 0) | (i + 1 >= requests.max_new_B))
    kept_B = jnp.where(eos_B, i, i + 1 - stop_len_B)
    return state.replace(
        step=i + 1,
        token_B=token_B,
        tokens_BxN=jax.lax.dynamic_update_slice(state.tokens_BxN, token_B[:, None], (0, i)),
        recent_BxM=recent_BxM,
        done_B=state.done_B | finished_B,
        length_B=jnp.where(finished_B, kept_B, state.length_B),
        stop_len_B=jnp.where(finished_B & ~eos_B, stop_len_B, state.stop_len_B))


@functools.partial(jax.jit, static_argnames=("model", "new_tokens"))
def prefill(model, params, tokens_BxP, prompt_len_B, requests: Requests, *, new_tokens: int) -> DecodeState:
    """Runs the left-padded prompts through the model into a fresh cache of P + N slots; draws token 0."""
    rows, width = tokens_BxP.shape
    pad_B = width - prompt_len_B
    slots_P = jnp.arange(width)
    segment_ids_BxP = (slots_P[None, :] >= pad_B[:, None]).astype(jnp.int32)
    positions_BxP = jnp.maximum(slots_P[None, :] - pad_B[:, None], 0)
    logits_BxPxV, variables = model.apply(
        {"params": params, "cache": init_cache(model, rows, width + new_tokens)}, tokens_BxP,
        positions_BxP, segment_ids_BxP, decode=True, mutable=["cache"])
    zeros_B = jnp.zeros((rows,), jnp.int32)
    state = DecodeState(
        cache=variables["cache"], step=jnp.zeros((), jnp.int32), prompt_len_B=prompt_len_B, token_B=zeros_B,
        tokens_BxN=jnp.zeros((rows, new_tokens), jnp.int32),
        recent_BxM=jnp.full((rows, requests.stops_BxSxM.shape[-1]), -1, jnp.int32),
        done_B=requests.max_new_B <= 0, length_B=zeros_B, stop_len_B=zeros_B)
    return record(state, sample_tokens(logits_BxPxV[:, -1], requests, 0), requests)


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("state",))
def decode(model, params, state: DecodeState, requests: Requests, until=None) -> DecodeState:
    """One model step per token under lax.while_loop, until every row is done or N tokens are drawn
    (or `until` tokens, when given: the server decodes in chunks and hands out each row's tokens
    between them; a traced number, so every chunk runs one compiled loop)."""
    budget = state.tokens_BxN.shape[1]
    limit = budget if until is None else jnp.minimum(until, budget)

    def running(state):
        return (state.step < limit) & ~jnp.all(state.done_B)

    def step(state):
        position_Bx1 = (state.prompt_len_B + state.step - 1)[:, None]
        logits_Bx1xV, variables = model.apply(
            {"params": params, "cache": state.cache}, state.token_B[:, None], position_Bx1,
            jnp.ones_like(position_Bx1), decode=True, mutable=["cache"])
        token_B = sample_tokens(logits_Bx1xV[:, 0], requests, state.step)
        return record(state.replace(cache=variables["cache"]), token_B, requests)

    return jax.lax.while_loop(running, step, state)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pow2_bucket(n: int) -> int:
    return max(LENGTH_BUCKET, 1 << max(n - 1, 0).bit_length())


def batch_rows(n: int) -> int:
    """Rows for n prompts: a power of two, then a multiple of the current mesh's data-parallel size."""
    rows = 1 << max(n - 1, 0).bit_length()
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        axes = nn.logical_to_mesh_axes(("act_batch",))[0] or ()
        axes = (axes,) if isinstance(axes, str) else axes
        rows = _round_up(rows, math.prod(mesh.shape.get(a, 1) for a in axes))
    return rows


def per_row(value, n: int, name: str, dtype) -> np.ndarray:
    """A scalar for every prompt, or one value per prompt."""
    values = np.asarray(value, dtype)
    if values.ndim == 0:
        return np.full(n, values, dtype)
    if values.shape != (n,):
        raise ValueError(f"{name}: expected a number or one per prompt ({n}), got shape {values.shape}")
    return values


def row_keys(seed, n: int) -> np.ndarray:
    """n x 2 PRNG keys: fold_in(PRNGKey(seed), r) for an int seed, fold_in(seed, r) for a PRNG key,
    PRNGKey(seed[r]) for one int per prompt."""
    if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        seed = jax.random.key_data(seed)
    if np.ndim(seed) == 0:
        seed = jax.random.PRNGKey(int(seed))
    elif np.shape(seed) == (2,) and np.asarray(seed).dtype == np.uint32:  # a raw key, not two seeds
        pass
    else:
        return np.asarray(jax.vmap(jax.random.PRNGKey)(jnp.asarray(per_row(seed, n, "seed", np.int32))))
    return np.asarray(jax.vmap(jax.random.fold_in, in_axes=(None, 0))(seed, jnp.arange(n)))


def stop_array(stop_ids: Sequence[Sequence[int]], rows: int) -> np.ndarray:
    """rows x S x M: every row gets the same stop sequences, right-aligned, -1 filled; S and M are
    rounded up to multiples of STOP_BUCKET, so a few short stop sequences compile one shape."""
    return row_stop_array([stop_ids] * rows, rows)


def row_stop_array(row_stop_ids: Sequence[Sequence[Sequence[int]]], rows: int) -> np.ndarray:
    """rows x S x M as stop_array, with each row's own stop sequences (rows past the list get none)."""
    row_stop_ids = [[list(s) for s in stops] for stops in row_stop_ids]
    flat = [s for stops in row_stop_ids for s in stops]
    if any(not s for s in flat):
        raise ValueError(f"stop_ids: every stop sequence needs at least one token, got {row_stop_ids}")
    longest = _round_up(max([len(s) for s in flat] + [1]), STOP_BUCKET)
    stops_BxSxM = np.full((rows, _round_up(max([len(s) for s in row_stop_ids] + [1]), STOP_BUCKET), longest),
                          -1, np.int32)
    for r, stops in enumerate(row_stop_ids):
        for i, s in enumerate(stops):
            stops_BxSxM[r, i, longest - len(s):] = s
    return stops_BxSxM


def prepare_batch(prompts, *, max_new_tokens, eos_id: int | None, pad_id: int, temperature=0.0, top_k=0,
                  top_p=1.0, seed=0, stop_ids=(), row_stop_ids=None, pow2_lengths: bool = False):
    """(tokens_BxP left-padded, prompt_len_B, Requests, N) for prefill / decode; ValueError names a bad argument.

    row_stop_ids: one list of stop sequences per prompt, instead of stop_ids for every prompt.
    pow2_lengths: P and N rounded up to powers of two (at least LENGTH_BUCKET), not to multiples of
    LENGTH_BUCKET: a server that sees every length compiles a few shapes only.
    """
    n = len(prompts)
    if row_stop_ids is not None and len(row_stop_ids) != n:
        raise ValueError(f"row_stop_ids: expected one list of stop sequences per prompt ({n}), "
                         f"got {len(row_stop_ids)}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: every prompt needs at least one token (e.g. bos)")
    max_new = per_row(max_new_tokens, n, "max_new_tokens", np.int32)
    temperature = per_row(temperature, n, "temperature", np.float32)
    top_k = per_row(top_k, n, "top_k", np.int32)
    top_p = per_row(top_p, n, "top_p", np.float32)
    for name, values, valid, rule in [("max_new_tokens", max_new, max_new >= 0, ">= 0"),
                                      ("temperature", temperature, temperature >= 0, ">= 0"),
                                      ("top_k", top_k, top_k >= 0, ">= 0 (0: off)"),
                                      ("top_p", top_p, (top_p > 0) & (top_p <= 1), "in (0, 1] (1: off)")]:
        if not valid.all():
            raise ValueError(f"{name}={values[~valid].tolist()}: must be {rule}")
    rows = batch_rows(n)
    bucket = _pow2_bucket if pow2_lengths else functools.partial(_round_up, multiple=LENGTH_BUCKET)
    prompt_len = np.zeros(rows, np.int32)
    prompt_len[:n] = [len(p) for p in prompts]
    tokens = np.full((rows, bucket(int(prompt_len.max()))), pad_id, np.int32)
    for r, p in enumerate(prompts):
        tokens[r, tokens.shape[1] - len(p):] = p

    def padded(values, fill):  # batch-filling rows ask for nothing
        return np.concatenate([values, np.full(rows - n, fill, values.dtype)])

    requests = Requests(
        temperature_B=padded(temperature, 0), top_k_B=padded(top_k, 0), top_p_B=padded(top_p, 1),
        key_B=np.concatenate([row_keys(seed, n), np.zeros((rows - n, 2), np.uint32)]),
        max_new_B=padded(max_new, 0), eos_B=np.full(rows, -1 if eos_id is None else eos_id, np.int32),
        stops_BxSxM=stop_array(stop_ids, rows) if row_stop_ids is None else row_stop_array(row_stop_ids, rows))
    return tokens, prompt_len, requests, bucket(max(int(max_new.max()), 1))


def new_tokens_of(state: DecodeState, n: int, keep_stop: bool = False) -> list[list[int]]:
    """Each of the first n rows' new tokens, cut at eos (excluded) and at a stop sequence."""
    tokens, length, stop_len = jax.device_get((state.tokens_BxN, state.length_B, state.stop_len_B))
    return [tokens[r, :length[r] + (stop_len[r] if keep_stop else 0)].tolist() for r in range(n)]


def generate_ids(model, params, prompts: Sequence[Sequence[int]], *, max_new_tokens, eos_id: int | None,
                 pad_id: int, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop_ids: Sequence[Sequence[int]] = (),
                 keep_stop: bool = False) -> list[list[int]]:
    """Each prompt's new tokens (at most max_new_tokens), cut before eos and before the first stop sequence.

    temperature (0: greedy), top_k (0: off), top_p (1: off) and max_new_tokens take a number or one
    value per prompt; seed an int, a PRNG key or one int per prompt (see the module docstring).
    eos_id None: no eos. keep_stop=True keeps the stop sequence that ended a row. Runs under the
    current mesh and logical axis rules, if any (params may be sharded).
    """
    if not prompts:
        return []
    tokens, prompt_len, requests, budget = prepare_batch(
        prompts, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, stop_ids=stop_ids)
    state = prefill(model, params, tokens, prompt_len, requests, new_tokens=budget)
    state = decode(model, params, state, requests)
    return new_tokens_of(state, len(prompts), keep_stop)


def cut_at_stop(text: str, start: int, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string at or after `start`."""
    ends = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return text[:min(ends)] if ends else text


def generate(model, params, tokenizer, prompts: Sequence[str], *, max_new_tokens, temperature=0.0, top_k=0,
             top_p=1.0, seed=0, stop: Sequence[str] = (), continuation_only: bool = False) -> list[str]:
    """Each prompt followed by its continuation (up to eos or a stop string), decoded as one text
    (continuation_only: the continuation alone).

    The ids are [bos] + encode(prompt). Decoding prompt and continuation together keeps the space a
    sentencepiece word-start piece carries at the join. Stop strings are checked twice: as
    encode(stop) tokens inside the loop (ends a row early when the model produces exactly those
    tokens), and on the decoded continuation, cut at the first occurrence of any stop string
    (token boundaries may differ from encode(stop)'s).
    """
    if any(not s for s in stop):
        raise ValueError(f"stop: stop strings must be non-empty, got {list(stop)}")
    encoded = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    new = generate_ids(model, params, encoded, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                       pad_id=tokenizer.pad_id, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                       stop_ids=[tokenizer.encode(s) for s in stop], keep_stop=True)
    texts = []
    for ids, new_ids in zip(encoded, new):
        text, start = decode_continuation(tokenizer, ids[1:], new_ids, stop)
        texts.append(text[start:] if continuation_only else text)
    return texts


def decode_continuation(tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int],
                        stop: Sequence[str] = (), prompt_text: str | None = None) -> tuple[str, int]:
    """(prompt and continuation decoded as one text, cut at the first stop string of the
    continuation; where the continuation starts). prompt_text: decode(prompt_ids), if known."""
    text = tokenizer.decode(list(prompt_ids) + list(new_ids))
    # Where the continuation starts: the prompt's own text, unless the join merged bytes.
    prompt_text = tokenizer.decode(prompt_ids) if prompt_text is None else prompt_text
    start = len(os.path.commonprefix([text, prompt_text]))
    return cut_at_stop(text, start, stop), start
