"""UNet behaviour: zero init, conditioning on t / class / text, padding and null captions, bf16, sharding."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import sharding
from fmjax.models.encoder import EncoderConfig, EncoderMLM
from fmjax.models.unet import AttentionBlock, ResBlock, TextUNet, UNet, UNetConfig

CFG = UNetConfig(image_size=8, channels=1, width=8, channel_mults=(1, 2), blocks_per_level=1,
                 attention_levels=(1,), n_heads=2, groups=4, dropout=0.1, n_classes=10, text_width=16)
ENCODER = EncoderConfig(vocab_size=61, width=16, n_layers=1, n_heads=2, head_dim=8, mlp_dim=32, max_len=16,
                        scan_layers=False)
BATCH, LENGTH = 4, 5  # batch 4 splits over data=2 x fsdp=2 in the sharded test
KEY = jax.random.key(0)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, 8, 8, 1)).astype(np.float32)
    t = rng.uniform(size=(BATCH,)).astype(np.float32)
    labels = rng.integers(0, CFG.n_classes, BATCH).astype(np.int32)
    context = rng.normal(size=(BATCH, LENGTH, CFG.text_width)).astype(np.float32)
    mask = np.ones((BATCH, LENGTH), np.int32)
    return x, t, labels, context, mask


@functools.cache
def boxed_abstract():
    return jax.eval_shape(UNet(CFG).init, KEY, *inputs())["params"]


def random_params(abstract, seed=1):
    """Random values for every parameter: zero-initialised branches would hide every dependence, and
    a jitted init of ~150 parameters costs XLA:CPU more compile time than all the other tests."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(0.2 * rng.normal(size=a.shape), np.float32),
                        nn.meta.unbox(abstract))


@functools.cache
def params():
    return random_params(boxed_abstract())


@functools.cache
def forward(cfg, deterministic=True):
    return jax.jit(lambda p, *a, rng=None: UNet(cfg).apply(
        {"params": p}, *a, deterministic=deterministic, rngs=None if rng is None else {"dropout": rng}))


def test_blocks_start_as_the_identity():
    key = jax.random.key(0, impl="rbg")  # threefry costs XLA:CPU seconds of compile per parameter
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(BATCH, 4, 4, 16)), np.float32)
    emb = jnp.asarray(rng.normal(size=(BATCH, 4 * CFG.width)), np.float32)
    block = ResBlock(CFG, 16)
    np.testing.assert_array_equal(jax.jit(block.apply)(jax.jit(block.init)(key, x, emb), x, emb), x)
    _, _, _, context, mask = inputs()
    attention = AttentionBlock(CFG)
    variables = jax.jit(attention.init)(key, x, context, mask > 0)
    np.testing.assert_array_equal(jax.jit(attention.apply)(variables, x, context, mask > 0), x)


def test_output_is_float32_with_the_input_shape():
    out = forward(CFG)(params(), *inputs())
    assert out.shape == (BATCH, 8, 8, 1) and out.dtype == jnp.float32


def test_every_parameter_is_float32_with_a_glossary_name_per_dimension():
    leaves = jax.tree.leaves(boxed_abstract(), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    glossary = {name for name, _ in sharding.DEFAULT_RULES}
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= glossary, leaf.names
        assert leaf.value.dtype == jnp.float32
    names = {name for x in leaves for name in x.names}
    assert {"conv_height", "conv_width", "conv_in", "conv_out", "image_channels", "heads", "classes"} <= names


def test_output_depends_on_time_labels_and_context():
    x, t, labels, context, mask = inputs()
    x[:] = x[0]  # one image; each row changes one condition of row 0
    t[:] = t[0]
    labels[:] = labels[0]
    context[:] = context[0]
    t[1] = (t[0] + 0.3) % 1
    labels[2] = (labels[0] + 1) % CFG.n_classes
    context[3, 0] *= -1  # not a shift: the context LayerNorm removes those
    out = np.asarray(forward(CFG)(params(), x, t, labels, context, mask))
    for row in (1, 2, 3):
        assert np.abs(out[row] - out[0]).max() > 1e-3, row


def test_padding_is_never_attended_and_null_conditions_are_the_defaults():
    x, t, labels, context, mask = inputs()
    mask[0, 2:] = 0
    mask[1] = 0  # the null caption
    changed = context.copy()
    changed[0, 2:] += 5.0
    changed[1] += 5.0
    out = np.asarray(forward(CFG)(params(), x, t, labels, context, mask))
    again = np.asarray(forward(CFG)(params(), x, t, labels, changed, mask))
    np.testing.assert_array_equal(out[:2], again[:2])
    assert np.isfinite(out).all()
    # labels None = the null class n_classes; context None = the null caption.
    null_labels = np.full_like(labels, CFG.n_classes)
    defaults = np.asarray(forward(CFG)(params(), x, t, None, None, None))
    explicit = np.asarray(forward(CFG)(params(), x, t, null_labels, context, np.zeros_like(mask)))
    np.testing.assert_allclose(defaults, explicit, atol=1e-5)


def test_dropout_only_in_training_and_reproducible_from_the_key():
    train = forward(CFG, deterministic=False)
    a = train(params(), *inputs(), rng=jax.random.key(1, impl="rbg"))
    np.testing.assert_array_equal(a, train(params(), *inputs(), rng=jax.random.key(1, impl="rbg")))
    assert np.abs(np.asarray(a - train(params(), *inputs(), rng=jax.random.key(2, impl="rbg")))).max() > 1e-3
    assert np.abs(np.asarray(a - forward(CFG)(params(), *inputs()))).max() > 1e-3


def test_bfloat16_compute_is_close_to_float32():
    bf16 = dataclasses.replace(CFG, dtype="bfloat16")
    abstract = jax.eval_shape(UNet(bf16).init, KEY, *inputs())
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.meta.unbox(abstract)))
    a, b = forward(CFG)(params(), *inputs()), forward(bf16)(params(), *inputs())
    assert b.dtype == jnp.float32
    assert np.abs(np.asarray(a - b)).max() < 0.05 * np.abs(np.asarray(a)).max()


def test_sharded_equals_unsharded():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.DEFAULT_RULES
    shardings = sharding.logical_shardings(boxed_abstract(), mesh, rules)
    sharded = jax.device_put(params(), shardings)
    assert "tensor" in shardings["down_1_block_0"]["conv1"]["kernel"].spec
    batch = sharding.batch_sharding(mesh, rules)
    args = [jax.device_put(a, batch) for a in inputs()]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(lambda p, *a: UNet(CFG).apply({"params": p}, *a))(sharded, *args)
    np.testing.assert_allclose(out, forward(CFG)(params(), *inputs()), atol=1e-4, rtol=1e-4)


def test_text_unet_reads_mlm_encoder_params_and_ignores_padding():
    model = TextUNet(dataclasses.replace(CFG, text_width=0), ENCODER)
    x, t, *_ = inputs()
    rng = np.random.default_rng(2)
    tokens = rng.integers(1, ENCODER.vocab_size, (BATCH, LENGTH)).astype(np.int32)
    segments = np.ones_like(tokens)
    segments[0, 3:] = 0
    segments[1] = 0  # the null caption
    positions = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), tokens.shape)
    abstract = jax.eval_shape(model.init, KEY, x, t, tokens, segments, positions)["params"]
    mlm = jax.eval_shape(EncoderMLM(ENCODER).init, KEY, tokens)["params"]["encoder"]
    assert jax.tree.map(lambda a: a.shape, abstract["encoder"]) == jax.tree.map(lambda a: a.shape, mlm)
    p = random_params(abstract)
    apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    out = np.asarray(apply(p, x, t, tokens, segments, positions))
    changed = np.where(segments > 0, tokens, (tokens + 7) % ENCODER.vocab_size)
    np.testing.assert_allclose(out, apply(p, x, t, changed, segments, positions), atol=1e-6)
    null_caption = np.asarray(forward(CFG)(p["unet"], x, t, None, None, None))
    np.testing.assert_allclose(out[1], null_caption[1], atol=1e-5)
    assert np.abs(out[0] - null_caption[0]).max() > 1e-3


@pytest.mark.parametrize("field, value", [
    ("image_size", 9), ("groups", 3), ("attention_levels", (2,)), ("n_heads", 3), ("width", 7),
    ("channel_mults", ()), ("dtype", "float16"), ("remat", "some"), ("dropout", 1.0)])
def test_config_checks_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"model.{field}"):
        dataclasses.replace(CFG, **{field: value}).validate()


def test_from_config_makes_tuples_and_remat_keeps_the_parameter_names():
    cfg = UNetConfig.from_config({**dataclasses.asdict(CFG), "channel_mults": [1, 2], "name": "unet"})
    assert cfg == CFG
    cfg.validate()
    remat = dataclasses.replace(CFG, remat="full")
    same = jax.eval_shape(UNet(remat).init, KEY, *inputs())["params"]
    assert jax.tree.structure(same) == jax.tree.structure(boxed_abstract())
