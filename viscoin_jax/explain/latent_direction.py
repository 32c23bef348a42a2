"""Latent directions that change a classifier's decision (Schutte et al. 2021).

A StyleGAN maps latents to images; a classifier f maps images to logits. A direction d in W (or W+)
along which f's prediction changes explains the decision: decoding w + t * d for a series of t shows
what the classifier reacts to. Two ways to find d:

- `gradient_direction`: the normalised mean gradient of the target score with respect to the W+
  latents of the images being explained (local, one backward pass).
- `logistic_regression_direction`: sample z, map to w, generate, label each sample by f's
  prediction and fit a logistic regression of the label on w; d is its normalised coefficient
  (global, the direction of the paper).

`decode_along_direction` draws the series and returns f's probabilities along it.

Conventions: ws is [N, num_ws, w_dim] (W+), images are NHWC float32 in [-1, 1], logits [N, C].
Callables (generator, classifier, ...) are static arguments of the compiled functions: compilation
is cached on their identity, so pass the same function objects to reuse it. Like any function under
`jax.jit`, they must be pure functions of their inputs (frozen models in eval mode; weights they
capture are compiled in as constants).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..checks import check_class_range, check_single_ws, check_ws, class_indices
from ..scores import SCORES, class_score

SynthesisFn = Callable[[jax.Array], jax.Array]
MappingFn = Callable[[jax.Array], jax.Array]
ClassifierFn = Callable[[jax.Array], jax.Array]


def map_in_chunks(fn: Callable, x, batch_size: int | None):
    """Applies a batched fn to x (array or pytree with leading axis N) `batch_size` rows at a time.

    Keeps peak memory bounded (e.g. synthesising hundreds of images) while staying one compiled
    loop (`lax.map`). Pads the last chunk and drops the padding from the result.
    """
    leaves = jax.tree.leaves(x)
    n = leaves[0].shape[0]
    if batch_size is None or batch_size >= n:
        return fn(x)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num_chunks = -(-n // batch_size)
    pad = num_chunks * batch_size - n

    def chunk(a):
        a = jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)], axis=0) if pad else a
        return a.reshape((num_chunks, batch_size) + a.shape[1:])

    out = jax.lax.map(fn, jax.tree.map(chunk, x))
    return jax.tree.map(lambda a: a.reshape((num_chunks * batch_size,) + a.shape[2:])[:n], out)


def _normalise(v: jax.Array, axes) -> jax.Array:
    norm = jnp.sqrt(jnp.sum(v * v, axis=axes, keepdims=True))
    return v / jnp.maximum(norm, jnp.finfo(v.dtype).tiny)


# --------------------------------------------------------------------------------------------------
# (a) gradient direction


@functools.partial(jax.jit, static_argnames=("synthesis_fn", "classifier_fn", "score", "per_sample"))
def _gradient_direction(synthesis_fn, classifier_fn, ws, targets, score, per_sample):
    def total(ws):
        logits = classifier_fn(synthesis_fn(ws))
        return jnp.sum(class_score(logits, targets, score)), jnp.zeros((0, logits.shape[-1]))

    grads, shape_of_c = jax.grad(total, has_aux=True)(ws)  # per-image gradients: images do not interact
    if per_sample:
        return _normalise(grads, (1, 2)), shape_of_c
    return _normalise(jnp.mean(grads, axis=0), (0, 1)), shape_of_c


def gradient_direction(
    synthesis_fn: SynthesisFn,
    classifier_fn: ClassifierFn,
    ws,
    target_class,
    *,
    score: str = "logit",
    per_sample: bool = False,
) -> jax.Array:
    """Unit direction in W+ that increases f's score for `target_class` fastest, at the latents `ws`.

    The gradient of score_c(f(G(ws))) with respect to ws is taken per image; with `per_sample` False
    the gradients are averaged over the batch and the mean is normalised ([num_ws, w_dim]),
    otherwise each image gets its own unit direction ([N, num_ws, w_dim]).
    `score` is "logit" (default), "log_prob" or "prob". A zero gradient gives a zero direction.
    """
    ws = check_ws(ws)
    targets = class_indices(target_class, ws.shape[0])
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    direction, shape_of_c = _gradient_direction(
        synthesis_fn, classifier_fn, ws, jnp.asarray(targets), score, per_sample
    )
    check_class_range(targets, shape_of_c.shape[1])
    return direction


# --------------------------------------------------------------------------------------------------
# (b) logistic-regression direction


class LogisticRegression(NamedTuple):
    coef: jax.Array  # [D]
    intercept: jax.Array  # []
    num_iter: jax.Array  # Newton iterations used
    converged: jax.Array  # bool: gradient norm below tol


_STEP_SIZES = 0.5 ** np.arange(12)  # damped Newton: candidate fractions of the full step


@jax.jit
def _fit_logistic(x, y, l2, max_iter, tol, fit_intercept):
    n, d = x.shape
    # Intercept as the last parameter; when not fitted its column is zero (and it stays 0).
    xa = jnp.concatenate([x, jnp.where(fit_intercept, 1.0, 0.0) * jnp.ones((n, 1), x.dtype)], axis=1)
    penalty = jnp.concatenate([jnp.full((d,), l2, x.dtype), jnp.zeros((1,), x.dtype)])

    def gradient(p):
        return xa.T @ (jax.nn.sigmoid(xa @ p) - y) + penalty * p

    def cond(state):
        _, it, gnorm = state
        return (it < max_iter) & (gnorm > tol * n)

    def body(state):
        p, it, _ = state
        s = jax.nn.sigmoid(xa @ p)
        g = xa.T @ (s - y) + penalty * p
        h = (xa * (s * (1 - s))[:, None]).T @ xa + jnp.diag(penalty)
        # A tiny ridge keeps the Cholesky factorisation defined (unfitted intercept, separable data, l2 = 0).
        h = h + (1e-6 * jnp.mean(jnp.diag(h)) + 1e-12) * jnp.eye(d + 1, dtype=x.dtype)
        step = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(h), g)
        # Take the candidate step size with the lowest objective (t = 0 keeps p: never increases).
        ts = jnp.asarray(np.append(_STEP_SIZES, 0.0), x.dtype)
        candidates = p[None, :] - ts[:, None] * step[None, :]  # [T, d + 1]
        logits = xa @ candidates.T  # [n, T]
        objective = jnp.sum(jnp.logaddexp(0.0, logits) - y[:, None] * logits, axis=0)
        objective = objective + 0.5 * jnp.sum(penalty * candidates**2, axis=1)
        p = candidates[jnp.argmin(objective)]
        g = gradient(p)
        return p, it + 1, jnp.sqrt(jnp.sum(g * g))

    p0 = jnp.zeros((d + 1,), x.dtype)
    g0 = gradient(p0)
    p, it, gnorm = jax.lax.while_loop(cond, body, (p0, 0, jnp.sqrt(jnp.sum(g0 * g0))))
    return LogisticRegression(p[:-1], p[-1], it, gnorm <= tol * n)


def fit_logistic_regression(
    x, y, *, l2: float = 1.0, max_iter: int = 50, tol: float = 1e-4, fit_intercept: bool = True
) -> LogisticRegression:
    """L2-regularised logistic regression by damped Newton's method (no sklearn needed).

    Minimises sum_i [log(1 + exp(s_i)) - y_i s_i] + l2/2 ||coef||^2 with s_i = x_i . coef + b;
    y may be hard {0, 1} labels or soft targets in [0, 1]. The intercept is not penalised.
    Stops when the gradient norm is below tol * M (M samples) or after max_iter Newton steps.
    l2 > 0 keeps the solution finite on separable data (sklearn's default C = 1 is l2 = 1).
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D [M, D] array, got shape {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {y.shape}")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    y_np = np.asarray(y)
    if np.any((y_np < 0) | (y_np > 1)):
        raise ValueError("y must lie in [0, 1]")
    return _fit_logistic(x, y, jnp.float32(l2), max_iter, jnp.float32(tol), fit_intercept)


@functools.partial(
    jax.jit, static_argnames=("mapping_fn", "synthesis_fn", "classifier_fn", "num_samples", "z_dim", "batch_size")
)
def _sample_labelled_latents(mapping_fn, synthesis_fn, classifier_fn, key, num_samples, z_dim, batch_size):
    num_batches = -(-num_samples // batch_size)

    def one(k):
        ws = mapping_fn(jax.random.normal(k, (batch_size, z_dim), jnp.float32))
        return ws, classifier_fn(synthesis_fn(ws))

    ws, logits = jax.lax.map(one, jax.random.split(key, num_batches))
    ws = ws.reshape((num_batches * batch_size,) + ws.shape[2:])[:num_samples]
    logits = logits.reshape((num_batches * batch_size,) + logits.shape[2:])[:num_samples]
    return ws, logits


def sample_labelled_latents(
    mapping_fn: MappingFn,
    synthesis_fn: SynthesisFn,
    classifier_fn: ClassifierFn,
    key: jax.Array,
    *,
    num_samples: int,
    z_dim: int,
    batch_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """Samples z ~ N(0, I), maps to ws and returns (ws [M, num_ws, w_dim], f's logits [M, C]).

    Runs as one compiled loop over batches of `batch_size` (batch b uses key split(key)[b]); only ws
    and logits are kept.
    """
    if num_samples < 1 or z_dim < 1 or batch_size < 1:
        raise ValueError("num_samples, z_dim and batch_size must be >= 1")
    ws, logits = _sample_labelled_latents(mapping_fn, synthesis_fn, classifier_fn, key, num_samples, z_dim, batch_size)
    check_ws(ws, "mapping_fn output")
    return ws, logits


class LatentDirection(NamedTuple):
    direction: jax.Array  # unit vector: [w_dim] for space "w", [num_ws, w_dim] for "w+"
    model: LogisticRegression  # fitted on the (unnormalised) latent features
    accuracy: jax.Array  # training accuracy of the logistic regression
    positive_rate: jax.Array  # fraction of samples f assigned to the target class


def latent_features(ws, space: str = "w") -> jax.Array:
    """Features a direction is fitted on: ws[:, 0] for "w" (all layers equal after mapping), flat W+ for "w+"."""
    ws = check_ws(ws)
    if space == "w":
        return ws[:, 0, :]
    if space == "w+":
        return ws.reshape(ws.shape[0], -1)
    raise ValueError(f"space must be 'w' or 'w+', got {space!r}")


def fit_direction(ws, labels, *, space: str = "w", l2: float = 1.0, max_iter: int = 50) -> LatentDirection:
    """Logistic regression of binary `labels` [M] on the latents; direction = normalised coefficient."""
    ws = check_ws(ws)
    x = latent_features(ws, space)
    y = jnp.asarray(labels, jnp.float32)
    if y.shape != (ws.shape[0],):
        raise ValueError(f"labels must have shape ({ws.shape[0]},), got {y.shape}")
    y_np = np.asarray(y)
    if y_np.min() == y_np.max():
        raise ValueError(
            "all samples have the same label: the classifier never (or always) predicts the target class; "
            "sample more latents or pick another target class"
        )
    model = fit_logistic_regression(x, y, l2=l2, max_iter=max_iter)
    direction = _normalise(model.coef, 0)
    if space == "w+":
        direction = direction.reshape(ws.shape[1:])
    accuracy = jnp.mean(((x @ model.coef + model.intercept) > 0) == (y > 0.5))
    return LatentDirection(direction, model, accuracy, jnp.mean(y))


def logistic_regression_direction(
    mapping_fn: MappingFn,
    synthesis_fn: SynthesisFn,
    classifier_fn: ClassifierFn,
    key: jax.Array,
    target_class: int,
    *,
    num_samples: int,
    z_dim: int,
    batch_size: int = 64,
    space: str = "w",
    l2: float = 1.0,
) -> LatentDirection:
    """The direction of Schutte et al.: sample, generate, label by f (argmax == target_class), fit.

    The returned unit direction points towards the target class. Use `space="w"` (default, the
    paper's choice: a [w_dim] direction applied to every W+ vector) or `"w+"` ([num_ws, w_dim]).
    """
    ws, logits = sample_labelled_latents(
        mapping_fn, synthesis_fn, classifier_fn, key, num_samples=num_samples, z_dim=z_dim, batch_size=batch_size
    )
    if not 0 <= int(target_class) < logits.shape[-1]:
        raise ValueError(f"target_class {target_class} out of range for {logits.shape[-1]} classes")
    labels = jnp.argmax(logits, axis=-1) == target_class
    return fit_direction(ws, labels, space=space, l2=l2)


# --------------------------------------------------------------------------------------------------
# Decoding a series


@functools.partial(jax.jit, static_argnames=("synthesis_fn", "classifier_fn", "batch_size"))
def _decode_along_direction(synthesis_fn, classifier_fn, ws, direction, ts, batch_size):
    series = ws[None] + ts[:, None, None] * direction

    def decode(w):
        images = synthesis_fn(w)
        return images, jax.nn.softmax(classifier_fn(images), axis=-1)

    return map_in_chunks(decode, series, batch_size)


def decode_along_direction(
    synthesis_fn: SynthesisFn,
    classifier_fn: ClassifierFn,
    ws,
    direction,
    ts,
    *,
    batch_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Decodes ws + t * direction for every t in `ts`: returns images [T, H, W, 3] and f's probs [T, C].

    `ws` is one latent ([num_ws, w_dim] or [1, num_ws, w_dim]); `direction` is [w_dim] (added to every
    W+ vector) or [num_ws, w_dim]. `batch_size` bounds how many images are synthesised at once.
    """
    ws = check_single_ws(ws)
    direction = jnp.asarray(direction, ws.dtype)
    if direction.shape not in (ws.shape, ws.shape[1:]):
        raise ValueError(f"direction must have shape {ws.shape[1:]} or {ws.shape}, got {direction.shape}")
    ts = jnp.asarray(ts, ws.dtype)
    if ts.ndim != 1 or ts.shape[0] < 1:
        raise ValueError(f"ts must be a non-empty 1-D array, got shape {ts.shape}")
    return _decode_along_direction(synthesis_fn, classifier_fn, ws, direction, ts, batch_size)
