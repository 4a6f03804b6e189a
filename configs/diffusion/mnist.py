"""Class-conditional diffusion on MNIST 28x28, read from the idx files in ../shared/data/images/mnist.

  python -m fmjax.main --config configs/diffusion/mnist.py --workdir runs/mnist

Other copies of MNIST: --config.data.path=DIR (the four idx files, gzipped or not), or
--config.data.source=tfds --config.data.tfds_name=mnist --config.data.eval_split=test.
"""
import pathlib

from configs.diffusion import digits

MNIST = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "images" / "mnist"


def get_config():
    c = digits.get_config()
    c.data.source = "mnist"
    c.data.path = str(MNIST)
    c.data.image_size = 28  # 28 -> 14 -> 7 over the three levels
    c.model.width = 32
    c.model.channel_mults = (1, 2, 2)
    c.model.blocks_per_level = 2
    c.model.attention_levels = (2,)
    c.task.score_samples = 50
    c.train.steps = 10_000
    c.train.batch_size = 64
    c.train.eval_every = 2000
    return c
