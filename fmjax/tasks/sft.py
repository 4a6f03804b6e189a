"""Supervised fine-tuning (instruction tuning): the next-token loss on assistant tokens only.

The LM task's objective on the chat data layer (fmjax.data.chat): the same loss_mask-weighted
cross-entropy, so prompt tokens add exactly zero loss and zero gradient, and eval reports the
loss, perplexity and bits per byte of held-out responses. The parameters usually come from a
pretrained decoder (config.init_from), whose tokenizer the run takes
(tokenizer.finetune_tokenizer); from scratch, a tokenizer is trained on the conversations.
Samples: the replies to task.sample_prompts, each asked as a one-turn conversation.
"""
from __future__ import annotations

import os

import jax

from fmjax.data import chat, labelled, tokenizer as tokenizer_lib
from fmjax.tasks.lm import LMTask


def conversations_tokenizer(config, conversations: chat.Conversations) -> str:
    """A tokenizer trained on the text of every turn (cached); its path."""
    texts = [turn["content"] for c in conversations.train + conversations.validation for turn in c]
    return labelled.texts_tokenizer(config, texts, config.data.validation_fraction)


class SFTTask(LMTask):
    def __init__(self, config, tokenizer: tokenizer_lib.Tokenizer, conversations: chat.Conversations):
        super().__init__(config, tokenizer)
        self.template = chat.Template.from_config(config, tokenizer)
        self.conversations = conversations

    @classmethod
    def build(cls, config, workdir: str) -> "SFTTask":
        conversations = chat.validate(config, jax.process_count())
        config, tokenizer = tokenizer_lib.finetune_tokenizer(
            config, workdir, lambda: conversations_tokenizer(config, conversations))
        return cls(config, tokenizer, conversations)

    def train_iterator(self, process_index, process_count):
        return chat.make_train_iterator(self.config, self.tokenizer, self.template, self.conversations,
                                        process_index, process_count)

    def eval_batches(self, process_index, process_count):
        return chat.make_eval_batches(self.config, self.tokenizer, self.template, self.conversations,
                                      process_index, process_count)

    def write_samples(self, params, workdir, step):
        return write_chat_samples(self, self.decoder_params(params), workdir, step)


def write_chat_samples(task, params, workdir: str, step: int) -> str | None:
    """The replies of `params` to task.sample_prompts (one user turn each) in samples/step_<step>.txt.
    `task` has model, tokenizer, template and config (SFT and preference tasks)."""
    from fmjax.infer import chat as chat_infer
    cfg = task.config.task
    prompts = list(cfg.sample_prompts)
    if not prompts:
        return None
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    if task.config.data.system_prompt:
        conversations = [[{"role": "system", "content": task.config.data.system_prompt}, *c]
                         for c in conversations]
    replies = chat_infer.replies(task.model, params, task.tokenizer, task.template, conversations,
                                 max_new_tokens=cfg.sample_tokens, temperature=cfg.sample_temperature,
                                 seed=task.config.seed + step)
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    path = os.path.join(workdir, "samples", f"step_{step}.txt")
    with open(path, "w") as f:
        for prompt, reply in zip(prompts, replies):
            f.write(f"### user: {prompt}\n### assistant: {reply}\n\n")
    return path
