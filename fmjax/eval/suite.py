"""Everything an evaluation runs, in the loop (every train.eval_every steps and at the end) and in
mode=eval: the task's held-out metrics, then config.eval.datasets (perplexity, bits per byte)
and config.eval.tasks (benchmarks) of decoder models.

Results are one flat dict: the held-out metrics under their own names (loss, perplexity, ...),
the others as "<dataset or task>/<metric>" (e.g. "wikitext2_test/perplexity", "cloze/acc").
"""
from __future__ import annotations

import jax

from fmjax.eval import datasets, harness, heldout, scoring


def validate(config, task) -> None:
    """eval.* checks that need the built task (decoder or not); files and specs are read here so
    a bad one fails before any compilation."""
    cfg = config.eval
    for field in ("num_fewshot", "limit"):
        if cfg[field] < 0:
            raise ValueError(f"eval.{field}={cfg[field]} must be >= 0")
    if (cfg.tasks or cfg.datasets) and not hasattr(task, "decoder_params"):
        raise ValueError(f"eval.tasks and eval.datasets score decoder models; task.name={config.task.name!r} "
                         "has none (leave them empty)")
    for spec in cfg.datasets:
        datasets.parse(spec)
    for name in cfg.tasks:
        bench = harness.load_task(name, config)
        if cfg.num_fewshot:
            harness.shots(bench, 0, cfg.num_fewshot, config.seed)


class Suite:
    """evaluate(params) -> results for one run (fmjax.train.loop.Run); reads its data once."""

    def __init__(self, run):
        self.run = run
        self._eval_step = run.eval_step()
        self._batches = None
        self._tasks = {}
        self._scorer = None

    def held_out(self, params) -> dict:
        run = self.run
        if self._batches is None:
            self._batches = run.task.eval_batches(jax.process_index(), jax.process_count())
        return heldout.evaluate(self._eval_step, params, self._batches, run.task, run.to_global)

    def benchmarks(self, params) -> dict:
        config, task = self.run.config, self.run.task
        cfg = config.eval
        if not (cfg.tasks or cfg.datasets):
            return {}
        if self._scorer is None:  # one scorer per run: its compiled functions are reused
            self._scorer = scoring.Scorer(task.model, None, task.tokenizer, max_len=config.data.seq_len,
                                          batch_size=config.train.batch_size,
                                          batch_sharding=self.run.batch_sharding)
        scorer = self._scorer
        scorer.params = task.decoder_params(params)
        results = {}
        for spec in cfg.datasets:
            name, documents = datasets.parse(spec)
            results.update(_prefixed(name, datasets.evaluate(documents, scorer, cfg.limit)))
        for name in cfg.tasks:
            if name not in self._tasks:
                self._tasks[name] = harness.load_task(name, config)
            bench = self._tasks[name]
            results.update(_prefixed(bench.name, harness.evaluate(bench, scorer, num_fewshot=cfg.num_fewshot,
                                                                  limit=cfg.limit, seed=config.seed)))
        return results

    def evaluate(self, params) -> dict:
        """Held-out metrics, then datasets and benchmarks; call under the run's mesh and rules."""
        return {**self.held_out(params), **self.benchmarks(params)}


def _prefixed(name: str, metrics: dict) -> dict:
    return {f"{name}/{k}": v for k, v in metrics.items()}
