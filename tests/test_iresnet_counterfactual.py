"""ECINN-style counterfactuals with a toy invertible encoder (an orthogonal map) and a linear head."""

import jax.numpy as jnp
import numpy as np
import pytest

from viscoin_jax.explain.iresnet_counterfactual import class_means, counterfactuals

H, W, C = 3, 5, 3
P = H * W * 3
RNG = np.random.default_rng(0)
Q = np.linalg.qr(RNG.normal(size=(P, P)))[0].astype(np.float32)  # orthogonal: exact inverse Q^T
CENTRES = 2.0 * RNG.normal(size=(C, P)).astype(np.float32)
WH = CENTRES.T.copy()  # nearest-centre head: logits_c = z . mu_c - |mu_c|^2 / 2
BH = -0.5 * np.sum(CENTRES**2, axis=1)


def encode_fn(x):  # z keeps the image layout [N, H, W, 3], like an i-ResNet's feature map
    return (x.reshape(x.shape[0], -1) @ jnp.asarray(Q)).reshape(x.shape)


def head_fn(z):
    return z.reshape(z.shape[0], -1) @ jnp.asarray(WH) + jnp.asarray(BH)


def inverse_fn(z):
    x = (z.reshape(z.shape[0], -1) @ jnp.asarray(Q).T).reshape(z.shape)
    return x, {"converged": jnp.arange(z.shape[0]) % 3 != 1, "residual": jnp.zeros(z.shape[0])}


def _data(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, size=n)
    z = CENTRES[labels] + rng.normal(size=(n, P))
    return (z @ Q.T).reshape(n, H, W, 3).astype(np.float32), labels.astype(np.int32)


def test_class_means_against_numpy():
    images, labels = _data(23, 1)
    labels[labels == 2] = 0  # class 2 empty -> NaN mean
    means, counts = class_means(encode_fn, images, labels, 4, batch_size=7)
    z = images.reshape(23, -1).astype(np.float64) @ Q
    for c in range(4):
        assert int(counts[c]) == np.sum(labels == c)
        if np.any(labels == c):
            np.testing.assert_allclose(np.asarray(means[c]).ravel(), z[labels == c].mean(0), rtol=1e-4, atol=1e-5)
        else:
            assert np.all(np.isnan(np.asarray(means[c])))
    with pytest.raises(ValueError, match="labels out of range"):
        class_means(encode_fn, images, np.full(23, 4), 4)
    with pytest.raises(ValueError, match="labels must be an array of shape"):
        class_means(encode_fn, images, labels[:5], 4)


def _first_alpha(z, src, tgt, means, max_alpha):
    """Smallest alpha >= 0 with argmax head(z + alpha (mu_t - mu_s)) == t, from the linear constraints."""
    step = means[tgt] - means[src]
    logits0 = z @ WH + BH
    slope = step @ WH
    lo, hi = 0.0, max_alpha
    for c in range(C):
        if c == tgt:
            continue
        a, b = logits0[tgt] - logits0[c], slope[tgt] - slope[c]  # need a + alpha b > 0
        if b > 0:
            lo = max(lo, -a / b)
        elif b < 0:
            hi = min(hi, -a / b)
        elif a <= 0:
            return None
    return lo if lo < hi else None


def test_closed_form_finds_the_boundary_and_inverts():
    images, labels = _data(40, 2)
    means, _ = class_means(encode_fn, images, labels, C)
    means64 = np.asarray(means, np.float64).reshape(C, -1)
    x, _ = _data(9, 3)
    target = np.array([0, 1, 2, 0, 1, 2, 2, 1, 0], np.int32)
    out = counterfactuals(encode_fn, head_fn, inverse_fn, x, target, means=means, max_alpha=3.0, num_alphas=13)
    z = x.reshape(9, -1).astype(np.float64) @ Q
    pred0 = np.argmax(z @ WH + BH, axis=1)
    np.testing.assert_array_equal(np.asarray(out.source), pred0)
    for i in range(9):
        ref = _first_alpha(z[i], pred0[i], target[i], means64, 3.0)
        if ref is None:
            assert not bool(out.latent_valid[i])
            continue
        assert bool(out.latent_valid[i])
        np.testing.assert_allclose(float(out.amount[i]), ref, atol=1e-4)
        moved = z[i] + float(out.amount[i]) * (means64[target[i]] - means64[pred0[i]])
        np.testing.assert_allclose(np.asarray(out.z[i]).ravel(), moved, rtol=1e-4, atol=1e-4)
    assert np.sum(np.asarray(out.latent_valid)) >= 6
    # Inversion is exact here, so the end-to-end decision equals the latent one, except where z' sits
    # within float rounding of the boundary (the bisection puts it there): there it may flip back,
    # which is why the report aims past the boundary (test_confidence_target_aims_past_the_boundary).
    np.testing.assert_allclose(np.asarray(out.images).reshape(9, -1), np.asarray(out.z).reshape(9, -1) @ Q.T,
                               rtol=1e-4, atol=1e-4)
    zl = np.asarray(out.z, np.float64).reshape(9, -1) @ WH + BH
    margin = zl[np.arange(9), target] - np.max(np.where(np.eye(C)[target] > 0, -np.inf, zl), axis=1)
    clear = np.abs(margin) > 1e-3
    np.testing.assert_array_equal(np.asarray(out.valid)[clear], np.asarray(out.latent_valid)[clear])
    np.testing.assert_array_equal(np.asarray(out.prediction)[np.asarray(out.valid)], target[np.asarray(out.valid)])
    np.testing.assert_array_equal(np.asarray(out.converged), np.arange(9) % 3 != 1)
    assert "residual" in out.inverse_info
    # Samples already in the target class need no move.
    same = pred0 == target
    np.testing.assert_allclose(np.asarray(out.amount)[same], 0.0)


def test_gradient_steps_match_a_numpy_loop():
    x, _ = _data(6, 4)
    target = np.array([1, 2, 0, 0, 1, 2], np.int32)
    out = counterfactuals(encode_fn, head_fn, inverse_fn, x, target, method="gradient", step_size=0.5, max_steps=40)
    z = x.reshape(6, -1).astype(np.float64) @ Q
    steps = np.zeros(6, int)
    for _ in range(40):
        logits = z @ WH + BH
        done = np.argmax(logits, 1) == target
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - np.eye(C)[target]) @ WH.T
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        z = np.where(done[:, None], z, z - 0.5 * g)
        steps += ~done
    np.testing.assert_array_equal(np.asarray(out.amount), steps)
    np.testing.assert_allclose(np.asarray(out.z).reshape(6, -1), z, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(out.latent_valid), np.argmax(z @ WH + BH, 1) == target)
    assert bool(np.all(out.valid))


def test_bad_inputs():
    images, labels = _data(10, 5)
    means, _ = class_means(encode_fn, images, labels, C)
    x = images[:4]
    with pytest.raises(ValueError, match="needs the class means"):
        counterfactuals(encode_fn, head_fn, inverse_fn, x, 1)
    with pytest.raises(ValueError, match="method"):
        counterfactuals(encode_fn, head_fn, inverse_fn, x, 1, method="newton")
    with pytest.raises(ValueError, match="target out of range"):
        counterfactuals(encode_fn, head_fn, inverse_fn, x, 3, method="gradient", max_steps=2)
    nan_means = means.at[1].set(jnp.nan)
    with pytest.raises(ValueError, match=r"classes \[1\]"):
        counterfactuals(encode_fn, head_fn, inverse_fn, x, 1, means=nan_means)
    with pytest.raises(ValueError, match="latent shape"):
        counterfactuals(encode_fn, head_fn, inverse_fn, x, 1, means=means[:, :2])
    bad_inverse = lambda z: (inverse_fn(z)[0], {})
    with pytest.raises(ValueError, match="converged"):
        counterfactuals(encode_fn, head_fn, bad_inverse, x, 1, method="gradient", max_steps=2)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        counterfactuals(encode_fn, head_fn, inverse_fn, x[..., 0], 1, means=means)


def _target_prob(z, tgt):
    logits = z @ WH + BH
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True))[..., tgt], np.argmax(logits, -1) == tgt


def test_confidence_target_aims_past_the_boundary():
    """The smallest alpha with p_target >= 0.9 (a fine numpy scan of the line) and, through an inverse
    whose residual shrinks z by 2 %, validity after re-encoding: boundary counterfactuals flip back,
    confident ones do not."""
    images, labels = _data(40, 2)
    means, _ = class_means(encode_fn, images, labels, C)
    means64 = np.asarray(means, np.float64).reshape(C, -1)
    x, _ = _data(9, 3)
    z = x.reshape(9, -1).astype(np.float64) @ Q
    pred0 = np.argmax(z @ WH + BH, axis=1)
    target = ((pred0 + 1) % C).astype(np.int32)

    def leaky_inverse(zz):  # a fixed-point inverse that stops short: encode(x) = 0.98 z
        x, info = inverse_fn(0.98 * zz)
        return x, info

    out = counterfactuals(encode_fn, head_fn, leaky_inverse, x, target, means=means, max_alpha=4.0, num_alphas=17,
                          confidence=0.9)
    alphas = np.arange(0, 4.0, 1e-4)
    for i in range(9):
        line = z[i] + alphas[:, None] * (means64[target[i]] - means64[pred0[i]])
        p, top = _target_prob(line, target[i])
        ok = top & (p >= 0.9)
        assert ok.any()
        np.testing.assert_allclose(float(out.amount[i]), alphas[np.argmax(ok)], atol=2e-4)
        moved = z[i] + float(out.amount[i]) * (means64[target[i]] - means64[pred0[i]])
        # drift by hand: |0.98 z' - z'| / |z'|
        np.testing.assert_allclose(float(out.latent_drift[i]), 0.02, rtol=1e-3)
        p_back, _ = _target_prob(0.98 * moved, target[i])
        np.testing.assert_allclose(float(out.target_prob[i]), p_back, rtol=1e-3, atol=1e-4)
    assert bool(np.all(out.latent_valid)) and bool(np.all(out.valid))
    boundary = counterfactuals(encode_fn, head_fn, leaky_inverse, x, target, means=means, max_alpha=4.0,
                               num_alphas=17)
    assert bool(np.all(boundary.latent_valid)) and not bool(np.all(boundary.valid))  # flipped back
    with pytest.raises(ValueError, match="confidence must lie in"):
        counterfactuals(encode_fn, head_fn, inverse_fn, x, target, means=means, confidence=1.0)


def test_gradient_steps_go_on_to_the_confidence():
    x, _ = _data(5, 6)
    target = np.array([1, 2, 0, 0, 1], np.int32)
    out = counterfactuals(encode_fn, head_fn, inverse_fn, x, target, method="gradient", step_size=0.5, max_steps=200,
                          confidence=0.95)
    z = np.asarray(out.z, np.float64).reshape(5, -1)
    for i in range(5):
        p, top = _target_prob(z[i], target[i])
        assert top and p >= 0.95 - 1e-4
    assert bool(np.all(out.valid))
    plain = counterfactuals(encode_fn, head_fn, inverse_fn, x, target, method="gradient", step_size=0.5, max_steps=200)
    assert np.all(np.asarray(out.amount) >= np.asarray(plain.amount))
