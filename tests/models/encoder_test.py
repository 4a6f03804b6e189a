"""Encoder behaviour: padding and packing isolation, scan/remat equivalence, dropout, sharding names."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.models.decoder import stack_layers, unstack_layers
from fmjax.models.encoder import Encoder, EncoderClassifier, EncoderConfig, EncoderMLM

CFG = EncoderConfig(vocab_size=61, width=32, n_layers=2, n_heads=4, head_dim=8, mlp_dim=48, max_len=32,
                    scan_layers=False)


def hidden(cfg, params, *args):
    return jax.jit(lambda p, *a: Encoder(cfg).apply({"params": p}, *a))(params, *args)


def _init(cfg, length=12, batch=2):
    tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, length), 0, cfg.vocab_size)
    params = nn.meta.unbox(jax.jit(Encoder(cfg).init)(jax.random.PRNGKey(0), tokens))["params"]
    return params, tokens


def test_padding_does_not_change_real_tokens():
    params, tokens = _init(CFG)
    segments = jnp.ones_like(tokens)
    padded = jnp.concatenate([tokens, jnp.full((2, 5), 7)], axis=1)
    padded_segments = jnp.concatenate([segments, jnp.zeros((2, 5), jnp.int32)], axis=1)
    a = hidden(CFG, params, tokens, segments)
    b = hidden(CFG, params, padded, padded_segments)
    np.testing.assert_allclose(b[:, :12], a, atol=1e-5)


def test_every_token_sees_the_whole_document():
    params, tokens = _init(CFG)
    changed = tokens.at[:, -1].set((tokens[:, -1] + 3) % CFG.vocab_size)
    a, b = hidden(CFG, params, tokens), hidden(CFG, params, changed)
    assert np.abs(np.asarray(a[:, 0] - b[:, 0])).max() > 1e-4  # bidirectional, unlike the decoder


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_packed_documents_equal_the_documents_alone(positions):
    cfg = dataclasses.replace(CFG, positions=positions)
    params, _ = _init(cfg)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, CFG.vocab_size, n) for n in (5, 9, 4)]
    alone = [np.asarray(hidden(cfg, params, jnp.asarray(d[None])))[0] for d in docs]
    inputs, segments, positions = (np.zeros((1, 20), np.int32) for _ in range(3))
    start = 0
    for seg, doc in enumerate(docs, 1):
        span = slice(start, start + len(doc))
        inputs[0, span], segments[0, span], positions[0, span] = doc, seg, np.arange(len(doc))
        start = span.stop
    packed = np.asarray(hidden(cfg, params, *(jnp.asarray(x) for x in (inputs, segments, positions))))[0]
    for seg, expected in enumerate(alone, 1):
        np.testing.assert_allclose(packed[segments[0] == seg], expected, atol=1e-5)


@pytest.mark.parametrize("remat", ["none", "full"])
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_scan_layers_and_remat_give_the_same_outputs_and_grads(remat, norm):
    cfg = dataclasses.replace(CFG, norm=norm)
    params, tokens = _init(cfg)
    stacked = stack_layers(params, cfg.n_layers)

    def loss(c, p):
        return jnp.mean(jnp.square(Encoder(c).apply({"params": p}, tokens)))

    base, base_grads = jax.jit(jax.value_and_grad(lambda p: loss(cfg, p)))(params)
    scanned = dataclasses.replace(cfg, scan_layers=True, remat=remat)
    value, grads = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(stacked)
    np.testing.assert_allclose(value, base, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 unstack_layers(grads, cfg.n_layers), base_grads)


def test_dropout_only_in_training_and_reproducible_from_the_key():
    cfg = dataclasses.replace(CFG, dropout=0.1, scan_layers=True)
    model = EncoderMLM(cfg)
    tokens = jnp.ones((2, 8), jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)

    @jax.jit
    def train_logits(key):
        return model.apply(params, tokens, deterministic=False, rngs={"dropout": key})

    a, b = train_logits(jax.random.PRNGKey(1)), train_logits(jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a - train_logits(jax.random.PRNGKey(2)))).max() > 1e-3
    eval_logits = jax.jit(model.apply)(params, tokens)
    assert np.abs(np.asarray(a - eval_logits)).max() > 1e-3


def test_every_parameter_has_logical_axis_names_and_count_matches():
    for cfg, model in [(c, m) for positions in ("learned", "rope")
                       for c in [dataclasses.replace(CFG, scan_layers=True, positions=positions)]
                       for m in (EncoderMLM(c), EncoderClassifier(c, n_classes=3))]:
        boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
        encoder = nn.meta.unbox(boxed)["params"]["encoder"]
        assert sum(x.size for x in jax.tree.leaves(encoder)) == cfg.param_count()
