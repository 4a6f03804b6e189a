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
    "distributed", False, "Multi-process: join the other processes first (fmjax/distributed.py; what the flags "
    "below leave unset comes from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID or the "
    "cluster: SLURM, Open MPI, TPU pods, Kubernetes). See docs/multihost.md.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (implies --distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0 to num_processes - 1 "
                                   "(implies --distributed).")


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
    except Exception as e:  # the --config file itself failed to load or run
        _fail(f"--config: {type(e).__name__}: " + " ".join(line.strip() for line in str(e).splitlines()))


def _check_workdir(workdir: str) -> None:
    """ValueError unless --workdir is, or can be made, a writable directory (checked, not created)."""
    path = os.path.abspath(workdir)
    parent = path  # the nearest part of the path that exists
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    where = f"--workdir={workdir}" if parent == path else f"--workdir={workdir} cannot be created: {parent}"
    if not os.path.isdir(parent):
        raise ValueError(f"{where} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{where} is not writable")
    checkpoints = os.path.join(path, "checkpoints")
    if os.path.lexists(checkpoints) and not (os.path.isdir(checkpoints) and os.access(checkpoints, os.W_OK | os.X_OK)):
        raise ValueError(f"--workdir={workdir}: {checkpoints} is not a writable directory")


def main(argv):
    from fmjax import xla_flags
    added_xla_flags = xla_flags.apply()  # first: XLA reads XLA_FLAGS once, when a backend starts
    import jax
    from absl import logging

    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; --verbosity=0 brings it back
        logging.set_verbosity(logging.WARNING)
    if added_xla_flags:
        logging.info("GPU XLA flags added to XLA_FLAGS (FMJAX_XLA_FLAGS=0: none): %s", " ".join(added_xla_flags))

    from fmjax import config_lib
    from fmjax.eval import suite as eval_suite
    from fmjax.infer import embed, server
    from fmjax.tasks import validate_data
    from fmjax.train import checkpoint, loop, preemption

    config, workdir = _CONFIG.value, _WORKDIR.value
    if config is None:
        _fail("--config is required, e.g. --config configs/lm/tiny.py")
    if not os.path.isfile(flags.FLAGS["config"].config_filename):
        _fail(f"--config={flags.FLAGS['config'].config_filename} does not exist or is not a file")
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
    explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _DISTRIBUTED.value or any(v is not None for v in explicit):
        from fmjax import distributed
        try:
            distributed.initialize(*explicit)
        except ValueError as e:
            _fail(str(e))
        print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} of "
              f"{jax.device_count()} devices", flush=True)
    # Everything a user can get wrong surfaces here, before any compilation; errors after this
    # point are bugs and keep their tracebacks.
    try:
        config_lib.validate(config, jax.device_count(), jax.process_count())
        validate_data(config, jax.process_count())
        _check_workdir(workdir)
        if config.init_from:
            checkpoint.check_init_from(config.init_from)
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
             "chat": loop.chat, "export": loop.export, "serve": server.serve}
    try:
        modes[config.mode](run)
    except preemption.Preempted as e:
        print(f"fmjax: {e}", file=sys.stderr, flush=True)
        sys.exit(preemption.EXIT_CODE)
    except (loop.Diverged, checkpoint.CorruptCheckpoint, checkpoint.NonFiniteState) as e:
        _fail(str(e))
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
