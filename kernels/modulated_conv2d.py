"""Modulated convolution (StyleGAN2), NHWC, with optional up/down-sampling: the public op.

    y[n] = dcoef[n] * conv_resample(x[n] * styles[n], weight)
    dcoef[n, o] = 1 / sqrt(sum_{kh, kw, i} (weight[kh, kw, i, o] * styles[n, i])^2 + 1e-8)

The weight is shared by the batch; styles scale the input channels and the demodulation scales
the output channels, so the kernel never materialises a per-sample weight.

Layout (the JAX Pallas ops pattern): `modulated_conv2d_pallas` holds the kernels and their
pallas_call wrappers, `modulated_conv2d_mosaic_gpu` the Mosaic GPU (Hopper+) variant of the phased
conv (`_conv_forward` decides where it applies), `modulated_conv2d_ref` the plain-JAX references,
`plans` the tiles and memory budgets. This module holds the public op and the custom_vjp wiring:
`_phased_conv`, whose backward pass is the same conv kernel on the transposed plan (gradient w.r.t.
x) plus `_weight_grad`, itself a custom_vjp over the weight-gradient kernels whose transposes are
phased convolutions again (so every order is Pallas). The names below stay importable from here as before the split.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import _phases
from ._args import check_impl
from ._dispatch import dispatch, jit_per_shape, resolve_auto, uses_mosaic_gpu, uses_tpu_layout
from .modulated_conv2d_pallas import phased_conv_pallas as _phased_conv_forward
from .modulated_conv2d_pallas import weight_grad_pallas as _weight_grad_forward
from .modulated_conv2d_ref import (conv2d_resample_reference, default_filter, demodulation_coefficients,
                                   modulated_conv2d_grouped_reference, modulated_conv2d_reference,
                                   resample_padding)
from .plans import GPU_SHARED_MEMORY_BUDGET_BYTES, TPU_VMEM_BUDGET_BYTES  # read-only aliases
from .plans import ConvBlockSizes, check_block_sizes
from .plans import conv_plans as _plans, conv_tiles as _conv_tiles
from .plans import conv_tpu_vmem_estimate as tpu_vmem_estimate, fits_tpu_vmem
from .plans import triton_pipelining, triton_shared_memory_estimate
from .tuning import modconv_key
from .upfirdn2d import _check_x, upfirdn2d

# Importable from here as before the split (tests reach `_plans`, `_conv_tiles` and the wrappers too).
__all__ = ["modulated_conv2d", "ConvBlockSizes", "modulated_conv2d_reference", "modulated_conv2d_grouped_reference",
           "conv2d_resample_reference", "demodulation_coefficients", "resample_padding",
           "tpu_vmem_estimate", "TPU_VMEM_BUDGET_BYTES", "GPU_SHARED_MEMORY_BUDGET_BYTES",
           "triton_pipelining", "triton_shared_memory_estimate", "_plans", "_conv_tiles",
           "_phased_conv_forward", "_weight_grad_forward"]


def _check_args(x, weight, styles, up, down):
    _check_x(x)
    if getattr(weight, "ndim", None) != 4:
        raise ValueError(f"weight must be 4-D [kh, kw, Cin, Cout], got shape {np.shape(weight)}")
    if weight.shape[2] != x.shape[3]:
        raise ValueError(f"weight has {weight.shape[2]} input channels but x has {x.shape[3]}")
    if getattr(styles, "ndim", None) != 2 or styles.shape != (x.shape[0], x.shape[3]):
        raise ValueError(
            f"styles must be [N, Cin] = {(x.shape[0], x.shape[3])}, got shape {np.shape(styles)}")
    for name, value in (("up", up), ("down", down)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if up > 1 and down > 1:
        raise ValueError("up and down cannot both be > 1")


# The Pallas backend that runs what the Mosaic GPU variant does not cover (the weight gradient, and
# the convolutions `mgpu_conv_tiles` refuses): Triton on the GPU, the Pallas interpreter on CPU.
_MOSAIC_GPU_FALLBACK = {"mosaic_gpu": "gpu", "mosaic_gpu_interpret": "interpret"}


@jit_per_shape(static_argnums=(4, 5))
def _phased_conv_mgpu(x, w, in_scale, out_scale, geometry, backend):
    from .modulated_conv2d_mosaic_gpu import _phased_conv_mosaic_gpu, mgpu_conv_tiles
    plan_y, plan_x = _plans(x.shape, w.shape, geometry)
    tiles = mgpu_conv_tiles(_phases.tap_table(plan_y, plan_x), x.shape[3], w.shape[3], x.dtype)
    return _phased_conv_mosaic_gpu(x, w, in_scale, out_scale, plan_y, plan_x, tiles,
                                   interpret=backend == "mosaic_gpu_interpret")


# wgmma computes float32 operands as TF32: where JAX's precision asks for exact float32 (the tests'
# "highest"), float32 convolutions stay on the Triton kernel, which honours it.
_EXACT_FLOAT32 = ("highest", "float32")


def mosaic_gpu_conv_applies(x_shape, w_shape, geometry, dtype) -> bool:
    """Whether the Mosaic GPU kernel takes this phased convolution (`mgpu_conv_tiles`' rule, and no
    float32 under an exact-float32 `jax_default_matmul_precision`); where not, impl="mosaic_gpu" runs
    the Triton kernel (the interpreted Pallas kernel in interpret mode)."""
    from .modulated_conv2d_mosaic_gpu import mgpu_conv_tiles
    precision = str(jax.config.jax_default_matmul_precision or "default").lower()
    if jnp.dtype(dtype) == jnp.float32 and precision in _EXACT_FLOAT32:
        return False
    plan_y, plan_x = _plans(x_shape, w_shape, geometry)
    return mgpu_conv_tiles(_phases.tap_table(plan_y, plan_x), x_shape[3], w_shape[3], dtype) is not None


def _conv_forward(x, w, in_scale, out_scale, geometry, backend, block_sizes):
    """The phased convolution on `backend`: the Mosaic GPU kernel where it applies (block_sizes do
    not tile it), the Triton / interpreted Pallas kernel otherwise."""
    if uses_mosaic_gpu(backend):
        if mosaic_gpu_conv_applies(x.shape, w.shape, geometry, x.dtype):
            return _phased_conv_mgpu(x, w, in_scale, out_scale, geometry, backend)
        backend = _MOSAIC_GPU_FALLBACK[backend]
    return _phased_conv_forward(x, w, in_scale, out_scale, geometry, backend, block_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _phased_conv(x, w, in_scale, out_scale, geometry, backend, block_sizes):
    """y = out_scale * correlate(pad(zero_insert(x * in_scale, up)), w)[::down], in x's dtype.

    geometry = (up, down, (x0, x1, y0, y1)); w is [kh, kw, Cin, Cout]; scales are [N, C] float32;
    block_sizes: a `ConvBlockSizes` or None (automatic), for every kernel of every order.
    """
    return _conv_forward(x, w, in_scale, out_scale, geometry, backend, block_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _weight_grad(x, g, in_scale, w_shape, geometry, backend, block_sizes):
    """dW[ky, kx, i, o] = sum_{n, pixels} (x * in_scale)[window(ky, kx), i] * g[o], float32.

    A custom_vjp of its own so that second-order gradients (R1, path length) stay in Pallas: the
    weight gradient is bilinear in (x, g) and both of its transposes are phased convolutions.
    """
    backend = _MOSAIC_GPU_FALLBACK.get(backend, backend)  # no Mosaic GPU weight-gradient kernel yet
    return _weight_grad_forward(x, g, in_scale, w_shape, geometry, backend, block_sizes)


def _weight_grad_fwd(x, g, in_scale, w_shape, geometry, backend, block_sizes):
    return _weight_grad(x, g, in_scale, w_shape, geometry, backend, block_sizes), (x, g, in_scale)


def _weight_grad_bwd(w_shape, geometry, backend, block_sizes, residuals, d_w):
    x, g, in_scale = residuals
    n = x.shape[0]
    ones_out = jnp.ones((n, w_shape[3]), jnp.float32)
    ones_in = jnp.ones((n, w_shape[2]), jnp.float32)
    # d g = conv(x * in_scale, d_w); d (x * in_scale) = conv_transpose(g, d_w).
    grad_g = _phased_conv(x, d_w.astype(x.dtype), in_scale, ones_out, geometry, backend,
                          block_sizes).astype(g.dtype)
    d_w_t = jnp.flip(d_w, (0, 1)).transpose(0, 1, 3, 2).astype(g.dtype)
    t = _phased_conv(g, d_w_t, ones_out, ones_in,
                     _transposed_geometry(x.shape, g.shape, w_shape, geometry), backend, block_sizes)
    t = t.astype(jnp.float32)
    grad_x = (t * in_scale[:, None, None, :]).astype(x.dtype)
    grad_in_scale = jnp.sum(t * x.astype(jnp.float32), axis=(1, 2))
    return grad_x, grad_g, grad_in_scale


_weight_grad.defvjp(_weight_grad_fwd, _weight_grad_bwd)


def _transposed_geometry(x_shape, y_shape, w_shape, geometry):
    up, down, (px0, _, py0, _) = geometry
    tx0, tx1 = _phases.transpose_padding(x_shape[2], y_shape[2], up, down, px0, w_shape[1])
    ty0, ty1 = _phases.transpose_padding(x_shape[1], y_shape[1], up, down, py0, w_shape[0])
    return down, up, (tx0, tx1, ty0, ty1)


def _phased_conv_fwd(x, w, in_scale, out_scale, geometry, backend, block_sizes):
    y = _phased_conv(x, w, in_scale, out_scale, geometry, backend, block_sizes)
    return y, (x, w, in_scale, out_scale, y)


def _phased_conv_bwd(geometry, backend, block_sizes, residuals, dy):
    x, w, in_scale, out_scale, y = residuals
    # Gradient w.r.t. (x * in_scale): the transposed convolution of dy * out_scale, i.e. the same
    # kernel with the plan transposed (up <-> down), the taps flipped and Cin <-> Cout swapped.
    w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    ones = jnp.ones((x.shape[0], x.shape[3]), jnp.float32)
    t = _phased_conv(dy, w_t, out_scale, ones, _transposed_geometry(x.shape, dy.shape, w.shape, geometry),
                     backend, block_sizes).astype(jnp.float32)
    grad_x = (t * in_scale[:, None, None, :]).astype(x.dtype)
    grad_in_scale = jnp.sum(t * x.astype(jnp.float32), axis=(1, 2))
    dy32 = dy.astype(jnp.float32)
    # y = out_scale * c, so sum(dy * c) = sum(dy * y) / out_scale (out_scale > 0 in this module).
    grad_out_scale = jnp.sum(dy32 * y.astype(jnp.float32), axis=(1, 2)) / out_scale
    g = (dy32 * out_scale[:, None, None, :]).astype(dy.dtype)
    grad_w = _weight_grad(x, g, in_scale, tuple(w.shape), geometry, backend, block_sizes).astype(w.dtype)
    return grad_x, grad_w, grad_in_scale, grad_out_scale


_phased_conv.defvjp(_phased_conv_fwd, _phased_conv_bwd)


def _modulated_conv2d_pallas(x, weight, styles, *, demodulate, up, down, padding, f, backend, block_sizes):
    dcoef = demodulation_coefficients(weight, styles, demodulate)
    styles = styles.astype(jnp.float32)
    pads = resample_padding(padding, up, down, f)
    keep = ("interpret", "tpu_interpret", "mosaic_gpu", "mosaic_gpu_interpret")
    filter_impl = backend if backend in keep else "pallas"
    if down > 1:  # blur (the upfirdn2d kernel), then the stride-`down` phased conv
        x = upfirdn2d(x, f, padding=pads, impl=filter_impl)
        return _phased_conv(x, weight, styles, dcoef, (1, down, (0, 0, 0, 0)), backend, block_sizes)
    y = _phased_conv(x, weight, styles, dcoef, (up, 1, pads), backend, block_sizes)
    if up > 1:  # transposed conv done by the phases; the blur follows
        y = upfirdn2d(y, f, gain=up * up, impl=filter_impl)
    return y


def modulated_conv2d(x, weight, styles, demodulate=True, up=1, down=1, padding=0,
                     resample_filter=None, impl="auto", block_sizes=None):
    """StyleGAN2 modulated convolution (correlation, like `lax.conv`), NHWC.

    Args:
      x: [N, H, W, Cin] float32 / bfloat16 (float32 accumulation).
      weight: [kh, kw, Cin, Cout]. styles: [N, Cin].
      demodulate: divide each (sample, output channel) by the norm of its modulated weight.
      up: 2 = transposed stride-2 convolution then FIR blur. down: 2 = FIR blur then stride-2 conv.
      padding: int, (x, y) or (x0, x1, y0, y1), as the reference's conv2d_resample.
      resample_filter: FIR filter for up/down (default: setup_filter([1, 3, 3, 1])).
      impl: "auto" | "pallas" | "interpret" | "tpu_interpret" | "mosaic_gpu" | "mosaic_gpu_interpret" |
        "xla". "mosaic_gpu" (NVIDIA Hopper and newer): the convolution and its x-gradient on the
        Mosaic GPU kernel (kernels/modulated_conv2d_mosaic_gpu.py; wgmma, float32 accumulation; TF32
        for float32 inputs) and the filters on upfirdn2d's; the weight gradient, and convolutions the
        kernel does not take (`mosaic_gpu_conv_applies`), on the Triton kernel. "mosaic_gpu_interpret":
        the same in jax's GPU interpreter (jax >= 0.11), the Triton parts in Pallas's interpreter.
      block_sizes: a `ConvBlockSizes` to tile the Pallas kernels with (see its docstring), or None for
        the automatic choice. Tiles change the summation order only; "xla" ignores them.

    Weights are correlated, as in `lax.conv` and torch's conv2d. StyleGAN2-ADA's up-sampling layers
    convolve instead (flip_weight=False); an importer flips those kernels spatially.

    Differentiable in x, weight and styles under every impl, to any order (R1 and path-length
    regularisation need the second): the Pallas backward pass is the same conv kernel on the
    transposed plan plus a weight-gradient kernel, each a custom_vjp whose own transpose is again
    the conv kernel.
    """
    check_impl(impl)
    check_block_sizes(block_sizes)
    _check_args(x, weight, styles, up, down)
    f = default_filter(resample_filter, up, down)
    # Validate the output size now, with a clear message, rather than inside the kernels.
    pads = resample_padding(padding, up, down, f)
    if up > 1:
        _phases.plan_1d(x.shape[1], up, 1, pads[2], pads[3], weight.shape[0], "modulated_conv2d (height)")
    elif down == 1:
        _phases.plan_1d(x.shape[1], 1, 1, pads[2], pads[3], weight.shape[0], "modulated_conv2d (height)")

    impl = resolve_auto(impl, modconv_key(x.shape, weight.shape, up, down, padding, demodulate, x.dtype))

    def xla_fn(x, weight, styles):
        return modulated_conv2d_reference(x, weight, styles, demodulate, up, down, padding, f)

    def kernel_fn(x, weight, styles, backend):
        if uses_tpu_layout(backend) and not fits_tpu_vmem(
                tpu_vmem_estimate(x.shape, weight.shape, up, down, pads, block_sizes),
                f"modulated_conv2d: x {x.shape}, weight {weight.shape}"):
            return xla_fn(x, weight, styles)
        return _modulated_conv2d_pallas(x, weight, styles, demodulate=demodulate, up=up, down=down,
                                        padding=padding, f=f, backend=backend, block_sizes=block_sizes)

    return dispatch(impl, xla_fn, kernel_fn, x, weight, styles,
                    batched=(True, False, styles.shape[0] == x.shape[0]))
