"""The benchmark suite: experiments/bench/train_step.py for each model family and size, one process per
result; prints the JSON lines and a Markdown table (the one docs/performance.md keeps).

  python experiments/bench/suite.py                 # the cases of this machine's platform
  python experiments/bench/suite.py --cases gpu --out results.jsonl

The CPU cases fit a laptop (a few minutes); the GPU cases are the sizes of issue 9's targets.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LLAMA = ["--stand_in_tokenizer"]
CASES = {
    "cpu": [
        ("decoder tiny (1M)", ["--config", "configs/lm/tiny.py", "--data", "pipeline"]),
        ("decoder 125m, seq 512", ["--config", "configs/lm/llama.py:125m", *LLAMA, "--config.data.seq_len=512",
                                   "--config.train.batch_size=4", "--config.model.dtype=float32", "--steps", "5"]),
        ("encoder tiny", ["--config", "configs/encoder/tiny.py", "--data", "pipeline"]),
        ("U-Net digits", ["--config", "configs/diffusion/digits.py", "--data", "pipeline"]),
    ],
    "gpu": [
        ("decoder tiny (1M)", ["--config", "configs/lm/tiny.py", "--data", "pipeline", "--config.train.batch_size=256"]),
        ("decoder 125m, seq 1024", ["--config", "configs/lm/llama.py:125m", *LLAMA, "--config.data.seq_len=1024",
                                    "--config.train.batch_size=32"]),
        ("decoder 350m, seq 2048", ["--config", "configs/lm/llama.py:350m", *LLAMA, "--config.train.batch_size=16"]),
        ("decoder 1b, seq 2048", ["--config", "configs/lm/llama.py:1b", *LLAMA, "--config.train.batch_size=8"]),
        ("decoder 3b, seq 2048", ["--config", "configs/lm/llama.py:3b", *LLAMA, "--config.train.batch_size=4",
                                  "--config.model.remat=full"]),
        ("encoder tiny", ["--config", "configs/encoder/tiny.py", "--data", "pipeline", "--config.train.batch_size=256"]),
        ("U-Net digits", ["--config", "configs/diffusion/digits.py", "--data", "pipeline",
                          "--config.train.batch_size=512"]),
    ],
}


def run_case(name: str, args: list[str], steps: int) -> dict:
    command = [sys.executable, "experiments/bench/train_step.py", "--name", name, "--steps", str(steps), *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        return {"name": name, "error": (result.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def table(results: list[dict]) -> str:
    rows = ["| case | params | devices | compile s | step ms | tokens or images /s /device | MFU | memory GiB | data wait ms |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['name']} | failed: {r['error']} |||||||")
            continue
        rate = next(v for k, v in r.items() if k.endswith("_per_s_per_device"))
        wait = f"{1e3 * r['data_wait_s']:.1f}" if "data_wait_s" in r else "synthetic"
        rows.append(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['devices']} x {r['device']} | {r['compile_s']:.1f} "
                    f"| {1e3 * r['step_s']:.1f} | {rate:,.0f} | {100 * r['mfu']:.1f}% "
                    f"| {r['memory_gib']:.2f} ({r['memory_kind']}) | {wait} |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", choices=sorted(CASES), default=None, help="default: gpu if one is visible")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", help="append the JSON lines to this file")
    args = parser.parse_args()
    if args.cases is None:
        import jax
        args.cases = "gpu" if jax.default_backend() == "gpu" else "cpu"
    results = []
    for name, case_args in CASES[args.cases]:
        results.append(run_case(name, case_args, args.steps))
        print(json.dumps(results[-1]), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(results[-1]) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
