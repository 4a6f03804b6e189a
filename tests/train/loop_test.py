"""The loop end to end in-process: sharded = 1 device, exact resume, real parameter sharding."""
import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs.lm import tiny
from fmjax.train import checkpoint, loop, preemption, state as state_lib


def small_config(tmp_path, **train):
    c = tiny.get_config()
    c.model.update(vocab_size=512, width=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128)
    c.data.seq_len = 32
    c.data.cache_dir = str(tmp_path.parent / "cache")  # shared by the tests of this module
    c.train.update(steps=10, batch_size=8, log_every=1, eval_every=1000, eval_batches=1, ckpt_every=1000,
                   progress_bar=False)
    c.train.update(**train)
    c.task.sample_prompts = []
    c.eval.update(tasks=(), datasets=())  # benchmarks have tests of their own
    return c


def losses(workdir):
    out = {}
    for line in open(workdir / "metrics.jsonl"):
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    loop.train(loop.setup(small_config(tmp), str(tmp / "run"), devices=jax.devices()[:1]))
    return losses(tmp / "run")


@pytest.mark.parametrize("mesh", [dict(data=8, fsdp=1, tensor=1), dict(data=1, fsdp=4, tensor=2),
                                  dict(data=2, fsdp=2, tensor=2)])
def test_sharded_training_matches_one_device(tmp_path, one_device_losses, mesh):
    config = small_config(tmp_path)
    config.mesh.update(**mesh)
    loop.train(loop.setup(config, str(tmp_path / "run")))
    sharded = losses(tmp_path / "run")
    assert sorted(sharded) == list(range(1, 11))
    for step, value in one_device_losses.items():
        assert abs(sharded[step] - value) / abs(value) < 1e-4, (step, sharded[step], value)


def test_mlp_kernel_is_split_over_fsdp_and_tensor(tmp_path):
    config = small_config(tmp_path)
    config.mesh.update(data=1, fsdp=4, tensor=2)
    run = loop.setup(config, str(tmp_path / "run"))
    state = state_lib.init_state(run.task, run.tx, config.seed, run.abstract, run.shardings)
    kernel = state.params["layers"]["mlp"]["wi_gate"]["kernel"]  # layers x embed x mlp
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    shard_shapes = {s.data.shape for s in kernel.addressable_shards}
    assert shard_shapes == {(2, 64 // 4, 128 // 2)}
    adam_mu = state.opt_state[1][0].mu["layers"]["mlp"]["wi_gate"]["kernel"]
    assert adam_mu.sharding.spec == P(None, "fsdp", "tensor")  # optimizer state sharded the same way


class _Stop(Exception):
    pass


def test_stop_after_a_checkpoint_then_rerun_equals_uninterrupted(tmp_path):
    config = small_config(tmp_path, steps=12, ckpt_every=5)
    loop.train(loop.setup(config, str(tmp_path / "full")))

    def crash_at_8(step, state, metrics):
        if step == 8:
            raise _Stop()

    with pytest.raises(_Stop):
        loop.train(loop.setup(config, str(tmp_path / "resumed")), hooks=[crash_at_8])
    assert losses(tmp_path / "resumed").keys() == set(range(1, 9))
    loop.train(loop.setup(config, str(tmp_path / "resumed")))
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 13))  # steps 6-8 were logged again, not twice
    assert resumed == full  # bitwise equal floats


def test_init_from_takes_the_parameters_of_another_run_in_a_new_layout(tmp_path):
    source = small_config(tmp_path, steps=2)
    loop.train(loop.setup(source, str(tmp_path / "source")))
    trained, _ = checkpoint.Checkpoints(str(tmp_path / "source"), 1).restore(
        2, loop.setup(source, str(tmp_path / "source")).abstract)

    target = small_config(tmp_path)
    target.mesh.update(data=1, fsdp=4, tensor=2)
    run = loop.setup(target, str(tmp_path / "target"))
    init = state_lib.init_state(run.task, run.tx, target.seed, run.abstract, run.shardings).params
    params, fresh = checkpoint.restore_params(str(tmp_path / "source"), run.abstract.params, init)
    assert fresh == []
    jax.tree.map(np.testing.assert_array_equal, params, trained.params)
    kernel = params["layers"]["mlp"]["wi_gate"]["kernel"]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    with pytest.raises(ValueError, match="no committed checkpoint"):
        checkpoint.restore_params(str(tmp_path / "target"), run.abstract.params, init)

    # A model with a part the checkpoint lacks keeps that part's fresh initialisation.
    extra = dict(run.abstract.params, new_head=run.abstract.params["final_norm"])
    params, fresh = checkpoint.restore_params(str(tmp_path / "source"), extra,
                                              dict(init, new_head=init["final_norm"]))
    assert fresh == ["new_head/scale"]
    np.testing.assert_array_equal(params["new_head"]["scale"], init["final_norm"]["scale"])
    np.testing.assert_array_equal(params["final_norm"]["scale"], trained.params["final_norm"]["scale"])
    wrong = dict(run.abstract.params, final_norm={"scale": jax.ShapeDtypeStruct((3,), jnp.float32)})
    with pytest.raises(ValueError, match="final_norm/scale has shape"):
        checkpoint.restore_params(str(tmp_path / "source"), wrong, init)


def poisoned(iterator, bad_steps):
    """`iterator` with a NaN loss mask in the batches of `bad_steps` (1-based)."""
    class Poisoned:
        def __init__(self):
            self.step = 0

        def __next__(self):
            batch = next(iterator)
            self.step += 1
            if self.step in bad_steps:
                batch = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
            return batch

        def get_state(self):
            return iterator.get_state()

        def set_state(self, state):
            iterator.set_state(state)
    return Poisoned()


def with_poisoned_data(run, bad_steps):
    make = run.task.train_iterator
    run.task.train_iterator = lambda *args: poisoned(make(*args), bad_steps)
    return run


def all_finite(workdir, step, run):
    state, _ = checkpoint.Checkpoints(str(workdir), 5).restore(step, run.abstract)
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))


def test_non_finite_steps_are_skipped_counted_and_a_streak_stops_the_run(tmp_path):
    config = small_config(tmp_path, steps=12, ckpt_every=2, max_bad_steps=3)
    run = with_poisoned_data(loop.setup(config, str(tmp_path / "run")), {3, 7, 8})
    loop.train(run)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    records = [r for r in records if "grad_norm" in r]  # training steps, not evals
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1, 2, 3, 3, 3, 3, 3]
    assert [r["bad_streak"] for r in records][6:9] == [1, 2, 0]
    assert all(all_finite(tmp_path / "run", step, run) for step in (8, 10, 12))

    run = with_poisoned_data(loop.setup(config, str(tmp_path / "diverges")), set(range(5, 13)))
    with pytest.raises(loop.Diverged, match=r"steps 5 to 7: 3 steps in a row.*newest checkpoint is step 6"):
        loop.train(run)
    assert checkpoint.latest_step(str(tmp_path / "diverges")) == 6 and all_finite(tmp_path / "diverges", 6, run)


def test_a_run_saved_on_one_mesh_restores_and_continues_on_another(tmp_path):
    config = small_config(tmp_path, steps=3, ckpt_every=3)
    config.mesh.update(data=2, fsdp=4, tensor=1)
    loop.train(loop.setup(config, str(tmp_path / "run")))
    saved, _ = checkpoint.Checkpoints(str(tmp_path / "run"), 5).restore(
        3, loop.setup(config, str(tmp_path / "run")).abstract)
    for mesh, devices in ((dict(data=2, fsdp=1, tensor=2), jax.devices()[:4]), (dict(data=1), jax.devices()[:1])):
        other = small_config(tmp_path, steps=5, ckpt_every=5)
        other.mesh.update(**mesh)
        run = loop.setup(other, str(tmp_path / "run"), devices)
        restored, _ = checkpoint.Checkpoints(str(tmp_path / "run"), 5).restore(3, run.abstract)
        jax.tree.map(np.testing.assert_array_equal, restored.params, saved.params)
        jax.tree.map(np.testing.assert_array_equal, restored.opt_state, saved.opt_state)
        kernel = restored.params["layers"]["mlp"]["wi_gate"]["kernel"]
        assert kernel.sharding.mesh.shape == run.mesh.shape
        if len(devices) == 4:  # one continued run is enough; each costs a compile
            workdir = tmp_path / "continued"
            shutil.copytree(tmp_path / "run", workdir)
            loop.train(loop.setup(other, str(workdir), devices))  # resumes at 3 on the new mesh
            assert sorted(losses(workdir)) == [1, 2, 3, 4, 5]


def test_sigterm_saves_the_current_step_and_the_resume_is_exact(tmp_path):
    config = small_config(tmp_path, steps=10, ckpt_every=4)
    loop.train(loop.setup(config, str(tmp_path / "full")))

    def preempt_at_6(step, state, metrics):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(preemption.Preempted, match="saved step 6"):
        loop.train(loop.setup(config, str(tmp_path / "resumed")), hooks=[preempt_at_6])
    assert checkpoint.latest_step(str(tmp_path / "resumed")) == 6
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the loop's handler is gone again
    loop.train(loop.setup(config, str(tmp_path / "resumed")))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")
