"""Llama-style decoders of standard sizes, for benchmarks and scaling studies.

`--config configs/lm/llama.py:125m` (or 350m, 1b, 3b): the tiny config (configs/lm/tiny.py) with the
model, sequence length and batch of that size (bf16 compute, float32 parameters, remat). Training for
real needs a corpus and a tokenizer of model.vocab_size tokens (data.source, data.path,
data.tokenizer); experiments/bench/train_step.py runs them on synthetic batches.

| size | width | layers | heads | kv heads | mlp | parameters (vocab 32,000, untied) |
|---|---|---|---|---|---|---|
| 125m | 768 | 12 | 12 | 12 | 2048 | 134M (GPT-2 small class) |
| 350m | 1024 | 24 | 16 | 16 | 2816 | 373M |
| 1b | 2048 | 16 | 32 | 8 | 8192 | 1.10B (Llama 3.2 1B's shape) |
| 3b | 3072 | 28 | 24 | 8 | 8192 | 3.02B (Llama 3.2 3B's shape, vocab aside) |
"""
from configs.lm import tiny

SIZES = {  # width, layers, heads, kv heads, mlp
    "125m": (768, 12, 12, 12, 2048),
    "350m": (1024, 24, 16, 16, 2816),
    "1b": (2048, 16, 32, 8, 8192),
    "3b": (3072, 28, 24, 8, 8192),
}


def get_config(size: str = "125m"):
    if size not in SIZES:
        raise ValueError(f"configs/lm/llama.py:{size}: the sizes are {sorted(SIZES)}")
    c = tiny.get_config()
    width, layers, heads, kv_heads, mlp = SIZES[size]
    c.model.update(vocab_size=32_000, width=width, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                   head_dim=width // heads, mlp_dim=mlp, rope_theta=500_000.0, dtype="bfloat16",
                   remat="save_dots")
    c.data.seq_len = 2048
    c.train.update(batch_size=8, steps=10_000, eval_every=1000, ckpt_every=1000)
    c.eval.update(tasks=(), datasets=())
    return c
