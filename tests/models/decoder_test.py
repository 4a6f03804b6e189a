"""DecoderLM behaviour: causality, packed-document isolation, scan/remat equivalence, sharding names."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.ad_checkpoint import print_saved_residuals

from fmjax.models.decoder import REMAT_POLICIES, DecoderConfig, DecoderLM, output_logits, stack_layers, unstack_layers
from fmjax.tasks.lm import token_losses

CFG = DecoderConfig(vocab_size=61, width=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    mlp_dim=48, scan_layers=False)


def apply(cfg, params, *args):
    return jax.jit(lambda p, *a: DecoderLM(cfg).apply({"params": p}, *a))(params, *args)


def _init(cfg, length=12, batch=2):
    tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, length), 0, cfg.vocab_size)
    params = nn.meta.unbox(jax.jit(DecoderLM(cfg).init)(jax.random.PRNGKey(0), tokens))["params"]
    return params, tokens


def test_causal_future_tokens_do_not_change_past_logits():
    params, tokens = _init(CFG)
    changed = tokens.at[:, 7:].set((tokens[:, 7:] + 5) % CFG.vocab_size)
    a, b = apply(CFG, params, tokens), apply(CFG, params, changed)
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert np.abs(np.asarray(a[:, 7:] - b[:, 7:])).max() > 1e-3


def test_packed_documents_give_the_same_per_document_loss_as_unpacked():
    params, _ = _init(CFG)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, CFG.vocab_size, n) for n in (5, 9, 4)]

    unpacked = []
    for doc in docs:
        inputs, targets = jnp.asarray(doc[None, :-1]), jnp.asarray(doc[None, 1:])
        ce, _ = token_losses(apply(CFG, params, inputs), targets)
        unpacked.append(float(ce.sum()))

    length = 20  # 4 + 8 + 3 = 15 real positions, then padding (segment 0)
    inputs, targets, segments, positions = (np.zeros((1, length), np.int32) for _ in range(4))
    start = 0
    for seg, doc in enumerate(docs, 1):
        n = len(doc) - 1
        inputs[0, start:start + n], targets[0, start:start + n] = doc[:-1], doc[1:]
        segments[0, start:start + n], positions[0, start:start + n] = seg, np.arange(n)
        start += n
    logits = apply(CFG, params, jnp.asarray(inputs), jnp.asarray(positions), jnp.asarray(segments))
    ce, _ = token_losses(logits, jnp.asarray(targets))
    packed = [float(ce[0][segments[0] == s].sum()) for s in (1, 2, 3)]
    np.testing.assert_allclose(packed, unpacked, rtol=1e-5)


@pytest.mark.parametrize("remat", sorted(REMAT_POLICIES))
def test_scan_layers_and_remat_give_the_same_loss_and_grads(remat):
    params, tokens = _init(CFG)
    stacked = stack_layers(params, CFG.n_layers)
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked, CFG.n_layers), params)

    def loss(cfg, p):
        return token_losses(DecoderLM(cfg).apply({"params": p}, tokens[:, :-1]), tokens[:, 1:])[0].mean()

    base, base_grads = jax.jit(jax.value_and_grad(lambda p: loss(CFG, p)))(params)
    scanned_cfg = dataclasses.replace(CFG, scan_layers=True, remat=remat)
    value, grads = jax.jit(jax.value_and_grad(lambda p: loss(scanned_cfg, p)))(stacked)
    np.testing.assert_allclose(value, base, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 unstack_layers(grads, CFG.n_layers), base_grads)  # float32 reassociation


@pytest.mark.parametrize("remat", ["save_dots", "save_dots_and_context"])
def test_save_dots_and_context_keeps_the_attention_output_for_the_backward_pass(remat, capsys):
    cfg = dataclasses.replace(CFG, remat=remat)  # unrolled layers: residuals keep their names
    params, tokens = _init(cfg)
    print_saved_residuals(lambda p: DecoderLM(cfg).apply({"params": p}, tokens).sum(), params)
    saved = capsys.readouterr().out.count("named 'attention_context'")
    assert saved == (cfg.n_layers if remat == "save_dots_and_context" else 0)


@pytest.mark.parametrize("tie", [False, True])
def test_output_logits_of_the_hidden_states_are_the_model_logits(tie):
    cfg = dataclasses.replace(CFG, tie_embeddings=tie, dtype="bfloat16")
    params, tokens = _init(cfg)
    hidden = DecoderLM(cfg).apply({"params": params}, tokens, hidden_only=True)
    assert hidden.shape == (*tokens.shape, cfg.width) and hidden.dtype == jnp.bfloat16
    np.testing.assert_array_equal(output_logits(cfg, params, hidden[:, 3:7]),
                                  DecoderLM(cfg).apply({"params": params}, tokens)[:, 3:7])


def test_bfloat16_compute_keeps_float32_params_and_close_logits():
    params, tokens = _init(CFG)
    bf16 = dataclasses.replace(CFG, dtype="bfloat16")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(
        nn.meta.unbox(DecoderLM(bf16).init(jax.random.PRNGKey(0), tokens))))
    a, b = apply(CFG, params, tokens), apply(bf16, params, tokens)
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, atol=0.1)


def test_every_parameter_has_logical_axis_names():
    cfg = dataclasses.replace(CFG, scan_layers=True, tie_embeddings=True)
    boxed = jax.eval_shape(DecoderLM(cfg).init, jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    names = {name for x in leaves for name in x.names}
    assert {"vocab", "embed", "mlp", "heads", "kv_heads", "layers"} <= names
    assert "lm_head" not in boxed["params"]  # tied: the embedding is the output projection


def test_param_count_matches_the_tree():
    for tie in (False, True):
        cfg = dataclasses.replace(CFG, tie_embeddings=tie)
        params, _ = _init(cfg)
        assert sum(x.size for x in jax.tree.leaves(params)) == cfg.param_count()
