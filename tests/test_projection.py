"""Projection into W+: schedules, an independent numpy Adam reference, recovery of known latents."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from viscoin_jax.explain.projection import (
    ProjectionConfig,
    estimate_w_stats,
    learning_rate_schedule,
    noise_schedule,
    project,
)

H, W, L, D = 5, 3, 3, 4  # odd image size, 3 W+ vectors of 4
P = H * W * 3
KEY = jax.random.key(5, impl="rbg")  # cheap to compile; any key type works


def _linear_synthesis(seed=0):
    a = np.random.default_rng(seed).normal(size=(L * D, P)).astype(np.float32) / np.sqrt(L * D)

    def synthesis_fn(ws):
        return (ws.reshape(ws.shape[0], -1) @ jnp.asarray(a)).reshape(ws.shape[0], H, W, 3)

    return synthesis_fn, a


def _pooled_l1(x, y):
    """A toy 'perceptual' distance: L1 between 1-pixel-shifted differences (edges)."""
    dx = lambda im: im[:, 1:] - im[:, :-1]
    return jnp.mean(jnp.abs(dx(x) - dx(y)), axis=(1, 2, 3))


def test_schedules_match_the_stylegan2_formulas():
    cfg = ProjectionConfig(num_steps=200, learning_rate=0.3, lr_rampup=0.1, lr_rampdown=0.3, noise_factor=0.07,
                           noise_ramp=0.6)
    lr, noise = learning_rate_schedule(cfg), noise_schedule(cfg)
    for step in [0, 1, 7, 19, 20, 55, 100, 139, 140, 141, 180, 199]:
        t = step / 200
        ramp = min(1.0, (1 - t) / 0.3)
        ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
        ramp *= min(1.0, t / 0.1)
        np.testing.assert_allclose(float(lr(step)), 0.3 * ramp, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(float(noise(step)), 0.07 * max(0.0, 1 - t / 0.6) ** 2, rtol=1e-5, atol=1e-8)


CFG = ProjectionConfig(num_steps=25, learning_rate=0.05, noise_factor=0.0, lr_rampup=0.2, lr_rampdown=0.5)


def test_matches_numpy_adam_reference_and_images_are_independent():
    """Without noise and perceptual term, 25 steps equal a float64 numpy Adam on the analytic gradient."""
    synthesis_fn, a = _linear_synthesis(1)
    rng = np.random.default_rng(2)
    target = rng.uniform(-1, 1, size=(2, H, W, 3)).astype(np.float32)
    init = rng.normal(size=(2, L, D)).astype(np.float32)
    out = project(synthesis_fn, target, init_ws=init, config=CFG)

    x = init.reshape(2, -1).astype(np.float64)
    t = target.reshape(2, -1).astype(np.float64)
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    losses = []
    for step in range(25):
        r = x @ a - t
        losses.append(np.mean(r**2, axis=1))
        g = 2.0 / P * r @ a.T
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        mh, vh = m / (1 - 0.9 ** (step + 1)), v / (1 - 0.999 ** (step + 1))
        tt = step / 25
        ramp = 0.5 - 0.5 * math.cos(min(1.0, (1 - tt) / 0.5) * math.pi)
        ramp *= min(1.0, tt / 0.2)
        x = x - 0.05 * ramp * mh / (np.sqrt(vh) + 1e-8)
    np.testing.assert_allclose(np.asarray(out.ws).reshape(2, -1), x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.loss_trace), np.stack(losses), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.images), (x @ a).reshape(2, H, W, 3), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.final_loss), np.mean((x @ a - t) ** 2, axis=1), rtol=1e-4)
    # Each image is optimised on its own: projecting the second alone gives the same answer.
    one = project(synthesis_fn, target[1:], init_ws=init[1:], config=CFG)
    np.testing.assert_allclose(np.asarray(one.ws[0]), np.asarray(out.ws[1]), rtol=1e-5, atol=1e-6)


def test_recovers_a_known_latent_from_w_avg():
    synthesis_fn, _ = _linear_synthesis(3)
    ws_true = jax.random.normal(jax.random.key(4), (3, L, D))
    target = synthesis_fn(ws_true)
    cfg = ProjectionConfig(num_steps=300, learning_rate=0.1)  # with the default exploration noise
    out = project(synthesis_fn, target, w_avg=jnp.zeros(D), num_ws=L, w_std=1.0, perceptual_fn=_pooled_l1,
                  config=cfg, key=KEY)
    assert out.loss_trace.shape == (300, 3)
    first = np.asarray(out.loss_trace[0])
    final = np.asarray(out.final_loss)
    assert np.all(final < 0.1 * first), (first, final)
    # The linear generator is injective (12 latent dims -> 45 pixels): the latent itself comes back.
    np.testing.assert_allclose(np.asarray(out.ws), np.asarray(ws_true), atol=0.1)


def test_noise_is_seeded():
    synthesis_fn, _ = _linear_synthesis(9)
    target = jax.random.uniform(jax.random.key(0), (1, H, W, 3), minval=-1, maxval=1)
    cfg = ProjectionConfig(num_steps=10, noise_factor=0.5)
    kw = dict(w_avg=jnp.zeros(D), num_ws=L, config=cfg)
    a = project(synthesis_fn, target, key=jax.random.key(1, impl="rbg"), **kw)
    b = project(synthesis_fn, target, key=jax.random.key(1, impl="rbg"), **kw)
    c = project(synthesis_fn, target, key=jax.random.key(2, impl="rbg"), **kw)
    np.testing.assert_array_equal(np.asarray(a.ws), np.asarray(b.ws))
    assert not np.allclose(np.asarray(a.ws), np.asarray(c.ws))
    # Step 0 starts at w_avg plus noise of std 0.5 * w_std: the loss differs from the noiseless one.
    clean = float(jnp.mean(target**2))
    assert abs(float(a.loss_trace[0, 0]) - clean) > 1e-4


def test_estimate_w_stats_against_numpy():
    m = np.random.default_rng(0).normal(size=(6, D)).astype(np.float32)
    bias = np.arange(D, dtype=np.float32)
    mapping_fn = lambda z: jnp.broadcast_to((z @ m + bias)[:, None, :], (z.shape[0], L, D))
    avg, std = estimate_w_stats(mapping_fn, KEY, z_dim=6, num_samples=1001, batch_size=100)
    keys = jax.random.split(KEY, 11)
    z = np.concatenate([np.asarray(jax.random.normal(k, (100, 6))) for k in keys])[:1001].astype(np.float64)
    w = z @ m + bias
    np.testing.assert_allclose(np.asarray(avg), w.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(std), np.sqrt(np.mean(np.sum((w - w.mean(0)) ** 2, axis=1))), rtol=1e-4)


def test_bad_inputs():
    synthesis_fn, _ = _linear_synthesis()
    target = jnp.zeros((2, H, W, 3))
    with pytest.raises(ValueError, match="target"):
        project(synthesis_fn, jnp.zeros((2, H, W)), w_avg=jnp.zeros(D), num_ws=L)
    with pytest.raises(ValueError, match="w_avg and num_ws"):
        project(synthesis_fn, target, w_avg=jnp.zeros(D))
    with pytest.raises(ValueError, match="init_ws has 3"):
        project(synthesis_fn, target, init_ws=jnp.zeros((3, L, D)))
    with pytest.raises(ValueError, match="init_ws must be a 3-D"):
        project(synthesis_fn, target, init_ws=jnp.zeros((2, L * D)))
    with pytest.raises(ValueError, match="num_steps"):
        ProjectionConfig(num_steps=0)
    with pytest.raises(ValueError, match="lr_rampup"):
        ProjectionConfig(lr_rampup=0.0)
