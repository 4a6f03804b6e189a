"""The jitted train and eval steps: pure functions of (state, batch).

Gradient accumulation runs inside the step (lax.scan over microbatches) on summed losses, so M
microbatches give the same update as one M-times larger batch. Shapes: B batch, M microbatches.

The step guard: a step whose loss or gradients hold a NaN or Inf (or, with spike_factor > 0, whose
loss exceeds spike_factor times the running mean of the applied steps' losses) leaves params,
optimizer state and EMA bitwise unchanged; it still counts as a step (the batch is consumed, the
RNG moves on) and is counted in state.skipped_steps / state.bad_streak and the metrics.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fmjax.sharding import replicated
from fmjax.train.state import TrainState


def _split_microbatches(batch, m):
    # Row i of microbatch j is row i*m + j: every microbatch keeps rows from every data shard.
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1), batch)


def ema_update(ema, params, decay: float, step):
    """decay * ema + (1 - decay) * params, with the decay warmed up as (1 + step) / (10 + step) so the
    average is not dominated by the random init early on (as in Keras / timm EMA)."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


LOSS_MEAN_DECAY = 0.99  # of the running mean of applied steps' losses that spikes are measured against
SPIKE_WARMUP = 20  # applied steps before a loss can count as a spike


def _is_spike(loss, state: TrainState, spike_factor: float):
    applied = state.step - state.skipped_steps
    mean = state.loss_mean / (1.0 - LOSS_MEAN_DECAY ** applied.astype(jnp.float32))  # bias-corrected
    return (spike_factor > 0) & (applied >= SPIKE_WARMUP) & (loss > spike_factor * mean)


def guard(state: TrainState, new: TrainState, loss, grad_norm, spike_factor: float):
    """`new`, or `state` with only the step counter, RNG position and guard counters moved on when
    the step is bad (non-finite loss or gradients, or a loss spike). Returns (state, skipped)."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    bad = ~finite | _is_spike(loss, state, spike_factor)
    keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(bad, b, a), n, o)
    loss_mean = LOSS_MEAN_DECAY * state.loss_mean + (1 - LOSS_MEAN_DECAY) * loss
    return new.replace(
        params=keep(new.params, state.params), opt_state=keep(new.opt_state, state.opt_state),
        ema=None if state.ema is None else keep(new.ema, state.ema),
        skipped_steps=state.skipped_steps + bad.astype(jnp.int32),
        bad_streak=jnp.where(bad, state.bad_streak + 1, 0),
        loss_mean=jnp.where(bad, state.loss_mean, loss_mean)), bad


def make_train_step(task, tx, lr_schedule, microbatches: int, ema_decay: float = 0.0, spike_factor: float = 0.0):
    grad_fn = jax.value_and_grad(task.loss, has_aux=True)

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if microbatches == 1:
            (_, sums), grads = grad_fn(state.params, batch, rng)
        else:
            def accumulate(carry, xs):
                i, micro = xs
                (_, s), g = grad_fn(state.params, micro, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (s, g)), None

            micro = _split_microbatches(batch, microbatches)
            sums_shape = jax.eval_shape(task.loss, state.params, jax.tree.map(lambda x: x[0], micro), rng)[1]
            zeros = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape),
                     jax.tree.map(jnp.zeros_like, state.params))
            (sums, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), micro))
        weight = jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = None if state.ema is None else ema_update(state.ema, params, ema_decay, state.step)
        metrics = {k: v / weight for k, v in sums.items() if k != "weight"}
        metrics.update(grad_norm=optax.global_norm(grads), lr=lr_schedule(state.step),
                       weight=sums["weight"])
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
        new, _ = guard(state, new, metrics["loss"], metrics["grad_norm"], spike_factor)
        metrics.update(skipped_steps=new.skipped_steps, bad_streak=new.bad_streak)
        return new, metrics

    return train_step


def jit_train_step(train_step, state_shardings, batch_sharding, mesh):
    return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))


def jit_eval_step(task, params_shardings, batch_sharding, mesh):
    return jax.jit(task.eval_sums, in_shardings=(params_shardings, batch_sharding),
                   out_shardings=replicated(mesh))
