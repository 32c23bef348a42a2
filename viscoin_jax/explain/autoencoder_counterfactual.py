"""Counterfactuals from an autoencoder (seed 001): encode an image, move its code toward the other
class, decode. The classifier f that is explained decides on the decoded image, so the move is
judged end to end, like the i-ResNet's after re-encoding.

Two moves, as for the i-ResNet (`iresnet_counterfactual` holds the search; here its "head" is
f(decode(code))):
- "class_means": c' = c + alpha (mu_target - mu_source), with the class means of the codes over the
  run's training images and the smallest alpha in [0, max_alpha] at which f gives the target at
  least `confidence` (grid search, then bisection);
- "gradient": normalised gradient steps on CE(f(decode(c)), target) until f does.

Unlike the i-ResNet, the decoder is not an exact inverse: the decoded input (alpha = 0) is the
reconstruction, not the image, so the report measures the changes against both.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..checks import check_class_range, check_rgb_images, class_indices
from . import iresnet_counterfactual as icf

METHODS = ("class_means", "gradient")


class AutoencoderCounterfactuals(NamedTuple):
    images: jax.Array  # [N, H, W, 3] decode(c')
    reconstructions: jax.Array  # [N, H, W, 3] decode(c): the autoencoder's version of the input
    codes: jax.Array  # [N, code_dim] moved codes c'
    source: jax.Array  # [N] f's class of the input
    target: jax.Array  # [N]
    amount: jax.Array  # [N] alpha (class means) or gradient steps
    found: jax.Array  # [N] bool: f gives the target (with the confidence) on decode(c')
    prediction: jax.Array  # [N] f's class of decode(c')
    target_prob: jax.Array  # [N] f's probability of the target on decode(c')


def code_class_means(encode_fn: Callable, images, labels, num_classes: int, *, batch_size: int = 256):
    """(means [C, code_dim], counts [C]) of the codes per class; NaN for a class without images."""
    return icf.class_means(encode_fn, images, labels, num_classes, batch_size=batch_size)


@functools.partial(jax.jit, static_argnames=("encode_fn", "decode_fn", "classifier_fn", "method", "num_alphas",
                                              "bisection_steps", "max_steps", "confidence"))
def _counterfactuals(encode_fn, decode_fn, classifier_fn, images, target, means, *, method, max_alpha, num_alphas,
                     bisection_steps, step_size, max_steps, confidence):
    def head(c):
        return classifier_fn(decode_fn(c))

    codes = encode_fn(images)
    source = jnp.argmax(classifier_fn(images), axis=-1).astype(jnp.int32)
    if method == "class_means":
        moved, amount, found = icf.closed_form_latents(head, codes, source, target, means.astype(codes.dtype),
                                                       max_alpha=max_alpha, num_alphas=num_alphas,
                                                       bisection_steps=bisection_steps, confidence=confidence)
    else:
        moved, amount, found = icf.gradient_latents(head, codes, target, step_size=step_size, max_steps=max_steps,
                                                    confidence=confidence)
    cf = decode_fn(moved)
    logits = classifier_fn(cf)
    prob = jnp.take_along_axis(jax.nn.softmax(logits.astype(jnp.float32), -1), target[:, None], -1)[:, 0]
    return (cf, decode_fn(codes), moved, source, amount, found, jnp.argmax(logits, -1).astype(jnp.int32), prob,
            jnp.zeros((0, logits.shape[-1])))


def counterfactuals(encode_fn: Callable, decode_fn: Callable, classifier_fn: Callable, images, target, *,
                    method: str = "class_means", means=None, max_alpha: float = 4.0, num_alphas: int = 33,
                    bisection_steps: int = 20, step_size: float = 0.25, max_steps: int = 100,
                    confidence: float | None = None) -> AutoencoderCounterfactuals:
    """Counterfactuals of `images` toward `target` (int or [N]) for classifier_fn, through the
    autoencoder (encode_fn, decode_fn); `means` ([C, code_dim], from code_class_means) for
    "class_means". The callables are static arguments of the compiled search (pure, frozen)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    images = check_rgb_images(images)
    n = images.shape[0]
    target = class_indices(target, n, "target")
    if confidence is not None and not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if num_alphas < 2 or max_alpha <= 0:
        raise ValueError("num_alphas must be >= 2 and max_alpha > 0")
    if method == "class_means":
        if means is None:
            raise ValueError("method 'class_means' needs the class means of the codes (see code_class_means)")
        means = jnp.asarray(means)
        if means.ndim != 2:
            raise ValueError(f"means must be [C, code_dim], got shape {means.shape}")
        check_class_range(target, means.shape[0], "target")
    else:
        means = jnp.zeros((1, 1), jnp.float32)
    out = _counterfactuals(encode_fn, decode_fn, classifier_fn, images, jnp.asarray(target), means, method=method,
                           max_alpha=jnp.float32(max_alpha), num_alphas=num_alphas, bisection_steps=bisection_steps,
                           step_size=jnp.float32(step_size), max_steps=max_steps,
                           confidence=None if confidence is None else float(confidence))
    cf, recon, moved, source, amount, found, prediction, prob, classes = out
    check_class_range(target, classes.shape[1], "target")
    if method == "class_means":
        used = np.unique(np.concatenate([np.asarray(source), target]))
        bad = [int(c) for c in used if not np.all(np.isfinite(np.asarray(means[int(c)])))]
        if bad:
            raise ValueError(f"class means of classes {bad} are not finite: those classes had no training images")
    return AutoencoderCounterfactuals(cf, recon, moved, source, jnp.asarray(target), amount, found, prediction, prob)


__all__ = ["METHODS", "AutoencoderCounterfactuals", "code_class_means", "counterfactuals"]
