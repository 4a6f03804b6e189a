"""Tasks: objective = (model, batch spec, loss, eval metrics). The trainer takes any Task.

A task is the only place that knows both what a batch holds and what the loss is.
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol

import flax.linen as nn
import jax


class Task(Protocol):
    model: nn.Module
    unit: str  # what throughput counts: "tokens" or "examples"

    def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of a global batch (used for init and shardings)."""

    def loss(self, params, batch, rng) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(summed training objective, summed metrics incl. `weight` = units the loss averages over)."""

    def eval_sums(self, params, batch) -> dict[str, jax.Array]:
        """Per-batch sums that eval_results turns into final metrics."""

    def eval_results(self, sums: dict[str, float]) -> dict[str, float]:
        ...

    def units_per_example(self) -> int:
        ...

    def flops_per_unit(self) -> float:
        """Training FLOPs (forward + backward) per token / example, for MFU."""

    def train_iterator(self, process_index: int, process_count: int) -> Iterator[dict[str, Any]]:
        """A checkpointable (get_state / set_state) iterator over this process's batches."""

    def eval_batches(self, process_index: int, process_count: int) -> list[dict[str, Any]]:
        ...

    def write_samples(self, params, workdir: str, step: int) -> str | None:
        """Writes a few samples under workdir/samples; returns the path."""

    # Optional:
    #   init_params(rng, batch)  when the model takes more than batch["inputs"] (train/state.py)
    #   sample_scores(params)    dict of generated-sample scores added to eval
    #   trainable(params)        bool tree; False leaves are frozen: no updates, no optimizer state
    #   pretrained_slots         top-level keys of a multi-model parameter tree that take
    #                            config.init_from's parameters (train/loop.py pretrained_params)
    #   export_params(params)    the parameters in the plain model's layout (LoRA: adapters merged),
    #                            what mode=export writes; default: params as they are
    #   decoder_params(params)   the parameters of the task's decoder (`model`), for chat, text
    #                            samples and benchmark scoring (fmjax/eval/suite.py); decoder tasks only
    #   template                 the chat template of chat-tuned tasks (mode=chat needs it)


def _registered(config):
    """(build, validate_data) of config.task.name."""
    from fmjax.data import chat, images, labelled, pipeline, preference as pairs  # local: a light registry import
    from fmjax.tasks import classify, diffusion, lm, mlm, preference, sft
    tasks = {"lm": (lm.LMTask.build, pipeline.validate), "mlm": (mlm.MLMTask.build, pipeline.validate),
             "sft": (sft.SFTTask.build, chat.validate),
             "preference": (preference.PreferenceTask.build, pairs.validate),
             "classify": (classify.ClassifyTask.build, labelled.validate),
             "diffusion": (diffusion.DiffusionTask.build, images.validate)}
    if config.task.name not in tasks:
        raise ValueError(f"task.name={config.task.name!r} is not a registered task; valid: {sorted(tasks)}")
    return tasks[config.task.name]


def build_task(config, workdir: str) -> Task:
    """The task of config.task.name; wrapped in LoRA adapters when optim.lora.rank > 0."""
    build, _ = _registered(config)
    task = build(config, workdir)
    if config.optim.lora.rank > 0:
        from fmjax.peft import lora
        task = lora.LoraTask(task, lora.LoraConfig.from_config(config))
    return task


def validate_data(config, process_count: int = 1) -> None:
    """Every check of the task's data config and files (names the field or file at fault)."""
    _, validate = _registered(config)
    validate(config, process_count)
