"""Perplexity and bits per byte of a decoder on whole text datasets (config.eval.datasets).

A dataset spec names a reader and where to read:

  text:PATH               blank-line separated documents of a UTF-8 text file
  wikitext:PATH           a WikiText file (e.g. ../shared/data/text/wikitext2_test.tokens.txt),
                          one document per article (a " = Title = " heading and what follows)
  jsonl:PATH:FIELD        the FIELD string of each line of a .jsonl file
  tfds:NAME:SPLIT[:FIELD] a TFDS text dataset (FIELD defaults to "text"), e.g.
                          tfds:wikitext/wikitext-2-raw-v1:test

Every token of every document is scored once (fmjax.eval.scoring rolling windows: [bos], then
windows of up to max_len tokens that each see the token before them), as lm-evaluation-harness
scores its perplexity tasks. loss = nats / tokens, perplexity = exp(loss); bits_per_byte = nats /
ln 2 / UTF-8 bytes of the documents (tokenizer-independent, so models with different tokenizers
compare); word_perplexity = exp(nats / whitespace-separated words).
"""
from __future__ import annotations

import math
import os
import re
from typing import Iterator

from fmjax.data import sources

_ARTICLE = re.compile(r"^ = [^=].* = $")


def wikitext_documents(path: str) -> Iterator[str]:
    """Articles of a WikiText file: each starts at a level-1 heading line (" = Title = ")."""
    article: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if _ARTICLE.match(line.rstrip("\n")) and "".join(article).strip():
                yield "".join(article).strip()
                article = []
            article.append(line)
    if "".join(article).strip():
        yield "".join(article).strip()


def _tfds_documents(name: str, split: str, field: str) -> Iterator[str]:
    import tensorflow_datasets as tfds  # local: heavy, and only this reader needs it
    for record in tfds.data_source(name, split=split):
        text = record[field]
        yield text.decode("utf-8") if isinstance(text, bytes) else str(text)


def parse(spec: str) -> tuple[str, Iterator[str]]:
    """(name, documents) of a dataset spec; ValueError naming eval.datasets and the spec."""
    kind, _, rest = spec.partition(":")
    parts = rest.split(":")
    readers = {"text": 1, "wikitext": 1, "jsonl": 2, "tfds": (2, 3)}
    counts = readers.get(kind)
    if counts is None or len(parts) not in (counts if isinstance(counts, tuple) else (counts,)) or not all(parts):
        raise ValueError(f"eval.datasets: {spec!r} is not one of text:PATH, wikitext:PATH, jsonl:PATH:FIELD, "
                         "tfds:NAME:SPLIT[:FIELD]")
    if kind == "tfds":
        name, split, field = (parts + ["text"])[:3]
        return f"{name.replace('/', '_')}_{split}", _tfds_documents(name, split, field)
    path = parts[0]
    if not os.path.isfile(path):
        raise ValueError(f"eval.datasets: {spec!r}: no file {path}")
    stem = os.path.basename(path).split(".")[0]
    if kind == "jsonl":
        return stem, sources.jsonl_documents(path, parts[1])
    return stem, (wikitext_documents(path) if kind == "wikitext" else sources.text_documents(path))


def evaluate(documents, scorer, limit: int = 0) -> dict[str, float]:
    """Metrics of `scorer` (fmjax.eval.scoring.Scorer) over the documents (the first `limit`; 0: all)."""
    texts = [d for d in documents if d.strip()]
    texts = texts[:limit] if limit else texts
    if not texts:
        raise ValueError("eval.datasets: the dataset has no documents")
    scores = scorer.rolling_loglikelihood(texts)
    nats = -sum(logprob for logprob, _ in scores)
    tokens = sum(n for _, n in scores)
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    words = sum(len(t.split()) for t in texts)
    return {"loss": nats / tokens, "perplexity": math.exp(nats / tokens),
            "bits_per_byte": nats / math.log(2) / num_bytes, "word_perplexity": math.exp(nats / words),
            "documents": len(texts), "tokens": tokens, "bytes": num_bytes}
