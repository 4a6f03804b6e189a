"""Evaluation in the loop and in mode=eval: held-out metrics, perplexity datasets and benchmark
tasks, logged like training metrics and written to eval/results.json."""
import json

import pytest

from configs.encoder import tiny as encoder_tiny
from fmjax.eval import suite
from fmjax.train import loop
from tests.eval.harness_test import HAND_MADE, write_jsonl
from tests.train.loop_test import small_config


def test_in_loop_eval_logs_benchmarks_and_mode_eval_reproduces_them(tmp_path):
    corpus = tmp_path / "notes.txt"
    corpus.write_text("A short note about lists.\n\nAnother note, about dictionaries and sets.\n")
    config = small_config(tmp_path, steps=4, eval_every=2)
    config.eval.tasks = ("cloze", "next_word", write_jsonl(tmp_path / "sums.jsonl", HAND_MADE))
    config.eval.datasets = (f"text:{corpus}",)
    config.eval.num_fewshot = 1
    config.eval.limit = 6
    workdir = tmp_path / "run"
    run = loop.setup(config, str(workdir))
    suite.validate(config, run.task)
    final = loop.train(run)

    evals = [json.loads(line) for line in open(workdir / "metrics.jsonl") if "eval_loss" in line]
    assert [r["step"] for r in evals] == [2, 4]
    keys = {"cloze/acc", "cloze/acc_norm", "cloze/chance", "next_word/exact_match", "sums/acc",
            "notes/perplexity", "notes/bits_per_byte"}
    assert keys <= set(final) and all(f"eval_{k}" in evals[-1] for k in keys)
    assert final["cloze/questions"] == 6 and final["sums/questions"] == 4 and final["notes/documents"] == 2
    written = json.load(open(workdir / "eval" / "results.json"))
    assert written["step"] == 4 and all(written[k] == final[k] == evals[-1][f"eval_{k}"] for k in final)

    again = loop.evaluate(loop.setup(config.copy_and_resolve_references(), str(workdir)))
    for key in keys:
        assert again[key] == pytest.approx(final[key], rel=1e-5, abs=1e-6), key


def test_benchmarks_need_a_decoder_and_valid_settings(tmp_path):
    config = encoder_tiny.get_config()
    config.eval.tasks = ("cloze",)
    task = type("EncoderTask", (), {})()
    with pytest.raises(ValueError, match="eval.tasks and eval.datasets score decoder models; task.name='mlm'"):
        suite.validate(config, task)
    config = small_config(tmp_path)
    config.eval.num_fewshot = -1
    with pytest.raises(ValueError, match="eval.num_fewshot=-1 must be >= 0"):
        suite.validate(config, task)
    config.eval.num_fewshot = 4
    config.eval.tasks = (write_jsonl(tmp_path / "sums.jsonl", HAND_MADE),)
    decoder = type("DecoderTask", (), {"decoder_params": lambda self, p: p})()
    with pytest.raises(ValueError, match="num_fewshot=4 needs more than 4 questions"):
        suite.validate(config, decoder)
