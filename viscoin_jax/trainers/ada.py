"""Adaptive discriminator augmentation (ADA, Karras et al. 2020) for NHWC images in [-1, 1].

The same augmentation is applied to the real and the generated images that the discriminator
sees, with one probability `p` per transform and per sample; `p` is tuned during training from the
sign of D's output on reals (`update_p`). Everything is a pure function of a PRNG key, so it runs
under `jax.jit` with `p` traced, and it is differentiable w.r.t. the images (the generator is
trained through it).

Transforms (the StyleGAN2-ADA order and distributions; each is applied with probability
`strength * p`, where `strength` is the `AugmentConfig` field of the same name):
- pixel blitting: x-flip, rotation by a multiple of 90 degrees, integer translation by up to
  `xint_max` of the image size with reflect padding. Executed as one exact gather per sample
  (no resampling, so no filtering of the image at all).
- colour: brightness (add N(0, 0.2)), contrast (scale by 2^N(0, 0.5)), luma flip, hue rotation
  (uniform angle in [-pi, pi] * hue_max about the grey axis), saturation (scale the chroma by
  2^N(0, 1)). Composed into one 4x4 per-sample colour matrix, as the reference does.

Not implemented: the reference's non-integer geometric transforms (isotropic/anisotropic
scaling, arbitrary rotation, fractional translation), image-space filtering, additive noise and
cutout. Their presets ("geom", "bgc", ...) are rejected by `AugmentConfig.from_preset` with an
error rather than silently falling back; "bc" (blit + colour, also `AugmentConfig()`'s defaults)
is the closest to the reference's default "bgc". rotate90 needs square images.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "AugmentConfig",
    "AugmentParams",
    "AdaState",
    "sample_augment_params",
    "apply_augment",
    "augment",
    "color_matrix",
    "update_p",
    "ada_observe",
    "ada_adjust",
]

_LUMA_AXIS = np.array([1.0, 1.0, 1.0], np.float64) / math.sqrt(3.0)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Per-transform strengths (multipliers of p) and the distributions' parameters."""

    xflip: float = 1.0
    rotate90: float = 1.0
    xint: float = 1.0
    brightness: float = 1.0
    contrast: float = 1.0
    lumaflip: float = 1.0
    hue: float = 1.0
    saturation: float = 1.0
    xint_max: float = 0.125
    brightness_std: float = 0.2
    contrast_std: float = 0.5  # in log2 units: contrast factor = 2^N(0, 0.5)
    hue_max: float = 1.0  # fraction of a half turn
    saturation_std: float = 1.0  # in log2 units

    _PRESETS = {
        "blit": dict(xflip=1, rotate90=1, xint=1),
        "color": dict(brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1),
        "bc": dict(xflip=1, rotate90=1, xint=1, brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1),
    }
    _UNSUPPORTED = ("geom", "filter", "noise", "cutout", "bg", "bgc", "bgcf", "bgcfn", "bgcfnc")

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"AugmentConfig.{field.name} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"AugmentConfig.{field.name} must be >= 0, got {value}")
        if self.xint_max > 0.5:
            raise ValueError(f"AugmentConfig.xint_max must be <= 0.5 (a fraction of the size), got {self.xint_max}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "AugmentConfig":
        """'blit' (flip, rot90, int translation), 'color', or 'bc' (both). Unlisted fields are 0."""
        if name in cls._UNSUPPORTED:
            raise ValueError(
                f"augment preset {name!r} needs transforms this module does not implement (non-integer "
                f"geometry, filtering, noise or cutout); supported presets: {sorted(cls._PRESETS)}"
            )
        if name not in cls._PRESETS:
            raise ValueError(f"unknown augment preset {name!r}; supported presets: {sorted(cls._PRESETS)}")
        strengths = {k: 0.0 for k in ("xflip", "rotate90", "xint", "brightness", "contrast", "lumaflip", "hue",
                                      "saturation")}
        strengths.update({k: float(v) for k, v in cls._PRESETS[name].items()})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown AugmentConfig fields {unknown}; known: {sorted(known)}")
        strengths.update(overrides)
        return cls(**strengths)

    @property
    def uses_geometry(self) -> bool:
        return self.xflip > 0 or self.rotate90 > 0 or self.xint > 0

    @property
    def uses_color(self) -> bool:
        return any(getattr(self, k) > 0 for k in ("brightness", "contrast", "lumaflip", "hue", "saturation"))


class AugmentParams(NamedTuple):
    """Per-sample parameters of one augmentation draw (identity values where not applied)."""

    xflip: jax.Array  # [N] int32 in {0, 1}
    rotate90: jax.Array  # [N] int32 in {0, 1, 2, 3}: counter-clockwise quarter turns (np.rot90's k)
    translate: jax.Array  # [N, 2] int32 (tx, ty) in pixels: content moves right / down
    brightness: jax.Array  # [N] float32, added
    contrast: jax.Array  # [N] float32, multiplier
    lumaflip: jax.Array  # [N] float32 in {0, 1}
    hue: jax.Array  # [N] float32, angle in radians about the grey axis
    saturation: jax.Array  # [N] float32, chroma multiplier


def _check_images(images) -> None:
    if getattr(images, "ndim", None) != 4:
        raise ValueError(f"images must be a 4-D [N, H, W, C] array, got shape {np.shape(images)}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be floating point (in [-1, 1]), got {images.dtype}")
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels (NHWC), got shape {images.shape}")


def _check_p(p) -> jax.Array:
    p = jnp.asarray(p)
    if p.ndim != 0:
        raise ValueError(f"p must be a scalar, got shape {p.shape}")
    return p.astype(jnp.float32)


def sample_augment_params(key: jax.Array, shape, p, config: AugmentConfig = AugmentConfig()) -> AugmentParams:
    """Draw every per-sample parameter for images of `shape` = (N, H, W, C)."""
    if len(shape) != 4:
        raise ValueError(f"shape must be (N, H, W, C), got {shape}")
    n, h, w, _ = (int(d) for d in shape)
    if config.rotate90 > 0 and h != w:
        raise ValueError(f"rotate90 needs square images, got H={h}, W={w}; set AugmentConfig.rotate90=0")
    strengths = jnp.array([getattr(config, name) for name in _STRENGTHS], jnp.float32)
    dist = jnp.array([config.xint_max * w, config.xint_max * h, config.brightness_std, config.contrast_std,
                      config.hue_max, config.saturation_std], jnp.float32)
    return _sample(key, _check_p(p), strengths, dist, n)


_STRENGTHS = ("xflip", "rotate90", "xint", "brightness", "contrast", "lumaflip", "hue", "saturation")


@functools.partial(jax.jit, static_argnames=("n",))
def _sample(key: jax.Array, p: jax.Array, strengths: jax.Array, dist: jax.Array, n: int) -> AugmentParams:
    """Only the batch size is static, so one compilation serves every config and image size."""
    # One PRNG draw for everything (each random-bits call site costs compile time): uniforms for
    # the gates and the uniform/discrete values, and standard normals from uniforms by the inverse
    # CDF (as jax.random.normal does).
    u = jax.random.uniform(key, (17, n))
    v = jnp.clip(u[14:] * 2.0 - 1.0, jnp.nextafter(jnp.float32(-1.0), jnp.float32(0.0)), 1.0)
    z = jnp.sqrt(2.0) * jax.lax.erf_inv(v)
    gates = {name: u[i] < strengths[i] * p for i, name in enumerate(_STRENGTHS)}
    max_tx, max_ty, brightness_std, contrast_std, hue_max, saturation_std = (dist[i] for i in range(6))

    def gate(name, value, identity):
        # Apply `value` with probability strength * p, else the identity (the reference's rule).
        apply = gates[name].reshape((n,) + (1,) * (jnp.ndim(value) - 1))
        return jnp.where(apply, value, identity)

    xflip = gate("xflip", jnp.floor(u[8] * 2.0), 0.0)
    rotate90 = gate("rotate90", jnp.floor(u[9] * 4.0), 0.0)
    # Translation in pixels: round(uniform(-1, 1) * xint_max * size), as the reference.
    t = jnp.stack([(u[10] * 2.0 - 1.0) * max_tx, (u[11] * 2.0 - 1.0) * max_ty], axis=1)
    translate = gate("xint", jnp.round(t), 0.0)
    brightness = gate("brightness", z[0] * brightness_std, 0.0)
    contrast = gate("contrast", jnp.exp2(z[1] * contrast_std), 1.0)
    lumaflip = gate("lumaflip", jnp.floor(u[12] * 2.0), 0.0)
    hue = gate("hue", (u[13] * 2.0 - 1.0) * jnp.pi * hue_max, 0.0)
    saturation = gate("saturation", jnp.exp2(z[2] * saturation_std), 1.0)
    return AugmentParams(
        xflip=xflip.astype(jnp.int32), rotate90=rotate90.astype(jnp.int32), translate=translate.astype(jnp.int32),
        brightness=brightness.astype(jnp.float32), contrast=contrast.astype(jnp.float32),
        lumaflip=lumaflip.astype(jnp.float32), hue=hue.astype(jnp.float32),
        saturation=saturation.astype(jnp.float32),
    )


# --------------------------------------------------------------------------------------------------
# Colour


@jax.jit
def color_matrix(params: AugmentParams) -> jax.Array:
    """[N, 4, 4] homogeneous colour matrices, composed in the reference's order.

    C = S_sat @ R_hue @ H_lumaflip @ S_contrast @ T_brightness, acting on (r, g, b, 1) columns.
    Identity parameters give the identity matrix exactly (so p = 0 changes nothing).
    """
    n = params.brightness.shape[0]
    v = jnp.asarray(_LUMA_AXIS, jnp.float32)
    vv = jnp.outer(v, v)
    eye3 = jnp.eye(3, dtype=jnp.float32)

    def homogeneous(m3, t3=None):
        top = jnp.concatenate([m3, jnp.zeros((n, 3, 1), jnp.float32) if t3 is None else t3[:, :, None]], axis=2)
        bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 0.0, 1.0], jnp.float32), (n, 1, 4))
        return jnp.concatenate([top, bottom], axis=1)

    b = params.brightness
    bright = homogeneous(jnp.broadcast_to(eye3, (n, 3, 3)), jnp.stack([b, b, b], axis=1))
    contrast = homogeneous(params.contrast[:, None, None] * eye3)
    lumaflip = homogeneous(eye3 - 2.0 * vv * params.lumaflip[:, None, None])
    # Rodrigues rotation about the unit grey axis v: I + sin [v]_x + (1 - cos) [v]_x^2, with
    # [v]_x^2 = v v^T - I. Written as identity + corrections so that angle 0 gives I exactly.
    cross = jnp.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]], jnp.float32)
    c, s = jnp.cos(params.hue)[:, None, None], jnp.sin(params.hue)[:, None, None]
    hue = homogeneous(eye3 + s * cross + (1.0 - c) * (vv - eye3))
    # Saturation scales the chroma (the part orthogonal to v): v v^T + s (I - v v^T).
    saturation = homogeneous(eye3 + (params.saturation[:, None, None] - 1.0) * (eye3 - vv))

    m = _compose(contrast, bright)
    m = _compose(lumaflip, m)
    m = _compose(hue, m)
    return _compose(saturation, m)


def _compose(a: jax.Array, b: jax.Array) -> jax.Array:
    """Batched a @ b as explicit multiply-adds: exact for identities, full f32 on every backend."""
    return jnp.sum(a[:, :, :, None] * b[:, None, :, :], axis=2)


def _apply_color(images: jax.Array, params: AugmentParams) -> jax.Array:
    m = color_matrix(params).astype(images.dtype)
    if images.shape[-1] == 3:
        # Explicit multiply-adds rather than a matmul: exact for the identity matrix and never run
        # at reduced (bf16) matmul precision on accelerators.
        x = images[..., None, :]  # [N, H, W, 1, 3]
        a = m[:, None, None, :3, :3]  # [N, 1, 1, 3, 3]
        return jnp.sum(a * x, axis=-1) + m[:, None, None, :3, 3]
    # Single channel (grey in, grey out): the mean over output channels of the response to a grey
    # input, i.e. the mean row sum of the 3x3 block, and the mean offset.
    scale = jnp.mean(jnp.sum(m[:, :3, :3], axis=2), axis=1)[:, None, None, None]
    offset = jnp.mean(m[:, :3, 3], axis=1)[:, None, None, None]
    return images * scale + offset


# --------------------------------------------------------------------------------------------------
# Pixel blitting


def _reflect(i: jax.Array, n: int) -> jax.Array:
    """Map any integer index into [0, n) by mirror reflection without repeating the edge."""
    if n == 1:
        return jnp.zeros_like(i)
    period = 2 * (n - 1)
    i = jnp.mod(i, period)
    return jnp.where(i >= n, period - i, i)


def _source_indices(params: AugmentParams, h: int, w: int) -> jax.Array:
    """[N, H*W] flat source pixel of every output pixel.

    The reference's inverse transform G_inv = flip @ rot(k * 90deg) @ translate(-t) maps output
    coordinates (centred on the image) to input coordinates; the result is out = translate(rot90(
    flip(in))), with reflect padding wherever the source falls outside the image.
    """
    # Centred coordinates doubled so that half-pixel centres stay integers.
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.int32), jnp.arange(w, dtype=jnp.int32), indexing="ij")
    x2 = (2 * xs - (w - 1))[None]  # [1, H, W]
    y2 = (2 * ys - (h - 1))[None]
    tx = params.translate[:, 0][:, None, None]
    ty = params.translate[:, 1][:, None, None]
    x2 = x2 - 2 * tx
    y2 = y2 - 2 * ty
    k = params.rotate90[:, None, None]
    cos = jnp.array([1, 0, -1, 0], jnp.int32)[k]
    sin = jnp.array([0, 1, 0, -1], jnp.int32)[k]
    xr = cos * x2 - sin * y2
    yr = sin * x2 + cos * y2
    xr = jnp.where(params.xflip[:, None, None] == 1, -xr, xr)
    sx = _reflect((xr + (w - 1)) // 2, w)
    sy = _reflect((yr + (h - 1)) // 2, h)
    return (sy * w + sx).reshape(params.xflip.shape[0], h * w)


def _apply_geometry(images: jax.Array, params: AugmentParams) -> jax.Array:
    n, h, w, c = images.shape
    idx = _source_indices(params, h, w)
    flat = images.reshape(n, h * w, c)
    return jnp.take_along_axis(flat, idx[:, :, None], axis=1, mode="clip").reshape(n, h, w, c)


# --------------------------------------------------------------------------------------------------
# Public entry points


def apply_augment(images: jax.Array, params: AugmentParams, config: AugmentConfig = AugmentConfig()) -> jax.Array:
    """Apply drawn parameters; geometric first, then colour (the reference's order)."""
    _check_images(images)
    if params.xflip.shape[0] != images.shape[0]:
        raise ValueError(f"params are for {params.xflip.shape[0]} images, got a batch of {images.shape[0]}")
    return _apply(images, params, config.uses_geometry, config.uses_color)


@functools.partial(jax.jit, static_argnames=("geometry", "color"))
def _apply(images: jax.Array, params: AugmentParams, geometry: bool, color: bool) -> jax.Array:
    if geometry:
        images = _apply_geometry(images, params)
    if color:
        images = _apply_color(images, params)
    return images


def augment(key: jax.Array, images: jax.Array, p, config: AugmentConfig = AugmentConfig()) -> jax.Array:
    """Augment a batch of NHWC images in [-1, 1]; p = 0 returns the images unchanged (exactly)."""
    _check_images(images)
    params = sample_augment_params(key, images.shape, p, config)
    return apply_augment(images, params, config)


# --------------------------------------------------------------------------------------------------
# Adaptive p


class AdaState(NamedTuple):
    """The augmentation probability and the sign statistics gathered since its last adjustment.

    `AdaState.create(p)` gives float32 array leaves (use it for checkpointed state).
    """

    p: jax.Array
    sign_sum: jax.Array = 0.0
    sign_count: jax.Array = 0.0

    @classmethod
    def create(cls, p: float = 0.0) -> "AdaState":
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        zero = jnp.zeros((), jnp.float32)
        return cls(p=jnp.asarray(p, jnp.float32), sign_sum=zero, sign_count=zero)


def update_p(p, sign_real_logits_mean, *, batch_size: int, target: float = 0.6, interval: int = 4,
             ada_kimg: float = 500.0) -> jax.Array:
    """One ADA adjustment: p += sign(r_t - target) * batch_size * interval / (ada_kimg * 1000).

    r_t = E[sign(D(x_real))] over the last `interval` steps. The step size lets p move from 0 to 1
    in `ada_kimg` thousand real images. p is clipped to [0, 1].
    """
    if batch_size <= 0 or interval <= 0 or ada_kimg <= 0:
        raise ValueError(f"batch_size, interval and ada_kimg must be > 0, got {batch_size}, {interval}, {ada_kimg}")
    step = batch_size * interval / (ada_kimg * 1000.0)
    rt = jnp.asarray(sign_real_logits_mean, jnp.float32)
    return jnp.clip(jnp.asarray(p, jnp.float32) + jnp.sign(rt - target) * step, 0.0, 1.0)


def ada_observe(state: AdaState, real_logits: jax.Array) -> AdaState:
    """Accumulate sign(D(x_real)) of one step's real logits ([N] or [N, 1])."""
    signs = jnp.sign(jnp.asarray(real_logits, jnp.float32)).reshape(-1)
    return state._replace(sign_sum=state.sign_sum + jnp.sum(signs),
                          sign_count=state.sign_count + signs.shape[0])


def ada_adjust(state: AdaState, *, batch_size: int, target: float = 0.6, interval: int = 4,
               ada_kimg: float = 500.0) -> AdaState:
    """Adjust p from the accumulated signs and reset them (call every `interval` steps).

    With nothing accumulated p is left unchanged.
    """
    count = state.sign_count
    rt = state.sign_sum / jnp.maximum(count, 1.0)
    new_p = update_p(state.p, rt, batch_size=batch_size, target=target, interval=interval, ada_kimg=ada_kimg)
    new_p = jnp.where(count > 0, new_p, state.p)
    zero = jnp.zeros((), jnp.float32)
    return AdaState(p=new_p, sign_sum=zero, sign_count=zero)
