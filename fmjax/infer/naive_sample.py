"""Full-recompute sampling (no KV cache): simple and obviously right; one jitted loop per call.

Every prompt sits left-aligned in a fixed B x T buffer; at each step the whole buffer is run
through the model and each row's next token is drawn from the logits at its own last position.
"""
from __future__ import annotations

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
    total = int(lengths.max()) + max_new_tokens
    buf = np.full((len(prompts), total), tokenizer.pad_id, np.int32)
    for row, ids in enumerate(encoded):
        buf[row, :len(ids)] = ids
    out = _generate(model, params, jnp.asarray(buf), jnp.asarray(lengths), max_new_tokens,
                    float(temperature), rng)
    out = np.asarray(out)
    texts = []
    for row, length in enumerate(lengths):
        new = out[row, length:length + max_new_tokens].tolist()
        if tokenizer.eos_id in new:
            new = new[:new.index(tokenizer.eos_id)]
        texts.append(tokenizer.decode(out[row, 1:length].tolist() + new))
    return texts


def _generate(model, params, buf_BxT, lengths_B, steps, temperature, rng):
    @jax.jit
    def run(params, buf_BxT, lengths_B, rng):
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

    return run(params, buf_BxT, lengths_B, rng)
