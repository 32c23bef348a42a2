"""upfirdn2d: up-sample, pad, FIR-filter and down-sample a batch of NHWC images.

Layout of this module (the JAX Pallas ops pattern):
- `_upfirdn2d_kernel`: the Pallas kernel body (one tile of output rows x columns x channels).
- `_upfirdn2d_pallas`: the wrapper that builds the polyphase input, grid and block specs per backend
  (tiles and the TPU VMEM budget: `plans`, shared with modulated_conv2d).
- `upfirdn2d_mosaic_gpu`: the Mosaic GPU variant of kernel and wrapper (Hopper and newer,
  impl="mosaic_gpu"), behind the same public op.
- `upfirdn2d`: the public op, a `jax.custom_vjp` whose backward pass is again an upfirdn2d.
- `upfirdn2d_reference`: the plain-JAX (lax) reference, used as the "xla" implementation.
- `upsample2d`, `downsample2d`, `filter2d`: the reference's padding and gain conventions.

Semantics are those of StyleGAN2-ADA's `upfirdn2d` moved to NHWC.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import _phases
from ._args import check_impl, filter_size, parse_padding, parse_scaling
from ._dispatch import dispatch, interpret_mode, jit_per_shape, resolve_auto, uses_mosaic_gpu, uses_tpu_layout
from .plans import compiler_params, fir_plans as _plans, fir_tiles as _tiles, fits_tpu_vmem
from .plans import fir_tpu_vmem_estimate as tpu_vmem_estimate
from .tuning import upfirdn2d_key

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


# --------------------------------------------------------------------------------------------------
# Argument checks


def _check_x(x, name="x"):
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"{name} must be a 4-D [N, H, W, C] array, got shape {np.shape(x)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


def _check_filter(f):
    if np.ndim(f) not in (1, 2):
        raise ValueError(f"f must be a 1-D (separable) or 2-D filter, got shape {np.shape(f)}")
    if np.size(f) == 0:
        raise ValueError("f must not be empty")


def _normalise_args(x, f, up, down, padding):
    _check_x(x)
    if f is None:
        f = jnp.ones((1, 1), jnp.float32)
    f = jnp.asarray(f, jnp.float32)
    _check_filter(f)
    return f, parse_scaling(up, "up"), parse_scaling(down, "down"), parse_padding(padding)


def _correlation_filter_2d(f, flip_filter, gain):
    """[fh, fw] correlation taps with the gain folded in (gain applied per dimension for 1-D f)."""
    f = f.astype(jnp.float32) * (gain ** (f.ndim / 2))
    if f.ndim == 1:
        f = jnp.outer(f, f)
    if not flip_filter:  # the op convolves; the kernels correlate
        f = f[::-1, ::-1]
    return f


# --------------------------------------------------------------------------------------------------
# Plain-JAX reference


def upfirdn2d_reference(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1.0):
    """The "xla" implementation: zero insertion and padding with `lax.pad`, then the FIR filter as a
    sum of strided shifted slices (one per tap).

    Why slices and not a depthwise convolution: XLA:CPU runs grouped convolutions (and their
    gradients) an order of magnitude slower than the equivalent fused multiply-adds, and the filters
    here have 4-16 taps. Accumulates in float32 and returns x's dtype.
    """
    f, (ux, uy), (dx, dy), (px0, px1, py0, py1) = _normalise_args(x, f, up, down, padding)
    plan_y, plan_x = _plans(x.shape, f.shape, (ux, uy), (dx, dy), (px0, px1, py0, py1))  # validates
    y = x.astype(jnp.float32)
    # Zero insertion keeps up-1 zeros after the last sample too, like the reference.
    y = jax.lax.pad(y, jnp.float32(0), [(0, 0, 0), (py0, py1 + uy - 1, uy - 1),
                                        (px0, px1 + ux - 1, ux - 1), (0, 0, 0)])
    g = (f * (gain ** (f.ndim / 2))).astype(jnp.float32)
    if not flip_filter:  # upfirdn2d convolves; the taps below correlate
        g = g[tuple(slice(None, None, -1) for _ in range(g.ndim))]
    out_h, out_w = plan_y.out_size, plan_x.out_size

    def taps(v, weights, axis, stride, out_len):
        # out[i] = sum_k weights[k] * v[i * stride + k] along `axis`
        acc = None
        for k in range(weights.shape[0]):
            term = weights[k] * jax.lax.slice_in_dim(v, k, k + (out_len - 1) * stride + 1, stride, axis)
            acc = term if acc is None else acc + term
        return acc

    if g.ndim == 1:
        y = taps(taps(y, g, 1, dy, out_h), g, 2, dx, out_w)
    else:
        rows = [taps(jax.lax.slice_in_dim(y, ky, ky + (out_h - 1) * dy + 1, dy, 1), g[ky], 2, dx, out_w)
                for ky in range(g.shape[0])]
        y = functools.reduce(jnp.add, rows)
    return y.astype(x.dtype)


# --------------------------------------------------------------------------------------------------
# Pallas kernel


def _upfirdn2d_kernel(g_ref, x_ref, o_ref, *, table, tile_h, tile_w, tiles_w):
    """One [tile_h, tile_w, channels] tile of every output phase.

    x_ref: [1, phases, tile_h + halo, W, cb] window of the polyphase input.
    g_ref: [fh, fw] correlation taps (float32 scalars).
    o_ref: [1, tile_h, up_y, tile_w, up_x, cb].
    """
    col0 = 0 if tiles_w == 1 else pl.program_id(3) * tile_w  # static on TPU (see _conv_kernel)
    cb = o_ref.shape[-1]
    for qy, qx, taps in table:
        acc = jnp.zeros((tile_h, tile_w, cb), jnp.float32)
        for ky, kx, r, oy, ox in taps:
            window = x_ref[0, r, pl.ds(oy, tile_h), pl.ds(col0 + ox, tile_w), :]
            acc += window.astype(jnp.float32) * g_ref[ky, kx]
        o_ref[0, :, qy, :, qx, :] = acc.astype(o_ref.dtype)


# Jitted with its static arguments: a recurring call is traced and lowered once per program.
@jit_per_shape(static_argnames=("up", "down", "padding", "flip_filter", "gain", "backend"))
def _upfirdn2d_pallas(x, f, *, up, down, padding, flip_filter, gain, backend):
    """Wrapper: polyphase split, tiling and the pallas_call. Returns [N, out_h, out_w, C]."""
    plan_y, plan_x = _plans(x.shape, f.shape, up, down, padding)
    g = _correlation_filter_2d(f, flip_filter, gain)
    table = _phases.tap_table(plan_y, plan_x)
    n, _, _, c = x.shape
    tile_h, tile_w, cb, cp = _tiles(backend, plan_y.out_per_phase, plan_x.out_per_phase, c)
    rows = _phases.round_up(plan_y.out_per_phase, tile_h)
    cols = _phases.round_up(plan_x.out_per_phase, tile_w)
    if cp != c:
        x = jnp.pad(x, [(0, 0), (0, 0), (0, 0), (0, cp - c)])
    xph = _phases.split_phases(x, plan_y, plan_x, rows, cols)
    phases, _, in_w = xph.shape[1], xph.shape[2], xph.shape[3]
    uy, ux = plan_y.up, plan_x.up
    grid = (n, cp // cb, rows // tile_h, cols // tile_w)
    el = pl.Element
    x_spec = pl.BlockSpec((el(1), el(phases), el(tile_h + plan_y.halo), el(in_w), el(cb)),
                          lambda i, j, t, u: (i, 0, t * tile_h, 0, j * cb))
    if uses_tpu_layout(backend):
        g_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
    else:
        g_spec = pl.BlockSpec(g.shape, lambda i, j, t, u: (0, 0))
    o_spec = pl.BlockSpec((1, tile_h, uy, tile_w, ux, cb), lambda i, j, t, u: (i, t, 0, u, 0, j))
    kernel = functools.partial(_upfirdn2d_kernel, table=table, tile_h=tile_h, tile_w=tile_w,
                               tiles_w=cols // tile_w)
    y = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[g_spec, x_spec],
        out_specs=o_spec,
        out_shape=jax.ShapeDtypeStruct((n, rows, uy, cols, ux, cp), x.dtype),
        compiler_params=compiler_params(backend, ("parallel",) * len(grid)),
        interpret=interpret_mode(backend),
        name="upfirdn2d",
    )(g, xph)
    return _phases.merge_phases(y, plan_y, plan_x)[..., :c]


@jit_per_shape(static_argnames=("up", "down", "padding", "flip_filter", "gain", "backend"))
def _upfirdn2d_mgpu(x, f, *, up, down, padding, flip_filter, gain, backend):
    """The Mosaic GPU wrapper (upfirdn2d_mosaic_gpu) on this op's arguments."""
    from .upfirdn2d_mosaic_gpu import _upfirdn2d_mosaic_gpu
    return _upfirdn2d_mosaic_gpu(x, _correlation_filter_2d(f, flip_filter, gain), up=up, down=down,
                                 padding=padding, interpret=backend == "mosaic_gpu_interpret")


# --------------------------------------------------------------------------------------------------
# Public op


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _upfirdn2d(x, f, up, down, padding, flip_filter, gain, impl):
    return _upfirdn2d_impl(x, f, up, down, padding, flip_filter, gain, impl)


def _upfirdn2d_impl(x, f, up, down, padding, flip_filter, gain, impl):
    def xla_fn(x, f):
        return upfirdn2d_reference(x, f, up, down, padding, flip_filter, gain)

    def kernel_fn(x, f, backend):
        if uses_mosaic_gpu(backend):
            return _upfirdn2d_mgpu(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter,
                                   gain=gain, backend=backend)
        if uses_tpu_layout(backend) and not fits_tpu_vmem(
                tpu_vmem_estimate(x.shape, f.shape, up, down, padding), f"upfirdn2d: x {x.shape}"):
            return xla_fn(x, f)
        return _upfirdn2d_pallas(x, f, up=up, down=down, padding=padding,
                                 flip_filter=flip_filter, gain=gain, backend=backend)

    return dispatch(impl, xla_fn, kernel_fn, x, f)


def _upfirdn2d_fwd(x, f, up, down, padding, flip_filter, gain, impl):
    return _upfirdn2d(x, f, up, down, padding, flip_filter, gain, impl), (x, f)


def _upfirdn2d_bwd(up, down, padding, flip_filter, gain, impl, residuals, dy):
    x, f = residuals
    fw, fh = filter_size(f)
    (ux, uy), (dx, dyy), (px0, _, py0, _) = up, down, padding
    tx0, tx1 = _phases.transpose_padding(x.shape[2], dy.shape[2], ux, dx, px0, fw)
    ty0, ty1 = _phases.transpose_padding(x.shape[1], dy.shape[1], uy, dyy, py0, fh)
    # The transpose of upfirdn2d is upfirdn2d with up/down swapped and the filter flipped: the
    # backward pass runs the same kernel (and is itself differentiable through this custom_vjp).
    grad_x = _upfirdn2d(dy, f, down, up, (tx0, tx1, ty0, ty1), not flip_filter, gain, impl)
    # The filter's gradient is rarely wanted; XLA removes this reference VJP when it is unused.
    _, f_vjp = jax.vjp(lambda f_: upfirdn2d_reference(x, f_, up, down, padding, flip_filter, gain), f)
    (grad_f,) = f_vjp(dy)
    return grad_x, grad_f


_upfirdn2d.defvjp(_upfirdn2d_fwd, _upfirdn2d_bwd)


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1.0, impl="auto"):
    """Up-sample by zero insertion, pad (negative pads crop), FIR-filter, keep every `down`-th pixel.

    Args:
      x: [N, H, W, C] float32 / bfloat16 / float16. Accumulation is float32.
      f: 1-D (separable) or 2-D [fh, fw] float filter, or None for identity.
      up, down: int or (x, y) pair of positive ints.
      padding: int, (x, y) or (x0, x1, y0, y1).
      flip_filter: False convolves (the reference's default), True correlates.
      gain: multiplies the filter (per dimension, as sqrt(gain), for a separable filter).
      impl: "auto" | "pallas" | "interpret" | "tpu_interpret" | "mosaic_gpu" | "mosaic_gpu_interpret" |
        "xla" ("mosaic_gpu": the Mosaic GPU kernel, NVIDIA Hopper and newer; see kernels/_dispatch.py).

    Differentiable in x and f under every impl, to any order: the gradient w.r.t. x is again an
    upfirdn2d (the same kernel), the gradient w.r.t. f comes from the reference.
    """
    check_impl(impl)
    f, up, down, padding = _normalise_args(x, f, up, down, padding)
    _plans(x.shape, f.shape, up, down, padding)
    impl = resolve_auto(impl, upfirdn2d_key(x.shape, f.shape, up, down, padding, x.dtype))
    return _upfirdn2d(x, f, up, down, padding, bool(flip_filter), float(gain), impl)


# --------------------------------------------------------------------------------------------------
# Conventions of the reference's helpers


def filter2d(x, f, padding=0, flip_filter=False, gain=1.0, impl="auto"):
    """Filter keeping the size (plus `padding`), as the reference's `filter2d`."""
    px0, px1, py0, py1 = parse_padding(padding)
    fw, fh = filter_size(f)
    pad = (px0 + fw // 2, px1 + (fw - 1) // 2, py0 + fh // 2, py1 + (fh - 1) // 2)
    return upfirdn2d(x, f, padding=pad, flip_filter=flip_filter, gain=gain, impl=impl)


def upsample2d(x, f, up=2, padding=0, flip_filter=False, gain=1.0, impl="auto"):
    """Up-sample by `up` with the filter, output size H*up, W*up (plus padding); gain up**2."""
    ux, uy = parse_scaling(up, "up")
    px0, px1, py0, py1 = parse_padding(padding)
    fw, fh = filter_size(f)
    pad = (px0 + (fw + ux - 1) // 2, px1 + (fw - ux) // 2, py0 + (fh + uy - 1) // 2, py1 + (fh - uy) // 2)
    return upfirdn2d(x, f, up=(ux, uy), padding=pad, flip_filter=flip_filter,
                     gain=gain * ux * uy, impl=impl)


def downsample2d(x, f, down=2, padding=0, flip_filter=False, gain=1.0, impl="auto"):
    """Down-sample by `down` with the filter, output size H/down, W/down (plus padding)."""
    dx, dy = parse_scaling(down, "down")
    px0, px1, py0, py1 = parse_padding(padding)
    fw, fh = filter_size(f)
    pad = (px0 + (fw - dx + 1) // 2, px1 + (fw - dx) // 2, py0 + (fh - dy + 1) // 2, py1 + (fh - dy) // 2)
    return upfirdn2d(x, f, down=(dx, dy), padding=pad, flip_filter=flip_filter, gain=gain, impl=impl)
