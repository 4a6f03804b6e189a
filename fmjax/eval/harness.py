"""Benchmark tasks for decoders: multiple choice by log-likelihood, generation by exact match.

A task file is JSONL, one question per line:

  multiple choice  {"context": str, "choices": [str, ...], "gold": int}
  generation       {"context": str, "answer": str | [str, ...]}   (any listed answer counts)

Prompts are built exactly as lm-evaluation-harness builds them, so the two agree. With k shots,
the prompt of a question q is

  description + shot_1.context + " " + shot_1.target + "\\n\\n" + ... + shot_k.target + "\\n\\n" + q.context

where a shot's target is its gold choice (or first answer). Multiple choice scores each
continuation " " + choice given the prompt (fmjax.eval.scoring); generation decodes greedily
from the prompt until a stop string (task.stop, "\\n\\n" by default) or task.max_new_tokens.
The shots of question i are the first k of numpy.random.default_rng([seed, i]).permutation(n)
that are not i: the task's own other questions, reproducibly.

Metrics: acc (the most likely choice is gold), acc_norm (likelihood per character of the
choice, as lm-evaluation-harness), acc_stderr, and chance (mean 1 / number of choices);
exact_match (the stripped generation equals an answer) and contains (an answer occurs in it).
Built-in tasks (BUILTIN) are made from text the run never trained on; see `cloze_questions`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Callable, Sequence

import numpy as np

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


@dataclasses.dataclass(frozen=True)
class Question:
    context: str
    choices: tuple[str, ...] = ()  # multiple choice
    gold: int = 0
    answers: tuple[str, ...] = ()  # generation

    @property
    def target(self) -> str:
        return self.choices[self.gold] if self.choices else self.answers[0]


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    questions: tuple[Question, ...]
    description: str = ""
    stop: tuple[str, ...] = (FEWSHOT_DELIMITER,)  # generation only
    max_new_tokens: int = 32  # generation only

    @property
    def kind(self) -> str:
        return "multiple_choice" if self.questions[0].choices else "generation"


def question(record: dict, where: str) -> Question:
    """A Question from a task-file record; ValueError naming `where` (file:line) and the field."""
    if not isinstance(record, dict) or not isinstance(record.get("context"), str):
        raise ValueError(f"{where}: needs a string field 'context'")
    if "choices" in record:
        choices, gold = record["choices"], record.get("gold")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise ValueError(f"{where}: 'gold' must be the index of the right choice, 0 to {len(choices) - 1}; "
                             f"got {gold!r}")
        return Question(record["context"], choices=tuple(choices), gold=gold)
    answers = record.get("answer")
    answers = [answers] if isinstance(answers, str) else answers
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError(f"{where}: needs 'choices' and 'gold' (multiple choice) or 'answer' (generation: "
                         "a non-empty string or list of them)")
    return Question(record["context"], answers=tuple(answers))


def read_task(path: str) -> Task:
    """A task from a JSONL file; every question of the same kind. Errors name file:line."""
    if not os.path.isfile(path):
        raise ValueError(f"eval.tasks: {path} is neither a built-in task ({sorted(BUILTIN)}) nor a file")
    from fmjax.data import sources  # local: the harness itself needs no data layer
    questions = [question(record, f"{path}:{lineno}") for lineno, record in sources.jsonl_records(path)]
    if not questions:
        raise ValueError(f"{path}: the task has no questions")
    if len({bool(q.choices) for q in questions}) > 1:
        raise ValueError(f"{path}: mixes multiple-choice and generation questions; use one file per kind")
    name = os.path.basename(path).removesuffix(".jsonl")
    return Task(name, tuple(questions))


def shots(task: Task, index: int, num_fewshot: int, seed: int) -> list[Question]:
    """The few-shot examples of question `index` (see the module docstring)."""
    if num_fewshot >= len(task.questions):
        raise ValueError(f"eval.num_fewshot={num_fewshot} needs more than {num_fewshot} questions; "
                         f"task {task.name} has {len(task.questions)}")
    order = np.random.default_rng([seed, index]).permutation(len(task.questions))
    return [task.questions[i] for i in order if i != index][:num_fewshot]


def prompt(task: Task, index: int, num_fewshot: int, seed: int) -> str:
    examples = "".join(q.context + TARGET_DELIMITER + q.target + FEWSHOT_DELIMITER
                       for q in shots(task, index, num_fewshot, seed))
    return task.description + examples + task.questions[index].context


def evaluate(task: Task, scorer, *, num_fewshot: int = 0, limit: int = 0, seed: int = 1234) -> dict[str, float]:
    """The task's metrics; `scorer` has text_loglikelihood and generate (fmjax.eval.scoring.Scorer)."""
    count = min(limit, len(task.questions)) if limit else len(task.questions)
    prompts = [prompt(task, i, num_fewshot, seed) for i in range(count)]
    questions = task.questions[:count]
    if task.kind == "generation":
        outputs = scorer.generate(prompts, max_new_tokens=task.max_new_tokens, stop=task.stop)
        exact = [any(o.strip() == a.strip() for a in q.answers) for q, o in zip(questions, outputs)]
        contains = [any(a.strip() in o for a in q.answers) for q, o in zip(questions, outputs)]
        return {"exact_match": float(np.mean(exact)), "contains": float(np.mean(contains)), "questions": count}
    pairs = [(p, TARGET_DELIMITER + c) for p, q in zip(prompts, questions) for c in q.choices]
    scores = iter(scorer.text_loglikelihood(pairs))
    correct, correct_norm = [], []
    for q in questions:
        logprobs = np.array([next(scores)[0] for _ in q.choices])
        lengths = np.array([len(c) for c in q.choices], np.float64)
        correct.append(int(np.argmax(logprobs)) == q.gold)
        correct_norm.append(int(np.argmax(logprobs / lengths)) == q.gold)
    acc = float(np.mean(correct))
    return {"acc": acc, "acc_norm": float(np.mean(correct_norm)),
            "acc_stderr": math.sqrt(acc * (1 - acc) / max(count - 1, 1)),
            "chance": float(np.mean([1 / len(q.choices) for q in questions])), "questions": count}


# -- Built-in tasks, made from the held-out split of the run's own text data.

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z][a-z]{2,}")


def cloze_sentences(texts: Sequence[str], max_questions: int = 500) -> list[tuple[str, str]]:
    """(sentence without its last word, last word): sentences of 6 to 40 words ending in a
    plain word of 3+ letters and a full stop; at most max_questions, in document order."""
    found = []
    for text in texts:
        for sentence in _SENTENCE_END.split(" ".join(text.split())):
            words = sentence.split(" ")
            last = words[-1][:-1] if words[-1].endswith(".") else ""
            if 6 <= len(words) <= 40 and _WORD.fullmatch(last):
                found.append((" ".join(words[:-1]), last))
                if len(found) == max_questions:
                    return found
    return found


def cloze_questions(texts: Sequence[str], choices: int = 4, seed: int = 0) -> list[Question]:
    """Multiple choice: which word ends the sentence? Distractors are last words of other
    sentences of the same texts; the order of the choices is shuffled reproducibly."""
    sentences = cloze_sentences(texts)
    words = sorted({w for _, w in sentences})
    if len(words) < choices:
        raise ValueError(f"the held-out text has {len(sentences)} usable sentences with {len(words)} distinct "
                         f"last words; a {choices}-way cloze needs at least {choices}")
    rng = np.random.default_rng(seed)
    out = []
    for context, word in sentences:
        options = [word, *map(str, rng.choice([w for w in words if w != word], size=choices - 1, replace=False))]
        rng.shuffle(options)
        out.append(Question(context, choices=tuple(options), gold=options.index(word)))
    return out


def next_word_questions(texts: Sequence[str]) -> list[Question]:
    """Generation: complete the sentence with its last word (generation stops at punctuation)."""
    return [Question(context, answers=(word,)) for context, word in cloze_sentences(texts)]


def _heldout_texts(config) -> list[str]:
    from fmjax.data import sources  # local: the harness itself needs no data layer
    try:
        split = sources.load_split(config, config.data.eval_split)
    except (KeyError, ValueError) as e:
        raise ValueError(f"eval.tasks: the built-in tasks are made from the held-out split of a text data "
                         f"source (data.source={config.data.source!r}): {e}") from None
    return [split[i]["text"] for i in range(len(split))]


BUILTIN: dict[str, Callable] = {
    "cloze": lambda config: Task("cloze", tuple(cloze_questions(_heldout_texts(config)))),
    "next_word": lambda config: Task("next_word", tuple(next_word_questions(_heldout_texts(config))),
                                     stop=(".", ",", ";", ":", "!", "?", "\n"), max_new_tokens=8),
}


def load_task(name: str, config) -> Task:
    """A built-in task by name (made from config's held-out text) or a task file by path."""
    task = BUILTIN[name](config) if name in BUILTIN else read_task(name)
    if not task.questions:
        raise ValueError(f"eval.tasks: task {name!r} has no questions")
    return task
