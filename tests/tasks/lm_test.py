"""LM task: the chunked loss (task.loss_chunk) equals the whole-batch loss and never holds B x L x V logits."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core

from configs.lm import tiny
from fmjax.tasks.lm import LMTask

# V is no other dimension of the model, and B * L > width: only logits have a V axis and B * L rows.
VOCAB, BATCH, LENGTH = 96, 2, 32


def make_task(loss_chunk=0, **model):
    c = tiny.get_config()
    c.model.update(vocab_size=VOCAB, width=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64, **model)
    c.data.seq_len = LENGTH
    c.task.loss_chunk = loss_chunk
    return LMTask(c, types.SimpleNamespace(token_bytes=np.ones(VOCAB, np.int32)))


def packed_batch(seed=0):
    rng = np.random.default_rng(seed)
    shape = (BATCH, LENGTH)
    segments = np.ones(shape, np.int32)
    segments[0, 12:], segments[0, 27:] = 2, 0  # two documents, then padding
    positions = np.concatenate([np.arange(12), np.arange(20)])[None].repeat(BATCH, 0).astype(np.int32)
    return {"inputs": rng.integers(0, VOCAB, shape).astype(np.int32),
            "targets": rng.integers(0, VOCAB, shape).astype(np.int32),
            "segment_ids": segments, "positions": positions, "loss_mask": (segments > 0).astype(np.float32)}


@pytest.mark.parametrize("chunk, tie", [(8, False), (8, True), (LENGTH, False)])
def test_chunked_loss_z_loss_and_gradients_equal_the_whole_batch(chunk, tie):
    whole, chunked = make_task(0, tie_embeddings=tie), make_task(chunk, tie_embeddings=tie)
    batch = packed_batch()
    params = whole.model.init(jax.random.PRNGKey(0), jnp.asarray(batch["inputs"]))["params"]

    def run(task):
        return jax.jit(jax.value_and_grad(task.loss, has_aux=True))(params, batch, None)
    (loss, sums), grads = run(whole)
    (chunked_loss, chunked_sums), chunked_grads = run(chunked)
    np.testing.assert_allclose(chunked_loss, loss, rtol=1e-6)
    for name in ("loss", "z_loss", "weight"):
        np.testing.assert_allclose(chunked_sums[name], sums[name], rtol=1e-6, err_msg=name)
    for a, b in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(grads)):  # float32 sums, reassociated
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    eval_sums = jax.jit(chunked.eval_sums)(params, batch)
    for name, value in jax.jit(whole.eval_sums)(params, batch).items():
        np.testing.assert_allclose(eval_sums[name], value, rtol=1e-6, err_msg=name)


def _largest_logits_rows(jaxpr) -> int:
    """The most rows (elements / V) of any array with a V-sized axis that the program computes."""
    most = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", ())
            if VOCAB in shape:
                most = max(most, int(np.prod(shape)) // VOCAB)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, core.ClosedJaxpr):
                    most = max(most, _largest_logits_rows(sub.jaxpr))
                elif isinstance(sub, core.Jaxpr):
                    most = max(most, _largest_logits_rows(sub))
    return most


def test_chunked_training_step_never_computes_the_whole_batch_logits():
    batch = packed_batch()
    whole, chunked = make_task(0), make_task(8)
    params = whole.model.init(jax.random.PRNGKey(0), jnp.asarray(batch["inputs"]))["params"]
    rows = {}
    for name, task in (("whole", whole), ("chunked", chunked)):
        jaxpr = jax.make_jaxpr(jax.grad(lambda p, t=task: t.loss(p, batch, None)[0]))(params)
        rows[name] = _largest_logits_rows(jaxpr.jaxpr)
    # Chunked, the largest arrays with a V axis are the head kernel and its gradient (width rows).
    assert rows == {"whole": BATCH * LENGTH, "chunked": 32}


@pytest.mark.parametrize("chunk", [-1, 5, 64])
def test_a_loss_chunk_that_does_not_divide_the_sequence_is_an_error_naming_the_field(chunk):
    with pytest.raises(ValueError, match=r"task\.loss_chunk=.*data\.seq_len=32"):
        make_task(chunk)


def test_chunked_loss_on_a_data_fsdp_tensor_mesh_trains_like_the_whole_loss_on_one_device():
    from tests.train.step_test import make, random_batch, tiny_config
    whole, chunked = tiny_config(), tiny_config()
    chunked.task.loss_chunk = 4
    chunked.mesh.update(data=2, fsdp=2, tensor=2)
    batch = random_batch(whole, pad_from=[16, 3, 9, 16, 1, 12, 5, 16])
    _, whole_state, whole_step = make(whole)
    _, chunked_state, chunked_step = make(chunked, jax.devices())
    for _ in range(2):
        whole_state, expected = whole_step(whole_state, batch)
        chunked_state, metrics = chunked_step(chunked_state, batch)
        for name in ("loss", "z_loss", "grad_norm"):
            np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-5, err_msg=name)
