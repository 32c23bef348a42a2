"""VisCoIN concept explanations against numpy loops."""

import jax.numpy as jnp
import numpy as np
import pytest

from viscoin_jax.explain.concepts import (
    TopK,
    class_relevance,
    concept_visualisation,
    top_activating_images,
    top_concepts,
    topk_init,
    topk_update,
)
from viscoin_jax.models.concepts import concept_relevance, predicted_classes, scale_concepts

K, C, NUM_WS, W_DIM, HI, WI = 7, 4, 2, 5, 3, 5
RNG = np.random.default_rng(0)
T_PHI = RNG.normal(size=(9 * K, NUM_WS * W_DIM)).astype(np.float32) / 8
T_PRIME = RNG.normal(size=(9 * K, NUM_WS * W_DIM)).astype(np.float32) / 8
G = RNG.normal(size=(NUM_WS * W_DIM, HI * WI * 3)).astype(np.float32) / 3
MIX = RNG.normal(size=(3, K)).astype(np.float32)


def translator_fn(phi, phi_prime):
    ws = phi.reshape(phi.shape[0], -1) @ jnp.asarray(T_PHI) + phi_prime @ jnp.asarray(T_PRIME)
    return ws.reshape(-1, NUM_WS, W_DIM)


def synthesis_fn(ws):
    return jnp.tanh(ws.reshape(ws.shape[0], -1) @ jnp.asarray(G)).reshape(-1, HI, WI, 3)


def concepts_fn(images):  # images [B, 3, 3, 3] -> phi [B, 3, 3, K]
    phi = jnp.maximum(images @ jnp.asarray(MIX), 0.0)
    return phi, phi.reshape(phi.shape[0], -1)


def _phi(n, seed):
    phi = np.maximum(np.random.default_rng(seed).normal(size=(n, 3, 3, K)), 0).astype(np.float32)
    return phi


def _decode_np(phi, phi_prime):
    ws = phi.reshape(phi.shape[0], -1).astype(np.float64) @ T_PHI + phi_prime @ T_PRIME
    return np.tanh(ws @ G).reshape(-1, HI, WI, 3)


def test_relevance_and_top_concepts_against_numpy():
    phi = _phi(6, 1)
    phi[3] = 0.0  # no active concept -> relevance 0
    w = RNG.normal(size=(K, C)).astype(np.float32)
    classes = np.array([0, 3, 2, 1, 1, 0])
    r = np.asarray(concept_relevance(phi, w, classes))
    for n in range(6):
        alpha = phi[n].max(axis=(0, 1)) * w[:, classes[n]]
        ref = alpha / np.abs(alpha).max() if np.abs(alpha).max() > 0 else np.zeros(K)
        np.testing.assert_allclose(r[n], ref, rtol=1e-5, atol=1e-7)
    assert np.all(np.abs(r) <= 1.0 + 1e-6) and np.allclose(np.abs(r[[0, 1, 2, 4, 5]]).max(1), 1.0)
    values, idx = top_concepts(r, 3)
    np.testing.assert_array_equal(np.asarray(idx)[[0, 1, 2, 4, 5]], np.argsort(-r[[0, 1, 2, 4, 5]], axis=1)[:, :3])
    np.testing.assert_allclose(np.asarray(values), np.take_along_axis(r, np.asarray(idx), 1))

    head_fn = lambda p: jnp.max(p, axis=(1, 2)) @ jnp.asarray(w) + jnp.arange(C, dtype=jnp.float32) * 0.01
    np.testing.assert_array_equal(np.asarray(predicted_classes(head_fn, phi)),
                                  np.argmax(phi.max(axis=(1, 2)) @ w + np.arange(C) * 0.01, axis=1))
    with pytest.raises(ValueError, match="head_weight must be"):
        concept_relevance(phi, w[:-1], classes)
    with pytest.raises(ValueError, match="classes out of range"):
        concept_relevance(phi, w, np.full(6, C))
    with pytest.raises(ValueError, match="4-D"):
        concept_relevance(phi[0], w, 0)
    with pytest.raises(ValueError, match="k must lie"):
        top_concepts(r, K + 1)


def test_concept_visualisation_against_a_numpy_loop():
    n, lambdas = 3, (0.0, 1.0, 2.0, 4.0)
    phi = _phi(n, 2)
    phi_prime = RNG.normal(size=(n, 9 * K)).astype(np.float32)
    ids = np.array([[0, 5], [2, 2], [6, 1]])
    images = np.asarray(concept_visualisation(translator_fn, synthesis_fn, phi, phi_prime, ids, batch_size=5))
    assert images.shape == (n, 2, 4, HI, WI, 3)
    for i in range(n):
        for j in range(2):
            for l, lam in enumerate(lambdas):
                edited = phi[i : i + 1].astype(np.float64).copy()
                edited[..., ids[i, j]] *= lam
                np.testing.assert_allclose(images[i, j, l], _decode_np(edited, phi_prime[i : i + 1])[0],
                                           rtol=1e-4, atol=1e-5)
    # lambda = 1 is the plain reconstruction; shared concept ids broadcast over images.
    np.testing.assert_allclose(images[:, 0, 1], _decode_np(phi, phi_prime), rtol=1e-4, atol=1e-5)
    shared = concept_visualisation(translator_fn, synthesis_fn, phi, phi_prime, np.array([2]), lambdas=(3.0,))
    edited = phi.astype(np.float64).copy()
    edited[..., 2] *= 3.0
    np.testing.assert_allclose(np.asarray(shared)[:, 0, 0], _decode_np(edited, phi_prime), rtol=1e-4, atol=1e-5)
    scaled = np.asarray(scale_concepts(phi, jnp.array([1, 1, 1]), jnp.array([0.0, 2.0, 1.0])))
    np.testing.assert_allclose(scaled[..., 1], phi[..., 1] * np.array([0.0, 2.0, 1.0])[:, None, None], rtol=1e-6)
    np.testing.assert_array_equal(scaled[..., [0, 2, 3]], phi[..., [0, 2, 3]])
    with pytest.raises(ValueError, match="concept_ids out of range"):
        concept_visualisation(translator_fn, synthesis_fn, phi, phi_prime, np.array([K]))
    with pytest.raises(ValueError, match="concept_ids has 2 rows"):
        concept_visualisation(translator_fn, synthesis_fn, phi, phi_prime, ids[:2])
    with pytest.raises(ValueError, match="phi_prime has"):
        concept_visualisation(translator_fn, synthesis_fn, phi, phi_prime[:2], ids)


def test_class_relevance_against_numpy():
    r = RNG.uniform(-1, 1, size=(11, K)).astype(np.float32)
    labels = np.array([0, 2, 2, 0, 1, 0, 2, 1, 0, 0, 2])
    means, counts = class_relevance(r, labels, 4)
    for c in range(3):
        np.testing.assert_allclose(np.asarray(means[c]), r[labels == c].mean(0), rtol=1e-5)
    assert np.all(np.isnan(np.asarray(means[3])))
    np.testing.assert_array_equal(np.asarray(counts), [5, 2, 4, 0])
    with pytest.raises(ValueError, match="labels out of range"):
        class_relevance(r, labels + 2, 4)


def test_streaming_top_k_equals_a_full_sort():
    images = RNG.normal(size=(29, 3, 3, 3)).astype(np.float32)
    images[17] = images[4]  # a tie: the earlier image must win
    batches = [images[:10], {"image": images[10:13]}, images[13:29]]
    top = top_activating_images(concepts_fn, batches, k=5)
    scores = np.maximum(images @ MIX, 0).max(axis=(1, 2))  # [29, K]
    for k in range(K):
        order = np.argsort(-scores[:, k], kind="stable")[:5]
        np.testing.assert_array_equal(np.asarray(top.ids[k]), order)
        np.testing.assert_allclose(np.asarray(top.scores[k]), scores[order, k], rtol=1e-5)
    # Explicit data-set indices are carried through.
    offset = top_activating_images(concepts_fn, [{"image": images, "index": np.arange(29) + 100}], k=2)
    np.testing.assert_array_equal(np.asarray(offset.ids), np.asarray(top.ids[:, :2]) + 100)
    # Fewer images than k: unfilled slots stay at id -1.
    small = topk_update(topk_init(K, 4), jnp.asarray(scores[:2]), jnp.array([7, 8]))
    assert isinstance(small, TopK) and np.all(np.asarray(small.ids[:, 2:]) == -1)
    with pytest.raises(ValueError, match="empty"):
        top_activating_images(concepts_fn, [], k=2)
    with pytest.raises(ValueError, match="'index' must have shape"):
        top_activating_images(concepts_fn, [{"image": images, "index": np.arange(3)}], k=2)
