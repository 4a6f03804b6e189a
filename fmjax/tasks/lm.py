"""Next-token prediction with a loss mask (pretraining and SFT share it), plus z-loss.

Loss normalisation is by tokens: the task returns sums and the step divides by the total number
of loss tokens of the whole (accumulated) batch, so packing, padding and masks weigh every real
token equally.

task.loss_chunk = C > 0 never holds the float32 logits of the whole batch: the model stops at
its hidden states, and the output projection, log-softmax and cross-entropy run C positions at a
time (lax.map over L / C chunks of B x C x V logits), each chunk rematerialised, so the backward
pass recomputes one chunk's logits at a time too. Same losses and gradients up to float32
rounding; it pays one more output projection per step for B x C x V instead of B x L x V floats.
Shapes: B batch, L sequence, C chunk, N chunks (L / C), D model width, V vocabulary.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.data import pipeline, tokenizer as tokenizer_lib
from fmjax.models import get_model
from fmjax.models.decoder import output_logits


def token_losses(logits_BxLxV, targets_BxL):
    """Per-token cross-entropy and log-partition (for z-loss), in float32."""
    logits = logits_BxLxV.astype(jnp.float32)
    log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
    return log_z_BxL - target_logit_BxL, log_z_BxL


def chunked_token_losses(project, hidden_BxLxD, targets_BxL, chunk: int):
    """token_losses(project(hidden), targets), with `project` (hidden B x C x D -> logits B x C x V)
    applied to `chunk` positions at a time; chunk must divide L."""
    b, length, d = hidden_BxLxD.shape
    n = length // chunk

    @jax.checkpoint  # keeps only the chunk's inputs: the backward pass recomputes its logits
    def losses(chunk_inputs):
        x_BxCxD, targets_BxC = chunk_inputs
        return token_losses(project(x_BxCxD), targets_BxC)

    # Chunks along L keep the batch axis (sharded over data / fsdp) whole in every chunk.
    x_NxBxCxD = jnp.swapaxes(hidden_BxLxD.reshape(b, n, chunk, d), 0, 1)
    targets_NxBxC = jnp.swapaxes(targets_BxL.reshape(b, n, chunk), 0, 1)
    ce_NxBxC, log_z_NxBxC = jax.lax.map(losses, (x_NxBxCxD, targets_NxBxC))
    return tuple(jnp.swapaxes(a, 0, 1).reshape(b, length) for a in (ce_NxBxC, log_z_NxBxC))


def packed_batch_spec(batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch fmjax.data.pipeline produces (packed rows of text), as shapes and dtypes."""
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dtype)
            for k, dtype in pipeline.BATCH_DTYPES.items()}


class LMTask:
    unit = "tokens"

    def __init__(self, config, tokenizer: tokenizer_lib.Tokenizer):
        model_config_cls, model_cls = get_model(config.model.name)
        self.config = config
        self.model_config = model_config_cls.from_config(config.model)
        self.model_config.validate()
        self.model = model_cls(self.model_config)
        self.tokenizer = tokenizer
        self.seq_len = config.data.seq_len
        self.z_loss = config.task.z_loss
        self.loss_chunk = config.task.loss_chunk
        if self.loss_chunk < 0 or (self.loss_chunk and self.seq_len % self.loss_chunk):
            raise ValueError(f"task.loss_chunk={self.loss_chunk} must be 0 (off) or a divisor of "
                             f"data.seq_len={self.seq_len}")
        self.token_bytes = jnp.asarray(tokenizer.token_bytes, jnp.float32)

    @classmethod
    def build(cls, config, workdir: str) -> "LMTask":
        return cls(config, tokenizer_lib.workdir_tokenizer(config, workdir))

    def abstract_batch(self, batch_size):
        return packed_batch_spec(batch_size, self.seq_len)

    def logits(self, params, batch):
        return self.model.apply({"params": params}, batch["inputs"], batch["positions"],
                                batch["segment_ids"])

    def token_losses(self, params, batch):
        """Per-token (cross-entropy, log Z) of the batch, B x L each (chunked: task.loss_chunk)."""
        if not self.loss_chunk:
            return token_losses(self.logits(params, batch), batch["targets"])
        hidden_BxLxD = self.model.apply({"params": params}, batch["inputs"], batch["positions"],
                                        batch["segment_ids"], hidden_only=True)
        return chunked_token_losses(lambda x_BxCxD: output_logits(self.model_config, params, x_BxCxD),
                                    hidden_BxLxD, batch["targets"], self.loss_chunk)

    def loss(self, params, batch, rng):
        del rng  # the decoder has no dropout
        ce_BxL, log_z_BxL = self.token_losses(params, batch)
        mask_BxL = batch["loss_mask"]
        ce_sum = jnp.sum(ce_BxL * mask_BxL)
        z_sum = jnp.sum(jnp.square(log_z_BxL) * mask_BxL)
        return ce_sum + self.z_loss * z_sum, {"weight": jnp.sum(mask_BxL), "loss": ce_sum, "z_loss": z_sum}

    def eval_sums(self, params, batch):
        ce_BxL, _ = self.token_losses(params, batch)
        mask_BxL = batch["loss_mask"]
        return {"nats": jnp.sum(ce_BxL * mask_BxL), "tokens": jnp.sum(mask_BxL),
                "bytes": jnp.sum(self.token_bytes[batch["targets"]] * mask_BxL)}

    def eval_results(self, sums):
        loss = float(sums["nats"] / sums["tokens"])
        return {"loss": loss, "perplexity": math.exp(loss),
                "bits_per_byte": float(sums["nats"] / math.log(2) / sums["bytes"]),
                "tokens": int(sums["tokens"]), "bytes": int(sums["bytes"])}

    def decoder_params(self, params):
        """The decoder's parameters (what chat, samples and benchmark scoring run)."""
        return params

    def units_per_example(self):
        return self.seq_len

    def flops_per_unit(self):
        return self.model_config.flops_per_token(self.seq_len)

    def train_iterator(self, process_index, process_count):
        return pipeline.make_train_iterator(self.config, self.tokenizer, process_index, process_count)

    def eval_batches(self, process_index, process_count):
        return pipeline.make_eval_batches(self.config, self.tokenizer, process_index, process_count)

    def write_samples(self, params, workdir, step):
        from fmjax.infer import generate
        cfg = self.config.task
        prompts = list(cfg.sample_prompts)
        if not prompts:
            return None
        rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), step)
        texts = generate.generate(self.model, params, self.tokenizer, prompts, max_new_tokens=cfg.sample_tokens,
                                  temperature=cfg.sample_temperature, top_k=cfg.sample_top_k,
                                  top_p=cfg.sample_top_p, seed=rng)
        os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
        path = os.path.join(workdir, "samples", f"step_{step}.txt")
        with open(path, "w") as f:
            for prompt, text in zip(prompts, texts):
                f.write(f"### prompt: {prompt}\n{text}\n\n")
        return path
