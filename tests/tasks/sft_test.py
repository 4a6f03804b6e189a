"""SFT: prompt tokens add exactly zero loss and gradient; pretrain -> SFT -> chat -> DPO through the trainer."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.lm import tiny as lm_tiny
from configs.preference import dolly_tiny as preference_tiny
from configs.sft import dolly_tiny
from fmjax.data import chat
from fmjax.tasks.lm import token_losses
from fmjax.tasks.sft import SFTTask
from fmjax.train import loop
from tests.data.chat_test import ChatTokenizer

TINY_MODEL = dict(vocab_size=64, width=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64)
TURNS = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello there"},
         {"role": "assistant", "content": "hi"}, {"role": "user", "content": "and?"},
         {"role": "assistant", "content": "bye now"}]


def test_prompt_tokens_add_exactly_zero_loss_and_gradient(tmp_path):
    c = dolly_tiny.get_config()
    c.model.update(TINY_MODEL)
    c.data.seq_len = 48
    tok = ChatTokenizer()
    task = SFTTask(c, tok, chat.Conversations(train=(), validation=()))
    example = chat.example(task.template, tok, 48)(TURNS)
    n = len(example["inputs"])
    batch = {"inputs": np.zeros((1, 48), np.int32), "targets": np.zeros((1, 48), np.int32),
             "segment_ids": np.zeros((1, 48), np.int32), "positions": np.zeros((1, 48), np.int32),
             "loss_mask": np.zeros((1, 48), np.float32)}
    batch["inputs"][0, :n], batch["targets"][0, :n] = example["inputs"], example["targets"]
    batch["segment_ids"][0, :n], batch["positions"][0, :n] = 1, np.arange(n)
    batch["loss_mask"][0, :n] = example["loss_mask"]
    assert batch["loss_mask"].sum() == len("hi") + len("bye now") + 2  # two replies and their end markers
    params = task.model.init(jax.random.PRNGKey(0), jnp.asarray(batch["inputs"]))["params"]
    grad_fn = jax.jit(jax.value_and_grad(task.loss, has_aux=True))
    (loss, sums), grads = grad_fn(params, batch, None)

    logits = task.logits(params, batch)
    ce, _ = token_losses(logits, jnp.asarray(batch["targets"]))
    trained = batch["loss_mask"][0] > 0
    np.testing.assert_allclose(sums["loss"], np.asarray(ce)[0][trained].sum(), rtol=1e-6)
    assert sums["weight"] == trained.sum()

    altered = {k: v.copy() for k, v in batch.items()}  # other targets wherever the mask is 0
    altered["targets"][0, ~trained] = (altered["targets"][0, ~trained] + 7) % 64
    (loss2, sums2), grads2 = grad_fn(params, altered, None)
    assert float(loss2) == float(loss) and float(sums2["z_loss"]) == float(sums["z_loss"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), grads, grads2)


def _pretrain(tmp_path):
    c = lm_tiny.get_config()
    c.model.update(vocab_size=512, width=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64)
    c.data.update(seq_len=32, cache_dir=str(tmp_path / "cache"))
    c.train.update(steps=2, batch_size=8, eval_batches=1, progress_bar=False)
    c.task.sample_prompts = []
    c.eval.update(tasks=(), datasets=())
    loop.train(loop.setup(c, str(tmp_path / "base")))
    return c


def _chat_records():
    return [{"instruction": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(40)]


@pytest.mark.slow
def test_sft_from_a_pretrained_workdir_then_chat_then_dpo(tmp_path):
    base = _pretrain(tmp_path)
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _chat_records()))
    c = dolly_tiny.get_config()
    c.model = base.model
    c.init_from = str(tmp_path / "base")
    c.data.update(path=str(path), seq_len=48, cache_dir=str(tmp_path / "cache"), validation_fraction=0.2)
    c.task.update(sample_prompts=["What is 3 plus 3?"], sample_tokens=8)
    c.train.update(steps=3, batch_size=8, eval_batches=1, progress_bar=False, log_every=1)
    run = loop.setup(c, str(tmp_path / "sft"))
    results = loop.train(run)
    assert results["tokens"] > 0 and np.isfinite(results["loss"])
    assert (tmp_path / "sft" / "tokenizer.model").read_bytes() == (tmp_path / "base" / "tokenizer.model").read_bytes()
    sample = (tmp_path / "sft" / "samples" / "step_3.txt").read_text()
    assert sample.startswith("### user: What is 3 plus 3?\n### assistant: ")

    c.mode = "chat"
    lines, shown = iter(["What is 1 plus 1?", "/reset", "And 2 plus 2?"]), []

    def read(prompt):
        assert prompt == "user> "
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line
    history = loop.chat(loop.setup(c, str(tmp_path / "sft")), read=read, write=shown.append)
    assert shown[0].startswith(f"chatting with {tmp_path / 'sft'} at step 3")
    assert len(shown) == 3 and all(s.startswith("assistant> ") for s in shown[1:])
    assert [t["role"] for t in history] == ["user", "assistant"]  # /reset forgot the first exchange
    assert history[0]["content"] == "And 2 plus 2?"

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r["instruction"], "chosen": r["response"], "rejected": "No."}) + "\n"
                             for r in _chat_records()))
    d = preference_tiny.get_config()
    d.model, d.init_from = base.model, str(tmp_path / "sft")
    d.data.update(path=str(pairs), seq_len=32, cache_dir=str(tmp_path / "cache"), validation_fraction=0.2)
    d.task.update(sample_prompts=[], sample_tokens=8)
    d.train.update(steps=2, batch_size=8, eval_batches=1, progress_bar=False, log_every=1)
    results = loop.train(loop.setup(d, str(tmp_path / "dpo")))
    assert results["pairs"] > 0 and 0 < results["loss"] < 1  # near log 2: the policy has barely moved
