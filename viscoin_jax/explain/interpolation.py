"""Latent interpolation between an image and its counterfactual, with integrated gradients (medXGAN style).

Between the latents of an image (ws_a) and of a counterfactual (ws_b) we decode the straight path
ws(a) = ws_a + a (ws_b - ws_a), a in [0, 1], and show where the pixels change (|G(ws(a)) - G(ws_a)|).
Integrated gradients of f's target score along the same path attribute the change of the decision
to latent coordinates: attr = (ws_b - ws_a) * integral_0^1 grad F(ws(a)) da, which sums to
F(ws_b) - F(ws_a) (completeness). medXGAN splits its latent into anatomy and class parts and moves
only the class part; in W+ that is a ws_b equal to ws_a outside the chosen vectors.

The integral is the trapezoidal rule on m equally spaced points (m = 101 by default), which is
exact for paths along which the gradient is linear and second-order accurate otherwise.

Callables are static arguments of the compiled functions (compilation is cached on their identity;
they must be pure, e.g. frozen models in eval mode), as in `latent_direction`.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..checks import check_class_range, check_single_ws
from ..scores import SCORES, class_score
from .latent_direction import map_in_chunks

SynthesisFn = Callable[[jax.Array], jax.Array]
ClassifierFn = Callable[[jax.Array], jax.Array]


def _check_pair(ws_a, ws_b):
    ws_a = check_single_ws(ws_a, "ws_a")
    ws_b = check_single_ws(ws_b, "ws_b")
    if ws_a.shape != ws_b.shape:
        raise ValueError(f"ws_a and ws_b must have the same shape, got {ws_a.shape} and {ws_b.shape}")
    return ws_a, ws_b


def interpolate_latents(ws_a, ws_b, num_steps: int) -> tuple[jax.Array, jax.Array]:
    """(alphas [T], ws [T, num_ws, w_dim]) on the straight path from ws_a (alpha 0) to ws_b (alpha 1)."""
    ws_a, ws_b = _check_pair(ws_a, ws_b)
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    alphas = jnp.linspace(0.0, 1.0, num_steps, dtype=ws_a.dtype)
    return alphas, ws_a[None] + alphas[:, None, None] * (ws_b - ws_a)[None]


def difference_maps(images) -> jax.Array:
    """|image_t - image_0| averaged over colour channels: [T, H, W] (where the series changes the start)."""
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be a [T, H, W, C] series, got shape {images.shape}")
    return jnp.mean(jnp.abs(images - images[:1]), axis=-1)


class Interpolation(NamedTuple):
    alphas: jax.Array  # [T]
    images: jax.Array  # [T, H, W, 3], images[0] = G(ws_a), images[-1] = G(ws_b)
    difference_maps: jax.Array  # [T, H, W] |images[t] - images[0]| averaged over channels
    probs: jax.Array | None  # [T, C] f's probabilities along the series (None without classifier)


def latent_interpolation(
    synthesis_fn: SynthesisFn,
    ws_a,
    ws_b,
    *,
    num_steps: int = 11,
    classifier_fn: ClassifierFn | None = None,
    batch_size: int | None = None,
) -> Interpolation:
    """Decodes `num_steps` latents from ws_a to ws_b; returns the images, difference maps and f's probs."""
    alphas, path = interpolate_latents(ws_a, ws_b, num_steps)
    images, maps, probs = _decode_path(synthesis_fn, classifier_fn, path, batch_size)
    return Interpolation(alphas, images, maps, probs)


@functools.partial(jax.jit, static_argnames=("synthesis_fn", "classifier_fn", "batch_size"))
def _decode_path(synthesis_fn, classifier_fn, path, batch_size):
    def decode(w):
        images = synthesis_fn(w)
        probs = None if classifier_fn is None else jax.nn.softmax(classifier_fn(images), axis=-1)
        return images, probs

    images, probs = map_in_chunks(decode, path, batch_size)
    return images, difference_maps(images), probs


class LatentAttribution(NamedTuple):
    attributions: jax.Array  # [num_ws, w_dim] integrated gradients in W+
    layer_attributions: jax.Array  # [num_ws] attributions summed per W+ vector (which styles matter)
    alphas: jax.Array  # [m] path positions
    path_scores: jax.Array  # [m] F(G(ws(alpha))) along the path
    delta: jax.Array  # F(G(ws_b)) - F(G(ws_a))
    completeness_gap: jax.Array  # sum(attributions) - delta (0 for an exact integral)


def latent_integrated_gradients(
    synthesis_fn: SynthesisFn,
    classifier_fn: ClassifierFn,
    ws_a,
    ws_b,
    target_class: int,
    *,
    num_steps: int = 101,
    score: str = "logit",
    batch_size: int | None = 16,
) -> LatentAttribution:
    """Integrated gradients of F = score_c(f(G(ws))) along the straight latent path ws_a -> ws_b.

    `score` is "logit" (default), "log_prob" or "prob" of `target_class`. `batch_size` path points
    are differentiated at once (bounds memory; None = all m at once). The completeness gap
    sum(attributions) - (F(ws_b) - F(ws_a)) measures the integration error: raise num_steps if it
    is large relative to delta.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if not isinstance(target_class, (int, np.integer)):
        raise ValueError(f"target_class must be an int, got {type(target_class).__name__}")
    alphas, path = interpolate_latents(ws_a, ws_b, num_steps)
    ws_a, ws_b = _check_pair(ws_a, ws_b)
    result, shape_of_c = _integrated_gradients(
        synthesis_fn, classifier_fn, path, alphas, ws_a, ws_b, jnp.int32(target_class), score, batch_size
    )
    check_class_range(np.array([int(target_class)]), shape_of_c.shape[1])
    return result


@functools.partial(jax.jit, static_argnames=("synthesis_fn", "classifier_fn", "score", "batch_size"))
def _integrated_gradients(synthesis_fn, classifier_fn, path, alphas, ws_a, ws_b, target, score, batch_size):
    num_steps = path.shape[0]

    def score_and_grad(w):
        def total(w):
            s = class_score(classifier_fn(synthesis_fn(w)), jnp.full((w.shape[0],), target), score)
            return jnp.sum(s), s

        grads, s = jax.grad(total, has_aux=True)(w)
        return s, grads

    # Number of classes, for the range check (traced once, only while compiling).
    num_classes = jax.eval_shape(lambda w: classifier_fn(synthesis_fn(w)), path[:1]).shape[-1]
    shape_of_c = jnp.zeros((0, num_classes))
    scores, grads = map_in_chunks(score_and_grad, path, batch_size)
    weights = jnp.full((num_steps,), 1.0 / (num_steps - 1), path.dtype)
    weights = weights.at[0].multiply(0.5).at[-1].multiply(0.5)  # trapezoidal rule
    attributions = (ws_b - ws_a) * jnp.tensordot(weights, grads, axes=1)
    delta = scores[-1] - scores[0]
    result = LatentAttribution(attributions, attributions.sum(-1), alphas, scores, delta, attributions.sum() - delta)
    return result, shape_of_c
