"""Feed-forward blocks: SwiGLU (Llama) and GELU with biases (BERT).

Shapes: B batch, L sequence, D model width, F hidden width.
"""
import flax.linen as nn
import jax.numpy as jnp

from fmjax.nn.dense import dense


class SwiGLU(nn.Module):
    hidden_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD):
        width = x_BxLxD.shape[-1]
        gate_BxLxF = dense(self.hidden_dim, ("embed", "mlp"), self.dtype, "wi_gate")(x_BxLxD)
        up_BxLxF = dense(self.hidden_dim, ("embed", "mlp"), self.dtype, "wi_up")(x_BxLxD)
        h_BxLxF = nn.silu(gate_BxLxF) * up_BxLxF
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("act_batch", "act_seq", "act_mlp"))
        return dense(width, ("mlp", "embed"), self.dtype, "wo")(h_BxLxF)


class GeluMLP(nn.Module):
    hidden_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD):
        width = x_BxLxD.shape[-1]
        h_BxLxF = dense(self.hidden_dim, ("embed", "mlp"), self.dtype, "wi", use_bias=True)(x_BxLxD)
        h_BxLxF = nn.gelu(h_BxLxF, approximate=False)  # BERT's exact (erf) GELU
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("act_batch", "act_seq", "act_mlp"))
        return dense(width, ("mlp", "embed"), self.dtype, "wo", use_bias=True)(h_BxLxF)
