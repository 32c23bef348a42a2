"""Projection of images into a StyleGAN's W+ space by optimisation.

Finds ws such that synthesis_fn(ws) reproduces a target image, so a real image can be edited or
explained through the generator (latent directions, interpolation, VisCoIN concept editing). The
recipe follows the StyleGAN2 projector: Adam on the latents, a learning rate with a short cosine
ramp-up and a longer cosine ramp-down, and Gaussian noise on the latents early on (decaying
quadratically to zero) to escape poor local minima. Differences: we optimise every W+ vector
separately, use perceptual + pixel (L2) loss, and may start from any initial latents (w_avg, or the
VisCoIN translator's output, which is much closer to the answer).

The whole optimisation is one compiled `lax.scan`; every image in the batch is optimised
independently (the loss is a sum of per-image losses and Adam is element-wise). The callables and
the config are static: compilation is cached on them, so pass the same function objects (pure, frozen
models) to project many batches with one compilation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..checks import check_rgb_images, check_ws

SynthesisFn = Callable[[jax.Array], jax.Array]
PerceptualFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
    """Hyper-parameters of `project` (defaults: the StyleGAN2 projector's).

    learning_rate: peak Adam learning rate. lr_rampup / lr_rampdown: fractions of the run spent in
    the cosine ramp-up / ramp-down. noise_factor: initial noise std on the latents, in units of
    `w_std`; it decays as (1 - t / noise_ramp)^2 and is zero after `noise_ramp` of the run.
    perceptual_weight / pixel_weight: weights of perceptual_fn(image, target) and of the mean
    squared pixel error.
    """

    num_steps: int = 1000
    learning_rate: float = 0.1
    lr_rampup: float = 0.05
    lr_rampdown: float = 0.25
    noise_factor: float = 0.05
    noise_ramp: float = 0.75
    perceptual_weight: float = 1.0
    pixel_weight: float = 1.0
    b1: float = 0.9
    b2: float = 0.999

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        for name in ("learning_rate", "noise_factor", "perceptual_weight", "pixel_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr_rampup", "lr_rampdown", "noise_ramp"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in (0, 1], got {getattr(self, name)}")


def learning_rate_schedule(config: ProjectionConfig) -> Callable[[jax.Array], jax.Array]:
    """lr(step): cosine ramp-up over the first lr_rampup of the run, cosine ramp-down over the last lr_rampdown."""

    def lr(step):
        t = jnp.asarray(step, jnp.float32) / config.num_steps
        ramp = jnp.minimum(1.0, (1.0 - t) / config.lr_rampdown)
        ramp = 0.5 - 0.5 * jnp.cos(ramp * math.pi)
        ramp = ramp * jnp.minimum(1.0, t / config.lr_rampup)
        return config.learning_rate * ramp

    return lr


def noise_schedule(config: ProjectionConfig) -> Callable[[jax.Array], jax.Array]:
    """noise_scale(step) in units of w_std: noise_factor * max(0, 1 - t / noise_ramp)^2."""

    def scale(step):
        t = jnp.asarray(step, jnp.float32) / config.num_steps
        return config.noise_factor * jnp.maximum(0.0, 1.0 - t / config.noise_ramp) ** 2

    return scale


def estimate_w_stats(
    mapping_fn: Callable[[jax.Array], jax.Array],
    key: jax.Array,
    *,
    z_dim: int,
    num_samples: int = 10000,
    batch_size: int = 1000,
) -> tuple[jax.Array, jax.Array]:
    """(w_avg [w_dim], w_std scalar) from mapped samples: the projector's noise scale.

    w_std = sqrt(mean_i ||w_i - w_avg||^2), the RMS distance of a w from the average.
    """
    if num_samples < 2 or batch_size < 1 or z_dim < 1:
        raise ValueError("num_samples must be >= 2, batch_size and z_dim >= 1")
    return _estimate_w_stats(mapping_fn, key, z_dim, num_samples, batch_size)


@functools.partial(jax.jit, static_argnames=("mapping_fn", "z_dim", "num_samples", "batch_size"))
def _estimate_w_stats(mapping_fn, key, z_dim, num_samples, batch_size):
    num_batches = -(-num_samples // batch_size)
    ws = jax.lax.map(
        lambda k: mapping_fn(jax.random.normal(k, (batch_size, z_dim), jnp.float32))[:, 0, :],
        jax.random.split(key, num_batches),
    )
    ws = ws.reshape(-1, ws.shape[-1])[:num_samples]
    avg = jnp.mean(ws, axis=0)
    return avg, jnp.sqrt(jnp.mean(jnp.sum((ws - avg) ** 2, axis=-1)))


class ProjectionResult(NamedTuple):
    ws: jax.Array  # [N, num_ws, w_dim] optimised latents (without the exploration noise)
    images: jax.Array  # [N, H, W, 3] synthesis_fn(ws)
    loss_trace: jax.Array  # [num_steps, N] per-image loss at every step (on the noisy latents)
    final_loss: jax.Array  # [N] per-image loss of the returned ws


def projection_loss(images, target, perceptual_fn: PerceptualFn | None, config: ProjectionConfig) -> jax.Array:
    """Per-image loss [N]: perceptual_weight * perceptual_fn + pixel_weight * mean squared error."""
    if images.shape != target.shape:
        raise ValueError(f"synthesis_fn gives images of shape {images.shape}, the target is {target.shape}")
    loss = config.pixel_weight * jnp.mean((images - target) ** 2, axis=(1, 2, 3))
    if perceptual_fn is not None and config.perceptual_weight > 0:
        loss = loss + config.perceptual_weight * perceptual_fn(images, target)
    return loss


def project(
    synthesis_fn: SynthesisFn,
    target,
    *,
    init_ws=None,
    w_avg=None,
    num_ws: int | None = None,
    w_std: float = 1.0,
    perceptual_fn: PerceptualFn | None = None,
    config: ProjectionConfig = ProjectionConfig(),
    key: jax.Array | None = None,
) -> ProjectionResult:
    """Optimises W+ latents so that synthesis_fn(ws) matches `target` ([N, H, W, 3] in [-1, 1]).

    Start from `init_ws` ([N, num_ws, w_dim], e.g. the VisCoIN translator's output) or, if it is not
    given, from `w_avg` ([w_dim]) repeated num_ws times. `w_std` scales the exploration noise (see
    `estimate_w_stats`); `key` seeds it (default key 0). `perceptual_fn(images, target) -> [N]`
    (e.g. LPIPS) is optional; without it the loss is the pixel L2 term only.
    """
    target = check_rgb_images(target, "target").astype(jnp.float32)
    n = target.shape[0]
    if init_ws is not None:
        ws0 = check_ws(init_ws, "init_ws").astype(jnp.float32)
        if ws0.shape[0] != n:
            raise ValueError(f"init_ws has {ws0.shape[0]} latents for {n} target images")
    else:
        if w_avg is None or num_ws is None:
            raise ValueError("give either init_ws, or both w_avg and num_ws")
        w_avg = jnp.asarray(w_avg, jnp.float32)
        if w_avg.ndim != 1:
            raise ValueError(f"w_avg must be a 1-D [w_dim] array, got shape {w_avg.shape}")
        if num_ws < 1:
            raise ValueError(f"num_ws must be >= 1, got {num_ws}")
        ws0 = jnp.broadcast_to(w_avg, (n, num_ws, w_avg.shape[0]))
    if w_std < 0:
        raise ValueError(f"w_std must be >= 0, got {w_std}")
    key = jax.random.key(0) if key is None else key

    return _project(synthesis_fn, perceptual_fn, config, target, ws0, key, jnp.float32(w_std))


@functools.partial(jax.jit, static_argnames=("synthesis_fn", "perceptual_fn", "config"))
def _project(synthesis_fn, perceptual_fn, config, target, ws0, key, w_std):
    optimizer = optax.adam(learning_rate_schedule(config), b1=config.b1, b2=config.b2)
    noise_scale = noise_schedule(config)

    def step(carry, i):
        ws, opt_state = carry
        if config.noise_factor > 0:
            noise = jax.random.normal(jax.random.fold_in(key, i), ws.shape, ws.dtype) * (w_std * noise_scale(i))
        else:
            noise = jnp.zeros_like(ws)

        def total(ws):
            losses = projection_loss(synthesis_fn(ws + noise), target, perceptual_fn, config)
            return jnp.sum(losses), losses

        grads, losses = jax.grad(total, has_aux=True)(ws)
        updates, opt_state = optimizer.update(grads, opt_state, ws)
        return (optax.apply_updates(ws, updates), opt_state), losses

    (ws, _), trace = jax.lax.scan(step, (ws0, optimizer.init(ws0)), jnp.arange(config.num_steps))
    images = synthesis_fn(ws)
    return ProjectionResult(ws, images, trace, projection_loss(images, target, perceptual_fn, config))
