"""Tiny BERT-style encoder pretrained by masked-token prediction on the embedded corpus.

Shares the data section with configs/lm/tiny.py (Python's documentation topics, a sentencepiece
tokenizer with a <mask> piece). `--config.task.whole_word=True` masks whole words. After training,
`--config.mode=embed --config.task.embed_input=texts.txt` writes WORKDIR/embeddings.npy.
"""
from configs.lm import tiny as lm_tiny
from fmjax import config_lib


def get_config():
    c = config_lib.base_config()
    c.seed = 0

    c.model.name = "encoder"
    c.model.vocab_size = 1024
    c.model.width = 128
    c.model.n_layers = 4
    c.model.n_heads = 4
    c.model.head_dim = 32
    c.model.mlp_dim = 512
    c.model.max_len = 128  # longest input; >= data.seq_len
    # Rotary positions and pre-LN (as in ModernBERT) rather than BERT's learned table and post-LN:
    # with a learned table, masked-LM sits at the unigram plateau for hundreds of steps on this
    # small corpus, because attention must first learn what "next to" means from absolute positions.
    c.model.positions = "rope"  # rope | learned (BERT; what Hugging Face BERT weights need)
    c.model.rope_theta = 10_000.0
    c.model.type_vocab_size = 2
    c.model.norm = "pre"  # pre | post (BERT)
    c.model.norm_eps = 1e-12
    c.model.dropout = 0.0
    c.model.dtype = "float32"
    c.model.scan_layers = True
    c.model.remat = "none"
    c.model.attention = "xla"

    c.task.name = "mlm"
    c.task.mask_rate = 0.15  # of the real, non-special tokens
    c.task.whole_word = False
    c.task.sample_prompts = ("The [MASK] statement is used to iterate over a [MASK].",
                             "An exception is [MASK] when an error occurs.")
    # mode=embed: one text per line of a .txt (or data.text_field of a .jsonl) -> a float32 .npy
    c.task.embed_input = ""
    c.task.embed_output = ""  # "" = WORKDIR/embeddings.npy
    c.task.pooling = "mean"  # mean | cls
    c.task.normalize = True  # L2-normalise each vector

    c.data = lm_tiny.get_config().data

    c.optim.lr = 1e-3
    c.optim.warmup = 0.05
    c.optim.weight_decay = 0.01

    c.train.steps = 600
    c.train.batch_size = 16
    c.train.log_every = 10
    c.train.eval_every = 200
    c.train.eval_batches = 8
    c.train.ckpt_every = 100
    return c
