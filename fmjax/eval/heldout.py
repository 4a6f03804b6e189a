"""Held-out evaluation: sums a task's eval metrics over its eval batches (plus the scores of its
generated samples, for tasks that define sample_scores); writes eval/results.json."""
from __future__ import annotations

import json
import os

import jax
import numpy as np


def evaluate(eval_step, params, batches, task, to_global) -> dict:
    """task.eval_results of the eval sums over all batches (float64 numpy scalars or arrays), then
    task.sample_scores(params) where the task has it."""
    sums = None
    for batch in batches:
        out = jax.device_get(eval_step(params, to_global(batch)))
        sums = out if sums is None else jax.tree.map(np.add, sums, out)
    results = task.eval_results({k: np.asarray(v, np.float64) for k, v in sums.items()})
    if hasattr(task, "sample_scores"):
        results.update(task.sample_scores(params))
    return results


def write_results(workdir: str, step: int, split: str, results: dict) -> str:
    path = os.path.join(workdir, "eval", "results.json")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump({"step": step, "split": split, **results}, f, indent=2)
        os.replace(path + ".tmp", path)
    return path
