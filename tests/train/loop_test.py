"""The loop end to end in-process: sharded = 1 device, exact resume, real parameter sharding."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs.lm import tiny
from fmjax.train import checkpoint, loop, state as state_lib


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
