"""lm-evaluation-harness on fmjax decoders: an `lm_eval` model ("fmjax") that scores through `Scorer`.

Any lm-eval task runs on a workdir's newest checkpoint (or its init_from), e.g. a local task:

  python -m fmjax.eval.lm_eval_adapter --workdir runs/demo --tasks my_task \\
      --include_path my_tasks/ --num_fewshot 2 --limit 100 --output runs/demo/eval/lm_eval.json

which prints lm-eval's results table and, with --output, writes its results as JSON (per-request
samples too with --log_samples). --model_args takes lm-eval's KEY=VALUE,... form: batch_size
(rows per forward pass, a multiple of the data-parallel size; default train.batch_size), max_len
(tokens per scored row; default data.seq_len), max_gen_toks (default 256) and any config field as
SECTION.FIELD=VALUE, e.g. mesh.fsdp=1,mesh.tensor=1 when the devices differ from training's.
From Python, or lm-eval's own CLI once this module is imported:

  lm = FmjaxLM.from_workdir("runs/demo", batch_size=32)
  lm_eval.simple_evaluate(model=lm, tasks=["my_task"], task_manager=TaskManager(include_path="my_tasks/"))
  python -c 'import fmjax.eval.lm_eval_adapter, lm_eval.__main__ as m; m.cli_evaluate()' \\
      run --model fmjax --model_args workdir=runs/demo batch_size=32 --tasks my_task --include_path my_tasks/

Every request goes through fmjax.eval.scoring.Scorer, so lm-eval's numbers are those of fmjax's
own harness (fmjax.eval.harness, fmjax.eval.datasets) on the same (context, continuation) text:
loglikelihood -> Scorer.text_loglikelihood (lm-eval's prompt format and tokenisation rules),
loglikelihood_rolling -> Scorer.rolling_loglikelihood, generate_until -> Scorer.generate.

Generation is greedy only: a request asking to sample (do_sample=True or temperature > 0) is a
ValueError. Requests are grouped by their generation kwargs and run batch_size at a time; each
stops at eos, at its `until` strings (none given: eos and the budget only, as lm-eval's HF model)
or after max_gen_toks tokens, capped at max_len. Prompts are not truncated (rotary positions run
past data.seq_len); lm-eval's --batch_size is used only when it is an integer above 1 and
model_args sets none, and --device is ignored (JAX places the run on all its devices).

Processes: every JAX process runs the same SPMD program over all requests, so the model reports
rank 0 of world_size 1 on every process (lm-eval then neither splits nor gathers requests); only
process 0 prints and writes files. Chat templates are not supported: fmjax's chat markers are
control tokens that no text (what lm-eval's apply_chat_template returns) can express.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Sequence

import flax.linen as nn
import jax
import lm_eval.models  # noqa: F401  (lm-eval imports its own models only while its registry is empty)
import ml_collections
from lm_eval import utils as lm_utils
from lm_eval.api import model as lm_model, registry
from lm_eval.models import utils as lm_model_utils

from fmjax.eval import scoring

DEFAULT_MAX_GEN_TOKS = 256  # as lm-eval's HF model


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote (loop.write_config), locked; ValueError naming the file."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--workdir={workdir}: no config.json there; is it an fmjax workdir?")
    with open(path, encoding="utf-8") as f:
        config = ml_collections.ConfigDict(json.load(f))
    config.lock()
    return config


def override(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """A copy of `config` with SECTION.FIELD=value overrides; ValueError naming an unknown or mistyped one."""
    config = config.copy_and_resolve_references()
    for key, value in overrides.items():
        *path, field = key.split(".")
        node = config
        for part in path:
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or field not in node:
            raise ValueError(f"model_args {key}={value!r}: the config has no field {key!r}; valid are batch_size, "
                             "max_len, max_gen_toks, workdir and SECTION.FIELD of the workdir's config.json")
        try:
            node[field] = value
        except TypeError as e:
            raise ValueError(f"model_args {key}={value!r}: {e}") from None
    return config


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit() or int(value) < 1:
        raise ValueError(f"model_args {name}={value!r} must be a positive integer")
    return int(value)


class FmjaxLM(lm_model.LM):
    """An lm-eval model scoring with `scorer` under `mesh` and the logical axis `rules` (as the run does)."""

    def __init__(self, scorer: scoring.Scorer, *, mesh: jax.sharding.Mesh | None = None, rules=(),
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, info: dict | None = None):
        super().__init__()  # rank 0 of world_size 1 on every process: see the module docstring
        self.scorer = scorer
        self.mesh, self.rules = mesh, tuple(rules)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.info = dict(info or {})

    @classmethod
    def from_workdir(cls, workdir: str, *, batch_size=None, max_len=None, max_gen_toks=DEFAULT_MAX_GEN_TOKS,
                     **config_overrides) -> "FmjaxLM":
        """The newest checkpoint of `workdir` (else its init_from) on all devices, sharded as config.mesh
        says (SECTION.FIELD keyword overrides, e.g. **{"mesh.tensor": 1}); batch_size defaults to
        train.batch_size, max_len to data.seq_len."""
        from fmjax import config_lib, sharding  # local: the adapter class itself needs no training stack
        from fmjax.train import loop

        config = override(read_config(workdir), config_overrides)
        config_lib.validate(config, jax.device_count(), jax.process_count())
        batch_size = config.train.batch_size if batch_size is None else _positive_int("batch_size", batch_size)
        max_len = config.data.seq_len if max_len is None else _positive_int("max_len", max_len)
        run = loop.setup(config, workdir)
        if not hasattr(run.task, "decoder_params"):
            raise ValueError(f"--workdir={workdir}: task.name={config.task.name!r} has no decoder to evaluate")
        data_parallel = sharding.data_parallel_size(run.mesh)
        if batch_size % data_parallel:
            raise ValueError(f"model_args batch_size={batch_size} must be a multiple of the data-parallel size "
                             f"mesh.data*mesh.fsdp={data_parallel}")
        params, step = loop.inference_params(run)
        with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
            params = run.task.decoder_params(params)  # LoRA: merged under the run's shardings
        scorer = scoring.Scorer(run.task.model, params, run.task.tokenizer, max_len=max_len, batch_size=batch_size,
                                batch_sharding=run.batch_sharding)
        return cls(scorer, mesh=run.mesh, rules=run.rules, max_gen_toks=max_gen_toks,
                   info={"fmjax_workdir": os.path.abspath(workdir), "fmjax_step": step})

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "FmjaxLM":
        """lm-eval's model_args (workdir=..., see from_workdir); of its generic settings only an
        integer batch_size above 1 counts (1 is its default), and only where model_args has none."""
        args = dict(arg_dict)
        if "workdir" not in args:
            raise ValueError("model_args needs workdir=DIR (an fmjax workdir), e.g. --model_args workdir=runs/demo")
        batch_size = (additional_config or {}).get("batch_size")
        if "batch_size" not in args and str(batch_size).isdigit() and int(batch_size) > 1:
            args["batch_size"] = int(batch_size)
        return cls.from_workdir(args.pop("workdir"), **args)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "FmjaxLM":
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @contextlib.contextmanager
    def context(self):
        """The mesh and logical axis rules every scorer call runs under."""
        if self.mesh is None:
            yield
            return
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        with self.context():
            results = self.scorer.text_loglikelihood(pairs)
        for pair, result in zip(pairs, results):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        with self.context():
            results = [logprob for logprob, _ in self.scorer.rolling_loglikelihood(texts)]
        for text, result in zip(texts, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return results

    def generation_settings(self, gen_kwargs: dict) -> tuple[int, list[str]]:
        """(max new tokens, stop strings) of a request's generation kwargs; ValueError if it samples."""
        kwargs = lm_model_utils.normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        if kwargs["do_sample"] or kwargs.get("temperature", 0.0) > 0:
            raise ValueError(f"generation kwargs {gen_kwargs}: the fmjax model decodes greedily only; set "
                             "do_sample: false and temperature: 0 (e.g. --gen_kwargs do_sample=false,temperature=0)")
        return min(kwargs["max_gen_toks"], self.scorer.max_len), [s for s in kwargs["until"] if s]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [tuple(r.args) for r in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        settings = [self.generation_settings(args[indices[0]][1]) for indices in groups.values()]  # fail first
        outputs: list[str] = [""] * len(args)
        for indices, (max_new_tokens, stop) in zip(groups.values(), settings):
            order = sorted(indices, key=lambda i: -len(args[i][0]))  # similar lengths share a batch
            with self.context():
                texts = self.scorer.generate([args[i][0] for i in order], max_new_tokens=max_new_tokens, stop=stop)
            for i, text in zip(order, texts):
                outputs[i] = text
                self.cache_hook.add_partial("generate_until", args[i], text)
        return outputs

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        raise ValueError("the fmjax model has no text chat template (its chat markers are control tokens); "
                         "run without --apply_chat_template")

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.scorer.tokenizer, "path", type(self.scorer.tokenizer).__name__))

    def get_model_info(self) -> dict:
        """Joins results["config"] (lm-eval calls it)."""
        return {**self.info, "fmjax_max_len": self.scorer.max_len, "fmjax_batch_size": self.scorer.batch_size}


# `python -m` runs this file as __main__: registering that copy too would clash with the module
# proper (lm-eval refuses a second class under one name), and main() needs no registry.
if __name__ != "__main__":
    registry.register_model("fmjax")(FmjaxLM)


def main(argv: Sequence[str] | None = None) -> dict | None:
    """`python -m fmjax.eval.lm_eval_adapter`: lm-eval tasks on a workdir; returns lm-eval's results."""
    parser = argparse.ArgumentParser(prog="python -m fmjax.eval.lm_eval_adapter", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="an fmjax workdir (its newest checkpoint, else init_from)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task (or group) names")
    parser.add_argument("--include_path", default=None, help="a folder of extra task YAMLs (local tasks)")
    parser.add_argument("--no_default_tasks", action="store_true",
                        help="only --include_path's tasks (indexing lm-eval's built-in ones takes seconds)")
    parser.add_argument("--num_fewshot", type=int, default=None, help="examples before each question")
    parser.add_argument("--limit", type=float, default=None, help="documents per task (< 1: a fraction)")
    parser.add_argument("--output", default=None, help="write lm-eval's results here as JSON")
    parser.add_argument("--log_samples", action="store_true", help="keep every request and response in --output")
    parser.add_argument("--model_args", default="", help="KEY=VALUE,...: batch_size, max_len, max_gen_toks, "
                                                         "SECTION.FIELD (e.g. mesh.tensor=1)")
    parser.add_argument("--bootstrap_iters", type=int, default=100_000, help="resamples for stderrs (0: none)")
    parser.add_argument("--seed", type=int, default=1234, help="lm-eval's few-shot sampling seed (its default)")
    parser.add_argument("--distributed", action="store_true", help="multi-host: jax.distributed.initialize() first")
    args = parser.parse_args(argv)

    import multiprocessing
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    if args.distributed:
        jax.distributed.initialize()
    if jax.process_index() != 0:  # every process computes the same results; one reports them
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    # lm-eval bootstraps stderrs in a process pool; forking this process (JAX runs threads) can hang.
    multiprocessing.set_start_method("forkserver", force=True)
    model_args = {"workdir": args.workdir, **lm_utils.simple_parse_args_string(args.model_args)}
    try:  # what a user can get wrong about the workdir fails here, in one line
        lm = FmjaxLM.create_from_arg_obj(model_args)
    except ValueError as e:
        print(f"fmjax: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    manager = TaskManager(include_path=args.include_path, include_defaults=not args.no_default_tasks)
    results = evaluator.simple_evaluate(
        model=lm, tasks=[t for t in args.tasks.split(",") if t], num_fewshot=args.num_fewshot, limit=args.limit,
        task_manager=manager, log_samples=args.log_samples, bootstrap_iters=args.bootstrap_iters,
        fewshot_random_seed=args.seed)
    if jax.process_index() == 0:
        print(lm_utils.make_table(results), flush=True)
        if results.get("groups"):
            print(lm_utils.make_table(results, "groups"), flush=True)
        if args.output:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=2, default=lm_utils.handle_non_serializable, ensure_ascii=False)
                f.write("\n")
            print(f"wrote {args.output}", flush=True)
    return results


if __name__ == "__main__":
    main()
