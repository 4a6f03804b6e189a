"""DecoderLM: a Llama-style causal language model (pure flax.linen; no mesh, files or optimizer).

Token embedding, pre-RMSNorm blocks of grouped-query attention with RoPE and a SwiGLU MLP,
optional tied output embedding, layers scanned or unrolled, remat policy per config
(REMAT_POLICIES: what the backward pass keeps of each block's forward; the rest is recomputed).
`hidden_only=True` stops before the output projection, which output_logits then applies from the
parameters to any slice of the hidden states (a loss can project a few positions at a time).
Generation: `decode=True` runs the layers against a KV cache (the "cache" collection, see
fmjax.nn.attention and init_cache); fmjax.infer.generate drives it.
Shapes: B batch, L sequence, T cache slots, D model width, V vocabulary.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.nn.attention import CONTEXT, IMPLEMENTATIONS, Attention
from fmjax.nn.embed import token_embedding
from fmjax.nn.mlp import SwiGLU
from fmjax.nn.norm import RMSNorm

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = {
    "none": None,  # no remat: every activation is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # only each block's input is kept
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # the projections' outputs
    # ... and the attention output, so the backward pass recomputes the scores but not the
    # context (MaxText's minimal_with_context)
    "save_dots_and_context": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(CONTEXT)),
}


class ModelConfig:
    """What every model's frozen config dataclass shares: reading `config.model`, common checks."""

    @classmethod
    def from_config(cls, model_config):
        """The one place model hyperparameters are read from the config (`config.model`)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in model_config.items() if k in fields})

    def validate(self):
        # Fields several families share are checked here, each only where the family has it (a
        # U-Net has no `attention` implementation to choose).
        fields = {f.name for f in dataclasses.fields(self)}
        shared = {"dtype": sorted(DTYPES), "remat": sorted(REMAT_POLICIES), "attention": list(IMPLEMENTATIONS)}
        checks = [(getattr(self, name) in valid, f"model.{name}={getattr(self, name)!r}; valid: {valid}")
                  for name, valid in shared.items() if name in fields]
        for ok, message in [*checks, *self.checks()]:
            if not ok:
                raise ValueError(message)

    def checks(self) -> list[tuple[bool, str]]:
        """(condition, message naming the field) pairs of this model family."""
        return []


@dataclasses.dataclass(frozen=True)
class DecoderConfig(ModelConfig):
    vocab_size: int
    width: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    tie_embeddings: bool = False
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    attention: str = "xla"

    def checks(self):
        return [
            (self.n_heads % self.n_kv_heads == 0,
             f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}"),
            (self.head_dim % 2 == 0, f"model.head_dim={self.head_dim} must be even for RoPE"),
        ]

    def param_count(self, embeddings: bool = True) -> int:
        d, f = self.width, self.mlp_dim
        attn = d * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        total = self.n_layers * per_layer + d
        if embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6*N (matmul params incl. the output head) + causal attention.

        Causal attention counts half of the full L x L scores (as MaxText does):
        12 * layers * heads * head_dim * L / 2.
        """
        matmul_params = self.param_count(embeddings=False) + self.vocab_size * self.width
        attention = 6 * self.n_layers * self.n_heads * self.head_dim * seq_len
        return 6.0 * matmul_params + attention


class DecoderBlock(nn.Module):
    config: DecoderConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL):
        cfg = self.config
        dtype = DTYPES[cfg.dtype]
        h = RMSNorm(cfg.norm_eps, dtype, name="attn_norm")(x_BxLxD)
        h = Attention(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.attention,
                      dtype, name="attn")(h, positions_BxL, segment_ids_BxL, decode=self.decode)
        x_BxLxD = x_BxLxD + h
        h = RMSNorm(cfg.norm_eps, dtype, name="mlp_norm")(x_BxLxD)
        x_BxLxD = x_BxLxD + SwiGLU(cfg.mlp_dim, dtype, name="mlp")(h)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("act_batch", "act_seq", "act_embed"))
        return x_BxLxD, None


class DecoderLM(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, inputs_BxL, positions_BxL=None, segment_ids_BxL=None, decode: bool = False,
                 hidden_only: bool = False):
        """Returns float32 logits B x L x V (hidden_only: the final-normed hidden states B x L x D, in
        the compute dtype, that output_logits projects).

        decode=True (apply with mutable=["cache"] and a cache from init_cache): the L tokens are
        the next ones of each row; their keys and values join the cache at its current slots and
        they attend to everything cached before them. Positions must then be given.
        """
        cfg = self.config
        dtype = DTYPES[cfg.dtype]
        if decode and positions_BxL is None:
            raise ValueError("DecoderLM(decode=True) needs positions_BxL: a row's position is not its cache slot")
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(inputs_BxL.shape[1]), inputs_BxL.shape)
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones_like(inputs_BxL)
        embed = token_embedding(cfg.vocab_size, cfg.width, dtype)
        x_BxLxD = embed(inputs_BxL)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("act_batch", "act_seq", "act_embed"))

        block = DecoderBlock
        if cfg.remat != "none" and not decode:  # remat saves training memory; decoding has no backward pass
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            layers = nn.scan(block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                             in_axes=(nn.broadcast, nn.broadcast), length=cfg.n_layers,
                             metadata_params={nn.PARTITION_NAME: "layers"})
            x_BxLxD, _ = layers(cfg, decode, name="layers")(x_BxLxD, positions_BxL, segment_ids_BxL)
        else:
            for i in range(cfg.n_layers):
                x_BxLxD, _ = block(cfg, decode, name=f"layers_{i}")(x_BxLxD, positions_BxL, segment_ids_BxL)

        x_BxLxD = RMSNorm(cfg.norm_eps, dtype, name="final_norm")(x_BxLxD)
        if hidden_only:
            return x_BxLxD
        return _project(embed if cfg.tie_embeddings else _lm_head(cfg, "lm_head"), x_BxLxD)


def _lm_head(cfg: DecoderConfig, name: str | None = None) -> nn.Dense:
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    return nn.Dense(cfg.vocab_size, use_bias=False, dtype=DTYPES[cfg.dtype], param_dtype=jnp.float32,
                    kernel_init=nn.with_logical_partitioning(init, ("embed", "vocab")), name=name)


def _project(head: nn.Module, x_BxLxD):
    """Logits of the output projection `head`: the tied embedding table, or the lm_head kernel."""
    logits_BxLxV = head.attend(x_BxLxD) if isinstance(head, nn.Embed) else head(x_BxLxD)
    logits_BxLxV = nn.with_logical_constraint(logits_BxLxV, ("act_batch", "act_seq", "act_vocab"))
    return logits_BxLxV.astype(jnp.float32)


def output_logits(cfg: DecoderConfig, params: dict, x_BxLxD):
    """DecoderLM's output projection of hidden states (from hidden_only=True, or any slice of them):
    float32 logits B x L x V, computed exactly as the model computes them."""
    if cfg.tie_embeddings:
        head, head_params = token_embedding(cfg.vocab_size, cfg.width, DTYPES[cfg.dtype]), params["embed"]
    else:
        head, head_params = _lm_head(cfg), params["lm_head"]
    return head.apply({"params": head_params}, x_BxLxD, method=_project)


def init_cache(model: DecoderLM, batch_size: int, length: int) -> dict:
    """An empty KV cache of `length` slots per row (every slot empty, index 0): the "cache" collection.

    Shapes only are traced (no parameters are made); the arrays are zeros, created where this runs
    (inside a jitted function they follow its sharding).
    """
    tokens_BxT = jnp.zeros((batch_size, length), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens_BxT, tokens_BxT, decode=True)["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def stack_layers(params: dict, n_layers: int) -> dict:
    """Unrolled parameters (`layers_0`, `layers_1`, ...) -> the scanned layout (`layers`, stacked on axis 0)."""
    params = dict(params)
    per_layer = [params.pop(f"layers_{i}") for i in range(n_layers)]
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return params


def unstack_layers(params: dict, n_layers: int) -> dict:
    """The scanned layout -> unrolled `layers_0`, `layers_1`, ... (inverse of stack_layers)."""
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(n_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return params
