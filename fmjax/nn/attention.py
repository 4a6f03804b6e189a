"""Grouped-query self-attention: causal with RoPE (decoder) or bidirectional (encoder), packed-segment masking.

Shapes: B batch, L sequence (queries), S sequence (keys), D model width, N query heads,
K key/value heads (N % K == 0), E head dim.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.nn.dense import dense
from fmjax.nn.rope import apply_rope

IMPLEMENTATIONS = ("xla", "cudnn")


def segment_mask(segment_ids_BxL):
    """True where query l and key s lie in the same packed document (causality is separate)."""
    return (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])[:, None]  # B x 1 x L x S


class Attention(nn.Module):
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float = 10_000.0
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    causal: bool = True
    rope: bool = True  # False: positions come from a learned table before the blocks (BERT)
    use_bias: bool = False

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL):
        width = x_BxLxD.shape[-1]
        n, k, e = self.n_heads, self.n_kv_heads, self.head_dim
        bias = self.use_bias
        q_BxLxNxE = dense((n, e), ("embed", "heads", "head_dim"), self.dtype, "query", use_bias=bias)(x_BxLxD)
        k_BxSxKxE = dense((k, e), ("embed", "kv_heads", "head_dim"), self.dtype, "key", use_bias=bias)(x_BxLxD)
        v_BxSxKxE = dense((k, e), ("embed", "kv_heads", "head_dim"), self.dtype, "value", use_bias=bias)(x_BxLxD)
        if self.rope:
            q_BxLxNxE = apply_rope(q_BxLxNxE, positions_BxL, self.rope_theta)
            k_BxSxKxE = apply_rope(k_BxSxKxE, positions_BxL, self.rope_theta)
        q_BxLxNxE = nn.with_logical_constraint(q_BxLxNxE, ("act_batch", "act_seq", "act_heads", None))
        k_BxSxKxE = nn.with_logical_constraint(k_BxSxKxE, ("act_batch", "act_seq", "act_kv_heads", None))
        v_BxSxKxE = nn.with_logical_constraint(v_BxSxKxE, ("act_batch", "act_seq", "act_kv_heads", None))
        # is_causal lets cuDNN skip the upper triangle; XLA folds it into the segment mask.
        out_BxLxNxE = jax.nn.dot_product_attention(
            q_BxLxNxE, k_BxSxKxE, v_BxSxKxE, mask=segment_mask(segment_ids_BxL), is_causal=self.causal,
            implementation=self.implementation)
        out_BxLxNxE = nn.with_logical_constraint(out_BxLxNxE, ("act_batch", "act_seq", "act_heads", None))
        return dense(width, ("heads", "head_dim", "embed"), self.dtype, "out", n_contract=2,
                     use_bias=bias)(out_BxLxNxE)
