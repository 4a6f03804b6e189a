"""Recommended XLA flags for GPUs, merged into XLA_FLAGS by the launcher before JAX starts a backend.

XLA reads XLA_FLAGS once, when the first backend starts, so fmjax.main calls apply() first thing.
The flags (as in the JAX / NVIDIA JAX-Toolbox GPU performance guides and MaxText's GPU recipes):
the latency-hiding scheduler, which overlaps collectives with compute; collectives combined up to
a size threshold, and not split by dimension, so FSDP's all-gathers and reduce-scatters go out as
a few large transfers; collectives pipelined across the iterations of the scanned layers' loop;
while loops unrolled by two (double buffering), so one iteration's transfers overlap the next
one's compute. Every name is known to the installed XLA (jaxlib 0.10): an unknown flag in XLA_FLAGS
aborts XLA at start-up, so a name is only added here after checking it against the release.

A flag already in XLA_FLAGS is never overridden; FMJAX_XLA_FLAGS=0 adds nothing; nothing is added
unless the run will be on a GPU (JAX_PLATFORMS names cuda / rocm / gpu first, or is unset and a JAX
GPU plugin is installed). No jax import here: importing this module starts no backend.
"""
from __future__ import annotations

import importlib.metadata
import os
import re

_GIB, _MIB = 1 << 30, 1 << 20
GPU_FLAGS = {
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    "xla_gpu_enable_highest_priority_async_stream": "true",
    "xla_gpu_all_reduce_combine_threshold_bytes": str(_GIB),
    "xla_gpu_all_gather_combine_threshold_bytes": str(128 * _MIB),
    "xla_gpu_reduce_scatter_combine_threshold_bytes": str(128 * _MIB),
    "xla_gpu_enable_all_gather_combine_by_dim": "false",
    "xla_gpu_enable_reduce_scatter_combine_by_dim": "false",
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_enable_while_loop_double_buffering": "true",
}
DISABLE_VAR = "FMJAX_XLA_FLAGS"
_GPU_PLATFORMS = ("cuda", "rocm", "gpu")


def flag_names(xla_flags: str) -> set[str]:
    """The flag names an XLA_FLAGS string sets (`--name=value` or a bare boolean `--name`)."""
    return set(re.findall(r"(?:^|\s)--([A-Za-z0-9_]+)", xla_flags))


def merge(xla_flags: str, recommended: dict[str, str]) -> str:
    """`xla_flags` as it is, followed by each recommended flag that it does not set already."""
    present = flag_names(xla_flags)
    added = [f"--{name}={value}" for name, value in recommended.items() if name not in present]
    return " ".join([xla_flags.strip(), *added]).strip()


def _gpu_plugin_installed() -> bool:
    # How JAX itself finds its CUDA / ROCm PJRT plugins; reading the entry points starts nothing.
    names = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
    return any(p in name for name in names for p in ("cuda", "rocm"))


def on_gpu(environ) -> bool:
    """Whether this process's JAX will run on a GPU, judged without starting a backend."""
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() in _GPU_PLATFORMS
    return _gpu_plugin_installed()


def apply(environ=None) -> list[str]:
    """Adds GPU_FLAGS to environ["XLA_FLAGS"] (os.environ by default) where they apply; the flags added."""
    environ = os.environ if environ is None else environ
    if environ.get(DISABLE_VAR, "1").strip().lower() in ("0", "false", "no", "off") or not on_gpu(environ):
        return []
    before = environ.get("XLA_FLAGS", "")
    environ["XLA_FLAGS"] = merge(before, GPU_FLAGS)
    return sorted(flag_names(environ["XLA_FLAGS"]) - flag_names(before))
