"""Preference pairs for DPO-style tuning: (prompt, chosen reply, rejected reply) as batches of rows.

Records, one JSON object per line of data.path:
  {"prompt": "..." or [{"role", "content"}, ...], "chosen": "...", "rejected": "..."}
A string prompt is one user turn; data.system_prompt opens a conversation without a system turn.
Both replies are written after the chat template's prompt (fmjax.data.chat) and end with the
end-of-turn marker; the loss mask covers the reply and that marker only. A pair is in the
validation split when the hash of its JSON says so. Rows are not packed: each holds one sequence,
cut to data.seq_len tokens (a reply longer than what the prompt leaves is cut at the end).
A batch is a dict of numpy arrays, per process (S: "chosen" or "rejected"):

  S_inputs_BxL       int32    token ids, then padding (pad id)
  S_targets_BxL      int32    next token ids
  S_segment_ids_BxL  int32    1 on real tokens, 0 on padding
  S_positions_BxL    int32    0 .. n-1 on real tokens
  S_loss_mask_BxL    float32  1.0 where the target is a reply token (or its end marker)
  weight_B           float32  1.0; 0.0 on the rows that pad the last eval batch

B: local batch (train.batch_size // process_count); L: data.seq_len.
"""
from __future__ import annotations

import dataclasses

import grain
import ml_collections
import numpy as np

from fmjax.data import chat, pipeline

SIDES = ("chosen", "rejected")
_PREFETCH_BATCHES = 4


@dataclasses.dataclass(frozen=True)
class Pair:
    prompt: tuple[dict, ...]  # the conversation before the reply
    chosen: str
    rejected: str


def pair(record, system_prompt: str = "") -> Pair:
    """A record (see the module docstring) as a Pair; ValueError naming what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, not {type(record).__name__}")
    for field in ("prompt", *SIDES):
        if field not in record:
            raise ValueError(f"the record has no {field!r}; it needs 'prompt', 'chosen' and 'rejected'")
    if not all(isinstance(record[s], str) for s in SIDES):
        raise ValueError("'chosen' and 'rejected' must be strings (the two replies)")
    prompt = record["prompt"]
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(turns, list):
        raise ValueError("'prompt' must be a string or a list of {role, content} turns")
    # chat.conversation's checks, with an empty reply standing in for the pair's two.
    messages = chat.conversation({"messages": [*turns, {"role": "assistant", "content": ""}]}, system_prompt)
    return Pair(tuple(messages[:-1]), record["chosen"], record["rejected"])


def load(config: ml_collections.ConfigDict) -> tuple[tuple[Pair, ...], tuple[Pair, ...]]:
    """(train pairs, validation pairs) of data.path (read once per file version)."""
    return chat.read_split(config, pair, "preference pairs")


def validate(config: ml_collections.ConfigDict, process_count: int = 1):
    """Every check of the preference data config and file; returns (train, validation) pairs."""
    chat.validate_fields(config, process_count)
    train, validation = load(config)
    chat.check_splits(config, "pairs", process_count, train=train, validation=validation)
    return train, validation


def row(template: chat.Template, tokenizer, seq_len: int):
    """Pair -> one row of the batch format (no batch axis)."""
    def side(prompt_ids: list[int], reply: str) -> dict[str, np.ndarray]:
        reply_ids = tokenizer.encode(reply) + [template.end_id]
        ids = (prompt_ids + reply_ids)[:seq_len + 1]
        trained = ([0.0] * len(prompt_ids) + [1.0] * len(reply_ids))[1:seq_len + 1]
        n = len(ids) - 1
        out = {"inputs": np.full(seq_len, tokenizer.pad_id, np.int32), "targets": np.zeros(seq_len, np.int32),
               "segment_ids": np.zeros(seq_len, np.int32), "positions": np.zeros(seq_len, np.int32),
               "loss_mask": np.zeros(seq_len, np.float32)}
        out["inputs"][:n], out["targets"][:n] = ids[:-1], ids[1:]
        out["segment_ids"][:n], out["positions"][:n], out["loss_mask"][:n] = 1, np.arange(n), trained
        return out

    def make(p: Pair) -> dict[str, np.ndarray]:
        prompt_ids = template.prompt(tokenizer, p.prompt)
        out = {"weight": np.float32(1.0)}
        for name, reply in zip(SIDES, (p.chosen, p.rejected)):
            out.update({f"{name}_{k}": v for k, v in side(prompt_ids, reply).items()})
        return out
    return make


def make_train_iterator(config, tokenizer, template: chat.Template, pairs, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this process's batches, reshuffled every epoch."""
    local_batch = pipeline.local_batch_size(config, process_count, process_index)
    ds = grain.MapDataset.source(list(pairs))[process_index::process_count]
    ds = ds.shuffle(seed=config.seed % 2**32).repeat(None)
    ds = ds.map(row(template, tokenizer, config.data.seq_len)).batch(local_batch, drop_remainder=True)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=config.data.read_threads,
                                                     prefetch_buffer_size=_PREFETCH_BATCHES)))


def make_eval_batches(config, tokenizer, template: chat.Template, pairs, process_index: int = 0,
                      process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Up to train.eval_batches global batches of the validation pairs in order (the last padded by
    weight-0 rows), of which this process takes its rows."""
    global_batch = config.train.batch_size
    pairs = list(pairs)[:global_batch * config.train.eval_batches]
    ds = grain.MapDataset.source(pairs).map(row(template, tokenizer, config.data.seq_len))
    batches = list(ds.batch(global_batch, drop_remainder=False))
    return pipeline.process_eval_batches(batches, global_batch, process_index, process_count)
