"""Tiny Llama-style decoder on the embedded corpus (Python's bundled documentation topics).

Trains in a few minutes on 2 CPU cores (`make demo`); every field can be overridden from the
command line, e.g. `--config.train.steps=50 --config.mesh.fsdp=4 --config.mesh.tensor=2`.
Every evaluation also runs the built-in cloze benchmark on held-out documentation, 16 questions
on Python keywords and, where ../shared/data is beside the repository, WikiText-2 test perplexity
and bits per byte.
"""
import pathlib

from fmjax import config_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
KEYWORDS = ROOT / "experiments" / "eval" / "python_keywords.jsonl"
WIKITEXT2 = ROOT.parent / "shared" / "data" / "text" / "wikitext2_test.tokens.txt"


def get_config():
    c = config_lib.base_config()
    c.seed = 0

    c.model.name = "decoder"
    c.model.vocab_size = 1024
    c.model.width = 128
    c.model.n_layers = 4
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.head_dim = 32
    c.model.mlp_dim = 384
    c.model.tie_embeddings = False
    c.model.rope_theta = 10_000.0
    c.model.norm_eps = 1e-6
    c.model.dtype = "float32"  # compute dtype (bfloat16: mixed precision); parameters stay float32
    c.model.scan_layers = True
    # What the backward pass keeps of each layer (the rest is recomputed): none (no remat) | full
    # (the layer's input only) | save_dots (matmul outputs) | save_dots_and_context (and attention outputs)
    c.model.remat = "none"
    # xla | cudnn: cuDNN flash attention on GPUs with bfloat16 / float16 compute; elsewhere (or where
    # cuDNN cannot take the shapes) XLA's, with the reason logged once (fmjax/nn/attention.py)
    c.model.attention = "xla"

    c.task.name = "lm"
    c.task.z_loss = 1e-4  # coefficient of log(Z)^2, keeps logits from drifting
    # > 0: the output projection and loss run this many positions at a time, so the float32 logits of
    # the whole batch (B x L x V) never exist, in the backward pass either; must divide data.seq_len
    c.task.loss_chunk = 0
    c.task.sample_prompts = ("The for statement", "A class definition", "Exceptions are")  # a tuple: overridable
    c.task.sample_tokens = 48
    c.task.sample_temperature = 0.7  # 0: greedy
    c.task.sample_top_k = 0  # 0: off
    c.task.sample_top_p = 1.0  # nucleus sampling; 1: off

    c.data.source = "pydoc"  # pydoc | text | jsonl | tfds | pile
    c.data.path = ""  # the .txt / .jsonl file for source=text|jsonl
    c.data.text_field = "text"
    # source=text|jsonl: a line that is not UTF-8, not JSON or has no string text_field fails the
    # run naming file:line; True skips such lines instead, reporting how many and the first.
    c.data.skip_bad_records = False
    c.data.tfds_name = ""  # e.g. "lm1b" for source=tfds
    c.data.pile = ""  # source=pile: "<name>@<version>" or "<name>@latest" (mode=prepare makes piles)
    c.data.piles_dir = "piles"
    c.data.doc_separator = ""  # "" = blank-line separated documents
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.validation_fraction = 0.05
    c.data.seq_len = 128
    c.data.cache_dir = ""  # "" = $FMJAX_CACHE_DIR or ~/.cache/fmjax
    c.data.tokenizer = ""  # "" = train a sentencepiece model on the train split (cached)
    c.data.tokenizer_type = "bpe"
    c.data.read_threads = 0

    c.optim.lr = 3e-3
    c.optim.warmup = 0.05
    c.optim.weight_decay = 0.1

    c.train.steps = 600
    c.train.batch_size = 16
    c.train.microbatches = 1
    c.train.log_every = 10
    c.train.eval_every = 300
    c.train.eval_batches = 8
    c.train.ckpt_every = 100

    c.eval.tasks = ("cloze", str(KEYWORDS))  # fmjax/eval/harness.py; experiments/eval/README.md
    c.eval.datasets = (f"wikitext:{WIKITEXT2}",) if WIKITEXT2.exists() else ()
    return c
