"""Which class an explanation or a metric scores, and its score: the logit, the softmax probability
or the log-probability of a classifier's output. Shared by explain and metrics so that "score" means
the same thing in an attribution map and in the deletion curve that judges it.

`classifier_fn(images [N, H, W, C] in [-1, 1]) -> logits [N, num_classes]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .checks import check_images, check_targets

SCORES = ("logit", "prob", "log_prob")


def class_score(logits: jax.Array, classes: jax.Array, score: str = "logit") -> jax.Array:
    """[N] score of each sample's class in `classes` ([N] int) from logits [N, C]."""
    if score == "prob":
        logits = jax.nn.softmax(logits, axis=-1)
    elif score == "log_prob":
        logits = jax.nn.log_softmax(logits, axis=-1)
    elif score != "logit":
        raise ValueError(f"unknown score {score!r}; expected one of {SCORES}")
    return jnp.take_along_axis(logits, jnp.asarray(classes)[:, None].astype(jnp.int32), axis=-1)[:, 0]


def num_classes(classifier_fn, images) -> int:
    """C of classifier_fn's [N, C] logits on `images`, from shapes only (no evaluation)."""
    out = jax.eval_shape(classifier_fn, jax.ShapeDtypeStruct(images.shape, images.dtype))
    if not hasattr(out, "shape") or len(out.shape) != 2 or out.shape[0] != images.shape[0]:
        raise ValueError(f"classifier_fn must return logits [N, num_classes] = [{images.shape[0]}, C], "
                         f"got {getattr(out, 'shape', type(out))}")
    return int(out.shape[1])


def prepare_targets(classifier_fn, images, targets):
    """(checked images, checked targets or None): the classes are range-checked against f's output."""
    images = check_images(images)
    if not callable(classifier_fn):
        raise ValueError(f"classifier_fn must be callable, got {type(classifier_fn)}")
    classes = num_classes(classifier_fn, images) if targets is not None else None
    return images, check_targets(targets, images.shape[0], classes)


def resolve_targets(logits, targets):
    """The given targets, or f's argmax when None."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32) if targets is None else targets


__all__ = ["SCORES", "class_score", "num_classes", "prepare_targets", "resolve_targets"]
