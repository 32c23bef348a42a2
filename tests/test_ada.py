"""ADA augmentation against float64 numpy references built from the same per-sample parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from viscoin_jax.trainers.ada import (AdaState, AugmentConfig, ada_adjust, ada_observe, apply_augment, augment,
                                      color_matrix, sample_augment_params, update_p)

BLIT = AugmentConfig.from_preset("blit")
COLOR = AugmentConfig.from_preset("color")
GEOM_FIELDS = ("xflip", "rotate90", "xint")
COLOR_FIELDS = ("brightness", "contrast", "lumaflip", "hue", "saturation")


def _only(**strengths):
    """A config with every transform off except the given ones."""
    off = {k: 0.0 for k in GEOM_FIELDS + COLOR_FIELDS}
    off.update(strengths)
    return AugmentConfig(**off)


def _images(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _np_blit(img, flip, k, tx, ty):
    """flip, then rot90 (counter-clockwise k quarter turns), then shift content by (tx, ty) with reflect padding."""
    out = img[:, ::-1] if flip else img
    out = np.rot90(out, k, axes=(0, 1))
    h, w = out.shape[:2]
    pad = max(abs(tx), abs(ty))
    padded = np.pad(out, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    return padded[pad - ty:pad - ty + h, pad - tx:pad - tx + w]


def _np_color_matrix(b, c, lf, theta, s):
    v = np.ones(3) / np.sqrt(3.0)
    vv = np.outer(v, v)
    t = np.eye(4)
    t[:3, 3] = b
    con = np.diag([c, c, c, 1.0])
    luma = np.eye(4)
    luma[:3, :3] -= 2.0 * lf * vv
    hue = np.eye(4)
    hue[:3, :3] = Rotation.from_rotvec(v * theta).as_matrix()
    sat = np.eye(4)
    sat[:3, :3] = vv + (np.eye(3) - vv) * s
    return sat @ hue @ luma @ con @ t


def _np_apply_color(img, m):
    return np.einsum("ij,hwj->hwi", m[:3, :3], img.astype(np.float64)) + m[:3, 3]


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 8, 8, 3), (12, 7, 7, 1), (12, 9, 13, 3)])
def test_p_zero_is_exact_identity(shape):
    x = _images(shape, 1)
    cfg = AugmentConfig() if shape[1] == shape[2] else _only(xflip=1, xint=1, brightness=1, contrast=1, lumaflip=1,
                                                               hue=1, saturation=1)
    y = augment(jax.random.key(3), jnp.asarray(x), 0.0, cfg)
    np.testing.assert_array_equal(np.asarray(y), x)


def test_xflip_only_at_p1_matches_numpy_flip():
    x = _images((12, 9, 13, 3), 2)
    cfg = _only(xflip=1)
    key = jax.random.key(7)
    params = sample_augment_params(key, x.shape, 1.0, cfg)
    y = np.asarray(augment(key, jnp.asarray(x), 1.0, cfg))
    flips = np.asarray(params.xflip)
    assert 0 < flips.sum() < len(flips)  # the reference flips half the samples when applied
    for i in range(len(x)):
        np.testing.assert_array_equal(y[i], np.flip(x[i], axis=1) if flips[i] else x[i])


def test_rotate90_matches_np_rot90():
    x = _images((12, 7, 7, 1), 3)
    cfg = _only(rotate90=1)
    key = jax.random.key(11)
    ks = np.asarray(sample_augment_params(key, x.shape, 1.0, cfg).rotate90)
    assert set(ks.tolist()) == {0, 1, 2, 3}
    y = np.asarray(augment(key, jnp.asarray(x), 1.0, cfg))
    for i in range(len(x)):
        np.testing.assert_array_equal(y[i], np.rot90(x[i], ks[i], axes=(0, 1)))


@pytest.mark.parametrize("shape", [(12, 16, 16, 3), (12, 9, 13, 3)])
def test_integer_translation_matches_reflect_padded_shift(shape):
    x = _images(shape, 4)
    cfg = _only(xint=1, xint_max=0.25)
    key = jax.random.key(5)
    t = np.asarray(sample_augment_params(key, x.shape, 1.0, cfg).translate)
    assert np.abs(t[:, 0]).max() <= round(0.25 * shape[2]) and np.abs(t[:, 1]).max() <= round(0.25 * shape[1])
    assert np.abs(t).max() > 0
    y = np.asarray(augment(key, jnp.asarray(x), 1.0, cfg))
    for i in range(len(x)):
        np.testing.assert_array_equal(y[i], _np_blit(x[i], 0, 0, int(t[i, 0]), int(t[i, 1])))


def test_translation_direction_moves_content_right_and_down():
    x = np.zeros((1, 8, 8, 1), np.float32)
    x[0, 2, 3, 0] = 1.0
    from viscoin_jax.trainers.ada import AugmentParams
    z = jnp.zeros((1,), jnp.int32)
    f = jnp.zeros((1,), jnp.float32)
    params = AugmentParams(z, z, jnp.array([[2, 1]], jnp.int32), f, f + 1, f, f, f + 1)
    y = np.asarray(apply_augment(jnp.asarray(x), params, _only(xint=1)))
    assert y[0, 3, 5, 0] == 1.0 and y.sum() == 1.0


def test_all_blit_transforms_compose_like_numpy():
    x = _images((12, 8, 8, 3), 5)
    key = jax.random.key(21)
    params = sample_augment_params(key, x.shape, 0.7, BLIT)
    y = np.asarray(augment(key, jnp.asarray(x), 0.7, BLIT))
    fl, ks, t = (np.asarray(a) for a in (params.xflip, params.rotate90, params.translate))
    assert fl.any() and ks.any() and t.any()
    for i in range(len(x)):
        np.testing.assert_array_equal(y[i], _np_blit(x[i], fl[i], ks[i], int(t[i, 0]), int(t[i, 1])))


def test_color_matrix_and_application_match_numpy():
    x = _images((12, 9, 13, 3), 6)
    key = jax.random.key(8)
    params = sample_augment_params(key, x.shape, 0.8, COLOR)
    m = np.asarray(color_matrix(params))
    y = np.asarray(augment(key, jnp.asarray(x), 0.8, COLOR))
    raw = [np.asarray(a, np.float64) for a in (params.brightness, params.contrast, params.lumaflip, params.hue,
                                               params.saturation)]
    for field, identity in zip(raw, (0.0, 1.0, 0.0, 0.0, 1.0)):
        assert np.any(field != identity)  # every colour transform was drawn for some sample
    for i in range(len(x)):
        ref = _np_color_matrix(*(r[i] for r in raw))
        np.testing.assert_allclose(m[i], ref, atol=2e-6)
        np.testing.assert_allclose(y[i], _np_apply_color(x[i], ref), atol=1e-5)


def test_color_single_channel_uses_mean_of_matrix():
    x = _images((12, 7, 7, 1), 7)
    cfg = _only(brightness=1, contrast=1)
    key = jax.random.key(9)
    params = sample_augment_params(key, x.shape, 1.0, cfg)
    y = np.asarray(augment(key, jnp.asarray(x), 1.0, cfg))
    b, c = np.asarray(params.brightness, np.float64), np.asarray(params.contrast, np.float64)
    # brightness then contrast on a grey image: c * (x + b)
    assert np.any(b != 0) and np.any(c != 1)
    for i in range(len(x)):
        np.testing.assert_allclose(y[i], c[i] * (x[i] + b[i]), atol=1e-6)


def test_brightness_only_adds_a_per_sample_constant():
    x = _images((12, 9, 13, 3), 8)
    cfg = _only(brightness=1)
    key = jax.random.key(10)
    b = np.asarray(sample_augment_params(key, x.shape, 1.0, cfg).brightness)
    y = np.asarray(augment(key, jnp.asarray(x), 1.0, cfg))
    np.testing.assert_allclose(y - x, np.broadcast_to(b[:, None, None, None], x.shape), atol=1e-6)


def test_application_rates_and_distributions_follow_p():
    n, p = 20000, 0.3
    params = sample_augment_params(jax.random.key(0), (n, 16, 16, 3), p, AugmentConfig(contrast=0.5))
    b = np.asarray(params.brightness)
    c = np.asarray(params.contrast)
    s = np.asarray(params.saturation)
    t = np.asarray(params.translate)
    assert abs(np.mean(b != 0) - p) < 0.02
    assert abs(np.mean(c != 1) - 0.5 * p) < 0.02  # strength multiplies p
    assert abs(np.mean(np.asarray(params.xflip)) - p / 2) < 0.02  # applied with p, flips half of those
    assert abs(np.std(b[b != 0]) - 0.2) < 0.01
    assert abs(np.std(np.log2(c[c != 1])) - 0.5) < 0.03
    assert abs(np.std(np.log2(s[s != 1])) - 1.0) < 0.05
    assert np.abs(t).max() == 2  # round(0.125 * 16)
    hue = np.asarray(params.hue)
    assert np.abs(hue).max() <= np.pi and np.abs(hue).max() > 0.95 * np.pi


def test_gradient_flows_and_matches_finite_differences():
    x = jnp.asarray(_images((12, 8, 8, 3), 11))
    wt = jnp.asarray(_images((12, 8, 8, 3), 12))
    key = jax.random.key(13)

    def f(img):
        return jnp.sum(augment(key, img, 0.9) * wt)

    g = np.asarray(jax.grad(f)(x))
    assert np.abs(g).max() > 0
    # The augmentation is linear in the images for fixed parameters: the gradient is exact.
    params = sample_augment_params(key, x.shape, 0.9)
    m = np.asarray(color_matrix(params), np.float64)
    rng = np.random.default_rng(0)
    eps = 0.05
    for _ in range(12):
        idx = tuple(int(rng.integers(0, s)) for s in x.shape)
        e = np.zeros(x.shape, np.float32)
        e[idx] = eps
        fd = (float(f(x + e)) - float(f(x - e))) / (2 * eps)
        np.testing.assert_allclose(g[idx], fd, rtol=2e-3, atol=2e-3)
    # colour only: the gradient is C^T applied to the weights, pixel by pixel
    gc = np.asarray(jax.grad(lambda img: jnp.sum(augment(key, img, 0.9, COLOR) * wt))(x))
    pc = sample_augment_params(key, x.shape, 0.9, COLOR)
    mc = np.asarray(color_matrix(pc), np.float64)
    ref = np.einsum("nji,nhwj->nhwi", mc[:, :3, :3], np.asarray(wt, np.float64))
    np.testing.assert_allclose(gc, ref, atol=1e-5)
    assert m.shape == (12, 4, 4)


def test_deterministic_and_jittable_with_traced_p():
    x = jnp.asarray(_images((12, 8, 8, 3), 14))
    key = jax.random.key(15)
    eager = np.asarray(augment(key, x, 0.6))
    again = np.asarray(augment(key, x, 0.6))
    np.testing.assert_array_equal(eager, again)
    jitted = jax.jit(augment, static_argnames="config")
    out = np.asarray(jitted(key, x, jnp.float32(0.6)))
    np.testing.assert_allclose(out, eager, atol=1e-5)
    # p is traced: a new value must not retrace, and p = 0 under jit is still the identity
    np.testing.assert_array_equal(np.asarray(jitted(key, x, jnp.float32(0.0))), np.asarray(x))
    assert jitted._cache_size() == 1
    other = np.asarray(augment(jax.random.key(16), x, 0.6))
    assert not np.allclose(other, eager)


def test_update_p_hand_computed():
    step = 32 * 4 / 500_000
    np.testing.assert_allclose(float(update_p(0.5, 0.7, batch_size=32)), 0.5 + step, rtol=1e-6)
    np.testing.assert_allclose(float(update_p(0.5, 0.2, batch_size=32)), 0.5 - step, rtol=1e-6)
    assert float(update_p(0.5, 0.6, batch_size=32)) == 0.5
    assert float(update_p(0.0, -1.0, batch_size=32)) == 0.0
    assert float(update_p(1.0, 1.0, batch_size=32)) == 1.0
    np.testing.assert_allclose(float(update_p(0.1, 0.9, batch_size=64, target=0.8, interval=2, ada_kimg=100)),
                               0.1 + 64 * 2 / 100_000, rtol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        update_p(0.1, 0.9, batch_size=0)


def test_ada_state_accumulates_signs_then_adjusts():
    state = AdaState.create(0.25)
    state = ada_observe(state, jnp.array([1.0, -2.0, 3.0, 0.5]))  # signs sum 2
    state = ada_observe(state, jnp.array([[-1.0], [-1.0], [2.0], [-3.0]]))  # signs sum -2
    assert float(state.sign_count) == 8.0 and float(state.sign_sum) == 0.0
    new = ada_adjust(state, batch_size=4, interval=2, target=0.6)  # r_t = 0 < 0.6: p goes down
    np.testing.assert_allclose(float(new.p), 0.25 - 4 * 2 / 500_000, rtol=1e-6)
    assert float(new.sign_count) == 0.0 and float(new.sign_sum) == 0.0
    # nothing observed: unchanged
    assert float(ada_adjust(new, batch_size=4).p) == float(new.p)
    jitted = jax.jit(lambda s, l: ada_adjust(ada_observe(s, l), batch_size=4))
    up = jitted(AdaState.create(0.5), jnp.ones((4,)))
    np.testing.assert_allclose(float(up.p), 0.5 + 16 / 500_000, rtol=1e-6)
    with pytest.raises(ValueError, match="p must be in"):
        AdaState.create(1.5)
    plain = ada_adjust(ada_observe(AdaState(0.5), jnp.array([-1.0, -1.0])), batch_size=2, interval=1, ada_kimg=1)
    np.testing.assert_allclose(float(plain.p), 0.5 - 2 / 1000, rtol=1e-6)


def test_bad_inputs_raise():
    x = jnp.zeros((2, 8, 8, 3))
    with pytest.raises(ValueError, match="4-D"):
        augment(jax.random.key(0), jnp.zeros((8, 8, 3)), 0.5)
    with pytest.raises(ValueError, match="floating"):
        augment(jax.random.key(0), jnp.zeros((2, 8, 8, 3), jnp.int32), 0.5)
    with pytest.raises(ValueError, match="channels"):
        augment(jax.random.key(0), jnp.zeros((2, 8, 8, 4)), 0.5)
    with pytest.raises(ValueError, match="square"):
        augment(jax.random.key(0), jnp.zeros((2, 8, 6, 3)), 0.5)
    with pytest.raises(ValueError, match="scalar"):
        augment(jax.random.key(0), x, jnp.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="unknown augment preset"):
        AugmentConfig.from_preset("nope")
    with pytest.raises(ValueError, match="does not implement"):
        AugmentConfig.from_preset("bgc")
    with pytest.raises(ValueError, match="unknown AugmentConfig fields"):
        AugmentConfig.from_preset("blit", scale=1.0)
    assert AugmentConfig.from_preset("bc") == AugmentConfig()
    assert AugmentConfig.from_preset("color", hue=0.5).hue == 0.5 and not BLIT.uses_color
    with pytest.raises(ValueError, match=">= 0"):
        AugmentConfig(hue=-1.0)
    with pytest.raises(ValueError, match="xint_max"):
        AugmentConfig(xint_max=0.8)
    params = sample_augment_params(jax.random.key(0), (12, 8, 8, 3), 0.5)
    with pytest.raises(ValueError, match="params are for 12 images"):
        apply_augment(x, params)
