"""Denoising diffusion on images (class- or caption-conditional U-Net), trained by the shared trainer.

Training: a step index i ~ U{0..T-1}, noise eps and the condition dropout (labels -> the null
class, captions -> the empty caption, with probability task.cond_dropout, for classifier-free
guidance) all come from the step's key inside the jitted step, so a resumed run is exact. The
loss is the mean squared error of the eps- or v-prediction per image, summed over real rows and
divided by their count by the trainer. The math lives in fmjax/tasks/noise.py.

Eval: every held-out image at task.eval_buckets fixed step indices (bucket centres) with fixed
noise, giving loss per timestep bucket; plus, for class labels, scores of guided samples by a
small classifier trained on the same data (fmjax/eval/image_quality.py). Samples: a PNG grid,
one row per class (or caption), sampled with task.sampler / task.sample_steps / task.guidance.
Shapes: B batch, H x W x C image, L caption tokens, K eval buckets, N samples.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import sharding
from fmjax.data import images as images_lib, sources, tokenizer as tokenizer_lib
from fmjax.eval import image_grid, image_quality
from fmjax.models.encoder import EncoderConfig
from fmjax.models.unet import TextUNet, UNet, UNetConfig
from fmjax.tasks import noise

CAPTION_KEYS = ("caption_inputs", "caption_segment_ids", "caption_positions")


class DiffusionTask:
    unit = "examples"

    def __init__(self, config, images: images_lib.Images, tokenizer=None):
        self.config, cfg = config, config.task
        self.images = images
        self.class_names = images.class_names
        self.text = bool(config.data.captions)
        self.model_config = UNetConfig.from_config(config.model)
        self.model_config.validate()
        if cfg.prediction not in noise.PREDICTIONS:
            raise ValueError(f"task.prediction={cfg.prediction!r}; valid: {list(noise.PREDICTIONS)}")
        if cfg.sampler not in noise.SAMPLERS:
            raise ValueError(f"task.sampler={cfg.sampler!r}; valid: {list(noise.SAMPLERS)}")
        if not 1 <= cfg.sample_steps <= cfg.timesteps:
            raise ValueError(f"task.sample_steps={cfg.sample_steps} must be in [1, task.timesteps={cfg.timesteps}]")
        if not 0 <= cfg.cond_dropout < 1:
            raise ValueError(f"task.cond_dropout={cfg.cond_dropout} must be in [0, 1)")
        if cfg.eval_buckets < 1 or cfg.score_samples < 0:
            raise ValueError(f"task.eval_buckets={cfg.eval_buckets} must be >= 1 and task.score_samples="
                             f"{cfg.score_samples} >= 0")
        self.alpha_bar = jnp.asarray(noise.alpha_bar(cfg.schedule, cfg.timesteps), jnp.float32)
        if self.text:
            self.encoder_config = EncoderConfig.from_config(config.model.text_encoder)
            self.encoder_config.validate()
            self.model = TextUNet(self.model_config, self.encoder_config)
        else:
            if self.model_config.n_classes != len(self.class_names):
                raise ValueError(f"model.n_classes={self.model_config.n_classes} but the data has "
                                 f"{len(self.class_names)} classes")
            self.model = UNet(self.model_config)
        self.tokenizer = tokenizer
        self.image_shape = images.train_images.shape[1:]

    @classmethod
    def build(cls, config, workdir: str) -> "DiffusionTask":
        images = images_lib.validate(config, jax.process_count())
        return cls(config, images, _caption_tokenizer(config, workdir) if config.data.captions else None)

    def abstract_batch(self, batch_size):
        batch = {"images": jax.ShapeDtypeStruct((batch_size, *self.image_shape), jnp.float32),
                 "labels": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
                 "weight": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}
        if self.text:
            for key in CAPTION_KEYS:
                batch[key] = jax.ShapeDtypeStruct((batch_size, self.config.data.seq_len), jnp.int32)
        return batch

    def apply(self, params, x_t, t_B, batch, keep_B, rng=None):
        """The model output at x_t; rows where keep_B is False get the null condition."""
        kwargs = dict(deterministic=rng is None, rngs=None if rng is None else {"dropout": rng})
        variables = {"params": params}
        if self.text:
            segments = batch["caption_segment_ids"] * keep_B[:, None].astype(jnp.int32)
            return self.model.apply(variables, x_t, t_B, batch["caption_inputs"], segments,
                                    batch["caption_positions"], **kwargs)
        labels = jnp.where(keep_B, batch["labels"], self.model_config.n_classes)
        return self.model.apply(variables, x_t, t_B, labels, **kwargs)

    def init_params(self, rng, batch):
        t = jnp.zeros(batch["images"].shape[:1], jnp.float32)
        if self.text:
            return self.model.init(rng, batch["images"], t, batch["caption_inputs"],
                                   batch["caption_segment_ids"], batch["caption_positions"])["params"]
        return self.model.init(rng, batch["images"], t, batch["labels"])["params"]

    def _errors(self, params, batch, i_B, noise_BxHxWxC, keep_B, rng=None):
        """Per-image mean squared error of the prediction at step indices i_B."""
        x0 = batch["images"]
        a_B = self.alpha_bar[i_B]
        x_t = noise.add_noise(x0, noise_BxHxWxC, a_B)
        out = self.apply(params, x_t, i_B / self.alpha_bar.shape[0], batch, keep_B, rng)
        want = noise.target(self.config.task.prediction, x0, noise_BxHxWxC, a_B)
        return jnp.mean(jnp.square(out.astype(jnp.float32) - want), axis=(1, 2, 3))

    def loss(self, params, batch, rng):
        step_key, noise_key, drop_key, dropout_key = jax.random.split(rng, 4)
        b = batch["images"].shape[0]
        i_B = jax.random.randint(step_key, (b,), 0, self.alpha_bar.shape[0])
        noise_BxHxWxC = jax.random.normal(noise_key, batch["images"].shape)
        keep_B = jax.random.uniform(drop_key, (b,)) >= self.config.task.cond_dropout
        err_B = self._errors(params, batch, i_B, noise_BxHxWxC, keep_B, dropout_key)
        total = jnp.sum(err_B * batch["weight"])
        return total, {"weight": jnp.sum(batch["weight"]), "loss": total}

    def eval_sums(self, params, batch):
        k, total = self.config.task.eval_buckets, self.alpha_bar.shape[0]
        b, w_B = batch["images"].shape[0], batch["weight"]
        keep_B = jnp.ones((b,), bool)
        sums = {"weight": jnp.sum(w_B)}
        for bucket in range(k):
            i_B = jnp.full((b,), int((bucket + 0.5) * total / k), jnp.int32)
            eps = jax.random.normal(jax.random.PRNGKey(bucket), batch["images"].shape)
            sums[f"loss_t{bucket}"] = jnp.sum(self._errors(params, batch, i_B, eps, keep_B) * w_B)
        return sums

    def eval_results(self, sums):
        n = sums["weight"]
        buckets = {k: float(v / n) for k, v in sums.items() if k.startswith("loss_t")}
        return {"loss": float(np.mean(list(buckets.values()))), **buckets, "examples": int(n)}

    def units_per_example(self):
        return 1

    @functools.cache
    def flops_per_unit(self):
        """Training FLOPs per image: XLA's count of one forward pass, times 3 (forward + backward)."""
        batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in self.abstract_batch(1).items()}
        params = jax.eval_shape(lambda: self.init_params(jax.random.PRNGKey(0), batch))
        keep = jnp.ones((1,), bool)
        lowered = jax.jit(lambda p, x: self.apply(p, x, jnp.zeros((1,)), batch, keep)).lower(params, batch["images"])
        cost = lowered.compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return 3.0 * float(cost.get("flops", 0.0))

    def train_iterator(self, process_index, process_count):
        return images_lib.make_train_iterator(self.config, self.images, process_index, process_count,
                                              self.tokenizer)

    def eval_batches(self, process_index, process_count):
        return images_lib.make_eval_batches(self.config, self.images, process_index, process_count,
                                            self.tokenizer)

    # -- sampling ---------------------------------------------------------------------------------

    def conditions(self, labels_N):
        """The conditioning batch (labels, captions of those labels) of N intended classes."""
        batch = {"labels": np.asarray(labels_N, np.int32)}
        if self.text:
            rows = [images_lib.caption_row(self.tokenizer, self.config.data.seq_len,
                                           images_lib.caption(self.class_names[c], 0)) for c in labels_N]
            batch.update({k: np.stack([r[k] for r in rows]) for k in CAPTION_KEYS})
        return batch

    def generate(self, params, labels_N, seed: int) -> np.ndarray:
        """N guided samples (float32 in [-1, 1], N x H x W x C) of the given classes, sharded over the
        batch on the params' mesh."""
        cfg = self.config.task
        mesh = jax.tree.leaves(params)[0].sharding.mesh
        rules = sharding.rules_from_config(self.config.sharding_rules)
        n = len(labels_N)
        per = sharding.data_parallel_size(mesh) if isinstance(mesh, jax.sharding.Mesh) else 1
        padded = -(-n // per) * per
        labels = np.concatenate([np.asarray(labels_N), np.zeros(padded - n, np.int64)])
        cond = self.conditions(labels)
        x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (padded, *self.image_shape)))
        eta = 1.0 if cfg.sampler == "ddpm" else cfg.eta
        run = _sampler(self, cfg.guidance, cfg.sample_steps, eta)
        if isinstance(mesh, jax.sharding.Mesh):
            spread = sharding.batch_sharding(mesh, rules)
            cond = {k: jax.device_put(v, spread) for k, v in cond.items()}
            x_T = jax.device_put(x_T, spread)
        out = run(params, cond, x_T, jax.random.PRNGKey(seed + 1))
        return np.asarray(jax.device_get(out))[:n]

    def write_samples(self, params, workdir, step):
        """A PNG grid: task.sample_per_class samples of every class, one row per class."""
        per = self.config.task.sample_per_class
        if not per:
            return None
        labels = np.repeat(np.arange(len(self.class_names)), per)
        samples = self.generate(params, labels, self.config.seed + step)
        os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
        path = os.path.join(workdir, "samples", f"step_{step}.png")
        if jax.process_index() == 0:
            image_grid.save_png(image_grid.grid(samples, per), path)
        return path

    def sample_scores(self, params) -> dict:
        """Class accuracy and Frechet distance of task.score_samples guided samples per class,
        judged by a classifier trained on the train split (cached)."""
        per = self.config.task.score_samples
        if not per:
            return {}
        to_float = lambda u8: u8.astype(np.float32) / 127.5 - 1.0
        classifier = image_quality.cached_classifier(
            str(sources.cache_dir(self.config)), to_float(self.images.train_images),
            self.images.train_labels, len(self.class_names))
        labels = np.repeat(np.arange(len(self.class_names)), per)
        samples = self.generate(params, labels, self.config.seed)
        return image_quality.score(classifier, samples, labels, to_float(self.images.validation_images))


def _sampler(task: DiffusionTask, guidance: float, steps: int, eta: float):
    def run(params, cond, x_T, rng):
        keep = jnp.ones((x_T.shape[0],), bool)

        def model_fn(x, t, conditional):
            return task.apply(params, x, t, cond, keep if conditional else ~keep).astype(jnp.float32)

        return noise.sample(noise.guided(model_fn, guidance), task.alpha_bar, x_T, rng,
                            prediction=task.config.task.prediction, steps=steps, eta=eta)
    return jax.jit(run)


def _caption_tokenizer(config, workdir: str) -> tokenizer_lib.Tokenizer:
    """The run's copy in the workdir, else data.tokenizer, else init_from's encoder tokenizer, else
    one trained on every caption the templates make (cached). Sized by model.text_encoder."""
    view = config.copy_and_resolve_references()
    with view.unlocked():
        view.model = config.model.text_encoder  # the tokenizer library reads model.vocab_size
    try:  # the same rule as fine-tuning an encoder
        return tokenizer_lib.finetune_tokenizer(view, workdir, lambda: images_lib.caption_tokenizer(view))[1]
    except ValueError as e:
        raise ValueError(str(e).replace("model.vocab_size", "model.text_encoder.vocab_size")) from None
