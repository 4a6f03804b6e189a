"""Masked-token prediction (BERT pretraining) on the packed rows of the LM data pipeline.

Masking happens inside the jitted step, from the step's key, so a resumed run masks exactly as
the uninterrupted one: `task.mask_rate` of the real, non-special tokens (or of whole words) are
chosen; of those 80% become <mask>, 10% a random token and 10% stay. The loss sums over chosen
tokens and the trainer divides by their count, so packing, padding and microbatches weigh every
prediction equally. Shapes: B batch, L sequence, V vocabulary.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.data import pipeline, tokenizer as tokenizer_lib
from fmjax.models.encoder import EncoderConfig, EncoderMLM
from fmjax.tasks.lm import packed_batch_spec, token_losses

MASK_MARKER = "[MASK]"  # in task.sample_prompts


class MLMTask:
    unit = "tokens"

    def __init__(self, config, tokenizer):
        self.config = config
        self.model_config = EncoderConfig.from_config(config.model)
        self.model_config.validate()
        if tokenizer.mask_id is None:
            raise ValueError(f"data.tokenizer={config.data.tokenizer!r} has no mask piece; masked-LM "
                             f"needs one (tokenizers fmjax trains have {tokenizer_lib.MASK_PIECE!r})")
        if config.data.seq_len > self.model_config.max_len:
            raise ValueError(f"data.seq_len={config.data.seq_len} exceeds model.max_len="
                             f"{self.model_config.max_len} (the learned position table)")
        if not 0 < config.task.mask_rate < 1:
            raise ValueError(f"task.mask_rate={config.task.mask_rate} must be in (0, 1)")
        self.model = EncoderMLM(self.model_config)
        self.tokenizer = tokenizer
        self.seq_len = config.data.seq_len
        special = np.zeros(tokenizer.vocab_size, bool)
        special[[tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id]] = True
        self.special = jnp.asarray(special)
        self.word_start = jnp.asarray(tokenizer.word_start)

    @classmethod
    def build(cls, config, workdir: str) -> "MLMTask":
        return cls(config, tokenizer_lib.workdir_tokenizer(config, workdir))

    def abstract_batch(self, batch_size):
        return packed_batch_spec(batch_size, self.seq_len)

    def corrupt(self, batch, rng):
        """(corrupted inputs B x L, float32 weights B x L: 1 where the model must restore the token)."""
        inputs_BxL, segments_BxL = batch["inputs"], batch["segment_ids"]
        eligible_BxL = (segments_BxL > 0) & ~self.special[inputs_BxL]
        select_key, action_key, random_key = jax.random.split(rng, 3)
        u_BxL = jax.random.uniform(select_key, inputs_BxL.shape)
        if self.config.task.whole_word:  # every piece of a word takes its first piece's draw
            new_segment_BxL = segments_BxL != jnp.pad(segments_BxL, ((0, 0), (1, 0)))[:, :-1]
            starts_BxL = self.word_start[inputs_BxL] | new_segment_BxL
            index_BxL = jnp.broadcast_to(jnp.arange(inputs_BxL.shape[1]), inputs_BxL.shape)
            word_start_BxL = jax.lax.cummax(jnp.where(starts_BxL, index_BxL, 0), axis=1)
            u_BxL = jnp.take_along_axis(u_BxL, word_start_BxL, axis=1)
        chosen_BxL = eligible_BxL & (u_BxL < self.config.task.mask_rate)
        action_BxL = jax.random.uniform(action_key, inputs_BxL.shape)
        random_BxL = jax.random.randint(random_key, inputs_BxL.shape, 0, self.tokenizer.vocab_size)
        corrupted_BxL = jnp.where(chosen_BxL & (action_BxL < 0.8), self.tokenizer.mask_id,
                                  jnp.where(chosen_BxL & (action_BxL < 0.9), random_BxL, inputs_BxL))
        return corrupted_BxL, chosen_BxL.astype(jnp.float32)

    def _predict(self, params, batch, rng, deterministic: bool):
        corrupted_BxL, weights_BxL = self.corrupt(batch, rng)
        logits_BxLxV = self.model.apply(
            {"params": params}, corrupted_BxL, batch["segment_ids"], batch["positions"],
            deterministic=deterministic, rngs=None if deterministic else {"dropout": jax.random.fold_in(rng, 1)})
        ce_BxL, _ = token_losses(logits_BxLxV, batch["inputs"])
        correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == batch["inputs"]).astype(jnp.float32)
        return ce_BxL, correct_BxL, weights_BxL

    def loss(self, params, batch, rng):
        ce_BxL, correct_BxL, w_BxL = self._predict(params, batch, jax.random.fold_in(rng, 0), False)
        ce_sum = jnp.sum(ce_BxL * w_BxL)
        return ce_sum, {"weight": jnp.sum(w_BxL), "loss": ce_sum, "accuracy": jnp.sum(correct_BxL * w_BxL)}

    def eval_sums(self, params, batch):
        # A fixed masking key: every evaluation of a run scores the same masked positions.
        rng = jax.random.PRNGKey(self.config.seed)
        ce_BxL, correct_BxL, w_BxL = self._predict(params, batch, rng, True)
        targets_hist_V = jnp.zeros(self.tokenizer.vocab_size).at[batch["inputs"].reshape(-1)].add(w_BxL.reshape(-1))
        return {"nats": jnp.sum(ce_BxL * w_BxL), "correct": jnp.sum(correct_BxL * w_BxL),
                "masked": jnp.sum(w_BxL), "targets_hist": targets_hist_V}

    def eval_results(self, sums):
        masked = float(sums["masked"])
        loss = float(sums["nats"]) / masked
        return {"loss": loss, "perplexity": math.exp(loss), "accuracy": float(sums["correct"]) / masked,
                # the best any single fixed guess scores on these masked tokens: the bar to beat
                "unigram_accuracy": float(np.max(sums["targets_hist"])) / masked, "masked_tokens": int(masked)}

    def units_per_example(self):
        return self.seq_len

    def flops_per_unit(self):
        head = 6.0 * (self.model_config.width ** 2 + self.model_config.width * self.model_config.vocab_size)
        return self.model_config.flops_per_token(self.seq_len) + head

    def train_iterator(self, process_index, process_count):
        return pipeline.make_train_iterator(self.config, self.tokenizer, process_index, process_count)

    def eval_batches(self, process_index, process_count):
        return pipeline.make_eval_batches(self.config, self.tokenizer, process_index, process_count)

    def write_samples(self, params, workdir, step):
        """Fills the [MASK] slots of task.sample_prompts with the model's top prediction."""
        prompts = list(self.config.task.sample_prompts)
        if not prompts:
            return None
        tok = self.tokenizer
        rows = []
        for prompt in prompts:
            ids = [tok.bos_id]
            for i, piece in enumerate(prompt.split(MASK_MARKER)):
                ids += ([tok.mask_id] if i else []) + tok.encode(piece.strip())
            rows.append(ids + [tok.eos_id])
        length = max(map(len, rows))
        inputs = np.full((len(rows), length), tok.pad_id, np.int32)
        segments = np.zeros_like(inputs)
        for r, ids in enumerate(rows):
            inputs[r, :len(ids)], segments[r, :len(ids)] = ids, 1
        logits = jax.jit(self.model.apply)({"params": params}, inputs, segments)
        filled = np.where(inputs == tok.mask_id, np.asarray(jnp.argmax(logits, axis=-1)), inputs)
        os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
        path = os.path.join(workdir, "samples", f"step_{step}.txt")
        with open(path, "w") as f:
            for prompt, ids, row in zip(prompts, rows, filled):
                f.write(f"### prompt: {prompt}\n{tok.decode(row[1:len(ids) - 1].tolist())}\n\n")
        return path
