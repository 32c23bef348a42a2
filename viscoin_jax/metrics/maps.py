"""Attribution maps as the metrics read them: channels reduced to one map, maps rescaled to [0, 1].
The explanation methods reduce with the same functions, so a method's map and its metric agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

REDUCTIONS = ("sum", "abs_sum", "abs_max", "max", "l2")


def reduce_channels(attributions, mode: str | None) -> jax.Array:
    """[N, H, W, C] -> [N, H, W]: "sum" (signed, IG's pixel attribution), "abs_sum", "abs_max"
    (max |a| over channels, Simonyan et al.'s saliency map), "max" (signed max) or "l2"; None
    returns the input unchanged."""
    a = jnp.asarray(attributions)
    if mode is None:
        return a
    if a.ndim != 4:
        raise ValueError(f"attributions to reduce must be [N, H, W, C], got shape {a.shape}")
    if mode == "sum":
        return jnp.sum(a, axis=-1)
    if mode == "abs_sum":
        return jnp.sum(jnp.abs(a), axis=-1)
    if mode == "abs_max":
        return jnp.max(jnp.abs(a), axis=-1)
    if mode == "max":
        return jnp.max(a, axis=-1)
    if mode == "l2":
        return jnp.sqrt(jnp.sum(jnp.square(a), axis=-1))
    raise ValueError(f"unknown reduce mode {mode!r}; expected None or one of {REDUCTIONS}")


def normalize_maps(maps, *, absolute: bool = False, eps: float = 1e-12) -> jax.Array:
    """Per-map rescaling to [0, 1] (min-max, or |m| / max |m| with absolute=True) for display and
    comparison; a constant map becomes zeros."""
    m = jnp.asarray(maps)
    if m.ndim < 2:
        raise ValueError(f"maps must be [N, ...], got shape {m.shape}")
    axes = tuple(range(1, m.ndim))
    if absolute:
        m = jnp.abs(m)
        lo = jnp.zeros_like(jnp.min(m, axis=axes, keepdims=True))
    else:
        lo = jnp.min(m, axis=axes, keepdims=True)
    span = jnp.max(m, axis=axes, keepdims=True) - lo
    return jnp.where(span > eps, (m - lo) / jnp.where(span > eps, span, 1.0), 0.0)


__all__ = ["REDUCTIONS", "reduce_channels", "normalize_maps"]
