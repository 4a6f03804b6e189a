"""The train step: gradient accumulation equals the larger batch; token-weighted normalisation."""
import types

import jax
import jax.numpy as jnp
import numpy as np

from configs.lm import tiny
from fmjax import sharding
from fmjax.tasks.lm import LMTask
from fmjax.train import optim, state as state_lib, step as step_lib


def tiny_config(**train):
    c = tiny.get_config()
    c.model.update(vocab_size=64, width=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64)
    c.data.seq_len = 16
    c.train.update(steps=10, batch_size=8, **train)
    return c


def make(config, devices=None):
    tokenizer = types.SimpleNamespace(token_bytes=np.ones(config.model.vocab_size, np.int32))
    task = LMTask(config, tokenizer)
    mesh = sharding.make_mesh(config.mesh, devices or jax.devices()[:1])
    rules = sharding.rules_from_config(config.sharding_rules)
    tx = optim.optimizer(config)
    abstract, shardings = state_lib.abstract_state(task, tx, config.seed, mesh, rules)
    state = state_lib.init_state(task, tx, config.seed, abstract, shardings)
    step = jax.jit(step_lib.make_train_step(task, tx, optim.schedule(config), config.train.microbatches))
    return task, state, step


def random_batch(config, seed=0, pad_from=None):
    rng = np.random.default_rng(seed)
    shape = (config.train.batch_size, config.data.seq_len)
    batch = {"inputs": rng.integers(0, config.model.vocab_size, shape).astype(np.int32),
             "targets": rng.integers(0, config.model.vocab_size, shape).astype(np.int32),
             "segment_ids": np.ones(shape, np.int32),
             "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
             "loss_mask": np.ones(shape, np.float32)}
    if pad_from is not None:  # rows of different real lengths: token weighting must matter
        for row, n in enumerate(pad_from):
            batch["segment_ids"][row, n:] = 0
            batch["loss_mask"][row, n:] = 0
    return {k: jnp.asarray(v) for k, v in batch.items()}


def test_two_microbatches_equal_one_double_batch():
    # Adam's first update is ~sign(g) where |g| << eps; a larger eps keeps the param comparison well-conditioned.
    config = tiny_config()
    config.optim.eps = 1e-3
    lengths = [16, 3, 9, 16, 1, 12, 5, 16]
    batch = random_batch(config, pad_from=lengths)
    _, state, full_step = make(config)
    full_state, full_metrics = full_step(state, batch)
    config2 = tiny_config(microbatches=2)
    config2.optim.eps = 1e-3
    _, state2, micro_step = make(config2)
    micro_state, micro_metrics = micro_step(state2, batch)
    np.testing.assert_allclose(micro_metrics["loss"], full_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(micro_metrics["grad_norm"], full_metrics["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 micro_state.params, full_state.params)
    assert int(micro_state.step) == 1


def test_loss_is_the_mean_over_real_tokens_only():
    config = tiny_config()
    lengths = [16, 3, 9, 16, 1, 12, 5, 16]
    batch = random_batch(config, pad_from=lengths)
    task, state, step = make(config)
    _, metrics = step(state, batch)
    ce = np.asarray(jax.vmap(lambda b: task.eval_sums(state.params, jax.tree.map(lambda x: x[None], b)))(batch)["nats"])
    np.testing.assert_allclose(metrics["loss"], ce.sum() / sum(lengths), rtol=1e-5)
    assert metrics["weight"] == sum(lengths)
    # garbage in padded positions changes nothing
    noisy = dict(batch, targets=jnp.where(batch["loss_mask"] > 0, batch["targets"], 7))
    _, metrics2 = step(state, noisy)
    np.testing.assert_allclose(metrics2["loss"], metrics["loss"], rtol=1e-6)


def test_learning_rate_warms_up_then_decays():
    config = tiny_config()
    config.train.steps, config.optim.warmup = 100, 0.1
    lr = optim.schedule(config)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(10)), config.optim.lr, rtol=1e-6)
    np.testing.assert_allclose(float(lr(100)), config.optim.lr * config.optim.min_lr_ratio, rtol=1e-5)


def test_golden_metrics_of_two_tiny_steps():
    """Pins init, loss, z-loss, clipping and AdamW together against unnoticed changes.

    Update these numbers only for a deliberate change to initialisation, the loss or the optimizer
    (or a jax/flax upgrade in constraints.txt that moves float32 results), and say so in the commit.
    """
    config = tiny_config()
    batch = random_batch(config, pad_from=[16, 3, 9, 16, 1, 12, 5, 16])
    _, state, step = make(config)
    state, first = step(state, batch)
    _, second = step(state, batch)
    np.testing.assert_allclose([first["loss"], first["z_loss"], first["grad_norm"]],
                               [4.539107, 21.296295, 15.004436], rtol=2e-5)
    np.testing.assert_allclose([second["loss"], second["grad_norm"]], [3.631950, 10.479939], rtol=2e-5)


def test_ema_follows_the_warmed_up_recurrence_and_params_are_unchanged_by_it():
    config = tiny_config(ema_decay=0.9)
    task = LMTask(config, types.SimpleNamespace(token_bytes=np.ones(config.model.vocab_size, np.int32)))
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    tx = optim.optimizer(config)
    abstract, shardings = state_lib.abstract_state(task, tx, config.seed, mesh,
                                                   sharding.rules_from_config(config.sharding_rules), ema=True)
    state = state_lib.init_state(task, tx, config.seed, abstract, shardings)
    with_ema = jax.jit(step_lib.make_train_step(task, tx, optim.schedule(config), 1, ema_decay=0.9))
    _, plain_state, plain = make(config)
    expected = state.params
    for i in range(3):
        batch = random_batch(config, seed=i)
        state, _ = with_ema(state, batch)
        plain_state, _ = plain(plain_state, batch)
        decay = min(0.9, (1 + i) / (10 + i))
        expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, expected, state.params)
    jax.tree.map(np.testing.assert_array_equal, state.params, plain_state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), state.ema, expected)
    assert state_lib.inference_params(state) is state.ema
    assert plain_state.ema is None and state_lib.inference_params(plain_state) is plain_state.params


def bitwise_equal(a, b):
    return all(np.array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_non_finite_step_leaves_params_and_optimizer_state_bitwise_unchanged():
    config = tiny_config()
    _, state, step = make(config)
    state, _ = step(state, random_batch(config, seed=0))  # a real step first: moments are non-zero
    after = state
    for streak, poison in enumerate((np.nan, np.inf), 1):
        bad = random_batch(config, seed=streak)
        bad["loss_mask"] = bad["loss_mask"].at[2, 5].set(poison)  # a NaN / Inf loss and gradients
        after, metrics = step(after, bad)
        assert not np.isfinite(metrics["loss"])
        assert bitwise_equal(after.params, state.params) and bitwise_equal(after.opt_state, state.opt_state)
        assert int(after.step) == int(state.step) + streak  # the batch is consumed; the RNG moves on
        assert (int(metrics["skipped_steps"]), int(metrics["bad_streak"])) == (streak, streak)
        assert float(after.loss_mean) == float(state.loss_mean)
    after, metrics = step(after, random_batch(config, seed=3))  # a good step applies and ends the streak
    assert not bitwise_equal(after.params, state.params)
    assert (int(metrics["skipped_steps"]), int(metrics["bad_streak"])) == (2, 0)


def test_a_loss_spike_is_skipped_when_spike_factor_is_set():
    config = tiny_config()
    task, state, _ = make(config)
    tx = optim.optimizer(config)
    step = jax.jit(step_lib.make_train_step(task, tx, optim.schedule(config), 1, spike_factor=2.0))
    state = state.replace(step=jnp.int32(100), loss_mean=jnp.float32(1 - 0.99 ** 100))  # mean loss 1.0
    after, metrics = step(state, random_batch(config))  # an untrained model: loss ~ log(64) = 4.2 > 2 x 1.0
    assert float(metrics["loss"]) > 2 and int(metrics["skipped_steps"]) == 1
    assert bitwise_equal(after.params, state.params)
    calm = state.replace(loss_mean=jnp.float32(3.0 * (1 - 0.99 ** 100)))  # mean 3.0: 4.2 is no spike
    after, metrics = step(calm, random_batch(config))
    assert int(metrics["skipped_steps"]) == 0 and not bitwise_equal(after.params, state.params)
