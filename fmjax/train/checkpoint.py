"""Orbax checkpoints: train state + data-iterator state + config, saved together and atomically.

A step directory `checkpoints/<step>/` appears only once fully written (orbax writes to a
temporary directory and renames it), so a killed run never leaves a half step behind to restore.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

ITEMS = ("state", "data", "config")


def _manager(directory: str, options=None) -> ocp.CheckpointManager:
    """A manager that knows every item's handler, so metadata can be read without restoring."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.StandardSave, ocp.StandardCheckpointHandler)
    registry.add("state", ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
    registry.add("state", ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler)
    for item in ("data", "config"):
        registry.add(item, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
        registry.add(item, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
    return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


class Checkpoints:
    def __init__(self, workdir: str, keep: int):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=True)
        self.manager = _manager(self.directory, options)

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


def latest_step(workdir: str) -> int | None:
    """The newest committed step under workdir/checkpoints, or None (creates nothing)."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    ckpts = Checkpoints(workdir, keep=1)
    step = ckpts.latest_step()
    ckpts.close()
    return step


def require_latest_step(workdir: str) -> int:
    """The newest committed step under workdir/checkpoints; ValueError naming the workdir if none."""
    directory, step = os.path.abspath(os.path.join(workdir, "checkpoints")), latest_step(workdir)
    if step is None:
        raise ValueError(f"--workdir={workdir}: no committed checkpoint under {directory}; "
                         f"train first (mode=train)")
    return step


def _step_directory(path: str) -> tuple[str, int]:
    """(checkpoints directory, step) for a workdir (its newest step) or a checkpoints/<step> path."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    directory, step = (os.path.dirname(path), int(os.path.basename(path))) if os.path.basename(path).isdigit() \
        else (path, None)
    if not os.path.isdir(directory):
        raise ValueError(f"init_from={path!r}: no such workdir or checkpoint directory")
    manager = _manager(directory)
    step = manager.latest_step() if step is None else step
    committed = manager.all_steps()
    manager.close()
    if step is None or step not in committed:
        raise ValueError(f"init_from={path!r}: no committed checkpoint found there")
    return directory, step


def restore_params(path: str, abstract_params, init_params):
    """Parameters for `abstract_params`: each one `path` holds under the same name (placed in the
    abstract sharding), the others from `init_params` (fine-tuning a new head on a pretrained body).
    `path` is a workdir, a checkpoints/<step> directory or a Hugging Face BERT folder.
    Returns (params, names taken from init_params). Shapes must agree.
    """
    from fmjax.interop import hf_bert
    wanted = traverse_util.flatten_dict(abstract_params)
    if hf_bert.is_hf_folder(path):
        _, hf_params = hf_bert.load(path)
        saved = traverse_util.flatten_dict(hf_params)
    else:
        directory, step = _step_directory(path)
        manager = _manager(directory)
        saved = traverse_util.flatten_dict(manager.item_metadata(step)["state"].tree["params"])
    for name, leaf in wanted.items():
        if name in saved and tuple(saved[name].shape) != tuple(leaf.shape):
            raise ValueError(f"init_from={path!r}: parameter {'/'.join(name)} has shape "
                             f"{tuple(saved[name].shape)} there but the model needs {tuple(leaf.shape)}")
    common = {name: leaf for name, leaf in wanted.items() if name in saved}
    if not common:
        raise ValueError(f"init_from={path!r}: the checkpoint has no parameter of this model "
                         f"(it has e.g. {'/'.join(next(iter(saved)))})")
    if hf_bert.is_hf_folder(path):
        taken = {name: jax.device_put(saved[name], leaf.sharding) for name, leaf in common.items()}
    else:
        subset = traverse_util.unflatten_dict(common)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"params": subset},
            restore_args={"params": ocp.checkpoint_utils.construct_restore_args(subset)},
            partial_restore=True)))
        manager.close()
        taken = traverse_util.flatten_dict(restored.state["params"])
    fresh = traverse_util.flatten_dict(init_params)
    params = traverse_util.unflatten_dict({name: taken.get(name, fresh[name]) for name in wanted})
    return params, sorted("/".join(name) for name in wanted if name not in taken)
