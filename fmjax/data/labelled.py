"""Labelled text for sequence classification: examples, the train/validation split, grain batches.

data.source selects where (text, label) examples come from:
  domains  every file of data.paths is a class, named by the same position of task.labels (else
           the file stem; files that share a name form one class). Its text is cut at line and
           sentence boundaries into passages of about data.passage_chars characters, whitespace
           normalised; every class keeps the same number of passages, at most data.max_per_class
           (0: no cap), picked by a stable hash, so the classes are balanced.
  jsonl    one JSON object per line of data.path: text in data.text_field, label in
           data.label_field, a string of task.labels or an int index into it (task.labels empty:
           the sorted distinct strings, or "0".."max" for ints); at most data.max_per_class per class.
An example is in the validation split when the hash of its text says so (sources.is_validation),
so every run and process agrees. A batch is a dict of numpy arrays, per process:

  inputs_BxL       int32    [bos] + token ids (truncated to fit) + [eos], then padding (pad id)
  segment_ids_BxL  int32    1 on real tokens, 0 on padding
  positions_BxL    int32    0 .. n-1 on real tokens, 0 on padding
  labels_B         int32    class index
  weight_B         float32  1.0; 0.0 on the rows that pad the last eval batch

B: local batch (train.batch_size // process_count); L: data.seq_len.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re

import grain
import ml_collections
import numpy as np

from fmjax.data import pipeline, sources
from fmjax.data import tokenizer as tokenizer_lib

SOURCES = ("domains", "jsonl")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_PREFETCH_BATCHES = 4


@dataclasses.dataclass(frozen=True)
class Examples:
    """Class names (index = label) and the {"text", "label"} records of each split."""
    labels: tuple[str, ...]
    train: tuple[dict, ...]
    validation: tuple[dict, ...]


def passages(text: str, passage_chars: int) -> list[str]:
    """`text` cut at line / sentence ends into whitespace-normalised pieces of ~passage_chars.

    A passage closes once it reaches passage_chars, or before a unit that would take it past that
    when it already has half; a sentence longer than passage_chars is cut at spaces.
    """
    units = []
    for line in text.splitlines():
        for sentence in _SENTENCE_END.split(" ".join(line.split())):
            while len(sentence) > passage_chars:
                cut = sentence.rfind(" ", 0, passage_chars + 1)
                cut = cut if cut > 0 else passage_chars
                units.append(sentence[:cut])
                sentence = sentence[cut:].lstrip()
            if sentence:
                units.append(sentence)
    out, current = [], ""
    for unit in units:
        if current and len(current) + 1 + len(unit) > passage_chars and 2 * len(current) >= passage_chars:
            out.append(current)
            current = ""
        current = f"{current} {unit}" if current else unit
        if len(current) >= passage_chars:
            out.append(current)
            current = ""
    if current and 2 * len(current) >= passage_chars:
        out.append(current)
    return out


def _read(path: str, field: str) -> str:
    try:
        return pathlib.Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{field}: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _sample_key(text: str) -> bytes:
    # Salted: the split hash (sources.is_validation) must stay independent of which are kept.
    return hashlib.sha256(b"keep:" + text.encode()).digest()


def _domain_labels(config) -> list[str]:
    paths, labels = list(config.data.paths), list(config.task.labels)
    if not paths:
        raise ValueError("data.paths is empty; data.source='domains' needs one text file per class")
    if labels and len(labels) != len(paths):
        raise ValueError(f"task.labels has {len(labels)} names but data.paths has {len(paths)} files; "
                         "give one label per file (repeat a label to merge files into one class)")
    return labels or [pathlib.Path(p).name.split(".")[0] for p in paths]


def _domain_examples(config) -> tuple[list[str], list[list[str]]]:
    d = config.data
    names = _domain_labels(config)
    classes = list(dict.fromkeys(names))
    texts: list[dict[str, None]] = [{} for _ in classes]  # dicts: ordered, exact duplicates once
    for path, name in zip(d.paths, names):
        cut = passages(_read(path, "data.paths"), d.passage_chars)
        if not cut:
            raise ValueError(f"data.paths: {path} gives no passage of data.passage_chars="
                             f"{d.passage_chars} characters (the file is empty or blank)")
        texts[classes.index(name)].update(dict.fromkeys(cut))
    keep = min(len(t) for t in texts)
    keep = min(keep, d.max_per_class) if d.max_per_class else keep
    return classes, [sorted(t, key=_sample_key)[:keep] for t in texts]


def _jsonl_examples(config) -> tuple[list[str], list[list[str]]]:
    d, labels = config.data, list(config.task.labels)
    records = []
    for lineno, line in enumerate(_read(d.path, "data.path").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{d.path}:{lineno}: not valid JSON ({e.msg})") from None
        for field in ("text_field", "label_field"):
            if not isinstance(record, dict) or d[field] not in record:
                raise ValueError(f"{d.path}:{lineno}: has no field data.{field}={d[field]!r}")
        text, label = record[d.text_field], record[d.label_field]
        if not isinstance(text, str) or type(label) not in (str, int):
            raise ValueError(f"{d.path}:{lineno}: the text must be a string and the label a string or "
                             f"an int; got {type(text).__name__} and {type(label).__name__}")
        records.append((lineno, text, label))
    if not labels:
        kinds = {type(label) for _, _, label in records}
        if len(kinds) > 1:
            raise ValueError(f"data.path={d.path!r} mixes string and int labels; set task.labels")
        found = {label for _, _, label in records}
        labels = sorted(found) if kinds == {str} else [str(i) for i in range(max(found, default=-1) + 1)]
    per_class: list[dict[str, None]] = [{} for _ in labels]
    for lineno, text, label in records:
        index = labels.index(label) if isinstance(label, str) and label in labels else label
        if not isinstance(index, int) or not 0 <= index < len(labels):
            raise ValueError(f"{d.path}:{lineno}: label {label!r} is not one of task.labels={labels} "
                             f"(nor an index into it)")
        per_class[index][text] = None
    if d.max_per_class:
        per_class = [dict.fromkeys(sorted(t, key=_sample_key)[:d.max_per_class]) for t in per_class]
    return labels, [list(t) for t in per_class]


@functools.lru_cache(maxsize=4)
def _load(key: str) -> Examples:
    config = ml_collections.ConfigDict(json.loads(key)["config"])
    d = config.data
    labels, texts = (_domain_examples if d.source == "domains" else _jsonl_examples)(config)
    for name, class_texts in zip(labels, texts):
        if not class_texts:
            field = "data.path" if d.source == "jsonl" else "data.paths"
            raise ValueError(f"class {name!r} has no examples in {field}")
    split = {False: [], True: []}
    for index, class_texts in enumerate(texts):
        for text in class_texts:
            split[sources.is_validation(text, d.validation_fraction)].append({"text": text, "label": index})
    for name, records in (("train", split[False]), ("validation", split[True])):
        if not records:
            raise ValueError(f"data.validation_fraction={d.validation_fraction} leaves the {name} split "
                             f"empty ({len(split[False])} train, {len(split[True])} validation examples)")
    return Examples(tuple(labels), tuple(split[False]), tuple(split[True]))


def load(config) -> Examples:
    """The labelled examples of the config, read once per process for unchanged files."""
    d = config.data
    paths, field = (list(d.paths), "data.paths") if d.source == "domains" else ([d.path], "data.path")
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"{field}: {path!r} does not exist or is not a file")
    stats = [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    fields = ("source", "paths", "path", "text_field", "label_field", "passage_chars", "max_per_class",
              "validation_fraction")
    subset = {"data": {k: d[k] for k in fields}, "task": {"labels": list(config.task.labels)}}
    return _load(json.dumps({"config": subset, "files": stats}, sort_keys=True))


def validate(config, process_count: int = 1) -> Examples:
    """Every check of the classification data (fields, files, labels, lengths); returns the examples."""
    d = config.data
    if d.source not in SOURCES:
        raise ValueError(f"data.source={d.source!r} is not a labelled source; valid: {list(SOURCES)}")
    if d.source == "jsonl" and not d.path:
        raise ValueError("data.path is empty; data.source='jsonl' needs a .jsonl file of labelled records")
    if not 0 < d.validation_fraction < 1:
        raise ValueError(f"data.validation_fraction={d.validation_fraction} must be in (0, 1)")
    if d.passage_chars < 1 or d.max_per_class < 0:
        raise ValueError(f"data.passage_chars={d.passage_chars} must be >= 1 and data.max_per_class="
                         f"{d.max_per_class} >= 0 (0: no cap)")
    if not 3 <= d.seq_len <= config.model.max_len:
        raise ValueError(f"data.seq_len={d.seq_len} must be in [3, model.max_len={config.model.max_len}] "
                         "(room for bos, eos and one token; model.max_len is the longest input of the encoder)")
    if d.read_threads < 0:
        raise ValueError(f"data.read_threads={d.read_threads} must be 0 or more")
    pipeline.local_batch_size(config, process_count)
    examples = load(config)
    if len(examples.train) < process_count:
        raise ValueError(f"{len(examples.train)} train examples cannot give each of {process_count} "
                         "processes one")
    return examples


def write_texts(config, texts: list[str]) -> pathlib.Path:
    """`texts`, one {"text"} per line of a .jsonl cached under data.cache_dir (named by their hash)."""
    name = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]
    path = sources.cache_dir(config) / "labelled" / f"{name}.jsonl"
    with sources.locked(path.with_suffix(".lock")):
        if not path.exists():
            path.with_suffix(".tmp").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
            os.replace(path.with_suffix(".tmp"), path)
    return path


def write_corpus(config) -> pathlib.Path:
    """The texts of both splits as write_texts does (unlabelled; for tokenizer training and MLM
    pretraining). As a jsonl source with the same data.validation_fraction, its train split is
    exactly these train texts: the split hashes the same text the same way."""
    examples = load(config)
    return write_texts(config, [r["text"] for r in examples.train + examples.validation])


def texts_tokenizer(config, texts: list[str], validation_fraction: float) -> str:
    """A sentencepiece model (model.vocab_size, data.tokenizer_type) trained on the texts that a
    jsonl source of `texts` keeps for training under validation_fraction (cached); its path."""
    corpus = ml_collections.ConfigDict({
        "model": {"vocab_size": config.model.vocab_size},
        "data": {"source": "jsonl", "path": str(write_texts(config, texts)), "text_field": "text",
                 "doc_separator": "", "tfds_name": "", "train_split": "train", "eval_split": "validation",
                 "validation_fraction": validation_fraction, "cache_dir": config.data.cache_dir,
                 "tokenizer": "", "tokenizer_type": config.data.tokenizer_type}})
    return tokenizer_lib.get_tokenizer(corpus).path


def corpus_tokenizer(config) -> str:
    """A sentencepiece model trained on the train split's texts (cached); returns its path."""
    examples = load(config)
    texts = [r["text"] for r in examples.train + examples.validation]
    return texts_tokenizer(config, texts, config.data.validation_fraction)


def tokenize(tokenizer: tokenizer_lib.Tokenizer, seq_len: int):
    """record {"text", "label"} -> one row of the batch format (no batch axis)."""
    def row(record: dict) -> dict[str, np.ndarray]:
        ids = [tokenizer.bos_id, *tokenizer.encode(record["text"])[:seq_len - 2], tokenizer.eos_id]
        n = len(ids)
        inputs = np.full(seq_len, tokenizer.pad_id, np.int32)
        inputs[:n] = ids
        positions = np.zeros(seq_len, np.int32)
        positions[:n] = np.arange(n)
        return {"inputs": inputs, "segment_ids": (np.arange(seq_len) < n).astype(np.int32),
                "positions": positions, "labels": np.int32(record["label"]), "weight": np.float32(1.0)}
    return row


def make_train_iterator(config, tokenizer, examples: Examples, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
    """An endless iterator of this process's batches, reshuffled every epoch.

    Its get_state() is JSON-serialisable; set_state() on a fresh iterator resumes exactly.
    """
    local_batch = pipeline.local_batch_size(config, process_count)
    ds = grain.MapDataset.source(list(examples.train))[process_index::process_count]
    if not len(ds):
        raise ValueError(f"{len(examples.train)} train examples cannot give process {process_index} "
                         f"of {process_count} one")
    # grain mixes the epoch into the seed after repeat(), so each epoch has its own order.
    ds = ds.shuffle(seed=config.seed % 2**32).repeat(None)
    ds = ds.map(tokenize(tokenizer, config.data.seq_len)).batch(local_batch, drop_remainder=True)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=config.data.read_threads,
                                                     prefetch_buffer_size=_PREFETCH_BATCHES)))


def make_eval_batches(config, tokenizer, examples: Examples, process_index: int = 0,
                      process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Every validation example in order, in global batches (the last padded by weight-0 rows), of
    which this process takes its rows."""
    pipeline.local_batch_size(config, process_count)  # checks divisibility
    global_batch = config.train.batch_size
    ds = grain.MapDataset.source(list(examples.validation)).map(tokenize(tokenizer, config.data.seq_len))
    batches = list(ds.batch(global_batch, drop_remainder=False))
    return pipeline.process_eval_batches(batches, global_batch, process_index, process_count)
