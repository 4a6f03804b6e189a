"""Golden all-MiniLM-L6-v2 embeddings and token ids from real sentence-transformers (PyTorch).

tests/interop/hf_bert_test.py checks fmjax's import of the model against these. It runs outside
fmjax's venv, which has no torch (a CPU wheel, so no CUDA build is pulled in):

  python3 -m venv /tmp/stvenv && /tmp/stvenv/bin/pip install torch==2.13.0 sentence-transformers
  /tmp/stvenv/bin/python experiments/interop/minilm_reference.py --model "$(.venv/bin/python -c \
      'from fmjax.interop.minilm import find_package_model; print(find_package_model())')"

Rerun it (and commit the .npz) only when the sentences change: the model files are pinned.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model comes from a local folder; never a download

# Lengths from empty to past max_seq_length (256), punctuation, numbers, accents, other scripts,
# emoji (-> [UNK]), code and a URL, so the normaliser, pre-tokeniser, truncation and padding all count.
SENTENCES = [
    "",
    "Hello world",
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!!!",
    "Is this the real life? Is this just fantasy?",
    "Pi is approximately 3.14159, and e is about 2.71828.",
    "The invoice total was $1,234.56 (incl. 20% VAT), due 2024-03-15.",
    "Call +1 (555) 010-9999 or e-mail info@example.com before 5:30pm.",
    "Café, naïve, résumé, façade and jalapeño keep their accents in print.",
    "Straße, Übergröße and Ærøskøbing are hard for English vocabularies.",
    "Москва — столица России.",
    "Η γρήγορη καφέ αλεπού.",
    "東京は日本の首都です。",
    "北京欢迎你",
    "I love pizza 🍕 and sunshine ☀️!",
    "def embed(texts): return model.encode(texts, normalize_embeddings=True)",
    "See https://www.example.org/path?query=1&lang=en#section for details.",
    "\"Quoted,\" she said; 'single quotes' -- and an ellipsis...",
    "multiple    spaces\tand\ttabs\nand a newline",
    "Don't, won't, can't, shouldn't've.",
    "Unbelievably, the antidisestablishmentarianism debate continued.",
    "A dog runs through the grass in a park on a sunny afternoon while children play nearby.",
    "Transformers use self-attention to weigh the relevance of every token to every other token, "
    "which lets them model long-range dependencies without recurrence.",
    " ".join(f"Sentence number {i} talks about item-{i * 7} costing {i}.{i % 10}0 euros;" for i in range(1, 41)),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the all-MiniLM-L6-v2 folder (find_package_model())")
    parser.add_argument("--out", default="tests/interop/minilm_reference.npz")
    args = parser.parse_args()

    import sentence_transformers
    import torch
    import transformers

    model = sentence_transformers.SentenceTransformer(args.model, device="cpu")
    assert model.max_seq_length == 256, model.max_seq_length
    with torch.no_grad():
        embeddings = model.encode(SENTENCES, batch_size=8, convert_to_numpy=True, normalize_embeddings=False)
    # The golden vectors must be the pipeline's own output: the folder's modules normalise them.
    norms = np.linalg.norm(embeddings, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5), norms
    ids = [model.tokenizer(s, add_special_tokens=False)["input_ids"] for s in SENTENCES]
    assert len(ids[-1]) > 254, f"the long sentence has {len(ids[-1])} pieces; it must exceed max_seq_length"
    versions = (f"sentence-transformers {sentence_transformers.__version__}, transformers "
                f"{transformers.__version__}, torch {torch.__version__}")
    np.savez_compressed(args.out, sentences=np.array(SENTENCES), embeddings=embeddings.astype(np.float32),
                        ids=np.concatenate([np.asarray(x, np.int32) for x in ids]),
                        ids_offsets=np.cumsum([0] + [len(x) for x in ids]).astype(np.int32),
                        versions=np.array(versions))
    print(f"wrote {args.out}: {len(SENTENCES)} sentences, {os.path.getsize(args.out)} bytes; {versions}")


if __name__ == "__main__":
    main()
