"""Config sections shared by every family, validation before any compute, and step durations.

Every config file starts from `base_config()` and fills the family's `model`, `task` and `data`
fields; the sections are the same everywhere (DESIGN.md): mode, seed, model, task, data, optim,
mesh, sharding_rules, train, eval, serve, init_from.
"""
from __future__ import annotations

import ml_collections

from fmjax import sharding

MODES = ("train", "eval", "sample", "embed", "chat", "export", "prepare", "serve")
MU_DTYPES = ("float32", "bfloat16")  # optim.mu_dtype


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "train"  # train | eval | sample | embed (encoders) | chat (sft, preference) | export (merged params)
    #                   | prepare (configs/data/*.py: build a data pile) | serve (an HTTP API, see c.serve)
    c.seed = 0
    c.init_from = ""  # a workdir or checkpoints/<step> directory to take parameters from
    c.model = ml_collections.ConfigDict()
    c.task = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict()

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3  # peak learning rate
    c.optim.warmup = 0.05  # < 1: a fraction of train.steps; >= 1: a number of steps
    c.optim.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio at train.steps
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0  # global gradient norm clip; 0 disables
    # dtype of Adam's first moment (optax mu_dtype): bfloat16 halves its memory. The second moment
    # stays float32: bfloat16 would round away b2's small per-step changes (b2 = 0.999: 0.1%).
    c.optim.mu_dtype = "float32"  # float32 | bfloat16
    # LoRA (fmjax/peft/lora.py): train low-rank adapters of the targeted kernels, base frozen.
    c.optim.lora = ml_collections.ConfigDict()
    c.optim.lora.rank = 0  # 0: LoRA off (every parameter trains)
    c.optim.lora.alpha = 16.0  # adapters are scaled by alpha / rank
    c.optim.lora.dropout = 0.0  # drops input rows of A per step (one mask for all tokens), not per token
    # Regular expressions re.search-ed in "/"-joined parameter paths (e.g. layers/attn/query/kernel);
    # each must match at least one matrix. Default: every attention and MLP kernel. A tuple, so the
    # command line can set it: --config.optim.lora.targets="('attn/(query|value)/kernel',)".
    c.optim.lora.targets = ("attn/(query|key|value|out)/kernel", "mlp/(wi_gate|wi_up|wi|wo)/kernel")

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices left over by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.sharding_rules = [list(rule) for rule in sharding.DEFAULT_RULES]

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 16  # global, in sequences (or examples)
    c.train.microbatches = 1  # gradient accumulation inside one step
    c.train.log_every = 10
    c.train.eval_every = 500  # also evaluated at the last step
    c.train.eval_batches = 8
    c.train.ckpt_every = 100  # also saved at the last step
    c.train.keep_checkpoints = 3
    c.train.progress_bar = True
    c.train.ema_decay = 0.0  # > 0: keep an EMA of the params (checkpointed; eval and samples use it)
    # The step guard (fmjax/train/step.py): a step with a NaN / Inf loss or gradient is skipped
    # (params and optimizer state unchanged, counted as skipped_steps); after max_bad_steps skipped
    # steps in a row the run stops with an error. spike_factor > 0 also skips a step whose loss is
    # above spike_factor x the running mean of the applied steps' losses (0: off).
    c.train.max_bad_steps = 10
    c.train.spike_factor = 0.0

    # Evaluation beyond the held-out split (fmjax/eval/): run at every train.eval_every, at the last
    # step and by mode=eval; results join eval/results.json, metrics.jsonl and the model card.
    c.eval = ml_collections.ConfigDict()
    # Benchmark tasks of decoder models (fmjax/eval/harness.py): built-in names (harness.BUILTIN)
    # or .jsonl task files, e.g. --config.eval.tasks="('pydoc_cloze','my/task.jsonl')".
    c.eval.tasks = ()
    # Extra perplexity / bits-per-byte datasets, each read whole: "wikitext2" (../shared/data),
    # "text:PATH", "jsonl:PATH:FIELD", "tfds:NAME:SPLIT" (fmjax/eval/datasets.py).
    c.eval.datasets = ()
    c.eval.num_fewshot = 0  # examples of the task shown before each question
    c.eval.limit = 0  # questions per task and batches per dataset; 0: all
    # Model card (DIR/MODEL_CARD.md): "" takes the task family's default text.
    c.eval.intended_use = ""
    c.eval.limitations = ""

    # mode=serve (fmjax/infer/server.py): the newest checkpoint of the workdir behind an
    # OpenAI-compatible HTTP API (completions, chat completions, embeddings for encoders).
    c.serve = ml_collections.ConfigDict()
    c.serve.host = "127.0.0.1"  # 0.0.0.0: every interface
    c.serve.port = 8000
    c.serve.model_name = "fmjax"  # the `model` requests name, and /v1/models lists
    c.serve.max_batch_size = 8  # rows (prompts; embeddings: requests) run together
    c.serve.max_wait_ms = 5.0  # a batch that is not full waits for more until its oldest row has waited this long
    c.serve.max_queue = 256  # rows waiting for a batch; a request that does not fit is answered 429 at once
    c.serve.timeout_s = 60.0  # per request, waiting included; past it 504 (a stream ends with an error event)
    c.serve.max_tokens = 256  # the largest max_tokens a request may ask for (chat's default)
    c.serve.max_prompt_tokens = 1024  # longer prompts (chat: the templated conversation) are answered 400
    c.serve.api_key = ""  # non-empty: /v1/* requests need the header "Authorization: Bearer <api_key>"
    # Terms (whole words, case-insensitive; phrases allowed) that a prompt must not contain (400)
    # and at which a completion is cut (finish_reason "content_filter"). A tuple, so the command
    # line can set it: --config.serve.blocklist="('foo', 'bar baz')".
    c.serve.blocklist = ()
    return c


def steps(value: float, total_steps: int) -> int:
    """A duration given as steps (>= 1) or as a fraction of the run (< 1)."""
    return int(round(value * total_steps)) if value < 1 else int(value)


# Tuple fields of every config that hold strings: `--config.eval.tasks=cloze` reads as ('cloze',),
# but `--config.eval.tasks="(1, 2)"` as numbers, which would fail deep inside the run.
_STRING_TUPLES = ("optim.lora.targets", "eval.tasks", "eval.datasets", "serve.blocklist")


def _check_string_tuples(config) -> None:
    for name in _STRING_TUPLES:
        value = config
        for part in name.split("."):
            value = value[part]
        if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name}={value!r} must be a tuple of strings, e.g. "
                             f"--config.{name}=\"('a', 'b')\"")


def _check_optim(optim) -> None:
    if not optim.lr > 0:
        raise ValueError(f"optim.lr={optim.lr} must be > 0")
    for field in ("b1", "b2"):
        if not 0 <= optim[field] < 1:
            raise ValueError(f"optim.{field}={optim[field]} must be in [0, 1)")
    if not 0 <= optim.min_lr_ratio <= 1:
        raise ValueError(f"optim.min_lr_ratio={optim.min_lr_ratio} must be in [0, 1]")
    for field in ("eps", "weight_decay", "clip_norm"):
        if not optim[field] >= 0:
            raise ValueError(f"optim.{field}={optim[field]} must be >= 0")
    if optim.mu_dtype not in MU_DTYPES:
        raise ValueError(f"optim.mu_dtype={optim.mu_dtype!r}; valid: {list(MU_DTYPES)}")


def _check_serve(serve) -> None:
    if not isinstance(serve.host, str) or not serve.host:
        raise ValueError(f"serve.host={serve.host!r} must be a host name or address, e.g. 127.0.0.1")
    if not 1 <= serve.port <= 65535:
        raise ValueError(f"serve.port={serve.port} must be in [1, 65535]")
    if not serve.model_name or not isinstance(serve.model_name, str):
        raise ValueError(f"serve.model_name={serve.model_name!r} must be a non-empty string")
    for field in ("max_batch_size", "max_queue", "max_tokens", "max_prompt_tokens"):
        if serve[field] < 1:
            raise ValueError(f"serve.{field}={serve[field]} must be >= 1")
    if serve.max_queue < serve.max_batch_size:
        raise ValueError(f"serve.max_queue={serve.max_queue} must be >= serve.max_batch_size={serve.max_batch_size}")
    if not serve.max_wait_ms >= 0:
        raise ValueError(f"serve.max_wait_ms={serve.max_wait_ms} must be >= 0")
    if not serve.timeout_s > 0:
        raise ValueError(f"serve.timeout_s={serve.timeout_s} must be > 0")
    if not isinstance(serve.api_key, str):
        raise ValueError("serve.api_key must be a string ('' : no key)")


def validate(config, num_devices: int, process_count: int = 1) -> dict[str, int]:
    """Checks everything a user can get wrong before any compilation; returns the mesh shape.

    Raises ValueError with one line naming the field at fault.
    """
    if config.mode not in MODES:
        raise ValueError(f"mode={config.mode!r}; valid: {list(MODES)}")
    mesh = sharding.mesh_shape(config.mesh, num_devices)
    train = config.train
    for field in ("steps", "batch_size", "microbatches", "log_every", "eval_every", "ckpt_every",
                  "eval_batches", "keep_checkpoints", "max_bad_steps"):
        if train[field] < 1:
            raise ValueError(f"train.{field}={train[field]} must be >= 1")
    data_parallel = mesh["data"] * mesh["fsdp"]
    if train.batch_size % data_parallel:
        raise ValueError(f"train.batch_size={train.batch_size} is not divisible by the data-parallel "
                         f"size mesh.data*mesh.fsdp={data_parallel}")
    if train.batch_size % (train.microbatches * process_count):
        raise ValueError(f"train.batch_size={train.batch_size} is not divisible by "
                         f"train.microbatches={train.microbatches} x {process_count} processes")
    if (train.batch_size // train.microbatches) % data_parallel:
        raise ValueError(f"train.batch_size / train.microbatches = {train.batch_size // train.microbatches}"
                         f" is not divisible by the data-parallel size {data_parallel}")
    if train.spike_factor != 0 and train.spike_factor <= 1:
        raise ValueError(f"train.spike_factor={train.spike_factor} must be 0 (off) or above 1")
    if not 0 <= train.ema_decay < 1:
        raise ValueError(f"train.ema_decay={train.ema_decay} must be in [0, 1) (0: no EMA)")
    _check_string_tuples(config)
    _check_optim(config.optim)
    _check_serve(config.serve)
    from fmjax.peft import lora  # local: keeps this module's import light
    lora.LoraConfig.from_config(config)
    if not 0 <= config.optim.warmup < config.train.steps:
        raise ValueError(f"optim.warmup={config.optim.warmup} must be in [0, train.steps)")
    for i, rule in enumerate(config.sharding_rules):
        if len(rule) != 2:
            raise ValueError(f"sharding_rules[{i}]={rule!r}: each rule is [logical_name, mesh_axis]")
        axes = rule[1] if isinstance(rule[1], (list, tuple)) else [rule[1]]
        for axis in axes:
            if axis is not None and axis not in sharding.MESH_AXES:
                raise ValueError(f"sharding_rules[{i}]={list(rule)!r}: mesh axis {axis!r} is not one "
                                 f"of {list(sharding.MESH_AXES)}")
    return mesh
