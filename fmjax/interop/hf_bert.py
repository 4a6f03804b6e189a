"""Hugging Face BERT folders (config.json + model.safetensors) <-> fmjax encoder parameters.

A folder written by transformers' BertModel / BertForMaskedLM (or sentence-transformers) loads
into the tree of `fmjax.models.encoder.EncoderMLM` (scanned layers), and one saved here loads back
bitwise. The mapping is total: every tensor of the file fills exactly one fmjax parameter and every
parameter is filled, except the skips named in `_SKIPPED` and `_TIED`, so a renamed, extra or
missing tensor fails loudly instead of leaving a randomly initialised weight behind.
Shapes: V vocabulary, P positions, T token types, D width, N heads, E head dim, F MLP width.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

import jax
import numpy as np
from flax import traverse_util
from flax.linen import meta
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fmjax.models.decoder import stack_layers, unstack_layers
from fmjax.models.encoder import EncoderConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_PREFIX = "bert."  # BertForMaskedLM / BertForPreTraining; BertModel files have none; cls.* never has it
# BertConfig's defaults, for keys that transformers leaves out of config.json.
_HF_DEFAULTS = {"type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
                "hidden_dropout_prob": 0.1, "position_embedding_type": "absolute"}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size", "max_position_embeddings")
# Tensors dropped on purpose: position_ids is a buffer (arange); the next-sentence head of
# BertForPreTraining has no fmjax counterpart.
_SKIPPED = ("embeddings.position_ids", "cls.seq_relationship.weight", "cls.seq_relationship.bias")
# The MLM decoder is tied to the token embedding and its bias is cls.predictions.bias: checked
# equal when a file stores them, never loaded twice, and not written (transformers re-ties them).
_TIED = {"cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
         "cls.predictions.decoder.bias": "cls.predictions.bias"}
_FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # all widen to float32 exactly
_HEAD_KEYS = ("mlm_transform", "mlm_norm", "mlm_bias")


def _linear(hf: str, path: tuple, d_in: int, d_out: int) -> list:
    """torch.nn.Linear stores weight out x in; fmjax kernels are in x out."""
    return [(hf + ".weight", path + ("kernel",), (d_out, d_in), (d_in, d_out), True),
            (hf + ".bias", path + ("bias",), (d_out,), (d_out,), False)]


def _norm(hf: str, path: tuple, d: int) -> list:
    return [(hf + ".weight", path + ("scale",), (d,), (d,), False),
            (hf + ".bias", path + ("bias",), (d,), (d,), False)]


def _table(cfg: EncoderConfig, mlm: bool, pooler: bool) -> list[tuple[str, tuple, tuple, tuple, bool]]:
    """(HF name without `bert.`, fmjax path (unrolled layers), HF shape, fmjax shape, transposed)."""
    v, p, t, d = cfg.vocab_size, cfg.max_len, cfg.type_vocab_size, cfg.width
    n, e, f = cfg.n_heads, cfg.head_dim, cfg.mlp_dim
    rows = [("embeddings.word_embeddings.weight", ("encoder", "token_embed", "embedding"), (v, d), (v, d), False),
            ("embeddings.position_embeddings.weight", ("encoder", "position_embed", "embedding"), (p, d), (p, d),
             False),
            ("embeddings.token_type_embeddings.weight", ("encoder", "type_embed", "embedding"), (t, d), (t, d),
             False),
            *_norm("embeddings.LayerNorm", ("encoder", "embed_norm"), d)]
    for i in range(cfg.n_layers):
        hf, fm = f"encoder.layer.{i}.", ("encoder", f"layers_{i}")
        for name in ("query", "key", "value"):
            rows += [(hf + f"attention.self.{name}.weight", fm + ("attn", name, "kernel"), (n * e, d), (d, n, e),
                      True),
                     (hf + f"attention.self.{name}.bias", fm + ("attn", name, "bias"), (n * e,), (n, e), False)]
        rows += [(hf + "attention.output.dense.weight", fm + ("attn", "out", "kernel"), (d, n * e), (n, e, d), True),
                 (hf + "attention.output.dense.bias", fm + ("attn", "out", "bias"), (d,), (d,), False),
                 *_norm(hf + "attention.output.LayerNorm", fm + ("attn_norm",), d),
                 *_linear(hf + "intermediate.dense", fm + ("mlp", "wi"), d, f),
                 *_linear(hf + "output.dense", fm + ("mlp", "wo"), f, d),
                 *_norm(hf + "output.LayerNorm", fm + ("mlp_norm",), d)]
    if pooler:
        rows += _linear("pooler.dense", ("pooler",), d, d)
    if mlm:
        rows += [*_linear("cls.predictions.transform.dense", ("mlm_transform",), d, d),
                 *_norm("cls.predictions.transform.LayerNorm", ("mlm_norm",), d),
                 ("cls.predictions.bias", ("mlm_bias",), (v,), (v,), False)]
    return rows


def _file_name(hf: str, prefixed: bool) -> str:
    return _PREFIX + hf if prefixed and not hf.startswith("cls.") else hf


def config_from_hf(hf: dict, where: str) -> EncoderConfig:
    """The EncoderConfig of a BERT config.json (`where` names the file in errors)."""
    model_type, archs = hf.get("model_type"), hf.get("architectures") or []
    if model_type != "bert" and not (model_type is None and any(a.startswith("Bert") for a in archs)):
        raise ValueError(f"{where}: model_type={model_type!r} (architectures {archs}) is not BERT; "
                         "fmjax.interop.hf_bert reads model_type 'bert' (BertModel, BertForMaskedLM)")
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    hf = {**_HF_DEFAULTS, **hf}
    checks = [(hf["hidden_act"] == "gelu", f"hidden_act={hf['hidden_act']!r}; only 'gelu' (exact erf GELU, what "
                                           "the fmjax encoder computes) is supported"),
              (hf["position_embedding_type"] == "absolute",
               f"position_embedding_type={hf['position_embedding_type']!r}; only 'absolute' is supported"),
              (not hf.get("is_decoder") and not hf.get("add_cross_attention"),
               "is_decoder/add_cross_attention: a causal or cross-attending BERT is not an fmjax encoder"),
              (hf["hidden_size"] % hf["num_attention_heads"] == 0,
               f"hidden_size={hf['hidden_size']} is not a multiple of num_attention_heads="
               f"{hf['num_attention_heads']}")]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{where}: {message}")
    return EncoderConfig(vocab_size=hf["vocab_size"], width=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                         n_heads=hf["num_attention_heads"], head_dim=hf["hidden_size"] // hf["num_attention_heads"],
                         mlp_dim=hf["intermediate_size"], max_len=hf["max_position_embeddings"],
                         type_vocab_size=hf["type_vocab_size"], norm="post", norm_eps=hf["layer_norm_eps"],
                         dropout=hf["hidden_dropout_prob"])


def config_to_hf(cfg: EncoderConfig, architecture: str) -> dict:
    """config.json for transformers; fmjax has no attention-probability dropout, hence 0."""
    if cfg.norm != "post" or cfg.n_heads * cfg.head_dim != cfg.width:
        raise ValueError(f"model.norm={cfg.norm!r}, n_heads*head_dim={cfg.n_heads * cfg.head_dim}, width="
                         f"{cfg.width}: a HF BERT needs norm='post' and n_heads*head_dim == width")
    return {"architectures": [architecture], "model_type": "bert", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.width, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "intermediate_size": cfg.mlp_dim, "hidden_act": "gelu", "hidden_dropout_prob": cfg.dropout,
            "attention_probs_dropout_prob": 0.0, "max_position_embeddings": cfg.max_len,
            "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.norm_eps,
            "position_embedding_type": "absolute", "initializer_range": 0.02}


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; a HF BERT folder has {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _read_tensors(hf_dir: str) -> tuple[str, dict[str, np.ndarray]]:
    path = os.path.join(hf_dir, WEIGHTS_FILE)
    if not os.path.isfile(path):
        others = [f for f in ("model.safetensors.index.json", "pytorch_model.bin", "tf_model.h5")
                  if os.path.exists(os.path.join(hf_dir, f))]
        hint = f"; found {others}: save a single {WEIGHTS_FILE} with transformers first" if others else ""
        raise ValueError(f"{path} does not exist{hint}")
    try:
        return path, load_file(path)
    except (SafetensorError, OSError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


def is_hf_folder(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isfile(os.path.join(path, WEIGHTS_FILE))


def load(hf_dir: str | os.PathLike) -> tuple[EncoderConfig, dict]:
    """(config, float32 numpy params with scanned layers) of a HF BERT folder.

    With the MLM head (`cls.predictions.*`) the params are EncoderMLM's; without it, {"encoder": ...}.
    A pooler (BertModel files) adds "pooler", EncoderClassifier's name for it, which EncoderMLM and
    Encoder ignore. float16/bfloat16 checkpoints are widened to float32 (exactly).
    """
    hf_dir = os.fspath(hf_dir)
    config_path = os.path.join(hf_dir, CONFIG_FILE)
    cfg = config_from_hf(_read_json(config_path), config_path)
    path, raw = _read_tensors(hf_dir)
    prefixed = any(k.startswith(_PREFIX) for k in raw)
    original = {k.removeprefix(_PREFIX): k for k in raw}  # HF name without prefix -> name in the file
    if len(original) != len(raw):
        raise ValueError(f"{path}: holds tensors both with and without the {_PREFIX!r} prefix")
    tensors = {k: raw[v] for k, v in original.items()}
    if "cls.predictions.bias" not in tensors and "cls.predictions.decoder.bias" in tensors:
        tensors["cls.predictions.bias"] = tensors["cls.predictions.decoder.bias"]  # the other tied copy
        original["cls.predictions.bias"] = original["cls.predictions.decoder.bias"]
    mlm = any(k.startswith("cls.predictions.") for k in tensors)
    flat, left = {}, dict(tensors)
    for hf, fm_path, hf_shape, shape, transposed in _table(cfg, mlm, "pooler.dense.weight" in tensors):
        if hf not in left:
            raise ValueError(f"{path}: tensor {_file_name(hf, prefixed)} is missing (expected shape {hf_shape} "
                             f"from {config_path})")
        x = left.pop(hf)
        if x.shape != hf_shape:
            raise ValueError(f"{path}: tensor {original[hf]} has shape {x.shape}; {config_path} implies {hf_shape}")
        if x.dtype.name not in _FLOAT_DTYPES:
            raise ValueError(f"{path}: tensor {original[hf]} has dtype {x.dtype}; valid: {list(_FLOAT_DTYPES)}")
        x = x.astype(np.float32)
        flat[fm_path] = (x.T if transposed else x).reshape(shape)
    for tied, source in _TIED.items():
        if tied in left and not np.array_equal(left.pop(tied), tensors[source]):
            raise ValueError(f"{path}: tensor {original[tied]} differs from {original[source]}; fmjax ties the "
                             "MLM output layer to the token embedding and cannot load an untied one")
    unused = sorted(original[k] for k in left if k not in _SKIPPED)
    if unused:
        raise ValueError(f"{path}: tensors with no fmjax encoder counterpart: {unused[:8]}"
                         f"{f' and {len(unused) - 8} more' if len(unused) > 8 else ''}")
    params = traverse_util.unflatten_dict(flat)
    params["encoder"] = jax.tree.map(np.asarray, stack_layers(params["encoder"], cfg.n_layers))
    return cfg, params


def save(hf_dir: str | os.PathLike, model_config: EncoderConfig, params: dict,
         tokenizer_files: Sequence[str | os.PathLike] = ()) -> str:
    """Writes config.json + model.safetensors (+ copies of tokenizer_files) that load() reads back bitwise.

    `params`: EncoderMLM's tree (with or without the MLM head; boxed or not; scanned or unrolled),
    optionally with a "pooler". With the head it is written as BertForMaskedLM (`bert.` prefix),
    else as BertModel. Returns hf_dir.
    """
    hf_dir, cfg = os.fspath(hf_dir), model_config
    if cfg.positions != "learned" or cfg.norm != "post":
        raise ValueError(f"model.positions={cfg.positions!r}, model.norm={cfg.norm!r}: a Hugging Face BERT "
                         "has learned positions and post-LN blocks")
    params = dict(meta.unbox(params))
    unknown = sorted(set(params) - {"encoder", "pooler", *_HEAD_KEYS})
    if unknown or "encoder" not in params:
        raise ValueError(f"params have top-level keys {sorted(params)}; a HF BERT needs 'encoder' and takes "
                         f"only {['encoder', 'pooler', *_HEAD_KEYS]}")
    missing_files = [str(f) for f in tokenizer_files if not os.path.isfile(f)]
    if missing_files:
        raise ValueError(f"tokenizer_files {missing_files} do not exist")
    mlm = any(k in params for k in _HEAD_KEYS)
    architecture = "BertForMaskedLM" if mlm else "BertModel"
    hf_config = config_to_hf(cfg, architecture)
    encoder = dict(params["encoder"])
    if "layers" in encoder:
        encoder = unstack_layers(encoder, cfg.n_layers)
    flat = traverse_util.flatten_dict({**params, "encoder": encoder})
    tensors = {}
    for hf, fm_path, hf_shape, shape, transposed in _table(cfg, mlm, "pooler" in params):
        if fm_path not in flat:
            raise ValueError(f"params have no {'/'.join(fm_path)}, which {architecture} needs")
        x = np.asarray(flat.pop(fm_path), np.float32)
        if x.shape != shape:
            raise ValueError(f"param {'/'.join(fm_path)} has shape {x.shape}; the config implies {shape}")
        x = x.reshape(hf_shape[::-1] if transposed else hf_shape)
        tensors[_file_name(hf, prefixed=mlm)] = np.ascontiguousarray(x.T if transposed else x)
    if flat:
        raise ValueError(f"params {sorted('/'.join(p) for p in flat)} have no HF BERT counterpart")
    os.makedirs(hf_dir, exist_ok=True)
    weights = os.path.join(hf_dir, WEIGHTS_FILE)
    save_file(tensors, weights + ".tmp", metadata={"format": "pt"})  # transformers wants format=pt
    os.replace(weights + ".tmp", weights)
    with open(os.path.join(hf_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    for source in tokenizer_files:
        target = os.path.join(hf_dir, os.path.basename(source))
        if not os.path.exists(target) or not os.path.samefile(source, target):
            shutil.copyfile(source, target)
    return hf_dir
