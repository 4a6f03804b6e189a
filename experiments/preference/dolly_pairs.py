"""Preference pairs from an instruction file: each record's own response is chosen, and the same
response with its words shuffled (a fixed seed) is rejected.

A known, learnable preference (fluent over scrambled text of the same words) to check that
preference tuning works end to end; real preference data comes from people or a judge. Why not
"another question's answer" as the rejected reply: then every response is chosen in one pair and
rejected in another, and a small model that cannot tell which answer fits which question learns
to push down whole responses, which then count against it where they are chosen (held-out reward
accuracy fell below 0.5 when we tried it).

  python experiments/preference/dolly_pairs.py ../shared/data/instruct/dolly15k_open_qa.jsonl runs/dolly_pairs.jsonl
"""
from __future__ import annotations

import json
import sys

import numpy as np


def pairs(records: list[dict], seed: int = 0) -> list[dict]:
    """{"prompt", "chosen", "rejected"} per record whose response has at least two distinct words."""
    rng = np.random.default_rng(seed)
    out = []
    for record in records:
        words = record["response"].split()
        if len(set(words)) < 2:
            continue
        shuffled = words
        while shuffled == words:
            shuffled = [words[i] for i in rng.permutation(len(words))]
        prompt = record["instruction"]
        if record.get("context", "").strip():
            prompt += "\n\n" + record["context"]
        out.append({"prompt": prompt, "chosen": record["response"], "rejected": " ".join(shuffled)})
    return out


def main(source: str, target: str):
    with open(source, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    made = pairs(records)
    with open(target, "w", encoding="utf-8") as f:
        for p in made:
            f.write(json.dumps(p) + "\n")
    print(f"wrote {len(made)} pairs ({len(records)} records) to {target}")


if __name__ == "__main__":
    main(*sys.argv[1:])
