"""Which corpus does a passage come from? The tiny encoder fine-tuned as a 4-way classifier.

The classes are the offline corpora in ../shared/data/text beside the repository (Shakespeare,
TinyStories, War and Peace, WikiText-2 valid + test as one class), cut into balanced passages.
Pretrain, then fine-tune from the pretraining workdir:

  python -m fmjax.main --config configs/encoder/tiny.py --workdir runs/encoder
  python -m fmjax.main --config configs/encoder/classify_domains.py --workdir runs/classify \\
      --config.init_from=runs/encoder

init_from also chooses the tokenizer (runs/encoder/tokenizer.model, the one the encoder knows; see
finetune_file in fmjax/data/tokenizer.py). Left empty, the classifier trains from scratch with a tokenizer trained
on the train passages. Other labelled data: --config.data.source=jsonl --config.data.path=x.jsonl.
"""
import pathlib

from configs.encoder import tiny as encoder_tiny
from fmjax import config_lib

TEXT = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "text"


def get_config():
    c = config_lib.base_config()
    c.seed = 0
    c.init_from = ""  # e.g. runs/encoder: a workdir of configs/encoder/tiny.py

    c.model = encoder_tiny.get_config().model
    c.model.dropout = 0.1

    c.task.name = "classify"
    # One label per file of data.paths (files that share a label form one class); () = file stems.
    # Tuples, so that the command line can set them: --config.data.paths='("a.txt", "b.txt")'.
    c.task.labels = ("shakespeare", "tinystories", "war_and_peace", "wikitext", "wikitext")
    # mean | cls (BERT's tanh pooler on [bos]). Masked-LM never trains the [bos] output to sum up the
    # passage, so from an MLM encoder cls fine-tunes worse than from scratch; mean does better.
    c.task.pooling = "mean"
    c.task.sample_count = 8  # validation passages written to samples/ with their predicted label

    c.data.source = "domains"  # domains | jsonl
    c.data.paths = tuple(str(TEXT / name) for name in ("tinyshakespeare.txt", "tinystories_sample.txt",
                                                       "war_and_peace.txt", "wikitext2_valid.tokens.txt",
                                                       "wikitext2_test.tokens.txt"))
    c.data.path = ""  # the .jsonl file for source=jsonl
    c.data.text_field = "text"
    c.data.label_field = "label"
    c.data.passage_chars = 256
    c.data.max_per_class = 2000  # balanced: every class keeps min(this, the smallest class); 0: no cap
    c.data.train_split = "train"
    c.data.eval_split = "validation"  # every validation example is evaluated (train.eval_batches unused)
    c.data.validation_fraction = 0.1
    c.data.seq_len = 96
    c.data.cache_dir = ""  # "" = $FMJAX_CACHE_DIR or ~/.cache/fmjax
    c.data.tokenizer = ""  # "" = init_from's tokenizer.model, else trained on the train passages
    c.data.tokenizer_type = "bpe"
    c.data.read_threads = 0

    c.optim.lr = 1e-3  # tiny encoders fine-tune poorly at BERT-sized rates (3e-4 and below)
    c.optim.warmup = 0.1
    c.optim.weight_decay = 0.01

    c.train.steps = 300
    c.train.batch_size = 32
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.ckpt_every = 100
    return c
