"""Denoising diffusion math: noise schedules, forward noising, prediction targets, samplers.

Discrete time i = 0 .. T-1 (T = len(schedule)); the model sees t = i / T in [0, 1). A schedule is
the array alpha_bar_T (signal variance left at step i): x_i = sqrt(alpha_bar_i) x_0 +
sqrt(1 - alpha_bar_i) eps. The model predicts eps (epsilon-prediction, DDPM) or
v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (v-prediction, Salimans & Ho 2022).

Sampling walks S evenly spaced steps of the T with the DDIM update (Song et al. 2021); eta = 0 is
deterministic DDIM, eta = 1 is ancestral DDPM (with S = T exactly DDPM's posterior variance).
Classifier-free guidance mixes a conditional and an unconditional prediction:
uncond + scale * (cond - uncond). Shapes: B batch, H x W x C image, T schedule steps, S sampling steps.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("epsilon", "v")
SAMPLERS = ("ddpm", "ddim")


def linear_alpha_bar(steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM's linear betas (given for T = 1000; rescaled by 1000 / T so any T spans the same noise)."""
    scale = 1000.0 / steps
    betas = np.linspace(scale * beta_start, scale * beta_end, steps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def cosine_alpha_bar(steps: int, offset: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = f(t) / f(0), f(t) = cos((t + s) / (1 + s) * pi/2)^2,
    with each beta clipped to max_beta so the last step is not a singularity."""
    f = np.cos((np.arange(steps + 1, dtype=np.float64) / steps + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = np.minimum(1.0 - f[1:] / f[:-1], max_beta)
    return np.cumprod(1.0 - betas)


def alpha_bar(name: str, steps: int) -> np.ndarray:
    schedules = {"linear": linear_alpha_bar, "cosine": cosine_alpha_bar}
    if name not in schedules:
        raise ValueError(f"task.schedule={name!r}; valid: {list(SCHEDULES)}")
    return schedules[name](steps)


def _expand(a_B, x):
    return a_B.reshape(a_B.shape + (1,) * (x.ndim - 1))


def add_noise(x0_BxHxWxC, noise_BxHxWxC, alpha_bar_B):
    """Forward noising q(x_i | x_0) with the given noise."""
    a = _expand(alpha_bar_B, x0_BxHxWxC)
    return jnp.sqrt(a) * x0_BxHxWxC + jnp.sqrt(1.0 - a) * noise_BxHxWxC


def target(prediction: str, x0, noise, alpha_bar_B):
    """What the model is trained to output."""
    if prediction == "epsilon":
        return noise
    a = _expand(alpha_bar_B, x0)
    return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0


def x0_and_eps(prediction: str, model_out, x_t, alpha_bar_B):
    """(x_0, eps) implied by the model output at x_t."""
    a = _expand(alpha_bar_B, x_t)
    if prediction == "epsilon":
        return (x_t - jnp.sqrt(1.0 - a) * model_out) / jnp.sqrt(a), model_out
    return jnp.sqrt(a) * x_t - jnp.sqrt(1.0 - a) * model_out, jnp.sqrt(1.0 - a) * x_t + jnp.sqrt(a) * model_out


def sampling_steps(total: int, count: int) -> np.ndarray:
    """`count` step indices from total - 1 down to 0, evenly spaced (DDIM's respacing)."""
    return np.unique(np.linspace(0, total - 1, count).round().astype(np.int32))[::-1].copy()


def sample(denoise: Callable, alpha_bar_T, x_T, rng, *, prediction: str, steps: int, eta: float,
           clip: bool = True):
    """Runs the reverse process from noise x_T; `denoise(x_t, t_B)` is the (guided) model output.

    Each step predicts x_0 (clipped to [-1, 1] where `clip`), re-derives eps from it, and moves to
    the previous kept step: x_prev = sqrt(a') x_0 + sqrt(1 - a' - sigma^2) eps + sigma z with
    sigma = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a'), a' = 1 after the last step.
    """
    total = alpha_bar_T.shape[0]
    indices = jnp.asarray(sampling_steps(total, steps))
    previous = jnp.concatenate([indices[1:], jnp.array([-1], jnp.int32)])
    batch = x_T.shape[0]

    def step(x_t, xs):
        n, i, j = xs
        a = jnp.full((batch,), alpha_bar_T[i])
        a_prev = jnp.full((batch,), jnp.where(j >= 0, alpha_bar_T[jnp.maximum(j, 0)], 1.0))
        x0, eps = x0_and_eps(prediction, denoise(x_t, jnp.full((batch,), i / total)), x_t, a)
        if clip:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = (x_t - jnp.sqrt(_expand(a, x_t)) * x0) / jnp.sqrt(1.0 - _expand(a, x_t))
        sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a)) * jnp.sqrt(1.0 - a / a_prev)
        z = jax.random.normal(jax.random.fold_in(rng, n), x_t.shape, x_t.dtype)
        a_prev, sigma = _expand(a_prev, x_t), _expand(sigma, x_t)
        x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma**2, 0.0)) * eps + sigma * z
        return x_prev, None

    x_0, _ = jax.lax.scan(step, x_T, (jnp.arange(indices.shape[0]), indices, previous))
    return x_0


def guided(model_fn: Callable, scale: float) -> Callable:
    """`model_fn(x, t, conditional: bool)` -> classifier-free guided output (scale 1: conditional only)."""
    if scale == 1.0:
        return lambda x, t: model_fn(x, t, True)

    def denoise(x, t):
        cond, uncond = model_fn(x, t, True), model_fn(x, t, False)
        return uncond + scale * (cond - uncond)
    return denoise
