"""Text corpora as random-access sources of {"text": str} documents, stored as TFDS array_record.

Local corpora (the embedded pydoc corpus, a .txt file, a .jsonl file) are written once into a
TFDS array_record dataset under `<cache_dir>/tfds` by `LocalText`, a small TFDS builder whose
config name hashes everything that determines the documents, so different inputs never collide
and the same input is prepared once. Catalog datasets ("tfds") are downloaded and prepared by
TFDS itself. Either way the result is read through TFDS's random-access data source, which is
what grain's `MapDataset.source` needs for exact, shuffled, resumable reading.
"""

import collections.abc
import contextlib
import dataclasses
import difflib
import fcntl
import functools
import hashlib
import json
import os
import pathlib
import sys
from typing import Callable, Iterator

import ml_collections
import tensorflow_datasets as tfds

LOCAL_SPLITS = ("train", "validation")
# pydoc topics are packed into documents of whole paragraphs up to this many characters: a few
# hundred documents of roughly LM-context size instead of 79 very uneven ones.
_PYDOC_DOC_CHARS = 1500
# validate() reads at most this much of a local file, so that it stays cheap on big corpora;
# preparation re-checks the whole file with the same readers and the same errors.
_VALIDATE_BYTES = 64 << 20


def cache_dir(config: ml_collections.ConfigDict) -> pathlib.Path:
    """The root of every cached artefact: data.cache_dir, else $FMJAX_CACHE_DIR, else ~/.cache."""
    root = config.data.cache_dir or os.environ.get("FMJAX_CACHE_DIR") or "~/.cache/fmjax"
    return pathlib.Path(root).expanduser()


@contextlib.contextmanager
def locked(path: pathlib.Path):
    """Holds an exclusive fcntl lock on `path` so that processes sharing a cache take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def is_validation(text: str, fraction: float) -> bool:
    """Stable split assignment: a document's hash, not an RNG, so every run and host agrees."""
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return h < fraction * 2.0**64


# -- Document readers. They raise the user-facing errors, for validate() and preparation alike;
# given a BadRecords (data.skip_bad_records), they count and skip malformed lines instead.

# What a JSON value is, in JSON's words, for errors about a line's contents.
_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
               float: "a number", type(None): "null"}


@dataclasses.dataclass
class BadRecords:
    """The malformed lines a reader skipped instead of failing on them (data.skip_bad_records)."""

    count: int = 0
    first: str = ""  # "line N: why" of the first one

    def describe(self, path: str) -> str:
        records = "record" if self.count == 1 else "records"
        return f"skipped {self.count} malformed {records} of {path} (first: {self.first})"


def _bad_record(skipped: BadRecords | None, path: str, lineno: int, why: str, hint: str = "") -> None:
    """Raises the ValueError naming file:line, or counts the line when `skipped` collects them."""
    if skipped is None:
        raise ValueError(f"{path}:{lineno}: {why}{hint}") from None
    skipped.count += 1
    skipped.first = skipped.first or f"line {lineno}: {why}"


def pydoc_documents(path: str = "", text_field: str = "", separator: str = "",
                    max_bytes: int | None = None, skipped: BadRecords | None = None) -> Iterator[str]:
    """Python's bundled documentation topics, as paragraph-aligned documents (arguments unused)."""
    del path, text_field, separator, max_bytes, skipped
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top

    for name in sorted(topics.topics):
        paragraphs = [p for p in topics.topics[name].split("\n\n") if p.strip()]
        current: list[str] = []
        for p in paragraphs:
            if current and sum(len(c) + 2 for c in current) + len(p) > _PYDOC_DOC_CHARS:
                yield "\n\n".join(current).rstrip()
                current = []
            current.append(p)
        if current:
            yield "\n\n".join(current).rstrip()


def _lines(path: str, max_bytes: int | None,
           skipped: BadRecords | None = None) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 file; decoding per line is exact since b"\\n" is never
    inside a multi-byte UTF-8 sequence, and it lets the error name the line."""
    read = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            read += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _bad_record(skipped, path, lineno, f"not valid UTF-8 ({e.reason} at byte offset {e.start} of "
                            "the line)", "; data.path must be a UTF-8 text file")
            else:
                yield lineno, line
            if max_bytes is not None and read >= max_bytes:
                return


def text_documents(path: str, text_field: str = "", separator: str = "",
                   max_bytes: int | None = None, skipped: BadRecords | None = None) -> Iterator[str]:
    """Documents of a text file: split on `separator`, or blank-line separated blocks if empty."""
    del text_field
    buffer: list[str] = []
    for _, line in _lines(path, max_bytes, skipped):
        if separator:
            buffer.append(line)
            if separator in line:
                *docs, rest = "".join(buffer).split(separator)
                yield from (d.strip() for d in docs if d.strip())
                buffer = [rest]
        elif line.strip():
            buffer.append(line)
        elif buffer:
            yield "".join(buffer).rstrip()
            buffer = []
    last = "".join(buffer)
    if last.strip():
        yield last.strip() if separator else last.rstrip()


def jsonl_records(path: str, max_bytes: int | None = None,
                  skipped: BadRecords | None = None) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) of each non-blank line of a .jsonl file; errors name file:line."""
    for lineno, line in _lines(path, max_bytes, skipped):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            _bad_record(skipped, path, lineno, f"not valid JSON ({e.msg})",
                        "; a .jsonl file has one JSON object per line")
        else:
            yield lineno, record


def _missing_text(record: object, text_field: str) -> str:
    """Why a JSONL record has no string under `text_field`; "" when it has one."""
    if not isinstance(record, dict):
        return (f"has no field data.text_field={text_field!r}; the line is {_JSON_KINDS[type(record)]}, "
                "not an object")
    if text_field not in record:
        return f"has no field data.text_field={text_field!r}; the line has {sorted(record)}"
    if not isinstance(record[text_field], str):
        return (f"field {text_field!r} (data.text_field) is {_JSON_KINDS[type(record[text_field])]}, "
                "not a string")
    return ""


def jsonl_documents(path: str, text_field: str, separator: str = "", max_bytes: int | None = None,
                    skipped: BadRecords | None = None) -> Iterator[str]:
    """The `text_field` string of each JSON object line of a .jsonl file; blank lines skipped."""
    del separator
    for lineno, record in jsonl_records(path, max_bytes, skipped):
        if why := _missing_text(record, text_field):
            _bad_record(skipped, path, lineno, why)
        elif record[text_field].strip():
            yield record[text_field]


# -- The TFDS builder that stores local corpora as array_record.


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
    """Everything that determines a local corpus's documents; `name` is a hash of it."""

    kind: str = ""
    path: str = ""
    text_field: str = ""
    separator: str = ""
    validation_fraction: float = 0.0
    # Not in `name`: a file prepares either to the same documents with or without skipping its
    # malformed lines, or (not skipping them) not at all.
    skip_bad_records: bool = False


class LocalText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes the documents of a local corpus into train/validation array_record splits."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _documents(self) -> Iterator[str]:
        c = self.builder_config
        skipped = BadRecords() if c.skip_bad_records else None  # counted and reported by validate()
        return LOCAL_READERS[c.kind](c.path, c.text_field, c.separator, skipped=skipped)

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        # TFDS cannot write an empty split, so count first and explain in config terms.
        counts = collections.Counter(
            is_validation(d, c.validation_fraction) for d in self._documents())
        if not counts[True] or not counts[False]:
            empty, fix = ("validation", "raise") if not counts[True] else ("train", "lower")
            raise ValueError(
                f"data.validation_fraction={c.validation_fraction} leaves the {empty} split of "
                f"{c.description} empty ({counts[False]} train, {counts[True]} validation "
                f"documents); {fix} data.validation_fraction")
        return {s: self._generate_examples(s == "validation") for s in LOCAL_SPLITS}

    def _generate_examples(self, validation: bool):
        fraction = self.builder_config.validation_fraction
        for i, doc in enumerate(self._documents()):
            if is_validation(doc, fraction) == validation:
                yield i, {"text": doc}


LOCAL_READERS: dict[str, Callable[..., Iterator[str]]] = {
    "pydoc": pydoc_documents,
    "text": text_documents,
    "jsonl": jsonl_documents,
}


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # Part of the cache key only: a changed file is hashed again.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str) -> str:
    """The sha256 hex digest of a file's bytes (hashed again only when its size or mtime changes)."""
    stat = os.stat(path)
    return _file_sha256(path, stat.st_size, stat.st_mtime_ns)


def _skips_bad_records(data: ml_collections.ConfigDict) -> bool:
    # Data sections that fmjax writes itself (labelled.texts_tokenizer's corpus of texts it has
    # just written) have no such field; their lines are never malformed.
    return bool(data.get("skip_bad_records", False))


def _local_config(config: ml_collections.ConfigDict) -> LocalTextConfig:
    """The builder config of a local source: only the fields that matter for that kind."""
    d = config.data
    fraction = float(d.validation_fraction)
    if d.source == "pydoc":
        from pydoc_data import topics  # pylint: disable=g-import-not-at-top

        # The topics differ between CPython versions, so the content is the identity.
        identity = ("pydoc", _digest(sorted(topics.topics.items())), _PYDOC_DOC_CHARS, fraction)
        return LocalTextConfig(name="pydoc_" + _digest(*identity), version="1.0.0",
                               description="the pydoc corpus", kind="pydoc",
                               validation_fraction=fraction)
    path = os.path.abspath(d.path)
    field = d.text_field if d.source == "jsonl" else ""
    separator = d.doc_separator if d.source == "text" else ""
    identity = (d.source, path, file_sha256(path), field, separator, fraction)
    return LocalTextConfig(name=f"{d.source}_{_digest(*identity)}", version="1.0.0",
                           description=path, kind=d.source, path=path, text_field=field,
                           separator=separator, validation_fraction=fraction,
                           skip_bad_records=_skips_bad_records(d))


def _tfds_dir(config: ml_collections.ConfigDict) -> pathlib.Path:
    return cache_dir(config) / "tfds"


def _check_split(split: str, valid: collections.abc.Iterable[str], what: str) -> None:
    valid = sorted(valid)
    if split.split("[")[0] not in valid:
        raise ValueError(f"split {split!r} does not exist in {what}; valid splits are {valid} "
                         "(set data.train_split / data.eval_split to one of them)")


# -- The registry: how each data.source is validated, identified and loaded.


def _validate_local(config: ml_collections.ConfigDict) -> None:
    d = config.data
    if not 0.0 < d.validation_fraction < 1.0:
        raise ValueError(f"data.validation_fraction={d.validation_fraction} must be in (0, 1) for "
                         f"data.source={d.source!r}")
    for field in ("train_split", "eval_split"):
        split = d[field]
        if split.split("[")[0] not in LOCAL_SPLITS:
            raise ValueError(f"data.{field}={split!r} is not a split of local data.source="
                             f"{d.source!r}; valid splits are {list(LOCAL_SPLITS)}")
    if d.source == "pydoc":
        return
    if not d.path:
        raise ValueError(f"data.source={d.source!r} reads the file data.path, which is empty; set "
                         "data.path to a " + ("UTF-8 .txt file" if d.source == "text" else
                                              ".jsonl file with one JSON object per line"))
    if os.path.isdir(d.path):
        raise ValueError(f"data.path={d.path!r} is a directory; set it to the file itself")
    if not os.path.isfile(d.path):
        raise ValueError(f"data.path={d.path!r} does not exist or is not a file")
    if d.source == "jsonl" and not d.text_field:
        raise ValueError("data.text_field is empty; set it to the JSON field holding the text")
    stat = os.stat(d.path)
    field = d.text_field if d.source == "jsonl" else ""
    separator = d.doc_separator if d.source == "text" else ""
    _scan(d.source, d.path, field, separator, _skips_bad_records(d), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _scan(kind: str, path: str, text_field: str, separator: str, skip: bool, size: int,
          mtime_ns: int) -> None:
    """Reads the first _VALIDATE_BYTES of a local file once per version of it (validate() runs for
    every split loaded): its bad lines raise here, or are counted and reported once."""
    del mtime_ns  # Part of the cache key only.
    skipped = BadRecords() if skip else None
    try:
        docs = sum(1 for _ in LOCAL_READERS[kind](path, text_field, separator, _VALIDATE_BYTES,
                                                  skipped=skipped))
    except OSError as e:
        raise ValueError(f"data.path={path!r} cannot be read ({e.strerror or e})") from None
    report = skipped.describe(path) if skipped and skipped.count else ""
    if report and size > _VALIDATE_BYTES:
        report += f", in its first {_VALIDATE_BYTES >> 20} MiB"
    if not docs:
        why = f"data.skip_bad_records: {report}" if report else "the file is empty or blank"
        raise ValueError(f"data.path={path!r} contains no documents ({why})")
    if report:
        print(f"fmjax: warning: {report}; data.skip_bad_records=True", file=sys.stderr, flush=True)


def _load_local(config: ml_collections.ConfigDict, split: str):
    builder_config = _local_config(config)
    data_dir = _tfds_dir(config)
    with locked(data_dir / f"{builder_config.name}.lock"):
        # Built inside the lock: a builder made before another process finished preparing would
        # hold stale (empty) split info.
        builder = LocalText(config=builder_config, data_dir=str(data_dir),
                            file_format="array_record")
        builder.download_and_prepare(file_format="array_record")
    _check_split(split, builder.info.splits.keys(), builder_config.description)
    return builder.as_data_source(split=split), "text"


def _local_identity(config: ml_collections.ConfigDict) -> str:
    return _local_config(config).name


def _catalog_builder(config: ml_collections.ConfigDict):
    """The TFDS builder for data.tfds_name (cheap: nothing is downloaded)."""
    name = config.data.tfds_name
    if not name:
        raise ValueError("data.source='tfds' needs data.tfds_name, e.g. 'lm1b'; it is empty")
    try:
        return tfds.builder(name, data_dir=str(_tfds_dir(config)))
    except tfds.core.registered.DatasetNotFoundError:
        base = name.split("/")[0].split(":")[0]
        close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False))
        hint = f"; did you mean one of {close}?" if close else ""
        raise ValueError(f"data.tfds_name={name!r} is not a registered TFDS dataset{hint} "
                         "(tfds.list_builders() lists the valid names)") from None


def _validate_catalog(config: ml_collections.ConfigDict) -> None:
    builder = _catalog_builder(config)
    features = builder.info.features
    if isinstance(features, tfds.features.FeaturesDict) and config.data.text_field not in features:
        raise ValueError(f"data.text_field={config.data.text_field!r} is not a feature of TFDS "
                         f"dataset {config.data.tfds_name!r}; its features are {sorted(features)}")


def _load_catalog(config: ml_collections.ConfigDict, split: str):
    name = config.data.tfds_name
    data_dir = _tfds_dir(config)
    with locked(data_dir / f"{name.replace('/', '_')}.lock"):
        builder = _catalog_builder(config)
        try:
            builder.download_and_prepare(file_format="array_record")
        except OSError as e:  # Includes network errors (requests' ConnectionError is an OSError).
            raise ValueError(
                f"could not download and prepare TFDS dataset data.tfds_name={name!r} into "
                f"{data_dir}: {e}. Prepare it once where the internet is reachable, with the same "
                "data.cache_dir, or use a local data.source ('pydoc', 'text', 'jsonl')") from e
    _check_split(split, builder.info.splits.keys(), f"TFDS dataset {name!r}")
    source = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
    return source, config.data.text_field


def _catalog_identity(config: ml_collections.ConfigDict) -> str:
    d = config.data
    return "tfds_" + _digest("tfds", d.tfds_name, d.train_split, d.text_field)


def _validate_pile(config: ml_collections.ConfigDict) -> None:
    from fmjax.data.prepare import pile  # local: preparation imports this module
    path = pile.resolve(config)
    for field in ("train_split", "eval_split"):
        split = config.data[field]
        if split.split("[")[0] not in LOCAL_SPLITS:
            raise ValueError(f"data.{field}={split!r} is not a split of pile {path}; valid splits are "
                             f"{list(LOCAL_SPLITS)}")


def _pile_identity(config: ml_collections.ConfigDict) -> str:
    from fmjax.data.prepare import pile
    m = pile.manifest(pile.resolve(config))
    return f"pile_{m['name']}_{m['version']}"


def _load_pile(config: ml_collections.ConfigDict, split: str):
    from fmjax.data.prepare import pile
    return pile.load_split(pile.resolve(config), split), "text"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """How one data.source is checked, identified (for cache keys) and read."""

    validate: Callable[[ml_collections.ConfigDict], None]
    identity: Callable[[ml_collections.ConfigDict], str]
    # (config, split) -> (TFDS random-access source, name of the text feature in its records).
    load: Callable[[ml_collections.ConfigDict, str], tuple[collections.abc.Sequence, str]]


_LOCAL = Dataset(validate=_validate_local, identity=_local_identity, load=_load_local)
DATASETS: dict[str, Dataset] = {
    "pydoc": _LOCAL,
    "text": _LOCAL,
    "jsonl": _LOCAL,
    "tfds": Dataset(validate=_validate_catalog, identity=_catalog_identity, load=_load_catalog),
    # A prepared data pile (fmjax/data/prepare), data.pile = "<name>@<version>".
    "pile": Dataset(validate=_validate_pile, identity=_pile_identity, load=_load_pile),
}


def _dataset(config: ml_collections.ConfigDict) -> Dataset:
    if config.data.source not in DATASETS:
        raise ValueError(f"data.source={config.data.source!r} is unknown; valid sources are "
                         f"{sorted(DATASETS)}")
    return DATASETS[config.data.source]


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for any data-source setting a user can get wrong, without preparing."""
    _dataset(config).validate(config)


def dataset_id(config: ml_collections.ConfigDict) -> str:
    """A short name that changes whenever the configured documents do (for cache keys)."""
    return _dataset(config).identity(config)


class TextSource(collections.abc.Sequence):
    """Random access to one split's documents as {"text": str} records."""

    def __init__(self, records: collections.abc.Sequence, text_field: str, name: str):
        self._records = records
        self._text_field = text_field
        self.name = name

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, str]:
        text = self._records[index][self._text_field]
        return {"text": text.decode("utf-8") if isinstance(text, bytes) else str(text)}

    def __repr__(self) -> str:
        return f"TextSource({self.name}, {len(self)} documents)"


def load_split(config: ml_collections.ConfigDict, split: str) -> TextSource:
    """The documents of `split` (e.g. data.train_split), preparing the dataset on first use."""
    dataset = _dataset(config)
    dataset.validate(config)
    records, text_field = dataset.load(config, split)
    return TextSource(records, text_field, f"{dataset_id(config)}:{split}")
