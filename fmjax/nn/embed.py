"""Token embedding table, usable as the tied output projection."""
import flax.linen as nn
import jax.numpy as jnp


def token_embedding(vocab_size: int, width: int, dtype, name: str = "embed") -> nn.Embed:
    return nn.Embed(
        num_embeddings=vocab_size, features=width, dtype=dtype, param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                                    ("vocab", "embed")),
        name=name)
