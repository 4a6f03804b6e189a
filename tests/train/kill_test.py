"""Killed runs lose nothing: kill -9 at random points (and during an asynchronous save) or SIGTERM
through the CLI, then the same command again, gives the uninterrupted run's losses as exact floats
and its final parameters bitwise, with every step logged once.

The runs are separate processes with the test's XLA flags and compilation cache. XLA's CPU
threading needs no pinning for this: the same executable on the same 8 fake devices reproduces its
results bitwise (the in-process resume test in loop_test.py relies on the same fact).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS, CKPT_EVERY = 14, 3
# The overrides of configs/lm/tiny.py every run here uses (in-process and on the command line).
OVERRIDES = {
    "model.vocab_size": 512, "model.width": 64, "model.n_layers": 2, "model.n_heads": 4,
    "model.n_kv_heads": 2, "model.head_dim": 16, "model.mlp_dim": 128, "data.seq_len": 32,
    "train.steps": STEPS, "train.batch_size": 8, "train.log_every": 1, "train.eval_every": 1000,
    "train.eval_batches": 1, "train.ckpt_every": CKPT_EVERY, "train.progress_bar": False,
    "task.sample_prompts": (), "eval.tasks": (), "eval.datasets": (),
}


def config(cache_dir):
    from configs.lm import tiny
    c = tiny.get_config()
    for key, value in {**OVERRIDES, "data.cache_dir": str(cache_dir)}.items():
        section, field = key.split(".")
        c[section][field] = value
    return c


def env():
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", PYTHONPATH=str(ROOT))


def cli(workdir, cache_dir):
    flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "data.cache_dir": cache_dir}.items()]
    return [sys.executable, "-m", "fmjax.main", "--config", "configs/lm/tiny.py", "--workdir", str(workdir), *flags]


def killed_during_save(workdir, cache_dir, step):
    """This file as a program: trains, and SIGKILLs itself right after starting the save of `step`."""
    return [sys.executable, __file__, str(workdir), str(cache_dir), str(step)]


def start(command):
    return subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def training_records(workdir):
    """metrics.jsonl's complete lines of training steps (not of evals)."""
    path = workdir / "metrics.jsonl"
    records = [json.loads(line) for line in open(path) if line.endswith("\n")] if path.exists() else []
    return [r for r in records if "grad_norm" in r]


def logged_steps(workdir):
    return [r["step"] for r in training_records(workdir)]


def stop_after(process, workdir, steps, sig):
    """Sends `sig` once `steps` steps are logged (or the process ended); returns its exit code."""
    try:
        while process.poll() is None and len(logged_steps(workdir)) < steps:
            time.sleep(0.01)
        if process.poll() is None and sig is not None:
            process.send_signal(sig)
        process.wait(timeout=120)
        return process.returncode, process.stdout.read()
    finally:
        process.kill()


def losses(workdir):
    return {r["step"]: r["loss"] for r in training_records(workdir)}


def final_params(workdir, cache_dir):
    from fmjax.train import checkpoint, loop
    run = loop.setup(config(cache_dir), str(workdir))
    state, _ = checkpoint.Checkpoints(str(workdir), 3).restore(STEPS, run.abstract)
    return jax.device_get(state.params)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from fmjax.train import loop
    tmp = tmp_path_factory.mktemp("reference")
    loop.train(loop.setup(config(tmp / "cache"), str(tmp / "run")))
    return tmp


def test_kill_9_at_random_points_and_during_a_save_then_rerun_equals_an_uninterrupted_run(tmp_path, reference):
    cache = reference / "cache"
    workdir = tmp_path / "run"
    rng = np.random.default_rng(int(os.environ.get("FMJAX_KILL_SEED", "0")))
    code, out = stop_after(start(killed_during_save(workdir, cache, 6)), workdir, STEPS + 1, None)
    assert code == -signal.SIGKILL, out[-3000:]
    after_save_kill = sorted(os.listdir(workdir / "checkpoints"))  # step 6 as a temporary directory, or committed
    kills = []
    for _ in range(2):  # kill -9 once the log shows a random number of further steps
        target = len(logged_steps(workdir)) - len(logged_steps(workdir)) % CKPT_EVERY + int(rng.integers(1, 5))
        code, out = stop_after(start(cli(workdir, cache)), workdir, target, signal.SIGKILL)
        assert code == -signal.SIGKILL, out[-3000:]
        kills.append(logged_steps(workdir)[-1])
    code, out = stop_after(start(cli(workdir, cache)), workdir, STEPS + 1, None)
    assert code == 0, out[-3000:]
    print(f"checkpoints after the kill in the save of step 6: {after_save_kill}; then killed after logging "
          f"steps {kills}")
    assert logged_steps(workdir) == list(range(1, STEPS + 1))  # every step once
    assert losses(workdir) == losses(reference / "run")  # exact floats
    jax.tree.map(np.testing.assert_array_equal, final_params(workdir, cache), final_params(reference / "run", cache))


def test_sigterm_through_the_cli_saves_the_current_step_exits_143_and_resumes_exactly(tmp_path, reference):
    cache = reference / "cache"
    workdir = tmp_path / "run"
    code, out = stop_after(start(cli(workdir, cache)), workdir, 5, signal.SIGTERM)
    assert code == 143, out[-3000:]
    stopped = int(out.split("saved step ")[1].split()[0])
    assert f"fmjax: preempted (SIGTERM): saved step {stopped}" in out and "Traceback" not in out
    assert stopped >= 5
    assert str(stopped) in os.listdir(workdir / "checkpoints")
    code, out = stop_after(start(cli(workdir, cache)), workdir, STEPS + 1, None)
    assert code == 0 and f"resumed from {workdir / 'checkpoints'}/{stopped}" in out, out[-3000:]
    assert logged_steps(workdir) == list(range(1, STEPS + 1))
    assert losses(workdir) == losses(reference / "run")


if __name__ == "__main__":  # killed_during_save
    sys.path.insert(0, str(ROOT))
    from fmjax.train import loop
    workdir, cache_dir, kill_step = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def kill_in_save(step, state, metrics):
        if step == kill_step:  # the loop has just started this step's asynchronous save
            os.kill(os.getpid(), signal.SIGKILL)

    loop.train(loop.setup(config(cache_dir), workdir), hooks=[kill_in_save])
