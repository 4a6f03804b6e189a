"""Benchmark of one config's train step: compile time, steady-state step time, throughput per device,
MFU, peak device memory and the host's data wait. Prints one JSON line.

  python experiments/bench/train_step.py --config configs/lm/tiny.py --steps 30
  python experiments/bench/train_step.py --config configs/lm/llama.py:125m --stand_in_tokenizer \
      --config.data.seq_len=512 --config.train.batch_size=4

- Step time: the median over --steps steps after 3 warm-up steps, each synchronised with the device
  (block_until_ready), on one batch kept on the device (--data=synthetic), so it is the step alone.
- --data=pipeline also runs --steps steps fed by the config's real training iterator, as the loop
  feeds them, and reports the host's mean wait for each batch (`data_wait_s`) and that run's step time.
- MFU: the task's training FLOPs per token / example (causal attention counted at half, as MaxText
  does) x throughput / peak. The peak comes from fmjax.train.metrics' table of accelerators, or on
  CPU from a float32 matmul measured in this process.
- Memory: the device's peak bytes in use where the backend reports it (GPU, TPU); on CPU, XLA's
  estimate for the compiled step (arguments + outputs + temporaries - aliased donations).
- --stand_in_tokenizer builds LM tasks around a tokenizer of model.vocab_size made-up tokens, so sizes
  whose vocabulary the embedded corpus cannot train (configs/lm/llama.py) run without a corpus.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from fmjax.train import loop, metrics as metrics_lib, optim, state as state_lib, step as step_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lm/tiny.py", "Config to benchmark.")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps (after 3 warm-up steps).")
_DATA = flags.DEFINE_enum("data", "synthetic", ["synthetic", "pipeline"],
                          "synthetic: one on-device batch; pipeline: also time the real data iterator.")
_STAND_IN = flags.DEFINE_bool("stand_in_tokenizer", False, "LM tasks: a made-up tokenizer of model.vocab_size.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/fmjax-bench", "Where the tokenizer is kept.")
_NAME = flags.DEFINE_string("name", "", "Name of this result (default: the config argument).")


def synthetic_batch(task, batch_size, vocab_size, sharding):
    out = {}
    for name, spec in task.abstract_batch(batch_size).items():
        if name in ("inputs", "targets"):
            value = jax.random.randint(jax.random.PRNGKey(0), spec.shape, 0, vocab_size, spec.dtype)
        elif name == "positions":
            value = jnp.broadcast_to(jnp.arange(spec.shape[1], dtype=spec.dtype), spec.shape)
        elif jnp.issubdtype(spec.dtype, jnp.floating):
            value = jax.random.uniform(jax.random.PRNGKey(1), spec.shape, spec.dtype)
        elif name in ("labels", "label"):
            value = jnp.zeros(spec.shape, spec.dtype)
        else:
            value = jnp.ones(spec.shape, spec.dtype)
        out[name] = jax.device_put(value, sharding)
    return out


def config_argument(argv) -> str:
    """What --config was given as (e.g. configs/lm/llama.py:125m)."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return _CONFIG.default if isinstance(_CONFIG.default, str) else "configs/lm/tiny.py"


def timed_steps(compiled, state, batches, steps: int):
    """(median step seconds, mean seconds waiting for a batch, state) over `steps` synchronised steps."""
    times, waits = [], []
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(batches)
        waits.append(time.perf_counter() - t)
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return statistics.median(times), statistics.mean(waits), state


def peak_memory(devices, compiled) -> tuple[float, str]:
    stats = devices[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30, "device peak"
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return total / 2**30, "XLA estimate"


def main(_):
    config = _CONFIG.value
    task = None
    if _STAND_IN.value and config.task.name == "lm":
        from fmjax.data.tokenizer import StandInTokenizer
        from fmjax.tasks.lm import LMTask
        task = LMTask(config, StandInTokenizer(config.model.vocab_size))
    run = loop.setup(config, _WORKDIR.value, task=task)
    state = state_lib.init_state(run.task, run.tx, config.seed, run.abstract, run.shardings)
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(run.task, run.tx, optim.schedule(config), config.train.microbatches,
                                 config.train.ema_decay, config.train.spike_factor),
        run.shardings, run.batch_sharding, run.mesh)
    vocab = config.model.get("vocab_size", 1)
    batch = synthetic_batch(run.task, config.train.batch_size, vocab, run.batch_sharding)
    devices = run.mesh.devices.flatten().tolist()
    result = {"name": _NAME.value or config_argument(sys.argv),
              "overrides": [a for a in sys.argv[1:] if a.startswith("--config.")]}
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
        t = time.perf_counter()
        compiled = train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t
        for _ in range(3):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
        step_s, _, state = timed_steps(compiled, state, iter(lambda: batch, None), _STEPS.value)
        if _DATA.value == "pipeline":
            data = run.task.train_iterator(0, 1)
            batches = (run.to_global(next(data)) for _ in iter(int, 1))
            next(batches)  # the iterator's start-up is not a per-step wait
            pipeline_step_s, wait_s, state = timed_steps(compiled, state, batches, _STEPS.value)
            result.update(pipeline_step_s=pipeline_step_s, data_wait_s=wait_s)
    units = config.train.batch_size * run.task.units_per_example()
    rate = units / step_s
    peak = metrics_lib.peak_flops(devices)
    memory_gib, memory_kind = peak_memory(devices, compiled)
    result.update({
        "device": devices[0].device_kind, "devices": len(devices), "host": platform.node(),
        "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "batch": config.train.batch_size, "units_per_example": run.task.units_per_example(),
        "compile_s": round(compile_s, 2), "step_s": step_s,
        f"{run.task.unit}_per_s_per_device": rate / len(devices),
        "mfu": rate * run.task.flops_per_unit() / peak, "peak_flops": peak,
        "memory_gib": round(memory_gib, 3), "memory_kind": memory_kind, "jax": jax.__version__,
    })
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
