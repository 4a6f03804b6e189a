"""Metric sinks: DIR/metrics.jsonl, TensorBoard events in DIR/tb/, a console progress bar; MFU."""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import tensorboardX
import tqdm

# Dense bf16 peak FLOP/s per chip (matmul units), by substring of jax's device_kind.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12,
}


def measure_cpu_flops(size: int = 1024, repeats: int = 5) -> float:
    """Achievable float32 matmul FLOP/s of this host through XLA (best of a few runs)."""
    x = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best


def peak_flops(devices) -> float:
    """Peak FLOP/s of all `devices` together; CPU is measured (fake CPU devices share the host)."""
    kind = devices[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops * len(devices)
    if devices[0].platform == "cpu":
        return measure_cpu_flops()
    return float("nan")


class MetricsWriter:
    def __init__(self, workdir: str, total_steps: int, resume_step: int, progress_bar: bool):
        self.path = os.path.join(workdir, "metrics.jsonl")
        if jax.process_index() == 0:
            _drop_records_after(self.path, resume_step)
            self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))
        self.bar = tqdm.tqdm(total=total_steps, initial=resume_step, unit="step", dynamic_ncols=True,
                             disable=not progress_bar or jax.process_index() != 0)

    def write(self, step: int, record: dict):
        if jax.process_index() != 0:
            return
        record = {"step": step, **{k: _plain(v) for k, v in record.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def advance(self, steps: int, **postfix):
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self.bar.update(steps)

    def close(self):
        self.bar.close()
        if jax.process_index() == 0:
            self.tb.close()


def _plain(value):
    value = jax.device_get(value)
    return value.item() if hasattr(value, "item") else value


def _drop_records_after(path: str, step: int):
    """On resume, forget steps logged after the checkpoint so no step appears twice."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
