"""Benchmark: compile time, steady-state step time, tokens/s and MFU of a config's train step.

Synthetic batches (no data pipeline), device-synchronised timing, median of many steps after
warm-up. Prints one JSON line per result.

  python experiments/bench/train_step.py --config configs/lm/tiny.py --steps 30 \
      --config.train.batch_size=32
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from fmjax.train import loop, metrics as metrics_lib, optim, state as state_lib, step as step_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lm/tiny.py", "Config to benchmark.")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps (after 3 warm-up steps).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/fmjax-bench", "Where the tokenizer is kept.")


def synthetic_batch(task, batch_size, vocab_size, sharding):
    out = {}
    for name, spec in task.abstract_batch(batch_size).items():
        if name in ("inputs", "targets"):
            value = jax.random.randint(jax.random.PRNGKey(0), spec.shape, 0, vocab_size, spec.dtype)
        elif name == "positions":
            value = jnp.broadcast_to(jnp.arange(spec.shape[1], dtype=spec.dtype), spec.shape)
        else:
            value = jnp.ones(spec.shape, spec.dtype)
        out[name] = jax.device_put(value, sharding)
    return out


def main(_):
    config = _CONFIG.value
    run = loop.setup(config, _WORKDIR.value)
    state = state_lib.init_state(run.task, run.tx, config.seed, run.abstract, run.shardings)
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(run.task, run.tx, optim.schedule(config), config.train.microbatches),
        run.shardings, run.batch_sharding, run.mesh)
    batch = synthetic_batch(run.task, config.train.batch_size, config.model.vocab_size, run.batch_sharding)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
        t = time.perf_counter()
        compiled = train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t
        for _ in range(3):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times = []
        for _ in range(_STEPS.value):
            t = time.perf_counter()
            state, m = compiled(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    units = config.train.batch_size * run.task.units_per_example()
    devices = run.mesh.devices.flatten().tolist()
    peak = metrics_lib.peak_flops(devices)
    rate = units / step_s
    print(json.dumps({
        "config": sys.argv[1:], "device": devices[0].device_kind, "devices": len(devices),
        "params": sum(x.size for x in jax.tree.leaves(state.params)), "compile_s": round(compile_s, 2),
        "step_s": step_s, f"{run.task.unit}_per_s": rate, "mfu": rate * run.task.flops_per_unit() / peak,
        "peak_flops": peak, "jax": jax.__version__}))


if __name__ == "__main__":
    app.run(main)
