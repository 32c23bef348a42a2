"""VisCoIN faithfulness and consistency on a toy pipeline whose decoder is exactly invertible,
the linear SVM against a scipy solution of its dual, and counterfactual metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from viscoin_jax.metrics.counterfactual_metrics import factor_change_analysis, factor_changes, proximity, validity
from viscoin_jax.metrics.viscoin_metrics import (
    consistency,
    faithfulness,
    faithfulness_batch,
    fit_linear_svm,
    svm_accuracy,
    svm_decision,
)

K, C = 12, 5  # 6x6x3 images <-> 3x3x12 concept maps (space-to-depth)
DEAD = 7  # a concept the toy extractor never activates
RNG = np.random.default_rng(0)
HEAD_W = RNG.normal(size=(K, C)).astype(np.float32)
HEAD_B = RNG.normal(size=(C,)).astype(np.float32) * 0.1


def space_to_depth(x):
    n = x.shape[0]
    return x.reshape(n, 3, 2, 3, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, 3, 3, K)


def depth_to_space(phi):
    n = phi.shape[0]
    return phi.reshape(n, 3, 3, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, 6, 6, 3)


def concepts_fn(images):
    phi = jnp.maximum(space_to_depth(images), 0.0) * (jnp.arange(K) != DEAD)
    return phi, jnp.zeros((images.shape[0], 9 * K))


def head_fn(phi):
    return jnp.max(phi, axis=(1, 2)) @ jnp.asarray(HEAD_W) + jnp.asarray(HEAD_B)


def translator_fn(phi, phi_prime):  # ws [N, 1, 108]; phi_prime is ignored by this toy decoder
    return phi.reshape(phi.shape[0], 1, -1) + 0.0 * phi_prime[:, None, :]


def synthesis_fn(ws):  # exact inverse of the extractor on non-negative maps
    return depth_to_space(ws.reshape(ws.shape[0], 3, 3, K))


def _images(n, seed):
    return np.random.default_rng(seed).normal(size=(n, 6, 6, 3)).astype(np.float32)


def _ff_numpy(images, tau, score):
    m = np.maximum(space_to_depth(images.astype(np.float64)), 0).max(axis=(1, 2))
    m[:, DEAD] = 0
    logits = m @ HEAD_W + HEAD_B
    c = logits.argmax(1)
    alpha = m * HEAD_W[:, c].T
    r = alpha / np.abs(alpha).max(1, keepdims=True)
    removed = (m * (r < tau)) @ HEAD_W + HEAD_B

    def s(z):
        if score == "logit":
            return z[np.arange(len(c)), c]
        p = np.exp(z - z.max(1, keepdims=True))
        return (p / p.sum(1, keepdims=True))[np.arange(len(c)), c]

    return s(logits) - s(removed)


FNS = dict(concepts_fn=concepts_fn, head_fn=head_fn, head_weight=HEAD_W, translator_fn=translator_fn,
           synthesis_fn=synthesis_fn)


@pytest.mark.parametrize("score", ["prob", "logit"])
def test_faithfulness_on_an_invertible_toy_pipeline(score):
    images = _images(12, 1)
    taus = (0.1, 0.2, 0.4)
    ref = np.stack([_ff_numpy(images, t, score) for t in taus])
    out = faithfulness([images[:6], {"image": images[6:]}], taus=taus, score=score, **FNS)
    np.testing.assert_allclose(out.per_image, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.median, np.median(ref, axis=1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.taus, taus)
    assert np.all(out.per_image[0] >= out.per_image[2] - 1e-5)  # a lower tau removes more concepts
    if score == "logit":  # removing positively relevant concepts can only lower the class logit
        assert np.all(out.per_image >= -1e-5)
    if score == "logit":
        return
    # The per-batch function is jit-able on its own.
    one = jax.jit(lambda x: faithfulness_batch(x, taus=taus, score=score, **FNS))(images[:6])
    np.testing.assert_allclose(np.asarray(one), ref[:, :6], rtol=1e-4, atol=1e-5)


def test_faithfulness_at_tau_one_removes_exactly_the_top_concept():
    """The boundary: where the top concept's relevance is exactly 1 (its alpha is the largest |alpha|),
    tau = 1 removes it and nothing else; where a negative alpha is larger in size, nothing is removed."""
    images = _images(16, 3)
    out = faithfulness([images], taus=(1.0,), score="logit", **FNS)
    m = np.maximum(space_to_depth(images.astype(np.float64)), 0).max(axis=(1, 2))
    m[:, DEAD] = 0
    logits = m @ HEAD_W + HEAD_B
    c = logits.argmax(1)
    rows = np.arange(len(c))
    alpha = m * HEAD_W[:, c].T
    top = np.argmax(alpha, axis=1)
    has_unit = alpha[rows, top] >= np.abs(alpha).max(axis=1)
    assert has_unit.sum() > 0
    removed = m.copy()
    removed[rows[has_unit], top[has_unit]] = 0  # by hand: only the top concept zeroed, where r = 1
    expected = logits[rows, c] - (removed @ HEAD_W + HEAD_B)[rows, c]
    np.testing.assert_allclose(out.per_image[0], expected, rtol=1e-4, atol=1e-5)
    assert np.all(out.per_image[0][has_unit] > 0) and np.all(out.per_image[0][~has_unit] == 0)


def test_faithfulness_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        faithfulness([], **FNS)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        faithfulness([np.zeros((2, 6, 6))], **FNS)
    with pytest.raises(ValueError, match="score"):
        faithfulness([_images(2, 0)], score="margin", **FNS)


# ------------------------------------------------------------------------------------------------
# Linear SVM


def _blobs(seed, gap=3.0, random_labels=False, n=200, d=10):
    """Two Gaussian blobs along the first axis (or structureless data with random labels)."""
    rng = np.random.default_rng(seed)
    y = np.where(rng.uniform(size=n) < 0.5, 1, -1)
    x = rng.normal(size=(n, d)) + (0.0 if random_labels else gap) * y[:, None] * np.eye(d)[0]
    if random_labels:
        y = np.where(rng.uniform(size=n) < 0.5, 1, -1)
    return x.astype(np.float32), y


def test_svm_separable_vs_random_labels():
    x, y = _blobs(1)
    xt, yt = _blobs(2)
    svm = fit_linear_svm(x, y)
    assert float(svm_accuracy(svm, x, y)) > 0.97 and float(svm_accuracy(svm, xt, yt)) > 0.97
    x, y = _blobs(3, random_labels=True)
    xt, yt = _blobs(4, random_labels=True)
    acc = float(svm_accuracy(fit_linear_svm(x, y), xt, yt))
    assert 0.38 < acc < 0.62


def test_svm_solves_the_dual_problem_and_ignores_masked_samples():
    x, y = _blobs(5, gap=1.0)  # overlapping classes: some slack is active
    mask = np.arange(200) % 3 != 0
    cost = 0.5
    svm = fit_linear_svm(x, y, c=cost, mask=mask, standardize=False, tol=1e-4, max_epochs=1000)
    assert bool(svm.converged)
    xs, ys = x[mask], y[mask]
    xa = np.concatenate([xs, np.ones((len(ys), 1))], axis=1).astype(np.float64)
    q = (ys[:, None] * xa) @ (ys[:, None] * xa).T
    res = scipy.optimize.minimize(lambda a: 0.5 * a @ q @ a - a.sum(), np.zeros(len(ys)), jac=lambda a: q @ a - 1,
                                  bounds=[(0, cost)] * len(ys), method="L-BFGS-B",
                                  options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 10000})
    w_ref = (res.x * ys) @ xa

    def primal(w):
        return 0.5 * w @ w + cost * np.maximum(0, 1 - ys * (xa @ w)).sum()

    w_ours = np.append(np.asarray(svm.weight), float(svm.bias))
    np.testing.assert_allclose(primal(w_ours), primal(w_ref), rtol=1e-4)
    np.testing.assert_allclose(w_ours, w_ref, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(svm_decision(svm, xs)), xa @ w_ours, rtol=1e-5, atol=1e-5)
    # Masked-out samples have no influence at all: garbage in them changes nothing.
    garbage_x = np.where(mask[:, None], x, 100.0).astype(np.float32)
    garbage = fit_linear_svm(garbage_x, np.where(mask, y, 1), c=cost, mask=mask, standardize=False, tol=1e-4,
                             max_epochs=1000)
    np.testing.assert_array_equal(np.asarray(garbage.weight), np.asarray(svm.weight))
    np.testing.assert_allclose(float(svm_accuracy(svm, x, y, mask)), np.mean((xa @ w_ours > 0) == (ys > 0)))


def test_svm_labels_and_bad_inputs():
    x, y = _blobs(6)
    zero_one = fit_linear_svm(x, (y > 0).astype(np.int32))
    np.testing.assert_allclose(np.asarray(zero_one.weight), np.asarray(fit_linear_svm(x, y).weight), rtol=1e-6)
    with pytest.raises(ValueError, match="labels in"):
        fit_linear_svm(x, y * 2)
    with pytest.raises(ValueError, match="mask must have shape"):
        fit_linear_svm(x, y, mask=np.ones(5, bool))
    with pytest.raises(ValueError, match="c must be"):
        fit_linear_svm(x, y, c=0.0)
    with pytest.raises(ValueError, match="x must be a 2-D"):
        fit_linear_svm(x[0], y)


# ------------------------------------------------------------------------------------------------
# Consistency


def cc_concepts_fn(images):
    """Concepts with activations >= 0.5 wherever they are live: every pair has a clear margin."""
    phi = (jnp.maximum(space_to_depth(images), 0.0) + 0.5) * (jnp.arange(K) != DEAD)
    return phi, jnp.zeros((images.shape[0], 9 * K))


def feature_maps(images):  # a stand-in for f's stage-2 maps; consistency averages them over space
    return space_to_depth(images)


def test_consistency_separates_active_concepts_and_not_a_dead_one():
    common = dict(concepts_fn=cc_concepts_fn, translator_fn=translator_fn, synthesis_fn=synthesis_fn,
                  feature_fn=feature_maps)
    train = [_images(16, 7), {"image": _images(16, 8)}]
    test = [_images(16, 9)]
    # One-shot iterators, every concept (the count is read from the first batch, which is not lost);
    # every image's pair, active concept or not.
    out = consistency(iter(train), iter(test), min_activation=None, **common)
    np.testing.assert_array_equal(out.concept_ids, np.arange(K))
    live = np.arange(K) != DEAD
    # x+ and x- differ only in pooled feature k, by >= 4 * 0.5: separable with a margin (a soft-margin
    # SVM on 32 pairs may still trade a pair or two for a smaller weight).
    assert np.all(out.accuracy[live] > 0.9) and np.all(out.train_accuracy[live] > 0.9)
    assert out.accuracy[DEAD] == 0.5  # x+ == x-: any linear rule gets exactly one of each pair right
    np.testing.assert_allclose(out.mean, out.accuracy.mean())
    np.testing.assert_allclose(out.std, out.accuracy.std())
    # By default only pairs whose concept is active: the dead concept has none and is left out.
    active = consistency(train, test, **common)
    assert np.isnan(active.accuracy[DEAD]) and active.test_pairs[DEAD] == 0
    np.testing.assert_array_equal(active.test_pairs[live], 16)
    np.testing.assert_allclose(active.mean, np.mean(active.accuracy[live]))
    # Several passes over the data (six concepts at a time) give the same numbers.
    chunked = consistency(train, test, concept_ids=np.arange(K), concepts_per_pass=6, min_activation=None, **common)
    np.testing.assert_allclose(chunked.accuracy, out.accuracy)
    with pytest.raises(ValueError, match="re-iterable"):
        consistency(iter(train), test, concepts_per_pass=2, **common)
    with pytest.raises(ValueError, match="train_batches is empty"):
        consistency([], test, **common)
    with pytest.raises(ValueError, match="test_batches is empty"):
        consistency(train, [], concept_ids=np.arange(K), **common)
    with pytest.raises(ValueError, match="concept_ids must be"):
        consistency(train, test, concept_ids=np.array([[1]]), **common)


def gated_concepts_fn(images):
    """Odd concepts fire only on images whose first pixel is positive (about half), even ones always;
    where they fire, >= 0.5 everywhere (x+ and x- differ by a margin)."""
    live = (jnp.maximum(space_to_depth(images), 0.0) + 0.5) * (jnp.arange(K) != DEAD)
    gate = jnp.where(jnp.arange(K) % 2 == 1, (images[:, 0, 0, 0] > 0)[:, None], True)
    return live * gate[:, None, None, :], jnp.zeros((images.shape[0], 9 * K))


def test_consistency_counts_only_pairs_where_the_concept_is_active():
    """By hand: active pairs are perfectly separable, so CC = 1 on them; counting every image instead
    gives 1 for each active pair and exactly 1/2 for each inactive one (x+ == x-)."""
    common = dict(concepts_fn=gated_concepts_fn, translator_fn=translator_fn, synthesis_fn=synthesis_fn,
                  feature_fn=feature_maps)
    train, test = [_images(40, 11)], [_images(33, 12)]
    gate_test = test[0][:, 0, 0, 0] > 0
    assert 0.2 < gate_test.mean() < 0.8
    odd = np.arange(1, K, 2)
    odd = odd[odd != DEAD]
    out = consistency(train, test, concept_ids=odd, **common)
    np.testing.assert_array_equal(out.test_pairs, gate_test.sum())
    np.testing.assert_allclose(out.accuracy, 1.0)
    every = consistency(train, test, concept_ids=odd, min_activation=None, **common)
    np.testing.assert_array_equal(every.test_pairs, len(gate_test))
    np.testing.assert_allclose(every.accuracy, (2 * gate_test.sum() + (~gate_test).sum()) / (2 * len(gate_test)),
                               atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Counterfactual metrics


def test_validity_and_proximity():
    logits = np.array([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.5, 0.0]])  # argmax 0 1 2 0
    to = validity(logits, target=np.array([0, 2, 2, 1]))
    np.testing.assert_array_equal(to.valid, [True, False, True, False])
    assert to.rate == 0.5
    away = validity(np.array([0, 1, 2, 0]), source=0)
    np.testing.assert_array_equal(away.valid, [False, True, True, False])
    with pytest.raises(ValueError, match="exactly one"):
        validity(logits)
    with pytest.raises(ValueError, match="exactly one"):
        validity(logits, target=0, source=1)
    with pytest.raises(ValueError, match="expected logits"):
        validity(logits[None])

    x = RNG.uniform(-1, 1, size=(3, 5, 4, 3)).astype(np.float32)
    y = RNG.uniform(-1, 1, size=(3, 5, 4, 3)).astype(np.float32)
    d = proximity(x, y)
    np.testing.assert_allclose(d["l1"], np.abs(x - y).mean(axis=(1, 2, 3)), rtol=1e-6)
    assert "perceptual" not in d
    d = proximity(x, y, perceptual_fn=lambda a, b: jnp.sum((a - b) ** 2, axis=(1, 2, 3)))
    np.testing.assert_allclose(d["perceptual"], ((x - y) ** 2).sum(axis=(1, 2, 3)), rtol=1e-5)
    with pytest.raises(ValueError, match="differ in shape"):
        proximity(x, y[:2])
    with pytest.raises(ValueError, match=r"\[N\] distances"):
        proximity(x, y, perceptual_fn=lambda a, b: jnp.zeros((3, 2)))


def test_factor_changes_by_hand():
    before = {"shape": np.array([0, 1, 2, 1]), "size": np.array([1.0, 1.0, 2.0, 2.0]),
              "colour": np.zeros((4, 3)), "position": np.array([0.5, 0.5, 0.5, 0.5])}
    after = {"shape": np.array([1, 1, 0, 1]), "size": np.array([1.0, 1.05, 2.0, 3.0]),
             "colour": np.array([[0, 0, 0], [0, 0.5, 0], [0, 0, 0], [0.01, 0, 0]]),
             "position": np.array([0.5, 0.5, 0.5, 0.5])}
    out = factor_changes(before, after, causal=["shape", "size"], tolerance={"size": 0.1, "colour": 0.1})
    np.testing.assert_array_equal(out.changed["shape"], [True, False, True, False])
    np.testing.assert_array_equal(out.changed["size"], [False, False, False, True])  # 0.05 is within tolerance
    np.testing.assert_array_equal(out.changed["colour"], [False, True, False, False])
    np.testing.assert_array_equal(out.changed["position"], [False] * 4)
    assert out.nuisance == ("colour", "position")
    assert out.change_rate == {"shape": 0.5, "size": 0.25, "colour": 0.25, "position": 0.0}
    assert out.causal_rate == pytest.approx(0.375) and out.nuisance_rate == pytest.approx(0.125)
    assert out.any_causal == 0.75 and out.any_nuisance == 0.25 and out.causal_only == 0.75
    np.testing.assert_array_equal(out.causal_changed, [True, False, True, True])  # per sample
    np.testing.assert_array_equal(out.nuisance_changed, [False, True, False, False])
    strict = factor_changes(before, after, causal=["shape"], nuisance=["colour"])  # tolerance 0; size unassigned
    assert strict.change_rate["size"] == 0.5 and strict.any_nuisance == 0.5 and strict.causal_only == 0.5
    np.testing.assert_array_equal(strict.nuisance_changed, [False, True, False, True])
    with pytest.raises(ValueError, match="unknown factor"):
        factor_changes(before, after, causal=["hue"])
    with pytest.raises(ValueError, match="both causal and nuisance"):
        factor_changes(before, after, causal=["shape"], nuisance=["shape"])
    with pytest.raises(ValueError, match="different factors"):
        factor_changes(before, {k: v for k, v in after.items() if k != "size"}, causal=["shape"])
    with pytest.raises(ValueError, match="must be equal"):
        factor_changes(before, {**after, "size": after["size"][:3]}, causal=["shape"])

    # Through a measuring function: the mean brightness is causal, the left half's brightness nuisance.
    measure = lambda im: {"bright": np.asarray(im).mean(axis=(1, 2, 3)).round(3),
                          "left": np.asarray(im)[:, :, :2].mean(axis=(1, 2, 3)).round(3)}
    x = np.zeros((2, 4, 4, 3), np.float32)
    cf = x.copy()
    cf[0, :, 2:] = 0.5  # right half only: causal change, nuisance untouched
    cf[1] = 0.5  # everything
    out = factor_change_analysis(measure, x, cf, causal=["bright"])
    np.testing.assert_array_equal(out.changed["left"], [False, True])
    assert out.causal_only == 0.5


def test_blob_removed_and_colour_ambiguous_are_outcomes_of_their_own():
    """By hand: 5 edits - a clean colour flip, an erased blob (colour reads -1), a flip to an in-between
    colour, a nuisance change, and an input without a blob. Only the first is a causal change."""
    nan = np.nan
    before = {"colour": np.array([0, 0, 1, 0, -1]), "size": np.array([0.2, 0.2, 0.2, 0.2, nan]),
              "found": np.array([True, True, True, True, False]),
              "colour_score": np.array([0.3, 0.3, -0.4, 0.3, nan])}
    after = {"colour": np.array([1, -1, 0, 0, 1]), "size": np.array([0.2, nan, 0.2, 0.3, 0.2]),
             "found": np.array([True, False, True, True, True]),
             "colour_score": np.array([-0.4, nan, 0.05, 0.3, -0.4])}
    from viscoin_jax.data.synthetic import measurement_outcomes

    outcomes = measurement_outcomes(before, after)
    np.testing.assert_array_equal(outcomes["no blob in the input"], [0, 0, 0, 0, 1])
    np.testing.assert_array_equal(outcomes["blob removed"], [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(outcomes["colour ambiguous"], [0, 0, 1, 0, 0])
    out = factor_changes(before, after, causal=["colour"], nuisance=["size"], tolerance={"size": 0.02},
                         outcomes=outcomes)
    np.testing.assert_array_equal(out.changed["colour"], [True, False, False, False, False])
    np.testing.assert_array_equal(out.changed["size"], [False, False, False, True, False])
    assert out.any_causal == pytest.approx(0.2) and out.causal_only == pytest.approx(0.2)
    assert out.any_nuisance == pytest.approx(0.2)
    assert out.outcome_rate == pytest.approx({"no blob in the input": 0.2, "blob removed": 0.2, "colour ambiguous": 0.2})
    # without the outcomes the erased blob, the in-between flip and the blank input all read as colour changes
    naive = factor_changes(before, after, causal=["colour"], nuisance=["size"], tolerance={"size": 0.02})
    assert naive.any_causal == pytest.approx(0.8)
    # precedence: a sample under two outcomes counts once, under the first
    both = factor_changes(before, after, causal=["colour"], outcomes={"a": [1, 1, 0, 0, 0], "b": [0, 1, 1, 0, 0]})
    assert both.outcome_rate == {"a": 0.4, "b": 0.2}
    with pytest.raises(ValueError, match="outcome 'a' must be"):
        factor_changes(before, after, causal=["colour"], outcomes={"a": [True]})


def test_measurement_outcomes_read_pixels():
    """Rendered blobs: one kept, one erased (background only), one painted in the mean of the two stains."""
    from viscoin_jax.data.synthetic import BACKGROUND_RGB, STAIN_RGB, measure_factors, measurement_outcomes

    yy, xx = np.mgrid[0:32, 0:32]
    disc = (yy - 15.5) ** 2 + (xx - 13.5) ** 2 < 36
    images = np.broadcast_to(np.asarray(BACKGROUND_RGB, np.float64), (3, 32, 32, 3)).copy()
    images[0][disc] = STAIN_RGB[0]
    edits = images.copy()
    edits[0][disc] = STAIN_RGB[1]  # a clean flip
    edits[1] = images[1]
    images[1][disc] = STAIN_RGB[1]  # the edit erases it
    images[2][disc] = STAIN_RGB[1]
    edits[2][disc] = 0.5 * (STAIN_RGB[0] + STAIN_RGB[1])  # in between
    before, after = measure_factors(images.astype(np.uint8)), measure_factors(edits.astype(np.uint8))
    outcomes = measurement_outcomes(before, after)
    np.testing.assert_array_equal(outcomes["blob removed"], [False, True, False])
    np.testing.assert_array_equal(outcomes["colour ambiguous"], [False, False, True])
    np.testing.assert_array_equal(outcomes["no blob in the input"], [False, False, False])
    to_unit = lambda a: (a.astype(np.uint8).astype(np.float32) / 127.5 - 1.0)  # noqa: E731
    out = factor_change_analysis(measure_factors, to_unit(images), to_unit(edits),
                                 causal=["colour"], nuisance=["size"], tolerance={"size": 0.02},
                                 outcomes_fn=measurement_outcomes)
    np.testing.assert_array_equal(out.changed["colour"], [True, False, False])
