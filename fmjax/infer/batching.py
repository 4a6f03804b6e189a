"""Request batching for the server: a bounded queue, one worker thread, batches of concurrent requests.

Requests arrive as jobs on any thread; the worker runs up to max_batch_size of them as one batch,
waiting for more until the oldest has waited max_wait_s (no wait once the batch is full).
The queue holds at most max_queue jobs: `submit` refuses (QueueFull) rather than letting it
grow, so under overload requests get an answer at once and the batches stay bounded. A job's
owner learns what happens through its `notify` callback, called on the worker thread; a job
whose owner has gone (timeout, disconnect) is marked cancelled and skipped, or ignored if its
batch already runs.

Generation (`Generator`) decodes a batch together with the KV cache (fmjax.infer.generate): every
row keeps its own prompt, sampling settings, seed, token budget and stop sequences. Decoding runs
in chunks of CHUNK tokens; after the prefill and after every chunk, each row's tokens so far go to
its owner (streaming), and the batch ends early once every row is done or cancelled.
Embedding (`Embedder`) concatenates the texts of its jobs into one call of fmjax.infer.embed.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
from typing import Callable, Sequence

import flax.linen as nn
import jax

from fmjax.infer import embed as embed_lib, generate

CHUNK = 8  # decode steps between two hand-outs of tokens (a host sync each)


class QueueFull(Exception):
    """The queue has no room for the request."""


@dataclasses.dataclass(eq=False)
class Job:
    payload: object  # what the batch function runs: a GenerationRow, or a list of texts to embed
    notify: Callable[[object], None]  # gets Progress updates / results, or the exception that failed the batch
    cancelled: bool = False
    arrived: float = dataclasses.field(default_factory=time.monotonic)


class Batcher:
    """A bounded queue of jobs and the worker thread that runs them in batches of `run_batch(jobs)`."""

    def __init__(self, run_batch: Callable[[list[Job]], None], *, max_batch_size: int, max_wait_s: float,
                 max_queue: int, on_batch: Callable[[int, float], None] = lambda size, seconds: None):
        self.run_batch, self.max_batch_size, self.max_wait_s = run_batch, max_batch_size, max_wait_s
        self.max_queue, self.on_batch = max_queue, on_batch
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="fmjax-batcher", daemon=True)
        self._thread.start()

    def depth(self) -> int:
        return len(self._queue)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queues all of `jobs` or none (QueueFull)."""
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._queue) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._queue)} rows are waiting (serve.max_queue={self.max_queue})")
            self._queue.extend(jobs)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _take(self) -> list[Job] | None:
        """The next batch of live jobs; None once closed (jobs still queued then are dropped)."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            end = self._queue[0].arrived + self.max_wait_s
            while len(self._queue) < self.max_batch_size and not self._closed:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = []
            while self._queue and len(batch) < self.max_batch_size:
                job = self._queue.popleft()
                if not job.cancelled:
                    batch.append(job)
            return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            if not batch:
                continue
            start = time.perf_counter()
            try:
                self.run_batch(batch)
            except Exception as e:  # the batch's requests fail (500); the worker goes on
                for job in batch:
                    job.notify(e)
            self.on_batch(len(batch), time.perf_counter() - start)


@dataclasses.dataclass(frozen=True)
class GenerationRow:
    """One prompt's generation request. stop_ids: token sequences that end the row (kept in its ids)."""
    prompt: tuple[int, ...]
    max_new: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[tuple[int, ...], ...] = ()


@dataclasses.dataclass(frozen=True)
class Progress:
    """A row's new tokens so far; once done, cut after eos (excluded) or a stop sequence (included)."""
    ids: list[int]
    done: bool
    finish: str | None = None  # once done: "stop" (eos or a stop sequence) or "length" (the budget)
    generated: int = 0  # tokens drawn (eos included), for usage


class Generator:
    """run_batch for GenerationRow jobs: KV-cache decoding of the rows together, under `mesh` and
    `rules` when given (sharded params), handing each row's Progress to its job.

    Batches take power-of-two numbers of rows (generate.batch_rows) and prompt and budget lengths,
    so a server compiles a few shapes whatever the traffic, and a half-full batch does not compute
    the rows of a full one.
    """

    def __init__(self, model, params, *, eos_id: int | None, pad_id: int, mesh=None, rules=(), chunk: int = CHUNK):
        self.model, self.params, self.eos_id, self.pad_id = model, params, eos_id, pad_id
        self.mesh, self.rules, self.chunk = mesh, rules, chunk

    def _context(self):
        stack = contextlib.ExitStack()
        if self.mesh is not None:
            stack.enter_context(jax.set_mesh(self.mesh))
            stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def __call__(self, jobs: list[Job]) -> None:
        rows = [job.payload for job in jobs]
        with self._context():
            tokens, prompt_len, requests, budget = generate.prepare_batch(
                [r.prompt for r in rows], max_new_tokens=[r.max_new for r in rows], eos_id=self.eos_id,
                pad_id=self.pad_id, temperature=[r.temperature for r in rows], top_k=[r.top_k for r in rows],
                top_p=[r.top_p for r in rows], seed=[r.seed for r in rows],
                row_stop_ids=[r.stop_ids for r in rows], pow2_lengths=True)
            state = generate.prefill(self.model, self.params, tokens, prompt_len, requests, new_tokens=budget)
            reported = [False] * len(rows)
            while True:
                step = self._hand_out(state, jobs, reported)
                if all(reported[i] or job.cancelled for i, job in enumerate(jobs)):
                    return
                state = generate.decode(self.model, self.params, state, requests, until=step + self.chunk)

    @staticmethod
    def _hand_out(state: generate.DecodeState, jobs: list[Job], reported: list[bool]) -> int:
        """Sends every unfinished row its tokens so far (and its end); returns the step reached."""
        step, tokens_BxN, length_B, stop_len_B, done_B = jax.device_get(
            (state.step, state.tokens_BxN, state.length_B, state.stop_len_B, state.done_B))
        for r, job in enumerate(jobs):
            if reported[r] or job.cancelled:
                continue
            if done_B[r]:
                kept = int(length_B[r] + stop_len_B[r])
                at_budget = kept == job.payload.max_new and stop_len_B[r] == 0
                finish = "length" if at_budget else "stop"
                eos = finish == "stop" and stop_len_B[r] == 0
                job.notify(Progress(tokens_BxN[r, :kept].tolist(), True, finish, kept + int(eos)))
                reported[r] = True
            else:
                job.notify(Progress(tokens_BxN[r, :step].tolist(), False, None, int(step)))
        return int(step)


class Embedder:
    """run_batch for embedding jobs (payload: a list of texts): one embed_texts call for the batch;
    each job gets its float32 [len(texts), D] vectors."""

    def __init__(self, model_config, encoder_params, tokenizer, *, pooling: str, normalize: bool, max_len: int):
        self.model_config, self.params, self.tokenizer = model_config, encoder_params, tokenizer
        self.pooling, self.normalize, self.max_len = pooling, normalize, max_len

    def __call__(self, jobs: list[Job]) -> None:
        texts = [t for job in jobs for t in job.payload]
        vectors = embed_lib.embed_texts(self.model_config, self.params, self.tokenizer, texts,
                                        pooling=self.pooling, normalize=self.normalize, max_len=self.max_len)
        start = 0
        for job in jobs:
            job.notify(vectors[start:start + len(job.payload)])
            start += len(job.payload)
