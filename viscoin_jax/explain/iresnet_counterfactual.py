"""Counterfactuals from an invertible classifier (ECINN, Hvilshoj et al. 2021).

An i-ResNet encodes an image x to z = encode(x) (same information, invertible) and classifies z with
a head. Moving z towards another class and inverting gives an image the classifier would assign to
that class, with no generator involved. Two moves:

- closed form: z' = z + alpha (mu_target - mu_source) with class means mu of z over a data set;
  alpha is the smallest value (grid search then bisection) at which the head decides the target.
- gradient steps on the head: z <- z - step * grad_z CE(head(z), target) until the head decides
  the target (each sample stops as soon as it does).

The inverse is a fixed-point iteration, so each counterfactual reports whether it converged; and
validity is checked end to end: the i-ResNet is re-run on the inverted image. A z' exactly on the
decision boundary flips back after inversion and re-encoding (z moves by ~1 % through the inverse's
residual error), so both moves can aim past it: with `confidence` (e.g. 0.9) the head must give the
target at least that probability at z', not just its argmax.

Callables are static arguments of the compiled functions (compilation is cached on their identity;
they must be pure, e.g. frozen models in eval mode), as in `latent_direction`.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..checks import check_class_range, check_rgb_images, class_indices

EncodeFn = Callable[[jax.Array], jax.Array]
HeadFn = Callable[[jax.Array], jax.Array]
InverseFn = Callable[[jax.Array], tuple[jax.Array, dict]]


def class_means(
    encode_fn: EncodeFn, images, labels, num_classes: int, *, batch_size: int = 256
) -> tuple[jax.Array, jax.Array]:
    """Per-class mean of z = encode_fn(x) over a data set: (means [C, *z_shape], counts [C]).

    Streams over `batch_size` images at a time (one compiled step). A class with no image gets a
    NaN mean, so using it downstream raises instead of silently moving towards zero.
    """
    images = check_rgb_images(images)
    labels = class_indices(labels, images.shape[0], "labels", allow_scalar=False)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    check_class_range(labels, num_classes, "labels")

    sums, counts = None, None
    for start in range(0, images.shape[0], batch_size):
        batch = slice(start, start + batch_size)
        s, c = _class_sums(encode_fn, images[batch], jnp.asarray(labels[batch]), num_classes)
        sums, counts = (s, c) if sums is None else (sums + s, counts + c)
    shape = (num_classes,) + (1,) * (sums.ndim - 1)
    means = jnp.where(counts.reshape(shape) > 0, sums / jnp.maximum(counts, 1).reshape(shape), jnp.nan)
    return means, counts


@functools.partial(jax.jit, static_argnames=("encode_fn", "num_classes"))
def _class_sums(encode_fn, x, y, num_classes):
    z = encode_fn(x)
    sums = jax.ops.segment_sum(z.astype(jnp.float32), y, num_segments=num_classes)
    return sums, jnp.bincount(y, length=num_classes)


def _decides(head_fn, z, target, confidence=None):
    """argmax head(z) == target and, with `confidence`, softmax(head(z))[target] >= confidence."""
    logits = head_fn(z)
    ok = jnp.argmax(logits, axis=-1) == target
    if confidence is None:
        return ok
    p = jnp.take_along_axis(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), target[:, None], axis=-1)[:, 0]
    return ok & (p >= confidence)


def closed_form_latents(
    head_fn: HeadFn,
    z: jax.Array,
    source: jax.Array,
    target: jax.Array,
    means: jax.Array,
    *,
    max_alpha: float = 4.0,
    num_alphas: int = 33,
    bisection_steps: int = 20,
    confidence=None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """z' = z + alpha (mu_target - mu_source) with the smallest alpha in [0, max_alpha] deciding target
    (with `confidence`: giving the target at least that probability).

    Pure and jit-able. Returns (z' , alpha [N], found [N]). The first grid point (of `num_alphas`)
    at which head_fn decides the target is refined by bisection against the grid point before it,
    so alpha is within max_alpha / (num_alphas - 1) / 2**bisection_steps of the decision boundary
    (on the target side). Where no grid point decides the target, alpha = max_alpha, found = False.
    """
    step = means[target] - means[source]
    bshape = (-1,) + (1,) * (z.ndim - 1)
    alphas = jnp.linspace(0.0, max_alpha, num_alphas, dtype=z.dtype)

    hits = jax.lax.map(lambda a: _decides(head_fn, z + a * step, target, confidence), alphas)  # [A, N]
    found = jnp.any(hits, axis=0)
    first = jnp.argmax(hits, axis=0)
    hi = jnp.where(found, alphas[first], max_alpha)
    lo = jnp.where(first > 0, alphas[jnp.maximum(first - 1, 0)], 0.0)
    refine = found & (first > 0)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        ok = _decides(head_fn, z + mid.reshape(bshape) * step, target, confidence)
        return jnp.where(refine & ~ok, mid, lo), jnp.where(refine & ok, mid, hi)

    lo, hi = jax.lax.fori_loop(0, bisection_steps, bisect, (lo, hi))
    return z + hi.reshape(bshape) * step, hi, found


def gradient_latents(
    head_fn: HeadFn,
    z: jax.Array,
    target: jax.Array,
    *,
    step_size: float = 0.1,
    max_steps: int = 100,
    normalize: bool = True,
    confidence=None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradient descent on CE(head(z), target) until the head decides the target; pure and jit-able.

    Each sample stops as soon as argmax head(z) == target (and, with `confidence`, the target's
    probability reaches it). With `normalize` every step has length
    `step_size` (the gradient divided by its norm); otherwise it is step_size * gradient.
    Returns (z', steps taken [N], found [N]).
    """
    axes = tuple(range(1, z.ndim))
    bshape = (-1,) + (1,) * (z.ndim - 1)

    def loss(z):
        logp = jax.nn.log_softmax(head_fn(z), axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, target[:, None], axis=-1))

    def body(carry, _):
        z, steps = carry
        done = _decides(head_fn, z, target, confidence)
        g = jax.grad(loss)(z)
        if normalize:
            g = g / jnp.maximum(jnp.sqrt(jnp.sum(g * g, axis=axes, keepdims=True)), jnp.finfo(g.dtype).tiny)
        z = jnp.where(done.reshape(bshape), z, z - step_size * g)
        return (z, steps + (~done).astype(jnp.int32)), None

    (z, steps), _ = jax.lax.scan(body, (z, jnp.zeros(z.shape[0], jnp.int32)), None, length=max_steps)
    return z, steps, _decides(head_fn, z, target, confidence)


class Counterfactuals(NamedTuple):
    images: jax.Array  # [N, H, W, 3] inverse_fn(z')
    z: jax.Array  # [N, ...] moved latents
    source: jax.Array  # [N] class moved away from
    target: jax.Array  # [N] requested class
    amount: jax.Array  # [N] alpha (closed form) or number of gradient steps
    latent_valid: jax.Array  # [N] bool: head decides the target at z'
    converged: jax.Array  # [N] bool: the inverse's fixed-point iteration converged
    prediction: jax.Array  # [N] argmax head(encode(image)): the i-ResNet re-run on the counterfactual
    valid: jax.Array  # [N] bool: prediction == target
    inverse_info: dict  # everything inverse_fn reported
    target_prob: jax.Array  # [N] the i-ResNet's probability of the target on the counterfactual image
    latent_drift: jax.Array  # [N] ||encode(image) - z'|| / ||z'||: how far inverting and re-encoding moves z'


_METHODS = ("closed_form", "gradient")


def _check_finite_means(means, classes):
    bad = [int(c) for c in np.unique(classes) if not np.all(np.isfinite(np.asarray(means[int(c)])))]
    if bad:
        raise ValueError(f"class means of classes {bad} are not finite: those classes had no images in class_means")


@functools.partial(
    jax.jit,
    static_argnames=("encode_fn", "head_fn", "inverse_fn", "method", "num_alphas", "bisection_steps", "max_steps",
                     "normalize", "confidence"),
)
def _counterfactuals(encode_fn, head_fn, inverse_fn, images, tgt, source, means, *, method, max_alpha, num_alphas,
                     bisection_steps, step_size, max_steps, normalize, confidence):
    z = encode_fn(images)
    logits = head_fn(z)
    src = jnp.argmax(logits, axis=-1).astype(jnp.int32) if source is None else source
    if method == "closed_form":
        if means.shape[1:] != z.shape[1:]:
            raise ValueError(f"means have latent shape {means.shape[1:]}, encode_fn gives {z.shape[1:]}")
        z_cf, amount, ok = closed_form_latents(
            head_fn, z, src, tgt, means.astype(z.dtype),
            max_alpha=max_alpha, num_alphas=num_alphas, bisection_steps=bisection_steps, confidence=confidence,
        )
    else:
        z_cf, amount, ok = gradient_latents(head_fn, z, tgt, step_size=step_size, max_steps=max_steps,
                                            normalize=normalize, confidence=confidence)
    x_cf, info = inverse_fn(z_cf)
    z_back = encode_fn(x_cf)
    logits_back = head_fn(z_back)
    prediction = jnp.argmax(logits_back, axis=-1).astype(jnp.int32)
    target_prob = jnp.take_along_axis(jax.nn.softmax(logits_back.astype(jnp.float32), -1), tgt[:, None], -1)[:, 0]
    axes = tuple(range(1, z.ndim))
    size = jnp.sqrt(jnp.sum(jnp.square(z_cf), axis=axes))
    drift = jnp.sqrt(jnp.sum(jnp.square(z_back - z_cf), axis=axes)) / jnp.maximum(size, jnp.finfo(z.dtype).tiny)
    return (x_cf, z_cf, src, tgt, amount, ok, info, prediction, jnp.zeros((0, logits.shape[-1])), target_prob,
            drift)


def counterfactuals(
    encode_fn: EncodeFn,
    head_fn: HeadFn,
    inverse_fn: InverseFn,
    images,
    target,
    *,
    method: str = "closed_form",
    means=None,
    source=None,
    max_alpha: float = 4.0,
    num_alphas: int = 33,
    bisection_steps: int = 20,
    step_size: float = 0.1,
    max_steps: int = 100,
    normalize: bool = True,
    confidence: float | None = None,
) -> Counterfactuals:
    """ECINN counterfactuals for a batch: encode, move z towards `target`, invert, re-classify.

    `method` "closed_form" needs `means` ([C, *z_shape], from `class_means`); `source` ([N] or scalar)
    defaults to the head's prediction on the input. "gradient" uses `step_size`, `max_steps`,
    `normalize` (see `gradient_latents`). `confidence` (in (0, 1)) aims past the decision boundary:
    the move stops where the head gives the target at least that probability. `inverse_fn(z)` must
    return (x, info) with info["converged"] a bool [N].
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    images = check_rgb_images(images)
    n = images.shape[0]
    target = class_indices(target, n, "target")
    source = None if source is None else class_indices(source, n, "source")
    if method == "closed_form":
        if means is None:
            raise ValueError("method 'closed_form' needs the class means (see class_means)")
        means = jnp.asarray(means)
        check_class_range(target, means.shape[0], "target")
        used = target if source is None else np.concatenate([target, source])
        if source is not None:
            check_class_range(source, means.shape[0], "source")
        _check_finite_means(means, used)
    if num_alphas < 2 or max_alpha <= 0:
        raise ValueError("num_alphas must be >= 2 and max_alpha > 0")
    if confidence is not None and not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")

    out = _counterfactuals(
        encode_fn, head_fn, inverse_fn, images, jnp.asarray(target),
        None if source is None else jnp.asarray(source), means,
        method=method, max_alpha=jnp.float32(max_alpha), num_alphas=num_alphas, bisection_steps=bisection_steps,
        step_size=jnp.float32(step_size), max_steps=max_steps, normalize=normalize,
        confidence=None if confidence is None else float(confidence),
    )
    x_cf, z_cf, src, tgt, amount, ok, info, prediction, shape_of_c, target_prob, drift = out
    check_class_range(target, shape_of_c.shape[1], "target")
    if not isinstance(info, dict) or "converged" not in info:
        raise ValueError("inverse_fn must return (images, info) with info['converged'] a bool [N] array")
    converged = jnp.asarray(info["converged"], bool)
    if converged.shape != (n,):
        raise ValueError(f"inverse_fn info['converged'] must have shape ({n},), got {converged.shape}")
    if method == "closed_form":
        _check_finite_means(means, np.asarray(src))
    return Counterfactuals(x_cf, z_cf, src, tgt, amount, ok, converged, prediction, prediction == tgt, info,
                           target_prob, drift)
