"""Text-conditional diffusion on MNIST: the U-Net cross-attends to a caption encoded by an fmjax
Encoder ("a handwritten seven", "the digit seven", ...; templates in fmjax/data/images.py).

The text encoder trains with the U-Net from scratch, on a caption tokenizer trained on every
caption the templates make. To start it from a pretrained encoder, point init_from at an MLM
workdir of the same encoder shape (its params["encoder"] and tokenizer are taken):

  python -m fmjax.main --config configs/diffusion/mnist_text.py --workdir runs/mnist_text
"""
from configs.diffusion import mnist
from configs.encoder import tiny as encoder_tiny


def get_config():
    c = mnist.get_config()
    c.model.n_classes = 0  # conditioned on the caption only
    c.model.text_encoder = encoder_tiny.get_config().model
    c.model.text_encoder.update(vocab_size=320, width=64, n_layers=2, n_heads=4, head_dim=16, mlp_dim=128,
                                max_len=32)
    c.data.captions = True
    c.data.seq_len = 16
    return c
