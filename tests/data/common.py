"""Shared by the data tests: a small config with the data fields of configs/lm/tiny.py."""
import ml_collections
import pytest

from configs.lm import tiny


def data_config(cache_dir, vocab_size=512, batch_size=4, eval_batches=4, **data) -> ml_collections.ConfigDict:
    config = tiny.get_config()
    config.model.vocab_size = vocab_size
    config.train.update(batch_size=batch_size, eval_batches=eval_batches)
    config.data.update(source="pydoc", seq_len=64, cache_dir=str(cache_dir), read_threads=0)
    config.data.update(data)
    return config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")
