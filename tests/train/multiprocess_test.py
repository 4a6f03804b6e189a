"""Two processes x two CPU devices (jax.distributed, gloo) train like one process with four devices.

The CLI runs twice on one workdir: 6 steps, then resumed to 10. The reference is one process with
four devices fed the same global batches: shard 0 and shard 1 of 2 of the data pipeline side by side
(each process of a 2-process run reads the documents with index % 2 == process_index, so its global
batches are not those of a plain 1-process run; docs/multihost.md). Measured: the losses of all 10
steps agree to within 4.8e-7 (one float32 ulp at ~7) and the eval loss exactly; the test allows 1e-5.
A SIGTERM to one of two processes makes both save the same step (train/preemption.py).
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from configs.lm import tiny
from fmjax.data import tokenizer as tokenizer_lib
from fmjax.train import preemption

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5
# A small model, constant learning rate after 2 warmup steps, so that a run of 6 steps resumed to 10
# follows the same schedule as one run of 10.
OVERRIDES = [
    "--config.eval.tasks=()", "--config.eval.datasets=()", "--config.train.progress_bar=False",
    "--config.train.batch_size=8", "--config.train.log_every=1", "--config.train.ckpt_every=3",
    "--config.train.eval_batches=1", "--config.data.seq_len=64", "--config.model.n_layers=2",
    "--config.model.width=64", "--config.model.mlp_dim=128", "--config.model.head_dim=16",
    "--config.optim.warmup=2", "--config.optim.min_lr_ratio=1.0",
    "--config.task.sample_prompts=()",  # generating samples would compile for about as long as training
]
# One process whose training batches are those of processes 0 and 1 of 2, concatenated.
REFERENCE = """
import numpy as np
from fmjax import main
from fmjax.data import pipeline

make = pipeline.make_train_iterator

class BothShards:
    def __init__(self, parts):
        self.parts = parts
    def __next__(self):
        batches = [next(p) for p in self.parts]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    def get_state(self):
        return {str(i): p.get_state() for i, p in enumerate(self.parts)}
    def set_state(self, state):
        for i, p in enumerate(self.parts):
            p.set_state(state[str(i)])

pipeline.make_train_iterator = lambda config, tokenizer, index=0, count=1: BothShards(
    [make(config, tokenizer, i, 2) for i in range(2)])
main.run()
"""


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cache = jax.config.jax_compilation_cache_dir  # tests/conftest.py's: runs load what others compiled
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Processes:
    """Commands started at once, each with its own log file. Those still running when the `with`
    block is left are killed with SIGKILL: once jax.distributed is up, SIGTERM only asks for a
    checkpoint."""

    def __init__(self, commands, envs, logs: Path):
        self.files = [open(logs.with_suffix(f".{i}.log"), "w+") for i in range(len(commands))]
        self.procs = [subprocess.Popen(c, cwd=ROOT, env=e, stdout=f, stderr=subprocess.STDOUT, text=True)
                      for c, e, f in zip(commands, envs, self.files)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stop()

    def _stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    def wait(self, codes=(0,), timeout=240):
        """[(returncode, output)] once all have ended. Once one ends with a code not in `codes`, the
        others are killed: a process whose peer is gone waits for the heartbeat timeout (100 s)."""
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            if any(p.poll() is not None and p.returncode not in codes for p in self.procs):
                break
            time.sleep(0.1)
        self._stop()
        outputs = []
        for f in self.files:
            f.seek(0)
            outputs.append(f.read())
        return [(p.returncode, output) for p, output in zip(self.procs, outputs)]


def _run(commands, envs, logs: Path):
    with _Processes(commands, envs, logs) as processes:
        return processes.wait()


def _cli(tmp_path, workdir, steps):
    return [sys.executable, "-m", "fmjax.main", "--config", "configs/lm/tiny.py", "--workdir", str(workdir),
            *OVERRIDES, f"--config.train.steps={steps}", f"--config.data.cache_dir={tmp_path / 'cache'}"]


def _two_processes(tmp_path, workdir, steps):
    flags = [f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2"]
    return [_cli(tmp_path, workdir, steps) + flags + [f"--process_id={i}"] for i in range(2)]


def _check(results, *names):
    for (code, output), name in zip(results, names):
        assert code == 0, f"{name}:\n{output[-3000:]}"


def _records(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r["loss"] for r in records if "loss" in r},
            {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r})


def _prepare(tmp_path, *workdirs):
    """The corpus and tokenizer prepared once, here, rather than by both processes at once."""
    config = tiny.get_config()
    config.data.cache_dir = str(tmp_path / "cache")
    tokenizer = tokenizer_lib.get_tokenizer(config)
    for w in workdirs:
        w.mkdir()
        shutil.copy(tokenizer.path, w / tokenizer_lib.WORKDIR_FILE)


@pytest.mark.parametrize("flags, env, message", [
    (["--process_id=0"], {}, "multi-process start-up: coordinator_address should be defined; pass "
                              "--coordinator_address, --num_processes and --process_id"),
    (["--num_processes=2", "--process_id=2"], {}, "--process_id=2 must be in [0, --num_processes=2)"),
    (["--distributed"], {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "x"},
     "JAX_PROCESS_ID='x' must be an integer"),
    (["--distributed"], {"JAX_COORDINATOR_ADDRESS": "localhost"},
     "JAX_COORDINATOR_ADDRESS='localhost' must be host:port"),
])
def test_bad_process_settings_fail_with_one_line(tmp_path, flags, env, message):
    cluster = ("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_", "OMPI_")
    clean = {k: v for k, v in _env(1).items() if not k.startswith(cluster)}
    cli = [sys.executable, "-m", "fmjax.main", "--config", "configs/lm/tiny.py", "--workdir", str(tmp_path)]
    result = subprocess.run(cli + flags, cwd=ROOT, env={**clean, **env}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"fmjax: error: {message}"), result.stderr[-2000:]


def test_two_processes_train_checkpoint_and_resume_like_one_process(tmp_path):
    reference, workdir = tmp_path / "reference", tmp_path / "run"
    _prepare(tmp_path, reference, workdir)

    reference_cli = _cli(tmp_path, reference, 10)
    reference_cli[1:3] = ["-c", REFERENCE]
    results = _run([reference_cli, *_two_processes(tmp_path, workdir, 6)], [_env(4), _env(2), _env(2)],
                   tmp_path / "first")
    _check(results, "reference", "process 0", "process 1")
    for i, (_, output) in enumerate(results[1:]):
        assert f"process {i} of 2: 2 of 4 devices" in output
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [3, 6]

    results = _run(_two_processes(tmp_path, workdir, 10), [_env(2)] * 2, tmp_path / "resumed")
    _check(results, "process 0", "process 1")
    assert all(f"resumed from {workdir / 'checkpoints'}/6" in output for _, output in results)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [6, 9, 10]

    losses, eval_losses = _records(workdir)  # written by process 0, the resumed run appending
    want, want_eval = _records(reference)
    assert sorted(losses) == sorted(want) == list(range(1, 11))
    assert losses == pytest.approx(want, abs=TOLERANCE, rel=0)
    assert eval_losses[10] == pytest.approx(want_eval[10], abs=TOLERANCE, rel=0)


def test_sigterm_to_one_process_makes_both_save_the_same_step(tmp_path):
    workdir = tmp_path / "run"
    _prepare(tmp_path, workdir)
    with _Processes(_two_processes(tmp_path, workdir, 10_000), [_env(2)] * 2, tmp_path / "preempted") as processes:
        metrics, deadline = workdir / "metrics.jsonl", time.monotonic() + 180
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert time.monotonic() < deadline and all(p.poll() is None for p in processes.procs)
            time.sleep(0.1)
        signalled = len(metrics.read_text().splitlines())
        processes.procs[1].send_signal(signal.SIGTERM)
        results = processes.wait(codes=(preemption.EXIT_CODE,))
    steps = set()
    for i, (code, output) in enumerate(results):
        assert code == preemption.EXIT_CODE, f"process {i}:\n{output[-3000:]}"
        steps |= set(re.findall(r"saved step (\d+)", output))
    [step] = steps  # the same on both
    assert signalled <= int(step) < 10_000
    assert (workdir / "checkpoints" / step).is_dir()
