"""Grouped-query self-attention: causal with RoPE (decoder) or bidirectional (encoder), packed-segment masking.

Decode mode (generation) keeps a KV cache in the "cache" variable collection: key and value
buffers B x S x K x E, the segment id of every slot B x S (0 = empty or padding) and the index of
the next free slot. S is the length of the input the cache was created with (see
fmjax.models.decoder.init_cache). A decode call writes its L keys and values at slots
[index, index + L), advances the index, and lets query l (at slot index + l) attend to every slot
s <= index + l of its own segment. The caller keeps index + L <= S (dynamic_update_slice would
clamp a write past the end).

model.attention=cudnn runs jax.nn.dot_product_attention(implementation="cudnn") (cuDNN flash
attention) outside decode mode. Causality reaches cuDNN as its own causal mask type (the upper
triangle is skipped, no tensor); the packed-segment mask as the boolean B x 1 x L x S mask, which
jax 0.10 turns into an additive bias that the kernel reads (jax's public API has no segment ids, and
query_seq_lengths / key_value_seq_lengths only express one document per row followed by padding,
while fmjax rows pack several). cuDNN never materialises the N x L x S scores, but the bias costs
B x L x S in the compute dtype, and its training kernels take a bias only for even L. Where
cuDNN cannot run (not a GPU, float32 compute, head dims or lengths it does not take, cuDNN missing
or too old) the XLA implementation runs instead, and the reason is logged once (cudnn_fallback_reason).

The attention output is named CONTEXT for remat policies (jax.ad_checkpoint.checkpoint_name).

Shapes: B batch, L sequence (queries), S sequence (keys; in decode mode the cache slots),
D model width, N query heads, K key/value heads (N % K == 0), E head dim.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from jax.ad_checkpoint import checkpoint_name

from fmjax.nn.dense import dense
from fmjax.nn.rope import apply_rope

IMPLEMENTATIONS = ("xla", "cudnn")
CONTEXT = "attention_context"  # checkpoint name of the attention output B x L x N x E
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_logged_fallbacks: set[str] = set()


def cudnn_fallback_reason(platform: str, dtype, head_dim: int, q_len: int, kv_len: int,
                          compute_capability: str | None = None) -> str | None:
    """Why cuDNN flash attention cannot run this attention with a segment mask, or None if it can.

    The conditions are jax 0.10's own cuDNN checks (jax/_src/cudnn/fused_attention_stablehlo.py),
    asked before tracing so that they fall back instead of failing; a GPU without cuDNN, or too
    old a cuDNN, is only found out by jax itself (dot_product_attention catches that too).
    """
    if platform != "gpu":
        return f"cuDNN attention runs on GPUs only; this backend is {platform!r}"
    if jnp.dtype(dtype) not in _CUDNN_DTYPES:
        return f"cuDNN attention takes bfloat16 or float16 inputs, not {jnp.dtype(dtype).name} (model.dtype)"
    major = int(compute_capability.split(".")[0]) if compute_capability else None
    if major is not None and major < 8:
        return f"cuDNN flash attention needs compute capability 8.0 (Ampere) or newer, not {compute_capability}"
    max_head_dim = 256 if major is not None and major >= 9 else 128
    if head_dim % 8 or head_dim > max_head_dim:
        return f"cuDNN attention takes head dims that are multiples of 8 up to {max_head_dim}, not {head_dim}"
    if q_len % 2 or kv_len % 2:
        return (f"the segment mask reaches cuDNN as a bias, which its training kernels take only for even "
                f"sequence lengths, not {q_len} x {kv_len}")
    return None


def _log_fallback_once(reason: str) -> None:
    if reason not in _logged_fallbacks:
        _logged_fallbacks.add(reason)
        logging.warning("model.attention=cudnn falls back to the XLA implementation: %s", reason)


def dot_product_attention(q_BxLxNxE, k_BxSxKxE, v_BxSxKxE, mask_Bx1xLxS, is_causal: bool, implementation: str):
    """jax.nn.dot_product_attention with `implementation`; "cudnn" runs cuDNN where it can, else XLA."""
    if implementation == "cudnn":
        reason = cudnn_fallback_reason(jax.default_backend(), q_BxLxNxE.dtype, q_BxLxNxE.shape[-1],
                                       q_BxLxNxE.shape[1], k_BxSxKxE.shape[1],
                                       getattr(jax.devices()[0], "compute_capability", None))
        if reason is None:
            try:
                return jax.nn.dot_product_attention(q_BxLxNxE, k_BxSxKxE, v_BxSxKxE, mask=mask_Bx1xLxS,
                                                    is_causal=is_causal, implementation="cudnn")
            except (NotImplementedError, RuntimeError) as e:  # jax's checks: cuDNN present, new enough, ...
                reason = f"{type(e).__name__}: {e}"
        _log_fallback_once(reason)
    return jax.nn.dot_product_attention(q_BxLxNxE, k_BxSxKxE, v_BxSxKxE, mask=mask_Bx1xLxS,
                                        is_causal=is_causal, implementation="xla")


def segment_mask(segment_ids_BxL):
    """True where query l and key s lie in the same packed document (causality is separate)."""
    return (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])[:, None]  # B x 1 x L x S


def cache_mask(cached_segment_ids_BxS, segment_ids_BxL, first_slot):
    """Decode mask B x 1 x L x S: query l (at slot first_slot + l) sees slot s <= its own slot of its segment.

    A query always sees its own slot, so no row is all-masked: a padding query (segment 0) attends
    to padding only, and no real query ever sees a padding or empty slot.
    """
    slots_S = jnp.arange(cached_segment_ids_BxS.shape[1])
    query_slots_L = first_slot + jnp.arange(segment_ids_BxL.shape[1])
    causal_LxS = slots_S[None, :] <= query_slots_L[:, None]
    same_segment_BxLxS = segment_ids_BxL[:, :, None] == cached_segment_ids_BxS[:, None, :]
    return (same_segment_BxLxS & causal_LxS[None])[:, None]


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
    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, decode: bool = False):
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
        if decode:
            if not self.causal:
                raise ValueError("Attention(decode=True) needs causal=True: a KV cache serves causal decoding")
            k_BxSxKxE, v_BxSxKxE, mask_Bx1xLxS = self._append_to_cache(k_BxSxKxE, v_BxSxKxE, segment_ids_BxL)
            # The queries sit at the cache's current slots, not at 0..L-1, so causality is in the mask;
            # a few queries against the cache are a plain XLA attention.
            is_causal, implementation = False, "xla"
        else:
            # is_causal lets cuDNN skip the upper triangle; XLA folds it into the segment mask.
            mask_Bx1xLxS, is_causal, implementation = segment_mask(segment_ids_BxL), self.causal, self.implementation
        out_BxLxNxE = dot_product_attention(q_BxLxNxE, k_BxSxKxE, v_BxSxKxE, mask_Bx1xLxS, is_causal, implementation)
        out_BxLxNxE = checkpoint_name(out_BxLxNxE, CONTEXT)
        out_BxLxNxE = nn.with_logical_constraint(out_BxLxNxE, ("act_batch", "act_seq", "act_heads", None))
        return dense(width, ("heads", "head_dim", "embed"), self.dtype, "out", n_contract=2,
                     use_bias=bias)(out_BxLxNxE)

    def _append_to_cache(self, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL):
        """Writes the L new keys / values / segment ids at the cache index; (keys, values, mask) over all slots."""
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k_BxLxKxE.shape, k_BxLxKxE.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v_BxLxKxE.shape, v_BxLxKxE.dtype)
        cached_segments = self.variable("cache", "cached_segment_ids", jnp.zeros, segment_ids_BxL.shape, jnp.int32)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        first_slot = index.value
        names = ("act_batch", None, "act_kv_heads", None)
        cached_k.value = nn.with_logical_constraint(
            jax.lax.dynamic_update_slice(cached_k.value, k_BxLxKxE.astype(cached_k.value.dtype),
                                         (0, first_slot, 0, 0)), names)
        cached_v.value = nn.with_logical_constraint(
            jax.lax.dynamic_update_slice(cached_v.value, v_BxLxKxE.astype(cached_v.value.dtype),
                                         (0, first_slot, 0, 0)), names)
        cached_segments.value = jax.lax.dynamic_update_slice(
            cached_segments.value, segment_ids_BxL.astype(jnp.int32), (0, first_slot))
        index.value = first_slot + segment_ids_BxL.shape[1]
        return cached_k.value, cached_v.value, cache_mask(cached_segments.value, segment_ids_BxL, first_slot)
