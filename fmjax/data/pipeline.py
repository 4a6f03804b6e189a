"""Packed language-model batches from text with grain: resumable training stream, eval batches.

Every document becomes [bos] + encode(text) + [eos] = t, and the example inputs=t[:-1],
targets=t[1:], so no target crosses a document boundary. Examples are concatenated and split
into rows of L tokens (a document cut at a row end continues in the next row as a new segment
with positions from 0). A batch is a dict of numpy arrays, per process:

  inputs_BxL       int32    token ids
  targets_BxL      int32    next token ids
  segment_ids_BxL  int32    1, 2, ... numbers the documents within a row; 0 is padding
  positions_BxL    int32    position within the document's segment, from 0
  loss_mask_BxL    float32  1.0 where the target is real, 0.0 on padding

B: local batch (train.batch_size // process_count); L: data.seq_len.
"""

import itertools
from typing import Any, Callable, Mapping, Sequence

import grain
import ml_collections
import numpy as np

from fmjax.data import sources
from fmjax.data import tokenizer as tokenizer_lib

Batch = dict[str, np.ndarray]
BATCH_DTYPES = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32,
                "positions": np.int32, "loss_mask": np.float32}
# Documents tokenized ahead of packing, per process. Small, because eval stops after
# train.eval_batches and everything read ahead is wasted; grain's default of 500 suits remote disks.
_PREFETCH_DOCS = 128


def validate(config: ml_collections.ConfigDict, process_count: int = 1) -> None:
    """Every data-layer check that needs no preparation: sources, tokenizer and batching."""
    sources.validate(config)
    tokenizer_lib.validate(config)
    local_batch_size(config, process_count)
    if config.data.seq_len < 1:
        raise ValueError(f"data.seq_len={config.data.seq_len} must be at least 1")
    if config.train.eval_batches < 1:
        raise ValueError(f"train.eval_batches={config.train.eval_batches} must be at least 1")
    if config.data.read_threads < 0:
        raise ValueError(f"data.read_threads={config.data.read_threads} must be 0 or more")


def local_batch_size(config: ml_collections.ConfigDict, process_count: int, process_index: int = 0) -> int:
    """This process's share of train.batch_size (ValueError unless the processes split it evenly)."""
    batch_size = config.train.batch_size
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"train.batch_size={batch_size} must be a positive multiple of the "
                         f"process count {process_count}")
    return batch_size // process_count


def _tokenize(tokenizer: tokenizer_lib.Tokenizer) -> Callable[[Mapping[str, str]], Batch]:
    def tokenize(record: Mapping[str, str]) -> Batch:
        t = np.array([tokenizer.bos_id, *tokenizer.encode(record["text"]), tokenizer.eos_id],
                     dtype=np.int32)
        return {"inputs": t[:-1], "targets": t[1:]}
    return tokenize


def _batch_format(row: Mapping[str, np.ndarray]) -> Batch:
    # Inputs and targets have equal lengths, so they are packed identically; the targets' own
    # segment ids would only repeat the inputs'.
    return {"inputs": row["inputs"], "targets": row["targets"],
            "segment_ids": row["inputs_segment_ids"], "positions": row["inputs_positions"],
            "loss_mask": (row["targets_segment_ids"] > 0).astype(np.float32)}


def _packed_rows(ds: grain.MapDataset, config: ml_collections.ConfigDict,
                 tokenizer: tokenizer_lib.Tokenizer) -> grain.IterDataset:
    """Documents -> tokenized examples (in read_threads) -> rows of data.seq_len tokens."""
    ds = ds.map(_tokenize(tokenizer)).to_iter_dataset(grain.ReadOptions(
        num_threads=config.data.read_threads, prefetch_buffer_size=_PREFETCH_DOCS))
    seq_len = config.data.seq_len
    ds = grain.experimental.ConcatThenSplitIterDataset(
        ds, length_struct={"inputs": seq_len, "targets": seq_len})
    return ds.map(_batch_format)


def _tuple_slices(state: Any) -> Any:
    """`state` with every `remainder_slices` entry a tuple again (see _ResumableIterator)."""
    if not isinstance(state, dict):
        return state
    return {k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else
                _tuple_slices(v)) for k, v in state.items()}


class _ResumableIterator(grain.DatasetIterator):
    """The pipeline's iterator, made to accept its own state back after a JSON round trip.

    grain 0.2.18's ConcatThenSplit marks "no remainder" with the tuple (-1, -1) and tests it
    with `!=`; JSON (which orbax uses for iterator state) turns it into a list, which then reads
    as a remainder, so a resumed iterator would repeat data. Restoring the tuples fixes that.
    """

    def __next__(self) -> Batch:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(_tuple_slices(state))


def make_train_iterator(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer,
                        process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """An endless iterator of this process's training batches, reshuffled every epoch.

    Its get_state() is JSON-serialisable; set_state() on a fresh iterator resumes exactly.
    """
    local_batch = local_batch_size(config, process_count, process_index)
    source = sources.load_split(config, config.data.train_split)
    # Each process reads its own documents (index % process_count == process_index).
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if not len(ds):
        raise ValueError(f"{source.name} has {len(source)} documents, too few to give each of "
                         f"{process_count} processes one; use a larger data.train_split")
    # grain mixes the epoch into the seed after repeat(), so each epoch has its own order.
    ds = ds.shuffle(seed=config.seed % 2**32).repeat(None)
    ds = _packed_rows(ds, config, tokenizer).batch(local_batch, drop_remainder=True)
    return _ResumableIterator(iter(ds))


def process_eval_batches(batches: list[Batch], global_batch: int, process_index: int,
                         process_count: int) -> list[Batch]:
    """Global eval batches -> this process's rows of each, the last batch first padded to
    global_batch with zero rows (zero loss mask / weight, so they count for nothing)."""
    missing = global_batch - len(next(iter(batches[-1].values())))
    batches = batches[:-1] + [{k: np.pad(v, [(0, missing)] + [(0, 0)] * (v.ndim - 1))
                               for k, v in batches[-1].items()}]
    local_batch = global_batch // process_count
    rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
    return [{k: v[rows] for k, v in b.items()} for b in batches]


def make_eval_batches(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer,
                      process_index: int = 0, process_count: int = 1) -> list[Batch]:
    """Up to train.eval_batches batches of the eval split in order, the last padded to size.

    Batches are packed for the global batch and each process takes its rows, so every process
    gets the same number of batches and the union over processes does not depend on how many
    there are.
    """
    local_batch_size(config, process_count, process_index)  # checks the process index and divisibility
    global_batch = config.train.batch_size
    source = sources.load_split(config, config.data.eval_split)
    ds = _packed_rows(grain.MapDataset.source(source), config, tokenizer)
    ds = ds.batch(global_batch, drop_remainder=False)
    batches = list(itertools.islice(ds, config.train.eval_batches))
    if not batches:
        raise ValueError(f"data.eval_split={config.data.eval_split!r} of {source.name} yields no "
                         "tokens; choose a non-empty split")
    return process_eval_batches(batches, global_batch, process_index, process_count)


def pack_documents(docs: Sequence[Sequence[int]], seq_len: int) -> Batch:
    """Greedily packs whole token sequences into rows of the batch format (for tests).

    Unlike the grain pipeline, a document never straddles rows: one that does not fit in what
    is left of a row starts the next one, and the rest of the row is padding. Each document must
    already contain its bos/eos and have 2 to seq_len + 1 tokens.
    """
    rows: list[list[Sequence[int]]] = [[]]
    used = 0
    for i, doc in enumerate(docs):
        n = len(doc) - 1
        if not 1 <= n <= seq_len:
            raise ValueError(f"document {i} has {len(doc)} tokens; pack_documents needs 2 to "
                             f"seq_len + 1 = {seq_len + 1}")
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(doc)
        used += n
    out = {k: np.zeros((len(rows), seq_len), dtype) for k, dtype in BATCH_DTYPES.items()}
    for r, row_docs in enumerate(rows):
        start = 0
        for segment, doc in enumerate(row_docs, 1):
            t = np.asarray(doc, np.int32)
            span = slice(start, start + len(t) - 1)
            out["inputs"][r, span] = t[:-1]
            out["targets"][r, span] = t[1:]
            out["segment_ids"][r, span] = segment
            out["positions"][r, span] = np.arange(len(t) - 1)
            out["loss_mask"][r, span] = 1.0
            start = span.stop
    return out
