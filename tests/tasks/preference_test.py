"""Preference tuning: the losses' formulas, log 2 at policy = reference, a frozen reference, rewards that learn."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.preference import dolly_tiny
from fmjax import sharding
from fmjax.data import preference
from fmjax.tasks.preference import PreferenceTask, pair_losses
from fmjax.train import optim, state as state_lib, step as step_lib
from tests.data.chat_test import ChatTokenizer
from tests.tasks.sft_test import TINY_MODEL


def pairs_config(tmp_path, n=48, **task):
    c = dolly_tiny.get_config()
    c.model.update(TINY_MODEL)
    records = [{"prompt": f"say {i}", "chosen": "yes" * (1 + i % 3), "rejected": "no" * (1 + i % 2) + str(i % 7)}
               for i in range(n)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    c.data.update(path=str(path), seq_len=24, validation_fraction=0.25)
    c.task.update(**task)
    c.optim.update(lr=3e-3, warmup=0.0, weight_decay=0.0)
    c.train.update(steps=40, batch_size=8, eval_batches=2)
    return c


def make(c):
    task = PreferenceTask(c, ChatTokenizer(), preference.validate(c))
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    tx = optim.optimizer(c, task.trainable)
    abstract, shardings = state_lib.abstract_state(task, tx, c.seed, mesh, sharding.rules_from_config(c.sharding_rules))
    state = state_lib.init_state(task, tx, c.seed, abstract, shardings)
    return task, tx, state


def test_pair_losses_match_their_formulas():
    h = jnp.array([-2.0, 0.0, 0.5, 3.0])
    sigmoid = 1 / (1 + np.exp(-np.asarray(h)))
    np.testing.assert_allclose(pair_losses(h, 0.1, "dpo"), -np.log(sigmoid), rtol=1e-6)
    np.testing.assert_allclose(pair_losses(h, 0.1, "dpo", 0.2), -0.8 * np.log(sigmoid) - 0.2 * np.log(1 - sigmoid),
                               rtol=1e-6)
    np.testing.assert_allclose(pair_losses(h, 0.5, "ipo"), (np.asarray(h) / 0.5 - 1.0) ** 2, rtol=1e-6)


def test_policy_equal_to_reference_gives_log_2_and_zero_rewards(tmp_path):
    task, _, state = make(pairs_config(tmp_path))
    batch = task.eval_batches(0, 1)[0]
    loss, sums = task.loss(state.params, batch, None)
    results = task.eval_results(jax.device_get(sums))
    assert results["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert results["margin"] == 0 and results["reward_accuracy"] == 0 and results["chosen_reward"] == 0


def test_dpo_learns_the_preference_and_never_moves_the_reference(tmp_path):
    c = pairs_config(tmp_path)
    task, tx, state = make(c)
    adam = jax.tree.leaves(state.opt_state)
    assert sum(x.size for x in adam) == pytest.approx(2 * sum(x.size for x in jax.tree.leaves(state.params["policy"])),
                                                      abs=16)  # Adam's two moments of the policy only (+ counts)
    reference = jax.device_get(state.params["reference"])
    train_step = jax.jit(step_lib.make_train_step(task, tx, optim.schedule(c), 1))
    data = task.train_iterator(0, 1)
    eval_batch = task.eval_batches(0, 1)
    first = task.eval_results(jax.device_get(task.eval_sums(state.params, eval_batch[0])))
    for _ in range(c.train.steps):
        state, metrics = train_step(state, next(data))
    last = task.eval_results(jax.device_get(task.eval_sums(state.params, eval_batch[0])))
    assert last["reward_accuracy"] > 0.5 and last["margin"] > first["margin"] + 0.1, (first, last)
    assert last["loss"] < math.log(2)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["reference"]), reference)


def test_bad_settings_and_records_are_named(tmp_path):
    for task, message in [({"loss": "kto"}, "task.loss='kto'"), ({"beta": 0.0}, "task.beta=0.0 must be > 0"),
                          ({"label_smoothing": 0.5}, r"task.label_smoothing=0.5 must be in \[0, 0.5\)")]:
        with pytest.raises(ValueError, match=message):
            make(pairs_config(tmp_path, **task))
    c = pairs_config(tmp_path)
    with open(c.data.path, "a") as f:
        f.write(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:49: the record has no 'rejected'"):
        preference.validate(c)
