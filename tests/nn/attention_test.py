"""Attention implementations: when model.attention=cudnn falls back to XLA (CPU), and cuDNN = XLA (GPU only)."""
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.nn import attention
from fmjax.nn.attention import Attention, cudnn_fallback_reason, dot_product_attention, segment_mask


@pytest.mark.parametrize("args, expected", [
    (("cpu", jnp.bfloat16, 64, 128, 128, None), "GPUs only"),
    (("gpu", jnp.float32, 64, 128, 128, "9.0"), "bfloat16 or float16"),
    (("gpu", jnp.bfloat16, 64, 128, 128, "7.5"), "compute capability 8.0"),
    (("gpu", jnp.bfloat16, 60, 128, 128, "9.0"), "multiples of 8"),
    (("gpu", jnp.bfloat16, 192, 128, 128, "8.0"), "up to 128"),
    (("gpu", jnp.bfloat16, 64, 127, 127, "9.0"), "even sequence lengths"),
    (("gpu", jnp.bfloat16, 192, 128, 128, "9.0"), None),  # Hopper takes head dims up to 256
    (("gpu", jnp.float16, 64, 2048, 2048, "8.0"), None),
])
def test_cudnn_fallback_reasons(args, expected):
    reason = cudnn_fallback_reason(*args)
    if expected is None:
        assert reason is None
    else:
        assert expected in reason


def _qkv_mask(dtype=jnp.float32, batch=2, length=16, heads=4, kv_heads=2, head_dim=8):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (batch, length, heads, head_dim), dtype)
    k = jax.random.normal(kk, (batch, length, kv_heads, head_dim), dtype)
    v = jax.random.normal(kv, (batch, length, kv_heads, head_dim), dtype)
    # Row 0: three packed documents, then padding; row 1: one document, then padding.
    segments = np.zeros((batch, length), np.int32)
    segments[0, :5], segments[0, 5:11], segments[0, 11:length - 2] = 1, 2, 3
    segments[1:, :length - 5] = 1
    return q, k, v, segment_mask(jnp.asarray(segments))


def test_cudnn_on_cpu_runs_xla_and_logs_the_reason_once():
    q, k, v, mask = _qkv_mask()
    attention._logged_fallbacks.clear()
    with mock.patch.object(attention.logging, "warning") as warning:
        for _ in range(2):
            out = jax.jit(lambda *a: dot_product_attention(*a, True, "cudnn"))(q, k, v, mask)
    np.testing.assert_array_equal(out, dot_product_attention(q, k, v, mask, True, "xla"))
    assert warning.call_count == 1
    assert "GPUs only" in warning.call_args.args[1]


def test_cudnn_errors_jax_raises_fall_back_to_xla():
    """What only jax can tell (no cuDNN, too old a cuDNN or GPU) also falls back, with jax's message."""
    q, k, v, mask = _qkv_mask(jnp.bfloat16)
    attention._logged_fallbacks.clear()
    with mock.patch.object(attention, "cudnn_fallback_reason", return_value=None), \
            mock.patch.object(attention.logging, "warning") as warning:
        out = dot_product_attention(q, k, v, mask, True, "cudnn")  # on CPU jax finds no cuDNN
    np.testing.assert_array_equal(out, dot_product_attention(q, k, v, mask, True, "xla"))
    assert warning.call_count == 1 and "cuDNN" in warning.call_args.args[1]


def test_attention_module_with_cudnn_equals_xla_on_cpu():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 32))
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    segments = jnp.ones((2, 16), jnp.int32).at[:, 9:].set(2)
    modules = {impl: Attention(4, 2, 8, implementation=impl) for impl in ("xla", "cudnn")}
    params = nn.meta.unbox(modules["xla"].init(jax.random.PRNGKey(0), x, positions, segments))
    out = {impl: m.apply(params, x, positions, segments) for impl, m in modules.items()}
    np.testing.assert_array_equal(out["cudnn"], out["xla"])


def _cudnn_unavailable_reason():
    if jax.default_backend() != "gpu":
        return f"cuDNN attention needs a GPU; this backend is {jax.default_backend()}"
    return cudnn_fallback_reason("gpu", jnp.bfloat16, 64, 256, 256,
                                 getattr(jax.devices()[0], "compute_capability", None))


@pytest.mark.skipif(_cudnn_unavailable_reason() is not None, reason=str(_cudnn_unavailable_reason()))
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_equals_xla_with_packed_segments_on_gpu(causal):
    """bfloat16 cuDNN outputs and gradients are as close to a float32 reference as XLA's bfloat16 ones."""
    q, k, v, mask = _qkv_mask(jnp.bfloat16, batch=4, length=256, heads=8, kv_heads=4, head_dim=64)
    cotangent = jax.random.normal(jax.random.PRNGKey(2), q.shape, jnp.float32)

    def run(implementation, dtype):
        def f(q, k, v):
            out = dot_product_attention(q, k, v, mask, causal, implementation)
            return jnp.sum(out.astype(jnp.float32) * cotangent), out
        fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
        args = [a.astype(dtype) for a in (q, k, v)]
        if implementation == "cudnn":  # the cuDNN kernels run, forward and backward
            hlo = fn.lower(*args).as_text()
            assert "__cudnn$fmha" in hlo and "Backward" in hlo, "the cuDNN custom calls are missing"
        (_, out), grads = fn(*args)
        return [np.asarray(x, np.float32) for x in (out, *grads)]

    attention._logged_fallbacks.clear()
    with mock.patch.object(attention.logging, "warning") as warning:
        cudnn = run("cudnn", jnp.bfloat16)
    assert warning.call_count == 0, warning.call_args
    xla, reference = run("xla", jnp.bfloat16), run("xla", jnp.float32)
    for name, c, x, r in zip(("out", "dq", "dk", "dv"), cudnn, xla, reference):
        scale = np.abs(r).max()
        xla_error, cudnn_error = np.abs(x - r).max(), np.abs(c - r).max()
        assert cudnn_error <= 2 * xla_error + 1e-2 * scale, (name, cudnn_error, xla_error, scale)
