"""VisCoIN loss terms against float64 numpy, and the gradient of the gamma term into the reconstruction."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from viscoin_jax.trainers.viscoin_losses import (DEFAULT_WEIGHTS, fidelity_loss, l1_loss, mse_loss,
                                                 orthogonality_loss, soft_cross_entropy, sparsity_loss, viscoin_loss,
                                                 w_regularization)

N, H, W, C, NUM_CLASSES, K, NUM_WS, W_DIM = 3, 5, 6, 3, 4, 7, 4, 5


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def _np_soft_ce(logits, target_logits):
    t = np.exp(_log_softmax(target_logits))
    return np.mean(-np.sum(t * _log_softmax(logits), axis=-1))


def _np_ortho(weight):
    """(sum_ij |cos(row_i, row_j)| - K) / K^2 by a direct loop (the official VisCoIN form)."""
    rows = np.asarray(weight, np.float64).reshape(-1, weight.shape[-1]).T
    k = rows.shape[0]
    total = 0.0
    for i in range(k):
        for j in range(k):
            total += abs(rows[i] @ rows[j] / (np.linalg.norm(rows[i]) * np.linalg.norm(rows[j])))
    return (total - k) / k ** 2


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    f32 = lambda a: np.asarray(a, np.float32)
    outputs = {
        "g_logits": f32(rng.normal(size=(N, NUM_CLASSES))),
        "reconstruction": f32(rng.uniform(-1, 1, (N, H, W, C))),
        "phi": f32(np.maximum(rng.normal(size=(N, 3, 3, K)), 0)),
        "ws": f32(rng.normal(size=(N, NUM_WS, W_DIM))),
        "concept_weight": f32(rng.normal(size=(1, 1, 6, K))),
    }
    targets = {
        "image": f32(rng.uniform(-1, 1, (N, H, W, C))),
        "f_logits": f32(rng.normal(size=(N, NUM_CLASSES)) * 2),
        "w_avg": f32(rng.normal(size=(W_DIM,))),
    }
    wc = f32(rng.normal(size=(H * W * C, NUM_CLASSES)) * 0.3)
    bc = f32(rng.normal(size=(NUM_CLASSES,)))
    return outputs, targets, wc, bc


def _fns(wc, bc):
    classifier_fn = lambda x: x.reshape(x.shape[0], -1) @ wc + bc
    perceptual_fn = lambda a, b: jnp.mean(jnp.square(jnp.tanh(2 * a) - jnp.tanh(2 * b)), axis=(1, 2, 3))
    return perceptual_fn, classifier_fn


def _np_terms(outputs, targets, wc, bc):
    o = {k: np.asarray(v, np.float64) for k, v in outputs.items()}
    t = {k: np.asarray(v, np.float64) for k, v in targets.items()}
    d = o["reconstruction"] - t["image"]
    rec_logits = o["reconstruction"].reshape(N, -1) @ wc.astype(np.float64) + bc
    return {
        "fidelity": _np_soft_ce(o["g_logits"], t["f_logits"]),
        "mse": np.mean(d ** 2),
        "l1": np.mean(np.abs(d)),
        "perceptual": np.mean((np.tanh(2 * o["reconstruction"]) - np.tanh(2 * t["image"])) ** 2),
        "reconstruction_ce": _np_soft_ce(rec_logits, t["f_logits"]),
        "sparsity": np.mean(np.abs(o["phi"])),
        "orthogonality": _np_ortho(o["concept_weight"]),
        "w_reg": np.mean((o["ws"] - t["w_avg"]) ** 2),
    }


# --------------------------------------------------------------------------------------------------
# Individual terms


def test_soft_cross_entropy_matches_numpy_and_ignores_target_gradient():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 9)).astype(np.float32) * 3
    target = rng.normal(size=(6, 9)).astype(np.float32) * 3
    np.testing.assert_allclose(float(soft_cross_entropy(logits, target)), _np_soft_ce(logits, target), rtol=1e-5)
    np.testing.assert_allclose(float(fidelity_loss(logits, target)), _np_soft_ce(logits, target), rtol=1e-5)
    g_target = jax.grad(lambda tl: soft_cross_entropy(jnp.asarray(logits), tl))(jnp.asarray(target))
    assert np.all(np.asarray(g_target) == 0)
    # gradient w.r.t. the logits: (softmax(logits) - softmax(target)) / N
    g = jax.grad(lambda lg: soft_cross_entropy(lg, jnp.asarray(target)))(jnp.asarray(logits))
    ref = (np.exp(_log_softmax(logits)) - np.exp(_log_softmax(target))) / 6
    np.testing.assert_allclose(np.asarray(g), ref, atol=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        soft_cross_entropy(logits, target[:, :4])
    with pytest.raises(ValueError, match="num_classes"):
        soft_cross_entropy(logits[0], target[0])


def test_pixel_losses_match_numpy():
    outputs, targets, _, _ = _problem(2)
    x_rec, x = outputs["reconstruction"], targets["image"]
    d = x_rec.astype(np.float64) - x
    np.testing.assert_allclose(float(mse_loss(x_rec, x)), np.mean(d ** 2), rtol=1e-5)
    np.testing.assert_allclose(float(l1_loss(x_rec, x)), np.mean(np.abs(d)), rtol=1e-5)
    g = jax.grad(mse_loss)(jnp.asarray(x_rec), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g), 2 * d / d.size, atol=1e-7)
    with pytest.raises(ValueError, match="differ in shape"):
        mse_loss(x_rec, x[:, :4])
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        l1_loss(x_rec[0], x[0])


def test_sparsity_and_w_regularisation_match_numpy():
    outputs, targets, _, _ = _problem(3)
    np.testing.assert_allclose(float(sparsity_loss(outputs["phi"])), np.mean(np.abs(outputs["phi"])), rtol=1e-6)
    neg = -outputs["phi"]
    np.testing.assert_allclose(float(sparsity_loss(neg)), np.mean(np.abs(neg)), rtol=1e-6)
    ws, w_avg = outputs["ws"], targets["w_avg"]
    np.testing.assert_allclose(float(w_regularization(ws, w_avg)), np.mean((ws.astype(np.float64) - w_avg) ** 2),
                               rtol=1e-5)
    per_layer = np.random.default_rng(0).normal(size=(NUM_WS, W_DIM)).astype(np.float32)
    np.testing.assert_allclose(float(w_regularization(ws, per_layer)), np.mean((ws.astype(np.float64) - per_layer) ** 2),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="w_avg must be"):
        w_regularization(ws, w_avg[:3])
    with pytest.raises(ValueError, match="ws must be"):
        w_regularization(ws[0], w_avg)
    with pytest.raises(ValueError, match="batched"):
        sparsity_loss(np.ones(3, np.float32))


def test_orthogonality_matches_numpy_and_known_cases():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(3, 3, 5, 6)).astype(np.float32)  # [kh, kw, C_in, K]
    np.testing.assert_allclose(float(orthogonality_loss(w)), _np_ortho(w), rtol=1e-5)
    np.testing.assert_allclose(float(orthogonality_loss(w, reduction="sum")), _np_ortho(w) * 36, rtol=1e-5)
    # invariant to the scale of each concept's weights
    scaled = w * rng.uniform(0.1, 10, size=(1, 1, 1, 6)).astype(np.float32)
    np.testing.assert_allclose(float(orthogonality_loss(scaled)), float(orthogonality_loss(w)), rtol=1e-5)
    # orthogonal concept rows: zero; two identical concepts: Gram all ones, (4 - 2) / 2^2 = 0.5
    q, _ = np.linalg.qr(rng.normal(size=(8, 4)))
    assert abs(float(orthogonality_loss(q.astype(np.float32) * 3))) < 1e-6
    v = rng.normal(size=(5, 1)).astype(np.float32)
    np.testing.assert_allclose(float(orthogonality_loss(np.concatenate([v, 2 * v], axis=1))), 0.5, rtol=1e-6)
    # anti-parallel concepts count as much as parallel ones (absolute cosine); by hand, three
    # concepts (v, -v, u) with u orthogonal to v: off-diagonal |cos| = 1, 1 -> (3 + 2 - 3) / 9
    u = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    np.testing.assert_allclose(float(orthogonality_loss(np.stack([u[0], -u[0], u[1]], axis=1))), 2 / 9, rtol=1e-6)
    # an all-zero concept adds nothing (no negative loss from its missing diagonal)
    np.testing.assert_allclose(float(orthogonality_loss(np.stack([u[0], u[1], 0 * u[0]], axis=1))), 0.0, atol=1e-7)
    with pytest.raises(ValueError, match="reduction"):
        orthogonality_loss(w, reduction="max")
    with pytest.raises(ValueError, match="concept axis last"):
        orthogonality_loss(w[0, 0, 0])


# --------------------------------------------------------------------------------------------------
# The full objective


@pytest.mark.parametrize("weights", [None, {"alpha": 0.7, "gamma": 0.2, "delta": 2.0, "beta": 1.5, "ortho": 0.3,
                                            "w_reg": 0.5, "mse": 2.0, "l1": 0.25}])
def test_viscoin_loss_total_and_terms_match_numpy(weights):
    outputs, targets, wc, bc = _problem(5)
    perceptual_fn, classifier_fn = _fns(wc, bc)
    total, terms = jax.jit(lambda o, t: viscoin_loss(o, t, weights, perceptual_fn, classifier_fn))(outputs, targets)
    ref = _np_terms(outputs, targets, wc, bc)
    for name, value in ref.items():
        np.testing.assert_allclose(float(terms[name]), value, rtol=2e-5, err_msg=name)
    w = dict(DEFAULT_WEIGHTS, **(weights or {}))
    rec = w["mse"] * ref["mse"] + w["l1"] * ref["l1"] + w["beta"] * ref["perceptual"] + w["gamma"] * ref[
        "reconstruction_ce"]
    expected = (w["alpha"] * ref["fidelity"] + rec + w["delta"] * ref["sparsity"] + w["ortho"] * ref["orthogonality"]
                + w["w_reg"] * ref["w_reg"])
    np.testing.assert_allclose(float(terms["reconstruction"]), rec, rtol=2e-5)
    np.testing.assert_allclose(float(total), expected, rtol=2e-5)
    assert float(terms["total"]) == float(total)


def test_viscoin_loss_accepts_config_dict_and_runs_under_jit():
    outputs, targets, wc, bc = _problem(6)
    perceptual_fn, classifier_fn = _fns(wc, bc)
    cfg = ml_collections.ConfigDict({"alpha": 0.5, "gamma": 0.05, "delta": 2.0})
    eager, _ = viscoin_loss(outputs, targets, cfg, perceptual_fn, classifier_fn)
    jitted, terms = jax.jit(lambda o, t: viscoin_loss(o, t, cfg, perceptual_fn, classifier_fn))(outputs, targets)
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-5)
    ref = _np_terms(outputs, targets, wc, bc)
    np.testing.assert_allclose(float(terms["sparsity"]), ref["sparsity"], rtol=1e-5)


def test_gamma_term_carries_gradient_into_reconstruction():
    outputs, targets, wc, bc = _problem(7)
    perceptual_fn, classifier_fn = _fns(wc, bc)
    x_rec = jnp.asarray(outputs["reconstruction"])

    def total(x, gamma):
        return viscoin_loss(dict(outputs, reconstruction=x), targets, {"gamma": gamma}, perceptual_fn,
                            classifier_fn)[0]

    grad = jax.jit(jax.grad(total))  # gamma traced: one compilation for both values
    g0 = np.asarray(grad(x_rec, 0.0), np.float64)
    g1 = np.asarray(grad(x_rec, 0.3), np.float64)
    # d CE(f(x~), f(x)) / d x~ for the linear classifier f(x) = flat(x) W + b
    logits = np.asarray(x_rec, np.float64).reshape(N, -1) @ wc + bc
    dl = (np.exp(_log_softmax(logits)) - np.exp(_log_softmax(targets["f_logits"]))) / N
    analytic = (dl @ wc.T.astype(np.float64)).reshape(x_rec.shape)
    assert np.abs(analytic).max() > 1e-3
    np.testing.assert_allclose(g1 - g0, 0.3 * analytic, atol=2e-6)
    # and the full gradient against central finite differences (float64)
    with jax.enable_x64(True):
        o64 = {k: jnp.asarray(v, jnp.float64) for k, v in outputs.items()}
        t64 = {k: jnp.asarray(v, jnp.float64) for k, v in targets.items()}
        wc64, bc64 = jnp.asarray(wc, jnp.float64), jnp.asarray(bc, jnp.float64)
        p64, c64 = _fns(wc64, bc64)
        f = jax.jit(lambda x: viscoin_loss(dict(o64, reconstruction=x), t64, {"gamma": 0.3}, p64, c64)[0])
        x64 = o64["reconstruction"]
        g = np.asarray(jax.grad(f)(x64))
        np.testing.assert_allclose(g, g1, atol=1e-5)
        rng = np.random.default_rng(0)
        eps = 1e-6
        for _ in range(6):
            idx = tuple(int(rng.integers(0, s)) for s in x64.shape)
            e = np.zeros(x64.shape)
            e[idx] = eps
            fd = (float(f(x64 + e)) - float(f(x64 - e))) / (2 * eps)
            np.testing.assert_allclose(g[idx], fd, rtol=1e-5, atol=1e-9)


def test_gradients_reach_each_trainable_input():
    outputs, targets, wc, bc = _problem(8)
    perceptual_fn, classifier_fn = _fns(wc, bc)
    names = ("g_logits", "reconstruction", "phi", "ws", "concept_weight")

    def total(trainable):
        return viscoin_loss(dict(outputs, **trainable), targets, None, perceptual_fn, classifier_fn)[0]

    grads = jax.jit(jax.grad(total))({k: jnp.asarray(outputs[k]) for k in names})
    for k in names:
        assert np.abs(np.asarray(grads[k])).max() > 0, k
    # the targets are constants
    tg = jax.jit(jax.grad(lambda t: viscoin_loss(outputs, t, None, perceptual_fn, classifier_fn)[0]))(
        {k: jnp.asarray(v) for k, v in targets.items()})
    for k, v in tg.items():
        assert np.all(np.asarray(v) == 0), k


def test_viscoin_loss_bad_inputs():
    outputs, targets, wc, bc = _problem(9)
    perceptual_fn, classifier_fn = _fns(wc, bc)
    with pytest.raises(ValueError, match="unknown VisCoIN loss weights"):
        viscoin_loss(outputs, targets, {"gama": 0.1}, perceptual_fn, classifier_fn)
    with pytest.raises(ValueError, match="perceptual_fn is required"):
        viscoin_loss(outputs, targets, None, None, classifier_fn)
    with pytest.raises(ValueError, match="classifier_fn is required"):
        viscoin_loss(outputs, targets, None, perceptual_fn, None)
    no_weight = {k: v for k, v in outputs.items() if k != "concept_weight"}
    with pytest.raises(ValueError, match="concept_weight"):
        viscoin_loss(no_weight, targets, None, perceptual_fn, classifier_fn)
    with pytest.raises(ValueError, match="missing 'phi'"):
        viscoin_loss({k: v for k, v in outputs.items() if k != "phi"}, targets, None, perceptual_fn, classifier_fn)
    with pytest.raises(ValueError, match="f_logits has 2 rows"):
        viscoin_loss(outputs, dict(targets, f_logits=targets["f_logits"][:2]), None, perceptual_fn, classifier_fn)
    with pytest.raises(ValueError, match="mapping"):
        viscoin_loss(outputs, targets, [0.5], perceptual_fn, classifier_fn)
    # terms switched off need no inputs, and report 0
    total, terms = viscoin_loss(no_weight, targets, {"beta": 0.0, "gamma": 0.0, "ortho": 0.0})
    assert float(terms["perceptual"]) == 0 and float(terms["reconstruction_ce"]) == 0
    assert float(terms["orthogonality"]) == 0 and np.isfinite(float(total))
