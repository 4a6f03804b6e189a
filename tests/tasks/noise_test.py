"""Diffusion math: schedules and forward noising against closed forms; samplers' determinism, shapes, ranges."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.tasks import noise

jax.config.update("jax_numpy_rank_promotion", "raise")


def test_linear_schedule_is_the_product_of_ddpm_betas():
    a = noise.linear_alpha_bar(1000)
    np.testing.assert_allclose(a, np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-12)
    assert 0.9998 < a[0] < 1 and a[-1] < 1e-4  # nearly clean at the first step, pure noise at the last
    np.testing.assert_allclose(noise.linear_alpha_bar(250)[-1], a[-1], rtol=0.5)  # same noise range for any T


def test_cosine_schedule_is_the_squared_cosine_ratio_until_the_beta_clip():
    t, s = 1000, 0.008
    f = lambda i: math.cos((i / t + s) / (1 + s) * math.pi / 2) ** 2
    a = noise.cosine_alpha_bar(t)
    for i in (0, 10, 500, 900, 980):
        np.testing.assert_allclose(a[i], f(i + 1) / f(0), rtol=1e-9)
    assert np.all(np.diff(a) < 0) and a[-1] >= 0
    with pytest.raises(ValueError, match=r"task.schedule='sqrt'; valid: \['linear', 'cosine'\]"):
        noise.alpha_bar("sqrt", 10)


@pytest.mark.parametrize("name", noise.SCHEDULES)
def test_one_step_noising_composes_into_the_closed_form(name):
    # x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) eps_i keeps x_0's coefficient sqrt(alpha_bar_i)
    # and accumulates noise variance 1 - alpha_bar_i: the closed form q(x_i | x_0) that add_noise uses.
    a = noise.alpha_bar(name, 200)
    betas = 1 - a / np.concatenate([[1.0], a[:-1]])
    coef, var = 1.0, 0.0
    for i, beta in enumerate(betas):
        coef, var = coef * math.sqrt(1 - beta), (1 - beta) * var + beta
        np.testing.assert_allclose([coef, var], [math.sqrt(a[i]), 1 - a[i]], rtol=1e-9, atol=1e-12)
    rng = np.random.default_rng(0)
    x0, eps = rng.normal(size=(2, 4, 4, 1)), rng.normal(size=(2, 4, 4, 1))
    ab = np.array([a[3], a[150]])
    expected = np.sqrt(ab)[:, None, None, None] * x0 + np.sqrt(1 - ab)[:, None, None, None] * eps
    np.testing.assert_allclose(noise.add_noise(x0, eps, ab), expected, rtol=1e-6)


@pytest.mark.parametrize("prediction", noise.PREDICTIONS)
def test_targets_invert_to_x0_and_eps(prediction):
    rng = np.random.default_rng(1)
    x0, eps = rng.normal(size=(3, 4, 4, 2)).astype(np.float32), rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
    ab = jnp.array([0.99, 0.5, 0.01])
    x_t = noise.add_noise(x0, eps, ab)
    got_x0, got_eps = noise.x0_and_eps(prediction, noise.target(prediction, x0, eps, ab), x_t, ab)
    np.testing.assert_allclose(got_x0, x0, atol=2e-4 if prediction == "v" else 2e-3)
    np.testing.assert_allclose(got_eps, eps, atol=1e-4)


def test_ddpm_sigma_with_every_step_is_the_posterior_standard_deviation():
    a = noise.linear_alpha_bar(100)
    i = np.arange(1, 100)
    beta = 1 - a[i] / a[i - 1]
    posterior = beta * (1 - a[i - 1]) / (1 - a[i])
    sigma2 = (1 - a[i - 1]) / (1 - a[i]) * (1 - a[i] / a[i - 1])  # the sampler's eta = 1 sigma^2
    np.testing.assert_allclose(sigma2, posterior, rtol=1e-9)
    np.testing.assert_array_equal(noise.sampling_steps(100, 100), np.arange(99, -1, -1))
    steps = noise.sampling_steps(1000, 10)
    assert len(steps) == 10 and steps[0] == 999 and steps[-1] == 0 and np.all(np.diff(steps) < 0)


def oracle(point, prediction, alpha_bar):
    """The exact model output when all data is the single image `point`."""
    def denoise(x_t, t_B):
        i = jnp.round(t_B * alpha_bar.shape[0]).astype(jnp.int32)
        a = alpha_bar[i][:, None, None, None]
        eps = (x_t - jnp.sqrt(a) * point) / jnp.sqrt(1 - a)
        return eps if prediction == "epsilon" else jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * point
    return denoise


@pytest.mark.parametrize("prediction", noise.PREDICTIONS)
@pytest.mark.parametrize("eta, steps", [(0.0, 20), (1.0, 200)])
def test_samplers_recover_a_single_point_distribution(prediction, eta, steps):
    alpha_bar = jnp.asarray(noise.cosine_alpha_bar(200), jnp.float32)
    point = jnp.asarray(np.random.default_rng(2).uniform(-0.9, 0.9, (1, 6, 6, 1)), jnp.float32)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 6, 1))
    out = jax.jit(lambda x, k: noise.sample(oracle(point, prediction, alpha_bar), alpha_bar, x, k,
                                            prediction=prediction, steps=steps, eta=eta))(x_T, jax.random.PRNGKey(1))
    assert out.shape == x_T.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, jnp.broadcast_to(point, out.shape), atol=1e-3)


def test_ddim_with_eta_0_is_deterministic_and_ddpm_is_not_and_both_end_in_range():
    alpha_bar = jnp.asarray(noise.linear_alpha_bar(100), jnp.float32)
    w = jax.random.normal(jax.random.PRNGKey(3), (6 * 6, 6 * 6)) * 0.3
    wild = lambda x, t: 3.0 * jnp.tanh((x.reshape(x.shape[0], -1) @ w).reshape(x.shape))  # an untrained net
    x_T = jax.random.normal(jax.random.PRNGKey(0), (5, 6, 6, 1))
    run = jax.jit(lambda k, eta: noise.sample(wild, alpha_bar, x_T, k, prediction="epsilon", steps=25, eta=eta))
    one, two = run(jax.random.PRNGKey(1), 0.0), run(jax.random.PRNGKey(2), 0.0)
    np.testing.assert_array_equal(one, two)
    three, four = run(jax.random.PRNGKey(1), 1.0), run(jax.random.PRNGKey(2), 1.0)
    assert not np.allclose(three, four)
    for out in (one, three, four):
        assert out.shape == x_T.shape and np.all(np.abs(np.asarray(out)) <= 1.0 + 1e-6)


def test_guidance_extrapolates_from_unconditional_to_conditional():
    model_fn = lambda x, t, conditional: x + (2.0 if conditional else 0.5)
    x, t = jnp.zeros((2, 2, 2, 1)), jnp.zeros((2,))
    np.testing.assert_allclose(noise.guided(model_fn, 3.0)(x, t), 0.5 + 3.0 * 1.5)
    np.testing.assert_allclose(noise.guided(model_fn, 1.0)(x, t), 2.0)
