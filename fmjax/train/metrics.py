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
    """Writes one record per call; each gets `elapsed_s`, the wall-clock seconds of training since
    step 0: the time since this writer was made, plus the `elapsed_s` the run had logged up to
    `resume_step` (so it keeps growing across resumes; the time between a stop and the resume's
    start, restoring included, is not counted)."""

    def __init__(self, workdir: str, total_steps: int, resume_step: int, progress_bar: bool):
        self.path = os.path.join(workdir, "metrics.jsonl")
        elapsed = 0.0
        if jax.process_index() == 0:
            elapsed = _drop_records_after(self.path, resume_step)
            self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))
        self.clock_start = time.perf_counter() - elapsed
        self.bar = tqdm.tqdm(total=total_steps, initial=resume_step, unit="step", dynamic_ncols=True,
                             disable=not progress_bar or jax.process_index() != 0)

    def write(self, step: int, record: dict):
        if jax.process_index() != 0:
            return
        record = {"step": step, **{k: _plain(v) for k, v in record.items()},
                  "elapsed_s": round(time.perf_counter() - self.clock_start, 3)}
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


def _drop_records_after(path: str, step: int) -> float:
    """On resume, forget steps logged after the checkpoint so no step appears twice; returns the
    largest `elapsed_s` of the records kept (0.0 if none has one), where the resumed clock goes on."""
    if not os.path.exists(path):
        return 0.0
    with open(path) as f:
        records = [(line, json.loads(line)) for line in f if line.strip()]
    kept = [(line, record) for line, record in records if record.get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(line for line, _ in kept)
    os.replace(path + ".tmp", path)
    return max((record["elapsed_s"] for _, record in kept if "elapsed_s" in record), default=0.0)
