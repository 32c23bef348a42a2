"""The Pallas kernels of modulated_conv2d and the wrappers that build their pallas_calls.

Kernels: `_conv_kernel`, one tile of output pixels x output channels of a "phased" convolution
(stride-1 taps from `_phases`, which also express stride-2 and transposed stride-2 convolutions)
with an input-channel and an output-channel scale fused in; `_weight_grad_kernel_gpu` /
`_weight_grad_kernel_tpu`, the weight gradient. Wrappers: `phased_conv_pallas`,
`weight_grad_pallas` (tiles, padding, grid, block specs per backend; tiles and budgets: `plans`).
No custom_vjp here: the public op (`modulated_conv2d`) wires the gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _phases
from ._dispatch import TPU_LANES, interpret_mode, jit_per_shape, uses_tpu_layout
from .plans import GPU_TARGET_PROGRAMS, compiler_params, conv_plans, conv_tiles, triton_pipelining, weight_grad_splits


# --------------------------------------------------------------------------------------------------
# Pallas kernels


def _dot(a, b, dims=(((1,), (0,)), ((), ()))):
    # precision None: JAX's `jax_default_matmul_precision` at trace time decides, as for the XLA path
    # (the default: TF32 on NVIDIA Ampere and newer, bf16 passes on TPU; "highest": full fp32)
    return jax.lax.dot_general(a, b, dims, precision=None, preferred_element_type=jnp.float32)


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
                            tiles_h, tiles_w, steps_per_split, compute_dtype):
    """GPU / interpret: each program owns a [bi, bo] block of every tap and loops over its part of the
    batch x pixel tiles (grid axis 2 numbers the parts; their partial sums are added up after).

    x_ref: [N, phases, Jy, Jx, Cin] (whole array); g_ref: [N, rows, uy, cols, ux, Cout] (whole);
    o_ref: [1, kh, kw, bi, bo] (this part's partial sum).
    """
    bi, bo = o_ref.shape[3], o_ref.shape[4]
    c0, o0 = pl.program_id(0) * bi, pl.program_id(1) * bo
    first = pl.program_id(2) * steps_per_split
    m = tile_h * tile_w

    def body(i, accs):
        step = first + i
        # lax.div/rem: jnp's floor division lowers to select ops Triton's integer rules reject.
        n = jax.lax.div(step, tiles_h * tiles_w)
        h0 = jax.lax.rem(jax.lax.div(step, tiles_w), tiles_h) * tile_h
        w0 = jax.lax.rem(step, tiles_w) * tile_w
        scale = in_scale_ref[n, 0, pl.ds(c0, bi)].astype(jnp.float32)
        x_tile = lambda r, oy, ox: x_ref[n, r, pl.ds(h0 + oy, tile_h), pl.ds(w0 + ox, tile_w), pl.ds(c0, bi)]
        g_tile = lambda qy, qx: g_ref[n, pl.ds(h0, tile_h), qy, pl.ds(w0, tile_w), qx, pl.ds(o0, bo)]
        return tuple(_accumulate_weight_grad(accs, x_tile, g_tile, scale, flat_taps, m, compute_dtype))

    init = tuple(jnp.zeros((bi, bo), jnp.float32) for _ in flat_taps)
    accs = jax.lax.fori_loop(0, steps_per_split, body, init)
    for acc, (_, _, ky, kx, _, _, _) in zip(accs, flat_taps):
        o_ref[0, ky, kx] = acc


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


# The pallas_call wrappers are jitted with their static arguments: a layer shape that recurs (G's
# synthesis runs three times per training step, D's layers three times, forward and backward share
# kernels) is traced and lowered once per program instead of once per call.
@jit_per_shape(static_argnums=(4, 5, 6))
def phased_conv_pallas(x, w, in_scale, out_scale, geometry, backend, block_sizes=None):
    """The phased convolution's pallas_call (see `modulated_conv2d._phased_conv`), in x's dtype."""
    plan_y, plan_x = conv_plans(x.shape, w.shape, geometry)
    table = _phases.tap_table(plan_y, plan_x)
    n, _, _, cin = x.shape
    kh, kw, _, cout = w.shape
    tile_h, tile_w, bi, bo, cin_p, cout_p = conv_tiles(
        backend, plan_y.out_per_phase, plan_x.out_per_phase, cin, cout, block_sizes)
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
        compiler_params=compiler_params(backend, ("parallel",) * 4, stages),
        interpret=interpret_mode(backend),
        name="modulated_conv2d",
    )(in_scale, out_scale, w, xph)
    return _phases.merge_phases(y, plan_y, plan_x)[..., :cout]


@jit_per_shape(static_argnums=(3, 4, 5, 6))
def weight_grad_pallas(x, g, in_scale, w_shape, geometry, backend, block_sizes=None):
    """The weight gradient's pallas_call (see `modulated_conv2d._weight_grad`), float32."""
    plan_y, plan_x = conv_plans(x.shape, w_shape, geometry)
    table = _phases.tap_table(plan_y, plan_x)
    flat_taps = [(qy, qx, ky, kx, r, oy, ox) for qy, qx, taps in table for ky, kx, r, oy, ox in taps]
    n, _, _, cin = x.shape
    kh, kw, _, cout = w_shape
    tile_h, tile_w, bi, bo, cin_p, cout_p = conv_tiles(
        backend, plan_y.out_per_phase, plan_x.out_per_phase, cin, cout, block_sizes)
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
            compiler_params=compiler_params(backend, ("parallel", "parallel", "arbitrary", "arbitrary")),
            interpret=interpret_mode(backend),
            name="modulated_conv2d_weight_grad",
        )(in_scale, xph, g)
    else:
        # Occupancy: (Cin/bi) x (Cout/bo) programs are few for narrow layers (2 for 64 -> 64), so the
        # batch x pixel-tile loop is cut into parts run by programs of their own, summed after.
        steps = n * (rows // tile_h) * (cols // tile_w)
        # (the interpreter runs programs one by one: a few parts there test the split, cheaply)
        splits = weight_grad_splits(steps, (cin_p // bi) * (cout_p // bo), block_sizes,
                                    GPU_TARGET_PROGRAMS if backend == "gpu" else 4)
        kernel = functools.partial(_weight_grad_kernel_gpu, flat_taps=flat_taps, tile_h=tile_h,
                                   tile_w=tile_w, tiles_h=rows // tile_h, tiles_w=cols // tile_w,
                                   steps_per_split=steps // splits, compute_dtype=compute_dtype)
        whole = lambda a: pl.BlockSpec(a.shape, lambda i, j, s: (0,) * a.ndim)
        partial_sums = pl.pallas_call(
            kernel,
            grid=(cin_p // bi, cout_p // bo, splits),
            in_specs=[whole(in_scale), whole(xph), whole(g)],
            out_specs=pl.BlockSpec((1, kh, kw, bi, bo), lambda i, j, s: (s, 0, 0, i, j)),
            out_shape=jax.ShapeDtypeStruct((splits, kh, kw, cin_p, cout_p), jnp.float32),
            compiler_params=compiler_params(
                backend, None, triton_pipelining("weight_grad", tile_h * tile_w, bi, bo, table)[0]),
            interpret=interpret_mode(backend),
            name="modulated_conv2d_weight_grad",
        )(in_scale, xph, g)
        dw = partial_sums.sum(0)
    return dw[:, :, :cin, :cout]
