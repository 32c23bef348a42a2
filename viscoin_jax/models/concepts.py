"""What VisCoIN's concept maps mean (Parekh et al., ICLR 2025, sec. 3): the head is linear on
max-pooled maps, so concept k's share of class c's logit is alpha_k = maxpool(phi_k) * W[k, c] and
its relevance r_k = alpha_k / max_l |alpha_l|; a concept is edited by scaling its map and decoded
through the translator and the generator. The explanations and the metrics (faithfulness,
consistency) both read concepts through these functions.

Conventions: phi is [N, h, w, K] (concepts last), phi_prime [N, h w K], head_weight [K, C].
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ..checks import check_class_range, check_phi, concrete

TranslatorFn = Callable[[jax.Array, jax.Array], jax.Array]
SynthesisFn = Callable[[jax.Array], jax.Array]


def pooled_concepts(phi) -> jax.Array:
    """max over the spatial grid: [N, K], the activations the interpretable head sees."""
    return jnp.max(check_phi(phi), axis=(1, 2))


def concept_contributions(phi, head_weight, classes) -> jax.Array:
    """alpha [N, K] = maxpool(phi_k) * W[k, c_n]: concept k's additive share of class c_n's logit.

    jit-able; the class range is checked when `classes` is concrete.
    """
    phi = check_phi(phi)
    head_weight = jnp.asarray(head_weight)
    if head_weight.ndim != 2 or head_weight.shape[0] != phi.shape[-1]:
        raise ValueError(f"head_weight must be [K={phi.shape[-1]}, C], got shape {head_weight.shape}")
    classes = jnp.asarray(classes)
    if not jnp.issubdtype(classes.dtype, jnp.integer):
        raise ValueError(f"classes must be integer, got {classes.dtype}")
    classes = jnp.broadcast_to(classes, (phi.shape[0],)) if classes.ndim == 0 else classes
    if classes.shape != (phi.shape[0],):
        raise ValueError(f"classes must be a scalar or have shape ({phi.shape[0]},), got {classes.shape}")
    values = concrete(classes)
    if values is not None:
        check_class_range(values, head_weight.shape[1], "classes")
    return jnp.max(phi, axis=(1, 2)) * head_weight.T[classes]


def concept_relevance(phi, head_weight, classes) -> jax.Array:
    """r [N, K] = alpha / max_l |alpha_l| (0 for an image whose concepts are all inactive).

    The largest |alpha| gets exactly +-1: XLA may divide as x * (1 / y), which leaves x / x one ulp
    below 1, and a threshold tau = 1 must still select the top concept.
    """
    alpha = concept_contributions(phi, head_weight, classes)
    scale = jnp.max(jnp.abs(alpha), axis=-1, keepdims=True)
    r = jnp.where(jnp.abs(alpha) == scale, jnp.sign(alpha), alpha / jnp.where(scale > 0, scale, 1.0))
    return jnp.where(scale > 0, r, 0.0)


def predicted_classes(head_fn: Callable[[jax.Array], jax.Array], phi) -> jax.Array:
    """argmax of the interpretable head: the class a relevance explains by default."""
    return jnp.argmax(head_fn(check_phi(phi)), axis=-1).astype(jnp.int32)


def scale_concepts(phi, concept_ids, factors) -> jax.Array:
    """phi with concept concept_ids[n] of image n multiplied by factors[n] (others untouched)."""
    phi = check_phi(phi)
    mask = jax.nn.one_hot(concept_ids, phi.shape[-1], dtype=phi.dtype)  # [N, K]
    scale = 1.0 + mask * (jnp.asarray(factors, phi.dtype)[:, None] - 1.0)
    return phi * scale[:, None, None, :]


def decode_concepts(translator_fn: TranslatorFn, synthesis_fn: SynthesisFn, phi, phi_prime) -> jax.Array:
    """x~ = G(Omega(phi, phi')): the VisCoIN reconstruction from (possibly edited) concepts."""
    return synthesis_fn(translator_fn(phi, phi_prime))


__all__ = ["pooled_concepts", "concept_contributions", "concept_relevance", "predicted_classes",
           "scale_concepts", "decode_concepts"]
