"""Latent directions (Schutte et al.) and latent interpolation / integrated gradients (medXGAN)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from viscoin_jax.explain.interpolation import (
    difference_maps,
    interpolate_latents,
    latent_integrated_gradients,
    latent_interpolation,
)
from viscoin_jax.explain.latent_direction import (
    decode_along_direction,
    fit_direction,
    fit_logistic_regression,
    gradient_direction,
    logistic_regression_direction,
    map_in_chunks,
    sample_labelled_latents,
)

Z, L, D, H, W = 5, 3, 6, 4, 3  # z dim, W+ vectors, w dim, odd image size
P = H * W * 3
RNG = np.random.default_rng(0)
M_MAP = RNG.normal(size=(Z, D)).astype(np.float32)
B_MAP = RNG.normal(size=(D,)).astype(np.float32) * 0.1
A = RNG.normal(size=(L, D, P)).astype(np.float32) / np.sqrt(L * D)
V = RNG.normal(size=(P,)).astype(np.float32)


def mapping_fn(z):
    w = z @ jnp.asarray(M_MAP) + jnp.asarray(B_MAP)
    return jnp.broadcast_to(w[:, None, :], (z.shape[0], L, D))


def linear_synthesis(ws):
    return jnp.einsum("nld,ldp->np", ws, jnp.asarray(A)).reshape(ws.shape[0], H, W, 3)


def tanh_synthesis(ws):
    return jnp.tanh(linear_synthesis(ws))


def linear_classifier(images):
    s = images.reshape(images.shape[0], -1) @ jnp.asarray(V) + 0.2
    return jnp.stack([jnp.zeros_like(s), s], axis=-1)  # class 1 iff s > 0


def tanh_classifier(images):
    s = 3.0 * jnp.tanh(images.reshape(images.shape[0], -1) @ jnp.asarray(V) / 4.0)
    return jnp.stack([-s, s, jnp.zeros_like(s)], axis=-1)


def _cos(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ------------------------------------------------------------------------------------------------
# Latent directions


def test_gradient_direction_against_analytic_gradients():
    ws = RNG.normal(size=(4, L, D)).astype(np.float32)
    # Linear pipeline: the gradient of logit 1 w.r.t. ws[:, l] is A_l v for every image.
    d = gradient_direction(linear_synthesis, linear_classifier, ws, 1)
    true = np.einsum("ldp,p->ld", A, V)
    np.testing.assert_allclose(np.asarray(d), true / np.linalg.norm(true), rtol=1e-4, atol=1e-6)
    # Nonlinear classifier: per-image gradients differ; check the mean-then-normalise rule in float64.
    x = np.einsum("nld,ldp->np", ws.astype(np.float64), A)
    per = (3.0 / 4.0) * (1 - np.tanh(x @ V / 4.0) ** 2)[:, None, None] * np.einsum("ldp,p->ld", A, V)[None]
    mean = per.mean(0)
    np.testing.assert_allclose(np.asarray(gradient_direction(linear_synthesis, tanh_classifier, ws, 1)),
                               mean / np.linalg.norm(mean), rtol=1e-4, atol=1e-6)
    each = gradient_direction(linear_synthesis, tanh_classifier, ws, jnp.array([1, 0, 1, 0]), per_sample=True)
    signs = np.array([1, -1, 1, -1])[:, None, None]
    ref = signs * per / np.linalg.norm(per.reshape(4, -1), axis=1)[:, None, None]
    np.testing.assert_allclose(np.asarray(each), ref, rtol=1e-4, atol=1e-6)


KEY = jax.random.key(3, impl="rbg")  # cheap to compile; the code works with any key type
NUM, BATCH = 1990, 500  # the last batch is padded


@pytest.fixture(scope="module")
def samples():
    return sample_labelled_latents(mapping_fn, linear_synthesis, linear_classifier, KEY,
                                   num_samples=NUM, z_dim=Z, batch_size=BATCH)


def test_sample_labelled_latents_batches_and_keys(samples):
    ws, logits = samples
    assert ws.shape == (NUM, L, D) and logits.shape == (NUM, 2)
    z = np.concatenate([np.asarray(jax.random.normal(k, (BATCH, Z))) for k in jax.random.split(KEY, 4)])[:NUM]
    w = z.astype(np.float64) @ M_MAP + B_MAP
    np.testing.assert_allclose(np.asarray(ws[:, 1]), w, rtol=1e-4, atol=1e-5)
    s = np.einsum("nd,ldp->np", w, A) @ V + 0.2
    np.testing.assert_allclose(np.asarray(logits[:, 1]), s, rtol=1e-4, atol=1e-4)


def test_logistic_regression_matches_scipy():
    # [300, L * D] like the W+ fit below, so both share one compilation.
    x = RNG.normal(size=(300, L * D)).astype(np.float32)
    true = RNG.normal(size=L * D)
    y = (RNG.uniform(size=300) < 1 / (1 + np.exp(-(x @ true + 0.3)))).astype(np.float32)
    for l2, soft in [(1.0, False), (0.05, False), (2.0, True)]:
        target = (0.2 + 0.6 * y) if soft else y

        def objective(p):
            s = x.astype(np.float64) @ p[:-1] + p[-1]
            return np.sum(np.logaddexp(0, s) - target * s) + 0.5 * l2 * p[:-1] @ p[:-1]

        ref = scipy.optimize.minimize(objective, np.zeros(L * D + 1), method="BFGS", options={"gtol": 1e-9}).x
        fit = fit_logistic_regression(x, target, l2=l2)
        assert bool(fit.converged)
        np.testing.assert_allclose(np.asarray(fit.coef), ref[:-1], rtol=2e-3, atol=5e-4)
        np.testing.assert_allclose(float(fit.intercept), ref[-1], rtol=2e-3, atol=5e-4)
    no_b = fit_logistic_regression(x, y, fit_intercept=False)
    assert float(no_b.intercept) == 0.0
    with pytest.raises(ValueError, match="y must lie in"):
        fit_logistic_regression(x, 2 * y)
    with pytest.raises(ValueError, match="x must be a 2-D"):
        fit_logistic_regression(x[0], y)


def test_logistic_direction_recovers_the_true_direction_and_series_is_monotone(samples):
    found = logistic_regression_direction(mapping_fn, linear_synthesis, linear_classifier, KEY, 1,
                                          num_samples=NUM, z_dim=Z, batch_size=BATCH)
    true = np.einsum("ldp,p->d", A, V)  # logit difference = w . sum_l A_l v + 0.2 in W space
    assert found.direction.shape == (D,)
    assert _cos(found.direction, true) > 0.95
    assert 0.1 < float(found.positive_rate) < 0.9 and float(found.accuracy) > 0.95
    # The same as fitting the sampled latents directly.
    again = fit_direction(samples[0], np.argmax(np.asarray(samples[1]), -1) == 1)
    np.testing.assert_allclose(np.asarray(again.direction), np.asarray(found.direction), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(jnp.linalg.norm(found.direction)), 1.0, rtol=1e-5)

    ws = np.asarray(mapping_fn(jnp.asarray(RNG.normal(size=(1, Z)), jnp.float32)))[0]
    ts = np.linspace(-3, 3, 9).astype(np.float32)
    images, probs = decode_along_direction(linear_synthesis, linear_classifier, ws, found.direction, ts, batch_size=4)
    assert images.shape == (9, H, W, 3) and probs.shape == (9, 2)
    series = ws[None] + ts[:, None, None] * np.asarray(found.direction)
    np.testing.assert_allclose(np.asarray(images), np.einsum("tld,ldp->tp", series, A).reshape(9, H, W, 3),
                               rtol=1e-4, atol=1e-5)
    p1 = np.asarray(probs[:, 1])
    assert np.all(np.diff(p1) >= 0) and p1[0] < 0.5 < p1[-1]  # moves monotonically to class 1
    np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, rtol=1e-6)


def test_w_plus_direction_and_bad_inputs(samples):
    ws, logits = samples
    labels = np.argmax(np.asarray(logits), -1) == 1
    found = fit_direction(ws[:300], labels[:300], space="w+")
    assert found.direction.shape == (L, D)
    np.testing.assert_allclose(float(jnp.linalg.norm(found.direction)), 1.0, rtol=1e-5)
    # All W+ vectors are equal after mapping, so the W+ fit spreads one W direction over the layers.
    true = np.einsum("ldp,p->d", A, V)
    assert _cos(np.asarray(found.direction).sum(0), true) > 0.9
    zeros = jnp.zeros((L, D))
    with pytest.raises(ValueError, match="direction must have shape"):
        decode_along_direction(linear_synthesis, linear_classifier, zeros, jnp.zeros(D + 1), jnp.zeros(3))
    with pytest.raises(ValueError, match="ts must be"):
        decode_along_direction(linear_synthesis, linear_classifier, zeros, jnp.zeros(D), jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="one latent"):
        decode_along_direction(linear_synthesis, linear_classifier, jnp.zeros((2, L, D)), jnp.zeros(D), jnp.zeros(3))
    with pytest.raises(ValueError, match="out of range"):
        gradient_direction(linear_synthesis, linear_classifier, jnp.zeros((2, L, D)), 2)
    with pytest.raises(ValueError, match="same label"):
        fit_direction(ws[:10], np.zeros(10, bool))
    with pytest.raises(ValueError, match="space"):
        fit_direction(ws[:10], labels[:10], space="z")
    with pytest.raises(ValueError, match="labels must have shape"):
        fit_direction(ws[:10], labels[:9])


def test_map_in_chunks_pads_and_trims():
    x = jnp.arange(23.0).reshape(23, 1)
    out = map_in_chunks(lambda a: (a * 2, a.sum(-1)), x, 5)
    np.testing.assert_array_equal(np.asarray(out[0]), np.arange(23.0).reshape(23, 1) * 2)
    np.testing.assert_array_equal(np.asarray(out[1]), np.arange(23.0))


# ------------------------------------------------------------------------------------------------
# Interpolation and integrated gradients


def test_latent_interpolation_series_and_difference_maps():
    ws_a = RNG.normal(size=(L, D)).astype(np.float32)
    ws_b = RNG.normal(size=(1, L, D)).astype(np.float32)
    alphas, path = interpolate_latents(ws_a, ws_b, 5)
    np.testing.assert_allclose(np.asarray(path[0]), ws_a)
    np.testing.assert_allclose(np.asarray(path[-1]), ws_b[0], rtol=1e-6, atol=1e-6)
    out = latent_interpolation(tanh_synthesis, ws_a, ws_b, num_steps=5, classifier_fn=tanh_classifier, batch_size=2)
    ref = np.tanh(np.einsum("tld,ldp->tp", np.asarray(path, np.float64), A)).reshape(5, H, W, 3)
    np.testing.assert_allclose(np.asarray(out.images), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.difference_maps), np.abs(ref - ref[:1]).mean(-1), rtol=1e-4, atol=1e-5)
    assert float(jnp.max(out.difference_maps[0])) == 0.0
    assert out.probs.shape == (5, 3)
    assert latent_interpolation(tanh_synthesis, ws_a, ws_b, num_steps=3).probs is None
    with pytest.raises(ValueError, match="same shape"):
        interpolate_latents(ws_a, ws_a[:, :2], 3)
    with pytest.raises(ValueError, match="num_steps"):
        interpolate_latents(ws_a, ws_b, 1)
    with pytest.raises(ValueError, match="series"):
        difference_maps(np.zeros((3, 4)))


def test_integrated_gradients_completeness_and_float64_reference():
    ws_a = RNG.normal(size=(L, D)).astype(np.float32)
    ws_b = (ws_a + 1.5 * RNG.normal(size=(L, D))).astype(np.float32)

    def f64(w):  # F = logit 1 of tanh_classifier(tanh_synthesis(w)) and its gradient, in float64
        u = np.einsum("ld,ldp->p", w, A)
        img = np.tanh(u)
        s = img @ V / 4.0
        return 3 * np.tanh(s), np.einsum("ldp,p->ld", A, (3 / 4) * (1 - np.tanh(s) ** 2) * V * (1 - img**2))

    m = 101
    a64, b64 = ws_a.astype(np.float64), ws_b.astype(np.float64)
    grads = np.stack([f64(a64 + t * (b64 - a64))[1] for t in np.linspace(0, 1, m)])
    w = np.full(m, 1 / (m - 1))
    w[[0, -1]] *= 0.5
    ref = (b64 - a64) * np.tensordot(w, grads, axes=1)
    delta = f64(b64)[0] - f64(a64)[0]

    out = latent_integrated_gradients(tanh_synthesis, tanh_classifier, ws_a, ws_b, 1, batch_size=16)
    np.testing.assert_allclose(np.asarray(out.attributions), ref, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(float(out.delta), delta, rtol=1e-4, atol=1e-5)
    assert abs(float(out.attributions.sum()) - delta) < 1e-2 * max(abs(delta), 1e-3)  # completeness
    np.testing.assert_allclose(float(out.completeness_gap), float(out.attributions.sum()) - float(out.delta), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.layer_attributions), ref.sum(-1), rtol=1e-3, atol=1e-5)
    assert out.path_scores.shape == (m,)
    # Chunking does not change the answer.
    whole = latent_integrated_gradients(tanh_synthesis, tanh_classifier, ws_a, ws_b, 1, batch_size=None)
    np.testing.assert_allclose(np.asarray(whole.attributions), np.asarray(out.attributions), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="out of range"):
        latent_integrated_gradients(tanh_synthesis, tanh_classifier, ws_a, ws_b, 3, batch_size=16)  # compiled above
    with pytest.raises(ValueError, match="score"):
        latent_integrated_gradients(tanh_synthesis, tanh_classifier, ws_a, ws_b, 1, score="margin")
