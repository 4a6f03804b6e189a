"""Load generator for the HTTP server (fmjax/infer/server.py): many concurrent clients on loopback.

For every value of --batch_sizes it starts `python -m fmjax.main --config.mode=serve` on the
workdir with serve.max_batch_size set to it, warms it up (untimed, so that the batch shapes of
these requests compile), then has --clients threads, each with its own keep-alive connection, send
--requests requests in all as fast as they are answered (a closed loop: a client sends its next
request when its last is answered). Requests are greedy completions (or chat completions) of
--max_tokens tokens of a fixed set of prompts, the same in every run, so every run generates the
same tokens. Reports throughput (requests/s, generated tokens/s), p50 / p99 latency, errors by
status, and the server's mean batch size (from /metrics). One JSON line per run, then a Markdown table.

  python experiments/bench/serve_load.py --config configs/lm/tiny.py --workdir runs/demo \
      --batch_sizes 1,8,32 --clients 64 --requests 512

--init_random first writes a checkpoint of freshly initialised parameters into a workdir that
has none (throughput does not depend on what the model learned). --url drives a server that is
already running instead (--batch_sizes is then ignored). --config.x=y flags go to the server too.
"""
import collections
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

ROOT = Path(__file__).resolve().parents[2]
_CONFIG = config_flags.DEFINE_config_file("config", "configs/lm/tiny.py", "The workdir's config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The workdir to serve.")
_INIT_RANDOM = flags.DEFINE_bool("init_random", False, "Write randomly initialised parameters into a workdir "
                                 "without checkpoints first.")
_URL = flags.DEFINE_string("url", "", "A running server to drive (e.g. http://127.0.0.1:8000) instead.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "serve.max_batch_size of each run.")
_CLIENTS = flags.DEFINE_integer("clients", 64, "Concurrent clients.")
_REQUESTS = flags.DEFINE_integer("requests", 512, "Requests in all (timed).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 32, "max_tokens of every request.")
_ENDPOINT = flags.DEFINE_enum("endpoint", "completions", ["completions", "chat"], "What the clients ask for.")
_STREAM = flags.DEFINE_bool("stream", False, "Streamed answers (latency is then to the last event).")
_API_KEY = flags.DEFINE_string("api_key", "", "Bearer key, if the server wants one.")

PROMPTS = ["The for statement", "A class definition", "Exceptions are", "The list type supports",
           "Dictionaries map keys to values and", "To open a file, call", "A generator function is",
           "The import system finds modules by"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_workdir(config, workdir: str) -> None:
    """A checkpoint (step 0) of freshly initialised parameters, unless the workdir has one."""
    from fmjax.train import checkpoint, loop, state as state_lib
    if checkpoint.latest_step(workdir) is not None:
        return
    run = loop.setup(config, workdir)
    state = state_lib.init_state(run.task, run.tx, config.seed, run.abstract, run.shardings)
    loop.write_config(config, workdir)
    ckpts = checkpoint.Checkpoints(workdir, keep=1)
    ckpts.save(0, state, {}, json.loads(config.to_json_best_effort()))
    ckpts.wait()
    ckpts.close()


def http_request(conn: http.client.HTTPConnection, method: str, path: str, body=None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if _API_KEY.value:
        headers["Authorization"] = f"Bearer {_API_KEY.value}"
    conn.request(method, path, None if body is None else json.dumps(body), headers)
    response = conn.getresponse()
    return response.status, response.read()


def body_of(i: int, model: str) -> tuple[str, dict]:
    prompt = PROMPTS[i % len(PROMPTS)]
    common = {"model": model, "max_tokens": _MAX_TOKENS.value, "temperature": 0, "stream": _STREAM.value}
    if _ENDPOINT.value == "chat":
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**common, "prompt": prompt}


def completion_tokens(status: int, data: bytes) -> int:
    if status != 200:
        return 0
    if not _STREAM.value:
        return json.loads(data)["usage"]["completion_tokens"]
    events = [json.loads(e[6:]) for e in data.decode().split("\n\n") if e.startswith("data: {")]
    return next((e["usage"]["completion_tokens"] for e in events if e.get("usage")), 0)


def drive(url: str, model: str, requests: int, clients: int) -> dict:
    """Sends `requests` requests from `clients` threads; latencies, statuses and tokens."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    lock, next_index = threading.Lock(), [0]
    latencies, statuses, tokens = [], collections.Counter(), [0]

    def client():
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= requests:
                break
            path, body = body_of(i, model)
            if _STREAM.value:
                body["stream_options"] = {"include_usage": True}
            start = time.perf_counter()
            try:
                status, data = http_request(conn, "POST", path, body)
            except (OSError, http.client.HTTPException) as e:
                status, data = type(e).__name__, b""
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=600)
            seconds = time.perf_counter() - start
            with lock:
                latencies.append(seconds)
                statuses[status] += 1
                tokens[0] += completion_tokens(status, data)
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    quantiles = statistics.quantiles(latencies * 2, n=100, method="inclusive")  # (x2: a single request works)
    return {"requests": requests, "seconds": round(seconds, 2), "requests_per_s": round(requests / seconds, 2),
            "tokens_per_s": round(tokens[0] / seconds, 1), "completion_tokens": tokens[0],
            "p50_s": round(quantiles[49], 3), "p99_s": round(quantiles[98], 3),
            "errors": {str(k): v for k, v in statuses.items() if k != 200}}


def scrape(url: str) -> dict[str, float]:
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    _, data = http_request(conn, "GET", "/metrics")
    conn.close()
    return {k: float(v) for k, v in re.findall(r"^(fmjax_\S+) (\S+)$", data.decode(), re.M)}


def run_against(url: str, model: str, max_batch_size: int = 0) -> dict:
    """Warm-up (untimed): bursts of 1, 2, 4, ... max_batch_size requests, so that every batch size
    (a power of two) compiles for these lengths, then one request per client. Then the timed run."""
    for burst in [1 << i for i in range(max(max_batch_size - 1, 0).bit_length() + 1)] if max_batch_size else ():
        drive(url, model, burst, burst)
    drive(url, model, _CLIENTS.value, _CLIENTS.value)
    before = scrape(url)
    result = drive(url, model, _REQUESTS.value, _CLIENTS.value)
    after = scrape(url)
    batches = after["fmjax_batch_size_count"] - before["fmjax_batch_size_count"]
    rows = after["fmjax_batch_size_sum"] - before["fmjax_batch_size_sum"]
    return {**result, "mean_batch_rows": round(rows / max(batches, 1), 2), "batches": int(batches)}


def start_server(max_batch_size: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    forwarded = [a for a in sys.argv[1:] if a.startswith("--config.")]
    cmd = [sys.executable, "-m", "fmjax.main", "--config", flags.FLAGS["config"].config_filename,
           "--workdir", _WORKDIR.value, *forwarded, "--config.mode=serve", f"--config.serve.port={port}",
           f"--config.serve.max_batch_size={max_batch_size}",
           f"--config.serve.max_queue={max(256, _CLIENTS.value * 2)}"]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited:\n{process.stdout.read()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            if http_request(conn, "GET", "/healthz")[0] == 200:
                return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not answer /healthz within 600 s")


def markdown(rows) -> str:
    cells = ["max_batch_size", "requests_per_s", "tokens_per_s", "p50_s", "p99_s", "mean_batch_rows", "errors"]
    lines = ["| " + " | ".join(cells) + " |", "|" + "---|" * len(cells)]
    lines += ["| " + " | ".join(str(r.get(c, "-")) for c in cells) + " |" for r in rows]
    return "\n".join(lines)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a save at INFO
    config = _CONFIG.value
    common = {"clients": _CLIENTS.value, "max_tokens": _MAX_TOKENS.value, "endpoint": _ENDPOINT.value,
              "stream": _STREAM.value, "model": f"{config.model.name} width {config.model.width} x "
                                                f"{config.model.n_layers} layers"}
    rows = []
    if _URL.value:
        rows.append({**common, "max_batch_size": "?", **run_against(_URL.value, config.serve.model_name)})
        print(json.dumps(rows[-1]), flush=True)
    else:
        if not _WORKDIR.value:
            raise app.UsageError("--workdir (or --url) is required")
        if _INIT_RANDOM.value:
            random_workdir(config, _WORKDIR.value)
        for size in map(int, _BATCH_SIZES.value):
            process, url = start_server(size)
            try:
                rows.append({**common, "max_batch_size": size, **run_against(url, config.serve.model_name, size)})
            finally:
                process.terminate()
                process.communicate(timeout=60)
            print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))


if __name__ == "__main__":
    os.chdir(ROOT)
    app.run(main)
