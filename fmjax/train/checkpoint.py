"""Orbax checkpoints: train state + data-iterator state + config, saved together and atomically.

A step directory `checkpoints/<step>/` appears only once fully written (orbax writes to a
temporary directory and renames it), so a killed run never leaves a half step behind to restore.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, workdir: str, keep: int):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, config_dict: dict):
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config_dict)))

    def restore(self, step: int, abstract_state):
        """(state laid out as `abstract_state`'s shardings, data-iterator state)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out.state, out.data

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def require_latest_step(workdir: str) -> int:
    """The newest committed step under workdir/checkpoints; ValueError naming the workdir if none."""
    directory, step = os.path.abspath(os.path.join(workdir, "checkpoints")), None
    if os.path.isdir(directory):  # Checkpoints() would create it
        ckpts = Checkpoints(workdir, keep=1)
        step = ckpts.latest_step()
        ckpts.close()
    if step is None:
        raise ValueError(f"--workdir={workdir}: no committed checkpoint under {directory}; "
                         f"train first (mode=train)")
    return step


def restore_params(path: str, abstract_params):
    """Parameters from `path`: a workdir (its latest step) or a `checkpoints/<step>` directory."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if os.path.basename(path).isdigit():
        directory, step = os.path.dirname(path), int(os.path.basename(path))
    else:
        directory, step = path, None
    if not os.path.isdir(directory):
        raise ValueError(f"init_from={path!r}: no such workdir or checkpoint directory")
    manager = ocp.CheckpointManager(directory, item_names=("state", "data", "config"))
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise ValueError(f"init_from={path!r}: no committed checkpoint found there")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": abstract_params},
        restore_args={"params": ocp.checkpoint_utils.construct_restore_args(abstract_params)},
        partial_restore=True)))
    manager.close()
    return restored.state["params"]
