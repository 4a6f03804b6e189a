"""Instruction tuning (SFT) of the tiny decoder on Dolly's open_qa records.

The data is ../shared/data/instruct/dolly15k_open_qa.jsonl beside the repository (3,742
instruction / response pairs). Pretrain, then tune from the pretraining workdir:

  make demo                                   # configs/lm/tiny.py -> runs/demo
  python -m fmjax.main --config configs/sft/dolly_tiny.py --workdir runs/sft \\
      --config.init_from=runs/demo
  python -m fmjax.main --config configs/sft/dolly_tiny.py --workdir runs/sft --config.mode=chat

init_from also brings the tokenizer (runs/demo/tokenizer.model; see finetune_file in
fmjax/data/tokenizer.py). Only assistant tokens are trained (fmjax/data/chat.py); eval reports the
held-out response loss. With init_from empty the model trains from scratch, with a tokenizer
trained on the conversations. LoRA instead of full tuning: --config.optim.lora.rank=8.
Other data: --config.data.path=x.jsonl with "messages" lists or instruction / context / response.
"""
import pathlib

from configs.lm import tiny as lm_tiny
from fmjax import config_lib
from fmjax.data import chat, tokenizer

DOLLY = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "instruct" / "dolly15k_open_qa.jsonl"


def get_config():
    c = config_lib.base_config()
    c.seed = 0
    c.init_from = ""  # e.g. runs/demo: a workdir of configs/lm/tiny.py

    c.model = lm_tiny.get_config().model  # must be the pretrained model's shape

    c.task.name = "sft"
    c.task.z_loss = 1e-4
    c.task.loss_chunk = 0  # > 0: the loss projects this many positions at a time (configs/lm/tiny.py)
    c.task.sample_prompts = ("What is a polygon?", "Why is the sky blue?", "Who wrote Hamlet?")
    c.task.sample_tokens = 64
    c.task.sample_temperature = 0.0  # greedy replies

    c.data.path = str(DOLLY)
    c.data.system_prompt = ""  # opens every conversation without a system turn when set
    c.data.chat = dict(zip(chat.MARKERS, tokenizer.CHAT_PIECES))  # the pieces of the template's markers
    c.data.validation_fraction = 0.05  # conversations held out (by hash) for eval
    c.data.eval_split = "validation"  # the name eval results are reported under
    c.data.seq_len = 256
    c.data.cache_dir = ""  # "" = $FMJAX_CACHE_DIR or ~/.cache/fmjax
    c.data.tokenizer = ""  # "" = init_from's tokenizer (or, from scratch, one trained on the data)
    c.data.tokenizer_type = "bpe"
    c.data.read_threads = 0

    c.optim.lr = 1e-3
    c.optim.warmup = 0.05
    c.optim.weight_decay = 0.0

    c.train.steps = 300
    c.train.batch_size = 16
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.eval_batches = 8
    c.train.ckpt_every = 100
    return c
