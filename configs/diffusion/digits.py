"""Class-conditional diffusion on scikit-learn's bundled 8x8 digits (the embedded default: no file).

A small U-Net learns to denoise digits of a given class; samples are drawn with DDIM and
classifier-free guidance. Trains in a few minutes on 2 CPU cores:

  python -m fmjax.main --config configs/diffusion/digits.py --workdir runs/digits

eval/results.json gets the held-out loss per timestep bucket and the scores of guided samples
(class accuracy and Frechet distance under a small classifier trained on the same digits);
samples/step_<n>.png has one row per class.
"""
import ml_collections

from fmjax import config_lib


def get_config():
    c = config_lib.base_config()
    c.seed = 0

    image_size = ml_collections.FieldReference(8)
    c.model.name = "unet"
    c.model.image_size = image_size  # follows data.image_size
    c.model.channels = 1
    c.model.width = 32
    c.model.channel_mults = (1, 2)
    c.model.blocks_per_level = 1
    c.model.attention_levels = (1,)
    c.model.n_heads = 4
    c.model.groups = 8
    c.model.dropout = 0.0
    c.model.n_classes = 10
    c.model.text_width = 0
    c.model.dtype = "float32"  # compute dtype; parameters stay float32
    c.model.remat = "none"  # none | full | save_dots

    c.task.name = "diffusion"
    c.task.schedule = "cosine"  # linear | cosine
    c.task.timesteps = 1000
    c.task.prediction = "v"  # epsilon | v
    c.task.cond_dropout = 0.1  # labels dropped to the null class, for classifier-free guidance
    c.task.sampler = "ddim"  # ddim (eta below; 0 = deterministic) | ddpm (ancestral)
    c.task.eta = 0.0
    c.task.sample_steps = 50
    c.task.guidance = 2.0  # 1 = conditional only; > 1 pushes samples towards their class
    c.task.eval_buckets = 4  # held-out loss per quarter of the timesteps
    c.task.score_samples = 20  # guided samples per class scored at every eval; 0: none
    c.task.sample_per_class = 8  # samples per class in samples/step_<n>.png

    c.data.source = "digits"  # digits | mnist | tfds
    c.data.path = ""  # the MNIST idx directory for source=mnist
    c.data.tfds_name = ""  # e.g. cifar10 for source=tfds (prepared under data.cache_dir/tfds)
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.validation_fraction = 0.1  # digits has no split of its own
    c.data.image_size = image_size
    c.data.max_examples = 0  # 0: every train image
    c.data.captions = False
    c.data.seq_len = 16  # caption tokens (with captions)
    c.data.tokenizer = ""
    c.data.tokenizer_type = "bpe"
    c.data.cache_dir = ""  # "" = $FMJAX_CACHE_DIR or ~/.cache/fmjax
    c.data.read_threads = 0

    c.optim.lr = 2e-3
    c.optim.warmup = 0.05
    c.optim.weight_decay = 0.0
    c.optim.b2 = 0.99

    c.train.steps = 3000
    c.train.batch_size = 128
    c.train.ema_decay = 0.999
    c.train.log_every = 50
    c.train.eval_every = 1000
    c.train.ckpt_every = 500
    return c
