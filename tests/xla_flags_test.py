"""GPU XLA flags: merged into XLA_FLAGS without overriding the user's, only for GPU runs, names known to XLA."""
import os
import subprocess
import sys

import pytest

from fmjax import xla_flags
from fmjax.xla_flags import GPU_FLAGS, apply, flag_names, merge


def test_merge_appends_only_the_flags_not_already_set():
    user = "--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/x --xla_gpu_enable_pipelined_all_gather"
    merged = merge(user, GPU_FLAGS)
    assert merged.startswith(user + " ")  # the user's string, untouched, first
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in merged
    assert merged.count("xla_gpu_enable_pipelined_all_gather") == 1  # a bare boolean counts as set
    assert flag_names(merged) == set(GPU_FLAGS) | {"xla_dump_to"}
    assert merge(merged, GPU_FLAGS) == merged  # idempotent
    assert merge("", {"a": "1", "b": "2"}) == "--a=1 --b=2"


@pytest.mark.parametrize("environ, added", [
    ({"JAX_PLATFORMS": "cuda"}, True),
    ({"JAX_PLATFORMS": "gpu,cpu"}, True),
    ({"JAX_PLATFORMS": "cpu"}, False),
    ({"JAX_PLATFORMS": "tpu"}, False),
    ({"JAX_PLATFORMS": "cuda", "FMJAX_XLA_FLAGS": "0"}, False),
])
def test_apply_only_on_gpu_and_not_when_disabled(environ, added):
    environ = dict(environ, XLA_FLAGS="--xla_gpu_all_reduce_combine_threshold_bytes=1")
    names = apply(environ)
    assert bool(names) == added
    assert environ["XLA_FLAGS"].startswith("--xla_gpu_all_reduce_combine_threshold_bytes=1")
    assert "xla_gpu_all_reduce_combine_threshold_bytes" not in names
    assert flag_names(environ["XLA_FLAGS"]) == ({"xla_gpu_all_reduce_combine_threshold_bytes"} | set(names))


def test_without_jax_platforms_a_gpu_plugin_decides(monkeypatch):
    for installed in (True, False):
        monkeypatch.setattr(xla_flags, "_gpu_plugin_installed", lambda installed=installed: installed)
        assert bool(apply({})) == installed


def test_every_gpu_flag_is_known_to_the_installed_xla():
    """XLA aborts at start-up on an unknown name in XLA_FLAGS; a CPU process parses the GPU flags too."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=merge("", GPU_FLAGS))
    run = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.ones(1).block_until_ready()"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
