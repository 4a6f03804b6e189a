"""Held-out LM metrics (what mode=eval and the loop report as loss, perplexity, bits per byte)
equal a numpy computation from the model's logits on the same packed batches."""
import math

import flax.linen as nn
import jax
import numpy as np

from fmjax.data import pipeline, tokenizer as tokenizer_lib
from fmjax.eval import heldout
from fmjax.tasks.lm import LMTask
from tests.data.common import cache, data_config  # noqa: F401  (cache is a fixture)


def test_heldout_perplexity_and_bits_per_byte_equal_numpy(cache):
    config = data_config(cache, batch_size=4, eval_batches=2, seq_len=48)
    config.model.update(width=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64)
    tokenizer = tokenizer_lib.get_tokenizer(config)
    task = LMTask(config, tokenizer)
    batches = pipeline.make_eval_batches(config, tokenizer)
    params = nn.meta.unbox(task.model.init(jax.random.PRNGKey(0), batches[0]["inputs"])["params"])
    got = heldout.evaluate(jax.jit(task.eval_sums), params, batches, task, to_global=lambda b: b)

    nats = tokens = num_bytes = 0.0
    for b in batches:
        logits = np.asarray(task.logits(params, b), np.float64)
        logits -= logits.max(-1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        target = np.take_along_axis(logprobs, b["targets"][..., None], -1)[..., 0]
        nats -= (target * b["loss_mask"]).sum()
        tokens += b["loss_mask"].sum()
        # bytes: what each target token adds to the decoded text (word-start pieces add their space)
        sp = tokenizer._sp
        num_bytes += sum(1 if sp.is_byte(t) else len(sp.id_to_piece(t).replace("\u2581", " ").encode())
                         for t, m in zip(b["targets"].ravel().tolist(), b["loss_mask"].ravel())
                         if m and not sp.is_control(t))
    assert got["tokens"] == tokens and got["bytes"] == num_bytes
    np.testing.assert_allclose(got["loss"], nats / tokens, rtol=1e-5)
    np.testing.assert_allclose(got["perplexity"], math.exp(nats / tokens), rtol=1e-5)
    np.testing.assert_allclose(got["bits_per_byte"], nats / math.log(2) / num_bytes, rtol=1e-5)
