"""Preference tuning: DPO, IPO and conservative DPO, against a frozen reference model.

For a pair (prompt x, chosen reply c, rejected reply r), with log-probabilities summed over the
reply tokens (and the end-of-turn marker) of the policy pi and the reference pi_ref:

  reward(y) = beta * (log pi(y|x) - log pi_ref(y|x));   h = reward(c) - reward(r)
  dpo   -log sigmoid(h)                                          (Rafailov et al., 2023)
        with task.label_smoothing = e > 0, conservative DPO:
        -(1 - e) log sigmoid(h) - e log sigmoid(-h)              (Mitchell, 2023)
  ipo   (h / beta - 1 / (2 beta))^2                              (Azar et al., 2023)

Metrics (per pair): loss, reward_accuracy (reward(c) > reward(r)), margin (reward(c) -
reward(r)), chosen_reward, rejected_reward. With policy = reference every reward is 0, and the
DPO loss is log 2.

The parameters are {"policy": trained, "reference": frozen} (trainable: no optimizer state for
the reference); both start from config.init_from (pretrained_slots), usually an SFT workdir,
whose tokenizer the run takes. Checkpoints hold both. Shapes: B batch (pairs), L sequence.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.data import chat, labelled, preference, tokenizer as tokenizer_lib
from fmjax.models import get_model
from fmjax.tasks.lm import token_losses
from fmjax.tasks.sft import write_chat_samples

LOSSES = ("dpo", "ipo")


def pair_losses(h_B, beta: float, loss_type: str, label_smoothing: float = 0.0):
    """The per-pair objective of the reward difference h (see the module docstring)."""
    if loss_type == "ipo":
        return jnp.square(h_B / beta - 1.0 / (2.0 * beta))
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(h_B) - label_smoothing * jax.nn.log_sigmoid(-h_B)


class PreferenceTask:
    unit = "examples"
    pretrained_slots = ("policy", "reference")

    def __init__(self, config, tokenizer: tokenizer_lib.Tokenizer, pairs):
        model_config_cls, model_cls = get_model(config.model.name)
        self.config = config
        self.model_config = model_config_cls.from_config(config.model)
        self.model_config.validate()
        cfg = config.task
        if cfg.loss not in LOSSES:
            raise ValueError(f"task.loss={cfg.loss!r}; valid: {list(LOSSES)}")
        if cfg.beta <= 0:
            raise ValueError(f"task.beta={cfg.beta} must be > 0")
        if not 0 <= cfg.label_smoothing < 0.5:
            raise ValueError(f"task.label_smoothing={cfg.label_smoothing} must be in [0, 0.5)")
        self.model = model_cls(self.model_config)
        self.tokenizer = tokenizer
        self.template = chat.Template.from_config(config, tokenizer)
        self.train_pairs, self.validation_pairs = pairs
        self.seq_len = config.data.seq_len

    @classmethod
    def build(cls, config, workdir: str) -> "PreferenceTask":
        pairs = preference.validate(config, jax.process_count())

        def scratch():
            texts = [t for p in pairs[0] + pairs[1] for t in (*(m["content"] for m in p.prompt), p.chosen, p.rejected)]
            return labelled.texts_tokenizer(config, texts, config.data.validation_fraction)
        config, tokenizer = tokenizer_lib.finetune_tokenizer(config, workdir, scratch)
        return cls(config, tokenizer, pairs)

    def abstract_batch(self, batch_size):
        batch = {f"{side}_{k}": jax.ShapeDtypeStruct((batch_size, self.seq_len), jnp.float32 if k == "loss_mask"
                                                     else jnp.int32)
                 for side in preference.SIDES for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
        batch["weight"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
        return batch

    def init_params(self, rng, batch):
        params = self.model.init(rng, batch["chosen_inputs"])["params"]
        return {"policy": params, "reference": params}

    def trainable(self, params):
        return {"policy": jax.tree.map(lambda _: True, params["policy"]),
                "reference": jax.tree.map(lambda _: False, params["reference"])}

    def _log_probs(self, params, batch):
        """(chosen, rejected) summed reply log-probabilities, each B; one model call on both halves."""
        def both(key):
            return jnp.concatenate([batch[f"{side}_{key}"] for side in preference.SIDES])
        logits = self.model.apply({"params": params}, both("inputs"), both("positions"), both("segment_ids"))
        ce_2BxL, _ = token_losses(logits, both("targets"))
        log_probs_2B = -jnp.sum(ce_2BxL * both("loss_mask"), axis=-1)
        return jnp.split(log_probs_2B, 2)

    def _sums(self, params, batch):
        cfg = self.config.task
        policy_c, policy_r = self._log_probs(params["policy"], batch)
        reference_c, reference_r = self._log_probs(jax.lax.stop_gradient(params["reference"]), batch)
        chosen_B, rejected_B = cfg.beta * (policy_c - reference_c), cfg.beta * (policy_r - reference_r)
        losses_B = pair_losses(chosen_B - rejected_B, cfg.beta, cfg.loss, cfg.label_smoothing)
        w_B = batch["weight"]
        return {"weight": jnp.sum(w_B), "loss": jnp.sum(losses_B * w_B),
                "reward_accuracy": jnp.sum((chosen_B > rejected_B) * w_B),
                "margin": jnp.sum((chosen_B - rejected_B) * w_B),
                "chosen_reward": jnp.sum(chosen_B * w_B), "rejected_reward": jnp.sum(rejected_B * w_B)}

    def loss(self, params, batch, rng):
        del rng  # the decoder has no dropout
        sums = self._sums(params, batch)
        return sums["loss"], sums

    def eval_sums(self, params, batch):
        return self._sums(params, batch)

    def eval_results(self, sums):
        pairs = float(sums["weight"])
        return {**{k: float(v) / pairs for k, v in sums.items() if k != "weight"}, "pairs": int(pairs)}

    def units_per_example(self):
        return 1

    def flops_per_unit(self):
        """A pair: two sequences of L tokens, trained through the policy (6N per token) and run
        forward through the reference (2N)."""
        return 2 * self.seq_len * self.model_config.flops_per_token(self.seq_len) * (1 + 1 / 3)

    def train_iterator(self, process_index, process_count):
        return preference.make_train_iterator(self.config, self.tokenizer, self.template, self.train_pairs,
                                              process_index, process_count)

    def eval_batches(self, process_index, process_count):
        return preference.make_eval_batches(self.config, self.tokenizer, self.template,
                                            self.validation_pairs, process_index, process_count)

    def decoder_params(self, params):
        """The decoder's parameters (chat, samples, benchmark scoring): the policy."""
        return params["policy"]

    def write_samples(self, params, workdir, step):
        return write_chat_samples(self, self.decoder_params(params), workdir, step)
