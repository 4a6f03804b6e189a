"""Rotary position embeddings (RoPE), rotate-half convention (as in Llama / Hugging Face).

Shapes: B batch, L sequence, N heads, E head dim.
"""
import jax.numpy as jnp


def apply_rope(x_BxLxNxE, positions_BxL, theta: float = 10_000.0):
    head_dim = x_BxLxNxE.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_BxLxE2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq[None, None, :]
    sin = jnp.sin(angles_BxLxE2)[:, :, None, :]
    cos = jnp.cos(angles_BxLxE2)[:, :, None, :]
    x = x_BxLxNxE.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxNxE.dtype)
