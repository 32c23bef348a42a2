"""Attribution metrics against independent references: scipy (ranks, Spearman), a float64 numpy SSIM,
direct numpy loops (deletion / insertion), the statistics module (Z'-factor)."""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
import scipy.stats
from flax import nnx

from viscoin_jax.explain import attributions as A
from viscoin_jax.metrics import attribution_metrics as M
from viscoin_jax.metrics.separability import z_prime_factor, z_prime_from_labels

H, W, C, K = 6, 5, 3, 4


def rkey(seed):  # "rbg" keys compile far faster than threefry on CPU; any key implementation works
    return jax.random.key(seed, impl="rbg")


def tiny_params(seed=0):
    r = np.random.default_rng(seed)
    return {"conv": {"kernel": jnp.asarray(r.normal(0, 0.5, (3, 3, C, 6)), jnp.float32),
                     "bias": jnp.asarray(r.normal(0, 0.1, 6), jnp.float32)},
            "head": {"kernel": jnp.asarray(r.normal(0, 1.0, (6, K)), jnp.float32),
                     "bias": jnp.asarray(r.normal(0, 0.1, K), jnp.float32)},
            "step": jnp.asarray(7, jnp.int32)}


def tiny_apply(p, x):
    h = jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.tanh(h + p["conv"]["bias"])
    return jnp.mean(h * h, axis=(1, 2)) @ p["head"]["kernel"] + p["head"]["bias"]


def images(n=3, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (n, H, W, C)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Ranks, Spearman, SSIM


def test_average_ranks_match_scipy_with_ties():
    x = np.round(np.random.default_rng(0).normal(size=(4, 37)) * 2) / 2  # many ties
    np.testing.assert_allclose(M.average_ranks(x), scipy.stats.rankdata(x, axis=1), rtol=0, atol=1e-6)


def test_spearman_matches_scipy_per_image():
    r = np.random.default_rng(1)
    a = np.round(r.normal(size=(5, 9, 7)), 1)
    b = np.round(a + r.normal(scale=[[[0.1]], [[0.5]], [[1.0]], [[3.0]], [[10.0]]], size=(5, 9, 7)), 1)
    b[4] = -a[4] + 0.01 * r.normal(size=(9, 7))  # strong negative correlation
    rho = np.asarray(M.spearman_correlation(a, b))
    ref = [scipy.stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic for i in range(5)]
    np.testing.assert_allclose(rho, ref, atol=2e-6)
    assert rho[4] < -0.9
    const = M.spearman_correlation(np.ones((1, 3, 3)), a[:1, :3, :3])
    assert np.isnan(const[0])
    with pytest.raises(ValueError, match="same shape"):
        M.spearman_correlation(a, b[:, :3])


def ssim_reference(a, b, data_range=1.0, size=11, sigma=1.5):
    """float64 SSIM with a 2-D Gaussian window and 'valid' correlation (scipy), by the formula."""
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for x_, y_ in zip(a.astype(np.float64), b.astype(np.float64)):
        f = lambda z: scipy.signal.correlate2d(z, win, mode="valid")  # noqa: E731
        mx, my = f(x_), f(y_)
        vx, vy, cxy = f(x_ * x_) - mx ** 2, f(y_ * y_) - my ** 2, f(x_ * y_) - mx * my
        out.append(np.mean((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))))
    return np.array(out)


def test_ssim_matches_float64_reference():
    r = np.random.default_rng(2)
    a = r.uniform(size=(3, 16, 13))
    b = np.clip(a + r.normal(scale=[[[0.02]], [[0.2]], [[1.0]]], size=a.shape), 0, 1)
    s = np.asarray(M.ssim(a, b))
    np.testing.assert_allclose(s, ssim_reference(a, b), atol=1e-5)
    assert s[0] > s[1] > s[2]
    np.testing.assert_allclose(M.ssim(a, a), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        M.ssim(a[:, :8, :8], b[:, :8, :8])


# ---------------------------------------------------------------------------------------------
# Parameter randomisation


def test_param_groups_and_cascading_randomisation():
    p = tiny_params()
    assert M.param_groups(p) == ["conv", "head", "step"]
    layers = ["conv", "head"]  # network order
    top1 = M.randomise_params(p, rkey(0), layers=layers, n_layers=1)
    assert np.array_equal(top1["conv"]["kernel"], p["conv"]["kernel"])
    assert not np.allclose(top1["head"]["kernel"], p["head"]["kernel"])
    assert not np.allclose(top1["head"]["bias"], p["head"]["bias"])
    bottom1 = M.randomise_params(p, rkey(0), layers=layers, n_layers=1, from_top=False)
    assert np.array_equal(bottom1["head"]["kernel"], p["head"]["kernel"])
    assert not np.allclose(bottom1["conv"]["kernel"], p["conv"]["kernel"])
    full = M.randomise_params(p, rkey(0), layers=layers)
    assert not np.allclose(full["conv"]["kernel"], p["conv"]["kernel"])
    assert int(full["step"]) == 7  # not under a listed layer (and not floating): kept
    none = M.randomise_params(p, rkey(0), layers=layers, n_layers=0)
    assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(none), jax.tree.leaves(p)))


def test_randomisation_methods_preserve_what_they_claim():
    r = np.random.default_rng(3)
    big = {"a": {"kernel": jnp.asarray(r.normal(0.3, 2.0, (64, 64)), jnp.float32)}}
    perm = M.randomise_params(big, rkey(1), method="permute")["a"]["kernel"]
    np.testing.assert_array_equal(np.sort(np.ravel(perm)), np.sort(np.ravel(big["a"]["kernel"])))
    assert not np.array_equal(perm, big["a"]["kernel"])
    gauss = np.asarray(M.randomise_params(big, rkey(1), method="gaussian")["a"]["kernel"])
    assert abs(gauss.mean() - 0.3) < 0.1 and abs(gauss.std() - 2.0) < 0.1
    assert abs(np.corrcoef(gauss.ravel(), np.ravel(big["a"]["kernel"]))[0, 1]) < 0.05
    zeros = M.randomise_params(big, rkey(1), method=lambda k, leaf: jnp.zeros_like(leaf))["a"]["kernel"]
    assert not np.any(zeros)
    with pytest.raises(ValueError, match="randomisation method"):
        M.randomise_params(big, rkey(1), method="xavier")
    with pytest.raises(ValueError, match="matches no parameter"):
        M.randomise_params(big, rkey(1), layers=["b"])
    with pytest.raises(ValueError, match="n_layers"):
        M.randomise_params(big, rkey(1), n_layers=2)


def test_randomise_nnx_state_prefix_layers():
    # abstract init + numpy values: eager PRNG initialisers cost seconds of compile time on CPU
    abstract = nnx.eval_shape(lambda: nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
                                                     nnx.Linear(4, 2, rngs=nnx.Rngs(1))))
    graphdef, params = nnx.split(abstract, nnx.Param)
    r = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: jnp.asarray(r.normal(size=leaf.shape), leaf.dtype), params)
    model = nnx.merge(graphdef, params)
    groups = M.param_groups(params)
    assert groups == ["layers/0", "layers/1"]
    new = M.randomise_params(params, rkey(3), layers=["layers/0", "layers/1"], n_layers=1)
    merged = nnx.merge(graphdef, new)
    np.testing.assert_array_equal(merged.layers[0].kernel[...], model.layers[0].kernel[...])
    assert not np.allclose(merged.layers[1].kernel[...], model.layers[1].kernel[...])
    # prefix "layers" selects both
    both = nnx.merge(graphdef, M.randomise_params(params, rkey(3), layers=["layers"]))
    assert not np.allclose(both.layers[0].kernel[...], model.layers[0].kernel[...])


def test_model_randomisation_check_spearman_and_ssim():
    p = tiny_params()
    x = np.random.default_rng(4).uniform(-1, 1, (2, 12, 11, C)).astype(np.float32)
    same = M.model_randomisation_check(A.vanilla_gradient, p, p, tiny_apply, x)
    np.testing.assert_allclose(same.spearman, 1.0, atol=1e-6)
    np.testing.assert_array_equal(same.targets, np.argmax(tiny_apply(p, x), axis=1))

    p_rand = M.randomise_params(p, rkey(5), layers=["conv", "head"])
    res = M.model_randomisation_check(A.vanilla_gradient, p, p_rand, tiny_apply, x, with_ssim=True)
    grad = jax.jit(jax.grad(lambda params, im: jnp.sum(tiny_apply(params, im)[jnp.arange(2), res.targets]),
                            argnums=1))
    g_trained = np.abs(np.asarray(grad(p, x))).max(-1)
    g_random = np.abs(np.asarray(grad(p_rand, x))).max(-1)
    np.testing.assert_allclose(res.maps_trained, g_trained, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.maps_random, g_random, rtol=1e-5, atol=1e-7)
    ref = [scipy.stats.spearmanr(g_trained[i].ravel(), g_random[i].ravel()).statistic for i in range(2)]
    np.testing.assert_allclose(res.spearman, ref, atol=2e-6)
    assert np.all(res.spearman < 0.9)
    norm = lambda m: (m - m.min(axis=(1, 2), keepdims=True)) / np.ptp(m, axis=(1, 2), keepdims=True)  # noqa
    np.testing.assert_allclose(res.ssim, ssim_reference(norm(g_trained), norm(g_random)), atol=1e-5)
    with pytest.raises(ValueError, match="same tree structure"):
        M.model_randomisation_check(A.vanilla_gradient, p, {"conv": p["conv"]}, tiny_apply, x)


# ---------------------------------------------------------------------------------------------
# Deletion / insertion


def curves_loop(apply, x, sal, t, mode, steps, baseline):
    """Direct numpy loop: at each step copy the pixel mask explicitly, call the model, softmax."""
    n, h, w, _ = x.shape
    out = np.zeros((n, steps + 1))
    for i in range(n):
        order = np.argsort(-sal[i].ravel(), kind="stable")
        for k in range(steps + 1):
            count = (k * h * w) // steps
            img = (x[i] if mode == "deletion" else baseline[i]).copy()
            src = baseline[i] if mode == "deletion" else x[i]
            for pix in order[:count]:
                r, c = divmod(int(pix), w)
                img[r, c] = src[r, c]
            logits = np.asarray(apply(jnp.asarray(img[None])), np.float64)[0]
            e = np.exp(logits - logits.max())
            out[i, k] = e[t[i]] / e.sum()
    return out


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_deletion_insertion_matches_numpy_loop(mode):
    p = tiny_params(1)
    apply = lambda im: tiny_apply(p, im)  # noqa: E731
    x = images(2, seed=6)
    sal = np.random.default_rng(7).normal(size=(2, H, W)).astype(np.float32)
    baseline = np.random.default_rng(8).uniform(-0.2, 0.2, x.shape).astype(np.float32)
    res = M.deletion_insertion(apply, x, sal, mode=mode, num_steps=7, baseline=baseline, batch_size=3)
    t = np.argmax(np.asarray(apply(jnp.asarray(x))), axis=1)
    ref = curves_loop(apply, x, sal, t, mode, 7, baseline)
    np.testing.assert_allclose(res.scores, ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.fractions, (np.arange(8) * H * W // 7) / (H * W))
    np.testing.assert_allclose(res.auc, [np.trapezoid(ref[i], res.fractions) for i in range(2)], rtol=1e-6)
    first, last = (0, -1) if mode == "deletion" else (-1, 0)
    probs_x = np.asarray(jax.nn.softmax(apply(jnp.asarray(x))))[np.arange(2), t]
    probs_b = np.asarray(jax.nn.softmax(apply(jnp.asarray(baseline))))[np.arange(2), t]
    np.testing.assert_allclose(res.scores[:, first], probs_x, rtol=1e-5)
    np.testing.assert_allclose(res.scores[:, last], probs_b, rtol=1e-5)


def test_deletion_insertion_bad_input():
    apply = lambda im: tiny_apply(tiny_params(), im)  # noqa: E731
    x = images(2)
    with pytest.raises(ValueError, match="saliency must be"):
        M.deletion_insertion(apply, x, np.zeros((2, H, W, C)))
    with pytest.raises(ValueError, match="unknown mode"):
        M.deletion_insertion(apply, x, np.zeros((2, H, W)), mode="both")
    with pytest.raises(ValueError, match="non-finite"):
        M.deletion_insertion(apply, x, np.full((2, H, W), np.nan))


# ---------------------------------------------------------------------------------------------
# Z'-factor


def test_z_prime_factor_matches_formula():
    r = np.random.default_rng(9)
    pos, neg = r.normal(0.9, 0.02, 25), r.normal(0.1, 0.05, 31)
    ref = 1 - 3 * (statistics.stdev(pos) + statistics.stdev(neg)) / abs(statistics.mean(pos) - statistics.mean(neg))
    assert z_prime_factor(pos, neg) == pytest.approx(ref, rel=1e-12)
    ref0 = 1 - 3 * (statistics.pstdev(pos) + statistics.pstdev(neg)) / abs(statistics.mean(pos) - statistics.mean(neg))
    assert z_prime_factor(pos, neg, ddof=0) == pytest.approx(ref0, rel=1e-12)
    assert z_prime_factor(neg, pos) == pytest.approx(ref, rel=1e-12)  # symmetric
    scores = np.concatenate([pos, neg])
    labels = np.array([1] * 25 + [0] * 31)
    assert z_prime_from_labels(scores, labels) == pytest.approx(ref, rel=1e-12)
    assert z_prime_factor([1.0, 2.0], [1.0, 2.0]) == float("-inf")


def test_z_prime_factor_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        z_prime_factor(np.zeros((2, 2)), [1.0, 2.0])
    with pytest.raises(ValueError, match="more than ddof"):
        z_prime_factor([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-finite"):
        z_prime_factor([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="both"):
        z_prime_from_labels([0.1, 0.2], [1, 1])
