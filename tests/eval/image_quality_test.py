"""Image quality score: the digits classifier is accurate, real images score well and noise badly,
the Frechet distance matches its closed form, and the classifier cache trains once."""
import threading

import jax
import numpy as np
import pytest
import scipy.linalg
from sklearn.datasets import load_digits

from fmjax.eval import image_quality as iq

# Enough for >= 0.95 held-out accuracy on digits (0.97-0.99 measured) in a few seconds of CPU.
DIGITS_STEPS = 300


@pytest.fixture(scope="module")
def digits():
    """sklearn digits as Nx8x8x1 float32 in [-1, 1]: even rows train, odd rows held out."""
    d = load_digits()
    images = (d.images / 8.0 - 1.0).astype(np.float32)[..., None]
    return images[0::2], d.target[0::2], images[1::2], d.target[1::2]


@pytest.fixture(scope="module")
def params(digits):
    train_x, train_y, _, _ = digits
    return iq.train_classifier(train_x, train_y, 10, steps=DIGITS_STEPS)


def test_classifier_is_accurate_on_held_out_digits(params, digits):
    _, _, test_x, test_y = digits
    logits, features = iq.classify(params, test_x)
    assert logits.shape == (len(test_x), 10) and features.shape == (len(test_x), 64)
    assert np.mean(logits.argmax(-1) == test_y) >= 0.95


def test_real_images_score_well_and_noise_badly(params, digits):
    _, _, test_x, test_y = digits
    samples, labels, reference, reference_labels = test_x[0::2], test_y[0::2], test_x[1::2], test_y[1::2]
    real = iq.score(params, samples, labels, reference, reference_labels)
    assert set(real) == {"class_accuracy", "frechet_distance", "reference_accuracy"}
    assert real["class_accuracy"] >= 0.95 and real["reference_accuracy"] >= 0.95
    noise = np.random.default_rng(0).uniform(-1, 1, samples.shape).astype(np.float32)
    fake = iq.score(params, noise, labels, reference)
    assert set(fake) == {"class_accuracy", "frechet_distance"}
    assert fake["class_accuracy"] < 0.25  # chance is 0.1
    assert fake["frechet_distance"] > 10 * real["frechet_distance"]


def test_classify_chunks_agree_with_one_batch(params, digits, monkeypatch):
    """Also shows that an image's outputs do not depend on its batch (GroupNorm, not BatchNorm):
    the last chunk is padded with blank images."""
    _, _, test_x, _ = digits
    whole_logits, whole_features = iq.classify(params, test_x[:50])
    monkeypatch.setattr(iq, "_SCORE_CHUNK", 16)  # 50 = 3 full chunks and a padded one
    logits, features = iq.classify(params, test_x[:50])
    np.testing.assert_allclose(logits, whole_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(features, whole_features, rtol=1e-5, atol=1e-5)


def test_training_is_deterministic_for_a_seed(digits):
    train_x, train_y, _, _ = digits
    a, b, c = (iq.train_classifier(train_x, train_y, 10, steps=3, seed=s) for s in (0, 0, 1))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["head"]["kernel"], c["head"]["kernel"])


def test_bad_inputs_are_value_errors(params, digits):
    train_x, train_y, _, _ = digits
    with pytest.raises(ValueError, match="divisible by 4"):
        iq.train_classifier(train_x[:, :6, :6], train_y, 10)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        iq.train_classifier(train_x, train_y, 5)
    with pytest.raises(ValueError, match="intended_labels_N"):
        iq.score(params, train_x[:4], train_y[:3], train_x)
    with pytest.raises(ValueError, match="valid: "):
        iq.cached_classifier("/nonexistent", train_x, train_y, 10, stepz=3)


def test_cached_classifier_trains_once_then_loads(digits, tmp_path, monkeypatch):
    train_x, train_y, _, _ = digits
    first = iq.cached_classifier(tmp_path, train_x, train_y, 10, steps=3)
    files = list((tmp_path / "image_classifier").glob("*.msgpack"))
    assert len(files) == 1

    def must_not_train(*args, **kwargs):
        raise AssertionError("trained again although the classifier is cached")

    monkeypatch.setattr(iq, "train_classifier", must_not_train)
    second = iq.cached_classifier(tmp_path, train_x, train_y, 10, steps=3)
    jax.tree.map(np.testing.assert_array_equal, first, second)
    # The defaults are part of the key whether spelled out or not; other settings or data are not.
    assert iq.cached_classifier(tmp_path, train_x, train_y, 10, steps=3, seed=0) is not None
    with pytest.raises(AssertionError, match="trained again"):
        iq.cached_classifier(tmp_path, train_x, train_y, 10, steps=4)
    with pytest.raises(AssertionError, match="trained again"):
        iq.cached_classifier(tmp_path, train_x[1:], train_y[1:], 10, steps=3)


def test_concurrent_cached_classifier_calls_train_once(tmp_path, monkeypatch):
    calls = []

    def slow_fake_train(images, labels, n_classes, **settings):
        calls.append(1)
        threading.Event().wait(0.2)  # long enough for the other callers to reach the lock
        return {"head": {"bias": np.arange(n_classes, dtype=np.float32)}}

    monkeypatch.setattr(iq, "train_classifier", slow_fake_train)
    images, labels = np.zeros((4, 8, 8, 1), np.float32), np.arange(4)
    results = [None] * 4

    def call(i):
        results[i] = iq.cached_classifier(tmp_path, images, labels, 4)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    for r in results:
        np.testing.assert_array_equal(r["head"]["bias"], np.arange(4))
    assert not list((tmp_path / "image_classifier").glob("*.tmp*"))


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    # For commuting (here diagonal) covariances the trace term is sum (sqrt(a) - sqrt(b))^2.
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    got = iq.frechet_distance_from_moments(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    assert got == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(1 + 6.25 + 4 + 1)  # the numbers above, by hand

    rng = np.random.default_rng(0)
    a = mu_a + np.sqrt(var_a) * rng.standard_normal((200_000, 3))
    b = mu_b + np.sqrt(var_b) * rng.standard_normal((200_000, 3))
    assert iq.frechet_distance(a, b) == pytest.approx(expected, rel=0.01)


def test_frechet_distance_matches_sqrtm_for_full_covariances():
    rng = np.random.default_rng(1)
    f = 6
    m_a, m_b = rng.standard_normal((f, f)), rng.standard_normal((f, f))
    cov_a, cov_b = m_a @ m_a.T + 0.1 * np.eye(f), m_b @ m_b.T + 0.1 * np.eye(f)
    mu_a, mu_b = rng.standard_normal(f), rng.standard_normal(f)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root)
    assert iq.frechet_distance_from_moments(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_zero_on_itself_symmetric_and_sees_shifts():
    rng = np.random.default_rng(2)
    # Rank-deficient features (a dead unit and a copied one), as ReLU features often are.
    a = rng.standard_normal((500, 8))
    a[:, 0], a[:, 1] = 0.0, a[:, 2]
    b = 1.5 * rng.standard_normal((400, 8)) + 0.3
    assert iq.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # Not to 1e-9: the square root of eigenvalues that are zero up to rounding (~1e-16) moves the
    # trace term by ~1e-8, in whichever order the two sets come.
    assert iq.frechet_distance(a, b) == pytest.approx(iq.frechet_distance(b, a), rel=1e-6)
    shift = np.arange(8.0)
    assert iq.frechet_distance(a, a + shift) == pytest.approx(shift @ shift, rel=1e-9)
    with pytest.raises(ValueError, match="N, M >= 2"):
        iq.frechet_distance(a[:1], b)
