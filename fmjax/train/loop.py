"""The loop: restore or init, step, log, eval, checkpoint; and the eval / sample entry points.

The loop dispatches step n+1 before reading step n's one guard counter (train/step.py), and the
other metrics leave the device only at log steps: the device always has a step queued.
Reliability (docs/reliability.md): resume from the newest good checkpoint (train/checkpoint.py),
save and stop on SIGTERM (train/preemption.py), stop after train.max_bad_steps skipped steps in a row.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import flax.linen as nn
import jax
import numpy as np

from fmjax import sharding
from fmjax.data import tokenizer as tokenizer_lib
from fmjax.eval import heldout, model_card, suite as suite_lib
from fmjax.tasks import Task, build_task
from fmjax.train import checkpoint, metrics as metrics_lib, optim, preemption, state as state_lib, step as step_lib


@dataclasses.dataclass
class Run:
    """Everything derived from (config, workdir) before any compilation."""
    config: object
    workdir: str
    mesh: jax.sharding.Mesh
    rules: tuple
    task: Task
    tx: object
    abstract: state_lib.TrainState
    shardings: state_lib.TrainState
    batch_sharding: jax.sharding.NamedSharding

    def to_global(self, local_batch: dict):
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in local_batch.items()}

    def eval_step(self):
        return step_lib.jit_eval_step(self.task, self.shardings.params, self.batch_sharding, self.mesh)

    def evaluate_and_record(self, suite: suite_lib.Suite, params, step: int, writer=None) -> dict:
        """suite.evaluate(params) -> eval/results.json (and metrics.jsonl / TensorBoard as eval_*)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            results = suite.evaluate(params)
        if writer is not None:
            writer.write(step, {f"eval_{k}": v for k, v in results.items()})
        heldout.write_results(self.workdir, step, self.config.data.eval_split, results)
        return results


def setup(config, workdir: str, devices=None, task: Task | None = None) -> Run:
    """The run of `config` in `workdir` on `devices` (all by default), with config's task unless `task`
    is given (benchmarks give one built around a stand-in tokenizer)."""
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.rules_from_config(config.sharding_rules)
    task = task or build_task(config, workdir)
    tx = optim.optimizer(config, getattr(task, "trainable", None))
    abstract, shardings = state_lib.abstract_state(task, tx, config.seed, mesh, rules,
                                                   ema=config.train.ema_decay > 0)
    return Run(config, workdir, mesh, rules, task, tx, abstract, shardings,
               sharding.batch_sharding(mesh, rules))


def write_config(config, workdir: str):
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2) + "\n")


class Diverged(RuntimeError):
    """train.max_bad_steps steps in a row were skipped by the step guard."""


def _check_streak(step: int, step_metrics, limit: int, newest_checkpoint):
    streak = int(jax.device_get(step_metrics["bad_streak"]))
    if streak >= limit:
        raise Diverged(f"steps {step - streak + 1} to {step}: {streak} steps in a row had a NaN / Inf loss or "
                       f"gradients (or a loss spike) and were skipped (train.max_bad_steps={limit}); stopping. "
                       f"The newest checkpoint is step {newest_checkpoint}; lower optim.lr or check the data")


def train(run: Run, hooks=()) -> dict:
    """Trains (resuming from the newest good checkpoint in the workdir); returns the final eval results.

    `hooks` are called as hook(step, state, metrics) after every step (Levanter-style); a hook
    that raises stops the run, after any checkpoint save in flight has completed.
    Raises preemption.Preempted after saving when the process gets SIGTERM, Diverged after
    train.max_bad_steps skipped steps in a row, checkpoint.CorruptCheckpoint if no checkpoint of the
    workdir can be restored. A failed asynchronous save raises at the next save or at the end.
    """
    config, workdir = run.config, run.workdir
    write_config(config, workdir)
    cfg = config.train
    ckpts = checkpoint.Checkpoints(workdir, cfg.keep_checkpoints)
    data = run.task.train_iterator(jax.process_index(), jax.process_count())
    restored = ckpts.restore_latest(run.abstract)
    if restored:
        start, state, data_state = restored
        data.set_state(data_state)
        print(f"resumed from {ckpts.directory}/{start}", flush=True)
    else:
        start = 0
        state = state_lib.init_state(run.task, run.tx, config.seed, run.abstract, run.shardings)
        if config.init_from:
            params, fresh = pretrained_params(run, state.params)
            state = state.replace(params=params, ema=None if state.ema is None else params)
            print(f"init_from {config.init_from}; newly initialised: {fresh or 'nothing'}", flush=True)
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(run.task, run.tx, optim.schedule(config), cfg.microbatches, cfg.ema_decay,
                                 cfg.spike_factor),
        run.shardings, run.batch_sharding, run.mesh)
    suite = suite_lib.Suite(run)
    writer = metrics_lib.MetricsWriter(workdir, cfg.steps, start, cfg.progress_bar)
    peak = metrics_lib.peak_flops(run.mesh.devices.flatten().tolist())
    units_per_step = cfg.batch_size * run.task.units_per_example()
    config_dict = json.loads(config.to_json_best_effort())
    results, saved, previous = {}, start, None
    try:
        with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules), preemption.Watcher() as preempt:
            last_time, last_step = time.perf_counter(), start
            for step in range(start + 1, cfg.steps + 1):
                state, step_metrics = train_step(state, run.to_global(next(data)))
                if previous is not None:  # the step before: this one stays in flight meanwhile
                    _check_streak(*previous, cfg.max_bad_steps, saved)
                previous = (step, step_metrics)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    record = jax.device_get(step_metrics)
                    elapsed = time.perf_counter() - last_time
                    rate = units_per_step * (step - last_step) / elapsed
                    record[f"{run.task.unit}_per_s"] = rate
                    record["mfu"] = rate * run.task.flops_per_unit() / peak
                    record.pop("weight", None)
                    writer.write(step, record)
                    writer.advance(step - last_step, loss=float(record["loss"]),
                                   **{f"{run.task.unit}/s": rate})
                    last_time, last_step = time.perf_counter(), step
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    results = run.evaluate_and_record(suite, state_lib.inference_params(state), step, writer)
                    last_time = time.perf_counter()  # eval time is not training throughput
                if step % cfg.ckpt_every == 0 or step == cfg.steps:
                    _check_streak(step, step_metrics, cfg.max_bad_steps, saved)
                    ckpts.save(step, state, data.get_state(), config_dict)
                    saved = step
                for hook in hooks:
                    hook(step, state, step_metrics)
                if preempt.reached(step):
                    if saved != step:
                        ckpts.save(step, state, data.get_state(), config_dict)
                    ckpts.wait()
                    raise preemption.Preempted(step, ckpts.directory)
        if start < cfg.steps:  # samples run unconstrained: a few prompts need not fill the mesh
            run.task.write_samples(state_lib.inference_params(state), workdir, cfg.steps)
        model_card.write(run)
    finally:
        ckpts.wait()
        ckpts.close()
        writer.close()
    return results


def pretrained_params(run: Run, params):
    """(`params` with config.init_from's parameters in place, names left as initialised).

    A task whose parameter tree holds more than one model names the subtrees that take the
    pretrained model in `pretrained_slots` (LoRA's frozen base; DPO's policy and reference); the
    other subtrees (e.g. LoRA adapters) keep their initialisation.
    """
    path, slots = run.config.init_from, getattr(run.task, "pretrained_slots", None)
    if slots is None:
        return checkpoint.restore_params(path, run.abstract.params, params)
    params, fresh = dict(params), [name for name in params if name not in slots]
    for slot in slots:
        params[slot], slot_fresh = checkpoint.restore_params(path, run.abstract.params[slot], params[slot])
        fresh += [f"{slot}/{name}" for name in slot_fresh]
    return params, fresh


def inference_params(run: Run):
    """(params, step) of the newest checkpoint in the workdir, else of config.init_from (step 0)."""
    if checkpoint.latest_step(run.workdir) is None and run.config.init_from:
        init = state_lib.init_state(run.task, run.tx, run.config.seed, run.abstract, run.shardings).params
        params, fresh = pretrained_params(run, init)
        print(f"parameters from init_from {run.config.init_from}; newly initialised: {fresh or 'nothing'}",
              flush=True)
        return params, 0
    checkpoint.require_latest_step(run.workdir)
    ckpts = checkpoint.Checkpoints(run.workdir, run.config.train.keep_checkpoints)
    try:
        step, state, _ = ckpts.restore_latest(run.abstract, move_bad=False)
    finally:
        ckpts.close()
    return state_lib.inference_params(state), step


def evaluate(run: Run) -> dict:
    """mode=eval: held-out metrics, eval.datasets, eval.tasks and samples of the newest checkpoint
    (or of init_from)."""
    workdir = run.workdir
    params, step = inference_params(run)
    results = run.evaluate_and_record(suite_lib.Suite(run), params, step)
    path = os.path.join(workdir, "eval", "results.json")
    samples = run.task.write_samples(params, workdir, step)
    card = model_card.write(run)
    print(f"eval at step {step}: {json.dumps(results)}\nwrote {path}, {card} and {samples}", flush=True)
    return results


def sample(run: Run) -> str:
    """mode=sample: writes samples of the newest checkpoint (or of init_from)."""
    params, step = inference_params(run)
    path = run.task.write_samples(params, run.workdir, step)
    shown = open(path).read() if path.endswith(".txt") else ""  # text samples; images stay files
    print(shown + f"wrote {path}", flush=True)
    return path


def export(run: Run) -> str:
    """mode=export: WORKDIR/export, a workdir for `init_from` with the inference parameters of the
    newest checkpoint (or of init_from) in the plain model's layout: LoRA adapters merged into the
    base (task.export_params), the EMA where the run keeps one, no optimizer state.

    It holds checkpoints/<step>/ (state = {"params": ...}, the layout restore_params reads),
    config.json (optim.lora.rank=0, init_from="") and the workdir's tokenizer.model. Exporting a
    step that is already there does nothing.
    """
    params, step = inference_params(run)
    if hasattr(run.task, "export_params"):
        with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
            params = jax.jit(run.task.export_params)(params)
    out = os.path.join(run.workdir, "export")
    config_dict = json.loads(run.config.to_json_best_effort())
    config_dict["optim"]["lora"]["rank"] = 0
    config_dict.update(mode="train", init_from="")
    ckpts = checkpoint.Checkpoints(out, keep=1)
    try:
        if step in ckpts.manager.all_steps():
            print(f"{out} already holds step {step}", flush=True)
        else:
            ckpts.save(step, {"params": params}, {}, config_dict)
    finally:
        ckpts.wait()
        ckpts.close()
    tokenizer = os.path.join(run.workdir, tokenizer_lib.WORKDIR_FILE)
    if jax.process_index() == 0:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(config_dict, f, indent=2)
            f.write("\n")
        if os.path.exists(tokenizer):  # a Hugging Face tokenizer stays where data.tokenizer names it
            shutil.copyfile(tokenizer, os.path.join(out, tokenizer_lib.WORKDIR_FILE))
    print(f"exported step {step} to {out}; use it as --config.init_from={out}", flush=True)
    return out


def embed(run: Run) -> str:
    """mode=embed: task.embed_input -> float32 N x D .npy of the newest checkpoint's (or init_from's) encoder."""
    from fmjax.infer import embed as embed_lib
    config = run.config
    params, step = inference_params(run)
    if hasattr(run.task, "export_params"):  # LoRA: the encoder with its adapters merged
        params = run.task.export_params(params)
    texts = embed_lib.read_texts(config.task.embed_input, config.data.text_field)
    vectors = embed_lib.embed_texts(run.task.model_config, params["encoder"], run.task.tokenizer, texts,
                                    pooling=config.task.pooling, normalize=config.task.normalize,
                                    max_len=config.data.seq_len)
    path = config.task.embed_output or os.path.join(run.workdir, "embeddings.npy")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.save(path, vectors)
    print(f"embedded {len(texts)} texts of {config.task.embed_input} with step {step}: {path} "
          f"{vectors.shape}", flush=True)
    return path


def chat(run: Run, read=input, write=print) -> list[dict]:
    """mode=chat: a conversation on stdin / stdout with the newest checkpoint (or init_from) of a
    chat-tuned workdir (fmjax.infer.chat.interactive)."""
    from fmjax.infer import chat as chat_lib
    config, task = run.config, run.task
    params, step = inference_params(run)
    write(f"chatting with {run.workdir} at step {step}; /reset forgets, /quit ends")
    return chat_lib.interactive(task.model, task.decoder_params(params), task.tokenizer, task.template,
                                system_prompt=config.data.system_prompt, max_new_tokens=config.task.sample_tokens,
                                max_prompt_tokens=config.data.seq_len, temperature=config.task.sample_temperature,
                                seed=config.seed, read=read, write=write)
