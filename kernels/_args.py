"""Argument parsing and filter set-up shared by the resampling ops.

The conventions follow the reference ops of NVlabs' stylegan2-ada-pytorch (its `torch_utils/ops/upfirdn2d.py`), moved to NHWC:
scalings are (x, y), paddings are (x0, x1, y0, y1), and a 1-D filter means a separable filter.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

IMPLS = ("auto", "pallas", "interpret", "tpu_interpret", "mosaic_gpu", "mosaic_gpu_interpret", "xla")


def parse_scaling(value, name: str) -> tuple[int, int]:
    """An int or an (x, y) pair of positive ints -> (sx, sy)."""
    if isinstance(value, (int, np.integer)):
        value = (int(value), int(value))
    if not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be an int or an (x, y) pair, got {value!r}")
    sx, sy = (int(v) for v in value)
    if sx < 1 or sy < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return sx, sy


def parse_padding(value, name: str = "padding") -> tuple[int, int, int, int]:
    """An int, (x, y) or (x0, x1, y0, y1) -> (x0, x1, y0, y1). Negative values crop."""
    if isinstance(value, (int, np.integer)):
        value = (int(value), int(value))
    if not isinstance(value, Sequence) or len(value) not in (2, 4):
        raise ValueError(f"{name} must be an int, (x, y) or (x0, x1, y0, y1), got {value!r}")
    value = tuple(int(v) for v in value)
    if len(value) == 2:
        px, py = value
        return px, px, py, py
    return value  # type: ignore[return-value]


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def filter_size(f) -> tuple[int, int]:
    """(fw, fh) of a 1-D (separable) or 2-D filter; (1, 1) for no filter."""
    if f is None:
        return 1, 1
    shape = np.shape(f)
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[1], shape[0]
    raise ValueError(f"f must be a 1-D (separable) or 2-D filter, got shape {shape}")


def setup_filter(f=(1, 3, 3, 1), normalize=True, flip_filter=False, gain=1.0, separable=None) -> np.ndarray:
    """Build a FIR filter the way the reference does: normalise to unit sum, optionally make it 2-D.

    A 1-D filter stays separable when `separable` is None and it has at least 8 taps (as in the
    reference); otherwise it becomes the outer product with itself.
    """
    f = np.asarray(1.0 if f is None else f, dtype=np.float32)
    if f.ndim == 0:
        f = f[np.newaxis]
    if f.ndim not in (1, 2) or f.size == 0:
        raise ValueError(f"f must be a non-empty 1-D or 2-D filter, got shape {f.shape}")
    if separable is None:
        separable = f.ndim == 1 and f.size >= 8
    if f.ndim == 1 and not separable:
        f = np.outer(f, f)
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f[tuple(slice(None, None, -1) for _ in range(f.ndim))]
    f = f * (gain ** (f.ndim / 2))
    return f.astype(np.float32)


def correlation_taps(f, flip_filter: bool, gain: float) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
    """The filter in correlation form with the gain folded in, as numpy (needs a concrete filter).

    Returns (gy, gx) 1-D taps for a separable filter, or a 2-D [fh, fw] array.
    """
    f = np.asarray(f, dtype=np.float32)
    g = f * np.float32(gain ** (f.ndim / 2))
    if not flip_filter:  # the op convolves: correlation with the flipped filter
        g = g[tuple(slice(None, None, -1) for _ in range(g.ndim))]
    return g


def output_size(in_size: int, up: int, down: int, pad0: int, pad1: int, taps: int, name: str) -> int:
    """Length of one output dimension: (L*up + pad0 + pad1 - taps) // down + 1."""
    padded = in_size * up + pad0 + pad1
    if padded < taps:
        raise ValueError(
            f"{name}: the up-sampled, padded input ({padded}) is smaller than the filter ({taps})")
    return (padded - taps) // down + 1
