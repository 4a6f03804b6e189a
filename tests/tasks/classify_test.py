"""Classification task: weighted loss, dropout, confusion-matrix metrics, tokenizer choice, a short run."""
import json
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.encoder import classify_domains, tiny as encoder_tiny
from fmjax.data import labelled, tokenizer as tokenizer_lib
from fmjax.tasks.classify import ClassifyTask
from fmjax.train import loop
from tests.data.labelled_test import SHARED_TEXT, write_domains

VOCAB, SEQ_LEN = 64, 16
EXAMPLES = labelled.Examples(labels=("a", "b", "c"), train=({"text": "x", "label": 0},),
                             validation=({"text": "y", "label": 1},))


def small_config(**model):
    c = classify_domains.get_config()
    c.model.update(vocab_size=VOCAB, width=32, n_layers=2, n_heads=4, head_dim=8, mlp_dim=64, max_len=32)
    c.model.update(**model)
    c.data.seq_len = SEQ_LEN
    return c


def stub_tokenizer():
    return types.SimpleNamespace(vocab_size=VOCAB, pad_id=0, bos_id=2, eos_id=3)


def random_batch(rows=8, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, SEQ_LEN + 1, rows)
    segments = (np.arange(SEQ_LEN)[None] < lengths[:, None]).astype(np.int32)
    inputs = np.where(segments > 0, rng.integers(5, VOCAB, (rows, SEQ_LEN)), 0).astype(np.int32)
    return {"inputs": inputs, "segment_ids": segments, "positions": np.arange(SEQ_LEN)[None] * segments,
            "labels": rng.integers(0, 3, rows).astype(np.int32), "weight": np.ones(rows, np.float32)}


@pytest.fixture(scope="module")
def task_and_params():
    task = ClassifyTask(small_config(dropout=0.3), stub_tokenizer(), EXAMPLES)
    inputs = jnp.zeros((1, SEQ_LEN), jnp.int32)
    return task, jax.jit(lambda: nn.meta.unbox(task.model.init(jax.random.PRNGKey(0), inputs)))()["params"]


def test_loss_sums_only_weighted_rows(task_and_params):
    task, params = task_and_params
    batch = random_batch()
    batch["weight"][[1, 4, 5]] = 0.0
    other = random_batch(seed=1)  # the same rows, but different ones where the weight is 0
    keep = batch["weight"] > 0
    altered = {k: np.where(keep.reshape(-1, *[1] * (v.ndim - 1)), v, other[k]) for k, v in batch.items()}
    altered["weight"] = batch["weight"]
    rng = jax.random.PRNGKey(1)
    loss, metrics = jax.jit(task.loss)(params, batch, rng)
    altered_loss, altered_metrics = jax.jit(task.loss)(params, altered, rng)
    assert loss == altered_loss and metrics["accuracy"] == altered_metrics["accuracy"]
    assert metrics["weight"] == 5 and metrics["loss"] == loss
    logits = jax.jit(task.logits)(params, batch, rng)  # the training forward pass: same dropout key
    ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["labels"][:, None], -1)[:, 0]
    np.testing.assert_allclose(loss, np.sum(ce * batch["weight"]), rtol=1e-5)


def test_dropout_only_in_training(task_and_params):
    task, params = task_and_params
    batch = random_batch()
    loss, logits = jax.jit(task.loss), jax.jit(task.logits)
    one, two = (loss(params, batch, jax.random.PRNGKey(k))[0] for k in (1, 2))
    assert one != two and loss(params, batch, jax.random.PRNGKey(1))[0] == one
    np.testing.assert_array_equal(logits(params, batch), logits(params, batch))


def test_confusion_ignores_padding_rows_and_results_give_per_class_f1(task_and_params):
    task, params = task_and_params
    batch = random_batch()
    batch["weight"][6:] = 0.0
    sums = jax.jit(task.eval_sums)(params, batch)
    predicted = np.argmax(jax.jit(task.logits)(params, batch), -1)
    expected = np.zeros((3, 3))
    np.add.at(expected, (batch["labels"][:6], predicted[:6]), 1)
    np.testing.assert_array_equal(sums["confusion"], expected)

    confusion = np.array([[3, 1, 0], [0, 2, 2], [0, 0, 0]], np.float64)  # rows true, columns predicted
    results = task.eval_results({"nats": np.float64(4.0), "confusion": confusion})
    f1 = [2 * 3 / (3 + 4), 2 * 2 / (3 + 4), 0.0]  # 2 tp / (predicted + true)
    assert results["accuracy"] == 5 / 8 and results["loss"] == 0.5 and results["examples"] == 8
    np.testing.assert_allclose([results["f1_a"], results["f1_b"], results["f1_c"]], f1)
    np.testing.assert_allclose(results["macro_f1"], np.mean(f1))


def test_flops_per_example_is_the_sequence_plus_head():
    task = ClassifyTask(small_config(), stub_tokenizer(), EXAMPLES)
    body = task.model_config.flops_per_token(SEQ_LEN) * SEQ_LEN
    assert body < task.flops_per_unit() < 1.01 * body and task.units_per_example() == 1


def test_bad_pooling_is_named():
    config = small_config()
    config.task.pooling = "max"
    with pytest.raises(ValueError, match=r"task.pooling='max'; valid: \['cls', 'mean'\]"):
        ClassifyTask(config, stub_tokenizer(), EXAMPLES)


def _no_scratch():
    raise AssertionError("a tokenizer is given, none is trained")


def test_tokenizer_is_data_tokenizer_or_the_pretraining_workdirs(tmp_path):
    pre = tmp_path / "pre"
    (pre / "checkpoints" / "7").mkdir(parents=True)
    (pre / "tokenizer.model").write_bytes(b"pretrained")
    (tmp_path / "other.model").write_bytes(b"other")
    config = small_config()
    config.data.tokenizer = str(tmp_path / "other.model")
    assert tokenizer_lib.finetune_file(config, _no_scratch) == str(tmp_path / "other.model")  # no init_from
    config.data.tokenizer = ""
    for init_from in (pre, pre / "checkpoints" / "7"):
        config.init_from = str(init_from)
        assert tokenizer_lib.finetune_file(config, _no_scratch) == str(pre / "tokenizer.model")
    config.data.tokenizer = str(pre / "tokenizer.model")
    assert tokenizer_lib.finetune_file(config, _no_scratch) == str(pre / "tokenizer.model")
    config.data.tokenizer = str(tmp_path / "other.model")
    with pytest.raises(ValueError, match="is not the tokenizer the init_from model was pretrained with"):
        tokenizer_lib.finetune_file(config, _no_scratch)
    config.data.tokenizer = str(tmp_path / "missing.model")
    with pytest.raises(ValueError, match=r"data.tokenizer=.*missing.model' does not exist"):
        tokenizer_lib.finetune_file(config, _no_scratch)
    (pre / "tokenizer.model").unlink()
    config.data.tokenizer = ""
    with pytest.raises(ValueError, match=r"init_from=.* has no .*tokenizer.model; set data.tokenizer"):
        tokenizer_lib.finetune_file(config, _no_scratch)
    hf = tmp_path / "bert"  # a Hugging Face BERT folder is its own tokenizer
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    config.init_from = str(hf)
    assert tokenizer_lib.finetune_file(config, _no_scratch) == str(hf)


def test_a_short_run_from_scratch_trains_its_tokenizer_and_writes_samples(tmp_path):
    config = small_config(vocab_size=300)
    config.task.labels = []
    config.task.sample_count = 3
    config.data.update(paths=write_domains(tmp_path), passage_chars=60, max_per_class=0,
                       validation_fraction=0.3, cache_dir=str(tmp_path / "cache"))
    config.train.update(steps=4, batch_size=8, log_every=2, eval_every=4, ckpt_every=4, progress_bar=False)
    results = loop.train(loop.setup(config, str(tmp_path / "run")))
    examples = labelled.load(config)
    assert results["examples"] == len(examples.validation) and 0 <= results["accuracy"] <= 1
    assert set(results) >= {"loss", "macro_f1", "f1_domain0", "f1_domain1", "f1_domain2"}
    assert (tmp_path / "run" / "tokenizer.model").is_file()
    samples = (tmp_path / "run" / "samples" / "step_4.txt").read_text()
    assert samples.count("### true: ") == 3 and "predicted: domain" in samples
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert {"examples_per_s", "accuracy"} <= set(logged[0])


# The acceptance setting (chosen with 3 seeds; see the report of issue 3): a near-character
# tokenizer (400 pieces), so words reach the classifier spelled out in pieces and composing them is
# what MLM pretraining teaches; 64-character passages, ~75 labelled per class, ~325 held out per class.
ACCEPTANCE_MODEL = dict(vocab_size=400, width=64, n_layers=2, n_heads=4, head_dim=16, mlp_dim=256, max_len=64,
                        positions="rope", norm="pre")


def pretrained_vs_scratch(tmp_path, seed):
    """(held-out results fine-tuned from an MLM-pretrained encoder, from scratch), same steps and seed."""
    quiet = dict(log_every=100, eval_every=1000, ckpt_every=1000, progress_bar=False)
    fine = classify_domains.get_config()
    fine.seed = seed
    fine.model.update(**ACCEPTANCE_MODEL)
    fine.task.update(pooling="mean", sample_count=4)
    fine.data.update(passage_chars=64, seq_len=64, max_per_class=400, validation_fraction=0.8,
                     cache_dir=str(tmp_path / "cache"))
    fine.optim.update(lr=3e-3, warmup=0.1)
    fine.train.update(steps=150, batch_size=16, **quiet)
    # Unlabelled pretraining text: the train split of the same passages under a larger cap; the same
    # validation_fraction holds out every passage the classifier is evaluated on.
    corpus = fine.copy_and_resolve_references()
    corpus.data.max_per_class = 8000
    pre = encoder_tiny.get_config()
    pre.seed = seed
    pre.model.update(**ACCEPTANCE_MODEL)
    pre.task.update(mask_rate=0.3, sample_prompts=[])
    pre.data.update(source="jsonl", path=str(labelled.write_corpus(corpus)), text_field="text", seq_len=64,
                    validation_fraction=0.8, cache_dir=str(tmp_path / "cache"))
    pre.optim.update(lr=3e-3, warmup=0.1)
    # 400 MLM and 150 fine-tuning steps: 800 and 300 cost twice the training for about the same gaps
    # (see the test).
    pre.train.update(steps=400, batch_size=16, eval_batches=4, **quiet)
    one = jax.devices()[:1]  # the mesh adds nothing here, and 8 fake devices on 2 cores cost ~20%
    mlm = loop.train(loop.setup(pre, str(tmp_path / "encoder"), one))
    print(f"MLM: masked-token accuracy {mlm['accuracy']:.3f} (unigram {mlm['unigram_accuracy']:.3f})")
    fine.init_from = str(tmp_path / "encoder")
    pretrained = loop.train(loop.setup(fine, str(tmp_path / "pretrained"), one))
    fine.init_from = ""
    fine.data.tokenizer = str(tmp_path / "encoder" / "tokenizer.model")  # the same input ids
    scratch = loop.train(loop.setup(fine, str(tmp_path / "scratch"), one))
    for name, r in (("pretrained", pretrained), ("scratch", scratch)):
        per_class = ", ".join(f"{k[3:]} {v:.3f}" for k, v in r.items() if k.startswith("f1_"))
        print(f"{name:10s}: accuracy {r['accuracy']:.3f}, macro-F1 {r['macro_f1']:.3f} ({per_class}) "
              f"on {r['examples']} held-out passages")
    return pretrained, scratch


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_TEXT.is_dir(), reason=f"the offline corpora are not at {SHARED_TEXT}")
def test_mlm_pretraining_beats_scratch_on_held_out_domains(tmp_path):
    # Seeds 0 / 1 / 2 / 3 / 4 gave accuracy 0.759 / 0.767 / 0.749 / 0.761 / 0.778 pretrained vs
    # 0.704 / 0.743 / 0.729 / 0.720 / 0.733 from scratch (macro-F1 within 0.006 of those); with 800
    # MLM and 300 fine-tuning steps the gaps were 0.040 / 0.041 / 0.018 / 0.059 / 0.058. A change
    # that closes the gap on seed 0 deserves a look before the setting is moved.
    pretrained, scratch = pretrained_vs_scratch(tmp_path, seed=0)
    assert pretrained["accuracy"] > scratch["accuracy"] + 0.01
    assert pretrained["macro_f1"] > scratch["macro_f1"] + 0.01
