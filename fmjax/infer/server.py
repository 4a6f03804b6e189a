"""mode=serve: the newest checkpoint of a workdir behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

  POST /v1/completions        decoders: text (or token-id) prompts; `stream` as server-sent events
  POST /v1/chat/completions   chat-tuned decoders (task.name sft or preference: their chat template)
  POST /v1/embeddings         encoders (model.name=encoder): pooled vectors, as mode=embed makes them
  GET  /v1/models, /healthz, /metrics (Prometheus)

Concurrent requests are batched (fmjax.infer.batching): each prompt is a row with its own sampling
settings, seed, budget and stop strings, so a greedy completion is what generate.generate(...,
continuation_only=True) gives the same prompt and a greedy chat reply what chat.replies gives.
Beyond OpenAI's parameters, `top_k` (0: off) is accepted. Errors are OpenAI's JSON shape
(fmjax.infer.protocol): 400 for an invalid request (`param` names the field), 401 for a wrong or
missing API key, 404 for an unknown model, 413 for a body over 16 MiB, 429 when serve.max_queue
rows already wait, 504 after serve.timeout_s (a stream that has started ends with an error event).
Settings: the `serve` section of the config (fmjax/config_lib.py).
"""
import asyncio
import base64
import functools
import json
import sys
import time
import uuid
from typing import AsyncIterator, Sequence

from fmjax.infer import batching
from fmjax.infer.protocol import APIError, Parser, TextView, get

MAX_BODY_BYTES = 16 << 20
COMPLETION_MAX_TOKENS = 16  # /v1/completions' default max_tokens (OpenAI's); chat's is serve.max_tokens
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/healthz", "/metrics")


class Service:
    """The served model: its request parser, the batcher that runs it, and the Prometheus metrics."""

    def __init__(self, config, parser: Parser, runner, step: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram  # local: mode=serve only
        self.config, self.serve, self.parse, self.runner, self.step = config, config.serve, parser, runner, step
        self.created = int(time.time())
        self.registry = r = CollectorRegistry()
        self.requests = Counter("fmjax_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("fmjax_request_latency_seconds", "Time to answer a request (streams: all of it)",
                                 ["endpoint"], registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.first_text = Histogram("fmjax_time_to_first_text_seconds", "Streams: request to the first text",
                                    registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.prompt_tokens = Counter("fmjax_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.completion_tokens = Counter("fmjax_completion_tokens", "Tokens generated", registry=r)
        self.batch_size = Histogram("fmjax_batch_size", "Rows (embeddings: requests) per batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_seconds = Histogram("fmjax_batch_seconds", "Time to run a batch", registry=r)
        self.batcher = batching.Batcher(runner, max_batch_size=self.serve.max_batch_size,
                                        max_wait_s=self.serve.max_wait_ms / 1000, max_queue=self.serve.max_queue,
                                        on_batch=self._on_batch)
        Gauge("fmjax_queue_depth", "Rows waiting for a batch", registry=r).set_function(self.batcher.depth)

    def _on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    @classmethod
    def from_run(cls, run, config=None) -> "Service":
        """The newest checkpoint of the run's workdir (or init_from); `config` (default run.config)
        gives the serve settings."""
        from fmjax.train import loop
        config, task, serve = config or run.config, run.task, (config or run.config).serve
        if config.model.name == "encoder":
            if "pooling" not in config.task or "normalize" not in config.task:
                raise ValueError("mode=serve embeds with task.pooling and task.normalize (as mode=embed); "
                                 f"task.name={config.task.name!r} has no such fields")
        elif not hasattr(task, "decoder_params"):
            raise ValueError(f"mode=serve serves decoders (completions, chat) and encoders (embeddings), "
                             f"not model.name={config.model.name!r}")
        params, step = loop.inference_params(run)
        if config.model.name == "encoder":
            params = task.export_params(params) if hasattr(task, "export_params") else params  # LoRA: merged
            runner = batching.Embedder(task.model_config, params["encoder"], task.tokenizer,
                                       pooling=config.task.pooling, normalize=config.task.normalize,
                                       max_len=config.data.seq_len)
            parser = Parser(serve, task.tokenizer, kind="encoder", embed_width=config.model.width,
                            embed_max_len=config.data.seq_len)
            return cls(config, parser, runner, step)
        runner = batching.Generator(task.model, task.decoder_params(params), eos_id=task.tokenizer.eos_id,
                                    pad_id=task.tokenizer.pad_id, mesh=run.mesh, rules=run.rules)
        template = getattr(task, "template", None)  # chat-tuned tasks only
        parser = Parser(serve, task.tokenizer, kind="decoder", vocab_size=config.model.vocab_size, template=template,
                        system_prompt=config.data.system_prompt if template else "", task_name=config.task.name)
        return cls(config, parser, runner, step)

    def warm_up(self) -> None:
        """Compiles the batches of short requests (prompts and budgets of up to 16 tokens): every
        power-of-two number of rows up to serve.max_batch_size."""
        if self.parse.kind == "encoder":
            sizes, payload = [1], ["warm up"]
        else:
            sizes = [1 << i for i in range((self.serve.max_batch_size - 1).bit_length() + 1)]
            payload = batching.GenerationRow((self.parse.tokenizer.bos_id,), 2)
        for size in sizes:
            results = []
            self.runner([batching.Job(payload, results.append) for _ in range(size)])
            if isinstance(results[-1], Exception):
                raise results[-1]

    def pending(self, payloads: list) -> "Pending":
        return Pending(self.batcher, payloads, time.monotonic() + self.serve.timeout_s, self.serve.timeout_s)

    def close(self) -> None:
        self.batcher.close()


class Pending:
    """The jobs of one request in the batcher, and their updates as they reach the event loop."""

    def __init__(self, batcher: batching.Batcher, payloads: list, deadline: float, timeout_s: float):
        self.loop, self.updates = asyncio.get_running_loop(), asyncio.Queue()
        self.deadline, self.timeout_s, self.closed = deadline, timeout_s, set()
        self.jobs = [batching.Job(p, functools.partial(self._post, i)) for i, p in enumerate(payloads)]
        try:
            batcher.submit(self.jobs)
        except batching.QueueFull as e:
            raise APIError(429, f"The server is overloaded: {e}. Retry later.", "rate_limit_error",
                           code="queue_full") from None

    def _post(self, index: int, item) -> None:  # on the worker thread
        try:
            self.loop.call_soon_threadsafe(self.updates.put_nowait, (index, item))
        except RuntimeError:  # the event loop has closed
            pass

    def close(self, index: int) -> None:
        """Row `index` needs nothing more (done, or ended by a stop string or the content filter)."""
        self.closed.add(index)
        self.jobs[index].cancelled = True

    async def stream(self) -> AsyncIterator[tuple[int, object]]:
        """(row, update) until every row is closed; APIError 504 past the deadline, 500 if the batch failed."""
        try:
            while len(self.closed) < len(self.jobs):
                try:
                    index, item = await asyncio.wait_for(self.updates.get(), self.deadline - time.monotonic())
                except TimeoutError:
                    raise APIError(504, f"The request took longer than serve.timeout_s={self.timeout_s:g} s.",
                                   "timeout_error", code="timeout") from None
                if index in self.closed:
                    continue
                if isinstance(item, Exception):
                    raise APIError(500, f"The model failed: {type(item).__name__}: {item}", "server_error")
                if getattr(item, "done", True):
                    self.closed.add(index)
                yield index, item
        finally:
            for job in self.jobs:  # a timeout, a disconnect or an error: the batcher skips what is left
                job.cancelled = True


def _sse(data) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _texts(pending: Pending, views: list[TextView]) -> AsyncIterator[tuple[int, str, str | None, int]]:
    """(row, text so far, finish reason once the row ends, tokens generated) of every update."""
    async for i, progress in pending.stream():
        text, reason = views[i].read(progress.ids, progress.done)
        finish = reason or progress.finish
        if finish is not None:
            pending.close(i)
        yield i, text, finish, progress.generated


async def _complete(pending: Pending, views: list[TextView]) -> tuple[list[str], list[str], int]:
    """(final texts, finish reasons, tokens generated) of every row."""
    texts, finishes, generated = [""] * len(views), ["stop"] * len(views), [0] * len(views)
    async for i, text, finish, count in _texts(pending, views):
        texts[i], generated[i], finishes[i] = text, count, finish or finishes[i]
    return texts, finishes, sum(generated)


async def _stream(service: Service, pending: Pending, views: list[TextView], chunk, start: float,
                  prompt_tokens: int, include_usage: bool, opening: Sequence[dict] = ()) -> AsyncIterator[str]:
    """Server-sent events: the opening events (chat: each row's role; echo: the prompts), then
    chunk(row, text, finish) per new piece of text, the usage if asked for, [DONE]."""
    sent, generated, first = [""] * len(views), [0] * len(views), True
    try:
        for event in opening:
            yield _sse(event)
        async for i, text, finish, count in _texts(pending, views):
            generated[i] = count
            end = len(text) if finish else views[i].safe_end(text)
            new = text[len(sent[i]):end] if text.startswith(sent[i]) else ""
            if new or finish:
                if first and new:
                    service.first_text.observe(time.perf_counter() - start)
                    first = False
                sent[i] += new
                yield _sse(chunk(i, new, finish))
        service.completion_tokens.inc(sum(generated))
        if include_usage:
            yield _sse({**chunk(0, "", None), "choices": [], "usage": _usage(prompt_tokens, sum(generated))})
        yield "data: [DONE]\n\n"
    except APIError as e:
        yield _sse(e.body)


class _Observe:
    """ASGI middleware: counts every answer by endpoint and status and times it to its last byte."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def observed(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            self.service.requests.labels(endpoint, str(status)).inc()
            self.service.latency.labels(endpoint).observe(time.perf_counter() - start)


def make_app(service: Service):
    """The FastAPI application of `service`."""
    from fastapi import FastAPI, Request  # local: mode=serve only
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException

    app = FastAPI(title="fmjax", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Observe, service=service)
    parse, name, tokenizer = service.parse, service.serve.model_name, service.parse.tokenizer

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body, status_code=e.status, headers={"Retry-After": "1"} if e.status == 429 else None)

    @app.exception_handler(HTTPException)  # unknown paths and methods
    async def http_error(request, e: HTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return JSONResponse(APIError(500, f"{type(e).__name__}: {e}", "server_error").body, status_code=500)

    async def read(request: Request, kind: str) -> dict:
        parse.authorize(request.headers)
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > MAX_BODY_BYTES:
                raise APIError(413, f"The request body is over {MAX_BODY_BYTES >> 20} MiB.", code="request_too_large")
        try:
            body = json.loads(raw)
        except ValueError as e:  # UnicodeDecodeError included
            raise APIError(400, f"We could not parse the JSON body of your request ({e}).",
                           code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        parse.check_model(body, kind)
        return body

    def head(kind: str) -> dict:
        prefix = {"text_completion": "cmpl", "chat.completion": "chatcmpl"}[kind]
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": name}

    @app.get("/healthz")
    async def healthz():
        alive = service.batcher.alive()
        return JSONResponse({"status": "ok" if alive else "the batch worker has stopped", "model": name,
                             "step": service.step, "queue_depth": service.batcher.depth()},
                            status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        parse.authorize(request.headers)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": service.created,
                                            "owned_by": "fmjax"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        start = time.perf_counter()
        body = await read(request, "decoder")
        s = parse.sampling(body, COMPLETION_MAX_TOKENS)
        echo = get(body, "echo", bool, False)
        prompts = parse.completion_prompts(body)
        rows, views = [], []
        for p, prompt in enumerate(prompts):
            rows += parse.rows(prompt.ids, s, first=p * s.n)
            views += [TextView(tokenizer, s.stop, parse.blocklist, prompt.reads_as, prompt.text)] * s.n
        prompt_tokens = sum(len(p.ids) for p in prompts)
        pending = service.pending(rows)  # 429 before any answer starts
        service.prompt_tokens.inc(prompt_tokens)
        meta = head("text_completion")

        def chunk(i, text, finish):
            return {**meta, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]}

        if s.stream:
            opening = [chunk(i, view.prompt_text, None) for i, view in enumerate(views)] if echo else ()
            return StreamingResponse(_stream(service, pending, views, chunk, start, prompt_tokens, s.include_usage,
                                             opening), media_type="text/event-stream")
        texts, finishes, generated = await _complete(pending, views)
        service.completion_tokens.inc(generated)
        choices = [chunk(i, (views[i].prompt_text if echo else "") + t, f)["choices"][0]
                   for i, (t, f) in enumerate(zip(texts, finishes))]
        return {**meta, "choices": choices, "usage": _usage(prompt_tokens, generated)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        start = time.perf_counter()
        body = await read(request, "decoder")
        s = parse.sampling(body, service.serve.max_tokens, ("max_completion_tokens", "max_tokens"))
        ids = parse.chat_prompt(body)
        rows = parse.rows(ids, s, [(parse.template.end_id,)])
        views = [TextView(tokenizer, s.stop, parse.blocklist)] * s.n
        pending = service.pending(rows)
        service.prompt_tokens.inc(len(ids))
        meta = head("chat.completion")
        if s.stream:
            meta["object"] = "chat.completion.chunk"

            def chunk(i, text, finish, delta=None):
                delta = delta or ({"content": text} if text else {})
                return {**meta, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}

            opening = [chunk(i, "", None, {"role": "assistant", "content": ""}) for i in range(s.n)]
            return StreamingResponse(_stream(service, pending, views, chunk, start, len(ids), s.include_usage,
                                             opening), media_type="text/event-stream")
        texts, finishes, generated = await _complete(pending, views)
        service.completion_tokens.inc(generated)
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(texts, finishes))]
        return {**meta, "choices": choices, "usage": _usage(len(ids), generated)}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await read(request, "encoder")
        texts, tokens, base64_format = parse.embedding_inputs(body)
        pending = service.pending([texts])
        service.prompt_tokens.inc(sum(tokens))
        vectors = [item async for _, item in pending.stream()][0]
        data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(
            v.astype("<f4").tobytes()).decode() if base64_format else v.tolist()} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": name,
                "usage": {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}}

    return app


def serve(run) -> None:
    """mode=serve: loads the newest checkpoint, compiles the common shapes, serves until interrupted."""
    import uvicorn  # local: mode=serve only
    cfg = run.config.serve
    try:
        service = Service.from_run(run)
    except ValueError as e:  # what the model is cannot be checked before the run is set up
        print(f"fmjax: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    try:
        start = time.perf_counter()
        service.warm_up()
        endpoints = ("/v1/embeddings" if service.parse.kind == "encoder" else
                     "/v1/completions" + (", /v1/chat/completions" if service.parse.template else ""))
        print(f"serving {run.workdir} (step {service.step}) as model {cfg.model_name!r} on http://{cfg.host}:"
              f"{cfg.port}: {endpoints}, /v1/models, /healthz, /metrics (compiled in "
              f"{time.perf_counter() - start:.1f} s)", flush=True)
        uvicorn.Server(uvicorn.Config(make_app(service), host=cfg.host, port=cfg.port, log_level="info",
                                      access_log=False, timeout_graceful_shutdown=5)).run()
    finally:
        service.close()
