"""Orbax checkpoints: train state, each process's data-iterator state, the config and an integrity
record, saved together and atomically; restored from the newest step that proves good.

- Atomic steps: orbax writes `checkpoints/<step>.orbax-checkpoint-tmp/` and renames it to
  `checkpoints/<step>/` only once every item is written, so a run killed mid-save leaves at most a
  temporary directory, which is never restored and is removed when the next run opens the directory.
- Integrity: `integrity/` holds fmjax's own checksum of every state leaf, computed on device over
  the global array (a position-weighted sum of its bits, so it does not depend on the mesh) when the
  step is saved, and checked again after every restore: bytes that change on disk without any read
  error (which orbax restores silently) are caught. A state with a NaN or Inf is never saved.
- Fallback: `restore_latest` tries the steps newest first and takes the first good one, with a
  warning for each bad one; in training the bad steps are moved to `checkpoints.corrupt/` (kept for
  inspection, out of the way of the steps the resumed run saves). If no step is good it raises
  CorruptCheckpoint and moves nothing.
- Data: each process's iterator state is its own file, `data/process_<i>-of-<n>.json`; restoring
  with another process count is an error naming both counts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

ITEMS = ("state", "data", "config", "integrity")
CORRUPT_DIR = "checkpoints.corrupt"


class CorruptCheckpoint(ValueError):
    """A checkpoint step that cannot be trusted (unreadable, or its checksum does not match)."""


class NonFiniteState(RuntimeError):
    """A state with NaN or Inf values, which is never saved."""


# ---------------------------------------------------------------------------------------------
# Each process's data-iterator state.

class ProcessJsonHandler(ocp.JsonCheckpointHandler):
    """A JSON item written by every process to its own file (the JSON handler writes the primary's)."""

    def __init__(self):
        super().__init__(filename=f"process_{jax.process_index()}-of-{jax.process_count()}.json")

    async def _save_fn(self, x, directory):
        (directory / self._filename).write_text(json.dumps(x))

    def restore(self, directory: epath.Path, item=None, args=None):
        if not (directory / self._filename).exists():
            saved = sorted(p.name for p in directory.iterdir() if p.name.startswith("process_"))
            raise CorruptCheckpoint(
                f"{directory} holds the data-iterator state of {saved or 'no process'}, not of process "
                f"{jax.process_index()} of {jax.process_count()}: the run was saved with another number "
                f"of processes; resume it with that number, or start a new workdir with init_from")
        return super().restore(directory)


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
    item: dict


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
    item: None = None


# ---------------------------------------------------------------------------------------------
# Checksums.

def leaf_name(path) -> str:
    """"params/layers/attn/query/kernel" for a pytree key path (attribute, dict or sequence keys)."""
    parts = [getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))) for k in path]
    return "/".join(str(p) for p in parts)


def _bits(x):
    """x's bit patterns as uint32 (one entry per element; 8-byte values as two)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_checksum(x):
    """sum_i bits_i * w_i mod 2**32, with odd weights w_i derived from the element's position:
    any single flipped bit changes it, and it is the same under every sharding of x."""
    bits = _bits(x)
    index = jnp.zeros(bits.shape, jnp.uint32)
    for dim in range(bits.ndim):
        stride = int(np.prod(bits.shape[dim + 1:], dtype=np.uint64) % 2**32)
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim) * jnp.uint32(stride)
    weights = index * jnp.uint32(0x9E3779B9) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _integrity(tree):
    """({leaf: checksum}, whether every floating-point leaf is finite), all replicated scalars."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    sums = {leaf_name(path): _leaf_checksum(x) for path, x in leaves}
    finite = jnp.array(True)
    for _, x in leaves:
        if jnp.issubdtype(x.dtype, jnp.inexact):
            finite &= jnp.all(jnp.isfinite(x))
    return sums, finite


def integrity(tree) -> tuple[dict[str, int], bool]:
    sums, finite = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), _integrity(tree))
    return {name: int(value) for name, value in sums.items()}, bool(finite)


def verify(tree, record: dict, where: str):
    """CorruptCheckpoint naming the leaves of `tree` whose checksum differs from `record`'s."""
    sums, _ = integrity(tree)
    saved = record["checksums"]
    wrong = [name for name, value in sums.items() if saved.get(name) != value]
    if wrong:
        raise CorruptCheckpoint(f"{where}: the checksum of {len(wrong)} of {len(sums)} arrays does not "
                                f"match the one saved with it (e.g. {wrong[0]}): the files changed after "
                                f"they were written")


# ---------------------------------------------------------------------------------------------
# The manager.

class _Manager(ocp.CheckpointManager):
    def reached_preemption(self, step: int) -> bool:
        # The loop asks JAX itself, once per step on the main thread (train/preemption.py). orbax would
        # also ask, from its finalize thread with the step it saved, moving this process's reported
        # step back, so that the processes could agree on a step one of them has passed.
        return False


def _manager(directory: str, options=None) -> ocp.CheckpointManager:
    """A manager that knows every item's handler, so metadata can be read without restoring."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.StandardSave, ocp.StandardCheckpointHandler)
    registry.add("state", ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
    registry.add("state", ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler)
    registry.add("data", ProcessJsonSave, ProcessJsonHandler)
    registry.add("data", ProcessJsonRestore, ProcessJsonHandler)
    for item in ("config", "integrity"):
        registry.add(item, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
        registry.add(item, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
    return _Manager(directory, options=options, handler_registry=registry)


def _all_agree(ok: bool) -> bool:
    """True when `ok` holds on every process (a step is good only if every process read it)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


class Checkpoints:
    def __init__(self, workdir: str, keep: int):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=True)
        self.manager = _manager(self.directory, options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, config_dict: dict):
        """Starts an asynchronous save (an earlier save's failure raises here). NonFiniteState if
        `state` holds a NaN or Inf: nothing is written."""
        sums, finite = integrity(state)
        if not finite:
            raise NonFiniteState(f"step {step}: the state holds NaN or Inf values; not saving it "
                                 f"(the newest checkpoint stays {self.latest_step()})")
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ProcessJsonSave(data_state),
            config=ocp.args.JsonSave(config_dict),
            integrity=ocp.args.JsonSave({"checksums": sums, "process_count": jax.process_count()})))

    def restore(self, step: int, abstract_state):
        """(state laid out as `abstract_state`'s shardings, this process's data-iterator state);
        CorruptCheckpoint if the step cannot be read or its checksum does not match."""
        where = f"{self.directory}/{step}"
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ProcessJsonRestore(),
                integrity=ocp.args.JsonRestore()))
        except CorruptCheckpoint:
            raise
        except Exception as e:  # orbax / tensorstore errors of damaged files: a few hundred kinds
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CorruptCheckpoint(f"{where}: cannot be read ({type(e).__name__}: {first[:300]})") from e
        verify(out.state, out.integrity, where)
        return out.state, out.data

    def restore_latest(self, abstract_state, move_bad: bool = True):
        """(step, state, data state) of the newest good step, or None when there is no step.

        A bad step is skipped with a warning; with `move_bad` (training) the bad steps newer than the
        good one go to checkpoints.corrupt/. CorruptCheckpoint, moving nothing, if no step is good.
        """
        bad = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data = self.restore(step, abstract_state)
                error = None
            except CorruptCheckpoint as e:
                error = e
            if not _all_agree(error is None):
                if error is None:
                    error = CorruptCheckpoint(f"{self.directory}/{step}: another process could not read it")
                warnings.warn(f"skipping checkpoint step {step}: {error}", stacklevel=2)
                bad.append(step)
                continue
            if bad and move_bad:
                self._move_aside(bad)
            return step, state, data
        if bad:
            raise CorruptCheckpoint(f"no checkpoint under {self.directory} can be restored (steps {bad} are "
                                    f"all damaged; see the warnings above); nothing was moved or deleted")
        return None

    def _move_aside(self, steps):
        self.wait()
        if jax.process_index() == 0:
            target = os.path.join(os.path.dirname(self.directory), CORRUPT_DIR)
            os.makedirs(target, exist_ok=True)
            for step in steps:
                destination = os.path.join(target, str(step))
                if os.path.exists(destination):
                    shutil.rmtree(destination)
                shutil.move(os.path.join(self.directory, str(step)), destination)
                print(f"moved the damaged step {step} to {destination}", flush=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("fmjax_checkpoint_move_aside")
        self.manager.reload()

    def wait(self):
        """Waits for the save in flight; raises its error if it failed."""
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def latest_step(workdir: str) -> int | None:
    """The newest committed step under workdir/checkpoints, or None (creates nothing)."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    manager = _manager(os.path.join(os.path.abspath(workdir), "checkpoints"))
    step = manager.latest_step()
    manager.close()
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


def check_init_from(path: str) -> None:
    """ValueError naming init_from unless it is a Hugging Face folder or holds a committed checkpoint."""
    from fmjax.interop import hf_bert
    if not hf_bert.is_hf_folder(path):
        _step_directory(path)


def restore_params(path: str, abstract_params, init_params):
    """Parameters for `abstract_params`: each one `path` holds under the same name (placed in the
    abstract sharding), the others from `init_params` (fine-tuning a new head on a pretrained body).
    `path` is a workdir, a checkpoints/<step> directory or a Hugging Face BERT folder; the
    parameters taken from a checkpoint are checked against its checksums.
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
        subset = {"params": traverse_util.unflatten_dict(common)}
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=subset, partial_restore=True,
                                         restore_args=ocp.checkpoint_utils.construct_restore_args(subset)),
            integrity=ocp.args.JsonRestore()))
        manager.close()
        verify(restored.state, restored.integrity, f"init_from={path!r} (step {step})")
        taken = traverse_util.flatten_dict(restored.state["params"])
    fresh = traverse_util.flatten_dict(init_params)
    params = traverse_util.unflatten_dict({name: taken.get(name, fresh[name]) for name in wanted})
    return params, sorted("/".join(name) for name in wanted if name not in taken)
