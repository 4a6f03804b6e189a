"""LoRA: the merged model is base + (alpha/rank) A@B; only adapters train and hold optimizer state
(scaling with the rank); sharded = 1 device; dropout is on A's input rows; export -> init_from."""
import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from configs.lm import tiny
from fmjax import config_lib, sharding
from fmjax.models.decoder import unstack_layers
from fmjax.peft import lora
from fmjax.tasks.lm import LMTask
from fmjax.train import checkpoint, loop, optim, state as state_lib, step as step_lib

KERNELS = {"attn/query/kernel", "attn/key/kernel", "attn/value/kernel", "attn/out/kernel",
           "mlp/wi_gate/kernel", "mlp/wi_up/kernel", "mlp/wo/kernel"}


def tiny_config(rank=4, scan_layers=True, **lora_fields):
    c = tiny.get_config()
    c.model.update(vocab_size=64, width=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64,
                   scan_layers=scan_layers)
    c.data.seq_len = 16
    c.train.update(steps=10, batch_size=8)
    c.optim.lora.update(rank=rank, **lora_fields)
    c.eval.update(tasks=(), datasets=())  # benchmarks have tests of their own
    return c


def make_task(config):
    inner = LMTask(config, types.SimpleNamespace(token_bytes=np.ones(config.model.vocab_size, np.int32)))
    return lora.LoraTask(inner, lora.LoraConfig.from_config(config))


def make_state(config, devices=None, ema=False):
    """(task, tx, state, state shardings, mesh) on `devices` (default: one)."""
    task = make_task(config)
    mesh = sharding.make_mesh(config.mesh, devices or jax.devices()[:1])
    rules = sharding.rules_from_config(config.sharding_rules)
    tx = optim.optimizer(config, task.trainable)
    abstract, shardings = state_lib.abstract_state(task, tx, config.seed, mesh, rules, ema=ema)
    return task, tx, state_lib.init_state(task, tx, config.seed, abstract, shardings), shardings, mesh


def random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    shape = (config.train.batch_size, config.data.seq_len)
    return {"inputs": jnp.asarray(rng.integers(0, config.model.vocab_size, shape), jnp.int32),
            "targets": jnp.asarray(rng.integers(0, config.model.vocab_size, shape), jnp.int32),
            "segment_ids": jnp.ones(shape, jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape),
            "loss_mask": jnp.ones(shape, jnp.float32)}


def with_random_b(adapters, seed=1):
    """Adapters whose B is random too (at init B = 0 and the merge is the identity)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype) if path[-1].key == "b" else x,
        adapters)


def float_count(tree):
    return sum(x.size for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating))


@pytest.fixture(scope="module")
def scanned():
    """(config, task, tx, state) of the tiny decoder with rank-4 adapters (dropout 0.1) on one device."""
    config = tiny_config(rank=4, dropout=0.1)
    task, tx, state, _, _ = make_state(config)
    return config, task, tx, state


merge = jax.jit(lora.merge, static_argnums=2)
logits = jax.jit(lambda task, params, batch: task.logits(params, batch), static_argnums=0)


def test_merge_of_fresh_adapters_is_the_base(scanned):
    _, task, _, state = scanned
    jax.tree.map(np.testing.assert_array_equal, merge(state.params["base"], state.params["lora"], task.lora),
                 state.params["base"])


def test_adapter_shapes_and_logical_names_follow_the_kernel_axes():
    for scan_layers in (True, False):
        task = make_task(tiny_config(rank=4, scan_layers=scan_layers))
        batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in task.abstract_batch(1).items()}
        boxed = jax.eval_shape(lambda: task.init_params(jax.random.PRNGKey(0), batch))["lora"]
        adapted = {"/".join(path[:-1]) for path in traverse_util.flatten_dict(boxed)}
        layer_prefixes = ["layers"] if scan_layers else ["layers_0", "layers_1"]
        assert adapted == {f"{p}/{k}" for p in layer_prefixes for k in KERNELS}
    unscanned_query = boxed["layers_1"]["attn"]["query"]["kernel"]
    assert unscanned_query["a"].names == ("embed", "lora_rank") and unscanned_query["a"].value.shape == (32, 4)
    assert unscanned_query["b"].names == ("lora_rank", "heads", "head_dim")
    task = make_task(tiny_config(rank=4))
    boxed = jax.eval_shape(lambda: task.init_params(jax.random.PRNGKey(0), batch))["lora"]["layers"]
    query, out = boxed["attn"]["query"]["kernel"], boxed["attn"]["out"]["kernel"]
    assert query["a"].names == ("layers", "embed", "lora_rank") and query["a"].value.shape == (2, 32, 4)
    assert query["b"].names == ("layers", "lora_rank", "heads", "head_dim") and query["b"].value.shape == (2, 4, 4, 8)
    assert out["a"].names == ("layers", "heads", "head_dim", "lora_rank") and out["a"].value.shape == (2, 4, 8, 4)
    assert out["b"].names == ("layers", "lora_rank", "embed") and out["b"].value.shape == (2, 4, 32)
    key = boxed["attn"]["key"]["kernel"]["b"]  # GQA: 2 kv heads
    assert key.names == ("layers", "lora_rank", "kv_heads", "head_dim") and key.value.shape == (2, 4, 2, 8)


def hand_merge(base, adapters, scale, n_lead):
    """W + scale * A @ B in numpy, by flattening A to *lead x I x R and B to *lead x R x O."""
    hand = traverse_util.flatten_dict(jax.tree.map(np.asarray, base))
    for path, pair in traverse_util.flatten_dict(adapters, is_leaf=lambda _, x: "a" in x).items():
        w, a, b = hand[path], np.asarray(pair["a"]), np.asarray(pair["b"])
        lead = w.shape[:n_lead]
        a2, b2 = a.reshape(*lead, -1, a.shape[-1]), b.reshape(*lead, b.shape[n_lead], -1)
        hand[path] = w + scale * np.matmul(a2, b2).reshape(w.shape)
    return traverse_util.unflatten_dict(hand)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_merged_logits_equal_a_hand_computed_w_plus_scaled_a_b(scanned, scan_layers):
    config, task, _, state = scanned  # GQA: 4 query heads, 2 kv heads
    base, adapters = state.params["base"], with_random_b(state.params["lora"])
    if not scan_layers:  # the same weights in the unrolled layout (layers_0, layers_1)
        config = tiny_config(rank=4, scan_layers=False)
        task = make_task(config)
        base, adapters = unstack_layers(base, 2), unstack_layers(adapters, 2)
    merged = merge(base, adapters, task.lora)
    hand = hand_merge(base, adapters, 16.0 / 4, n_lead=1 if scan_layers else 0)
    batch = random_batch(config)
    expected = logits(task.inner, hand, batch)
    np.testing.assert_allclose(logits(task.inner, merged, batch), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(expected - logits(task.inner, base, batch))).max() > 1e-2
    if scan_layers:  # merging commutes with unstacking the scanned layers
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
                     merge(unstack_layers(base, 2), unstack_layers(adapters, 2), task.lora),
                     unstack_layers(merged, 2))


@pytest.fixture(scope="module")
def trained(scanned):
    """(initial state, states after 1 and 3 steps) with 2 microbatches and an EMA, one device."""
    config, task, tx, state = scanned
    state = state.replace(ema=state.params)
    step = jax.jit(step_lib.make_train_step(task, tx, optim.schedule(config), 2, ema_decay=0.9))
    states = [state]
    for i in range(3):
        states.append(step(states[-1], random_batch(config, seed=i))[0])
    return states


def test_training_changes_only_adapters_with_optimizer_state_that_scales_with_the_rank(trained):
    before, after = trained[0], trained[-1]
    jax.tree.map(np.testing.assert_array_equal, after.params["base"], before.params["base"])
    changed = jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), after.params["lora"], before.params["lora"])
    assert all(v > 0 for v in jax.tree.leaves(changed)), changed
    assert np.isfinite(float_count(after.ema["lora"]))
    # Adam's mu and nu, for the adapters only: 2x the adapter floats, nothing of the base.
    assert float_count(after.opt_state) == 2 * float_count(after.params["lora"])
    floats = {}
    for rank in (2, 4, 8):
        config = tiny_config(rank=rank)
        task = make_task(config)
        mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
        abstract, _ = state_lib.abstract_state(task, optim.optimizer(config, task.trainable), config.seed, mesh,
                                               sharding.rules_from_config(config.sharding_rules))
        floats[rank] = float_count(abstract.opt_state)
        assert floats[rank] == 2 * float_count(abstract.params["lora"])
    assert floats[4] == 2 * floats[2] and floats[8] == 4 * floats[2]
    assert floats[8] < float_count(abstract.params["base"])


def test_sharded_lora_step_matches_one_device(scanned, trained):
    config = tiny_config(rank=4, dropout=0.1)
    config.mesh.update(data=1, fsdp=4, tensor=2)
    task, tx, state, shardings, mesh = make_state(config, devices=jax.devices(), ema=True)
    rules = sharding.rules_from_config(config.sharding_rules)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(trained[0]))
    query = state.params["lora"]["layers"]["attn"]["query"]["kernel"]
    assert query["a"].sharding.spec == P(None, "fsdp", None)  # layers x embed x rank
    assert query["b"].sharding.spec == P(None, None, "tensor", None)  # layers x rank x heads x head_dim
    batch_sharding = sharding.batch_sharding(mesh, rules)
    step = step_lib.jit_train_step(step_lib.make_train_step(task, tx, optim.schedule(config), 2, ema_decay=0.9),
                                   shardings, batch_sharding, mesh)
    with jax.set_mesh(mesh):
        sharded, _ = step(state, jax.device_put(random_batch(config, seed=0), batch_sharding))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 jax.device_get(sharded.params), jax.device_get(trained[1].params))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 jax.device_get(sharded.ema), jax.device_get(trained[1].ema))


def test_dropout_drops_whole_input_rows_of_a_and_is_unbiased(scanned):
    a = jax.random.normal(jax.random.PRNGKey(0), (4, 256, 3))
    dropped = np.asarray(lora.drop_rows(jax.random.PRNGKey(1), a, 0.25))
    kept = np.all(dropped != 0, axis=-1)
    assert np.all(kept | np.all(dropped == 0, axis=-1))  # a row goes whole: one input feature
    np.testing.assert_allclose(dropped[kept], np.asarray(a)[kept] / 0.75, rtol=1e-6)
    assert abs(1 - kept.mean() - 0.25) < 0.05
    mean = jax.jit(jax.vmap(lambda k: lora.drop_rows(k, a, 0.25)))(jax.random.split(jax.random.PRNGKey(2), 1000))
    np.testing.assert_allclose(np.asarray(mean).mean(0), a, atol=0.2)  # unbiased: E[dropped A] = A

    config, task, _, state = scanned  # dropout 0.1
    base, adapters = state.params["base"], with_random_b(state.params["lora"])
    plain = merge(base, adapters, task.lora)  # no key: no dropout
    off = lora.LoraConfig(4, 16.0, 0.0, task.lora.targets)  # rate 0: the key changes nothing
    jax.tree.map(np.testing.assert_array_equal, plain, merge(base, adapters, off, jax.random.PRNGKey(3)))
    kernel = ("layers", "attn", "out", "kernel")  # layers x heads x head_dim x embed
    w = np.asarray(traverse_util.flatten_dict(base)[kernel])
    update_LxIxD = (np.asarray(traverse_util.flatten_dict(plain)[kernel]) - w).reshape(2, 32, 32)
    outputs = []
    for key in (5, 6):
        params = merge(base, adapters, task.lora, jax.random.PRNGKey(key))
        dropped_LxIxD = (np.asarray(traverse_util.flatten_dict(params)[kernel]) - w).reshape(2, 32, 32)
        gone = np.all(dropped_LxIxD == 0, axis=-1)  # input rows (layer, head, head_dim) dropped
        assert 0 < gone.sum() < gone.size // 2
        np.testing.assert_allclose(dropped_LxIxD[~gone], update_LxIxD[~gone] / 0.9, rtol=1e-4, atol=1e-6)
        outputs.append(np.asarray(logits(task.inner, params, random_batch(config))))
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-4  # another key (step), another mask


@pytest.mark.parametrize("field, value, message", [
    ("rank", -1, "optim.lora.rank=-1 must be >= 0"),
    ("alpha", 0.0, "optim.lora.alpha=0.0 must be > 0"),
    ("dropout", 1.0, "optim.lora.dropout=1.0 must be in [0, 1)"),
    ("targets", ["attn/(query"], "optim.lora.targets[0]='attn/(query' is not a regular expression"),
    ("targets", [], "optim.lora.targets is empty"),
])
def test_config_errors_name_the_field(field, value, message):
    config = tiny_config(rank=4)
    config.optim.lora[field] = value
    with pytest.raises(ValueError) as e:
        config_lib.validate(config, 1)
    assert message in str(e.value)


@pytest.mark.parametrize("targets, message", [
    (["attn/query/kernel", "attn/qkv/kernel"], "optim.lora.targets[1]='attn/qkv/kernel' matches no parameter"),
    (["attn_norm"], "optim.lora.targets[0]='attn_norm' matches layers/attn_norm/scale (axes ('layers', "
                    "'embed')), which is not a matrix"),
])
def test_targets_that_match_nothing_or_no_matrix_are_errors(targets, message):
    with pytest.raises(ValueError) as e:
        make_state(tiny_config(rank=2, targets=targets))
    assert message in str(e.value)


def test_tasks_that_cannot_be_wrapped_fail_clearly():
    cfg = lora.LoraConfig(2, 4.0, 0.0, ("attn/query/kernel",))
    with pytest.raises(ValueError, match="already has `pretrained_slots`"):
        lora.LoraTask(types.SimpleNamespace(pretrained_slots=("policy", "reference")), cfg)
    flat = lora.LoraTask(types.SimpleNamespace(init_params=lambda rng, batch: [jnp.zeros((3, 3))]), cfg)
    with pytest.raises(ValueError, match="parameters of type list, not a dict"):
        flat.init_params(jax.random.PRNGKey(0), {})


def test_optional_hooks_of_the_inner_task_see_merged_parameters():
    inner = types.SimpleNamespace(decoder_params=lambda params: params, unit="tokens")
    task = lora.LoraTask(inner, lora.LoraConfig(1, 2.0, 0.0, ("kernel",)))
    params = {"base": {"w": {"kernel": jnp.ones((2, 3))}},
              "lora": {"w": {"kernel": {"a": jnp.ones((2, 1)), "b": jnp.full((1, 3), 0.5)}}}}
    np.testing.assert_array_equal(task.decoder_params(params)["w"]["kernel"], np.full((2, 3), 2.0))  # 1 + 2 * 0.5
    assert task.unit == "tokens" and not hasattr(task, "sample_scores")


def saved_state(directory, step):
    """The "state" item of an orbax checkpoint as numpy arrays."""
    manager = checkpoint._manager(str(directory))
    tree = manager.item_metadata(step)["state"].tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(restore_args=restore_args)))
    manager.close()
    return state.state


def small_config(tmp_path, **overrides):
    c = tiny.get_config()
    c.model.update(width=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64)
    c.data.update(seq_len=32, cache_dir=str(tmp_path / "cache"))
    c.train.update(batch_size=8, eval_batches=2, progress_bar=False)
    c.mesh.update(data=2, fsdp=2, tensor=2)
    c.task.sample_tokens = 2
    c.eval.update(tasks=(), datasets=())
    for key, value in overrides.items():
        section, field = key.split("__")
        c[section][field] = value
    return c


@pytest.mark.slow
def test_export_merges_adapters_into_a_workdir_that_init_from_evaluates_the_same(tmp_path, capsys):
    run = tmp_path / "lora"
    c = small_config(tmp_path, train__steps=3, train__ema_decay=0.5, train__microbatches=2)
    c.optim.lora.update(rank=4, dropout=0.1)
    lora_eval = loop.train(loop.setup(c, str(run)))

    c.mode = "export"
    export = Path(loop.export(loop.setup(c, str(run))))
    assert "exported step 3" in capsys.readouterr().out
    assert export == run / "export" and sorted(p.name for p in (export / "checkpoints").iterdir()) == ["3"]
    assert (export / "tokenizer.model").read_bytes() == (run / "tokenizer.model").read_bytes()
    assert json.loads((export / "config.json").read_text())["optim"]["lora"]["rank"] == 0

    # the exported kernel is the EMA base + (16 / 4) A @ B of the EMA adapters, and differs from the base
    state, merged = saved_state(run / "checkpoints", 3), saved_state(export / "checkpoints", 3)
    assert sorted(merged) == ["params"]
    pair = state["ema"]["lora"]["layers"]["attn"]["query"]["kernel"]
    base = state["ema"]["base"]["layers"]["attn"]["query"]["kernel"]
    update = merged["params"]["layers"]["attn"]["query"]["kernel"] - base
    np.testing.assert_allclose(update, 4.0 * np.einsum("lir,lrhe->lihe", pair["a"], pair["b"]), atol=1e-6)
    assert np.abs(update).max() > 1e-3

    plain = small_config(tmp_path)
    plain.mode, plain.init_from, plain.data.tokenizer = "eval", str(export), str(export / "tokenizer.model")
    plain_eval = loop.evaluate(loop.setup(plain, str(tmp_path / "plain")))
    assert "newly initialised: nothing" in capsys.readouterr().out
    assert plain_eval["tokens"] == lora_eval["tokens"]
    assert plain_eval["loss"] == pytest.approx(lora_eval["loss"], rel=1e-5)
