"""Checkpoints that are never trusted blindly: leftover temporary steps, damaged and silently changed
files, NaN states, failing asynchronous saves, another process count (small sharded pytrees)."""
import glob
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fmjax.train import checkpoint

MESH = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def abstract():
    shardings = {"w": NamedSharding(MESH, P("a", "b")), "m": {"mu": NamedSharding(MESH, P(None, "a"))},
                 "step": NamedSharding(MESH, P())}
    shapes = {"w": ((64, 32), jnp.float32), "m": {"mu": ((16, 64), jnp.bfloat16)}, "step": ((), jnp.int32)}
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s[0], s[1], sharding=sh), shapes, shardings,
                        is_leaf=lambda x: isinstance(x, tuple))


def state_at(step: int):
    rng = np.random.default_rng(step)
    values = {"w": rng.standard_normal((64, 32)), "m": {"mu": rng.standard_normal((16, 64))}, "step": step}
    return jax.tree.map(lambda v, a: jax.device_put(jnp.asarray(v, a.dtype), a.sharding), values, abstract())


def save_steps(workdir, steps=(2, 4, 6), keep=5):
    ckpts = checkpoint.Checkpoints(str(workdir), keep)
    for step in steps:
        ckpts.save(step, state_at(step), {"position": step}, {"seed": 0})
    ckpts.wait()
    ckpts.close()


def restore_latest(workdir, move_bad=True):
    ckpts = checkpoint.Checkpoints(str(workdir), 5)
    try:
        return ckpts.restore_latest(abstract(), move_bad=move_bad)
    finally:
        ckpts.close()


def assert_equal_trees(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def data_files(step_dir):
    """The array data of a step (orbax's OCDBT files; which of them hold which array varies)."""
    return glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)


def test_the_checksum_ignores_the_sharding_and_catches_one_flipped_bit():
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    sums = [checkpoint.integrity(jax.device_put(w, NamedSharding(MESH, spec)))[0][""]
            for spec in (P(), P("a", "b"), P("b", "a"), P(None, ("a", "b")))]
    assert len(set(sums)) == 1
    flipped = w.copy()
    flipped.view(np.uint32)[17, 3] ^= 1 << 9
    assert checkpoint.integrity(flipped)[0][""] != sums[0]
    swapped = w.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places
    assert checkpoint.integrity(swapped)[0][""] != sums[0]


def test_a_leftover_temporary_step_is_ignored_and_cleaned_up(tmp_path):
    save_steps(tmp_path, steps=(2, 4))
    leftover = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "checkpoints" / "4", leftover)  # as a save killed before its rename leaves it
    for path in data_files(str(leftover)):
        os.remove(path)
    step, state, data = restore_latest(tmp_path)
    assert (step, data) == (4, {"position": 4})
    assert_equal_trees(state, state_at(4))
    assert not leftover.exists()  # removed when the manager opened the directory


def damage(path, how):
    raw = bytearray(open(path, "rb").read())
    middle = len(raw) // 2
    if how == "truncate":
        raw = raw[:middle]
    else:
        raw[middle:middle + 8] = bytes(b ^ 0xFF for b in raw[middle:middle + 8])
    open(path, "wb").write(raw)


@pytest.mark.parametrize("how", ["truncate", "flip_bytes", "truncate_metadata"])
def test_a_damaged_latest_step_falls_back_to_the_newest_good_one(tmp_path, how):
    save_steps(tmp_path)
    step_dir = tmp_path / "checkpoints" / "6"
    if how == "truncate_metadata":
        damage(step_dir / "state" / "_METADATA", "truncate")
    for path in data_files(str(step_dir)) if how != "truncate_metadata" else ():
        damage(path, how)
    with pytest.warns(UserWarning, match="skipping checkpoint step 6"):
        step, state, data = restore_latest(tmp_path)
    assert (step, data) == (4, {"position": 4})
    assert_equal_trees(state, state_at(4))
    # The damaged step is kept aside, and the resumed run can save step 6 again.
    assert os.path.isdir(tmp_path / "checkpoints.corrupt" / "6")
    save_steps(tmp_path, steps=(6,))
    assert restore_latest(tmp_path)[0] == 6


def test_silently_changed_arrays_are_caught_by_fmjax_checksum(tmp_path):
    save_steps(tmp_path, steps=(2, 4))
    # Valid files holding other values (a stale copy, a misdirected write): orbax reads them fine.
    state4 = tmp_path / "checkpoints" / "4" / "state"
    shutil.rmtree(state4)
    shutil.copytree(tmp_path / "checkpoints" / "2" / "state", state4)
    with pytest.warns(UserWarning, match="checksum of 3 of 3 arrays does not match"):
        step, state, _ = restore_latest(tmp_path, move_bad=False)
    assert step == 2
    assert os.path.isdir(tmp_path / "checkpoints" / "4")  # move_bad=False (eval, sampling) moves nothing


def test_when_no_step_is_good_the_error_is_clear_and_nothing_is_removed(tmp_path):
    save_steps(tmp_path, steps=(2, 4))
    for step in (2, 4):
        damage(tmp_path / "checkpoints" / str(step) / "state" / "_METADATA", "truncate")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with warnings.catch_warnings(), pytest.raises(checkpoint.CorruptCheckpoint,
                                                  match=r"steps \[4, 2\] are all damaged.*nothing was moved"):
        warnings.simplefilter("ignore")
        restore_latest(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_a_state_with_nan_is_never_saved(tmp_path):
    ckpts = checkpoint.Checkpoints(str(tmp_path), 3)
    ckpts.save(1, state_at(1), {}, {})
    bad = state_at(2)
    bad["w"] = bad["w"].at[3, 3].set(jnp.nan)
    with pytest.raises(checkpoint.NonFiniteState, match="step 2: the state holds NaN or Inf.*stays 1"):
        ckpts.save(2, bad, {}, {})
    ckpts.wait()
    assert ckpts.manager.all_steps() == [1]
    ckpts.close()


def test_a_failing_asynchronous_save_raises_at_the_next_save_or_at_the_end(tmp_path, monkeypatch):
    async def disk_full(self, x, directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.ProcessJsonHandler, "_save_fn", disk_full)
    ckpts = checkpoint.Checkpoints(str(tmp_path), 3)
    ckpts.save(1, state_at(1), {}, {})  # returns at once; the write fails in the background
    with pytest.raises(Exception, match="No space left on device"):
        ckpts.save(2, state_at(2), {}, {})
    with pytest.raises(Exception, match="No space left on device"):
        ckpts.save(3, state_at(3), {}, {})
        ckpts.wait()
    ckpts.close()
    assert not os.path.isdir(tmp_path / "checkpoints" / "1")  # never committed


def test_the_data_state_of_another_process_count_is_a_clear_error(tmp_path):
    save_steps(tmp_path, steps=(2,))
    data_dir = tmp_path / "checkpoints" / "2" / "data"
    os.rename(data_dir / "process_0-of-1.json", data_dir / "process_0-of-2.json")
    ckpts = checkpoint.Checkpoints(str(tmp_path), 5)
    with pytest.raises(checkpoint.CorruptCheckpoint, match=r"process_0-of-2.json.*not of process 0 of 1.*"
                                                           r"another number of processes"):
        ckpts.restore(2, abstract())
    ckpts.close()
