"""Versioned, immutable data piles: `<data.piles_dir>/<name>/<version>/`.

  tfds/              the train / validation splits as TFDS array_record (what training reads)
  manifest.json      sources with file hashes, the full prepare config, per-stage counts (documents
                     and bytes removed by each filter), language / domain / source histograms, dedup
                     and PII statistics, the version id, creation time and tags
  tokenizer.model    a sentencepiece tokenizer trained on the train split (its sha256 in the manifest)
  REPORT.md          the manifest as tables, with length_histogram.png (document lengths before
                     and after filtering)

The version id is a hash of everything that determines the contents: every input file's name and
sha256 (or a TFDS name and split), the prepare config (runner, worker count and file locations
excluded: they change how and where, not what) and PILE_FORMAT. Same inputs + same config = same version, prepared once; any change =
a new version. A pile is built in a temporary directory and renamed into place, so a version
directory is either complete or absent. Training reads one with data.source="pile",
data.pile="<name>@<version>" (or "<name>@latest").
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib
import shutil

import ml_collections

from fmjax.data import sources, tokenizer as tokenizer_lib

PILE_FORMAT = 1  # bump when the pipeline's output for the same inputs and config changes
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
_EXCLUDED = ("runner", "num_workers")  # how the pipeline runs, not what it makes


def piles_dir(config) -> pathlib.Path:
    return pathlib.Path(config.data.piles_dir).expanduser()


def source_record(source) -> dict:
    """A pipeline.Source with the path, sha256 and size of each of its files."""
    files = [{"path": os.path.abspath(f), "sha256": sources.file_sha256(f), "bytes": os.path.getsize(f)}
             for f in source.files()]
    return {**{k: v for k, v in source.__dict__.items()}, "files": files}


def prepare_settings(cfg) -> dict:
    """The prepare config that determines a pile's contents: without how it runs (runner, workers)
    and without where the source files are (their contents are hashed instead)."""
    settings = {k: v for k, v in json.loads(cfg.to_json_best_effort(sort_keys=True)).items() if k not in _EXCLUDED}
    settings["sources"] = {name: {k: v for k, v in s.items() if k != "path"} for name, s in settings["sources"].items()}
    return settings


def version_id(cfg, source_records: list[dict]) -> str:
    """A hash of the inputs' content and the prepare config (file paths and timestamps excluded)."""
    content = [{**{k: v for k, v in r.items() if k not in ("path", "files")},
                "files": [(os.path.basename(f["path"]), f["sha256"]) for f in r["files"]]}
               for r in source_records]
    if any(r["format"] == "tfds" for r in source_records):
        content.append({"tfds": [r["path"] for r in source_records if r["format"] == "tfds"]})
    key = json.dumps([PILE_FORMAT, prepare_settings(cfg), content], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def resolve(config) -> pathlib.Path:
    """The directory of data.pile ("name@version" or "name@latest"); ValueError naming the field."""
    spec = config.data.pile
    name, _, version = spec.partition("@")
    if not name or not version:
        raise ValueError(f"data.pile={spec!r} must be <name>@<version> (or <name>@latest)")
    root = piles_dir(config) / name
    if version == "latest":
        made = [(json.loads((d / MANIFEST).read_text())["created"], d) for d in root.glob("*")
                if (d / MANIFEST).is_file()] if root.is_dir() else []
        if not made:
            raise ValueError(f"data.pile={spec!r}: no prepared version of {name!r} under {root}")
        return max(made)[1]
    path = root / version
    if not (path / MANIFEST).is_file():
        have = sorted(d.name for d in root.glob("*") if (d / MANIFEST).is_file()) if root.is_dir() else []
        raise ValueError(f"data.pile={spec!r}: {path} is not a prepared pile (versions of {name!r}: {have})")
    return path


def manifest(path: pathlib.Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def load_split(path: pathlib.Path, split: str):
    """The split's records (random access; "text" and the source tags) of the pile at `path`."""
    import tensorflow_datasets as tfds  # local: heavy
    builder = tfds.builder_from_directory(str(_tfds_dir(path)))
    if split.split("[")[0] not in builder.info.splits:
        raise ValueError(f"split {split!r} does not exist in pile {path}; valid: {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)


def _tfds_dir(path: pathlib.Path) -> pathlib.Path:
    """The TFDS version directory (tfds/<builder>/<config>/<version>) inside a pile."""
    infos = sorted((path / "tfds").glob("**/dataset_info.json"))
    if len(infos) != 1:
        raise ValueError(f"{path}/tfds holds {len(infos)} TFDS datasets; a pile holds exactly one")
    return infos[0].parent


def _histogram(stats: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in stats.items() if k.startswith(prefix)}


def _split_sizes(path: pathlib.Path) -> dict:
    import tensorflow_datasets as tfds
    builder = tfds.builder_from_directory(str(_tfds_dir(path)))
    return {name: {"documents": info.num_examples, "shards": info.num_shards,
                   "files": sorted(os.path.basename(f) for f in map(str, info.filepaths))}
            for name, info in builder.info.splits.items()}


def _shard_hashes(path: pathlib.Path) -> dict:
    return {str(f.relative_to(path)): sources.file_sha256(str(f))
            for f in sorted((path / "tfds").rglob("*")) if f.is_file() and "array_record" in f.name}


def validate(config) -> None:
    """Every data.prepare setting a user can get wrong, before the pipeline starts."""
    if "prepare" not in config.data:
        raise ValueError("mode=prepare needs a data.prepare section (see configs/data/shared_text.py)")
    from fmjax.data.prepare import pipeline  # local: Apache Beam is only needed to prepare
    cfg = config.data.prepare
    if not cfg.name or "/" in cfg.name or "@" in cfg.name:
        raise ValueError(f"data.prepare.name={cfg.name!r} must be a non-empty name without '/' or '@'")
    pipeline.configured_sources(cfg)
    if not 0 < cfg.validation_fraction < 1:
        raise ValueError(f"data.prepare.validation_fraction={cfg.validation_fraction} must be in (0, 1)")
    if cfg.num_workers < 1:
        raise ValueError(f"data.prepare.num_workers={cfg.num_workers} must be >= 1")
    if not 0 < cfg.dedup.threshold <= 1:
        raise ValueError(f"data.prepare.dedup.threshold={cfg.dedup.threshold} must be in (0, 1]")
    if cfg.tokenizer.vocab_size and cfg.tokenizer.type not in tokenizer_lib.MODEL_TYPES:
        raise ValueError(f"data.prepare.tokenizer.type={cfg.tokenizer.type!r}; valid: {sorted(tokenizer_lib.MODEL_TYPES)}")


def prepare(config) -> pathlib.Path:
    """mode=prepare: builds data.prepare into a new pile version (or finds it built); returns its path."""
    from fmjax.data.prepare import pipeline
    cfg = config.data.prepare
    records = [source_record(s) for s in pipeline.configured_sources(cfg)]
    version = version_id(cfg, records)
    out = piles_dir(config) / cfg.name / version
    if (out / MANIFEST).is_file():
        print(f"pile {cfg.name}@{version} is already prepared: {out}", flush=True)
        return out
    tmp = out.with_name(f".{version}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stats_path = tmp / pipeline.PREPARE_STATS
    pipeline.build(cfg, str(tmp / "tfds"), str(stats_path))
    stats = json.loads(stats_path.read_text())
    tokenizer = _train_tokenizer(cfg, tmp)
    doc = {
        "name": cfg.name, "version": version, "id": f"{cfg.name}@{version}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tags": list(cfg.tags), "format": PILE_FORMAT, "sources": records,
        "config": json.loads(cfg.to_json_best_effort(sort_keys=True)),
        "input": stats.get("input/documents", {"documents": 0, "bytes": 0}),
        "output": stats.get("output/documents", {"documents": 0, "bytes": 0}),
        "removed": _histogram(stats, "removed/"),
        "removed_by_source": {s["name"]: _histogram(stats, f"source/{s['name']}/removed/") for s in records},
        "pii_replaced": {k: v["documents"] for k, v in
                                                                   _histogram(stats, "pii/").items()},
        "languages": _histogram(stats, "output/language/"), "domains": _histogram(stats, "output/domain/"),
        "by_source": _histogram(stats, "output/source/"),
        "length_histogram": {"input": _histogram(stats, "input/length/"), "output": _histogram(stats, "output/length/")},
        "splits": _split_sizes(tmp), "shards_sha256": _shard_hashes(tmp), "tokenizer": tokenizer,
    }
    (tmp / MANIFEST).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    from fmjax.data.prepare import report  # local: matplotlib is only needed here
    report.write(tmp, doc)
    stats_path.unlink()
    os.replace(tmp, out)
    print(f"prepared pile {doc['id']}: {doc['output']['documents']} of {doc['input']['documents']} documents "
          f"kept -> {out}", flush=True)
    return out


def _train_tokenizer(cfg, path: pathlib.Path) -> dict:
    t = cfg.tokenizer
    if not t.vocab_size:
        return {}
    records = load_split(path, "train")
    source = sources.TextSource(records, "text", f"pile {cfg.name} train")
    tokenizer_lib.train_file(source, t.vocab_size, t.type, path / TOKENIZER)
    return {"file": TOKENIZER, "sha256": sources.file_sha256(str(path / TOKENIZER)),
            "vocab_size": t.vocab_size, "type": t.type}


def default_prepare_config() -> ml_collections.ConfigDict:
    """The data.prepare section with every field and its default (configs/data/*.py fill sources)."""
    from fmjax.data.prepare import dedup, filters
    p = ml_collections.ConfigDict()
    p.name = ""
    p.sources = ml_collections.ConfigDict()  # name -> dict(format, path, field, separator, split, domain, licence)
    p.tags = ()
    p.licences = ()  # allowed source licences; empty: all
    p.quality = ml_collections.ConfigDict({"enabled": True, **filters.DEFAULT_QUALITY})
    p.blocklist = ()  # terms (whole words, case-insensitive) that remove a document
    p.pii = True  # replace e-mails, phone numbers, IP addresses with placeholders
    p.dedup = ml_collections.ConfigDict(dict(dedup.DEFAULT_DEDUP))
    p.validation_fraction = 0.01
    p.tokenizer = ml_collections.ConfigDict({"vocab_size": 0, "type": "bpe"})  # 0: no tokenizer
    p.num_shards = 0  # shards per split; 0: TFDS decides by size
    p.runner = ""  # "" = DirectRunner; e.g. "DataflowRunner", "FlinkRunner", "SparkRunner"
    p.num_workers = 1  # DirectRunner: > 1 runs multi-process
    return p
