"""Benchmark: data-preparation throughput (fmjax.data.prepare) on Beam's DirectRunner.

Prepares the config's pile into a temporary piles_dir once per worker count (in-process for 1,
multi-process for more), each from scratch, and reports wall time, input documents/s and MB/s.
Prints one JSON line per run, then a Markdown table.

  python experiments/bench/prepare.py --config configs/data/shared_text.py --workers 1,2
"""
from __future__ import annotations

import json
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from fmjax.data.prepare import pile

_CONFIG = config_flags.DEFINE_config_file("config", "configs/data/shared_text.py", "A mode=prepare config.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "DirectRunner worker counts to time (1 = in-process).")


def main(argv):
    del argv
    rows = []
    for workers in map(int, _WORKERS.value):
        config = _CONFIG.value.copy_and_resolve_references()
        config.data.prepare.num_workers = workers
        config.data.prepare.tokenizer.vocab_size = 0  # time the pipeline, not sentencepiece
        with tempfile.TemporaryDirectory() as tmp:
            config.data.piles_dir = tmp
            start = time.perf_counter()
            m = pile.manifest(pile.prepare(config))
            seconds = time.perf_counter() - start
        row = {"workers": workers, "seconds": round(seconds, 2), "documents": m["input"]["documents"],
               "mb": round(m["input"]["bytes"] / 1e6, 2), "docs_per_s": round(m["input"]["documents"] / seconds, 1),
               "mb_per_s": round(m["input"]["bytes"] / 1e6 / seconds, 3), "kept": m["output"]["documents"],
               "version": m["version"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| workers | seconds | documents | MB | docs/s | MB/s | kept |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['seconds']} | {r['documents']} | {r['mb']} | {r['docs_per_s']} | "
              f"{r['mb_per_s']} | {r['kept']} |")


if __name__ == "__main__":
    app.run(main)
