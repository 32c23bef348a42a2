"""Dynamic loss scaling for float16 training: what keeps small float16 gradients from underflowing.

The loss is multiplied by `scale` before differentiation and the gradients divided by it after, in
float32. When any gradient is inf/NaN (the scaled backward overflowed float16), the update is skipped
-- parameters and optimiser state stay bit-identical -- and the scale halves; after `period`
consecutive finite updates it doubles. This is the scheme of the usual mixed-precision trainers
(PyTorch's GradScaler, jmp's DynamicLossScale).

Why a module here rather than a library: optax (0.2.8) has no loss scaling, only `apply_if_finite`,
which skips updates but cannot move a scale in step with them; `jmp`, the JAX library for it, has
had no release since 0.0.4 (January 2023) and is not a dependency. The state is a plain dict of two
scalars so that it checkpoints with the rest of a task state (Orbax restores dicts as dicts).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

INITIAL_SCALE = 2.0 ** 15
PERIOD = 2000
FACTOR = 2.0
MIN_SCALE = 1.0
# the largest finite float16 is 65504; a scale past 2**24 only overflows
MAX_SCALE = 2.0 ** 24


def init(initial_scale: float = INITIAL_SCALE) -> dict:
    """The scale state: {"scale": float32, "good_steps": int32 finite updates since the last change}."""
    if not initial_scale >= MIN_SCALE:
        raise ValueError(f"the initial loss scale must be >= {MIN_SCALE}, got {initial_scale}")
    return {"scale": jnp.asarray(initial_scale, jnp.float32), "good_steps": jnp.zeros((), jnp.int32)}


def all_finite(tree: Any) -> jax.Array:
    """True when every element of every leaf is finite (a bool scalar)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()


def adjust(state: dict, finite: jax.Array, *, period: int = PERIOD, factor: float = FACTOR) -> dict:
    """The scale after one update: halved (by `factor`, never below 1) on a non-finite gradient,
    doubled after `period` finite updates in a row (never above 2**24)."""
    scale, good = state["scale"], state["good_steps"]
    grow = finite & (good + 1 >= period)
    new_scale = jnp.where(finite, jnp.where(grow, jnp.minimum(scale * factor, MAX_SCALE), scale),
                          jnp.maximum(scale / factor, MIN_SCALE))
    new_good = jnp.where(finite & ~grow, good + 1, 0).astype(jnp.int32)
    return {"scale": new_scale.astype(jnp.float32), "good_steps": new_good}


def value_and_grad(fn: Callable, state: dict, has_aux: bool = False) -> Callable:
    """As `jax.value_and_grad(fn, has_aux)` differentiated at `fn * scale`; the returned value is the
    unscaled loss and the gradients are unscaled (float32 division). Returns
    fn(*args) -> (value[, aux]), grads, finite."""
    scale = state["scale"]

    def scaled(*args, **kwargs):
        out = fn(*args, **kwargs)
        loss, aux = out if has_aux else (out, None)
        return loss.astype(jnp.float32) * scale, (loss, aux)

    def wrapped(*args, **kwargs):
        (_, (loss, aux)), grads = jax.value_and_grad(scaled, has_aux=True)(*args, **kwargs)
        grads = jax.tree.map(lambda g: (g.astype(jnp.float32) / scale).astype(g.dtype), grads)
        value = (loss, aux) if has_aux else loss
        return value, grads, all_finite(grads)
    return wrapped


def apply_if_finite(tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any,
                    finite: jax.Array) -> tuple[Any, Any]:
    """(params, opt_state) after `tx`'s update when `finite`, else both unchanged (selected
    element-wise, so a skipped step leaves them bit-identical)."""
    safe = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
    updates, new_opt = tx.update(safe, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    return keep(new_params, params), keep(new_opt, opt_state)


def finite_norm(grads: Any, finite: jax.Array) -> jax.Array:
    """The global gradient norm, 0 on a skipped (non-finite) update so metrics stay finite."""
    return jnp.where(finite, optax.tree.norm(jax.tree.map(lambda g: jnp.where(finite, g, 0), grads)), 0.0)


__all__ = ["init", "all_finite", "adjust", "value_and_grad", "apply_if_finite", "finite_norm",
           "INITIAL_SCALE", "PERIOD"]
