"""Side-by-side peers: the same decoder shape trained by fmjax and by MaxText, on synthetic data.

For each shape (layers, width, heads, kv heads, head dim, MLP width, vocabulary, sequence length,
global batch) every contender (fmjax as configured, any --fmjax variants, MaxText in each --maxtext
setting) runs the same number of timed steps after the same number of warm-up steps, in --rounds
rounds that rotate the order within one run, so background load hits all alike. A contender's step
time is the median over rounds of each run's median step. Prints one JSON line per run and per
shape, then a Markdown table; a ratio is fmjax tokens/s over the fastest MaxText setting's tokens/s.

  .venv/bin/python experiments/bench/peers.py                    # both shapes, 3 rounds (~25 min)
  .venv/bin/python experiments/bench/peers.py --shapes tiny --fmjax bf16::model.dtype=bfloat16
  .venv/bin/python experiments/bench/peers.py --shapes tiny --rounds 0 --sweep_rounds 2   # MaxText's settings
  .venv/bin/python experiments/bench/peers.py --fmjax fix:/tmp/fmjax-with-fix  # another checkout

- fmjax: experiments/bench/train_step.py (of the contender's checkout) in a subprocess of this
  interpreter: one synthetic batch kept on the device, each step synchronised, the median of
  --steps steps after 3 warm-up steps.
- MaxText: `maxtext.trainers.pre_train.train` of --maxtext_python's environment (made by
  experiments/bench/peers_setup.sh) with dataset_type=synthetic; its per-step log ("completed step:
  n, seconds: s", the wall time between consecutive steps) is parsed, the first --warmup steps are
  dropped and the median of the next --steps is taken.
- Both run on one CPU device (the fake-device flag is removed from XLA_FLAGS), with the shape's
  model settings matched: untied embeddings, pre-RMSNorm (same epsilon), RoPE (same theta),
  grouped-query attention, SwiGLU, AdamW (same b1, b2, eps, weight decay), gradient clipping,
  z-loss, no dropout. fmjax computes in float32 unless a variant sets model.dtype.
- MaxText's speed-only settings (dtype, remat policy, scanned layers) are MAXTEXT_VARIANTS;
  --sweep_rounds times them all first and then compares against the fastest overall and the
  fastest float32 one.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
TRAIN_STEP = pathlib.Path("experiments", "bench", "train_step.py")
TINY_CONFIG = pathlib.Path("configs", "lm", "tiny.py")
# The tiny LM exactly as configs/lm/tiny.py has it (read from the file), and a larger shape for the trend.
LARGE = dict(n_layers=8, width=512, n_heads=8, n_kv_heads=4, head_dim=64, mlp_dim=1536, vocab_size=1024,
             seq_len=256, batch_size=8)
DEFAULT_STEPS = {"tiny": 20, "large": 8}
# dtype/remat_policy/layers. MaxText's remat_policy=none skips remat only with unrolled layers (under
# scan_layers it still recomputes the whole layer), so it is only listed unrolled.
MAXTEXT_VARIANTS = {
    "bf16/full/scan": dict(dtype="bfloat16", remat_policy="full", scan_layers="true"),  # MaxText's defaults
    "f32/full/scan": dict(dtype="float32", remat_policy="full", scan_layers="true"),
    "f32/full/unrolled": dict(dtype="float32", remat_policy="full", scan_layers="false"),
    "f32/none/unrolled": dict(dtype="float32", remat_policy="none", scan_layers="false"),
    "f32/minimal_with_context/scan": dict(dtype="float32", remat_policy="minimal_with_context",
                                          scan_layers="true"),
    "f32/minimal_with_context/unrolled": dict(dtype="float32", remat_policy="minimal_with_context",
                                              scan_layers="false"),
}
# The fastest overall and the fastest float32 setting in sweeps on these 2-core CPUs (--sweep_rounds).
DEFAULT_MAXTEXT = ("bf16/full/scan", "f32/full/scan")
_MAXTEXT_STEP = re.compile(r"completed step: (\d+), seconds: ([0-9.]+)")
_MAXTEXT_LOSS = re.compile(r"completed step: \d+,.* loss: ([0-9.naif]+)")


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    framework: str  # fmjax | maxtext
    settings: dict  # fmjax: config overrides (field -> value); maxtext: base.yml overrides
    root: pathlib.Path = ROOT  # fmjax: the checkout whose train_step.py and package run


def load_tiny_config():
    spec = importlib.util.spec_from_file_location("tiny_config", ROOT / TINY_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def shapes_from(config) -> dict[str, dict]:
    m = config.model
    tiny = dict(n_layers=m.n_layers, width=m.width, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
                head_dim=m.head_dim, mlp_dim=m.mlp_dim, vocab_size=m.vocab_size, seq_len=config.data.seq_len,
                batch_size=config.train.batch_size)
    return {"tiny": tiny, "large": LARGE}


def param_count(s: dict) -> int:
    """Parameters of the untied decoder (embedding + blocks + final norm + output head)."""
    attn = s["width"] * s["head_dim"] * (2 * s["n_heads"] + 2 * s["n_kv_heads"])
    per_layer = attn + 3 * s["width"] * s["mlp_dim"] + 2 * s["width"]
    return s["n_layers"] * per_layer + s["width"] + 2 * s["vocab_size"] * s["width"]


def cpu_env(**extra) -> dict:
    """The environment every run gets: CPU, one device (no forced host device count)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    flags = [f for f in env.pop("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    return env


def run(cmd, env, log_path: pathlib.Path, timeout: float) -> str:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, cwd=ROOT)
    log_path.write_text(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... exited {proc.returncode} after "
                           f"{time.perf_counter() - t:.0f}s; log: {log_path}\n{proc.stdout[-3000:]}")
    return proc.stdout


def fmjax_once(c: Contender, shape: dict, steps: int, tmp: pathlib.Path, tag: str, timeout: float) -> dict:
    overrides = {"model.n_layers": shape["n_layers"], "model.width": shape["width"],
                 "model.n_heads": shape["n_heads"], "model.n_kv_heads": shape["n_kv_heads"],
                 "model.head_dim": shape["head_dim"], "model.mlp_dim": shape["mlp_dim"],
                 "model.vocab_size": shape["vocab_size"], "model.dtype": "float32",
                 "data.seq_len": shape["seq_len"], "train.batch_size": shape["batch_size"], **c.settings}
    cmd = [sys.executable, str(c.root / TRAIN_STEP), "--config", str(c.root / TINY_CONFIG), "--steps", str(steps),
           "--workdir", str(tmp / "fmjax-work"), *[f"--config.{k}={v}" for k, v in overrides.items()]]
    env = cpu_env()
    if c.root != ROOT:  # another checkout (e.g. with a fix applied) shadows the installed fmjax package
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(c.root), env.get("PYTHONPATH", "")) if p)
    out = run(cmd, env, tmp / f"{tag}.log", timeout)
    result = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    return {"step_s": result["step_s"], "jax": result.get("jax"), "devices": result.get("devices"),
            "compile_s": result.get("compile_s")}


def maxtext_package_dir(python: str) -> str:
    out = subprocess.run([python, "-c", "import maxtext, os; print(os.path.dirname(maxtext.__file__))"],
                         stdout=subprocess.PIPE, text=True, check=True, env=cpu_env(DECOUPLE_GCLOUD="TRUE"))
    return out.stdout.strip().splitlines()[-1]


def maxtext_args(shape: dict, config, settings: dict, steps: int, out_dir: pathlib.Path, name: str) -> list[str]:
    m, o = config.model, config.optim
    args = dict(
        run_name=name, base_output_directory=out_dir, jax_cache_dir=out_dir / "jax_cache",
        hardware="cpu", skip_jax_distributed_system="true", dataset_type="synthetic",
        enable_checkpointing="false", enable_tensorboard="false", steps=steps, log_period=10_000,
        base_num_decoder_layers=shape["n_layers"], base_emb_dim=shape["width"],
        base_num_query_heads=shape["n_heads"], base_num_kv_heads=shape["n_kv_heads"], head_dim=shape["head_dim"],
        base_mlp_dim=shape["mlp_dim"], vocab_size=shape["vocab_size"], max_target_length=shape["seq_len"],
        per_device_batch_size=shape["batch_size"],  # one device: the global batch
        decoder_block="llama2",  # pre-RMSNorm, RoPE, grouped-query attention, SwiGLU (mlp_activations silu,linear)
        logits_via_embedding=str(bool(m.tie_embeddings)).lower(), weight_dtype="float32",
        normalization_layer_epsilon=m.norm_eps, rope_max_timescale=int(m.rope_theta),
        enable_dropout="false", dropout_rate=0.0, z_loss_multiplier=config.task.z_loss,
        opt_type="adamw", learning_rate=o.lr, adam_b1=o.b1, adam_b2=o.b2, adam_eps=o.eps,
        adam_weight_decay=o.weight_decay, gradient_clipping_threshold=o.clip_norm,
    )
    args.update(settings)
    return [f"{k}={v}" for k, v in args.items()]


def maxtext_once(c: Contender, shape: dict, steps: int, warmup: int, config, python: str, package: str,
                 tmp: pathlib.Path, tag: str, timeout: float) -> dict:
    out_dir = tmp / "maxtext-out"
    cmd = [python, "-m", "maxtext.trainers.pre_train.train", os.path.join(package, "configs", "base.yml"),
           *maxtext_args(shape, config, c.settings, warmup + steps, out_dir, tag)]
    out = run(cmd, cpu_env(DECOUPLE_GCLOUD="TRUE"), tmp / f"{tag}.log", timeout)
    shutil.rmtree(out_dir / tag, ignore_errors=True)
    seconds = {int(n): float(s) for n, s in _MAXTEXT_STEP.findall(out)}
    timed = [seconds[n] for n in range(warmup, warmup + steps) if n in seconds]
    if len(timed) != steps:
        raise RuntimeError(f"MaxText logged {len(seconds)} steps, expected {warmup + steps}; "
                           f"log: {tmp / tag}.log")
    version = re.search(r"Jax Version: (\S+)", out)
    devices = re.search(r"Num_devices: (\d+)", out)
    losses = _MAXTEXT_LOSS.findall(out)
    return {"step_s": statistics.median(timed), "jax": version and version.group(1),
            "devices": devices and int(devices.group(1)), "last_loss": losses and float(losses[-1])}


def measure_peak_gflops() -> float:
    """float32 matmul throughput of this CPU through XLA (jitted 2048 x 2048 jnp.dot), GFLOP/s."""
    code = ("import time, statistics, jax, jax.numpy as jnp\n"
            "x = jnp.ones((2048, 2048), jnp.float32); f = jax.jit(lambda a: a @ a); f(x).block_until_ready()\n"
            "ts = []\n"
            "for _ in range(10):\n"
            "    t = time.perf_counter(); f(x).block_until_ready(); ts.append(time.perf_counter() - t)\n"
            "print(2 * 2048**3 / statistics.median(ts) / 1e9)\n")
    out = subprocess.run([sys.executable, "-c", code], env=cpu_env(), stdout=subprocess.PIPE, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def emit(record: dict) -> None:
    print(json.dumps(record, default=str), flush=True)


def maxtext_contender(variant: str, extra: dict) -> Contender:
    return Contender(f"MaxText {variant}", "maxtext", {**MAXTEXT_VARIANTS[variant], **extra})


def fmjax_contender(spec: str) -> Contender:
    """NAME[:CHECKOUT[:FIELD=VALUE,...]] -> an fmjax contender."""
    name, root, overrides = (spec.split(":", 2) + ["", ""])[:3]
    settings = dict(o.split("=", 1) for o in overrides.split(",") if o)
    return Contender(f"fmjax {name}", "fmjax", settings, pathlib.Path(root).resolve() if root else ROOT)


def timed_run(c: Contender, shape: dict, steps: int, args, config, package: str, tmp, tag: str) -> dict:
    if c.framework == "fmjax":
        return fmjax_once(c, shape, steps, tmp, tag, args.timeout)
    return maxtext_once(c, shape, steps, args.warmup, config, args.maxtext_python, package, tmp, tag, args.timeout)


def rotating_rounds(contenders, rounds: int, measure) -> dict[str, list[float]]:
    """Step seconds of each contender per round; round i starts with contender i (mod n)."""
    times = {c.name: [] for c in contenders}
    for i in range(rounds):
        for c in contenders[i % len(contenders):] + contenders[:i % len(contenders)]:
            times[c.name].append(measure(c, i))
    return times


def dtype_of(c: Contender) -> str:
    return str(c.settings.get("dtype" if c.framework == "maxtext" else "model.dtype", "float32"))


def main(argv=None):
    args = parse_args(argv)
    if not os.path.exists(args.maxtext_python):
        sys.exit(f"no MaxText environment at {args.maxtext_python}: run experiments/bench/peers_setup.sh")
    config = load_tiny_config()
    all_shapes = shapes_from(config)
    names = [s for s in args.shapes.split(",") if s]
    if unknown := [s for s in names if s not in all_shapes]:
        sys.exit(f"--shapes: unknown {unknown}; valid: {sorted(all_shapes)}")
    if unknown := [v for v in args.maxtext if v not in MAXTEXT_VARIANTS]:
        sys.exit(f"--maxtext: unknown {unknown}; valid: {sorted(MAXTEXT_VARIANTS)}")
    started = time.perf_counter()
    tmp = pathlib.Path(args.keep_logs or tempfile.mkdtemp(prefix="fmjax-peers-"))
    tmp.mkdir(parents=True, exist_ok=True)
    package = maxtext_package_dir(args.maxtext_python)
    peak = measure_peak_gflops()
    emit({"kind": "cpu_peak", "gflops": peak})
    extra_mt = dict(kv.split("=", 1) for kv in args.maxtext_set)
    fmjax = [fmjax_contender("as configured::"), *map(fmjax_contender, args.fmjax)]
    summaries = []
    for name in names:
        shape = all_shapes[name]
        steps = args.steps or DEFAULT_STEPS[name]
        tokens = shape["batch_size"] * shape["seq_len"]
        info = {}

        def measure(c: Contender, i: int, prefix: str = "run") -> float:
            tag = re.sub(r"[^\w.=+-]", "_", f"{name}-{prefix}-{i}-{c.name}")
            r = timed_run(c, shape, steps, args, config, package, tmp, tag)
            info[c.name] = r
            emit({"kind": prefix, "shape": name, "contender": c.name, "round": i, **r,
                  "tokens_per_s": tokens / r["step_s"]})
            return r["step_s"]

        variants = list(args.maxtext or DEFAULT_MAXTEXT)
        if args.sweep_rounds:
            sweep = rotating_rounds([maxtext_contender(v, extra_mt) for v in MAXTEXT_VARIANTS],
                                    args.sweep_rounds, lambda c, i: measure(c, i, "sweep"))
            medians = {n.removeprefix("MaxText "): statistics.median(t) for n, t in sweep.items()}
            emit({"kind": "sweep_summary", "shape": name, "step_s": medians, "step_s_rounds": sweep})
            fastest_f32 = min((v for v in medians if v.startswith("f32")), key=medians.get)
            variants = list(dict.fromkeys([min(medians, key=medians.get), fastest_f32]))
        if not args.rounds:
            continue
        contenders = [*fmjax, *(maxtext_contender(v, extra_mt) for v in variants)]
        times = rotating_rounds(contenders, args.rounds, measure)
        results = []
        for c in contenders:
            step_s = statistics.median(times[c.name])
            results.append({"name": c.name, "framework": c.framework, "dtype": dtype_of(c),
                            "settings": c.settings, "root": str(c.root) if c.framework == "fmjax" else None,
                            "step_s": step_s,
                            "tokens_per_s": tokens / step_s, "step_s_rounds": times[c.name],
                            "jax": info[c.name]["jax"], "devices": info[c.name]["devices"]})
        best = min((r for r in results if r["framework"] == "maxtext"), key=lambda r: r["step_s"])
        for r in results:
            same = [m for m in results if m["framework"] == "maxtext" and m["dtype"] == r["dtype"]]
            r["ratio"] = r["tokens_per_s"] / best["tokens_per_s"]
            r["ratio_same_dtype"] = (r["tokens_per_s"] / min(same, key=lambda m: m["step_s"])["tokens_per_s"]
                                     if same else None)
        summary = {"kind": "summary", "shape": name, **shape, "params": param_count(shape), "timed_steps": steps,
                   "warmup_steps": args.warmup, "rounds": args.rounds, "maxtext_best": best["name"],
                   "ratio": results[0]["ratio"], "contenders": results}
        emit(summary)
        summaries.append(summary)
    emit({"kind": "cpu_peak", "gflops": measure_peak_gflops()})
    total_s = time.perf_counter() - started
    emit({"kind": "done", "seconds": total_s, "logs": str(tmp)})
    if summaries:
        print_table(summaries, args.rounds, args.warmup, peak, total_s)
    if not args.keep_logs:
        shutil.rmtree(tmp, ignore_errors=True)


def print_table(summaries, rounds: int, warmup: int, peak_gflops: float, total_s: float) -> None:
    print()
    for s in summaries:
        print(f"- {s['shape']}: {s['params'] / 1e6:.2f}M parameters, {s['n_layers']} layers x width "
              f"{s['width']}, {s['n_heads']} heads / {s['n_kv_heads']} kv heads x head dim {s['head_dim']}, "
              f"MLP {s['mlp_dim']}, vocab {s['vocab_size']}, seq {s['seq_len']} x batch {s['batch_size']}; "
              f"{s['timed_steps']} timed steps")
    print("\n| shape | contender | dtype | jax | step s | tokens/s | / MaxText best | / MaxText same dtype |")
    print("|---|---|---|---|---|---|---|---|")
    for s in summaries:
        for r in s["contenders"]:
            same = "" if r["ratio_same_dtype"] is None else f"{r['ratio_same_dtype']:.2f}x"
            print(f"| {s['shape']} | {r['name']} | {r['dtype']} | {r['jax']} | {r['step_s']:.3f} | "
                  f"{r['tokens_per_s']:,.0f} | {r['ratio']:.2f}x | {same} |")
    print(f"\nMedians of {rounds} rotating rounds of one run per contender, each the median of its timed "
          f"steps after {warmup} warm-up steps; one CPU device each; MaxText settings are "
          f"dtype/remat_policy/layers. CPU float32 matmul {peak_gflops:.0f} GFLOP/s at the start; "
          f"{total_s / 60:.1f} min.")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny,large", help="comma-separated, of: tiny, large")
    p.add_argument("--rounds", type=int, default=3, help="rotating rounds per shape (0: only the sweep)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per run (0: tiny 20, large 8)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per run (train_step.py runs 3)")
    p.add_argument("--fmjax", action="append", default=[], metavar="NAME[:CHECKOUT[:FIELD=VALUE,...]]",
                   help="another fmjax contender (repeatable): a checkout (empty: this one), e.g. a copy with a "
                        "fix applied, and config overrides, e.g. remat::model.remat=full")
    p.add_argument("--maxtext", action="append", default=[], metavar="VARIANT",
                   help=f"a MaxText setting to compare (repeatable; default {', '.join(DEFAULT_MAXTEXT)}), of: "
                        f"{', '.join(MAXTEXT_VARIANTS)}")
    p.add_argument("--maxtext_set", action="append", default=[], metavar="KEY=VALUE",
                   help="a further MaxText base.yml override for every MaxText run (repeatable)")
    p.add_argument("--sweep_rounds", type=int, default=0,
                   help="first time every MAXTEXT_VARIANT in this many rotating rounds per shape, then compare "
                        "against the fastest and the fastest float32 one (0: no sweep, use --maxtext)")
    p.add_argument("--maxtext_python", default=str(ROOT / ".venv-maxtext" / "bin" / "python"))
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--keep_logs", default="", help="a folder to keep every run's log in")
    args = p.parse_args(argv)
    if args.warmup != 3:
        p.error("--warmup must be 3: experiments/bench/train_step.py always runs 3 warm-up steps")
    return args


if __name__ == "__main__":
    main()
