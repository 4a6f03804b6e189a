"""Batching: the bounded queue and its worker; chunked decoding of rows with their own settings equals
one-row generation, and streams prefixes of the final tokens."""
import threading
import time

import pytest

from fmjax.infer import batching, generate
from tests.infer.generate_test import EOS, PAD, init, prompts


def test_chunked_batch_decoding_equals_generating_each_row_alone():
    model, params = init()
    ids = prompts()
    rows = [batching.GenerationRow(tuple(ids[0]), 12),
            batching.GenerationRow(tuple(ids[1]), 5, temperature=1.0, top_k=5, seed=7),
            batching.GenerationRow(tuple(ids[2]), 12, stop_ids=((9,), (40, 41))),
            batching.GenerationRow(tuple(ids[3]), 9, temperature=0.8, top_p=0.9, seed=3)]
    updates = [[] for _ in rows]
    jobs = [batching.Job(row, updates[i].append) for i, row in enumerate(rows)]
    batching.Generator(model, params, eos_id=EOS, pad_id=PAD, chunk=3)(jobs)
    for row, got in zip(rows, updates):
        alone, = generate.generate_ids(model, params, [list(row.prompt)], max_new_tokens=row.max_new, eos_id=EOS,
                                       pad_id=PAD, temperature=row.temperature, top_k=row.top_k, top_p=row.top_p,
                                       seed=[row.seed], stop_ids=row.stop_ids, keep_stop=True)
        final = got[-1]
        assert final.done and final.ids == alone and all(not u.done for u in got[:-1])
        assert all(final.ids[:len(u.ids)] == u.ids for u in got[:-1])  # every update is a prefix
        stopped = any(tuple(alone[-len(stop):]) == stop for stop in row.stop_ids)
        assert final.finish == ("length" if len(alone) == row.max_new and not stopped else "stop")
    assert max(len(u) for u in updates) > 2  # the rows were handed out chunk by chunk


class Recorder:
    """A run_batch that records its batches (and fails on payload "boom")."""

    def __init__(self):
        self.batches, self.release = [], threading.Event()

    def __call__(self, jobs):
        self.release.wait(10)
        self.batches.append([job.payload for job in jobs])
        if "boom" in self.batches[-1]:
            raise RuntimeError("boom")
        for job in jobs:
            job.notify(job.payload)


def test_the_queue_is_bounded_batches_are_grouped_and_failures_reach_their_jobs():
    recorder = Recorder()
    batcher = batching.Batcher(recorder, max_batch_size=3, max_wait_s=0.05, max_queue=4)
    got = {}
    job = lambda payload: batching.Job(payload, lambda item: got.setdefault(payload, item))
    batcher.submit([job("first")])
    while batcher.depth():  # the worker holds "first" (waiting for release); 4 places are free
        time.sleep(0.001)
    gone = job("gone")
    batcher.submit([job("a"), gone, job("b")])
    with pytest.raises(batching.QueueFull, match="max_queue=4"):
        batcher.submit([job("c"), job("d")])  # all or none
    batcher.submit([job("boom")])
    gone.cancelled = True
    recorder.release.set()
    while len(got) < 4:
        time.sleep(0.001)
    batcher.close()
    assert recorder.batches == [["first"], ["a", "b", "boom"]]  # the cancelled job was skipped
    assert got["first"] == "first" and all(isinstance(got[p], RuntimeError) for p in ("a", "b", "boom"))
    assert not batcher.alive()
