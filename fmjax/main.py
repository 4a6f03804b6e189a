"""Entry point: `python -m fmjax.main --config configs/lm/tiny.py --workdir DIR [--config.x=y ...]`.

Parses flags, validates the config (errors name the field, before any compilation) and
dispatches on config.mode.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of this run (resumes if it has checkpoints).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host: call jax.distributed.initialize() first (coordinator and process "
    "ids from the cluster: TPU pods, SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).")


def _fail(message: str):
    print(f"fmjax: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _parse_flags(argv):
    """absl's and ml_collections' flag errors, reworded to the one line that names the bad field."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e).splitlines()[0])
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a field that does not exist
        lines = str(e).strip("'\"").replace("\\n", "\n").split("\n")
        field = lines[0].strip("'\"\\")
        flag = next((a for a in argv if a.startswith("--config.") and f".{field}" in a.split("=")[0]), field)
        hint = f" ({lines[1].strip()})" if len(lines) > 1 else ""
        _fail(f"{flag.split('=')[0]}: the config has no field {field!r}{hint}")


def main(argv):
    import jax
    from absl import logging

    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; --verbosity=0 brings it back
        logging.set_verbosity(logging.WARNING)

    from fmjax import config_lib
    from fmjax.eval import suite as eval_suite
    from fmjax.infer import embed
    from fmjax.tasks import validate_data
    from fmjax.train import checkpoint, loop

    config, workdir = _CONFIG.value, _WORKDIR.value
    if config is None:
        _fail("--config is required, e.g. --config configs/lm/tiny.py")
    if config.mode == "prepare":  # builds a data pile under data.piles_dir; no workdir, no model
        from fmjax.data.prepare import pile
        try:
            pile.validate(config)
        except ValueError as e:
            _fail(str(e))
        pile.prepare(config)
        return
    if not workdir:
        _fail("--workdir is required: the directory of this run")
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    # Everything a user can get wrong surfaces here, before any compilation; errors after this
    # point are bugs and keep their tracebacks.
    try:
        config_lib.validate(config, jax.device_count(), jax.process_count())
        validate_data(config, jax.process_count())
        if config.mode != "train" and not config.init_from:
            checkpoint.require_latest_step(workdir)
        if config.mode == "embed":
            embed.validate(config)
        run = loop.setup(config, workdir)
        eval_suite.validate(config, run.task)
        if config.mode == "chat" and not hasattr(run.task, "template"):
            raise ValueError(f"mode=chat needs a chat-tuned model (task.name=sft or preference), not "
                             f"task.name={config.task.name!r}")
    except ValueError as e:
        _fail(str(e))
    modes = {"train": loop.train, "eval": loop.evaluate, "sample": loop.sample, "embed": loop.embed,
             "chat": loop.chat, "export": loop.export}
    modes[config.mode](run)
    if config.mode == "train":
        print(_outputs(workdir), flush=True)


def _outputs(workdir: str) -> str:
    names = ["config.json", "metrics.jsonl", "tb/", "checkpoints/", "eval/results.json", "samples/",
             "tokenizer.model", "MODEL_CARD.md", "loss_curve.png"]
    return "outputs:\n" + "\n".join(f"  {os.path.join(workdir, n)}" for n in names)


def run():
    argv = _parse_flags(sys.argv)
    app.run(main, argv=argv, flags_parser=lambda a: a)


if __name__ == "__main__":
    run()
