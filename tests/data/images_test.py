"""Image data: sources, stable splits, resizing, batches, captions, exact resume, eval padding, errors."""
import collections
import gzip
import json
import pathlib
import struct
import types

import numpy as np
import pytest
from PIL import Image

from fmjax import config_lib
from fmjax.data import images

SEQ_LEN = 12
SHARED_MNIST = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "images" / "mnist"


def make_config(root, **data):
    c = config_lib.base_config()
    c.train.batch_size = 8
    c.data.update(source="digits", path="", tfds_name="", train_split="train", eval_split="validation",
                  validation_fraction=0.1, image_size=8, max_examples=0, cache_dir=str(root / "cache"),
                  read_threads=0, captions=False, seq_len=SEQ_LEN)
    c.data.update(**data)
    return c


def stub_tokenizer():
    """One id per word of the digit captions, 1 for any other word; `decode` joins the words back."""
    texts = [images.caption(name, key) for name in images.DIGIT_NAMES for key in range(8)]
    words = sorted({w for text in texts for w in text.split()})
    vocab = {w: 5 + i for i, w in enumerate(words)}
    inverse = {i: w for w, i in vocab.items()}

    def encode(text):
        return [vocab.get(w, 1) for w in text.split()]

    def decode(ids):
        return " ".join(inverse[i] for i in ids if i >= 5)
    return types.SimpleNamespace(encode=encode, decode=decode, pad_id=0, bos_id=2, eos_id=3,
                                 vocab_size=len(vocab) + 5)


def multiset(images_NxHxWxC) -> collections.Counter:
    return collections.Counter(image.tobytes() for image in np.asarray(images_NxHxWxC))


def write_idx(path: pathlib.Path, array: np.ndarray, compress: bool = True):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_mnist(root: pathlib.Path, train=20, test=6, compress=True):
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", train), ("t10k", test)):
        arrays[prefix] = (rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n))
        suffix = ".gz" if compress else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", arrays[prefix][0], compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", arrays[prefix][1], compress)
    return arrays


def test_digits_are_ten_classes_split_once_and_deterministically(tmp_path):
    config = make_config(tmp_path)
    data = images.validate(config)
    assert data.class_names == images.DIGIT_NAMES
    assert data.train_images.shape[1:] == data.validation_images.shape[1:] == (8, 8, 1)
    assert data.train_images.dtype == np.uint8 and data.train_labels.dtype == np.int32
    n_train, n_val = len(data.train_labels), len(data.validation_labels)
    assert n_train + n_val == 1797 and 0.07 < n_val / 1797 < 0.13
    assert set(data.train_labels) == set(data.validation_labels) == set(range(10))
    assert data.train_images.max() == 255 and not data.train_images.flags.writeable
    # Together the splits are exactly the bundled images, each once.
    from sklearn import datasets
    every = np.round(datasets.load_digits().images * (255 / 16)).astype(np.uint8)[..., None]
    assert multiset(data.train_images) + multiset(data.validation_images) == multiset(every)
    images._load.cache_clear()
    again = images.load(config)
    assert again is not data
    np.testing.assert_array_equal(again.validation_images, data.validation_images)
    np.testing.assert_array_equal(again.train_labels, data.train_labels)
    # A capped train split keeps a subset (smaller caps inside larger ones); validation is unchanged.
    small, large = (images.load(make_config(tmp_path, max_examples=m)) for m in (50, 200))
    assert len(small.train_labels) == 50 and len(large.train_labels) == 200
    assert not multiset(small.train_images) - multiset(large.train_images)
    np.testing.assert_array_equal(small.validation_images, data.validation_images)


def test_batches_hold_images_in_minus_one_to_one(tmp_path):
    config = make_config(tmp_path)
    data = images.load(config)
    batch = next(images.make_train_iterator(config, data))
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "images": ((8, 8, 8, 1), "float32"), "labels": ((8,), "int32"), "weight": ((8,), "float32")}
    first = images.make_eval_batches(config, data)[0]
    np.testing.assert_allclose(first["images"], data.validation_images[:8] / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(first["labels"], data.validation_labels[:8])
    everything = np.concatenate([b["images"] for b in images.make_eval_batches(config, data)])
    assert everything.min() == -1.0 and everything.max() == 1.0


def test_resize_is_pil_bilinear_and_keeps_constant_images(tmp_path):
    data = images.load(make_config(tmp_path))
    resized = images.load(make_config(tmp_path, image_size=12))
    assert resized.validation_images.shape[1:] == (12, 12, 1)
    pil = np.stack([np.asarray(Image.fromarray(x[..., 0]).resize((12, 12), Image.BILINEAR))
                    for x in data.validation_images])
    assert np.abs(pil.astype(int) - resized.validation_images[..., 0]).max() <= 1  # PIL rounds twice
    constant = np.full((2, 20, 28, 3), 77, np.uint8)  # not square: centre-cropped to 20x20 first
    np.testing.assert_array_equal(images._resize(constant, 16), np.full((2, 16, 16, 3), 77))
    ramp = np.broadcast_to(np.arange(28, dtype=np.uint8)[None, None, :, None], (1, 20, 28, 1))
    np.testing.assert_array_equal(images._resize(ramp, 20)[0, 0, :, 0], np.arange(4, 24))


def test_train_iterator_resumes_exactly_after_a_json_round_trip(tmp_path):
    config = make_config(tmp_path, max_examples=40, captions=True)
    data, tok = images.load(config), stub_tokenizer()
    it = images.make_train_iterator(config, data, tokenizer=tok)
    for _ in range(7):  # past an epoch boundary (5 batches)
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    resumed = images.make_train_iterator(config, data, tokenizer=tok)
    resumed.set_state(state)
    for want, got in zip(expected, (next(resumed) for _ in range(5))):
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])


def test_processes_read_disjoint_shards_covering_the_split(tmp_path):
    config = make_config(tmp_path, max_examples=44)
    data = images.load(config)
    seen = collections.Counter()
    for index in range(2):
        it = images.make_train_iterator(config, data, index, 2)
        rows = np.concatenate([next(it)["images"] for _ in range(6)])[:22]  # the first epoch of the shard
        assert len(rows) == 22
        seen += multiset(np.round((rows + 1) * 127.5).astype(np.uint8))
    assert seen == multiset(data.train_images)


def test_epochs_are_reshuffled_and_every_example_comes_once_per_epoch(tmp_path):
    config = make_config(tmp_path, max_examples=40)
    data = images.load(config)
    it = images.make_train_iterator(config, data)
    epochs = [np.concatenate([next(it)["images"] for _ in range(5)]) for _ in range(2)]
    assert multiset(np.round((epochs[0] + 1) * 127.5).astype(np.uint8)) == multiset(data.train_images)
    assert not np.array_equal(epochs[0], epochs[1])


def test_eval_batches_hold_every_example_once_padding_weighted_zero(tmp_path):
    config = make_config(tmp_path)
    config.train.eval_batches = 1000  # more than the split needs: every example
    data = images.load(config)
    n = len(data.validation_labels)
    assert n % 8, "the test needs a padded last batch"
    batches = images.make_eval_batches(config, data)
    weight = np.concatenate([b["weight"] for b in batches])
    assert len(weight) == -(-n // 8) * 8 and weight[:n].all() and not weight[n:].any()
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches])[:n], data.validation_labels)
    halves = [images.make_eval_batches(config, data, i, 2) for i in range(2)]
    for whole, first, second in zip(batches, *halves):
        for k in whole:
            np.testing.assert_array_equal(whole[k], np.concatenate([first[k], second[k]]))
    config.train.eval_batches = 2  # a prefix: the first two batches
    capped = images.make_eval_batches(config, data)
    assert len(capped) == 2 and all(np.array_equal(a["images"], b["images"]) for a, b in zip(capped, batches))


def test_captions_are_tokenized_name_the_label_and_vary(tmp_path):
    config = make_config(tmp_path, max_examples=16, captions=True)
    data, tok = images.load(config), stub_tokenizer()
    assert images.caption("seven", 2) == "a picture of the number 7" == images.caption("7", 2)
    assert images.caption("seven", 5) == images.caption("seven", 5 + 8 * 1000)
    assert images.caption("apple_pie", 0) == "a picture of an apple pie"
    corpus = images.caption_corpus(config)
    assert len(corpus) == len(set(corpus)) == 80 and "a handwritten seven" in corpus
    it = images.make_train_iterator(config, data, tokenizer=tok)
    per_label = collections.defaultdict(set)
    for _ in range(12):  # six epochs of two batches
        batch = next(it)
        assert batch["caption_inputs"].shape == (8, SEQ_LEN) and batch["caption_inputs"].dtype == np.int32
        for ids, segments, positions, label in zip(batch["caption_inputs"], batch["caption_segment_ids"],
                                                   batch["caption_positions"], batch["labels"]):
            n = int(segments.sum())
            assert ids[0] == 2 and ids[n - 1] == 3 and not ids[n:].any() and segments[:n].all()
            np.testing.assert_array_equal(positions[:n], np.arange(n))
            text = tok.decode(ids[1:n - 1])
            assert text in {images.caption(data.class_names[label], k) for k in range(8)}
            per_label[int(label)].add(text)
    assert max(len(texts) for texts in per_label.values()) >= 4  # templates vary across epochs
    eval_batches = images.make_eval_batches(config, data, tokenizer=tok)
    again = images.make_eval_batches(config, data, tokenizer=tok)
    np.testing.assert_array_equal(eval_batches[0]["caption_inputs"], again[0]["caption_inputs"])
    with pytest.raises(ValueError, match="data.captions is set"):
        images.make_eval_batches(config, data)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_are_parsed(tmp_path, compress):
    arrays = write_mnist(tmp_path, compress=compress)
    config = make_config(tmp_path, source="mnist", path=str(tmp_path), image_size=28)
    data = images.validate(config)
    assert data.class_names == images.DIGIT_NAMES
    np.testing.assert_array_equal(data.train_images[..., 0], arrays["train"][0])
    np.testing.assert_array_equal(data.train_labels, arrays["train"][1])
    np.testing.assert_array_equal(data.validation_images[..., 0], arrays["t10k"][0])
    np.testing.assert_array_equal(data.validation_labels, arrays["t10k"][1])
    assert images.load(make_config(tmp_path, source="mnist", path=str(tmp_path), image_size=32)
                       ).train_images.shape == (20, 32, 32, 1)


@pytest.mark.parametrize("damage, message", [
    ("truncate_gzip", "train-images-idx3-ubyte.gz: cannot be read or decompressed"),
    ("truncate", "t10k-images-idx3-ubyte.gz: 3000 bytes, but its header says (6, 28, 28) needs 4720"),
    ("magic", "train-labels-idx1-ubyte.gz: magic number 00000803 is not 00000801"),
    ("count", "holds 20 images but"),
    ("missing", "has no t10k-labels-idx1-ubyte.gz (nor t10k-labels-idx1-ubyte)"),
])
def test_bad_idx_files_are_named(tmp_path, damage, message):
    arrays = write_mnist(tmp_path)
    if damage == "truncate_gzip":
        path = tmp_path / "train-images-idx3-ubyte.gz"
        path.write_bytes(path.read_bytes()[:500])
    elif damage == "truncate":
        path = tmp_path / "t10k-images-idx3-ubyte.gz"
        path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:3000]))
    elif damage == "magic":  # the images where the labels should be
        write_idx(tmp_path / "train-labels-idx1-ubyte.gz", arrays["train"][0])
    elif damage == "count":
        write_idx(tmp_path / "train-labels-idx1-ubyte.gz", arrays["train"][1][:19])
    else:
        (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError) as error:
        images.validate(make_config(tmp_path, source="mnist", path=str(tmp_path), image_size=28))
    assert message in str(error.value)


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"the MNIST idx files are not at {SHARED_MNIST}")
def test_the_shared_mnist_is_60000_and_10000_digits(tmp_path):
    data = images.validate(make_config(tmp_path, source="mnist", path=str(SHARED_MNIST), image_size=28))
    assert data.train_images.shape == (60000, 28, 28, 1)
    assert data.validation_images.shape == (10000, 28, 28, 1)
    assert np.bincount(data.train_labels).min() > 5000 and np.bincount(data.validation_labels).min() > 800
    assert data.train_labels[:5].tolist() == [5, 0, 4, 1, 9]  # the well-known first training labels


@pytest.mark.parametrize("name, message", [
    ("no_such_images_xyz", "data.tfds_name='no_such_images_xyz' is not a registered TFDS dataset"),
    ("mnist", "data.tfds_name='mnist' is not prepared in"),
    ("", "needs data.tfds_name"),
])
def test_a_missing_tfds_dataset_is_named_without_downloading(tmp_path, name, message):
    config = make_config(tmp_path, source="tfds", tfds_name=name, eval_split="test")
    with pytest.raises(ValueError) as error:
        images.validate(config)
    assert message in str(error.value)


@pytest.mark.parametrize("change, message", [
    (dict(source="cifar"), "data.source='cifar' is not an image source; valid: ['digits', 'mnist', 'tfds']"),
    (dict(image_size=10), "data.image_size=10 must be at least 8 and a multiple of 4"),
    (dict(image_size=4), "data.image_size=4"),
    (dict(validation_fraction=0.0), "data.validation_fraction=0.0 must be in (0, 1)"),
    (dict(captions=True, seq_len=2), "data.seq_len=2 must be at least 3 with data.captions"),
    (dict(eval_split="test"), "data.eval_split='test'; data.source='digits' has the splits"),
    (dict(max_examples=-1), "data.max_examples=-1"),
    (dict(source="mnist", path="/nonexistent"), "data.path='/nonexistent' is not a directory"),
    (dict(processes=3), "train.batch_size=8 must be a positive multiple of the process count 3"),
])
def test_bad_settings_name_the_field(tmp_path, change, message):
    processes = change.pop("processes", 1)
    config = make_config(tmp_path, **change)
    with pytest.raises(ValueError) as error:
        images.validate(config, processes)
    assert message in str(error.value)
