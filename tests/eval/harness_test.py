"""Benchmark harness: task files, few-shot prompts exactly as documented, accuracy 1.0 where the
gold answer is made trivially likely and chance on shuffled gold, generation metrics, built-in
cloze tasks."""
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from fmjax.eval import harness, scoring
from fmjax.models.decoder import DecoderLM
from tests.infer.generate_test import CFG, CharTokenizer, abstract_params

HAND_MADE = [
    {"context": "Q: 1+1?\nA:", "choices": ["2", "3"], "gold": 0},
    {"context": "Q: 2+2?\nA:", "choices": ["5", "4"], "gold": 1},
    {"context": "Q: 3+3?\nA:", "choices": ["6", "7"], "gold": 0},
    {"context": "Q: 4+4?\nA:", "choices": ["9", "8"], "gold": 1},
]


class Recorder:
    """A scorer that records what the harness asks and prefers the longest continuation."""

    def __init__(self, outputs=()):
        self.pairs, self.prompts, self.outputs = [], [], list(outputs)

    def text_loglikelihood(self, pairs):
        self.pairs += pairs
        return [(float(len(c)), False) for _, c in pairs]

    def generate(self, prompts, *, max_new_tokens, stop):
        self.prompts += prompts
        return self.outputs[:len(prompts)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_few_shot_prompts_are_built_as_documented(tmp_path):
    task = harness.read_task(write_jsonl(tmp_path / "sums.jsonl", HAND_MADE))
    assert task.name == "sums" and task.kind == "multiple_choice"
    order = np.random.default_rng([7, 2]).permutation(4)  # the documented rule for question 2
    first, second = [i for i in order if i != 2][:2]
    shot = lambda i: HAND_MADE[i]["context"] + " " + HAND_MADE[i]["choices"][HAND_MADE[i]["gold"]] + "\n\n"
    assert harness.prompt(task, 2, 2, seed=7) == shot(first) + shot(second) + "Q: 3+3?\nA:"
    assert harness.prompt(task, 2, 0, seed=7) == "Q: 3+3?\nA:"
    recorder = Recorder()
    results = harness.evaluate(task, recorder, num_fewshot=2, seed=7)
    assert recorder.pairs[4:6] == [(harness.prompt(task, 2, 2, 7), " 6"), (harness.prompt(task, 2, 2, 7), " 7")]
    assert all(HAND_MADE[i]["context"] not in p.rsplit("\n\n", 1)[0] for i, (p, _) in
               zip(np.repeat(range(4), 2), recorder.pairs))  # a question is never its own shot
    assert results["questions"] == 4 and results["chance"] == 0.5
    with pytest.raises(ValueError, match="num_fewshot=4 needs more than 4 questions"):
        harness.evaluate(task, recorder, num_fewshot=4)


def test_task_files_fail_naming_file_line_and_field(tmp_path):
    bad = [({"context": "x", "choices": ["a"], "gold": 0}, "at least 2"),
           ({"context": "x", "choices": ["a", "b"], "gold": 2}, "'gold' must be the index"),
           ({"choices": ["a", "b"], "gold": 0}, "'context'"),
           ({"context": "x"}, "'answer'")]
    for record, message in bad:
        path = write_jsonl(tmp_path / "t.jsonl", [HAND_MADE[0], record])
        with pytest.raises(ValueError, match=f"t.jsonl:2: .*{message}"):
            harness.read_task(path)
    (tmp_path / "j.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="j.jsonl:1: not valid JSON"):
        harness.read_task(str(tmp_path / "j.jsonl"))
    mixed = write_jsonl(tmp_path / "m.jsonl", [HAND_MADE[0], {"context": "x", "answer": "y"}])
    with pytest.raises(ValueError, match="mixes"):
        harness.read_task(mixed)
    with pytest.raises(ValueError, match="neither a built-in task"):
        harness.read_task(str(tmp_path / "absent.jsonl"))


def rigged_model(token: int):
    """A decoder whose every next-token distribution puts ~all mass on `token`: equal embeddings,
    zero attention / MLP outputs, and an lm_head that reads the constant final state into `token`."""
    model = DecoderLM(CFG)
    params = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), nn.meta.unbox(abstract_params(model)))
    params["embed"]["embedding"][:] = 1.0
    params["final_norm"]["scale"][:] = 1.0
    params["layers"]["attn_norm"]["scale"][:] = 1.0
    params["layers"]["mlp_norm"]["scale"][:] = 1.0
    params["lm_head"]["kernel"][:, token] = 0.5  # logit 16 against 0
    return model, params


def test_accuracy_is_one_on_trivially_likely_gold_and_chance_when_shuffled():
    tok = CharTokenizer()
    gold_char = "a"
    model, params = rigged_model(tok.encode(gold_char)[0])
    scorer = scoring.Scorer(model, params, tok, max_len=32, batch_size=8)
    rng = np.random.default_rng(0)
    questions, shuffled = [], []
    for i in range(120):
        choices = ["a" * 4] + ["".join(rng.choice(list("bcdefgh"), 4)) for _ in range(3)]
        rng.shuffle(choices)
        context = "".join(rng.choice(list("pqrstuvw"), 6))
        questions.append(harness.Question(context, tuple(choices), choices.index("aaaa")))
        shuffled.append(harness.Question(context, tuple(choices), int(rng.integers(4))))
    results = harness.evaluate(harness.Task("likely", tuple(questions)), scorer)
    assert results["acc"] == 1.0 and results["acc_norm"] == 1.0
    chance = harness.evaluate(harness.Task("shuffled", tuple(shuffled)), scorer)
    assert chance["chance"] == 0.25
    assert abs(chance["acc"] - 0.25) < 3 * np.sqrt(0.25 * 0.75 / 120), chance  # within 3 standard errors


def test_generation_scores_exact_match_and_contains(tmp_path):
    task = harness.read_task(write_jsonl(tmp_path / "capitals.jsonl", [
        {"context": "France:", "answer": "Paris"}, {"context": "Peru:", "answer": ["Lima", "lima"]},
        {"context": "Chad:", "answer": "N'Djamena"}]))
    assert task.kind == "generation"
    recorder = Recorder([" Paris", " the city of Lima", " Rome"])
    results = harness.evaluate(task, recorder, num_fewshot=1, seed=0)
    assert results == {"exact_match": 1 / 3, "contains": 2 / 3, "questions": 3}
    assert recorder.prompts[0].endswith("\n\nFrance:") and len(recorder.prompts) == 3
    assert harness.evaluate(task, Recorder([" Paris"]), limit=1)["questions"] == 1


def test_cloze_questions_end_sentences_with_one_right_word():
    texts = ["The quick brown fox jumps over the lazy dog. A second sentence is here to end with words. "
             "Short one. Every function returns a value unless it raises an exception.",
             "Modules group related definitions together for reuse by programs."]
    sentences = harness.cloze_sentences(texts)
    assert sentences == [("The quick brown fox jumps over the lazy", "dog"),
                         ("A second sentence is here to end with", "words"),
                         ("Every function returns a value unless it raises an", "exception"),
                         ("Modules group related definitions together for reuse by", "programs")]
    questions = harness.cloze_questions(texts, choices=4, seed=3)
    assert questions == harness.cloze_questions(texts, choices=4, seed=3)  # reproducible
    for q, (context, word) in zip(questions, sentences):
        assert q.context == context and q.choices[q.gold] == word
        assert len(set(q.choices)) == 4
    assert [q.answers for q in harness.next_word_questions(texts)] == [(w,) for _, w in sentences]
