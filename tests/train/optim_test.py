"""The optimizer from config.optim: Adam's first moment in optim.mu_dtype, still training."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmjax import config_lib
from tests.train.step_test import make, random_batch, tiny_config


def _adam_state(opt_state) -> optax.ScaleByAdamState:
    return next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState))


@pytest.mark.parametrize("mu_dtype", ["float32", "bfloat16"])
def test_first_moment_has_the_configured_dtype_and_training_decreases_the_loss(mu_dtype):
    config = tiny_config()
    config.optim.update(mu_dtype=mu_dtype, warmup=0)
    config_lib.validate(config, jax.device_count())
    _, state, step = make(config)
    batch = random_batch(config)
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    adam = _adam_state(state.opt_state)
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(mu_dtype)}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}  # see config_lib
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert np.all(np.diff(losses) < 0), losses


def test_bfloat16_first_moment_follows_the_float32_run_closely():
    losses = {}
    for mu_dtype in ("float32", "bfloat16"):
        config = tiny_config()
        config.optim.update(mu_dtype=mu_dtype, warmup=0)
        _, state, step = make(config)
        for i in range(4):
            state, metrics = step(state, random_batch(config, seed=i))
        losses[mu_dtype] = float(metrics["loss"])
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=1e-2)


def test_an_unknown_mu_dtype_is_an_error_naming_the_field():
    config = tiny_config()
    config.optim.mu_dtype = "float16"
    with pytest.raises(ValueError, match=r"optim\.mu_dtype='float16'; valid: \['float32', 'bfloat16'\]"):
        config_lib.validate(config, jax.device_count())
