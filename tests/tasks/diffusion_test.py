"""Diffusion task through the shared trainer: weighted loss, eval buckets, EMA checkpointed and
resumed exactly, sharded = 1 device, guided samples written and scored, captions end to end."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from configs.diffusion import digits
from fmjax.train import checkpoint, loop, state as state_lib

jax.config.update("jax_numpy_rank_promotion", "raise")


def small_config(tmp_path, **train):
    c = digits.get_config()
    # One level (no down/up sampling) and the middle attention only: compiles in seconds on CPU.
    c.model.update(width=16, groups=4, n_heads=2, channel_mults=(1,), attention_levels=())
    c.data.cache_dir = str(cache_dir(tmp_path))
    c.task.update(timesteps=100, sample_steps=4, score_samples=3, eval_buckets=3, sample_per_class=2)
    c.train.update(steps=6, batch_size=16, log_every=1, eval_every=1000, eval_batches=1, ckpt_every=3,
                   progress_bar=False, ema_decay=0.9)
    c.train.update(**train)
    return c


def cache_dir(tmp_path):
    """The data cache of this module's tests (caption tokenizer, the classifier that scores samples),
    shared by every pytest-xdist worker of the session too (fmjax locks what it caches there), so
    the classifier trains once per session."""
    base = tmp_path.parent  # the session's base temp dir, or this worker's under xdist
    return (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "diffusion-cache"


def losses(workdir):
    return {r["step"]: r["loss"] for r in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in r}


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """(workdir, final eval results) of an uninterrupted 6-step run on one device."""
    workdir = tmp_path_factory.mktemp("full") / "run"
    config = small_config(tmp_path_factory.getbasetemp() / "full")  # the cache dir the other tests use
    results = loop.train(loop.setup(config, str(workdir), jax.devices()[:1]))
    return workdir, results


def test_weight_zero_rows_do_not_count(tmp_path):
    run = loop.setup(small_config(tmp_path), str(tmp_path / "run"), jax.devices()[:1])
    params = state_lib.init_state(run.task, run.tx, 0, run.abstract, run.shardings).params
    batch = next(run.task.train_iterator(0, 1))
    batch["weight"][5:] = 0.0
    other = dict(batch, images=np.where(np.arange(16)[:, None, None, None] < 5, batch["images"], 0.3))
    loss = jax.jit(run.task.loss)
    rng = jax.random.PRNGKey(0)
    (a, sums), (b, _) = loss(params, batch, rng), loss(params, other, rng)
    assert a == b and sums["weight"] == 5 and a > 0


def test_resume_is_exact_with_the_ema_saved_and_restored(tmp_path, full_run):
    full, _ = full_run
    config = small_config(tmp_path)

    def crash_at_5(step, state, metrics):
        if step == 5:
            raise _Stop()

    with pytest.raises(_Stop):
        loop.train(loop.setup(config, str(tmp_path / "resumed"), jax.devices()[:1]), hooks=[crash_at_5])
    loop.train(loop.setup(config, str(tmp_path / "resumed"), jax.devices()[:1]))
    assert losses(tmp_path / "resumed") == losses(full)  # bitwise equal floats
    run = loop.setup(config, str(full), jax.devices()[:1])
    restored = [checkpoint.Checkpoints(str(path), 1).restore(6, run.abstract)[0] for path in (full, tmp_path / "resumed")]
    assert restored[0].ema is not None
    jax.tree.map(np.testing.assert_array_equal, restored[0].ema, restored[1].ema)
    jax.tree.map(np.testing.assert_array_equal, restored[0].params, restored[1].params)
    moved = [float(np.abs(e - p).max()) for e, p in zip(jax.tree.leaves(restored[0].ema),
                                                       jax.tree.leaves(restored[0].params))]
    assert max(moved) > 0  # the EMA lags the parameters


def test_sharded_training_matches_one_device(tmp_path, full_run):
    full, _ = full_run
    config = small_config(tmp_path)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    # The losses are compared; sample scores and eval buckets have the tests below.
    config.task.update(score_samples=0, eval_buckets=1)
    loop.train(loop.setup(config, str(tmp_path / "eight")))
    one, eight = losses(full), losses(tmp_path / "eight")
    assert sorted(one) == sorted(eight) == list(range(1, 7))
    for step in one:
        assert abs(one[step] - eight[step]) / one[step] < 1e-4, (step, one[step], eight[step])


def test_eval_has_loss_per_bucket_scores_and_a_sample_grid(full_run):
    full, results = full_run
    assert set(results) >= {"loss", "loss_t0", "loss_t1", "loss_t2", "class_accuracy", "frechet_distance"}
    np.testing.assert_allclose(results["loss"], np.mean([results[f"loss_t{i}"] for i in range(3)]))
    assert 0 <= results["class_accuracy"] <= 1 and results["frechet_distance"] >= 0
    saved = json.load(open(full / "eval" / "results.json"))
    assert saved["step"] == 6 and saved["class_accuracy"] == results["class_accuracy"]
    picture = np.asarray(Image.open(full / "samples" / "step_6.png"))
    assert picture.shape == (4 * (10 * 9 + 1), 4 * (2 * 9 + 1))  # 10 rows of 2 tiles of 8+1 pixels, x4


@pytest.mark.slow
def test_captions_train_and_sample_end_to_end(tmp_path):
    config = small_config(tmp_path, steps=2)
    config.model.n_classes = 0
    config.model.text_encoder = {"vocab_size": 300, "width": 32, "n_layers": 1, "n_heads": 2, "head_dim": 16,
                                 "mlp_dim": 64, "max_len": 16, "positions": "rope", "norm": "pre"}
    config.data.update(captions=True, seq_len=12)
    config.task.eval_buckets = 1  # buckets have their test above; this one needs the sample scores
    results = loop.train(loop.setup(config, str(tmp_path / "run")))
    assert "class_accuracy" in results and (tmp_path / "run" / "tokenizer.model").is_file()
    assert (tmp_path / "run" / "samples" / "step_2.png").is_file()


def test_mode_sample_writes_a_grid_from_the_ema_of_the_latest_checkpoint(full_run):
    full, _ = full_run
    config = small_config(full.parent)
    config.mode = "sample"
    path = loop.sample(loop.setup(config, str(full), jax.devices()[:1]))
    assert path.endswith("step_6.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(full / "samples" / "step_6.png")))
