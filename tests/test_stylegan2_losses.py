"""StyleGAN2 losses against float64 numpy formulas and closed-form gradients / Jacobians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from viscoin_jax.trainers.stylegan2_losses import (d_logistic_loss, ema_beta, ema_update, g_nonsaturating_loss,
                                                   lazy_adam_hparams, mix_ws, path_length_penalty, r1_penalty,
                                                   sample_mixing_cutoff, style_mix)


def _softplus(x):
    return np.logaddexp(0.0, np.asarray(x, np.float64))


def _rng(seed):
    return np.random.default_rng(seed)


def _key(seed):
    """An RBG key: the losses take any key type, and threefry costs seconds of CPU per compilation."""
    return jax.random.key(seed, impl="rbg")


# --------------------------------------------------------------------------------------------------
# Adversarial losses


def test_logistic_losses_match_numpy():
    rng = _rng(0)
    real = rng.normal(0, 3, 7).astype(np.float32)
    fake = rng.normal(0, 3, 5).astype(np.float32)
    np.testing.assert_allclose(float(g_nonsaturating_loss(fake)), _softplus(-fake).mean(), rtol=1e-6)
    np.testing.assert_allclose(float(d_logistic_loss(real, fake)), _softplus(fake).mean() + _softplus(-real).mean(),
                               rtol=1e-6)
    # [N, 1] logits (the reference D's shape) are accepted
    np.testing.assert_allclose(float(g_nonsaturating_loss(fake[:, None])), _softplus(-fake).mean(), rtol=1e-6)
    # large logits stay finite
    assert np.isfinite(float(d_logistic_loss(np.array([200.0, -200.0]), np.array([300.0]))))
    with pytest.raises(ValueError, match=r"\[N\] or \[N, 1\]"):
        g_nonsaturating_loss(np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="floating"):
        d_logistic_loss(np.zeros(4, np.int32), np.zeros(4, np.float32))


# --------------------------------------------------------------------------------------------------
# R1


@pytest.mark.parametrize("interval", [1, 16])
def test_r1_on_quadratic_discriminator_matches_closed_form(interval):
    rng = _rng(1)
    x = rng.normal(size=(3, 5, 4, 3)).astype(np.float32)
    a = rng.normal(size=(5, 4, 3)).astype(np.float32)
    b = rng.normal(size=(5, 4, 3)).astype(np.float32)

    def d_fn(img):  # D(x)_n = sum a x_n^2 + b x_n, so grad = 2 a x_n + b
        return jnp.sum(a * img ** 2 + b * img, axis=(1, 2, 3))

    gamma = 0.7
    loss, aux = r1_penalty(d_fn, jnp.asarray(x), gamma=gamma, interval=interval)
    x64, a64, b64 = (v.astype(np.float64) for v in (x, a, b))
    per_sample = np.sum((2 * a64 * x64 + b64) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(aux["r1_penalty"]), per_sample, rtol=1e-5)
    np.testing.assert_allclose(float(loss), per_sample.mean() * gamma / 2 * interval, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["real_logits"]),
                               np.sum(a64 * x64 ** 2 + b64 * x64, axis=(1, 2, 3)), rtol=1e-5)


def test_r1_gradient_wrt_discriminator_params_matches_finite_differences():
    rng = _rng(2)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, 3, 3, 2)))
        theta = jnp.asarray(rng.normal(size=(3, 3, 2)))

        @jax.jit
        def loss_of(th):
            d_fn = lambda img: jnp.sum(jnp.tanh(img * th) * th, axis=(1, 2, 3))
            return r1_penalty(d_fn, x, gamma=1.3, interval=4)[0]

        g = np.asarray(jax.grad(loss_of)(theta))
        assert np.abs(g).max() > 0
        eps = 1e-6
        for idx in [(0, 0, 0), (1, 2, 1), (2, 1, 0)]:
            e = np.zeros(theta.shape)
            e[idx] = eps
            fd = (float(loss_of(theta + e)) - float(loss_of(theta - e))) / (2 * eps)
            np.testing.assert_allclose(g[idx], fd, rtol=1e-6, atol=1e-8)


def test_r1_bad_inputs():
    d_fn = lambda img: jnp.sum(img, axis=(1, 2, 3))
    with pytest.raises(ValueError, match="4-D"):
        r1_penalty(d_fn, jnp.zeros((2, 3, 3)), gamma=1.0)
    with pytest.raises(ValueError, match="interval"):
        r1_penalty(d_fn, jnp.zeros((2, 3, 3, 1)), gamma=1.0, interval=0)
    with pytest.raises(ValueError, match="returned 1 logits for 2 images"):
        r1_penalty(lambda img: jnp.sum(img)[None], jnp.zeros((2, 3, 3, 1)), gamma=1.0)


# --------------------------------------------------------------------------------------------------
# Path length


def _linear_generator(rng, num_ws, w_dim, h, w, c):
    a = rng.normal(size=(num_ws, w_dim, h, w, c)).astype(np.float32)
    return a, (lambda ws: jnp.einsum("nkd,kdhwc->nhwc", ws, a, precision="highest"))


def test_path_length_on_linear_generator_matches_closed_form():
    rng = _rng(3)
    n, num_ws, w_dim, h, w, c = 4, 3, 5, 6, 7, 3
    a, synth = _linear_generator(rng, num_ws, w_dim, h, w, c)
    ws = jnp.asarray(rng.normal(size=(n, num_ws, w_dim)).astype(np.float32))
    key = _key(4)
    pl_mean = 0.3
    loss, aux = path_length_penalty(synth, ws, key, pl_mean, pl_weight=2.0, pl_decay=0.01, interval=4)
    # the documented noise: N(0, I) of the images' shape from `key`, divided by sqrt(H * W)
    y = np.asarray(jax.random.normal(key, (n, h, w, c), jnp.float32), np.float64) / np.sqrt(h * w)
    grads = np.einsum("kdhwc,nhwc->nkd", a.astype(np.float64), y)  # J^T y, J = A (linear generator)
    lengths = np.sqrt(np.mean(np.sum(grads ** 2, axis=2), axis=1))
    new_mean = pl_mean + 0.01 * (lengths.mean() - pl_mean)
    np.testing.assert_allclose(np.asarray(aux["pl_lengths"]), lengths, rtol=1e-5)
    np.testing.assert_allclose(float(aux["pl_mean"]), new_mean, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["pl_penalty"]), (lengths - new_mean) ** 2, rtol=1e-4)
    np.testing.assert_allclose(float(loss), np.mean((lengths - new_mean) ** 2) * 2.0 * 4, rtol=1e-4)
    # Independent of the noise draw: E[length^2] = sum_k ||A_k||_F^2 / (num_ws * H * W).
    keys = jax.random.split(_key(5), 400)
    sq = jax.jit(jax.vmap(lambda k: path_length_penalty(synth, ws[:1], k, 0.0)[1]["pl_lengths"][0] ** 2))(keys)
    expected = np.sum(a.astype(np.float64) ** 2) / (num_ws * h * w)
    np.testing.assert_allclose(float(np.mean(np.asarray(sq))), expected, rtol=0.08)


def test_path_length_batch_shrink_uses_first_latents():
    rng = _rng(6)
    a, synth = _linear_generator(rng, 3, 5, 6, 7, 3)  # the image shape of the test above: no new compile
    ws = jnp.asarray(rng.normal(size=(8, 3, 5)).astype(np.float32))
    key = _key(7)
    _, shrunk = path_length_penalty(synth, ws, key, 0.5, batch_shrink=2)
    _, direct = path_length_penalty(synth, ws[:4], key, 0.5)
    assert shrunk["pl_lengths"].shape == (4,)
    np.testing.assert_allclose(np.asarray(shrunk["pl_lengths"]), np.asarray(direct["pl_lengths"]), rtol=1e-6)
    with pytest.raises(ValueError, match="leaves no latents"):
        path_length_penalty(synth, ws, key, 0.5, batch_shrink=9)
    with pytest.raises(ValueError, match="ws must be"):
        path_length_penalty(synth, ws[0], key, 0.5)
    with pytest.raises(ValueError, match="synthesis_fn must return"):
        path_length_penalty(lambda v: jnp.sum(v), ws, key, 0.5)


def test_path_length_is_differentiable_wrt_generator_and_mapping_params():
    """Second-order gradients (through jax.vjp inside the loss) against float64 finite differences."""
    rng = _rng(8)
    n, num_ws, w_dim, z_dim, h, w, c = 3, 2, 3, 4, 4, 4, 2
    with jax.enable_x64(True):
        p_syn = jnp.asarray(rng.normal(size=(num_ws, w_dim, h, w, c)) * 0.5)
        m_map = jnp.asarray(rng.normal(size=(z_dim, w_dim)))
        z = jnp.asarray(rng.normal(size=(n, z_dim)))
        key = _key(9)

        @jax.jit
        def loss_of(params):
            p, m = params
            ws = jnp.broadcast_to(jnp.tanh(z @ m)[:, None, :], (n, num_ws, w_dim))  # a tiny mapping net
            synth = lambda v: jnp.tanh(jnp.einsum("nkd,kdhwc->nhwc", v, p)) + 0.1 * jnp.sin(p[0, 0])
            return path_length_penalty(synth, ws, key, 0.4, interval=4)[0]

        g_p, g_m = (np.asarray(t) for t in jax.grad(loss_of)((p_syn, m_map)))
        assert np.all(np.isfinite(g_p)) and np.abs(g_p).max() > 0 and np.abs(g_m).max() > 0
        eps = 1e-6
        for which, idx in [(0, (0, 1, 2, 3, 1)), (0, (1, 0, 0, 0, 0)), (0, (1, 2, 3, 1, 1)), (1, (2, 1)), (1, (0, 0))]:
            params = [np.asarray(p_syn), np.asarray(m_map)]
            plus = [q.copy() for q in params]
            minus = [q.copy() for q in params]
            plus[which][idx] += eps
            minus[which][idx] -= eps
            fd = (float(loss_of(tuple(map(jnp.asarray, plus)))) - float(loss_of(tuple(map(jnp.asarray, minus))))) / (
                2 * eps)
            got = (g_p, g_m)[which][idx]
            np.testing.assert_allclose(got, fd, rtol=1e-5, atol=1e-9)


def test_path_length_under_jit():
    rng = _rng(10)
    _, synth = _linear_generator(rng, 3, 5, 6, 7, 3)
    ws = jnp.asarray(rng.normal(size=(4, 3, 5)).astype(np.float32))
    f = jax.jit(lambda v, k, m: path_length_penalty(synth, v, k, m))
    loss_j, aux_j = f(ws, jax.random.key(1), jnp.float32(0.2))  # the default (threefry) key type
    loss_e, aux_e = path_length_penalty(synth, ws, jax.random.key(1), 0.2)
    np.testing.assert_allclose(float(loss_j), float(loss_e), rtol=1e-5)
    np.testing.assert_allclose(float(aux_j["pl_mean"]), float(aux_e["pl_mean"]), rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Style mixing


def test_mix_ws_matches_numpy():
    rng = _rng(11)
    a = rng.normal(size=(3, 7, 4)).astype(np.float32)
    b = rng.normal(size=(3, 7, 4)).astype(np.float32)
    for cutoff in (1, 4, 7):
        ref = np.concatenate([a[:, :cutoff], b[:, cutoff:]], axis=1)
        np.testing.assert_array_equal(np.asarray(mix_ws(jnp.asarray(a), jnp.asarray(b), jnp.int32(cutoff))), ref)
    with pytest.raises(ValueError, match="equal"):
        mix_ws(jnp.asarray(a), jnp.asarray(b[:, :3]), 2)


def test_mixing_cutoff_distribution():
    keys = jax.random.split(jax.random.key(12), 4000)
    cut = np.asarray(jax.jit(jax.vmap(lambda k: sample_mixing_cutoff(k, 6, 0.9)))(keys))
    assert cut.min() >= 1 and cut.max() <= 6
    assert abs(np.mean(cut == 6) - 0.1) < 0.02  # no mixing with probability 1 - prob
    mixed = cut[cut < 6]
    assert set(mixed.tolist()) == {1, 2, 3, 4, 5}
    np.testing.assert_allclose(np.bincount(mixed)[1:] / len(mixed), 0.2, atol=0.03)  # uniform cutoff
    assert int(sample_mixing_cutoff(_key(0), 6, 0.0)) == 6
    assert int(sample_mixing_cutoff(_key(0), 1, 1.0)) == 1
    with pytest.raises(ValueError, match="prob"):
        sample_mixing_cutoff(_key(0), 6, 1.5)


def test_style_mix_takes_tail_from_fresh_latents():
    rng = _rng(13)
    m = rng.normal(size=(4, 3)).astype(np.float32)
    mapping = lambda z: jnp.broadcast_to((z @ m)[:, None, :], (z.shape[0], 5, 3))
    z = jnp.asarray(rng.normal(size=(2, 4)).astype(np.float32))
    ws = mapping(z)
    key = _key(3)
    out = np.asarray(style_mix(key, ws, mapping, z.shape, prob=1.0))
    k_cut, k_z = jax.random.split(key)
    cutoff = int(sample_mixing_cutoff(k_cut, 5, 1.0))
    other = np.asarray(mapping(jax.random.normal(k_z, z.shape, jnp.float32)))
    np.testing.assert_allclose(out[:, :cutoff], np.asarray(ws)[:, :cutoff])
    np.testing.assert_allclose(out[:, cutoff:], other[:, cutoff:])


# --------------------------------------------------------------------------------------------------
# EMA and lazy Adam


def test_ema_beta_matches_reference_formula():
    for batch, nimg, kimg, ramp in [(32, 0, 10, 0.05), (32, 1000, 10, 0.05), (64, 10_000_000, 10, 0.05),
                                    (16, 500, 20, None)]:
        ema_nimg = kimg * 1000 if ramp is None else min(kimg * 1000, nimg * ramp)
        ref = 0.5 ** (batch / max(ema_nimg, 1e-8))
        np.testing.assert_allclose(float(ema_beta(batch, nimg, ema_kimg=kimg, rampup=ramp)), ref, rtol=1e-6)
    traced = jax.jit(lambda n: ema_beta(32, n))(jnp.float32(1000.0))
    np.testing.assert_allclose(float(traced), 0.5 ** (32 / 50.0), rtol=1e-6)


def test_ema_update_matches_numpy_and_copies_integer_leaves():
    rng = _rng(14)
    params = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32),
              "count": np.array(7, np.int32)}
    ema = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32),
           "count": np.array(1, np.int32)}
    beta = 0.9
    new = ema_update(jax.tree.map(jnp.asarray, ema), jax.tree.map(jnp.asarray, params), beta)
    for k in ("w", "b"):
        np.testing.assert_allclose(np.asarray(new[k]), beta * ema[k] + (1 - beta) * params[k], rtol=1e-6)
        assert new[k].dtype == jnp.float32
    assert int(new["count"]) == 7
    with pytest.raises(ValueError, match="different structures"):
        ema_update({"w": ema["w"]}, params, beta)
    with pytest.raises(ValueError, match="shape"):
        ema_update({"w": ema["w"]}, {"w": params["b"]}, beta)


def test_ema_update_on_nnx_param_state():
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    ema_model = nnx.Linear(3, 2, rngs=nnx.Rngs(1))
    params = nnx.state(model, nnx.Param)
    ema = nnx.state(ema_model, nnx.Param)
    ref = 0.75 * np.array(ema_model.kernel[...]) + 0.25 * np.array(model.kernel[...])
    new = jax.jit(ema_update)(ema, params, jnp.float32(0.75))
    nnx.update(ema_model, new)
    np.testing.assert_allclose(np.asarray(ema_model.kernel[...]), ref, rtol=1e-6)


def test_lazy_adam_hparams():
    lr, b1, b2 = lazy_adam_hparams(0.0025, 0.0, 0.99, 16)
    r = 16 / 17
    np.testing.assert_allclose((lr, b1, b2), (0.0025 * r, 0.0, 0.99 ** r))
    assert lazy_adam_hparams(0.002, 0.5, 0.99, 1) == (0.002, 0.5, 0.99)
    with pytest.raises(ValueError, match="interval"):
        lazy_adam_hparams(0.002, 0.5, 0.99, 0)
