"""The HTTP server: the openai client against it, batched greedy = offline greedy, many concurrent
clients, overload (429), timeouts (504), bad requests (4xx in OpenAI's error shape), the content
filter, metrics, and mode=serve through the CLI.

Workdirs hold random parameters (no training) of a 1-layer decoder (SFT task: it has a chat
template; and an LM task, which has none) and a 1-layer encoder, on one device. Prompts and budgets
stay within 16 tokens, so the decoder compiles one shape per batch size (1, 2, 4, 8) for the file.
"""
import concurrent.futures
import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import openai
import pytest
import uvicorn

from configs.encoder import tiny as encoder_tiny
from configs.lm import tiny as lm_tiny
from configs.sft import dolly_tiny
from fmjax import config_lib
from fmjax.data import tokenizer as tokenizer_lib
from fmjax.infer import chat, embed, generate, server
from fmjax.train import loop
from tests.workdirs import write_random_checkpoint

ROOT = Path(__file__).resolve().parents[2]
DECODER = dict(vocab_size=512, width=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128)
ENCODER = dict(vocab_size=512, width=64, n_layers=1, n_heads=4, head_dim=16, mlp_dim=128, max_len=64)
PROMPTS = ["The list type", "A dictionary maps", "Exceptions are", "for i in range", "import os", "class A:",
           "The", "Tuples are immutable"]
KEY = "sk-test"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The pydoc tokenizer of 512 pieces (it has the chat and mask pieces) and a small chat file."""
    tmp = tmp_path_factory.mktemp("files")
    config = lm_tiny.get_config()
    config.model.update(DECODER)
    config.data.update(cache_dir=str(tmp / "cache"))
    records = [{"instruction": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(40)]
    (tmp / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"tokenizer": str(tokenizer_lib.get_tokenizer(config).path), "chat": str(tmp / "chat.jsonl"),
            "cache": str(tmp / "cache")}


def sft_config(files):
    config = dolly_tiny.get_config()
    config.model.update(DECODER)
    config.data.update(path=files["chat"], tokenizer=files["tokenizer"], seq_len=64, cache_dir=files["cache"],
                       validation_fraction=0.2)
    config.train.batch_size = 8
    config.serve.update(max_batch_size=8, max_wait_ms=20.0, max_tokens=16, max_prompt_tokens=16)
    return config


@pytest.fixture(scope="module")
def decoder(files, tmp_path_factory):
    """An SFT workdir's Run and the parameters it serves."""
    run = write_random_checkpoint(sft_config(files), tmp_path_factory.mktemp("sft"), jax.devices()[:1])
    params, _ = loop.inference_params(run)
    return run, run.task.decoder_params(params)


@pytest.fixture(scope="module")
def lm(files, tmp_path_factory):
    """A pretraining (LM task) workdir of the same model: no chat template."""
    config = lm_tiny.get_config()
    config.model.update(DECODER)
    config.data.update(tokenizer=files["tokenizer"], seq_len=64, cache_dir=files["cache"])
    config.train.batch_size = 8
    config.serve.update(max_tokens=16, max_prompt_tokens=16)
    return write_random_checkpoint(config, tmp_path_factory.mktemp("lm"), jax.devices()[:1])


@pytest.fixture(scope="module")
def encoder(files, tmp_path_factory):
    config = encoder_tiny.get_config()
    config.model.update(ENCODER)
    config.data.update(tokenizer=files["tokenizer"], seq_len=64, cache_dir=files["cache"])
    config.train.batch_size = 8
    return write_random_checkpoint(config, tmp_path_factory.mktemp("encoder"), jax.devices()[:1])


def service(run, **serve):
    """A Service of the run's newest checkpoint with these serve settings (the same model compiles once)."""
    config = run.config.copy_and_resolve_references()
    config.serve.update(serve)
    return server.Service.from_run(run, config)


@contextlib.contextmanager
def serving(svc):
    """A Service on a free loopback port, in a thread; yields its base URL and closes the service after."""
    uv = uvicorn.Server(uvicorn.Config(server.make_app(svc), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    port = uv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join()
        svc.close()


def request(url, path, body=None, key=KEY, raw=None, method=None):
    """(status, parsed JSON or SSE text) of one HTTP request."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = raw if raw is not None else (None if body is None else json.dumps(body))
    conn.request(method or ("GET" if data is None else "POST"), path, data, headers)
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    is_json = response.getheader("content-type", "").startswith("application/json")
    return response.status, json.loads(text) if is_json else text


def offline(decoder, prompt, max_tokens, stop=()):
    """What generate.generate returns for one greedy prompt, on the served parameters."""
    run, params = decoder
    return generate.generate(run.task.model, params, run.task.tokenizer, [prompt], max_new_tokens=max_tokens,
                             stop=stop, continuation_only=True)[0]


def offline_reply(decoder, messages, max_tokens):
    """What chat.replies returns for one conversation, greedily."""
    run, params = decoder
    return chat.replies(run.task.model, params, run.task.tokenizer, run.task.template, [messages],
                        max_new_tokens=max_tokens)[0]


def test_the_openai_client_gets_completions_and_chat_completions_streamed_and_not(decoder):
    run, _ = decoder
    with serving(service(run, api_key=KEY)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list()] == ["fmjax"]
        expected = offline(decoder, "The list type", 12)
        completion = client.completions.create(model="fmjax", prompt="The list type", max_tokens=12, temperature=0)
        assert completion.choices[0].text == expected and completion.choices[0].finish_reason in ("stop", "length")
        assert completion.usage.prompt_tokens == 1 + len(run.task.tokenizer.encode("The list type"))
        chunks = list(client.completions.create(model="fmjax", prompt="The list type", max_tokens=12, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == completion.choices[0].finish_reason
        echoed = client.completions.create(model="fmjax", prompt="The list type", max_tokens=12, temperature=0,
                                           echo=True)
        assert echoed.choices[0].text == "The list type" + expected

        messages = [{"role": "user", "content": "What is a list?"}]
        reply = offline_reply(decoder, messages, 10)
        answer = client.chat.completions.create(model="fmjax", messages=messages, max_tokens=10, temperature=0)
        assert answer.choices[0].message.content == reply and answer.choices[0].message.role == "assistant"
        stream = list(client.chat.completions.create(model="fmjax", messages=messages, max_tokens=10, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert stream[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply
        assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == answer.choices[0].finish_reason
        assert stream[-1].usage.completion_tokens == answer.usage.completion_tokens
        sampled = client.completions.create(model="fmjax", prompt=["The", "import os"], max_tokens=8, temperature=1.0,
                                            top_p=0.9, n=2, seed=5, extra_body={"top_k": 20})
        assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
        again = client.completions.create(model="fmjax", prompt=["The", "import os"], max_tokens=8, temperature=1.0,
                                          top_p=0.9, n=2, seed=5, extra_body={"top_k": 20})
        assert [c.text for c in again.choices] == [c.text for c in sampled.choices]  # a seed fixes the samples


def test_the_openai_client_gets_embeddings_of_an_encoder_workdir(encoder):
    run = encoder
    texts = ["A list is a mutable sequence.", "Tuples are immutable.", "import os"]
    params, _ = loop.inference_params(run)
    expected = embed.embed_texts(run.task.model_config, params["encoder"], run.task.tokenizer, texts,
                                 max_len=run.config.data.seq_len)
    with serving(service(run)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        result = client.embeddings.create(model="fmjax", input=texts)  # the client asks for base64
        np.testing.assert_allclose([d.embedding for d in result.data], expected, atol=1e-5)
        single = client.embeddings.create(model="fmjax", input=texts[0], encoding_format="float")
        np.testing.assert_allclose(single.data[0].embedding, expected[0], atol=1e-5)
        assert result.usage.prompt_tokens == sum(len(run.task.tokenizer.encode(t)) + 2 for t in texts)
        status, body = request(url, "/v1/completions", {"model": "fmjax", "prompt": "x"})
        assert status == 400 and body["error"]["code"] == "unsupported_endpoint"


def test_concurrent_greedy_requests_are_batched_and_equal_offline_generation(decoder):
    run, _ = decoder
    cases = []
    for i, prompt in enumerate(PROMPTS):  # budgets of 4 to 16 tokens; every other prompt with stop strings
        max_tokens = 4 + (i * 3) % 13
        text = offline(decoder, prompt, max_tokens)
        stop = (text[len(text) // 2:len(text) // 2 + 2], "zq") if i % 2 and len(text) > 4 else ()
        cases.append((prompt, max_tokens, stop))
    with serving(service(run, max_wait_ms=200.0)) as url:
        def ask(case):
            prompt, max_tokens, stop = case
            return request(url, "/v1/completions", {"model": "fmjax", "prompt": prompt, "max_tokens": max_tokens,
                                                    "temperature": 0, "stop": list(stop)})

        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            answers = list(pool.map(ask, cases))
        _, metrics = request(url, "/metrics")
    assert [status for status, _ in answers] == [200] * len(cases)
    cut = 0
    for (prompt, max_tokens, stop), (_, body) in zip(cases, answers):
        expected = offline(decoder, prompt, max_tokens, stop)
        assert body["choices"][0]["text"] == expected, prompt
        cut += bool(stop) and body["choices"][0]["finish_reason"] == "stop"
    assert cut >= 2  # stop strings ended some rows
    batches = float(re.search(r"^fmjax_batch_size_count (\S+)$", metrics, re.M).group(1))
    assert batches < len(cases)  # some requests shared a batch


def test_64_concurrent_clients_all_answered_and_healthz_answers_throughout(decoder):
    run, _ = decoder
    clients, per_client = 64, 3
    health, stop_polling = [], threading.Event()
    with serving(service(run, max_queue=clients)) as url:
        def poll():
            while not stop_polling.is_set():
                start = time.perf_counter()
                status, body = request(url, "/healthz")
                health.append((status, time.perf_counter() - start))
                time.sleep(0.02)

        def client(c):
            out = []
            for r in range(per_client):
                body = {"model": "fmjax", "prompt": PROMPTS[(c + r) % 4], "max_tokens": 6,
                        "temperature": 0 if c % 2 else 0.8, "seed": c}
                out.append(request(url, "/v1/completions", body))
            return out

        poller = threading.Thread(target=poll)
        poller.start()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = [r for rs in pool.map(client, range(clients)) for r in rs]
        stop_polling.set()
        poller.join()
    assert len(results) == clients * per_client
    assert [status for status, _ in results] == [200] * len(results)
    greedy = {}
    for c in range(1, clients, 2):  # every greedy answer to a prompt is the same: rows never mix
        for r in range(per_client):
            greedy.setdefault(PROMPTS[(c + r) % 4], set()).add(results[c * per_client + r][1]["choices"][0]["text"])
    assert all(len(texts) == 1 for texts in greedy.values()) and len(greedy) == 4
    assert health and all(status == 200 for status, _ in health)


class Gate:
    """A runner that waits for `open` before each batch: the queue fills up behind it."""

    def __init__(self, runner):
        self.runner, self.open, self.entered = runner, threading.Event(), threading.Event()

    def __call__(self, jobs):
        self.entered.set()
        self.open.wait(60)
        self.runner(jobs)


def test_beyond_the_queue_bound_requests_get_429_and_none_is_lost(decoder):
    run, _ = decoder
    overloaded = service(run, max_queue=8)
    gate = overloaded.batcher.run_batch = Gate(overloaded.batcher.run_batch)
    clients = 64
    with serving(overloaded) as url:
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(request, url, "/v1/completions",
                                   {"model": "fmjax", "prompt": PROMPTS[c % 8], "max_tokens": 4, "temperature": 0})
                       for c in range(clients)]
            assert gate.entered.wait(30)
            while sum(f.done() for f in futures) < clients - 16:  # at most 8 running + 8 queued wait
                time.sleep(0.01)
            assert request(url, "/healthz")[0] == 200
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model="fmjax", prompt="The", max_tokens=2)
            gate.open.set()
            results = [f.result() for f in futures]
    statuses = [status for status, _ in results]
    assert set(statuses) == {200, 429} and statuses.count(200) >= 8
    for status, body in results:
        if status == 429:
            assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "queue_full"
        else:
            assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_request_past_its_timeout_gets_504_and_a_stream_ends_with_an_error_event(decoder):
    run, _ = decoder
    slow = service(run, timeout_s=0.3)
    gate = slow.batcher.run_batch = Gate(slow.batcher.run_batch)
    with serving(slow) as url:
        body = {"model": "fmjax", "prompt": "The", "max_tokens": 4}
        status, answer = request(url, "/v1/completions", body)
        assert status == 504 and answer["error"]["code"] == "timeout"
        status, events = request(url, "/v1/completions", {**body, "stream": True})
        assert status == 200 and '"code": "timeout"' in events and "[DONE]" not in events
        gate.open.set()
        assert request(url, "/healthz")[0] == 200


def test_bad_requests_get_the_right_4xx_in_openai_error_shape(decoder, encoder):
    run, _ = decoder
    ok = {"model": "fmjax", "prompt": "The", "max_tokens": 2}
    cases = [  # (path, body or raw bytes, key, status, param, code)
        ("/v1/completions", b'{"model": "fmjax", "prompt": ', KEY, 400, None, "invalid_json"),
        ("/v1/completions", b"[1, 2]", KEY, 400, None, "invalid_json"),
        ("/v1/completions", {"prompt": "The"}, KEY, 400, "model", "missing_required_parameter"),
        ("/v1/completions", {"model": "fmjax"}, KEY, 400, "prompt", "missing_required_parameter"),
        ("/v1/chat/completions", {"model": "fmjax"}, KEY, 400, "messages", "missing_required_parameter"),
        ("/v1/completions", {**ok, "model": "gpt-4"}, KEY, 404, "model", "model_not_found"),
        ("/v1/completions", {**ok, "prompt": "word " * 40}, KEY, 400, "prompt", "context_length_exceeded"),
        ("/v1/completions", {**ok, "prompt": list(range(17))}, KEY, 400, "prompt", "context_length_exceeded"),
        ("/v1/chat/completions", {"model": "fmjax", "messages": [{"role": "user", "content": "word " * 20}]}, KEY,
         400, "messages", "context_length_exceeded"),
        ("/v1/completions", {**ok, "max_tokens": 17}, KEY, 400, "max_tokens", "invalid_value"),
        ("/v1/completions", {**ok, "temperature": 2.5}, KEY, 400, "temperature", "invalid_value"),
        ("/v1/completions", {**ok, "temperature": "hot"}, KEY, 400, "temperature", "invalid_type"),
        ("/v1/completions", {**ok, "top_p": 0}, KEY, 400, "top_p", "invalid_value"),
        ("/v1/completions", {**ok, "stop": ["a", ""]}, KEY, 400, "stop", "invalid_value"),
        ("/v1/completions", {**ok, "prompt": [1, 99999]}, KEY, 400, "prompt", "invalid_value"),
        ("/v1/completions", {**ok, "logprobs": 2}, KEY, 400, "logprobs", "unsupported_parameter"),
        ("/v1/chat/completions", {"model": "fmjax", "messages": [{"role": "robot", "content": "hi"}]}, KEY, 400,
         "messages[0]", "invalid_value"),
        ("/v1/embeddings", {"model": "fmjax", "input": "x"}, KEY, 400, "model", "unsupported_endpoint"),
        ("/v1/completions", {**ok, "prompt": "a Secret  plan"}, KEY, 400, "prompt", "content_filter"),
        ("/v1/completions", ok, "sk-wrong", 401, None, "invalid_api_key"),
        ("/v1/completions", ok, None, 401, None, "invalid_api_key"),
        ("/v1/models", None, "sk-wrong", 401, None, "invalid_api_key"),
        ("/v1/nothing", None, KEY, 404, None, None),
    ]
    with serving(service(run, api_key=KEY, blocklist=("secret plan",))) as url:
        for path, body, key, status, param, code in cases:
            raw = body if isinstance(body, bytes) else None
            got, answer = request(url, path, None if raw else body, key=key, raw=raw)
            assert got == status, (path, body, answer)
            assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
            assert (answer["error"]["param"], answer["error"]["code"]) == (param, code), (path, body, answer)
        assert request(url, "/healthz", key=None)[0] == 200  # health and metrics need no key
        assert request(url, "/metrics", key=None)[0] == 200
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.completions.create(model="fmjax", prompt="The", max_tokens=2)
    with serving(service(encoder)) as url:
        status, answer = request(url, "/v1/embeddings", {"model": "fmjax", "input": "word " * 70})
        assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
        status, answer = request(url, "/v1/embeddings", {"model": "fmjax", "input": ["a", ""]})
        assert status == 400 and answer["error"]["param"] == "input"


def test_an_lm_workdir_serves_completions_and_refuses_chat(lm):
    with serving(service(lm)) as url:
        status, answer = request(url, "/v1/completions", {"model": "fmjax", "prompt": "The", "max_tokens": 4})
        assert status == 200 and answer["usage"]["completion_tokens"] <= 4
        status, answer = request(url, "/v1/chat/completions", {"model": "fmjax", "messages": [
            {"role": "user", "content": "hi"}]})
        assert status == 400 and (answer["error"]["param"], answer["error"]["code"]) == (
            "messages", "unsupported_endpoint") and "task.name='lm'" in answer["error"]["message"]


def test_the_content_filter_cuts_a_completion_before_a_blocked_word(decoder):
    run, _ = decoder
    text = offline(decoder, "Exceptions are", 16)
    words = re.findall(r"\w+", text)
    assert words, text
    blocked = words[-1]
    cut = re.search(rf"(?<!\w){re.escape(blocked)}(?!\w)", text, re.IGNORECASE).start()
    body = {"model": "fmjax", "prompt": "Exceptions are", "max_tokens": 16, "temperature": 0}
    with serving(service(run, blocklist=(blocked.upper(),))) as url:
        status, answer = request(url, "/v1/completions", body)
        assert status == 200 and answer["choices"][0] == {"index": 0, "text": text[:cut], "logprobs": None,
                                                          "finish_reason": "content_filter"}
        status, events = request(url, "/v1/completions", {**body, "stream": True})
        pieces = [json.loads(e[6:]) for e in events.split("\n\n") if e.startswith("data: {")]
        assert "".join(p["choices"][0]["text"] for p in pieces) == text[:cut]  # the word never went out
        assert pieces[-1]["choices"][0]["finish_reason"] == "content_filter"


def test_metrics_count_requests_tokens_batches_and_the_queue(decoder):
    run, _ = decoder
    with serving(service(run)) as url:
        for _ in range(2):
            assert request(url, "/v1/completions", {"model": "fmjax", "prompt": "The", "max_tokens": 3,
                                                    "temperature": 0})[0] == 200
        request(url, "/v1/completions", {"model": "nope", "prompt": "The"})
        _, metrics = request(url, "/metrics")
    values = dict(re.findall(r"^(fmjax_\S+) (\S+)$", metrics, re.M))
    assert values['fmjax_requests_total{endpoint="/v1/completions",status="200"}'] == "2.0"
    assert values['fmjax_requests_total{endpoint="/v1/completions",status="404"}'] == "1.0"
    prompt_tokens = 2 * (1 + len(run.task.tokenizer.encode("The")))
    assert float(values["fmjax_prompt_tokens_total"]) == prompt_tokens
    assert 0 < float(values["fmjax_completion_tokens_total"]) <= 6
    assert values["fmjax_batch_size_count"] == "2.0" and values["fmjax_queue_depth"] == "0.0"
    assert 'fmjax_request_latency_seconds_bucket{endpoint="/v1/completions",le="+Inf"} 3.0' in metrics


def test_serve_settings_are_checked_naming_the_field():
    config = lm_tiny.get_config()
    assert "serve" in config_lib.MODES
    for field, value in [("port", 0), ("max_batch_size", 0), ("max_wait_ms", -1.0), ("timeout_s", 0.0),
                         ("max_queue", 4), ("blocklist", (1,))]:
        bad = config.copy_and_resolve_references()
        bad.serve[field] = value
        with pytest.raises(ValueError, match=f"serve.{field}"):
            config_lib.validate(bad, 8)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mode_serve_through_the_cli(decoder, files):
    run, _ = decoder
    port = free_port()
    overrides = [f"--config.model.{k}={v}" for k, v in DECODER.items()] + [
        f"--config.data.path={files['chat']}", f"--config.data.tokenizer={files['tokenizer']}",
        f"--config.data.cache_dir={files['cache']}", "--config.data.seq_len=64",
        "--config.data.validation_fraction=0.2",
        "--config.train.batch_size=8", "--config.mode=serve", f"--config.serve.port={port}",
        "--config.serve.max_tokens=16", "--config.serve.max_prompt_tokens=16", "--config.serve.model_name=tiny-sft",
        "--config.serve.max_batch_size=1"]  # one batch shape to compile at start
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    process = subprocess.Popen([sys.executable, "-m", "fmjax.main", "--config", "configs/sft/dolly_tiny.py",
                                "--workdir", run.workdir, *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            with contextlib.suppress(OSError):
                if request(url, "/healthz")[0] == 200:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        status, answer = request(url, "/v1/chat/completions", {
            "model": "tiny-sft", "messages": [{"role": "user", "content": "What is a list?"}], "max_tokens": 10,
            "temperature": 0})
        reply = offline_reply(decoder, [{"role": "user", "content": "What is a list?"}], 10)
        assert status == 200 and answer["choices"][0]["message"]["content"] == reply
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "serving" in output and f"http://127.0.0.1:{port}" in output, output
