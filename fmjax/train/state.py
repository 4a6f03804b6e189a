"""TrainState pytree, created abstractly (jax.eval_shape) and then directly sharded."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from fmjax import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # completed optimizer steps
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 PRNG key; per-step keys are fold_in(rng, step)
    ema: Any = None  # exponential moving average of params (train.ema_decay > 0), else None
    # The step guard (train/step.py): steps whose update was skipped (non-finite loss or gradients,
    # or a loss spike), how many of the latest steps in a row were, and the running mean of the
    # losses of the applied steps (spike detection).
    skipped_steps: jax.Array = None
    bad_streak: jax.Array = None
    loss_mean: jax.Array = None


def inference_params(state: TrainState):
    """The parameters eval and sampling use: the EMA where the run keeps one."""
    return state.params if state.ema is None else state.ema


def init_params(task, rng, batch):
    """The task's initial (boxed) params; a task whose model takes more than batch["inputs"]
    (e.g. a diffusion model's timestep and labels) defines init_params(rng, batch) itself."""
    if hasattr(task, "init_params"):
        return task.init_params(rng, batch)
    return task.model.init(rng, batch["inputs"])["params"]


def _init_fn(task, tx, seed: int, batch_size: int, ema: bool):
    # tx.init sees the boxed (logically annotated) params, so the optimizer state inherits the
    # parameters' logical axes and is sharded like them; so does the EMA copy.
    def init():
        rng = jax.random.PRNGKey(seed)
        batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in task.abstract_batch(batch_size).items()}
        params = init_params(task, jax.random.fold_in(rng, 0), batch)
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=params, opt_state=tx.init(params), rng=jax.random.fold_in(rng, 1),
                          ema=params if ema else None, skipped_steps=zero, bad_streak=zero,
                          loss_mean=jnp.zeros((), jnp.float32))
    return init


def abstract_state(task, tx, seed: int, mesh, rules, ema: bool = False):
    """(abstract TrainState with plain ShapeDtypeStructs, NamedSharding tree). No compute."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(_init_fn(task, tx, seed, 1, ema))
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed), shardings)
    check_divisible(abstract)
    return abstract, shardings


def check_divisible(abstract):
    """Every sharded dimension must split evenly over its mesh axes; names the parameter if not."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        mesh = leaf.sharding.mesh
        for dim, axes in zip(leaf.shape, leaf.sharding.spec):
            names = axes if isinstance(axes, tuple) else (axes,)
            size = 1
            for name in names:
                size *= mesh.shape[name] if name else 1
            if dim % size:
                raise ValueError(f"{jax.tree_util.keystr(path)} has a dimension of {dim} that cannot be "
                                 f"split over mesh axes {names} of size {size}; change the mesh or the "
                                 f"model width/heads")


def init_state(task, tx, seed: int, abstract, shardings):
    """Initialises the state directly into its shardings (no host copy of the full model)."""
    init = _init_fn(task, tx, seed, 1, abstract.ema is not None)
    mesh = jax.tree.leaves(abstract)[0].sharding.mesh
    with jax.set_mesh(mesh):
        return jax.jit(lambda: nn.meta.unbox(init()), out_shardings=shardings)()
