"""VisCoIN concept explanations: relevance, top concepts, concept drawings, top-activating images.

VisCoIN's interpretable head is linear on max-pooled concept maps, so the contribution of concept k
to class c for an image is alpha_k = maxpool(phi_k) * W[k, c]; the relevance r_k = alpha_k /
max_l |alpha_l| lies in [-1, 1]. A concept is drawn by scaling its map phi_k by lambda in
{0, 1, 2, 4} and decoding through the translator and the frozen generator: what appears as lambda
grows is what the concept encodes. Globally, a concept is described by its class-level relevance
and by the training images that activate it most.

Conventions: phi is [N, 3, 3, K] (concepts last), phi_prime [N, 9K], head_weight [K, C],
`translator_fn(phi, phi_prime) -> ws [N, num_ws, w_dim]`, `synthesis_fn(ws) -> images`.

Callables are static arguments of the compiled functions (compilation is cached on their identity;
they must be pure, e.g. frozen models in eval mode), as in `latent_direction`.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..checks import check_class_range, check_phi, check_rgb_images, class_indices
from ..models.concepts import SynthesisFn, TranslatorFn, decode_concepts, pooled_concepts, scale_concepts
from .latent_direction import map_in_chunks

ConceptsFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]

DEFAULT_LAMBDAS = (0.0, 1.0, 2.0, 4.0)


def top_concepts(relevance, k: int) -> tuple[jax.Array, jax.Array]:
    """(relevances [N, k], concept indices [N, k]) of the k most relevant concepts, most relevant first."""
    relevance = jnp.asarray(relevance)
    if relevance.ndim != 2:
        raise ValueError(f"relevance must be [N, K], got shape {relevance.shape}")
    if not 1 <= k <= relevance.shape[1]:
        raise ValueError(f"k must lie in [1, {relevance.shape[1]}], got {k}")
    return jax.lax.top_k(relevance, k)


def concept_visualisation(
    translator_fn: TranslatorFn,
    synthesis_fn: SynthesisFn,
    phi,
    phi_prime,
    concept_ids,
    *,
    lambdas=DEFAULT_LAMBDAS,
    batch_size: int | None = 16,
) -> jax.Array:
    """Draws concepts: images [N, J, L, H, W, 3] decoded with phi_k scaled by each lambda.

    `concept_ids` is [J] (the same concepts for every image) or [N, J] (e.g. each image's top
    concepts). phi_prime is left unchanged. `batch_size` images are synthesised at a time.
    """
    phi = check_phi(phi)
    n, k = phi.shape[0], phi.shape[-1]
    phi_prime = jnp.asarray(phi_prime)
    if phi_prime.shape[0] != n:
        raise ValueError(f"phi_prime has {phi_prime.shape[0]} rows for {n} images")
    ids = np.asarray(concept_ids)
    if not np.issubdtype(ids.dtype, np.integer) or ids.ndim not in (1, 2):
        raise ValueError(f"concept_ids must be an integer [J] or [N, J] array, got {ids.dtype} {ids.shape}")
    if ids.ndim == 1:
        ids = np.broadcast_to(ids, (n, ids.shape[0]))
    if ids.shape[0] != n:
        raise ValueError(f"concept_ids has {ids.shape[0]} rows for {n} images")
    check_class_range(ids.reshape(-1), k, "concept_ids")
    lambdas = np.asarray(lambdas, np.float32)
    if lambdas.ndim != 1 or lambdas.size == 0:
        raise ValueError(f"lambdas must be a non-empty 1-D sequence, got shape {lambdas.shape}")
    return _concept_visualisation(
        translator_fn, synthesis_fn, phi, phi_prime, jnp.asarray(ids, jnp.int32), jnp.asarray(lambdas), batch_size
    )


@functools.partial(jax.jit, static_argnames=("translator_fn", "synthesis_fn", "batch_size"))
def _concept_visualisation(translator_fn, synthesis_fn, phi, phi_prime, ids, lambdas, batch_size):
    n, j, l_ = ids.shape[0], ids.shape[1], lambdas.shape[0]
    # One row per (image, concept, lambda), image-major.
    rows = jnp.repeat(jnp.arange(n), j * l_)
    flat_ids = jnp.repeat(ids.reshape(-1), l_)
    flat_lambdas = jnp.tile(lambdas, n * j)

    def decode(args):
        r, c, lam = args
        edited = scale_concepts(phi[r], c, lam)
        return decode_concepts(translator_fn, synthesis_fn, edited, phi_prime[r])

    images = map_in_chunks(decode, (rows, flat_ids, flat_lambdas), batch_size)
    return images.reshape((n, j, l_) + images.shape[1:])


def class_relevance(relevance, labels, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """Mean relevance per class: (means [C, K], counts [C]); classes without images get NaN rows."""
    relevance = jnp.asarray(relevance)
    if relevance.ndim != 2:
        raise ValueError(f"relevance must be [N, K], got shape {relevance.shape}")
    labels = class_indices(labels, relevance.shape[0], "labels", allow_scalar=False)
    check_class_range(labels, num_classes, "labels")
    labels = jnp.asarray(labels)
    sums = jax.ops.segment_sum(relevance, labels, num_segments=num_classes)
    counts = jnp.bincount(labels, length=num_classes)
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], jnp.nan), counts


# --------------------------------------------------------------------------------------------------
# Streaming top-k activating images per concept


class TopK(NamedTuple):
    """The k best (score, image id) pairs per concept, best first; unfilled slots have id -1, score -inf."""

    scores: jax.Array  # [K, k]
    ids: jax.Array  # [K, k] int32 data-set indices


def topk_init(num_concepts: int, k: int) -> TopK:
    if num_concepts < 1 or k < 1:
        raise ValueError("num_concepts and k must be >= 1")
    return TopK(jnp.full((num_concepts, k), -jnp.inf, jnp.float32), jnp.full((num_concepts, k), -1, jnp.int32))


@jax.jit
def topk_update(state: TopK, scores, ids) -> TopK:
    """Merges a batch (scores [B, K], ids [B]) into the running top-k (earlier images win ties)."""
    k = state.scores.shape[1]
    all_scores = jnp.concatenate([state.scores, scores.T.astype(jnp.float32)], axis=1)
    all_ids = jnp.concatenate([state.ids, jnp.broadcast_to(ids.astype(jnp.int32), scores.T.shape)], axis=1)
    best, where = jax.lax.top_k(all_scores, k)
    return TopK(best, jnp.take_along_axis(all_ids, where, axis=1))


@functools.partial(jax.jit, static_argnames=("concepts_fn",))
def _pooled_scores(concepts_fn, images):
    return pooled_concepts(concepts_fn(images)[0])


def top_activating_images(concepts_fn: ConceptsFn, batches: Iterable, k: int) -> TopK:
    """Top-k images per concept by maxpool(phi_k), streaming over `batches`.

    Each batch is an image array [B, H, W, 3] or a dict with "image" and optionally "index" (data-set
    ids; by default images are numbered in the order seen).
    """
    state, seen = None, 0
    for batch in batches:
        if isinstance(batch, dict):
            if "image" not in batch:
                raise ValueError("a batch dict must have an 'image' entry")
            images, ids = batch["image"], batch.get("index")
        else:
            images, ids = batch, None
        images = check_rgb_images(images)
        b = images.shape[0]
        ids = np.arange(seen, seen + b) if ids is None else np.asarray(ids)
        if ids.shape != (b,):
            raise ValueError(f"batch 'index' must have shape ({b},), got {ids.shape}")
        scores = _pooled_scores(concepts_fn, images)
        if state is None:
            state = topk_init(scores.shape[1], k)
        state = topk_update(state, scores, jnp.asarray(ids, jnp.int32))
        seen += b
    if state is None:
        raise ValueError("batches is empty")
    return state
