"""Dense layers with logically partitioned float32 kernels kept in their full (multi-axis) shape.

flax's DenseGeneral initialises a flattened kernel, which cannot carry per-axis logical names
(e.g. embed x heads x head_dim); this one contracts `x` with the kernel as is.
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Dense(nn.Module):
    features: int | tuple[int, ...]
    kernel_axes: Sequence[str]  # logical names: contracted input axes, then output axes
    dtype: jnp.dtype = jnp.float32
    n_contract: int = 1  # how many trailing axes of x are contracted
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        features = self.features if isinstance(self.features, tuple) else (self.features,)
        in_shape = x.shape[x.ndim - self.n_contract:]
        n_in, n_out = len(in_shape), len(features)
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=tuple(range(n_in)),
                                                out_axis=tuple(range(n_in, n_in + n_out)))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.kernel_axes)),
                            in_shape + features, jnp.float32)
        x_axes = tuple(range(x.ndim - n_in, x.ndim))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                ((x_axes, tuple(range(n_in))), ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   tuple(self.kernel_axes[n_in:])),
                              features, jnp.float32)
            y = y + bias.astype(self.dtype).reshape((1,) * (y.ndim - len(features)) + features)
        return y


def dense(features, kernel_axes: Sequence[str], dtype, name: str, n_contract: int = 1,
          use_bias: bool = False) -> Dense:
    return Dense(features, tuple(kernel_axes), dtype, n_contract, use_bias, name=name)
