"""Labelled images for diffusion and image classification: sources, the split, grain batches.

data.source selects where (image, label) examples come from (SOURCES):
  digits  scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16 scaled to
          0..255). There is no official split: an image is in validation when the hash of its index
          and pixels says so (data.validation_fraction), the same in every run and process.
  mnist   the idx files in the directory data.path: train-images-idx3-ubyte, train-labels-idx1-ubyte,
          t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each gzipped (.gz) or not. Train = the
          train files, validation = t10k.
  tfds    the TFDS image dataset data.tfds_name (features "image" and "label"), splits
          data.train_split and data.eval_split, already prepared as array_record in
          <cache_dir>/tfds; nothing is downloaded. It is read into memory whole.
digits and mnist use the splits "train" and "validation"; their classes are "zero".."nine".
A non-square image is centre-cropped to a square; an image whose side is not data.image_size is
resized by PIL's bilinear weights (antialiased when shrinking), applied in float and rounded once,
so within 1 of PIL's own uint8 resize; e.g. mnist 28 -> 32. Resizing, unlike zero-padding, suits
every source (8x8 digits too) and keeps a digit's share of the frame. data.max_examples > 0
keeps that many train examples, picked by a stable hash of their index (a smaller cap keeps a
subset of a larger one). A batch is a dict of numpy arrays, per process:

  images_BxHxWxC              float32  pixels scaled from 0..255 to [-1, 1]
  labels_B                    int32    class index
  weight_B                    float32  1.0; 0.0 on the rows that pad the last eval batch
with data.captions, a caption of the label (caption()) tokenized like labelled.tokenize:
  caption_inputs_BxL          int32    [bos] + token ids (truncated to fit) + [eos], then pad id
  caption_segment_ids_BxL     int32    1 on real tokens, 0 on padding
  caption_positions_BxL       int32    0 .. n-1 on real tokens, 0 on padding

N: a split's examples (in Images); B: local batch (train.batch_size // process_count);
H = W: data.image_size; C: the source's channels (1 for digits and mnist); L: data.seq_len.
A train example's caption template is picked by a hash of (seed, example, epoch), so it varies
between epochs and is the same on resume; an eval example's by its index.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import os
import struct
import zlib
from typing import Callable

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from fmjax.data import labelled
from fmjax.data import pipeline, sources

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT_NUMERALS = {**{name: i for i, name in enumerate(DIGIT_NAMES)}, **{str(i): i for i in range(10)}}
LOCAL_SPLITS = ("train", "validation")
_DIGIT_TEMPLATES = ("a handwritten {word}", "the digit {word}", "a picture of the number {numeral}",
                    "a handwritten digit {numeral}", "the number {word}",
                    "an image of a handwritten {numeral}", "{word}", "a drawing of the digit {word}")
_TEMPLATES = ("a picture of {a} {name}", "a photo of {a} {name}", "an image of {a} {name}", "{a} {name}",
              "a small picture of {a} {name}", "the {name}")
_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "validation": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_PREFETCH_BATCHES = 4


@dataclasses.dataclass(frozen=True, eq=False)
class Images:
    """Class names (index = label) and each split's uint8 images_NxHxWxC and int32 labels_N (read-only)."""
    class_names: tuple[str, ...]
    train_images: np.ndarray
    train_labels: np.ndarray
    validation_images: np.ndarray
    validation_labels: np.ndarray


def caption(class_name: str, key: int) -> str:
    """A caption of the class, in the template that `key` picks (any int; the same key, the same text)."""
    if class_name in _DIGIT_NUMERALS:  # "seven" or "7" (TFDS names mnist's classes "0".."9")
        word = DIGIT_NAMES[_DIGIT_NUMERALS[class_name]]
        template = _DIGIT_TEMPLATES[key % len(_DIGIT_TEMPLATES)]
        return template.format(word=word, numeral=_DIGIT_NUMERALS[class_name])
    name = class_name.replace("_", " ")
    article = "an" if name[:1].lower() in tuple("aeiou") else "a"
    return _TEMPLATES[key % len(_TEMPLATES)].format(a=article, name=name)


def caption_corpus(config) -> list[str]:
    """Every caption the templates give the dataset's classes (to train a caption tokenizer on)."""
    names = load(config).class_names
    count = max(len(_DIGIT_TEMPLATES), len(_TEMPLATES))
    return list(dict.fromkeys(caption(name, key) for name in names for key in range(count)))


def caption_tokenizer(config) -> str:
    """A sentencepiece model (model.vocab_size, data.tokenizer_type) trained on caption_corpus (cached)."""
    return labelled.texts_tokenizer(config, caption_corpus(config), validation_fraction=0.05)


def caption_row(tokenizer, seq_len: int, text: str) -> dict[str, np.ndarray]:
    """The caption_* arrays of one caption (no batch axis), as the batches hold them."""
    row = labelled.tokenize(tokenizer, seq_len)({"text": text, "label": 0})
    return {f"caption_{k}": row[k] for k in ("inputs", "segment_ids", "positions")}


def _hash(*parts) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "big")


def _kept(n: int, max_examples: int) -> np.ndarray:
    """The sorted indices of the train examples data.max_examples keeps (0: all)."""
    if not max_examples or max_examples >= n:
        return np.arange(n)
    keys = [hashlib.sha256(b"keep:%d" % i).digest() for i in range(n)]
    return np.sort(np.array(sorted(range(n), key=keys.__getitem__)[:max_examples]))


# -- Sources: (config) -> (class names, train (images, labels), validation (images, labels)), uncapped
# images as NxHxWxC uint8 arrays or lists of HxWxC arrays (tfds images may differ in size).


def _read_digits(config):
    from sklearn import datasets  # pylint: disable=g-import-not-at-top  (slow; only digits needs it)

    digits = datasets.load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    fraction = config.data.validation_fraction
    # Like sources.is_validation, on the index and pixels: identical images may land apart.
    hashes = [hashlib.sha256(b"digits:%d:" % i + image.tobytes()).digest() for i, image in enumerate(images)]
    validation = np.array([int.from_bytes(h[:8], "big") < fraction * 2.0**64 for h in hashes])
    splits = [(images[mask], digits.target[mask]) for mask in (~validation, validation)]
    for name, (_, labels) in zip(LOCAL_SPLITS, splits):
        if not len(labels):
            raise ValueError(f"data.validation_fraction={fraction} leaves the digits {name} split empty")
    return DIGIT_NAMES, splits[0], splits[1]


def read_idx(path: str, ndim: int) -> np.ndarray:
    """The uint8 array of an idx file (gzipped or not), after checking its magic number and size."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: cannot be read or decompressed ({e}); it is truncated or not an idx "
                         "file") from None
    magic = bytes([0, 0, 0x08, ndim])
    if raw[:4] != magic:
        raise ValueError(f"{path}: magic number {raw[:4].hex()} is not {magic.hex()} (an idx file of "
                         f"{ndim}-d unsigned bytes); is it the right file?")
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else ()
    size = header + int(np.prod(dims)) if dims else None
    if len(raw) != size:
        raise ValueError(f"{path}: {len(raw)} bytes, but its header says {dims or 'nothing'} needs "
                         f"{size or 'more'}; the file is truncated or wrong")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _mnist_paths(directory: str) -> dict[str, str]:
    """Each idx file name -> its path in data.path, the gzipped one first."""
    if not directory or not os.path.isdir(directory):
        raise ValueError(f"data.path={directory!r} is not a directory; data.source='mnist' needs the "
                         "directory of the four MNIST idx files")
    paths = {}
    for name in sum(_MNIST_FILES.values(), ()):
        found = [p for p in (os.path.join(directory, name + ".gz"), os.path.join(directory, name))
                 if os.path.isfile(p)]
        if not found:
            raise ValueError(f"data.path={directory!r} has no {name}.gz (nor {name}); data.source='mnist' "
                             f"needs {[n + '.gz' for n in sum(_MNIST_FILES.values(), ())]}")
        paths[name] = found[0]
    return paths


def _read_mnist(config):
    paths = _mnist_paths(config.data.path)
    splits = []
    for image_name, label_name in _MNIST_FILES.values():
        images, labels = read_idx(paths[image_name], 3), read_idx(paths[label_name], 1)
        if len(images) != len(labels):
            raise ValueError(f"{paths[image_name]} holds {len(images)} images but {paths[label_name]} "
                             f"{len(labels)} labels")
        if labels.max(initial=0) > 9:
            raise ValueError(f"{paths[label_name]}: label {labels.max()} is not a digit 0..9")
        splits.append((images[..., None], labels))
    return DIGIT_NAMES, splits[0], splits[1]


def _tfds_builder(config):
    """The prepared builder of data.tfds_name, its features and splits checked; never downloads."""
    d = config.data
    data_dir = sources.cache_dir(config) / "tfds"
    if not d.tfds_name:
        raise ValueError("data.source='tfds' needs data.tfds_name, e.g. 'cifar10'; it is empty")
    try:
        builder = tfds.builder(d.tfds_name, data_dir=str(data_dir))
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"data.tfds_name={d.tfds_name!r} is not a registered TFDS dataset "
                         "(tfds.list_builders() lists the valid names)") from None
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(f"data.tfds_name={d.tfds_name!r} has features {sorted(features)}; an image "
                         "dataset needs 'image' and 'label'")
    if not builder.is_prepared():
        raise ValueError(
            f"data.tfds_name={d.tfds_name!r} is not prepared in {data_dir} (image datasets are never "
            "downloaded here). Prepare it where the internet is reachable with tfds.builder("
            f"{d.tfds_name!r}, data_dir={str(data_dir)!r}).download_and_prepare(file_format='array_record'), "
            "or point data.cache_dir at a directory whose tfds/ holds it")
    for field in ("train_split", "eval_split"):
        if d[field].split("[")[0] not in builder.info.splits:
            raise ValueError(f"data.{field}={d[field]!r} is not a split of TFDS dataset {d.tfds_name!r}; "
                             f"valid splits are {sorted(builder.info.splits)}")
    return builder, data_dir


def _read_tfds(config):
    d = config.data
    builder, data_dir = _tfds_builder(config)
    splits = []
    for split, cap in ((d.train_split, d.max_examples), (d.eval_split, 0)):
        try:
            source = tfds.data_source(d.tfds_name, split=split, data_dir=str(data_dir), download=False)
        except NotImplementedError as e:  # Prepared as tfrecord, which has no random access.
            raise ValueError(f"data.tfds_name={d.tfds_name!r} in {data_dir} is not array_record: {e}"
                         ) from None
        records = source.__getitems__([int(i) for i in _kept(len(source), cap)])
        splits.append(([r["image"] for r in records], np.array([r["label"] for r in records])))
    return tuple(builder.info.features["label"].names), splits[0], splits[1]


SOURCES: dict[str, Callable[[ml_collections.ConfigDict], tuple]] = {
    "digits": _read_digits,
    "mnist": _read_mnist,
    "tfds": _read_tfds,
}


@functools.lru_cache(maxsize=8)
def _bilinear(side: int, size: int) -> np.ndarray:
    """size x side: PIL's bilinear resampling weights (antialiased when shrinking), in float."""
    return np.stack([np.asarray(Image.fromarray(row[None], mode="F").resize((size, 1), Image.BILINEAR))[0]
                     for row in np.eye(side, dtype=np.float32)], axis=1)


def _resize(images_NxHxWxC: np.ndarray, size: int) -> np.ndarray:
    """Centre-cropped to squares, then resized to size x size by PIL's bilinear weights; uint8."""
    _, h, w, _ = images_NxHxWxC.shape
    side = min(h, w)
    x = images_NxHxWxC[:, (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    if side == size:
        return x
    weights = _bilinear(side, size)
    out = [np.einsum("yh,nhwc,xw->nyxc", weights, x[i:i + 4096].astype(np.float32), weights, optimize=True)
           for i in range(0, len(x), 4096)]  # in chunks, to bound the float copy
    return np.clip(np.round(np.concatenate(out)), 0, 255).astype(np.uint8)


def _finish(images, labels, size: int, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    if keep is not None and len(keep) < len(labels):
        images, labels = images[keep], labels[keep]
    if isinstance(images, np.ndarray):
        images = _resize(images, size)
    else:  # TFDS images may differ in size.
        images = np.stack([_resize(np.asarray(image, np.uint8)[None], size)[0] for image in images])
    images, labels = np.ascontiguousarray(images, np.uint8), labels.astype(np.int32)
    images.setflags(write=False)  # Shared by every caller of the cached load().
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=4)
def _load(key: str) -> Images:
    config = ml_collections.ConfigDict(json.loads(key)["config"])
    d = config.data
    names, (train_x, train_y), (val_x, val_y) = SOURCES[d.source](config)
    # tfds capped while reading (to read less); the others here.
    keep = None if d.source == "tfds" else _kept(len(train_y), d.max_examples)
    train = _finish(train_x, train_y, d.image_size, keep)
    validation = _finish(val_x, val_y, d.image_size)
    for split, labels in (("train", train[1]), ("validation", validation[1])):
        if labels.size and not 0 <= labels.min() <= labels.max() < len(names):
            raise ValueError(f"the {split} split has label {labels.max()}, but the dataset has "
                             f"{len(names)} class names")
    return Images(tuple(names), *train, *validation)


def load(config) -> Images:
    """The images of the config, read once per process for unchanged files."""
    d = config.data
    if d.source not in SOURCES:
        raise ValueError(f"data.source={d.source!r} is not an image source; valid: {list(SOURCES)}")
    files = []
    if d.source == "mnist":
        paths = _mnist_paths(d.path).values()
        files = [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    fields = ("source", "path", "tfds_name", "train_split", "eval_split", "validation_fraction",
              "image_size", "max_examples", "cache_dir")
    subset = {"data": {k: d[k] for k in fields}}
    return _load(json.dumps({"config": subset, "files": files}, sort_keys=True))


def validate(config, process_count: int = 1) -> Images:
    """Every check of the image data (fields, files, sizes, batching); returns the images."""
    d = config.data
    if d.source not in SOURCES:
        raise ValueError(f"data.source={d.source!r} is not an image source; valid: {list(SOURCES)}")
    if d.image_size < 8 or d.image_size % 4:
        raise ValueError(f"data.image_size={d.image_size} must be at least 8 and a multiple of 4")
    if d.source == "digits" and not 0 < d.validation_fraction < 1:
        raise ValueError(f"data.validation_fraction={d.validation_fraction} must be in (0, 1) for "
                         "data.source='digits'")
    if d.source != "tfds":
        for field, split in (("train_split", "train"), ("eval_split", "validation")):
            if d[field] != split:
                raise ValueError(f"data.{field}={d[field]!r}; data.source={d.source!r} has the splits "
                                 f"{list(LOCAL_SPLITS)}, so set it to {split!r}")
    if d.max_examples < 0 or d.read_threads < 0:
        raise ValueError(f"data.max_examples={d.max_examples} (0: all) and data.read_threads="
                         f"{d.read_threads} must be 0 or more")
    if d.captions and d.seq_len < 3:
        raise ValueError(f"data.seq_len={d.seq_len} must be at least 3 with data.captions (room for "
                         "bos, eos and one token)")
    pipeline.local_batch_size(config, process_count)
    images = load(config)
    if len(images.train_labels) < process_count:
        raise ValueError(f"{len(images.train_labels)} train images cannot give each of {process_count} "
                         "processes one (data.max_examples too small?)")
    if not len(images.validation_labels):
        raise ValueError(f"the validation split (data.eval_split={d.eval_split!r}) has no images")
    return images


def _rows(config, images: np.ndarray, labels: np.ndarray, class_names, tokenizer):
    """(example index, caption key) -> one row of the batch format (no batch axis)."""
    if config.data.captions and tokenizer is None:
        raise ValueError("data.captions is set, so the batches need a caption tokenizer; none was given")

    def row(index: int, key: int) -> dict[str, np.ndarray]:
        label = int(labels[index])
        out = {"images": images[index].astype(np.float32) / 127.5 - 1.0, "labels": np.int32(label),
               "weight": np.float32(1.0)}
        if config.data.captions:
            out.update(caption_row(tokenizer, config.data.seq_len, caption(class_names[label], key)))
        return out
    return row


def make_train_iterator(config, images: Images, process_index: int = 0, process_count: int = 1,
                        tokenizer=None) -> grain.DatasetIterator:
    """An endless iterator of this process's batches, reshuffled every epoch (no augmentation).

    Its get_state() is JSON-serialisable; set_state() on a fresh iterator resumes exactly.
    """
    local_batch = pipeline.local_batch_size(config, process_count)
    n = len(images.train_labels)
    row = _rows(config, images.train_images, images.train_labels, images.class_names, tokenizer)
    ds = grain.MapDataset.range(n)[process_index::process_count]
    shard = len(ds)
    if not shard:
        raise ValueError(f"{n} train images cannot give process {process_index} of {process_count} one")
    seed = config.seed
    # grain mixes the epoch into the seed after repeat(), so each epoch has its own order; the
    # stream position i gives the epoch, and with it the caption template.
    ds = ds.shuffle(seed=seed % 2**32).repeat(None)
    ds = ds.map_with_index(lambda i, index: row(index, _hash(seed, int(index), i // shard)))
    ds = ds.batch(local_batch, drop_remainder=True)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=config.data.read_threads,
                                                     prefetch_buffer_size=_PREFETCH_BATCHES)))


def make_eval_batches(config, images: Images, process_index: int = 0, process_count: int = 1,
                      tokenizer=None) -> list[dict[str, np.ndarray]]:
    """The first train.eval_batches global batches of the validation examples, in order (the last
    padded by weight-0 rows), of which this process takes its rows."""
    pipeline.local_batch_size(config, process_count)  # checks divisibility
    global_batch = config.train.batch_size
    row = _rows(config, images.validation_images, images.validation_labels, images.class_names, tokenizer)
    count = min(len(images.validation_labels), config.train.eval_batches * global_batch)
    ds = grain.MapDataset.range(count).map(lambda index: row(index, index))
    batches = list(ds.batch(global_batch, drop_remainder=False))
    return pipeline.process_eval_batches(batches, global_batch, process_index, process_count)
