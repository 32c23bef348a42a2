"""Modulated convolution (StyleGAN2), NHWC, with optional up/down-sampling.

    y[n] = dcoef[n] * conv_resample(x[n] * styles[n], weight)
    dcoef[n, o] = 1 / sqrt(sum_{kh, kw, i} (weight[kh, kw, i, o] * styles[n, i])^2 + 1e-8)

The weight is shared by the batch; styles scale the input channels and the demodulation scales
the output channels, so the kernel never materialises a per-sample weight.

Layout (the JAX Pallas ops pattern):
- `_conv_kernel`: Pallas kernel, one tile of output pixels x output channels of a "phased"
  convolution (stride-1 taps from `kernels._phases`, which also expresses stride-2 and transposed
  stride-2 convolutions), with an input-channel scale and an output-channel scale fused in.
- `_weight_grad_kernel_gpu` / `_weight_grad_kernel_tpu`: Pallas kernels for the weight gradient.
- `_phased_conv`: the `jax.custom_vjp` core; its backward pass is the same conv kernel on the
  transposed plan (gradient w.r.t. x) plus `_weight_grad`, itself a custom_vjp over the weight-
  gradient kernels whose transposes are phased convolutions again (so every order is Pallas).
- `modulated_conv2d`: the public op. `modulated_conv2d_reference`: the plain-JAX ("xla") path;
  `modulated_conv2d_grouped_reference`: the grouped-convolution formulation, for comparison.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from . import _phases
from ._args import check_impl, filter_size, parse_padding, setup_filter
from ._dispatch import TPU_LANES, dispatch, interpret_mode, jit_per_shape, uses_tpu_layout
from .plans import GPU_SHARED_MEMORY_BUDGET_BYTES, TPU_VMEM_BUDGET_BYTES  # noqa: F401  read-only aliases
from .plans import compiler_params as _compiler_params, conv_plans as _plans, conv_tiles as _conv_tiles
from .plans import conv_tpu_vmem_estimate as tpu_vmem_estimate, fits_tpu_vmem
from .plans import triton_pipelining, triton_shared_memory_estimate  # noqa: F401
from .conv2d_resample import dilated_conv, polyphase_conv
from .upfirdn2d import _check_x, upfirdn2d, upfirdn2d_reference

_DN = ("NHWC", "HWIO", "NHWC")
_PRECISION = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------------
# Arguments and the resampling geometry (the reference's conv2d_resample)


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


def resample_padding(padding, up, down, f) -> tuple[int, int, int, int]:
    """Total (x0, x1, y0, y1) padding of conv2d_resample, including the filter's share."""
    px0, px1, py0, py1 = parse_padding(padding)
    fw, fh = filter_size(f)
    if up > 1:
        px0, px1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2
        py0, py1 = py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2
    return px0, px1, py0, py1


def demodulation_coefficients(weight, styles, demodulate=True):
    """[N, Cout] = rsqrt(sum_{kh,kw,i} (w * s_i)^2 + 1e-8), or ones without demodulation."""
    if not demodulate:
        return jnp.ones((styles.shape[0], weight.shape[3]), jnp.float32)
    wsq = jnp.sum(jnp.square(weight.astype(jnp.float32)), axis=(0, 1))  # [Cin, Cout]
    return jax.lax.rsqrt(jnp.square(styles.astype(jnp.float32)) @ wsq + 1e-8)


# --------------------------------------------------------------------------------------------------
# Plain-JAX references


def conv2d_resample_reference(x, weight, f=None, up=1, down=1, padding=0):
    """Correlation with `weight` plus up/down-sampling: the XLA path.

    up: the transposed (zero-inserting) convolution as stride-1 phase convolutions
    (`conv2d_resample.polyphase_conv`: its textbook input-dilated form has a weight gradient ~75x
    slower than its forward on XLA:CPU), then the FIR blur with gain up**2.
    down: FIR blur, then the stride-`down` convolution in polyphase form. Equal to the generic
    definition upfirdn2d(up) -> conv -> upfirdn2d(down) because the filters commute. float32 result.
    """
    px0, px1, py0, py1 = resample_padding(padding, up, down, f)
    x = x.astype(jnp.float32)
    weight = weight.astype(jnp.float32)
    if up > 1:
        y = polyphase_conv(x, weight, up, 1, (px0, px1, py0, py1), precision=_PRECISION)
        return upfirdn2d_reference(y, f, gain=up * up)
    if down > 1:
        # polyphase too: the strided convolution's second derivatives (R1) run ~10x slower on XLA:CPU
        x = upfirdn2d_reference(x, f, padding=(px0, px1, py0, py1))
        return polyphase_conv(x, weight, 1, down, (0, 0, 0, 0), precision=_PRECISION)
    # a plain padded convolution: XLA:CPU's own gradients of it are fast at every order
    return dilated_conv(x, weight, 1, 1, (px0, px1, py0, py1), precision=_PRECISION)


def modulated_conv2d_reference(x, weight, styles, demodulate=True, up=1, down=1, padding=0,
                               resample_filter=None):
    """The "xla" implementation: scale x by the styles, one shared-weight conv, scale by dcoef."""
    f = _default_filter(resample_filter, up, down)
    dcoef = demodulation_coefficients(weight, styles, demodulate)
    xs = x.astype(jnp.float32) * styles.astype(jnp.float32)[:, None, None, :]
    y = conv2d_resample_reference(xs, weight, f, up, down, padding)
    return (y * dcoef[:, None, None, :]).astype(x.dtype)


def modulated_conv2d_grouped_reference(x, weight, styles, demodulate=True, up=1, down=1,
                                       padding=0, resample_filter=None):
    """The reference's fused formulation: per-sample weights, batch folded into conv groups."""
    f = _default_filter(resample_filter, up, down)
    n, h, w, cin = x.shape
    kh, kw, _, cout = weight.shape
    wn = weight.astype(jnp.float32)[None] * styles.astype(jnp.float32)[:, None, None, :, None]
    wn = wn * demodulation_coefficients(weight, styles, demodulate)[:, None, None, None, :]
    wn = wn.transpose(1, 2, 3, 0, 4).reshape(kh, kw, cin, n * cout)  # groups = samples
    xg = x.astype(jnp.float32).transpose(1, 2, 0, 3).reshape(1, h, w, n * cin)
    px0, px1, py0, py1 = resample_padding(padding, up, down, f)
    conv = functools.partial(jax.lax.conv_general_dilated, dimension_numbers=_DN,
                             feature_group_count=n, precision=jax.lax.Precision.HIGHEST)
    if up > 1:
        y = conv(xg, wn, (1, 1), ((py0, py1 + up - 1), (px0, px1 + up - 1)), lhs_dilation=(up, up))
        y = upfirdn2d_reference(y, f, gain=up * up)
    elif down > 1:
        y = conv(upfirdn2d_reference(xg, f, padding=(px0, px1, py0, py1)), wn, (down, down), "VALID")
    else:
        y = conv(xg, wn, (1, 1), ((py0, py1), (px0, px1)))
    _, ho, wo, _ = y.shape
    return y.reshape(ho, wo, n, cout).transpose(2, 0, 1, 3).astype(x.dtype)


def _default_filter(resample_filter, up, down):
    if resample_filter is None:
        return jnp.asarray(setup_filter([1, 3, 3, 1])) if (up > 1 or down > 1) else None
    return jnp.asarray(resample_filter, jnp.float32)


# --------------------------------------------------------------------------------------------------
# Pallas kernels


def _dot(a, b, dims=(((1,), (0,)), ((), ()))):
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _conv_kernel(in_scale_ref, out_scale_ref, w_ref, x_ref, o_ref, *, table, tile_h, tile_w,
                 tiles_w, block_in, compute_dtype):
    """One [tile_h * tile_w, block_out] tile of every output phase of the phased convolution.

    x_ref: [1, phases, tile_h + halo, W, Cin] window; w_ref: [kh, kw, Cin, block_out];
    in_scale_ref: [1, 1, Cin]; out_scale_ref: [1, 1, block_out]; o_ref: [1, tile_h, uy, tile_w, ux, bo].
    With one column tile (the TPU layout) or one input-channel block, the offsets are Python ints:
    Mosaic accepts a static unaligned tap offset but cannot prove a dynamic one aligned (E2003).
    """
    col0 = 0 if tiles_w == 1 else pl.program_id(3) * tile_w
    cin = x_ref.shape[-1]
    bo = o_ref.shape[-1]
    m = tile_h * tile_w
    out_scale = out_scale_ref[0, 0, :].astype(jnp.float32)
    for qy, qx, taps in table:
        def body(ci, acc, taps=taps):
            c0 = 0 if isinstance(ci, int) else pl.multiple_of(ci * block_in, block_in)
            scale = in_scale_ref[0, 0, pl.ds(c0, block_in)].astype(jnp.float32)
            for ky, kx, r, oy, ox in taps:
                a = x_ref[0, r, pl.ds(oy, tile_h), pl.ds(col0 + ox, tile_w), pl.ds(c0, block_in)]
                b = w_ref[ky, kx, pl.ds(c0, block_in), :].astype(jnp.float32) * scale[:, None]
                acc += _dot(a.reshape(m, block_in).astype(compute_dtype), b.astype(compute_dtype))
            return acc

        acc = jnp.zeros((m, bo), jnp.float32)
        if cin == block_in:
            acc = body(0, acc)
        else:
            acc = jax.lax.fori_loop(0, cin // block_in, body, acc)
        acc = acc * out_scale[None, :]
        o_ref[0, :, qy, :, qx, :] = acc.reshape(tile_h, tile_w, bo).astype(o_ref.dtype)


def _accumulate_weight_grad(accs, x_tile, g_tile, scale, flat_taps, m, compute_dtype):
    """accs[t] += (x * scale)^T @ g over one pixel tile, for every tap t."""
    out = []
    for acc, (qy, qx, ky, kx, r, oy, ox) in zip(accs, flat_taps):
        a = x_tile(r, oy, ox).astype(jnp.float32) * scale[None, None, :]
        b = g_tile(qy, qx)
        a = a.reshape(m, a.shape[-1]).astype(compute_dtype)
        b = b.reshape(m, b.shape[-1]).astype(compute_dtype)
        out.append(acc + _dot(a, b, (((0,), (0,)), ((), ()))))
    return out


def _weight_grad_kernel_gpu(in_scale_ref, x_ref, g_ref, o_ref, *, flat_taps, tile_h, tile_w,
                            tiles_h, tiles_w, batch, compute_dtype):
    """GPU / interpret: each program owns a [bi, bo] block of every tap and loops over pixels.

    x_ref: [N, phases, Jy, Jx, Cin] (whole array); g_ref: [N, rows, uy, cols, ux, Cout] (whole);
    o_ref: [kh, kw, bi, bo].
    """
    bi, bo = o_ref.shape[2], o_ref.shape[3]
    c0, o0 = pl.program_id(0) * bi, pl.program_id(1) * bo
    m = tile_h * tile_w

    def body(step, accs):
        # lax.div/rem: jnp's floor division lowers to select ops Triton's integer rules reject.
        n = jax.lax.div(step, tiles_h * tiles_w)
        h0 = jax.lax.rem(jax.lax.div(step, tiles_w), tiles_h) * tile_h
        w0 = jax.lax.rem(step, tiles_w) * tile_w
        scale = in_scale_ref[n, 0, pl.ds(c0, bi)].astype(jnp.float32)
        x_tile = lambda r, oy, ox: x_ref[n, r, pl.ds(h0 + oy, tile_h), pl.ds(w0 + ox, tile_w), pl.ds(c0, bi)]
        g_tile = lambda qy, qx: g_ref[n, pl.ds(h0, tile_h), qy, pl.ds(w0, tile_w), qx, pl.ds(o0, bo)]
        return tuple(_accumulate_weight_grad(accs, x_tile, g_tile, scale, flat_taps, m, compute_dtype))

    init = tuple(jnp.zeros((bi, bo), jnp.float32) for _ in flat_taps)
    accs = jax.lax.fori_loop(0, batch * tiles_h * tiles_w, body, init)
    for acc, (_, _, ky, kx, _, _, _) in zip(accs, flat_taps):
        o_ref[ky, kx] = acc


def _weight_grad_kernel_tpu(in_scale_ref, x_ref, g_ref, o_ref, *, flat_taps, tile_h, tile_w,
                            compute_dtype):
    """TPU: the batch and row tiles are sequential grid axes; the [kh, kw, bi, bo] block stays in
    VMEM across them and accumulates.

    x_ref: [1, phases, tile_h + halo, Jx, bi] window; g_ref: [1, tile_h, uy, tile_w, ux, bo].
    """
    @pl.when((pl.program_id(2) == 0) & (pl.program_id(3) == 0))
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    scale = in_scale_ref[0, 0, :].astype(jnp.float32)
    x_tile = lambda r, oy, ox: x_ref[0, r, pl.ds(oy, tile_h), pl.ds(ox, tile_w), :]
    g_tile = lambda qy, qx: g_ref[0, :, qy, :, qx, :]
    accs = [o_ref[ky, kx] for (_, _, ky, kx, _, _, _) in flat_taps]
    accs = _accumulate_weight_grad(accs, x_tile, g_tile, scale, flat_taps, tile_h * tile_w,
                                   compute_dtype)
    for acc, (_, _, ky, kx, _, _, _) in zip(accs, flat_taps):
        o_ref[ky, kx] = acc


# --------------------------------------------------------------------------------------------------
# Wrappers


def _pad_last(a, size):
    return a if a.shape[-1] == size else jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, size - a.shape[-1])])


def _compute_dtype(x):
    return jnp.float32 if x.dtype == jnp.float32 else x.dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _phased_conv(x, w, in_scale, out_scale, geometry, backend):
    """y = out_scale * correlate(pad(zero_insert(x * in_scale, up)), w)[::down], in x's dtype.

    geometry = (up, down, (x0, x1, y0, y1)); w is [kh, kw, Cin, Cout]; scales are [N, C] float32.
    """
    return _phased_conv_forward(x, w, in_scale, out_scale, geometry, backend)


# The pallas_call wrappers are jitted with their static arguments: a layer shape that recurs (G's
# synthesis runs three times per training step, D's layers three times, forward and backward share
# kernels) is traced and lowered once per program instead of once per call.
@jit_per_shape(static_argnums=(4, 5))
def _phased_conv_forward(x, w, in_scale, out_scale, geometry, backend):
    plan_y, plan_x = _plans(x.shape, w.shape, geometry)
    table = _phases.tap_table(plan_y, plan_x)
    n, _, _, cin = x.shape
    kh, kw, _, cout = w.shape
    tile_h, tile_w, bi, bo, cin_p, cout_p = _conv_tiles(
        backend, plan_y.out_per_phase, plan_x.out_per_phase, cin, cout)
    rows = _phases.round_up(plan_y.out_per_phase, tile_h)
    cols = _phases.round_up(plan_x.out_per_phase, tile_w)
    xph = _phases.split_phases(_pad_last(x, cin_p), plan_y, plan_x, rows, cols)
    w = jnp.pad(w, [(0, 0), (0, 0), (0, cin_p - cin), (0, cout_p - cout)])
    in_scale = _pad_last(in_scale.astype(jnp.float32), cin_p)[:, None, :]
    out_scale = _pad_last(out_scale.astype(jnp.float32), cout_p)[:, None, :]
    phases, in_w = xph.shape[1], xph.shape[3]
    uy, ux = plan_y.up, plan_x.up
    grid = (n, cout_p // bo, rows // tile_h, cols // tile_w)
    el = pl.Element
    kernel = functools.partial(_conv_kernel, table=table, tile_h=tile_h, tile_w=tile_w,
                               tiles_w=cols // tile_w, block_in=bi, compute_dtype=_compute_dtype(x))
    stages, _ = triton_pipelining("conv", tile_h * tile_w, bi, bo, table, loop=cin_p > bi)
    y = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((1, 1, cin_p), lambda i, j, t, u: (i, 0, 0)),
            pl.BlockSpec((1, 1, bo), lambda i, j, t, u: (i, 0, j)),
            pl.BlockSpec((kh, kw, cin_p, bo), lambda i, j, t, u: (0, 0, 0, j)),
            pl.BlockSpec((el(1), el(phases), el(tile_h + plan_y.halo), el(in_w), el(cin_p)),
                         lambda i, j, t, u: (i, 0, t * tile_h, 0, 0)),
        ],
        out_specs=pl.BlockSpec((1, tile_h, uy, tile_w, ux, bo), lambda i, j, t, u: (i, t, 0, u, 0, j)),
        out_shape=jax.ShapeDtypeStruct((n, rows, uy, cols, ux, cout_p), x.dtype),
        compiler_params=_compiler_params(backend, ("parallel",) * 4, stages),
        interpret=interpret_mode(backend),
        name="modulated_conv2d",
    )(in_scale, out_scale, w, xph)
    return _phases.merge_phases(y, plan_y, plan_x)[..., :cout]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _weight_grad(x, g, in_scale, w_shape, geometry, backend):
    """dW[ky, kx, i, o] = sum_{n, pixels} (x * in_scale)[window(ky, kx), i] * g[o], float32.

    A custom_vjp of its own so that second-order gradients (R1, path length) stay in Pallas: the
    weight gradient is bilinear in (x, g) and both of its transposes are phased convolutions.
    """
    return _weight_grad_forward(x, g, in_scale, w_shape, geometry, backend)


def _weight_grad_fwd(x, g, in_scale, w_shape, geometry, backend):
    return _weight_grad(x, g, in_scale, w_shape, geometry, backend), (x, g, in_scale)


def _weight_grad_bwd(w_shape, geometry, backend, residuals, d_w):
    x, g, in_scale = residuals
    n = x.shape[0]
    ones_out = jnp.ones((n, w_shape[3]), jnp.float32)
    ones_in = jnp.ones((n, w_shape[2]), jnp.float32)
    # d g = conv(x * in_scale, d_w); d (x * in_scale) = conv_transpose(g, d_w).
    grad_g = _phased_conv(x, d_w.astype(x.dtype), in_scale, ones_out, geometry, backend).astype(g.dtype)
    d_w_t = jnp.flip(d_w, (0, 1)).transpose(0, 1, 3, 2).astype(g.dtype)
    t = _phased_conv(g, d_w_t, ones_out, ones_in,
                     _transposed_geometry(x.shape, g.shape, w_shape, geometry), backend)
    t = t.astype(jnp.float32)
    grad_x = (t * in_scale[:, None, None, :]).astype(x.dtype)
    grad_in_scale = jnp.sum(t * x.astype(jnp.float32), axis=(1, 2))
    return grad_x, grad_g, grad_in_scale


_weight_grad.defvjp(_weight_grad_fwd, _weight_grad_bwd)


@jit_per_shape(static_argnums=(3, 4, 5))
def _weight_grad_forward(x, g, in_scale, w_shape, geometry, backend):
    plan_y, plan_x = _plans(x.shape, w_shape, geometry)
    table = _phases.tap_table(plan_y, plan_x)
    flat_taps = [(qy, qx, ky, kx, r, oy, ox) for qy, qx, taps in table for ky, kx, r, oy, ox in taps]
    n, _, _, cin = x.shape
    kh, kw, _, cout = w_shape
    tile_h, tile_w, bi, bo, cin_p, cout_p = _conv_tiles(
        backend, plan_y.out_per_phase, plan_x.out_per_phase, cin, cout)
    if uses_tpu_layout(backend):
        bi = TPU_LANES
    rows = _phases.round_up(plan_y.out_per_phase, tile_h)
    cols = _phases.round_up(plan_x.out_per_phase, tile_w)
    xph = _phases.split_phases(_pad_last(x, cin_p), plan_y, plan_x, rows, cols)
    in_scale = _pad_last(in_scale.astype(jnp.float32), cin_p)[:, None, :]
    # The output gradient in the kernel's phase layout; padded rows/cols are zero and add nothing.
    uy, ux = plan_y.up, plan_x.up
    g = jnp.pad(_pad_last(g, cout_p), [(0, 0), (0, rows * uy - g.shape[1]), (0, cols * ux - g.shape[2]), (0, 0)])
    g = g.reshape(n, rows, uy, cols, ux, cout_p)
    out_shape = jax.ShapeDtypeStruct((kh, kw, cin_p, cout_p), jnp.float32)
    out_spec = pl.BlockSpec((kh, kw, bi, bo), lambda i, j, *_: (0, 0, i, j))
    compute_dtype = _compute_dtype(x)
    if not flat_taps:
        return jnp.zeros((kh, kw, cin, cout), jnp.float32)
    if uses_tpu_layout(backend):
        el = pl.Element
        phases, in_w = xph.shape[1], xph.shape[3]
        kernel = functools.partial(_weight_grad_kernel_tpu, flat_taps=flat_taps, tile_h=tile_h,
                                   tile_w=tile_w, compute_dtype=compute_dtype)
        dw = pl.pallas_call(
            kernel,
            grid=(cin_p // bi, cout_p // bo, n, rows // tile_h),
            in_specs=[
                pl.BlockSpec((1, 1, bi), lambda i, j, b, t: (b, 0, i)),
                pl.BlockSpec((el(1), el(phases), el(tile_h + plan_y.halo), el(in_w), el(bi)),
                             lambda i, j, b, t: (b, 0, t * tile_h, 0, i * bi)),
                pl.BlockSpec((1, tile_h, uy, tile_w, ux, bo), lambda i, j, b, t: (b, t, 0, 0, 0, j)),
            ],
            out_specs=out_spec,
            out_shape=out_shape,
            compiler_params=_compiler_params(backend, ("parallel", "parallel", "arbitrary", "arbitrary")),
            interpret=interpret_mode(backend),
            name="modulated_conv2d_weight_grad",
        )(in_scale, xph, g)
    else:
        kernel = functools.partial(_weight_grad_kernel_gpu, flat_taps=flat_taps, tile_h=tile_h,
                                   tile_w=tile_w, tiles_h=rows // tile_h, tiles_w=cols // tile_w,
                                   batch=n, compute_dtype=compute_dtype)
        whole = lambda a: pl.BlockSpec(a.shape, lambda i, j: (0,) * a.ndim)
        dw = pl.pallas_call(
            kernel,
            grid=(cin_p // bi, cout_p // bo),
            in_specs=[whole(in_scale), whole(xph), whole(g)],
            out_specs=out_spec,
            out_shape=out_shape,
            compiler_params=_compiler_params(
                backend, None, triton_pipelining("weight_grad", tile_h * tile_w, bi, bo, table)[0]),
            interpret=interpret_mode(backend),
            name="modulated_conv2d_weight_grad",
        )(in_scale, xph, g)
    return dw[:, :, :cin, :cout]


def _transposed_geometry(x_shape, y_shape, w_shape, geometry):
    up, down, (px0, _, py0, _) = geometry
    tx0, tx1 = _phases.transpose_padding(x_shape[2], y_shape[2], up, down, px0, w_shape[1])
    ty0, ty1 = _phases.transpose_padding(x_shape[1], y_shape[1], up, down, py0, w_shape[0])
    return down, up, (tx0, tx1, ty0, ty1)


def _phased_conv_fwd(x, w, in_scale, out_scale, geometry, backend):
    y = _phased_conv(x, w, in_scale, out_scale, geometry, backend)
    return y, (x, w, in_scale, out_scale, y)


def _phased_conv_bwd(geometry, backend, residuals, dy):
    x, w, in_scale, out_scale, y = residuals
    # Gradient w.r.t. (x * in_scale): the transposed convolution of dy * out_scale, i.e. the same
    # kernel with the plan transposed (up <-> down), the taps flipped and Cin <-> Cout swapped.
    w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    ones = jnp.ones((x.shape[0], x.shape[3]), jnp.float32)
    t = _phased_conv(dy, w_t, out_scale, ones, _transposed_geometry(x.shape, dy.shape, w.shape, geometry),
                     backend).astype(jnp.float32)
    grad_x = (t * in_scale[:, None, None, :]).astype(x.dtype)
    grad_in_scale = jnp.sum(t * x.astype(jnp.float32), axis=(1, 2))
    dy32 = dy.astype(jnp.float32)
    # y = out_scale * c, so sum(dy * c) = sum(dy * y) / out_scale (out_scale > 0 in this module).
    grad_out_scale = jnp.sum(dy32 * y.astype(jnp.float32), axis=(1, 2)) / out_scale
    g = (dy32 * out_scale[:, None, None, :]).astype(dy.dtype)
    grad_w = _weight_grad(x, g, in_scale, tuple(w.shape), geometry, backend).astype(w.dtype)
    return grad_x, grad_w, grad_in_scale, grad_out_scale


_phased_conv.defvjp(_phased_conv_fwd, _phased_conv_bwd)


def _modulated_conv2d_pallas(x, weight, styles, *, demodulate, up, down, padding, f, backend):
    dcoef = demodulation_coefficients(weight, styles, demodulate)
    styles = styles.astype(jnp.float32)
    pads = resample_padding(padding, up, down, f)
    filter_impl = backend if backend in ("interpret", "tpu_interpret") else "pallas"
    if down > 1:  # blur (the upfirdn2d kernel), then the stride-`down` phased conv
        x = upfirdn2d(x, f, padding=pads, impl=filter_impl)
        return _phased_conv(x, weight, styles, dcoef, (1, down, (0, 0, 0, 0)), backend)
    y = _phased_conv(x, weight, styles, dcoef, (up, 1, pads), backend)
    if up > 1:  # transposed conv done by the phases; the blur follows
        y = upfirdn2d(y, f, gain=up * up, impl=filter_impl)
    return y


def modulated_conv2d(x, weight, styles, demodulate=True, up=1, down=1, padding=0,
                     resample_filter=None, impl="auto"):
    """StyleGAN2 modulated convolution (correlation, like `lax.conv`), NHWC.

    Args:
      x: [N, H, W, Cin] float32 / bfloat16 (float32 accumulation).
      weight: [kh, kw, Cin, Cout]. styles: [N, Cin].
      demodulate: divide each (sample, output channel) by the norm of its modulated weight.
      up: 2 = transposed stride-2 convolution then FIR blur. down: 2 = FIR blur then stride-2 conv.
      padding: int, (x, y) or (x0, x1, y0, y1), as the reference's conv2d_resample.
      resample_filter: FIR filter for up/down (default: setup_filter([1, 3, 3, 1])).
      impl: "auto" | "pallas" | "interpret" | "xla".

    Weights are correlated, as in `lax.conv` and torch's conv2d. StyleGAN2-ADA's up-sampling layers
    convolve instead (flip_weight=False); an importer flips those kernels spatially.

    Differentiable in x, weight and styles under every impl, to any order (R1 and path-length
    regularisation need the second): the Pallas backward pass is the same conv kernel on the
    transposed plan plus a weight-gradient kernel, each a custom_vjp whose own transpose is again
    the conv kernel.
    """
    check_impl(impl)
    _check_args(x, weight, styles, up, down)
    f = _default_filter(resample_filter, up, down)
    # Validate the output size now, with a clear message, rather than inside the kernels.
    pads = resample_padding(padding, up, down, f)
    if up > 1:
        _phases.plan_1d(x.shape[1], up, 1, pads[2], pads[3], weight.shape[0], "modulated_conv2d (height)")
    elif down == 1:
        _phases.plan_1d(x.shape[1], 1, 1, pads[2], pads[3], weight.shape[0], "modulated_conv2d (height)")

    def xla_fn(x, weight, styles):
        return modulated_conv2d_reference(x, weight, styles, demodulate, up, down, padding, f)

    def kernel_fn(x, weight, styles, backend):
        if uses_tpu_layout(backend) and not fits_tpu_vmem(
                tpu_vmem_estimate(x.shape, weight.shape, up, down, pads),
                f"modulated_conv2d: x {x.shape}, weight {weight.shape}"):
            return xla_fn(x, weight, styles)
        return _modulated_conv2d_pallas(x, weight, styles, demodulate=demodulate, up=up, down=down,
                                        padding=padding, f=f, backend=backend)

    return dispatch(impl, xla_fn, kernel_fn, x, weight, styles,
                    batched=(True, False, styles.shape[0] == x.shape[0]))
