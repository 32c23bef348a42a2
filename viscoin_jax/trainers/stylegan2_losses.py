"""StyleGAN2 training losses as pure functions of callables (StyleGAN2-ADA semantics).

- `g_nonsaturating_loss`, `d_logistic_loss`: the non-saturating logistic GAN loss.
- `r1_penalty`: lazy R1 on reals, gamma / 2 * E ||grad_x D(x)||^2, times the lazy interval.
- `path_length_penalty`: lazy path-length regularisation of the synthesis network, differentiable
  (second order) w.r.t. whatever the synthesis callable closes over.
- `sample_mixing_cutoff`, `mix_ws`, `style_mix`: style mixing regularisation on W+ latents.
- `ema_beta`, `ema_update`: the exponential moving average of the generator's parameters.
- `lazy_adam_hparams`: Adam's lr/betas for a lazily regularised network.

Lazy regularisation: the trainer calls a regulariser only every `interval` steps (R1: 16, path
length: 4) and the regulariser multiplies its loss by `interval`, so that on average it has the
weight of an every-step penalty. `interval=1` is the non-lazy form. The caller decides when to
call (e.g. `step % interval == 0`); the functions here never look at the step.

Logits are [N] (a trailing singleton axis, [N, 1], is accepted and dropped).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "g_nonsaturating_loss",
    "d_logistic_loss",
    "r1_penalty",
    "path_length_penalty",
    "sample_mixing_cutoff",
    "mix_ws",
    "style_mix",
    "ema_beta",
    "ema_update",
    "lazy_adam_hparams",
]


def _logits(x, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 1:
        raise ValueError(f"{name} must have shape [N] or [N, 1], got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    return x


def _at_least_f32(x: jax.Array) -> jax.Array:
    """Upcast half precision to float32 (keep float64) before squaring and summing."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_interval(interval) -> None:
    if not isinstance(interval, (int, np.integer)) or isinstance(interval, bool) or interval < 1:
        raise ValueError(f"interval must be a positive integer (1 = not lazy), got {interval!r}")


# --------------------------------------------------------------------------------------------------
# Adversarial losses


def g_nonsaturating_loss(fake_logits) -> jax.Array:
    """Generator loss E[softplus(-D(G(z)))] = -E log sigmoid(D(G(z)))."""
    return jnp.mean(jax.nn.softplus(-_logits(fake_logits, "fake_logits")))


def d_logistic_loss(real_logits, fake_logits) -> jax.Array:
    """Discriminator loss E[softplus(D(G(z)))] + E[softplus(-D(x))] (each mean over its batch)."""
    real = _logits(real_logits, "real_logits")
    fake = _logits(fake_logits, "fake_logits")
    return jnp.mean(jax.nn.softplus(fake)) + jnp.mean(jax.nn.softplus(-real))


# --------------------------------------------------------------------------------------------------
# R1


def r1_penalty(d_fn: Callable[[jax.Array], jax.Array], real_images: jax.Array, *, gamma: float,
               interval: int = 16) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Lazy R1: interval * gamma / 2 * mean_n sum_{hwc} (d sum_m D(x_m) / d x_n)^2.

    `d_fn(images) -> logits [N]` is D with its parameters (and any augmentation) closed over, so
    `jax.grad` of the returned loss w.r.t. those parameters gives the regulariser's gradient.
    Returns (loss, {"r1_penalty": per-sample squared gradient norm [N], "real_logits": [N]}); the
    logits let the caller add D's real loss without a second forward pass.
    """
    _check_interval(interval)
    if getattr(real_images, "ndim", None) != 4:
        raise ValueError(f"real_images must be a 4-D [N, H, W, C] array, got shape {np.shape(real_images)}")
    real_images = jax.lax.stop_gradient(real_images)

    def summed(x):
        logits = _logits(d_fn(x), "d_fn(images)")
        if logits.shape[0] != x.shape[0]:
            raise ValueError(f"d_fn returned {logits.shape[0]} logits for {x.shape[0]} images")
        return jnp.sum(logits), logits

    grads, logits = jax.grad(summed, has_aux=True)(real_images)
    penalty = jnp.sum(jnp.square(_at_least_f32(grads)), axis=(1, 2, 3))
    loss = jnp.mean(penalty) * (gamma / 2.0) * interval
    return loss, {"r1_penalty": penalty, "real_logits": logits}


# --------------------------------------------------------------------------------------------------
# Path length


def path_length_penalty(synthesis_fn: Callable[[jax.Array], jax.Array], ws: jax.Array, key: jax.Array,
                        pl_mean, *, pl_weight: float = 2.0, pl_decay: float = 0.01, interval: int = 4,
                        batch_shrink: int = 1) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Lazy path-length regularisation of `synthesis_fn(ws [N, num_ws, w_dim]) -> images NHWC`.

    With y = noise / sqrt(H * W), noise ~ N(0, I) of the images' shape (drawn from `key`), and
    J = d images / d ws: lengths_n = sqrt(mean_{num_ws} sum_{w_dim} (J^T y)^2). The running mean
    moves by `pl_decay` toward the batch mean, and the penalty is
    interval * pl_weight * mean_n (lengths_n - new_pl_mean)^2. As in the reference, the new mean is
    not detached inside the penalty.

    `synthesis_fn` closes over the generator parameters (and its noise inputs, drawn once); the
    loss is differentiable w.r.t. them (the gradient is second order) and w.r.t. `ws`, so a
    mapping network upstream of `ws` is trained too. `batch_shrink` > 1 regularises only the
    first N // batch_shrink latents. Returns (loss, {"pl_mean": new running mean (no gradient),
    "pl_lengths": [N'], "pl_penalty": [N'] unweighted}).
    """
    _check_interval(interval)
    if getattr(ws, "ndim", None) != 3:
        raise ValueError(f"ws must be a 3-D [N, num_ws, w_dim] array, got shape {np.shape(ws)}")
    if not isinstance(batch_shrink, (int, np.integer)) or batch_shrink < 1:
        raise ValueError(f"batch_shrink must be a positive integer, got {batch_shrink!r}")
    n = ws.shape[0] // batch_shrink
    if n < 1:
        raise ValueError(f"batch_shrink={batch_shrink} leaves no latents out of a batch of {ws.shape[0]}")
    ws = ws[:n]
    pl_mean = _at_least_f32(jnp.asarray(pl_mean))
    if pl_mean.ndim != 0:
        raise ValueError(f"pl_mean must be a scalar, got shape {pl_mean.shape}")

    images, vjp_fn = jax.vjp(synthesis_fn, ws)
    if getattr(images, "ndim", None) != 4 or images.shape[0] != n:
        raise ValueError(f"synthesis_fn must return [N, H, W, C] images for N={n} latents, got {np.shape(images)}")
    h, w = images.shape[1], images.shape[2]
    noise = jax.random.normal(key, images.shape, images.dtype) / math.sqrt(h * w)
    (grads,) = vjp_fn(noise)
    grads = _at_least_f32(grads)
    lengths = jnp.sqrt(jnp.mean(jnp.sum(jnp.square(grads), axis=2), axis=1))
    new_mean = pl_mean + pl_decay * (jnp.mean(lengths) - pl_mean)
    penalty = jnp.square(lengths - new_mean)
    loss = jnp.mean(penalty) * pl_weight * interval
    return loss, {"pl_mean": jax.lax.stop_gradient(new_mean), "pl_lengths": lengths, "pl_penalty": penalty}


# --------------------------------------------------------------------------------------------------
# Style mixing


def sample_mixing_cutoff(key: jax.Array, num_ws: int, prob: float = 0.9) -> jax.Array:
    """One cutoff for the batch: uniform in [1, num_ws) with probability `prob`, else num_ws (no mixing)."""
    if num_ws < 1:
        raise ValueError(f"num_ws must be >= 1, got {num_ws}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    if num_ws == 1:
        return jnp.asarray(num_ws, jnp.int32)
    k_cut, k_apply = jax.random.split(key)
    cutoff = jax.random.randint(k_cut, (), 1, num_ws, dtype=jnp.int32)
    return jnp.where(jax.random.uniform(k_apply, ()) < prob, cutoff, jnp.int32(num_ws))


def mix_ws(ws_a: jax.Array, ws_b: jax.Array, cutoff) -> jax.Array:
    """W+ latents taking layers [0, cutoff) from ws_a and [cutoff, num_ws) from ws_b."""
    if ws_a.shape != ws_b.shape or ws_a.ndim != 3:
        raise ValueError(f"ws_a and ws_b must be equal [N, num_ws, w_dim] arrays, got {ws_a.shape} and {ws_b.shape}")
    layer = jnp.arange(ws_a.shape[1])[None, :, None]
    return jnp.where(layer < cutoff, ws_a, ws_b)


def style_mix(key: jax.Array, ws: jax.Array, mapping_fn: Callable[[jax.Array], jax.Array], z_shape,
              prob: float = 0.9) -> jax.Array:
    """Mix `ws` with the mapping of fresh latents z ~ N(0, I) of `z_shape` beyond a random cutoff.

    `mapping_fn(z) -> ws` must not update w_avg for these extra latents (the reference skips it).
    """
    k_cut, k_z = jax.random.split(key)
    cutoff = sample_mixing_cutoff(k_cut, ws.shape[1], prob)
    other = mapping_fn(jax.random.normal(k_z, tuple(z_shape), jnp.float32))
    return mix_ws(ws, other.astype(ws.dtype), cutoff)


# --------------------------------------------------------------------------------------------------
# EMA of the generator and lazy Adam


def ema_beta(batch_size: int, cur_nimg, *, ema_kimg: float = 10.0, rampup: float | None = 0.05) -> jax.Array:
    """Per-step EMA decay: the half-life is `ema_kimg` thousand images, ramped up as
    min(ema_kimg * 1000, cur_nimg * rampup) early in training (rampup=None disables the ramp).
    `cur_nimg` (images shown so far) may be traced."""
    if batch_size <= 0 or ema_kimg < 0:
        raise ValueError(f"batch_size must be > 0 and ema_kimg >= 0, got {batch_size}, {ema_kimg}")
    ema_nimg = jnp.asarray(ema_kimg * 1000.0, jnp.float32)
    if rampup is not None:
        ema_nimg = jnp.minimum(ema_nimg, jnp.asarray(cur_nimg, jnp.float32) * rampup)
    return jnp.power(0.5, batch_size / jnp.maximum(ema_nimg, 1e-8))


def ema_update(ema_params: Any, params: Any, beta) -> Any:
    """ema <- beta * ema + (1 - beta) * params, leaf by leaf (non-float leaves are copied).

    Works on any pytree (e.g. an `nnx.State` of the generator's `nnx.Param`s). Buffers such as
    w_avg should be copied from the trained generator, not averaged (the reference copies them).
    """
    ema_def = jax.tree_util.tree_structure(ema_params)
    def_ = jax.tree_util.tree_structure(params)
    if ema_def != def_:
        raise ValueError(f"ema_params and params have different structures:\n{ema_def}\nvs\n{def_}")

    def one(e, p):
        if jnp.shape(e) != jnp.shape(p):
            raise ValueError(f"EMA leaf shape {jnp.shape(e)} differs from parameter shape {jnp.shape(p)}")
        if not jnp.issubdtype(jnp.result_type(p), jnp.inexact):
            return p
        b = jnp.asarray(beta, jnp.result_type(p))
        return (p + (e - p) * b).astype(jnp.result_type(e))

    return jax.tree_util.tree_map(one, ema_params, params)


def lazy_adam_hparams(learning_rate: float, beta1: float, beta2: float, interval: int) -> tuple[float, float, float]:
    """Adam's hyper-parameters for a network regularised lazily in a separate optimizer step.

    When the regulariser takes its own optimizer step every `interval` steps (as the reference
    does), there are interval + 1 updates per `interval` main steps; the reference scales lr by
    r = interval / (interval + 1) and raises the betas to the power r to keep the per-image step
    size and averaging horizon. interval=1 means not lazy (regulariser folded into the main loss,
    one update per step) and returns the hyper-parameters unchanged.
    """
    _check_interval(interval)
    if interval == 1:
        return learning_rate, beta1, beta2
    ratio = interval / (interval + 1)
    return learning_rate * ratio, beta1 ** ratio, beta2 ** ratio
