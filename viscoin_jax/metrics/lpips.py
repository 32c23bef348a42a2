"""LPIPS-VGG perceptual distance (Zhang et al. 2018, v0.1), and a labelled fallback perceptual loss.

LPIPS(x, y) for images in [-1, 1]:
  1. scaling layer: (x - shift) / scale per channel (shift = (-.030, -.088, -.188),
     scale = (.458, .448, .450); this approximately maps [-1, 1] to ImageNet normalisation);
  2. VGG16 ReLU taps relu1_2 .. relu5_3 of both images;
  3. unit-normalise every feature vector over channels (x / (||x|| + 1e-10));
  4. squared difference, weighted per channel by the learned non-negative `lin` weights (the
     1x1 convs), summed over channels, averaged over space, summed over the 5 layers.

Without the weight files there is no LPIPS. `make_perceptual_loss` then falls back, with a
warning, to the same recipe on the features of a network you give (e.g. the classifier's), with
unit channel weights; the returned loss says which it is (`name`, `is_lpips`).

Both losses are NNX modules: to use one inside a jitted training step, pass it through `nnx.jit`
(or `nnx.split` it and `nnx.merge` inside `jax.jit`) rather than closing over it, so the VGG
weights are arguments of the compiled program, not constants baked into it.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from viscoin_jax.convert.inception_weights import build_with_params
from viscoin_jax.convert.lpips_weights import load_lpips_params
from viscoin_jax.models.vgg import TAP_CHANNELS, VGG16Features

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
FeatureFn = Callable[[jax.Array], "Sequence[jax.Array] | jax.Array"]


def unit_normalize(x: jax.Array, eps: float = 1e-10) -> jax.Array:
    """x / (||x||_channels + eps) over the last axis.

    At an all-zero feature vector (all ReLUs off) the norm's derivative is taken as 0 instead of
    sqrt's infinite one, so the gradient stays finite (PyTorch's LPIPS gives NaN there).
    """
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return x / (norm + eps)


def _check_pair(x: jax.Array, y: jax.Array) -> None:
    if x.shape != y.shape:
        raise ValueError(f"images must have the same shape, got {x.shape} and {y.shape}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3] in [-1, 1], got shape {x.shape}")


def _layer_distance(fx: jax.Array, fy: jax.Array, weights: jax.Array | None) -> jax.Array:
    """[N, h, w, C] feature maps -> [N]: spatial mean of the (weighted) channel sum of squared diffs."""
    d = jnp.square(unit_normalize(fx) - unit_normalize(fy))
    d = jnp.sum(d * weights, axis=-1) if weights is not None else jnp.sum(d, axis=-1)
    return jnp.mean(d.reshape(d.shape[0], -1), axis=-1)


class LPIPS(nnx.Module):
    """LPIPS-VGG: __call__(x, y) -> [N] distances for [N, H, W, 3] images in [-1, 1].

    A freshly built module has random VGG weights and unit `lin` weights; load the real ones with
    `load_lpips` / `make_perceptual_loss`. `precision`: conv precision (None = backend default;
    "highest" for reported metric values).
    """

    name = "lpips-vgg"
    is_lpips = True

    def __init__(self, *, precision=None, rngs: nnx.Rngs | None):
        self.vgg = VGG16Features(precision=precision, rngs=rngs)
        for k, channels in enumerate(TAP_CHANNELS):
            setattr(self, f"lin{k}", nnx.Param(np.ones((channels,), np.float32)))

    def __call__(self, x: jax.Array, y: jax.Array, *, per_layer: bool = False):
        x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
        _check_pair(x, y)
        shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
        scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
        feats = self.vgg((jnp.concatenate([x, y], axis=0) - shift) / scale)
        n = x.shape[0]
        layers = [_layer_distance(f[:n], f[n:], getattr(self, f"lin{k}")[...]) for k, f in enumerate(feats)]
        total = sum(layers[1:], layers[0])
        return (total, layers) if per_layer else total


def lpips_distance(x: jax.Array, y: jax.Array, model: LPIPS) -> jax.Array:
    """LPIPS between images x and y ([N, H, W, 3] in [-1, 1]) -> [N]."""
    return model(x, y)


class FeaturePerceptualLoss(nnx.Module):
    """LPIPS recipe (unit-normalise, squared diff, channel sum, spatial mean, layer sum) with unit
    weights on the feature maps of `feature_fn` -- a stand-in when LPIPS weights are unavailable.

    `feature_fn(images in [-1, 1]) -> list of [N, h, w, C] maps` (or one map, or [N, C] vectors);
    any input normalisation the network needs is its own job. Pass an nnx.Module (e.g. a small
    wrapper around the classifier) so its weights travel as module state under `nnx.jit`.
    """

    is_lpips = False

    def __init__(self, feature_fn: FeatureFn, name: str):
        if not callable(feature_fn):
            raise ValueError(f"feature_fn must be callable, got {type(feature_fn).__name__}")
        self.feature_fn = feature_fn
        self.name = name

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
        _check_pair(x, y)
        feats = self.feature_fn(jnp.concatenate([x, y], axis=0))
        feats = [feats] if isinstance(feats, jax.Array) else list(feats)
        if not feats:
            raise ValueError("feature_fn returned no feature maps")
        n = x.shape[0]
        total = jnp.zeros((n,), jnp.float32)
        for f in feats:
            if f.ndim not in (2, 4) or f.shape[0] != 2 * n:
                raise ValueError(f"feature_fn must return [N, h, w, C] maps or [N, C] vectors for the {2 * n} "
                                 f"images it was given, got shape {f.shape}")
            total = total + _layer_distance(f[:n].astype(jnp.float32), f[n:].astype(jnp.float32), None)
        return total


def load_lpips(weights: str | os.PathLike | Sequence[str | os.PathLike], *, precision=None) -> LPIPS:
    """LPIPS with real weights: a converted `.npz` / Orbax directory, or (vgg16 .pth, lpips vgg.pth)."""
    params = load_lpips_params(weights)
    return build_with_params(lambda: LPIPS(precision=precision, rngs=None), params, "LPIPS-VGG")


def make_perceptual_loss(weights: str | os.PathLike | Sequence[str | os.PathLike] | None = None, *,
                         feature_fn: FeatureFn | None = None, name: str | None = None,
                         precision=None) -> LPIPS | FeaturePerceptualLoss:
    """LPIPS-VGG if `weights` is given; otherwise warn and fall back to a loss on `feature_fn`.

    The returned module maps (x, y) -> [N] and carries `name` and `is_lpips`, so logs and reports
    can say whether a number is LPIPS. A given but missing weight file is an error, not a fallback.
    """
    if weights is not None:
        return load_lpips(weights, precision=precision)
    if feature_fn is None:
        raise ValueError("no LPIPS weights given and no feature_fn to fall back on; pass weights= "
                         "(see docs/fid.md) or feature_fn= (e.g. the classifier's feature maps)")
    label = name or getattr(feature_fn, "__name__", None) or type(feature_fn).__name__
    warnings.warn(f"No LPIPS weights given: using a perceptual loss on the features of {label!r} instead. "
                  "This is NOT LPIPS; its values are not comparable with published LPIPS numbers.",
                  UserWarning, stacklevel=2)
    return FeaturePerceptualLoss(feature_fn, name=f"feature-perceptual[{label}]")
