"""VisCoIN training loss (Parekh et al., ICLR 2025): output fidelity + reconstruction + regularisers.

    total = alpha * CE(g(x), softmax f(x))                         output fidelity
          + mse * mean (x~ - x)^2 + l1 * mean |x~ - x|             reconstruction, pixel terms
          + beta * mean perceptual(x~, x)                          reconstruction, LPIPS-like
          + gamma * CE(f(x~), softmax f(x))                        reconstruction, classifier output
          + delta * mean |Phi|                                     concept sparsity
          + ortho * (sum |W_n W_n^T| - K) / K^2                    concept orthogonality
          + w_reg * mean (w - w_avg)^2                             stay near the generator's W

Normalisation (chosen to match the per-element means of torch's F.mse_loss / F.l1_loss used by
public VisCoIN code, so that the paper's weights keep their relative scale):
- squared and absolute errors, sparsity and the latent penalty are means over every element
  (batch, pixels / concept cells / latent coordinates); the cross entropies are means over the
  batch of the per-sample soft-label cross entropy; the perceptual term is the mean of
  `perceptual_fn`'s output (per sample or scalar).
- orthogonality: with W the last concept conv's kernel viewed as K rows (one per concept, the
  kernel's last axis is the concept axis, Flax layout [kh, kw, C_in, K]), each row scaled to unit
  L2 norm, the official VisCoIN code's form (sum_ij |W_n W_n^T|_ij - K) / K^2: the mean absolute
  cosine similarity between distinct concepts' weight vectors (the diagonal, all ones, is taken
  out). The paper only says "orthogonality of the normalised weights". An earlier version used the
  squared form ||W_n W_n^T - I||_F^2 / K^2: on Gaussian weights at K = 256, D = 1536 it is 6.4e-4
  (random cosines are ~1/sqrt(D), and squaring shrinks them once more) against 0.020 for the
  absolute form, whose gradient is ~20x larger (measured). `orthogonality_loss(...,
  reduction="sum")` gives sum |W_n W_n^T| - K.

Gradients: the targets (f(x), x, w_avg) are constants. The gamma term is computed here by calling
`classifier_fn(x~)`, so its gradient reaches x~ (and through G and Omega, the concepts): this term
is what makes the concepts faithful, and it must not be computed on a detached reconstruction.
All images are NHWC in [-1, 1], the same range for G's output, the classifier and the losses.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DEFAULT_WEIGHTS",
    "soft_cross_entropy",
    "fidelity_loss",
    "mse_loss",
    "l1_loss",
    "sparsity_loss",
    "orthogonality_loss",
    "w_regularization",
    "viscoin_loss",
]

# Paper's CUB weights; gamma is 0.2 for CelebA-HQ and 0.05 for Stanford Cars, delta 2 for CelebA-HQ.
DEFAULT_WEIGHTS = {
    "alpha": 0.5,  # output fidelity
    "mse": 1.0,
    "l1": 1.0,
    "beta": 3.0,  # perceptual
    "gamma": 0.1,  # classifier output on the reconstruction
    "delta": 0.2,  # sparsity
    "ortho": 1.0,
    "w_reg": 1.0,
}


def _f32(x) -> jax.Array:
    """At least float32 (half precision is upcast, float64 kept) for the reductions."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _logits2d(x, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be [N, num_classes] logits, got shape {x.shape}")
    return x


def soft_cross_entropy(logits, target_logits) -> jax.Array:
    """mean_n -sum_c softmax(target)_nc * log_softmax(logits)_nc; no gradient into the target."""
    logits = _logits2d(logits, "logits")
    target_logits = _logits2d(target_logits, "target_logits")
    if logits.shape != target_logits.shape:
        raise ValueError(f"logits {logits.shape} and target logits {target_logits.shape} differ in shape")
    target = jax.nn.softmax(_f32(jax.lax.stop_gradient(target_logits)), axis=-1)
    log_p = jax.nn.log_softmax(_f32(logits), axis=-1)
    return jnp.mean(-jnp.sum(target * log_p, axis=-1))


def fidelity_loss(g_logits, f_logits) -> jax.Array:
    """Cross entropy of the interpretable head g against the frozen classifier's soft prediction."""
    return soft_cross_entropy(g_logits, f_logits)


def _check_images(x_rec, x) -> None:
    if getattr(x_rec, "ndim", None) != 4 or getattr(x, "ndim", None) != 4:
        raise ValueError(f"images must be [N, H, W, C], got {np.shape(x_rec)} and {np.shape(x)}")
    if x_rec.shape != x.shape:
        raise ValueError(f"reconstruction {x_rec.shape} and image {x.shape} differ in shape")


def mse_loss(x_rec, x) -> jax.Array:
    """Mean over all elements of (x~ - x)^2."""
    _check_images(x_rec, x)
    return jnp.mean(jnp.square(_f32(x_rec) - _f32(jax.lax.stop_gradient(x))))


def l1_loss(x_rec, x) -> jax.Array:
    """Mean over all elements of |x~ - x|."""
    _check_images(x_rec, x)
    return jnp.mean(jnp.abs(_f32(x_rec) - _f32(jax.lax.stop_gradient(x))))


def sparsity_loss(phi) -> jax.Array:
    """Mean |Phi| over batch, concepts and spatial cells (Phi >= 0 after ReLU, so the mean activation)."""
    phi = jnp.asarray(phi)
    if phi.ndim < 2:
        raise ValueError(f"phi must be batched concept maps, e.g. [N, 3, 3, K], got shape {phi.shape}")
    return jnp.mean(jnp.abs(_f32(phi)))


def orthogonality_loss(concept_weight, *, reduction: str = "mean", eps: float = 1e-12) -> jax.Array:
    """(sum |W_n W_n^T| - K) over the K unit-normalised concept rows (divided by K^2 for "mean").

    The official VisCoIN form: the summed absolute cosine similarity of distinct concepts' weights.
    `concept_weight`: the concept conv's kernel with concepts on the LAST axis ([kh, kw, C_in, K]
    in Flax, or [C_in, K]); row k is the flattened kernel producing concept k.
    """
    w = jnp.asarray(concept_weight)
    if w.ndim < 2:
        raise ValueError(f"concept_weight must have the concept axis last and >= 2 dims, got shape {w.shape}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    k = w.shape[-1]
    rows = _f32(w.reshape(-1, k).T)  # [K, D]
    norms = jnp.sqrt(jnp.sum(jnp.square(rows), axis=1, keepdims=True))
    rows = rows / jnp.maximum(norms, eps)
    gram = jnp.matmul(rows, rows.T, precision=jax.lax.Precision.HIGHEST)
    # the diagonal is 1 for every non-zero row; subtracting |diag| rather than K keeps an all-zero
    # concept (diagonal 0) from giving a negative loss
    total = jnp.sum(jnp.abs(gram)) - jnp.sum(jnp.abs(jnp.diagonal(gram)))
    return total / (k * k) if reduction == "mean" else total


def w_regularization(ws, w_avg) -> jax.Array:
    """Mean over all elements of (w - w_avg)^2; w_avg is [w_dim] or [num_ws, w_dim] (a constant)."""
    ws = jnp.asarray(ws)
    w_avg = jnp.asarray(w_avg)
    if ws.ndim != 3:
        raise ValueError(f"ws must be [N, num_ws, w_dim], got shape {ws.shape}")
    if w_avg.shape not in ((ws.shape[2],), ws.shape[1:]):
        raise ValueError(f"w_avg must be [w_dim] or [num_ws, w_dim] for ws {ws.shape}, got {w_avg.shape}")
    return jnp.mean(jnp.square(_f32(ws) - _f32(jax.lax.stop_gradient(w_avg))))


def _weights(weights) -> dict[str, float]:
    if weights is None:
        return dict(DEFAULT_WEIGHTS)
    if hasattr(weights, "to_dict"):  # ml_collections.ConfigDict
        weights = weights.to_dict()
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights must be a mapping of loss-term weights, got {type(weights).__name__}")
    unknown = sorted(set(weights) - set(DEFAULT_WEIGHTS))
    if unknown:
        raise ValueError(f"unknown VisCoIN loss weights {unknown}; known: {sorted(DEFAULT_WEIGHTS)}")
    merged = dict(DEFAULT_WEIGHTS)
    merged.update(weights)
    return merged


def _require(mapping: Mapping, key: str, name: str):
    if key not in mapping:
        raise ValueError(f"{name} is missing {key!r} (has {sorted(mapping)})")
    return mapping[key]


def viscoin_loss(outputs: Mapping[str, Any], targets: Mapping[str, Any], weights=None,
                 perceptual_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
                 classifier_fn: Callable[[jax.Array], jax.Array] | None = None,
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The full VisCoIN objective and each of its terms (unweighted) for logging.

    outputs: "g_logits" [N, C] (interpretable head), "reconstruction" x~ [N, H, W, 3] (G(Omega(.))),
        "phi" concept maps (e.g. [N, 3, 3, K]), "ws" [N, num_ws, w_dim] (Omega's W+ output, w_avg
        included), "concept_weight" (the concept conv kernel, concepts last; only needed when
        the "ortho" weight is non-zero).
    targets: "image" x [N, H, W, 3], "f_logits" f(x) [N, C], "w_avg" [w_dim].
    weights: mapping or ConfigDict with any of DEFAULT_WEIGHTS' keys (missing ones take the
        defaults; unknown keys are an error).
    perceptual_fn(x~, x) -> [N] or scalar distance (LPIPS); needed when beta != 0.
    classifier_fn(images) -> [N, C] logits of the frozen f; needed when gamma != 0.
    A term whose weight is 0 and whose inputs are missing is reported as 0.
    Returns (total, terms) with terms: fidelity, mse, l1, perceptual, reconstruction_ce, sparsity,
    orthogonality, w_reg (unweighted), reconstruction (the weighted reconstruction sum), total.
    """
    w = _weights(weights)
    zero = jnp.zeros((), jnp.float32)
    terms: dict[str, jax.Array] = {}

    x_rec = _require(outputs, "reconstruction", "outputs")
    x = _require(targets, "image", "targets")
    f_logits = _require(targets, "f_logits", "targets")
    if jnp.shape(f_logits)[0] != x.shape[0]:
        raise ValueError(f"f_logits has {jnp.shape(f_logits)[0]} rows for a batch of {x.shape[0]} images")

    terms["fidelity"] = fidelity_loss(_require(outputs, "g_logits", "outputs"), f_logits)
    terms["mse"] = mse_loss(x_rec, x)
    terms["l1"] = l1_loss(x_rec, x)

    if perceptual_fn is not None:
        terms["perceptual"] = jnp.mean(_f32(perceptual_fn(x_rec, jax.lax.stop_gradient(x))))
    elif w["beta"] != 0:
        raise ValueError("perceptual_fn is required when the 'beta' weight is non-zero")
    else:
        terms["perceptual"] = zero

    if classifier_fn is not None:
        rec_logits = classifier_fn(x_rec)  # gradient flows into x~: this is the point of the term
        terms["reconstruction_ce"] = soft_cross_entropy(rec_logits, f_logits)
    elif w["gamma"] != 0:
        raise ValueError("classifier_fn is required when the 'gamma' weight is non-zero")
    else:
        terms["reconstruction_ce"] = zero

    terms["sparsity"] = sparsity_loss(_require(outputs, "phi", "outputs"))

    if "concept_weight" in outputs:
        terms["orthogonality"] = orthogonality_loss(outputs["concept_weight"])
    elif w["ortho"] != 0:
        raise ValueError("outputs must hold 'concept_weight' when the 'ortho' weight is non-zero")
    else:
        terms["orthogonality"] = zero

    terms["w_reg"] = w_regularization(_require(outputs, "ws", "outputs"), _require(targets, "w_avg", "targets"))

    terms["reconstruction"] = (w["mse"] * terms["mse"] + w["l1"] * terms["l1"]
                               + w["beta"] * terms["perceptual"] + w["gamma"] * terms["reconstruction_ce"])
    total = (w["alpha"] * terms["fidelity"] + terms["reconstruction"] + w["delta"] * terms["sparsity"]
             + w["ortho"] * terms["orthogonality"] + w["w_reg"] * terms["w_reg"])
    terms["total"] = total
    return total, terms
