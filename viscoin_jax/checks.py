"""Argument checks shared by the explanation methods and the metrics: one definition of what an
image batch, a W+ latent, a concept map, a class index or a PRNG key must look like, each failing
with a one-line ValueError that names the argument before any work is spent.

Below models, metrics and explain in the layering: it imports only jax and numpy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_images(images, name: str = "images", channels: int | None = None) -> jax.Array:
    """A non-empty floating [N, H, W, C] array (C == `channels` when given)."""
    images = jnp.asarray(images)
    want = f"[N, H, W, {channels if channels is not None else 'C'}]"
    if images.ndim != 4 or (channels is not None and images.shape[-1] != channels):
        raise ValueError(f"{name} must be an NHWC {want} array, got shape {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point in [-1, 1], got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    return images


def check_rgb_images(images, name: str = "images") -> jax.Array:
    """`check_images` for what a generator draws and a projection fits: three channels."""
    return check_images(images, name, channels=3)


def check_float_array(x, name: str, ndim: int, layout: str) -> jax.Array:
    """x as a floating-point array of `ndim` dimensions; `layout` names them in the error."""
    x = jnp.asarray(x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D {layout} array, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got {x.dtype}")
    return x


def check_ws(ws, name: str = "ws") -> jax.Array:
    """ws as a float array [N, num_ws, w_dim]."""
    return check_float_array(ws, name, 3, "[N, num_ws, w_dim]")


def check_single_ws(ws, name: str = "ws") -> jax.Array:
    """One latent given as [num_ws, w_dim] or [1, num_ws, w_dim]; returns [num_ws, w_dim]."""
    ws = jnp.asarray(ws)
    if ws.ndim == 3 and ws.shape[0] == 1:
        ws = ws[0]
    if ws.ndim != 2:
        raise ValueError(f"{name} must be one latent of shape [num_ws, w_dim] or [1, num_ws, w_dim], got {ws.shape}")
    return check_float_array(ws, name, 2, "[num_ws, w_dim]")


def check_phi(phi, name: str = "phi") -> jax.Array:
    """VisCoIN concept maps as a float [N, h, w, K] array."""
    return check_float_array(phi, name, 4, "[N, h, w, K] (concept maps)")


def check_choice(value, choices, name: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(choices)}")


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def concrete(x) -> np.ndarray | None:
    """x as a numpy array, or None while x is being traced (checks on values are then skipped)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_class_range(classes: np.ndarray, num_classes: int, name: str = "target_class") -> None:
    """ValueError if any concrete class index lies outside [0, num_classes)."""
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"{name} out of range for {num_classes} classes: {np.unique(classes).tolist()}")


def class_indices(classes, n: int, name: str = "target_class", allow_scalar: bool = True) -> np.ndarray:
    """Concrete class indices [n] (int32) from an [n] array (or a scalar if allowed)."""
    t = np.asarray(classes)
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"{name} must be integer, got {t.dtype}")
    if t.ndim == 0 and allow_scalar:
        t = np.full((n,), t)
    if t.shape != (n,):
        what = "a scalar or an array of shape" if allow_scalar else "an array of shape"
        raise ValueError(f"{name} must be {what} ({n},), got shape {t.shape}")
    return t.astype(np.int32)


def check_targets(targets, n: int, num_classes: int | None = None) -> jax.Array | None:
    """None, or int32 [n] target classes from an int or an [n] array.

    The range is checked when the targets are concrete and num_classes is given; traced targets
    (inside a caller's jit) cannot be checked and pass through.
    """
    if targets is None:
        return None
    t = jnp.asarray(targets)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"targets must be integer class indices, got dtype {t.dtype}")
    if t.ndim == 0:
        t = jnp.full((n,), t)
    if t.shape != (n,):
        raise ValueError(f"targets must be an int or an array of shape ({n},), got shape {t.shape}")
    values = concrete(t) if num_classes is not None else None
    if values is not None and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(f"targets must be in [0, {num_classes}), got values in [{values.min()}, {values.max()}]")
    return t.astype(jnp.int32)


def as_key(key) -> jax.Array:
    """A jax.random key from an int seed or a key (typed or raw uint32[2])."""
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or (key.dtype == jnp.uint32 and key.shape == (2,)):
        return key
    raise ValueError(f"key must be an int seed or a jax.random key, got {key.dtype} {key.shape}")


def broadcast_to_images(value, images, name: str) -> jax.Array:
    """A scalar or an array broadcastable to images' shape, as an array of images' shape and dtype."""
    v = jnp.asarray(value, dtype=images.dtype)
    try:
        return jnp.broadcast_to(v, images.shape)
    except ValueError:
        raise ValueError(f"{name} must be a scalar or broadcastable to {images.shape}, got shape {v.shape}") from None


__all__ = ["check_images", "check_rgb_images", "check_float_array", "check_ws", "check_single_ws", "check_phi", "check_choice", "check_positive_int",
           "concrete", "check_class_range", "class_indices", "check_targets", "as_key", "broadcast_to_images"]
