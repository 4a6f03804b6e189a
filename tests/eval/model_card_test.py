"""The model card of a tiny LM run: complete, its figures exactly those of the run's files, a real
loss-curve plot; metrics.jsonl's elapsed_s keeps growing across a resume."""
import hashlib
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fmjax.eval import model_card
from fmjax.train import loop, metrics as metrics_lib
from tests.train.loop_test import small_config

SECTIONS = ("## Model details", "## Intended use", "## Limitations", "## Training data", "## Training procedure",
            "## Evaluation results", "## Loss curve")


class _Stop(Exception):
    pass


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run (eval and checkpoint every 2 steps) stopped after step 3 and resumed from step 2."""
    workdir = tmp_path_factory.mktemp("card") / "run"
    config = small_config(workdir.parent, steps=4, eval_every=2, ckpt_every=2)

    def stop_at_3(step, state, metrics):
        if step == 3:
            raise _Stop()

    with pytest.raises(_Stop):
        loop.train(loop.setup(config, str(workdir)), hooks=[stop_at_3])
    before = _records(workdir)
    run = loop.setup(config, str(workdir))
    loop.train(run)
    return run, workdir, before


def test_card_is_complete_and_quotes_the_run_files_exactly(trained):
    run, workdir, _ = trained
    card = json.loads((workdir / "model_card.json").read_text())
    text = (workdir / "MODEL_CARD.md").read_text()
    for section in SECTIONS:
        assert section in text, section
    assert "![loss curve](loss_curve.png)" in text
    assert "<details><summary>full resolved config (config.json)</summary>" in text

    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert results["step"] == 4
    assert card["evaluation"] == results  # the same floats, bit for bit
    for key, value in results.items():
        if isinstance(value, float):
            assert f"| {key.rpartition('/')[2]} | {value!r} |" in text, key

    records = _records(workdir)
    last_loss = [r for r in records if "loss" in r][-1]
    proc = card["training_procedure"]
    assert proc["final_loss"] == last_loss["loss"] and proc["final_loss_step"] == 4
    assert f"{last_loss['loss']!r} (step 4)" in text
    assert proc["wall_time_s"] == records[-1]["elapsed_s"]
    assert proc["steps"] == 4 and proc["units_seen"] == 4 * 8 * 32 and proc["unit"] == "tokens"
    assert proc["config"] == json.loads((workdir / "config.json").read_text())
    assert proc["hardware"] == {"devices": 8, "device_kind": jax.devices()[0].device_kind, "platform": "cpu",
                                "processes": 1}

    model = card["model_details"]
    assert model["architecture"] == "decoder" and model["config"]["width"] == 64
    assert model["parameters"] == {"total": run.task.model_config.param_count(),
                                   "trainable": run.task.model_config.param_count()}
    assert model["flops_per_unit"] == run.task.flops_per_unit()
    data = card["training_data"]
    assert data["source"] == "pydoc" and data["dataset_id"].startswith("pydoc_")
    assert data["tokenizer_sha256"] and data["tokenizer_sha256"] in text
    assert "pile" not in data  # the config has no data.pile
    assert "not for production" in card["limitations"] and "pydoc" in card["intended_use"]


def test_loss_curve_plots_the_logged_losses(trained):
    _, workdir, _ = trained
    image = Image.open(workdir / "loss_curve.png")
    assert image.size == (640, 400)
    pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    assert 0.02 < (pixels.min(axis=-1) < 200).mean() < 0.5  # drawn on, not blank nor filled

    records = _records(workdir)
    _, lines = model_card.loss_curve(records)
    assert lines["train loss"] == ([1, 2, 3, 4], [r["loss"] for r in records if "loss" in r])
    assert lines["eval loss"] == ([2, 4], [r["eval_loss"] for r in records if "eval_loss" in r])


def test_elapsed_s_keeps_growing_across_a_resume(trained):
    _, workdir, before = trained
    records = _records(workdir)
    assert [r["step"] for r in before if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert records[:3] == before[:3]  # steps 1, 2 and step 2's eval were kept; step 3 logged again
    elapsed = [r["elapsed_s"] for r in records]
    assert all(0 < a <= b for a, b in zip(elapsed, elapsed[1:])), elapsed


def test_a_resumed_writer_continues_the_clock_of_the_records_it_keeps(tmp_path):
    records = [{"step": 5, "loss": 1.0, "elapsed_s": 100.0}, {"step": 7, "loss": 0.5, "elapsed_s": 200.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    writer = metrics_lib.MetricsWriter(str(tmp_path), total_steps=10, resume_step=5, progress_bar=False)
    writer.write(6, {"loss": 0.75})
    writer.close()
    kept, written = _records(tmp_path)
    assert kept == records[0] and written["step"] == 6
    assert 100.0 <= written["elapsed_s"] < 150.0


def test_mode_eval_refreshes_the_card(trained):
    run, workdir, _ = trained
    config = run.config.copy_and_resolve_references()
    config.eval.intended_use = "Checking that mode=eval rewrites the card."
    config.mode = "eval"
    loop.evaluate(loop.setup(config, str(workdir), devices=jax.devices()[:2]))
    card = json.loads((workdir / "model_card.json").read_text())
    assert card["intended_use"] == config.eval.intended_use
    assert config.eval.intended_use in (workdir / "MODEL_CARD.md").read_text()
    assert card["training_procedure"]["hardware"]["devices"] == 8  # training's, not this eval's 2
    assert card["evaluation"] == json.loads((workdir / "eval" / "results.json").read_text())


def test_results_table_groups_the_held_out_split_then_each_prefix():
    results = {"step": 7, "split": "validation", "loss": 2.5, "perplexity": 12.182493960703473,
               "wikitext2/perplexity": 99.5, "pydoc_cloze/acc": 0.25, "text:/a/b.txt/bits_per_byte": 1.5,
               "wikitext2/bits_per_byte": 2.0}
    assert model_card.result_groups(results) == {
        "held-out (validation)": {"loss": 2.5, "perplexity": 12.182493960703473},
        "wikitext2": {"perplexity": 99.5, "bits_per_byte": 2.0},
        "pydoc_cloze": {"acc": 0.25},
        "text:/a/b.txt": {"bits_per_byte": 1.5}}


def test_parameter_counts_per_model_of_a_boxed_tree():
    def boxed(*shape):
        return nn.Partitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names=(None,) * len(shape))

    params = {"policy": {"w": boxed(4, 8), "b": boxed(8)}, "reference": {"w": boxed(4, 8), "b": boxed(8)}}

    def trainable(p):
        return {"policy": jax.tree.map(lambda _: True, p["policy"]),
                "reference": jax.tree.map(lambda _: False, p["reference"])}

    assert model_card.parameter_counts(params, trainable, by_subtree=True) == {
        "total": 80, "trainable": 40,
        "subtrees": {"policy": {"total": 40, "trainable": 40}, "reference": {"total": 40, "trainable": 0}}}
    assert model_card.parameter_counts(params["policy"]) == {"total": 40, "trainable": 40}


def test_training_data_hashes_local_files_and_names_a_data_pile(tmp_path):
    config = small_config(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one document\n\nanother\n")
    config.data.update(source="text", path=str(corpus))
    data = model_card.training_data(config, str(tmp_path))
    assert data["file_sha256"] == {str(corpus): hashlib.sha256(corpus.read_bytes()).hexdigest()}
    assert data["dataset_id"].startswith("text_") and data["tokenizer_sha256"] is None and "pile" not in data

    manifest = {"id": "demo@abc123", "version": "abc123", "created": "2026-11-23T00:00:00+00:00", "tags": ["t"],
                "name": "demo", "shards_sha256": {"tfds/x.array_record-00000-of-00001": "f" * 64},
                "sources": [{"name": "plays", "domain": "plays", "licence": "public-domain",
                             "files": [{"path": "/d/plays.txt", "sha256": "e" * 64}]}]}
    (tmp_path / "piles" / "demo" / "abc123").mkdir(parents=True)
    (tmp_path / "piles" / "demo" / "abc123" / "manifest.json").write_text(json.dumps(manifest))
    config.data.update(source="pile", pile="demo@abc123", piles_dir=str(tmp_path / "piles"))
    data = model_card.training_data(config, str(tmp_path))
    assert data["pile"]["id"] == "demo@abc123" and data["pile"]["sources"][0]["files"] == {"plays.txt": "e" * 64}
    rows = dict(model_card._data_rows(data))
    assert "`demo@abc123`" in rows["data pile"] and "plays.txt `eeeeeeeeeeeeeeee`" in rows["pile source plays"]
