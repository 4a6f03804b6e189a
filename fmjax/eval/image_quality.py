"""Offline sample quality for class-conditional image models: a small classifier as judge.

An offline stand-in for Inception accuracy and FID, for datasets like sklearn digits (8x8) or
MNIST (28x28) where no pretrained network can be downloaded: a small CNN trained on the same
dataset (cached on disk, keyed by the data and settings) says how often a sample shows its
intended class, and the Frechet distance between its penultimate-layer features of samples and of
real held-out images says how far the sample distribution is from the real one.

The Frechet distance here is computed on F=64 features of a small dataset-specific classifier: it
is not comparable to Inception FID numbers, only across runs scored with the same classifier (the
same cache key) and the same sample counts, since the covariance estimate is biased by N.

Shape letters:
  N: samples (generated images)   M: reference (real) images
  H, W: image height and width, divisible by 4   C: image channels
  K: classes   F: feature width of the classifier's penultimate layer   B: a training batch
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import pathlib

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmjax.data import sources

# Part of the cache key: bump when the architecture or the training recipe changes, so stale
# classifiers are never reused.
_VERSION = "image_classifier/v1"
# score() runs the classifier over chunks of this many images (one compiled shape, bounded memory).
_SCORE_CHUNK = 512


class Classifier(nn.Module):
    """Two conv-GroupNorm-ReLU-pool stages, a dense feature layer and a linear head.

    GroupNorm rather than BatchNorm so that a sample's logits and features do not depend on the
    rest of its batch, which would make scores depend on the chunking.
    """
    n_classes: int
    features: int = 64
    channels: tuple[int, ...] = (16, 32)

    @nn.compact
    def __call__(self, images_NxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = images_NxHxWxC
        for width in self.channels:
            x = nn.Conv(width, (3, 3))(x)
            x = nn.relu(nn.GroupNorm(num_groups=8)(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        # Flattened rather than globally pooled: where a stroke is matters for digits.
        x = x.reshape(x.shape[0], -1)
        features_NxF = nn.relu(nn.Dense(self.features, name="features")(x))
        logits_NxK = nn.Dense(self.n_classes, name="head")(features_NxF)
        return logits_NxK, features_NxF


def _check_images(name: str, images: np.ndarray) -> None:
    down = 2 ** len(Classifier.channels)
    if images.ndim != 4 or images.shape[1] % down or images.shape[2] % down:
        raise ValueError(f"{name} must be NxHxWxC with H and W divisible by {down} (float32 in "
                         f"[-1, 1]); got shape {images.shape}")


def _check_labels(name: str, labels: np.ndarray, n: int, n_classes: int) -> None:
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be {n} integer labels, one per image; got {labels.dtype} "
                         f"of shape {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"{name} must lie in [0, {n_classes}) for n_classes={n_classes}; got "
                         f"[{labels.min()}, {labels.max()}]")


def train_classifier(train_images: np.ndarray, train_labels: np.ndarray, n_classes: int, *,
                     steps: int = 500, batch_size: int = 128, learning_rate: float = 3e-3,
                     seed: int = 0) -> dict:
    """Classifier params from Adam on cross-entropy; the same inputs and seed give the same params.

    train_images: NxHxWxC float32 in [-1, 1]; train_labels: N integers in [0, n_classes).
    """
    images_NxHxWxC = np.asarray(train_images, np.float32)
    labels_N = np.asarray(train_labels)
    _check_images("train_images", images_NxHxWxC)
    _check_labels("train_labels", labels_N, images_NxHxWxC.shape[0], n_classes)
    if images_NxHxWxC.shape[0] == 0 or steps < 1 or batch_size < 1:
        raise ValueError(f"train_classifier needs images, steps >= 1 and batch_size >= 1; got "
                         f"{images_NxHxWxC.shape[0]} images, steps={steps}, batch_size={batch_size}")
    params = _init(n_classes, seed, images_NxHxWxC[:1])
    opt_state = optax.scale_by_adam().init(params)
    for t, idx_B in enumerate(_batches(images_NxHxWxC.shape[0], batch_size, steps, seed)):
        # Cosine decay: the last steps at a small rate settle the weights. The rate is an
        # argument, not a schedule inside the step, so that every `steps` shares one compilation.
        rate = learning_rate * 0.5 * (1.0 + np.cos(np.pi * t / steps))
        params, opt_state = _train_step(params, opt_state, images_NxHxWxC[idx_B],
                                        labels_N[idx_B].astype(np.int32), np.float32(rate))
    return params


@functools.partial(jax.jit, static_argnums=(0,))
def _init(n_classes: int, seed: int, x_1xHxWxC: jax.Array) -> dict:
    return Classifier(n_classes).init(jax.random.PRNGKey(seed), x_1xHxWxC)["params"]


# A host loop over this jitted step, not one lax.scan over all steps: XLA:CPU ran the convolutions
# inside the scan's while loop ~20x slower, and compiled it for longer. Module-level, so that
# repeated trainings in one process compile once.
@jax.jit
def _train_step(params, opt_state, x_BxHxWxC, y_B, rate):
    n_classes = params["head"]["bias"].shape[0]

    def loss_fn(params):
        logits_BxK, _ = Classifier(n_classes).apply({"params": params}, x_BxHxWxC)
        return optax.softmax_cross_entropy_with_integer_labels(logits_BxK, y_B).mean()

    updates, opt_state = optax.scale_by_adam().update(jax.grad(loss_fn)(params), opt_state)
    return jax.tree.map(lambda p, u: p - rate * u, params, updates), opt_state


def _batches(n: int, batch_size: int, steps: int, seed: int):
    """`steps` index batches of shuffled epochs (a fresh permutation each epoch), fixed by seed."""
    rng = np.random.default_rng(seed)
    order = np.zeros(0, np.int64)
    for _ in range(steps):
        while len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        yield order[:batch_size]
        order = order[batch_size:]


# train_classifier's settings and their defaults, so that an explicit default and an omitted one
# give the same cache key.
_SETTINGS = {name: p.default for name, p in inspect.signature(train_classifier).parameters.items()
             if p.kind is p.KEYWORD_ONLY}


def _cache_key(images: np.ndarray, labels: np.ndarray, n_classes: int, settings: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([_VERSION, images.shape, str(images.dtype), labels.shape, str(labels.dtype),
                         n_classes, sorted(settings.items())]).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()[:32]


def cached_classifier(cache_dir: str | os.PathLike, train_images: np.ndarray,
                      train_labels: np.ndarray, n_classes: int, **settings) -> dict:
    """train_classifier's params, trained once per data and settings, kept in
    <cache_dir>/image_classifier/<key>.msgpack and loaded on later calls (from any process)."""
    unknown = sorted(set(settings) - set(_SETTINGS))
    if unknown:
        raise ValueError(f"unknown classifier settings {unknown}; valid: {sorted(_SETTINGS)}")
    settings = {**_SETTINGS, **settings}
    images = np.asarray(train_images, np.float32)
    labels = np.asarray(train_labels)
    root = pathlib.Path(cache_dir).expanduser() / "image_classifier"
    path = root / f"{_cache_key(images, labels, n_classes, settings)}.msgpack"
    # The lock makes concurrent processes wait for the first one's classifier instead of each
    # training their own; the tmp file + rename means a reader never sees half a file.
    with sources.locked(path.with_suffix(".lock")):
        if path.exists():
            return jax.tree.map(jnp.asarray, flax.serialization.msgpack_restore(path.read_bytes()))
        params = train_classifier(images, labels, n_classes, **settings)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(flax.serialization.msgpack_serialize(jax.device_get(params)))
        os.replace(tmp, path)
    return params


@functools.cache
def _jitted_apply(n_classes: int):
    return jax.jit(Classifier(n_classes).apply)


def classify(params: dict, images_NxHxWxC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits_NxK, features_NxF) as float32 numpy, computed in fixed-size chunks."""
    images_NxHxWxC = np.asarray(images_NxHxWxC, np.float32)
    _check_images("images", images_NxHxWxC)
    if not len(images_NxHxWxC):
        raise ValueError("classify needs at least one image; got shape (0, ...)")
    n_classes = params["head"]["bias"].shape[0]
    apply = _jitted_apply(n_classes)
    n = images_NxHxWxC.shape[0]
    chunk = min(_SCORE_CHUNK, n)
    logits, features = [], []
    for start in range(0, n, chunk):
        x = images_NxHxWxC[start:start + chunk]
        # Pad the last chunk so every call has the same shape and compiles once.
        pad = chunk - x.shape[0]
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
        logits_BxK, features_BxF = jax.device_get(apply({"params": params}, x))
        logits.append(logits_BxK[:chunk - pad])
        features.append(features_BxF[:chunk - pad])
    return np.concatenate(logits), np.concatenate(features)


def _psd_sqrt(s_FxF: np.ndarray) -> np.ndarray:
    w_F, v_FxF = np.linalg.eigh(s_FxF)
    return (v_FxF * np.sqrt(np.clip(w_F, 0.0, None))) @ v_FxF.T


def frechet_distance_from_moments(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray,
                                  cov_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}), the W2^2 between two Gaussians."""
    mu_a, cov_a, mu_b, cov_b = (np.asarray(a, np.float64) for a in (mu_a, cov_a, mu_b, cov_b))
    f = mu_a.shape[0] if mu_a.ndim == 1 else -1
    if not mu_a.shape == mu_b.shape == (f,) or not cov_a.shape == cov_b.shape == (f, f):
        raise ValueError(f"frechet_distance_from_moments needs means of shape (F,) and "
                         f"covariances of shape (F, F); got {mu_a.shape}, {cov_a.shape}, "
                         f"{mu_b.shape}, {cov_b.shape}")
    # Tr((S_a S_b)^{1/2}) = Tr((A S_b A)^{1/2}) with A = S_a^{1/2}: the latter is symmetric PSD,
    # so eigvalsh is exact and stable even for singular covariances (dead ReLU features), where
    # sqrtm of the non-symmetric product can return complex noise.
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu_a - mu_b
    distance = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))  # rounding can leave a tiny negative for equal moments


def frechet_distance(features_a_NxF: np.ndarray, features_b_MxF: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted (in float64) to two sets of feature rows."""
    a, b = (np.asarray(f, np.float64) for f in (features_a_NxF, features_b_MxF))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance needs two NxF and MxF feature arrays with N, M >= 2; "
                         f"got shapes {a.shape} and {b.shape}")
    return frechet_distance_from_moments(a.mean(0), np.cov(a, rowvar=False),
                                         b.mean(0), np.cov(b, rowvar=False))


def score(params: dict, samples_NxHxWxC: np.ndarray, intended_labels_N: np.ndarray,
          reference_images_MxHxWxC: np.ndarray, reference_labels_M: np.ndarray | None = None
          ) -> dict[str, float]:
    """Sample quality under the classifier `params`.

    class_accuracy: share of samples classified as their intended class (higher is better).
    frechet_distance: between classifier features of the samples and of the real reference images
      (lower is better; only comparable across runs with the same classifier and counts).
    reference_accuracy (if reference_labels_M is given): the classifier's accuracy on the real
      images, the ceiling that class_accuracy can be read against.
    """
    logits_NxK, features_NxF = classify(params, samples_NxHxWxC)
    n_classes = logits_NxK.shape[1]
    intended_labels_N = np.asarray(intended_labels_N)
    _check_labels("intended_labels_N", intended_labels_N, len(logits_NxK), n_classes)
    ref_logits_MxK, ref_features_MxF = classify(params, reference_images_MxHxWxC)
    results = {
        "class_accuracy": float(np.mean(logits_NxK.argmax(-1) == intended_labels_N)),
        "frechet_distance": frechet_distance(features_NxF, ref_features_MxF),
    }
    if reference_labels_M is not None:
        reference_labels_M = np.asarray(reference_labels_M)
        _check_labels("reference_labels_M", reference_labels_M, len(ref_logits_MxK), n_classes)
        results["reference_accuracy"] = float(np.mean(ref_logits_MxK.argmax(-1) == reference_labels_M))
    return results
