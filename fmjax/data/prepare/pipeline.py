"""mode=prepare: raw sources -> categorise -> filter -> deduplicate -> a versioned data pile.

One Apache Beam pipeline, run by TFDS's own Beam dataset builder (the engine TFDS uses for large
datasets): DirectRunner in-process or multi-process locally, the same code on Dataflow, Flink or
Spark (data.prepare.runner and beam_options).

  sources (files, globs, JSONL, TFDS) --read--> {"id", "text", "source", "domain", "licence", "path"}
    -> licence allow-list -> categorise (language, programming language)
    -> quality heuristics (natural language only) -> blocklist -> PII scrubbing (replaces, keeps)
    -> exact dedup -> near dedup (MinHash + LSH) -> train / validation split (stable hash)
    -> TFDS array_record splits, written by TFDS (shards are deterministic: keys are document ids)

Every step that removes documents counts them and their bytes; those counts, the language,
domain and length histograms and PII replacements leave the pipeline as one combined stats
record (PREPARE_STATS), which `fmjax.data.prepare.pile` turns into the manifest and report.
Documents never sit in memory all at once: each stage streams (dedup groups by key).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Iterator

import apache_beam as beam
import tensorflow_datasets as tfds

from fmjax.data import sources
from fmjax.data.prepare import categorize, dedup, filters

PREPARE_STATS = "prepare_stats.json"
SPLITS = ("train", "validation")
LENGTH_BUCKETS = tuple(2 ** i for i in range(4, 24))  # upper bounds in bytes of the length histogram


@dataclasses.dataclass(frozen=True)
class Source:
    """One configured source: where its documents come from and the tags every one of them gets."""
    name: str
    format: str  # text | jsonl | tfds
    path: str  # a file or glob (text, jsonl); a TFDS name (tfds)
    field: str = "text"  # jsonl / tfds: the text field
    separator: str = ""  # text: "" = blank-line separated documents
    split: str = "train"  # tfds
    domain: str = ""
    licence: str = ""

    def files(self) -> list[str]:
        if self.format == "tfds":
            return []
        found = sorted(glob.glob(os.path.expanduser(self.path)))
        return [f for f in found if os.path.isfile(f)]


def configured_sources(cfg) -> list[Source]:
    """data.prepare.sources (name -> fields) as Sources, in config order; ValueError naming the bad field."""
    out = []
    for name in cfg.sources:
        s = dict(cfg.sources[name])
        field = f"data.prepare.sources.{name}"
        if s.get("format") not in ("text", "jsonl", "tfds"):
            raise ValueError(f"{field}.format={s.get('format')!r} must be 'text', 'jsonl' or 'tfds'")
        unknown = set(s) - {f.name for f in dataclasses.fields(Source)}
        if unknown:
            raise ValueError(f"{field} has unknown fields {sorted(unknown)}")
        source = Source(name=name, **s)
        if not source.path:
            raise ValueError(f"{field}.path is empty")
        if source.format != "tfds" and not source.files():
            raise ValueError(f"{field}.path={source.path!r} matches no file")
        out.append(source)
    if not out:
        raise ValueError("data.prepare.sources is empty: name at least one source")
    return out


def read_source(item: tuple[int, int, Source, str]) -> Iterator[dict]:
    """The documents of one file (or TFDS split) of a source, with ids and source tags.

    An id is "<source number>.<file number>.<document number>", zero-padded: unique, stable, and
    sorted in reading order (sources in config order, files in name order), so deduplication,
    which keeps the smallest id, keeps the earliest copy: list trusted sources first."""
    source_index, file_index, source, where = item
    if source.format == "tfds":
        texts = (r[source.field] for r in tfds.data_source(source.path, split=source.split))
        texts = (t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts)
    elif source.format == "jsonl":
        texts = sources.jsonl_documents(where, source.field)
    else:
        texts = sources.text_documents(where, separator=source.separator)
    for i, text in enumerate(texts):
        yield {"id": f"{source_index:03d}.{file_index:06d}.{i:010d}", "text": text, "source": source.name,
               "path": where, "domain": source.domain, "licence": source.licence}


def _bytes(doc: dict) -> int:
    return len(doc["text"].encode("utf-8"))


def length_bucket(num_bytes: int) -> int:
    """The histogram bucket (an upper bound in bytes) of a document length."""
    return next((b for b in LENGTH_BUCKETS if num_bytes <= b), LENGTH_BUCKETS[-1])


def removed_items(doc: dict, reason: str) -> list[tuple[str, tuple[int, int]]]:
    """Stats of a removed document: per reason, and per source and reason."""
    size = (1, _bytes(doc))
    return [(f"removed/{reason}", size), (f"source/{doc['source']}/removed/{reason}", size)]


class _Filter(beam.DoFn):
    """Keeps a document or sends its stats to the 'removed' output with the reason."""

    def __init__(self, decide):
        self._decide = decide

    def process(self, doc):
        reason = self._decide(doc)
        if reason:
            for item in removed_items(doc, reason):
                yield beam.pvalue.TaggedOutput("removed", item)
        else:
            yield doc


def _licence(cfg):
    allow = tuple(cfg.licences)
    return lambda doc: None if filters.licence_allowed(doc["licence"], allow) else f"licence:{doc['licence'] or 'none'}"


def _quality(cfg):
    q = dict(cfg.quality)
    enabled = q.pop("enabled")
    other_languages = {**q, "min_stop_words": 0}  # the stop words are English ones

    def decide(doc):
        if not enabled or doc["code_language"]:  # the heuristics are for natural language
            return None
        problems = filters.quality_problems(doc["text"], q if doc["language"] == "en" else other_languages,
                                            first_only=True)
        return f"quality:{problems[0]}" if problems else None
    return decide


def _blocklist(cfg):
    words = tuple(cfg.blocklist)

    def decide(doc):
        return "blocklist" if words and filters.blocklisted(doc["text"], words) else None
    return decide


def _categorize(doc: dict) -> dict:
    lang, score = categorize.language(doc["text"])
    code = categorize.code_language(doc["text"], doc["path"])
    return {**doc, "language": "code" if code else lang, "language_score": float(score), "code_language": code or ""}


def _scrub(enabled: bool):
    def scrub(doc):
        if not enabled:
            return doc, {}
        text, counts = filters.scrub_pii(doc["text"])
        return {**doc, "text": text}, counts
    return scrub


def _stats_items(doc: dict, stage: str) -> Iterator[tuple[str, tuple[int, int]]]:
    n = _bytes(doc)
    yield f"{stage}/documents", (1, n)
    yield f"{stage}/length/{length_bucket(n)}", (1, n)
    if stage == "output":
        yield f"output/language/{doc['language']}", (1, n)
        yield f"output/domain/{doc['domain'] or 'none'}", (1, n)
        yield f"output/source/{doc['source']}", (1, n)


def _sum_pairs(pairs):
    docs = size = 0
    for d, b in pairs:
        docs, size = docs + d, size + b
    return docs, size


def split_of(doc: dict, validation_fraction: float) -> str:
    """train or validation, by a stable hash of the document id (every runner and host agrees)."""
    return "validation" if sources.is_validation(doc["id"], validation_fraction) else "train"


def documents(root, cfg, source_list: list[Source]) -> tuple[beam.PCollection, beam.PCollection]:
    """(kept documents, stats items (key, (documents, bytes))) of the whole preparation."""
    items = [(i, j, s, f) for i, s in enumerate(source_list)
             for j, f in enumerate(s.files() if s.format != "tfds" else [s.path])]
    docs = root | "Sources" >> beam.Create(items) | "Read" >> beam.FlatMap(read_source) | "Spread" >> beam.Reshuffle()
    stats = [docs | "InputStats" >> beam.FlatMap(_stats_items, "input")]
    docs = docs | "Categorize" >> beam.Map(_categorize)
    for name, decide in (("Licence", _licence(cfg)), ("Quality", _quality(cfg)), ("Blocklist", _blocklist(cfg))):
        out = docs | name >> beam.ParDo(_Filter(decide)).with_outputs("removed", main="kept")
        docs = out.kept
        stats.append(out.removed)
    scrubbed = docs | "ScrubPII" >> beam.Map(_scrub(cfg.pii))
    docs = scrubbed | "Scrubbed" >> beam.Map(lambda pair: pair[0])
    stats.append(scrubbed | "PIIStats" >> beam.FlatMap(
        lambda pair: [(f"pii/{kind}", (count, 0)) for kind, count in sorted(pair[1].items()) if count]))
    if cfg.dedup.exact:
        out = docs | "ExactDedup" >> dedup.ExactDedup()
        docs = out["kept"]
        stats.append(out["removed"] | "ExactRemoved" >> beam.FlatMap(removed_items, "exact_duplicate"))
    if cfg.dedup.near:
        out = docs | "NearDedup" >> dedup.NearDedup(cfg.dedup)
        docs = out["kept"]
        stats.append(out["removed"] | "NearRemoved" >> beam.FlatMap(removed_items, "near_duplicate"))
    stats.append(docs | "OutputStats" >> beam.FlatMap(_stats_items, "output"))
    stats = stats | "AllStats" >> beam.Flatten() | "SumStats" >> beam.CombinePerKey(_sum_pairs)
    return docs, stats


def _write_stats(stats: beam.PCollection, path: str):
    def write(pairs):
        record = {key: {"documents": d, "bytes": b} for key, (d, b) in sorted(pairs)}
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        os.replace(path + ".tmp", path)
    return stats | "CollectStats" >> beam.combiners.ToList() | "WriteStats" >> beam.Map(write)


class PileBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS Beam builder of a pile: train / validation array_record splits of {"text"} records,
    keyed (so ordered) by document id; prepare settings come from `prepare_config`.

    Records hold the text only: TFDS stores a record as a tf.train.Example, whose feature map
    protobuf serialises in an order that differs between processes, so a record of several
    features would not be byte-identical across runs and workers. The per-document tags live in
    the manifest's histograms."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, prepare_config, stats_path: str, **kwargs):
        self._cfg, self._stats_path = prepare_config, stats_path
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager, pipeline):
        del dl_manager
        docs, stats = documents(pipeline, self._cfg, configured_sources(self._cfg))
        _write_stats(stats, self._stats_path)
        fraction = self._cfg.validation_fraction
        keyed = docs | "Example" >> beam.Map(lambda d: (split_of(d, fraction), (d["id"], {"text": d["text"]})))
        return {split: keyed | f"Only{split}" >> beam.Filter(lambda kv, s=split: kv[0] == s)
                | f"Strip{split}" >> beam.Map(lambda kv: kv[1]) for split in SPLITS}

    def _generate_examples(self, examples):  # the splits are PCollections (see _split_generators)
        return examples


def beam_options(cfg) -> beam.options.pipeline_options.PipelineOptions:
    """DirectRunner options: in-process, or multi-process with data.prepare.num_workers workers."""
    options = beam.options.pipeline_options.PipelineOptions
    if cfg.num_workers > 1:  # flags=[]: the options never come from sys.argv (fmjax's flags)
        return options(flags=[], direct_running_mode="multi_processing", direct_num_workers=cfg.num_workers)
    return options(flags=[], direct_running_mode="in_memory")


def build(cfg, data_dir: str, stats_path: str) -> tfds.core.DatasetBuilder:
    """Runs the pipeline into data_dir (TFDS layout); returns the builder (its splits are the pile)."""
    builder = PileBuilder(prepare_config=cfg, stats_path=stats_path, data_dir=data_dir, file_format="array_record")
    runner = beam.runners.create_runner(cfg.runner) if cfg.runner else None
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        beam_runner=runner, beam_options=beam_options(cfg), num_shards=cfg.num_shards or None))
    return builder

