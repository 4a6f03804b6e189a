"""Text embeddings from an encoder: tokenize, run the encoder, pool (mean or CLS), L2-normalise.

`mode=embed` embeds `task.embed_input` (.txt: one text per line; .jsonl: `data.text_field` of each
line) into `task.embed_output` (.npy, float32 N x D; default WORKDIR/embeddings.npy).

Rows are padded to a length bucket (a multiple of 32) so a file of texts compiles a few shapes,
not one per batch. Shapes: B batch, L sequence, D model width.
"""
from __future__ import annotations

import functools
import json
import os
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


POOLINGS = ("mean", "cls")


def validate(config) -> None:
    """mode=embed settings, checked before any compilation."""
    if config.model.name != "encoder":
        raise ValueError(f"mode=embed needs an encoder (model.name='encoder'), not model.name={config.model.name!r}")
    if config.task.pooling not in POOLINGS:
        raise ValueError(f"task.pooling={config.task.pooling!r}; valid: {list(POOLINGS)}")
    path = config.task.embed_input
    if not path or not os.path.isfile(path):
        raise ValueError(f"task.embed_input={path!r}: mode=embed needs an existing .txt or .jsonl file")
    if config.task.embed_output and not config.task.embed_output.endswith(".npy"):
        raise ValueError(f"task.embed_output={config.task.embed_output!r} must end in .npy")


def read_texts(path: str, text_field: str) -> list[str]:
    """.jsonl: each line's `text_field`; anything else: one text per non-empty line."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    texts.append(str(json.loads(line)[text_field]))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{number}: expected a JSON object with a {text_field!r} "
                                     f"field ({e.__class__.__name__}: {e})") from None
            else:
                texts.append(line.rstrip("\n"))
    return texts
