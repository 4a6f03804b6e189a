"""Optax optimizer and learning-rate schedule from `config.optim`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fmjax.config_lib import steps


def schedule(config) -> optax.Schedule:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at train.steps."""
    total = config.train.steps
    warmup = steps(config.optim.warmup, total)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.optim.lr, warmup_steps=warmup,
        decay_steps=max(total, warmup + 1), end_value=config.optim.lr * config.optim.min_lr_ratio)


def _decay_mask(params):
    """Weight decay on matrices only: norms' scales and biases are not decayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def optimizer(config, trainable=None) -> optax.GradientTransformation:
    """AdamW with clipping, its first moment in optim.mu_dtype; with `trainable` (params -> bool
    tree, e.g. a task's frozen base or reference model), only the True leaves are updated and have
    optimizer state; the others get zero updates and no state (optax.set_to_zero)."""
    o = config.optim
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    parts.append(optax.adamw(schedule(config), b1=o.b1, b2=o.b2, eps=o.eps, mu_dtype=jnp.dtype(o.mu_dtype),
                             weight_decay=o.weight_decay, mask=_decay_mask))
    tx = optax.chain(*parts)
    if trainable is None:
        return tx
    return optax.multi_transform(
        {"train": tx, "frozen": optax.set_to_zero()},
        lambda params: jax.tree.map(lambda t: "train" if t else "frozen", trainable(params)))
