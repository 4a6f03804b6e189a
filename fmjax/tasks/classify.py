"""Sequence classification: fine-tune the encoder (EncoderClassifier) on labelled text.

The loss sums cross-entropy over the rows weighted by `weight` (0 on eval padding); the trainer
divides by the summed weight. Held-out metrics come from a confusion matrix summed over the eval
batches: loss, accuracy, macro-F1 and one F1 per class.

Tokenizer: the pretrained encoder's (tokenizer.finetune_tokenizer); from scratch, one trained on
the train texts. Shapes: B batch, L sequence, C classes.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.data import labelled, tokenizer as tokenizer_lib
from fmjax.models.encoder import EncoderClassifier, EncoderConfig
from fmjax.tasks.lm import token_losses

POOLINGS = ("cls", "mean")


class ClassifyTask:
    unit = "examples"

    def __init__(self, config, tokenizer: tokenizer_lib.Tokenizer, examples: labelled.Examples):
        self.config = config
        self.model_config = EncoderConfig.from_config(config.model)
        self.model_config.validate()
        if config.task.pooling not in POOLINGS:
            raise ValueError(f"task.pooling={config.task.pooling!r}; valid: {list(POOLINGS)}")
        if config.task.sample_count < 0:
            raise ValueError(f"task.sample_count={config.task.sample_count} must be >= 0")
        self.examples = examples
        self.labels = examples.labels
        self.model = EncoderClassifier(self.model_config, len(self.labels), config.task.pooling)
        self.tokenizer = tokenizer
        self.seq_len = config.data.seq_len

    @classmethod
    def build(cls, config, workdir: str) -> "ClassifyTask":
        examples = labelled.validate(config, jax.process_count())
        config, tokenizer = tokenizer_lib.finetune_tokenizer(config, workdir,
                                                             lambda: labelled.corpus_tokenizer(config))
        return cls(config, tokenizer, examples)

    def abstract_batch(self, batch_size):
        batch = {k: jax.ShapeDtypeStruct((batch_size, self.seq_len), jnp.int32)
                 for k in ("inputs", "segment_ids", "positions")}
        batch["labels"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
        batch["weight"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
        return batch

    def logits(self, params, batch, rng=None):
        """B x C logits; dropout on when a key is given (training)."""
        return self.model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"],
                                deterministic=rng is None, rngs=None if rng is None else {"dropout": rng})

    def loss(self, params, batch, rng):
        logits_BxC = self.logits(params, batch, rng)
        ce_B, _ = token_losses(logits_BxC, batch["labels"])
        w_B = batch["weight"]
        correct_B = (jnp.argmax(logits_BxC, axis=-1) == batch["labels"]).astype(jnp.float32)
        ce_sum = jnp.sum(ce_B * w_B)
        return ce_sum, {"weight": jnp.sum(w_B), "loss": ce_sum, "accuracy": jnp.sum(correct_B * w_B)}

    def eval_sums(self, params, batch):
        logits_BxC = self.logits(params, batch)
        ce_B, _ = token_losses(logits_BxC, batch["labels"])
        w_B = batch["weight"]
        n = len(self.labels)
        confusion_CxC = jnp.zeros((n, n)).at[batch["labels"], jnp.argmax(logits_BxC, axis=-1)].add(w_B)
        return {"nats": jnp.sum(ce_B * w_B), "confusion": confusion_CxC}  # rows: true, columns: predicted

    def eval_results(self, sums):
        confusion = np.asarray(sums["confusion"])
        examples = confusion.sum()
        true_positives = np.diag(confusion)
        both = confusion.sum(axis=0) + confusion.sum(axis=1)  # predicted + actual, per class
        f1 = np.where(both > 0, 2 * true_positives / np.maximum(both, 1), 0.0)
        return {"loss": float(sums["nats"] / examples), "accuracy": float(true_positives.sum() / examples),
                "macro_f1": float(f1.mean()), "examples": int(examples),
                **{f"f1_{name}": float(v) for name, v in zip(self.labels, f1)}}

    def units_per_example(self):
        return 1

    def flops_per_unit(self):
        d = self.model_config.width
        head = 6.0 * (d * d + d * len(self.labels))  # pooler + classifier
        return self.model_config.flops_per_token(self.seq_len) * self.seq_len + head

    def train_iterator(self, process_index, process_count):
        return labelled.make_train_iterator(self.config, self.tokenizer, self.examples, process_index,
                                            process_count)

    def eval_batches(self, process_index, process_count):
        return labelled.make_eval_batches(self.config, self.tokenizer, self.examples, process_index,
                                          process_count)

    def write_samples(self, params, workdir, step):
        """task.sample_count validation passages, spread over the split, with true and predicted labels."""
        records = self.examples.validation
        count = min(self.config.task.sample_count, len(records))
        if not count:
            return None
        picked = [records[i] for i in np.linspace(0, len(records) - 1, count).round().astype(int)]
        rows = [labelled.tokenize(self.tokenizer, self.seq_len)(r) for r in picked]
        batch = {k: np.stack([r[k] for r in rows]) for k in ("inputs", "segment_ids", "positions")}
        probs = np.asarray(jax.nn.softmax(jax.jit(self.logits)(params, batch)))
        os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
        path = os.path.join(workdir, "samples", f"step_{step}.txt")
        with open(path, "w") as f:
            for record, p in zip(picked, probs):
                f.write(f"### true: {self.labels[record['label']]}  predicted: {self.labels[p.argmax()]} "
                        f"(p={p.max():.2f})\n{record['text']}\n\n")
        return path
