"""Every shipped config loads, validates and trains two steps (shrunk to seconds on CPU)."""
from pathlib import Path

import importlib.util

import jax
import pytest

from fmjax import config_lib
from fmjax.tasks import validate_data
from fmjax.train import loop

CONFIGS = sorted(str(p) for p in (Path(__file__).parents[1] / "configs").rglob("*.py") if p.name != "__init__.py")
# The tiny decoder and encoder and the data-pile config run with every `make test`; the others
# (a minute or more each on 2 cores: U-Nets, pretrained MiniLM, fine-tuning) with `make test-all`.
FAST = ("configs/lm/tiny.py", "configs/encoder/tiny.py", "configs/data/shared_text.py")


# Sizes for benchmarks and scaling studies, checked here without a corpus or any training.
SIZED = ("configs/lm/llama.py",)


@pytest.mark.parametrize("path", [p if p.endswith(FAST) else pytest.param(p, marks=pytest.mark.slow)
                                  for p in CONFIGS if not p.endswith(SIZED)],
                         ids=lambda p: Path(p).stem)
def test_config_trains_two_steps(tmp_path, path):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if config.mode == "prepare":  # data-pile configs: checked here, run by tests/data/prepare
        from fmjax.data.prepare import pile
        missing = [s.path for s in config.data.prepare.sources.values() if not Path(s.path).exists()]
        if missing:
            pytest.skip(f"{Path(path).name} reads {missing[0]}, which is not on this machine")
        pile.validate(config)
        return
    files = [*config.data.get("paths", ()), config.data.get("path", "")]
    missing = [p for p in files if p and not Path(p).exists()]
    if missing:
        pytest.skip(f"{Path(path).name} reads {missing[0]}, which is not on this machine")
    config.data.cache_dir = str(tmp_path / "cache")
    if "max_per_class" in config.data:  # labelled data: a few passages per class suffice
        config.data.max_per_class = 40
    devices = None  # all 8
    if config.task.name == "diffusion":  # sampling, scoring and eval buckets have tests of their own
        config.task.update(sample_steps=2, score_samples=0, sample_per_class=1, eval_buckets=1)
        # U-Net compiles are most of the time: one ResNet block per level (every level, attention
        # level and condition stays), trained on one device (the mesh is still validated for 8
        # below; sharded U-Nets, captions included, train in tests/tasks/diffusion_test.py).
        config.model.blocks_per_level = 1
        devices = jax.devices()[:1]
    config.data.seq_len = min(config.data.seq_len, 64)  # two steps check wiring, not long inputs
    config.train.update(steps=2, batch_size=8, log_every=1, eval_every=2, eval_batches=1, ckpt_every=2,
                        progress_bar=False)
    config.task.sample_tokens = 2
    config.eval.limit = 2  # benchmarks and perplexity datasets: two questions / documents each
    config_lib.validate(config, jax.device_count())
    validate_data(config)
    results = loop.train(loop.setup(config, str(tmp_path / "run"), devices))
    assert results["loss"] > 0 and (tmp_path / "run" / "checkpoints" / "2").is_dir()


def test_llama_sizes_validate_and_have_the_documented_parameter_counts(tmp_path):
    from configs.lm import llama
    from fmjax.data.tokenizer import StandInTokenizer
    from fmjax.tasks.lm import LMTask
    documented = {"125m": 134.1e6, "350m": 373.9e6, "1b": 1104.2e6, "3b": 3015.4e6}
    for size in llama.SIZES:
        config = llama.get_config(size)
        config_lib.validate(config, jax.device_count())
        task = LMTask(config, StandInTokenizer(config.model.vocab_size))
        run = loop.setup(config, str(tmp_path), task=task)  # abstract: sharded shapes, no compute
        params = sum(x.size for x in jax.tree.leaves(run.abstract.params))
        assert params == pytest.approx(documented[size], rel=1e-3), size
    with pytest.raises(ValueError, match="the sizes are"):
        llama.get_config("7b")
