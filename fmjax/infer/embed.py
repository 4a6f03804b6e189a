"""Text embeddings from an encoder: tokenize, run the encoder, pool (mean or CLS), L2-normalise.

Rows are padded to a length bucket (a multiple of 32) so a file of texts compiles a few shapes,
not one per batch. Shapes: B batch, L sequence, D model width.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.models.encoder import Encoder, EncoderConfig, pool

_BUCKET = 32


def tokenize(tokenizer, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
    """[bos] text [eos] per row (BERT: [CLS] ... [SEP]), truncated to max_len, padded with segment id 0."""
    rows = [[tokenizer.bos_id] + tokenizer.encode(t)[:max_len - 2] + [tokenizer.eos_id] for t in texts]
    length = min(max_len, -(-max(len(r) for r in rows) // _BUCKET) * _BUCKET)
    inputs = np.full((len(rows), length), tokenizer.pad_id, np.int32)
    segment_ids = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        inputs[i, :len(row)] = row
        segment_ids[i, :len(row)] = 1
    return {"inputs": inputs, "segment_ids": segment_ids}


@functools.lru_cache(maxsize=16)
def _embed_fn(model_config: EncoderConfig, pooling: str, normalize: bool):
    """One compiled function per (model, pooling, normalize), not one per call."""
    encoder = Encoder(model_config)

    @jax.jit
    def run(params, inputs_BxL, segment_ids_BxL):
        hidden_BxLxD = encoder.apply({"params": params}, inputs_BxL, segment_ids_BxL)
        pooled_BxD = pool(hidden_BxLxD, segment_ids_BxL, pooling)
        if normalize:
            pooled_BxD = pooled_BxD / jnp.maximum(jnp.linalg.norm(pooled_BxD, axis=-1, keepdims=True), 1e-12)
        return pooled_BxD

    return run


def embed_texts(model_config: EncoderConfig, encoder_params, tokenizer, texts: Sequence[str], *,
                pooling: str = "mean", normalize: bool = True, batch_size: int = 32,
                max_len: int | None = None) -> np.ndarray:
    """float32 [len(texts), D]; `encoder_params` is the `encoder` subtree of an MLM/classifier model."""
    max_len = max_len or model_config.max_len
    if not 2 <= max_len <= model_config.max_len:
        raise ValueError(f"max_len={max_len}: must be in [2, model.max_len={model_config.max_len}] "
                         "(the learned position table)")
    run = _embed_fn(model_config, pooling, normalize)
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        batch = tokenize(tokenizer, chunk + [""] * (batch_size - len(chunk)), max_len)  # fixed B
        out.append(np.asarray(run(encoder_params, batch["inputs"], batch["segment_ids"]))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, model_config.width), np.float32)
