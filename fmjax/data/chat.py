"""Conversations for instruction tuning: the chat template, per-token loss masks, packed batches.

A conversation is a list of turns {"role": "system" | "user" | "assistant", "content": str}. The
template writes one [bos], then every turn between its role marker and the end-of-turn marker:

  [bos] <|system|> Be brief. <|end|> <|user|> What is a polygon? <|end|> <|assistant|> A shape ... <|end|>

Only the content of assistant turns and their end-of-turn markers are trained (loss mask 1.0), so
the model learns to answer and to stop, never to write the user's side. The markers are control
pieces of the tokenizer (fmjax's trained tokenizers reserve them; data.chat names the pieces), so
no text can forge a turn. A generation prompt is a conversation followed by the assistant marker;
generation stops at the end-of-turn marker.

Records, one JSON object per line of data.path, in one of two shapes:
  {"messages": [{"role": ..., "content": ...}, ...]}                 (any number of turns)
  {"instruction": ..., "context": ..., "response": ...}              (Dolly; Alpaca's "input" and
                                                                      "output" are read alike)
An instruction record is a user turn (instruction, then the context after a blank line if it is
not empty) and an assistant turn. data.system_prompt, if set, opens every conversation that has
no system turn. A conversation is in the validation split when the hash of its record says so.

A conversation of n tokens is the example inputs = t[:-1], targets = t[1:], loss_mask = mask[1:],
cut to data.seq_len tokens; examples are packed whole (first fit) into rows, with segment ids and
positions as in fmjax.data.pipeline, whose batch format this shares (B: local batch, L: seq_len).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import grain
import ml_collections
import numpy as np

from fmjax.data import pipeline, sources
from fmjax.data import tokenizer as tokenizer_lib

ROLES = ("system", "user", "assistant")
MARKERS = ("system", "user", "assistant", "end")  # the fields of data.chat
_PREFETCH = 128


@dataclasses.dataclass(frozen=True)
class Template:
    """Token ids of the role markers and of the end-of-turn marker."""
    role_ids: dict[str, int]
    end_id: int
    bos_id: int

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, tokenizer) -> "Template":
        """The markers data.chat names, which must be pieces of the tokenizer."""
        ids = {}
        for field in MARKERS:
            piece = config.data.chat[field]
            piece_id = tokenizer.piece_id(piece) if hasattr(tokenizer, "piece_id") else None
            if piece_id is None:
                raise ValueError(f"data.chat.{field}={piece!r} is not a piece of the tokenizer "
                                 f"{getattr(tokenizer, 'path', tokenizer)}; fmjax's trained tokenizers reserve "
                                 f"{list(tokenizer_lib.CHAT_PIECES)} (retrain an older one)")
            ids[field] = piece_id
        return cls({role: ids[role] for role in ROLES}, ids["end"], tokenizer.bos_id)

    def encode(self, tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[float]]:
        """(token ids, loss mask per token): 1.0 on assistant content and its end marker."""
        ids, mask = [self.bos_id], [0.0]
        for turn in messages:
            content = tokenizer.encode(turn["content"])
            trained = 1.0 if turn["role"] == "assistant" else 0.0
            ids += [self.role_ids[turn["role"]], *content, self.end_id]
            mask += [0.0] + [trained] * (len(content) + 1)
        return ids, mask

    def prompt(self, tokenizer, messages: Sequence[dict]) -> list[int]:
        """The ids that ask the model for the next assistant turn of `messages`."""
        return self.encode(tokenizer, messages)[0] + [self.role_ids["assistant"]]


def conversation(record, system_prompt: str = "") -> list[dict]:
    """A record (see the module docstring) as a list of turns; ValueError naming what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, not {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list of {role, content} turns")
        for i, turn in enumerate(messages):
            if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{'role': one of {list(ROLES)}, 'content': a string}}; "
                                 f"got {turn!r:.80}")
        messages = [{"role": t["role"], "content": t["content"]} for t in messages]
    else:
        instruction = record.get("instruction")
        context = record.get("context", record.get("input", ""))
        response = record.get("response", record.get("output"))
        if not isinstance(instruction, str) or not isinstance(response, str) or not isinstance(context, str):
            raise ValueError("a record needs 'messages', or string fields 'instruction' and 'response' "
                             "(or 'output'), with an optional string 'context' (or 'input')")
        user = f"{instruction}\n\n{context}" if context.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    if not any(t["role"] == "assistant" for t in messages):
        raise ValueError("the conversation has no assistant turn, so nothing to train on")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


@dataclasses.dataclass(frozen=True)
class Conversations:
    train: tuple[tuple[dict, ...], ...]
    validation: tuple[tuple[dict, ...], ...]


@functools.lru_cache(maxsize=8)
def _read_split(path: str, size: int, mtime_ns: int, parse, system_prompt: str, fraction: float):
    del size, mtime_ns  # part of the cache key only
    split = {False: [], True: []}
    for lineno, record in sources.jsonl_records(path):
        try:
            item = parse(record, system_prompt)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
        split[sources.is_validation(json.dumps(record, sort_keys=True), fraction)].append(item)
    return tuple(split[False]), tuple(split[True])


def read_split(config: ml_collections.ConfigDict, parse, what: str) -> tuple[tuple, tuple]:
    """(train, validation): parse(record, data.system_prompt) of every JSON line of data.path, in the
    validation split when the hash of the record says so; read once per file version. Errors name
    the file and line."""
    d = config.data
    if not d.path or not os.path.isfile(d.path):
        raise ValueError(f"data.path={d.path!r} is not a file; it must be a .jsonl of {what}")
    stat = os.stat(d.path)
    try:
        return _read_split(os.path.abspath(d.path), stat.st_size, stat.st_mtime_ns, parse, d.system_prompt,
                           d.validation_fraction)
    except UnicodeDecodeError as e:
        raise ValueError(f"data.path: {d.path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def load(config: ml_collections.ConfigDict) -> Conversations:
    """The conversations of data.path, split into train and validation."""
    return Conversations(*read_split(config, _turns, "conversations"))


def _turns(record, system_prompt: str) -> tuple[dict, ...]:
    return tuple(conversation(record, system_prompt))


def validate_fields(config: ml_collections.ConfigDict, process_count: int = 1) -> None:
    """The checks of data fields that chat and preference data share (no file is read)."""
    d = config.data
    missing = [f for f in MARKERS if f not in d.chat]
    if missing:
        raise ValueError(f"data.chat has no {missing}; it names the pieces {list(MARKERS)}")
    if not 0 < d.validation_fraction < 1:
        raise ValueError(f"data.validation_fraction={d.validation_fraction} must be in (0, 1)")
    if d.seq_len < 2:
        raise ValueError(f"data.seq_len={d.seq_len} must be at least 2")
    if d.read_threads < 0:
        raise ValueError(f"data.read_threads={d.read_threads} must be 0 or more")
    pipeline.local_batch_size(config, process_count)


def validate(config: ml_collections.ConfigDict, process_count: int = 1) -> Conversations:
    """Every check of the chat data config and file; returns the conversations."""
    validate_fields(config, process_count)
    conversations = load(config)
    check_splits(config, "conversations", process_count, train=conversations.train,
                 validation=conversations.validation)
    return conversations


def check_splits(config, what: str, process_count: int, **splits) -> None:
    """Every split must give each process at least one of its records."""
    d = config.data
    for name, split in splits.items():
        if len(split) < process_count:
            raise ValueError(f"data.path={d.path!r} with data.validation_fraction={d.validation_fraction} "
                             f"has {len(split)} {name} {what}; {process_count} processes need one each")


def example(template: Template, tokenizer, seq_len: int):
    """conversation -> {inputs, targets, loss_mask} of at most seq_len tokens."""
    def make(messages) -> dict[str, np.ndarray]:
        ids, mask = template.encode(tokenizer, messages)
        ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        t = np.asarray(ids, np.int32)
        return {"inputs": t[:-1], "targets": t[1:], "loss_mask": np.asarray(mask[1:], np.float32)}
    return make


def _packed(ds: grain.IterDataset, rows: int, seq_len: int, seed: int, shuffle: bool) -> grain.IterDataset:
    """Whole examples packed first-fit into `rows` bins of seq_len tokens -> pipeline's batch format."""
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len},
        num_packing_bins=rows, seed=seed, shuffle_bins=shuffle, meta_features=("loss_mask",))
    return ds.map(lambda r: {"inputs": r["inputs"], "targets": r["targets"],
                             "segment_ids": r["inputs_segment_ids"], "positions": r["inputs_positions"],
                             "loss_mask": r["loss_mask"]})


def make_train_iterator(config, tokenizer, template: Template, conversations: Conversations,
                        process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this process's packed batches, reshuffled every epoch."""
    local_batch = pipeline.local_batch_size(config, process_count, process_index)
    ds = grain.MapDataset.source(list(conversations.train))[process_index::process_count]
    ds = ds.shuffle(seed=config.seed % 2**32).repeat(None)
    ds = ds.map(example(template, tokenizer, config.data.seq_len)).to_iter_dataset(
        grain.ReadOptions(num_threads=config.data.read_threads, prefetch_buffer_size=_PREFETCH))
    ds = _packed(ds, local_batch, config.data.seq_len, config.seed % 2**32, shuffle=True)
    return iter(ds.batch(local_batch, drop_remainder=True))


def make_eval_batches(config, tokenizer, template: Template, conversations: Conversations,
                      process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Up to train.eval_batches global batches of the validation conversations in order (the last
    padded), of which this process takes its rows."""
    global_batch = config.train.batch_size
    ds = grain.MapDataset.source(list(conversations.validation)).map(
        example(template, tokenizer, config.data.seq_len)).to_iter_dataset()
    ds = _packed(ds, global_batch, config.data.seq_len, 0, shuffle=False).batch(global_batch, drop_remainder=False)
    batches = []
    for batch in ds:
        batches.append(batch)
        if len(batches) == config.train.eval_batches:
            break
    return pipeline.process_eval_batches(batches, global_batch, process_index, process_count)
