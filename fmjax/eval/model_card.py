"""The model card of a run: DIR/MODEL_CARD.md, DIR/model_card.json and DIR/loss_curve.png.

`write(run)` builds the card from the run (architecture, parameter tree, task) and from the files
the run wrote (config.json, metrics.jsonl, eval/results.json, tokenizer.model), so training and
mode=eval write the same card, the latter with its newest results. model_card.json holds the exact
floats of metrics.jsonl and eval/results.json; the Markdown shows floats as their shortest exact
repr, so both agree with those files digit for digit.
"""
from __future__ import annotations

import io
import json
import math
import os

import jax

from fmjax.data import sources, tokenizer as tokenizer_lib

MARKDOWN, JSON, PLOT = "MODEL_CARD.md", "model_card.json", "loss_curve.png"

# (intended use, limitations) per task family, for config.eval.intended_use / limitations = "";
# {data} names the training data (data_name).
DEFAULT_TEXTS = {
    "lm": ("Research and teaching at small scale: studying language-model pretraining (training dynamics, "
           "evaluation, the fmjax pipeline) with a small decoder that continues text like {data}.",
           "A small research model, not for production or for any decision that matters. Its continuations are "
           "often incoherent or wrong and imitate {data}, errors and biases included; it has had no evaluation "
           "of safety, factuality or fairness. It only continues text: it is not an assistant."),
    "sft": ("Research on instruction tuning at small scale: a small decoder tuned on {data} to reply in fmjax's "
            "chat template.",
            "A small research model, not for production or for advice of any kind: its replies are often wrong "
            "or made up, it is neither aligned nor safety-tested, and it knows little beyond its pretraining data "
            "and {data}."),
    "preference": ("Research on preference optimisation (DPO / IPO) at small scale: a small chat model tuned on "
                   "the preference pairs of {data}.",
                   "A small research model, not for production or for advice of any kind: its replies are often "
                   "wrong or made up. Its reward accuracy measures agreement with held-out pairs of {data} only, "
                   "not helpfulness or safety in general."),
    "mlm": ("Research on masked-language-model pretraining at small scale: a small encoder whose token and pooled "
            "embeddings of text like {data} are a starting point for fine-tuning and experiments.",
            "A small research model, not for production. Trained only on {data}: its embeddings are weak outside "
            "that domain and carry its biases; it has had no evaluation of fairness or robustness."),
    "classify": ("Research on text classification at small scale: labels passages like those of {data} with one "
                 "of the classes it was trained on.",
                 "A small research model, not for production or for decisions about people. It knows only its "
                 "training classes and the style of {data}; on other text its accuracy is unknown."),
    "diffusion": ("Research on diffusion models at small scale: generates small images like those of {data}, "
                  "guided by a class or a caption.",
                  "A small research model, not for production. Its samples are low-resolution imitations of "
                  "{data}, often malformed, and it generates nothing outside that domain."),
}
_GENERIC_TEXTS = ("Research at small scale with the fmjax framework, trained on {data}.",
                  "A small research model, not for production; evaluated only as this card reports.")
_SOURCE_NAMES = {"pydoc": "Python's bundled documentation topics (pydoc)",
                 "digits": "scikit-learn's bundled 8x8 handwritten digits"}
_DATA_FIELDS = ("source", "path", "paths", "tfds_name", "text_field", "tokenizer")
_KEY_CONFIG = ("seed", "train.steps", "train.batch_size", "train.microbatches", "data.seq_len", "optim.lr",
               "optim.warmup", "optim.weight_decay", "optim.clip_norm", "optim.lora.rank", "train.ema_decay",
               "mesh.data", "mesh.fsdp", "mesh.tensor")


def write(run) -> str:
    """Writes MODEL_CARD.md, model_card.json and (once a training loss is logged) loss_curve.png
    into run.workdir, atomically, on process 0; returns the path of MODEL_CARD.md."""
    path = os.path.join(run.workdir, MARKDOWN)
    if jax.process_index() != 0:
        return path
    records = read_metrics(run.workdir)
    plotted = any("loss" in r for r in records)
    if plotted:
        png, _ = loss_curve(records)
        _write_atomic(os.path.join(run.workdir, PLOT), png)
    card = build(run, records, plotted)
    _write_atomic(os.path.join(run.workdir, JSON), json.dumps(card, indent=2) + "\n")
    _write_atomic(path, markdown(card))
    return path


def build(run, records: list[dict], plotted: bool) -> dict:
    """The card as JSON-ready data; `records` are metrics.jsonl's, `plotted` says whether PLOT exists."""
    config = run.config
    intended_use, limitations = DEFAULT_TEXTS.get(config.task.name, _GENERIC_TEXTS)
    data = data_name(config.data)
    return {
        "name": os.path.basename(os.path.abspath(run.workdir)),
        "model_details": model_details(run),
        "intended_use": config.eval.intended_use or intended_use.format(data=data),
        "limitations": config.eval.limitations or limitations.format(data=data),
        "training_data": training_data(config, run.workdir),
        "training_procedure": training_procedure(run, records),
        "evaluation": _read_json(os.path.join(run.workdir, "eval", "results.json")),
        "loss_curve": PLOT if plotted else None,
    }


# -- Model details.


def parameter_counts(params, trainable=None, by_subtree: bool = False) -> dict:
    """{"total", "trainable"} parameter counts of a tree of arrays or ShapeDtypeStructs (flax
    boxed leaves too); `trainable` is a task's params -> bool tree (None: all train). With
    `by_subtree`, also "subtrees": the same counts per top-level key (the models of a multi-model
    tree, e.g. DPO's policy and reference, LoRA's base and adapters)."""
    sizes = jax.tree.map(lambda leaf: math.prod(leaf.shape), params)
    flags = trainable(params) if trainable else jax.tree.map(lambda _: True, params)
    trained = jax.tree.map(lambda size, flag: size if flag else 0, sizes, flags)
    counts = {"total": sum(jax.tree.leaves(sizes)), "trainable": sum(jax.tree.leaves(trained))}
    if by_subtree:
        counts["subtrees"] = {name: {"total": sum(jax.tree.leaves(sizes[name])),
                                     "trainable": sum(jax.tree.leaves(trained[name]))} for name in sizes}
    return counts


def model_details(run) -> dict:
    """Architecture (model.name and config), task, parameter counts and training FLOPs per unit."""
    task = run.task
    return {"architecture": run.config.model.name,
            "task": run.config.task.name,
            "config": json.loads(run.config.model.to_json_best_effort()),
            # Tasks with several models in their parameter tree name pretrained_slots (tasks/__init__.py).
            "parameters": parameter_counts(run.abstract.params, getattr(task, "trainable", None),
                                           by_subtree=hasattr(task, "pretrained_slots")),
            "unit": task.unit,
            "flops_per_unit": float(task.flops_per_unit())}


# -- Training data.


def _data_paths(data) -> list[str]:
    """The local files or folders the data config names: data.path, else data.paths."""
    if "path" in data and data.path:
        return [data.path]
    return list(data.paths) if "paths" in data else []


def data_name(data) -> str:
    """A few words naming the training data, for the default texts."""
    source = data.source if "source" in data else ""
    if source in _SOURCE_NAMES:
        return _SOURCE_NAMES[source]
    if source == "tfds":
        return f"the TFDS dataset {data.tfds_name}"
    paths = _data_paths(data)
    return ", ".join(os.path.basename(os.path.normpath(p)) for p in paths) if paths else f"data.source={source}"


def _dataset_id(config) -> str | None:
    """sources.dataset_id for data read through fmjax.data.sources; None for other sources (it
    raises ValueError on them) and for a data file gone since training (OSError)."""
    if "source" not in config.data or config.data.source not in sources.DATASETS:
        return None
    try:
        return sources.dataset_id(config)
    except OSError:
        return None


def training_data(config, workdir: str) -> dict:
    """The data fields of the config, the dataset identity, sha256 of the local data files and of
    the workdir's tokenizer.model, and for data.source="pile" the pile's id, tags, creation time,
    sources with their file hashes and shard hashes (from its manifest.json)."""
    d = config.data
    tokenizer = os.path.join(workdir, tokenizer_lib.WORKDIR_FILE)
    out = {field: d[field] for field in _DATA_FIELDS if field in d}
    out["dataset_id"] = _dataset_id(config)
    out["file_sha256"] = {p: sources.file_sha256(os.path.abspath(p)) for p in _data_paths(d) if os.path.isfile(p)}
    out["tokenizer_sha256"] = sources.file_sha256(tokenizer) if os.path.isfile(tokenizer) else None
    if d.get("source") == "pile":
        from fmjax.data.prepare import pile  # local: the data-preparation stage is heavy to import
        m = pile.manifest(pile.resolve(config))
        out["pile"] = {"id": m["id"], "version": m["version"], "created": m["created"], "tags": m["tags"],
                       "sources": [{"name": s["name"], "domain": s["domain"], "licence": s["licence"],
                                    "files": {os.path.basename(f["path"]): f["sha256"] for f in s["files"]}}
                                   for s in m["sources"]],
                       "shards_sha256": m["shards_sha256"]}
    return out


# -- Training procedure.


def hardware(devices) -> dict:
    """Count, kind and platform of `devices` and the number of processes."""
    return {"devices": len(devices), "device_kind": devices[0].device_kind, "platform": devices[0].platform,
            "processes": jax.process_count()}


def _training_hardware(run) -> dict:
    """The run's devices; when mode=eval refreshes a card, the training hardware of the card it replaces."""
    previous = _read_json(os.path.join(run.workdir, JSON))
    if run.config.mode != "train" and previous:
        return previous["training_procedure"]["hardware"]
    return hardware(run.mesh.devices.flatten().tolist())


def training_procedure(run, records: list[dict]) -> dict:
    """Steps, units seen, hardware, wall time and final loss from metrics.jsonl `records`; the
    resolved config (config.json, else the run's config)."""
    steps = max((r["step"] for r in records), default=0)
    losses = [r for r in records if "loss" in r]
    config = _read_json(os.path.join(run.workdir, "config.json")) or json.loads(run.config.to_json_best_effort())
    return {"init_from": run.config.init_from,
            "steps": steps,
            "unit": run.task.unit,
            "units_seen": steps * run.config.train.batch_size * run.task.units_per_example(),
            "hardware": _training_hardware(run),
            "wall_time_s": max((r["elapsed_s"] for r in records if "elapsed_s" in r), default=None),
            "final_loss": losses[-1]["loss"] if losses else None,
            "final_loss_step": losses[-1]["step"] if losses else None,
            "config": config}


def read_metrics(workdir: str) -> list[dict]:
    """The records of DIR/metrics.jsonl ([] if there is none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def loss_curve(records: list[dict]) -> tuple[bytes, dict[str, tuple[list, list]]]:
    """(PNG of the training loss per logged step and the eval loss points of metrics.jsonl
    `records`, {label: (steps, losses)} of each line as the figure holds it)."""
    # Imported here, not with the module: importing matplotlib costs every run about half a second.
    # The object API (Figure + the Agg canvas) leaves pyplot's global state and backend alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for key, label, style in (("loss", "train loss", ".-"), ("eval_loss", "eval loss", "o")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            axes.plot(*zip(*points), style, label=label, markersize=4)
    axes.set(xlabel="step", ylabel="loss", title="loss per step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.lines}
    return buffer.getvalue(), lines


# -- Markdown.


def result_groups(results: dict) -> dict[str, dict]:
    """eval/results.json's metrics by group: the held-out split's (keys without "/") first, then one
    group per prefix ("wikitext2/perplexity" -> group "wikitext2", metric "perplexity")."""
    held_out = f"held-out ({results['split']})"
    groups = {held_out: {}}
    for key, value in results.items():
        if key not in ("step", "split"):
            prefix, _, metric = key.rpartition("/")
            groups.setdefault(prefix or held_out, {})[metric] = value
    return {name: metrics for name, metrics in groups.items() if metrics}


def _fmt(value) -> str:
    """Floats as their shortest exact repr, ints and strings as they are, anything else as JSON."""
    if isinstance(value, float):
        return repr(value)
    text = value if isinstance(value, str) else str(value) if isinstance(value, int) else json.dumps(value)
    return text.replace("|", "\\|")


def _table(rows, header=("field", "value")) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows])


def _details(summary: str, value) -> str:
    return f"<details><summary>{summary}</summary>\n\n```json\n{json.dumps(value, indent=2)}\n```\n\n</details>"


def _model_rows(model: dict) -> list[tuple]:
    params = model["parameters"]
    rows = [("architecture", model["architecture"]), ("task", model["task"]),
            ("parameters", f"{params['total']:,} ({params['trainable']:,} trainable)")]
    for name, counts in params.get("subtrees", {}).items():
        state = ("trainable" if counts["trainable"] == counts["total"] else
                 "frozen" if counts["trainable"] == 0 else f"{counts['trainable']:,} trainable")
        rows.append((f"parameters: {name}", f"{counts['total']:,} ({state})"))
    rows.append((f"training FLOPs per {model['unit'].removesuffix('s')}", model["flops_per_unit"]))
    return rows


def _data_rows(data: dict) -> list[tuple]:
    rows = [(f"data.{field}", data[field]) for field in _DATA_FIELDS if data.get(field)]
    if data["dataset_id"]:
        rows.append(("dataset id", data["dataset_id"]))
    rows += [(f"sha256 of {path}", f"`{sha}`") for path, sha in data["file_sha256"].items()]
    if data["tokenizer_sha256"]:
        rows.append((f"sha256 of {tokenizer_lib.WORKDIR_FILE}", f"`{data['tokenizer_sha256']}`"))
    if "pile" in data:
        p = data["pile"]
        rows.append(("data pile", f"`{p['id']}` (created {p['created']}; tags: {', '.join(p['tags']) or 'none'})"))
        rows += [(f"pile source {s['name']}", f"{s['domain']}, {s['licence']}: " +
                  ", ".join(f"{name} `{sha[:16]}`" for name, sha in s["files"].items())) for s in p["sources"]]
    return rows


def _lookup(config: dict, dotted: str):
    """config["a"]["b"] for "a.b"; None where a key is missing."""
    for key in dotted.split("."):
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def _hours(seconds: float) -> str:
    """h:mm:ss.s"""
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{seconds % 60:04.1f}"


def _procedure_rows(proc: dict) -> list[tuple]:
    hw, seconds, loss = proc["hardware"], proc["wall_time_s"], proc["final_loss"]
    rows = [("initialised from", proc["init_from"])] if proc["init_from"] else []
    rows += [("steps trained", proc["steps"]),
             (f"{proc['unit']} seen", f"{proc['units_seen']:,}"),
             ("hardware", f"{hw['devices']} x {hw['device_kind']} ({hw['platform']}), {hw['processes']} process(es)"),
             ("wall time", "not recorded" if seconds is None else f"{_fmt(seconds)} s ({_hours(seconds)})"),
             ("final training loss",
              "none logged" if loss is None else f"{_fmt(loss)} (step {proc['final_loss_step']})")]
    return rows + [(key, value) for key in _KEY_CONFIG if (value := _lookup(proc["config"], key)) is not None]


def _results_section(results: dict | None) -> str:
    if results is None:
        return "No evaluation yet (eval/results.json does not exist)."
    rows = [(f"**{group}**" if i == 0 else "", metric, value)
            for group, metrics in result_groups(results).items() for i, (metric, value) in enumerate(metrics.items())]
    return (f"Step {results['step']}, from eval/results.json.\n\n"
            + _table(rows, header=("group", "metric", "value")))


def markdown(card: dict) -> str:
    """MODEL_CARD.md of a card as `build` returns it."""
    model, proc = card["model_details"], card["training_procedure"]
    summary = (f"A {model['architecture']} model with {model['parameters']['total']:,} parameters, trained by "
               f"fmjax with task `{model['task']}` for {proc['steps']} steps ({proc['units_seen']:,} {proc['unit']}).")
    curve = (f"![loss curve]({card['loss_curve']})" if card["loss_curve"] else
             "No training loss was logged in this workdir.")
    return "\n\n".join([
        f"# Model card: {card['name']}", summary,
        "## Model details", _table(_model_rows(model)), _details("model config", model["config"]),
        "## Intended use", card["intended_use"],
        "## Limitations", card["limitations"],
        "## Training data", _table(_data_rows(card["training_data"])),
        "## Training procedure", _table(_procedure_rows(proc)),
        _details("full resolved config (config.json)", proc["config"]),
        "## Evaluation results", _results_section(card["evaluation"]),
        "## Loss curve", curve,
    ]) + "\n"


def _read_json(path: str):
    """The JSON value in `path`, None if there is no such file."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_atomic(path: str, data: str | bytes):
    with open(path + ".tmp", "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(path + ".tmp", path)
