"""Full-recompute sampling (no KV cache): the reference that fmjax.infer.generate is tested and
benchmarked against (tests/infer/generate_test.py, experiments/bench/generate.py). Generation
everywhere else uses fmjax.infer.generate.

Every prompt sits left-aligned in a fixed B x T buffer; at each step the whole buffer is run
through the model and each row's next token is drawn from the logits at its own last position.
Simple and obviously right, and quadratic in the generated length.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def sample(model, params, tokenizer, prompts, max_new_tokens: int, temperature: float, rng) -> list[str]:
    """Each prompt followed by its continuation (up to eos), decoded as one text.

    Decoding prompt and continuation together keeps the space a sentencepiece word-start piece
    carries at the join.
    """
    encoded = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    lengths = np.array([len(e) for e in encoded], np.int32)
    buf = left_aligned(encoded, int(lengths.max()) + max_new_tokens, tokenizer.pad_id)
    out = np.asarray(generate_buffer(model, params, jnp.asarray(buf), jnp.asarray(lengths), rng,
                                     steps=max_new_tokens, temperature=float(temperature)))
    texts = []
    for row, length in enumerate(lengths):
        new = out[row, length:length + max_new_tokens].tolist()
        if tokenizer.eos_id in new:
            new = new[:new.index(tokenizer.eos_id)]
        texts.append(tokenizer.decode(out[row, 1:length].tolist() + new))
    return texts


def left_aligned(prompts, total: int, pad_id: int) -> np.ndarray:
    """B x total int32: each prompt at the start of its row, pad_id after."""
    buf = np.full((len(prompts), total), pad_id, np.int32)
    for row, ids in enumerate(prompts):
        buf[row, :len(ids)] = ids
    return buf


@functools.partial(jax.jit, static_argnames=("model", "steps", "temperature"))
def generate_buffer(model, params, buf_BxT, lengths_B, rng, *, steps: int, temperature: float):
    """buf_BxT with `steps` tokens written after each row's prompt (eos is not special here)."""
    rows = jnp.arange(buf_BxT.shape[0])

    def body(i, buf_BxT):
        logits_BxTxV = model.apply({"params": params}, buf_BxT)
        last_BxV = logits_BxTxV[rows, lengths_B + i - 1]
        if temperature > 0:
            token_B = jax.random.categorical(jax.random.fold_in(rng, i), last_BxV / temperature)
        else:
            token_B = jnp.argmax(last_BxV, axis=-1)
        return buf_BxT.at[rows, lengths_B + i].set(token_B.astype(buf_BxT.dtype))

    return jax.lax.fori_loop(0, steps, body, buf_BxT)
