"""Preemption: on SIGTERM the loop saves a checkpoint at a step every process agrees on, then stops.

One process: a SIGTERM handler sets a flag that the loop reads after each step.
Several processes (jax.distributed): JAX's preemption sync manager, which the coordination service
starts with jax.distributed.initialize; a SIGTERM to any process is relayed to all of them, and
`reached_preemption_sync_point(step)` turns True on every process at the same step.
"""
from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils

EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a SIGTERM'd process: interrupted, not done


class Preempted(Exception):
    """Raised by the loop after the preemption checkpoint at `step` is written."""

    def __init__(self, step: int, directory: str):
        super().__init__(f"preempted (SIGTERM): saved step {step} to {directory}; rerun the same "
                         f"command to resume")
        self.step = step


class Watcher:
    """`reached(step)`: whether the run should save and stop after `step`. Use as a context manager."""

    def __init__(self):
        self.distributed = jax.process_count() > 1
        self.requested = False
        self.previous = None

    def __enter__(self):
        if not self.distributed and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._request)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None

    def _request(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        if self.distributed:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested
