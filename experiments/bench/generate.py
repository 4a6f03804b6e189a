"""Benchmark: decoding throughput of KV-cache generation (fmjax.infer.generate) vs full recompute.

Random parameters for the config's model, `--batch` random prompts of `--prompt_len` tokens, and
`--new_tokens` greedy tokens per row with no eos, so both samplers do the same work. Compilation
is timed apart; the timed runs are device-synchronised and the median of `--repeats` is reported.
KV cache: prefill (the prompt block) and decode (the per-token while_loop) are timed separately;
per-token latency is decode time / (new_tokens - 1), the first token coming from prefill. Prints
one JSON line per sampler, then a Markdown table.

  python experiments/bench/generate.py --config configs/lm/tiny.py --batch 8 --prompt_len 64 \
      --new_tokens 64
"""
from __future__ import annotations

import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from fmjax.infer import generate, naive_sample
from fmjax.models import get_model

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lm/tiny.py", "Config whose model is benchmarked.")
_BATCH = flags.DEFINE_integer("batch", 8, "Prompts decoded together.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Tokens per prompt.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "New tokens per prompt.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs (after one warm-up run).")
_NAIVE = flags.DEFINE_boolean("naive", True, "Also time the full-recompute sampler.")


def timed(fn, repeats, setup=lambda: ()):
    """(first call's seconds incl. compilation, median seconds of `repeats` more calls, last result);
    fn(*setup()) is timed, setup() is not."""
    def once():
        args = jax.block_until_ready(setup())
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        return time.perf_counter() - t, out

    first, out = once()
    times = []
    for _ in range(repeats):
        seconds, out = once()
        times.append(seconds)
    return first, statistics.median(times), out


def bench_kv_cache(model, params, prompts, new_tokens, repeats):
    tokens, prompt_len, requests, budget = generate.prepare_batch(
        prompts, max_new_tokens=new_tokens, eos_id=None, pad_id=0)
    prefill = lambda: generate.prefill(model, params, tokens, prompt_len, requests, new_tokens=budget)
    prefill_first, prefill_s, _ = timed(prefill, repeats)
    # decode consumes (donates) its state: every run starts from a fresh prefill, outside the timing.
    decode = lambda state: generate.decode(model, params, state, requests)
    decode_first, decode_s, state = timed(decode, repeats, setup=lambda: (prefill(),))
    rows = len(prompts)
    return {"sampler": "kv_cache", "compile_s": prefill_first - prefill_s + decode_first - decode_s,
            "prefill_s": prefill_s, "decode_s": decode_s, "total_s": prefill_s + decode_s,
            "per_token_ms": 1e3 * decode_s / max(new_tokens - 1, 1),
            "new_tokens_per_s": rows * new_tokens / (prefill_s + decode_s)}, generate.new_tokens_of(state, rows)


def bench_naive(model, params, prompts, new_tokens, repeats):
    lengths = np.array([len(p) for p in prompts], np.int32)
    buf = naive_sample.left_aligned(prompts, int(lengths.max()) + new_tokens, 0)
    run = lambda: naive_sample.generate_buffer(model, params, buf, lengths, jax.random.PRNGKey(0),
                                               steps=new_tokens, temperature=0.0)
    first, total_s, out = timed(run, repeats)
    out = np.asarray(out)
    return {"sampler": "naive", "compile_s": first - total_s, "prefill_s": None, "decode_s": total_s,
            "total_s": total_s, "per_token_ms": 1e3 * total_s / new_tokens,
            "new_tokens_per_s": len(prompts) * new_tokens / total_s}, \
        [out[r, n:n + new_tokens].tolist() for r, n in enumerate(lengths)]


def markdown(records):
    cells = ["sampler", "new_tokens_per_s", "prefill_s", "per_token_ms", "total_s", "compile_s"]
    fmt = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cells) + " |", "|" + "---|" * len(cells)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cells) + " |" for r in records]
    return "\n".join(lines)


def main(_):
    config = _CONFIG.value
    config_cls, model_cls = get_model(config.model.name)
    model = model_cls(config_cls.from_config(config.model))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    rng = np.random.default_rng(0)
    prompts = rng.integers(9, config.model.vocab_size, (_BATCH.value, _PROMPT_LEN.value)).tolist()
    common = {"model": config.model.name, "params": sum(x.size for x in jax.tree.leaves(params)),
              "batch": _BATCH.value, "prompt_len": _PROMPT_LEN.value, "new_tokens": _NEW_TOKENS.value,
              "device": jax.devices()[0].device_kind, "jax": jax.__version__}
    kv, kv_tokens = bench_kv_cache(model, params, prompts, _NEW_TOKENS.value, _REPEATS.value)
    records = [kv]
    if _NAIVE.value:
        naive, naive_tokens = bench_naive(model, params, prompts, _NEW_TOKENS.value, _REPEATS.value)
        naive["same_tokens_as_kv_cache"] = naive_tokens == kv_tokens
        naive["kv_cache_speedup"] = kv["new_tokens_per_s"] / naive["new_tokens_per_s"]
        records.append(naive)
    for record in records:
        print(json.dumps({**common, **record}))
    print(markdown(records))


if __name__ == "__main__":
    app.run(main)
