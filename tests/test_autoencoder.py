"""Autoencoder counterfactuals: the class-mean move and the gradient steps through a linear
encoder / decoder / classifier against float64 numpy references (closed-form boundary crossing, a
direct gradient loop) on odd sizes; the convolutional autoencoder's shapes, checks and losses; the
trainer end to end (a few steps, restored functions equal the model, its evaluation equals a
direct pass)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from viscoin_jax.explain import autoencoder_counterfactual as aecf
from viscoin_jax.models.autoencoder import ConvAutoencoder

H, W, CODE = 5, 3, 7
D = H * W * 3
RNG = np.random.default_rng(21)
E = RNG.standard_normal((D, CODE)) / np.sqrt(D)  # encoder
DEC = RNG.standard_normal((CODE, D)) / np.sqrt(CODE)  # decoder
WF = RNG.standard_normal((D, 2))  # classifier f on pixels
BF = RNG.standard_normal(2)


def encode_fn(x):
    return x.reshape(x.shape[0], -1) @ jnp.asarray(E, jnp.float32)


def decode_fn(c):
    return (c @ jnp.asarray(DEC, jnp.float32)).reshape(c.shape[0], H, W, 3)


def classifier_fn(x):
    return x.reshape(x.shape[0], -1) @ jnp.asarray(WF, jnp.float32) + jnp.asarray(BF, jnp.float32)


def _data(n, seed):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, H, W, 3)).astype(np.float32), rng.integers(0, 2, n).astype(np.int32)


def _head64(c):
    return (c @ DEC) @ WF + BF


def test_class_mean_move_against_the_closed_form():
    train, labels = _data(31, 1)
    toward_1 = (WF[:, 1] - WF[:, 0]) / np.linalg.norm(WF[:, 1] - WF[:, 0])
    train[labels == 1] += (0.5 * toward_1).reshape(H, W, 3).astype(np.float32)  # class 1 sits where f says 1
    means, counts = aecf.code_class_means(encode_fn, train, labels, 2)
    codes = train.reshape(31, -1).astype(np.float64) @ E
    ref_means = np.stack([codes[labels == c].mean(0) for c in (0, 1)])
    np.testing.assert_allclose(np.asarray(means), ref_means, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(counts), np.bincount(labels, minlength=2))

    x, _ = _data(9, 2)
    c0 = x.reshape(9, -1).astype(np.float64) @ E
    source = np.argmax(x.reshape(9, -1).astype(np.float64) @ WF + BF, 1)  # f's class of the input itself
    target = 1 - source
    conf = 0.8
    out = aecf.counterfactuals(encode_fn, decode_fn, classifier_fn, x, target, means=means, max_alpha=40.0,
                               num_alphas=41, confidence=conf)
    np.testing.assert_array_equal(np.asarray(out.source), source)
    step = ref_means[target] - ref_means[source]  # [9, CODE]
    # the target's logit margin is linear in alpha: m(alpha) = m0 + alpha dm; p >= conf where m >= logit(conf)
    sign = np.where(target == 1, 1.0, -1.0)
    m0 = sign * (_head64(c0) @ np.array([-1.0, 1.0]))
    dm = sign * ((step @ DEC @ WF) @ np.array([-1.0, 1.0]))
    logit_conf = np.log(conf / (1 - conf))
    already = m0 >= logit_conf  # the reconstruction is already the target's: no move
    alpha = np.where(already, 0.0, (logit_conf - m0) / dm)
    reachable = already | ((dm > 0) & (alpha <= 40.0))
    assert reachable.sum() >= 5
    np.testing.assert_allclose(np.asarray(out.amount)[reachable], alpha[reachable], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.found), reachable)
    moved = c0 + np.asarray(out.amount, np.float64)[:, None] * step
    np.testing.assert_allclose(np.asarray(out.codes), moved, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.images).reshape(9, -1), moved @ DEC, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.reconstructions).reshape(9, -1), c0 @ DEC, rtol=1e-4, atol=1e-4)
    p = 1 / (1 + np.exp(-(m0 + np.asarray(out.amount) * dm)))
    np.testing.assert_allclose(np.asarray(out.target_prob)[reachable], p[reachable], rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(out.prediction)[reachable], target[reachable])


def test_gradient_steps_against_a_numpy_loop():
    x, _ = _data(7, 3)
    c = x.reshape(7, -1).astype(np.float64) @ E
    target = 1 - np.argmax(_head64(c), 1)
    out = aecf.counterfactuals(encode_fn, decode_fn, classifier_fn, x, target, method="gradient", step_size=0.3,
                               max_steps=30)
    a = DEC @ WF  # d logits / d code
    steps = np.zeros(7, int)
    for _ in range(30):
        logits = c @ a + BF
        done = np.argmax(logits, 1) == target
        prob = np.exp(logits - logits.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        g = (prob - np.eye(2)[target]) @ a.T
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        c = np.where(done[:, None], c, c - 0.3 * g)
        steps += ~done
    np.testing.assert_array_equal(np.asarray(out.amount), steps)
    np.testing.assert_allclose(np.asarray(out.codes), c, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(out.found), np.argmax(c @ a + BF, 1) == target)


def test_bad_inputs():
    x, labels = _data(4, 4)
    means, _ = aecf.code_class_means(encode_fn, x, labels, 2)
    with pytest.raises(ValueError, match="method must be one of"):
        aecf.counterfactuals(encode_fn, decode_fn, classifier_fn, x, 1, method="walk")
    with pytest.raises(ValueError, match="needs the class means"):
        aecf.counterfactuals(encode_fn, decode_fn, classifier_fn, x, 1)
    with pytest.raises(ValueError, match="confidence"):
        aecf.counterfactuals(encode_fn, decode_fn, classifier_fn, x, 1, means=means, confidence=1.5)
    with pytest.raises(ValueError, match="target"):
        aecf.counterfactuals(encode_fn, decode_fn, classifier_fn, x, 5, means=means)
    empty = np.asarray(means).copy()
    empty[0] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        aecf.counterfactuals(encode_fn, decode_fn, classifier_fn, x, np.array([0, 1, 0, 1]), means=empty)


def test_conv_autoencoder_shapes_and_checks():
    model = ConvAutoencoder(12, channels=(3, 5), code_dim=7, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (3, 12, 12, 3)), jnp.float32)
    codes = model.encode(x)
    assert codes.shape == (3, 7)
    out = model.decode(codes)
    assert out.shape == (3, 12, 12, 3) and float(jnp.max(jnp.abs(out))) < 1.0
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(out), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 2\\*\\*2"):
        ConvAutoencoder(10, channels=(3, 5), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[N, 12, 12, 3\]"):
        model.encode(x[:, :8])
    with pytest.raises(ValueError, match=r"\[N, 7\]"):
        model.decode(codes[:, :3])


def test_trainer_end_to_end(tmp_path):
    from viscoin_jax.trainers import autoencoder as trainer
    from viscoin_jax.training import runs
    from viscoin_jax.training.config import load_config

    config = load_config("autoencoder_synthetic", [
        "--config.train.batch_size=8", "--config.train.num_steps=3", "--config.train.eval_every=0",
        "--config.checkpoint.every=3", "--config.checkpoint.async_save=False", "--config.data.synthetic_size=48",
        "--config.eval.batch_size=8", "--config.eval.max_batches=2", "--config.model.code_dim=5"])
    _, metrics = trainer.train(config, str(tmp_path))
    task, state, _ = trainer.load(str(tmp_path))
    fns = trainer.autoencoder_functions(task, state)
    x, _ = fns.training_images(16, "test")
    model = task.model(state)
    recon = np.asarray(fns.decode_fn(fns.encode_fn(jnp.asarray(x))))
    np.testing.assert_allclose(recon, np.asarray(model(jnp.asarray(x))), rtol=1e-5, atol=1e-5)
    assert fns.code_dim == 5
    err = recon.astype(np.float64) - x
    assert metrics["num_examples"] == 16
    assert metrics["reconstruction mse"] == pytest.approx(np.mean(err ** 2), rel=1e-4)
    assert metrics["reconstruction l1"] == pytest.approx(np.mean(np.abs(err)), rel=1e-4)
    with pytest.raises(ValueError):  # another trainer's run name
        runs.load_run(str(tmp_path), "classifier")
