"""Encoder: a BERT-style bidirectional transformer (pure flax.linen), with MLM and classifier heads.

Token + learned position + token-type embeddings, LayerNorm, then post-LN (BERT) or pre-LN blocks
of bidirectional attention and a GELU MLP, all with biases. Packed documents never attend to each
other and padding (segment id 0) never reaches a real token. Parameter names follow Hugging Face
BERT closely enough that fmjax.interop maps them one to one.
Shapes: B batch, L sequence, D model width, V vocabulary, C classes.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from fmjax.models.decoder import DTYPES, REMAT_POLICIES, ModelConfig
from fmjax.nn.attention import Attention
from fmjax.nn.dense import dense
from fmjax.nn.embed import token_embedding
from fmjax.nn.mlp import GeluMLP
from fmjax.nn.norm import LayerNorm

NORMS = ("post", "pre")
POSITIONS = ("learned", "rope")


@dataclasses.dataclass(frozen=True)
class EncoderConfig(ModelConfig):
    vocab_size: int
    width: int
    n_layers: int
    n_heads: int
    head_dim: int
    mlp_dim: int
    max_len: int = 512  # longest input: rows of the learned position table
    positions: str = "learned"  # learned (BERT's table) | rope (rotary, as in ModernBERT)
    rope_theta: float = 10_000.0
    type_vocab_size: int = 2  # token types (sentence A / B)
    norm: str = "post"  # post: BERT; pre: pre-LN blocks plus a final LayerNorm
    norm_eps: float = 1e-12
    dropout: float = 0.0  # on embeddings and on each residual branch, training only
    dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    attention: str = "xla"

    def checks(self):
        return [
            (self.norm in NORMS, f"model.norm={self.norm!r}; valid: {list(NORMS)}"),
            (self.positions in POSITIONS, f"model.positions={self.positions!r}; valid: {list(POSITIONS)}"),
            (0 <= self.dropout < 1, f"model.dropout={self.dropout} must be in [0, 1)"),
        ]

    def param_count(self, embeddings: bool = True) -> int:
        d, f = self.width, self.mlp_dim
        attn = 4 * d * self.n_heads * self.head_dim + 3 * self.n_heads * self.head_dim + d
        per_layer = attn + 2 * d * f + f + d + 4 * d
        total = self.n_layers * per_layer + 2 * d + (2 * d if self.norm == "pre" else 0)
        if embeddings:
            table = self.max_len if self.positions == "learned" else 0
            total += (self.vocab_size + table + self.type_vocab_size) * d
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6*N over the matmul parameters + full (bidirectional) attention."""
        matmul_params = self.n_layers * (4 * self.width * self.n_heads * self.head_dim
                                         + 2 * self.width * self.mlp_dim)
        attention = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
        return 6.0 * matmul_params + attention


class EncoderBlock(nn.Module):
    config: EncoderConfig
    deterministic: bool = True  # False: dropout on (training)

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL):
        cfg = self.config
        dtype = DTYPES[cfg.dtype]
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        attention = Attention(cfg.n_heads, cfg.n_heads, cfg.head_dim, cfg.rope_theta, cfg.attention, dtype,
                              causal=False, rope=cfg.positions == "rope", use_bias=True, name="attn")
        mlp = GeluMLP(cfg.mlp_dim, dtype, name="mlp")
        if cfg.norm == "post":
            h = attention(x_BxLxD, positions_BxL, segment_ids_BxL)
            x_BxLxD = LayerNorm(cfg.norm_eps, dtype, name="attn_norm")(x_BxLxD + drop(h))
            h = mlp(x_BxLxD)
            x_BxLxD = LayerNorm(cfg.norm_eps, dtype, name="mlp_norm")(x_BxLxD + drop(h))
        else:
            h = attention(LayerNorm(cfg.norm_eps, dtype, name="attn_norm")(x_BxLxD), positions_BxL,
                          segment_ids_BxL)
            x_BxLxD = x_BxLxD + drop(h)
            x_BxLxD = x_BxLxD + drop(mlp(LayerNorm(cfg.norm_eps, dtype, name="mlp_norm")(x_BxLxD)))
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("act_batch", "act_seq", "act_embed"))
        return x_BxLxD, None


class Encoder(nn.Module):
    """Token ids -> contextual hidden states B x L x D (float32)."""
    config: EncoderConfig
    deterministic: bool = True  # False: dropout on (training)

    def setup(self):
        cfg = self.config
        dtype = DTYPES[cfg.dtype]
        self.token_embed = token_embedding(cfg.vocab_size, cfg.width, dtype, name="token_embed")
        table_init = nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("table", "embed"))
        if cfg.positions == "learned":
            self.position_embed = nn.Embed(cfg.max_len, cfg.width, dtype=dtype, param_dtype=jnp.float32,
                                           embedding_init=table_init)
        self.type_embed = nn.Embed(cfg.type_vocab_size, cfg.width, dtype=dtype, param_dtype=jnp.float32,
                                   embedding_init=table_init)
        self.embed_norm = LayerNorm(cfg.norm_eps, dtype)
        self.embed_dropout = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        block = EncoderBlock
        if cfg.remat != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(block, variable_axes={"params": 0},
                                  split_rngs={"params": True, "dropout": True},
                                  in_axes=(nn.broadcast, nn.broadcast), length=cfg.n_layers,
                                  metadata_params={nn.PARTITION_NAME: "layers"})(cfg, self.deterministic)
        else:
            self.layers = [block(cfg, self.deterministic, name=f"layers_{i}") for i in range(cfg.n_layers)]
        if cfg.norm == "pre":
            self.final_norm = LayerNorm(cfg.norm_eps, dtype)

    def __call__(self, inputs_BxL, segment_ids_BxL=None, positions_BxL=None, token_types_BxL=None):
        """segment_ids: packed document ids, 0 = padding (default: ones); positions restart per document."""
        cfg = self.config
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones_like(inputs_BxL)
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(inputs_BxL.shape[1]), inputs_BxL.shape)
        if token_types_BxL is None:
            token_types_BxL = jnp.zeros_like(inputs_BxL)
        x_BxLxD = self.token_embed(inputs_BxL) + self.type_embed(token_types_BxL)
        if cfg.positions == "learned":
            x_BxLxD = x_BxLxD + self.position_embed(positions_BxL)
        x_BxLxD = self.embed_norm(x_BxLxD)
        x_BxLxD = self.embed_dropout(x_BxLxD)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("act_batch", "act_seq", "act_embed"))
        if cfg.scan_layers:
            x_BxLxD, _ = self.layers(x_BxLxD, positions_BxL, segment_ids_BxL)
        else:
            for layer in self.layers:
                x_BxLxD, _ = layer(x_BxLxD, positions_BxL, segment_ids_BxL)
        if cfg.norm == "pre":
            x_BxLxD = self.final_norm(x_BxLxD)
        return x_BxLxD.astype(jnp.float32)

    def attend(self, x_BxLxD):
        """Hidden states -> vocabulary logits through the (tied) token embedding."""
        return self.token_embed.attend(x_BxLxD)


class EncoderMLM(nn.Module):
    """Encoder + BERT's masked-LM head (dense, GELU, LayerNorm, tied output embedding + bias)."""
    config: EncoderConfig

    @nn.compact
    def __call__(self, inputs_BxL, segment_ids_BxL=None, positions_BxL=None, token_types_BxL=None,
                 deterministic: bool = True):
        cfg = self.config
        dtype = DTYPES[cfg.dtype]
        encoder = Encoder(cfg, deterministic, name="encoder")
        h_BxLxD = encoder(inputs_BxL, segment_ids_BxL, positions_BxL, token_types_BxL)
        h_BxLxD = dense(cfg.width, ("embed", "embed_out"), dtype, "mlm_transform", use_bias=True)(h_BxLxD)
        h_BxLxD = LayerNorm(cfg.norm_eps, dtype, name="mlm_norm")(nn.gelu(h_BxLxD, approximate=False))
        bias = self.param("mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                          (cfg.vocab_size,), jnp.float32)
        logits_BxLxV = encoder.attend(h_BxLxD.astype(dtype)) + bias.astype(dtype)[None, None]
        logits_BxLxV = nn.with_logical_constraint(logits_BxLxV, ("act_batch", "act_seq", "act_vocab"))
        return logits_BxLxV.astype(jnp.float32)


def pool(hidden_BxLxD, segment_ids_BxL, method: str):
    """One vector per row: `cls` (first token) or `mean` over the non-padding tokens."""
    if method == "cls":
        return hidden_BxLxD[:, 0]
    if method == "mean":
        mask_BxLx1 = (segment_ids_BxL > 0).astype(hidden_BxLxD.dtype)[..., None]
        return jnp.sum(hidden_BxLxD * mask_BxLx1, axis=1) / jnp.maximum(jnp.sum(mask_BxLx1, axis=1), 1.0)
    raise ValueError(f"pooling={method!r}; valid: ['cls', 'mean']")


class EncoderClassifier(nn.Module):
    """Encoder + pooled vector (BERT's tanh pooler on CLS, or the mean) + linear classifier."""
    config: EncoderConfig
    n_classes: int
    pooling: str = "cls"

    @nn.compact
    def __call__(self, inputs_BxL, segment_ids_BxL=None, positions_BxL=None, token_types_BxL=None,
                 deterministic: bool = True):
        cfg = self.config
        dtype = DTYPES[cfg.dtype]
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones_like(inputs_BxL)
        h_BxLxD = Encoder(cfg, deterministic, name="encoder")(inputs_BxL, segment_ids_BxL, positions_BxL,
                                                              token_types_BxL)
        pooled_BxD = pool(h_BxLxD, segment_ids_BxL, self.pooling)
        if self.pooling == "cls":
            pooled_BxD = jnp.tanh(dense(cfg.width, ("embed", "embed_out"), dtype, "pooler", use_bias=True)(pooled_BxD))
        pooled_BxD = nn.Dropout(cfg.dropout, deterministic=deterministic)(pooled_BxD)
        logits_BxC = dense(self.n_classes, ("embed", "classes"), dtype, "classifier", use_bias=True)(pooled_BxD)
        return logits_BxC.astype(jnp.float32)
