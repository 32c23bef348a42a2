"""The phased convolution of modulated_conv2d on Pallas's Mosaic GPU backend (Hopper and newer).

The same convolution as `modulated_conv2d_pallas._conv_kernel` (stride-1 taps from `_phases`, which
also express the stride-2 and the transposed stride-2 convolutions), written for Mosaic GPU's model:
each tap is one matrix product on the tensor cores (`plgpu.wgmma`, float32 accumulation) of a TMA
copy of 64 shifted input pixels by the tap's [Cin, Cout block] weights.

Layout of this module (the JAX Pallas ops pattern; the public op and its custom_vjp are
`modulated_conv2d.modulated_conv2d(..., impl="mosaic_gpu")`, its plain-JAX reference is
`modulated_conv2d_ref.modulated_conv2d_reference`):
- `_conv_mgpu_kernel`: the kernel body, one program per (image, output row, 64-column tile, output
  channel block): per output phase, per tap, a TMA copy of the input row slice [64, Cin] and of the
  tap's weights [block, Cin] into swizzled shared memory, one wgmma into the float32 accumulator;
  the accumulator goes out through shared memory with a TMA copy.
- `_phased_conv_mosaic_gpu`: the wrapper: styles applied, polyphase split, tiles, `plgpu.kernel`.
- `mgpu_conv_tiles`: the tiles and the shared-memory estimate, and with it THE rule of which calls
  this kernel takes (None: the caller falls back to the Triton / interpreted Pallas kernel).

Precision: bfloat16 and float16 inputs go to wgmma as they are; float32 inputs go as float32, which
wgmma computes as TF32 on the device (jax's GPU interpreter computes full float32), so the public op
sends float32 here only where `jax_default_matmul_precision` allows TF32 (the GPU default; not the
tests' "highest"). Accumulation is float32 in every case; the result is cast to x's dtype.
The styles (input-channel scale) and the demodulation (output-channel scale) are applied by XLA in
the wrapper, fused into the phase split and the phase merge that copy the data anyway, so the kernel
is a plain correlation.
Backward pass: the gradient w.r.t. x is the same phased convolution on the transposed plan, so it
runs this kernel too; the weight gradient has no Mosaic GPU variant yet and runs the Triton kernel
(`impl="mosaic_gpu"`) or the interpreted Pallas kernel (`"mosaic_gpu_interpret"`).
No software pipelining yet: every tap's copies are awaited before its wgmma. Speed on a device: not
measured (no session has had a GPU); `impl="auto"` picks it only where a tuning table measured it
fastest.
Mosaic GPU's rules shape the tiles (lowering errors found on jax 0.10.2 / 0.12): wgmma's operands
must be swizzled and tiled shared memory on jax 0.10.2 (a 32, 64 or 128-byte swizzle, so Cin is padded
to whole 32 bytes); a copy into such a buffer must start on a whole 8-row tile (jax 0.12), so the
wrapper stacks one copy of the input phases per column offset of the taps, shifted by it (~kw x the
input's bytes once more per call, not measured); the right operand of a float32 wgmma must be
K-major (the weights are stored [Cout, Cin] and passed transposed); wgmma's M is 64 rows (the column
tile), its N a multiple of 8.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import _phases
from .upfirdn2d_mosaic_gpu import SMEM_BUDGET_BYTES, _plgpu, interpret_params

TILE_W = 64  # output columns per program and phase: wgmma's M for one warpgroup
MAX_BLOCK_OUT = 128
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _swizzle_bytes(row_bytes: int) -> int:
    return next(s for s in (128, 64, 32) if row_bytes % s == 0)


def mgpu_conv_tiles(table, cin: int, cout: int, dtype):
    """(block_out, cin_padded, cout_padded, swizzle_bytes, smem_bytes), or None where the kernel does
    not apply: a dtype wgmma does not take, an output phase without taps, or Cin too wide for the
    shared memory even with an 8-channel output block. The one place that decides the fallback."""
    dtype = jnp.dtype(dtype)
    if dtype not in [jnp.dtype(d) for d in SUPPORTED_DTYPES] or any(not taps for _, _, taps in table):
        return None
    isz = dtype.itemsize
    cin_p = _phases.round_up(cin, 32 // isz)
    bo = min(MAX_BLOCK_OUT, _phases.round_up(cout, 8))
    while True:
        smem = (TILE_W * cin_p + bo * cin_p + TILE_W * bo) * isz
        if smem <= SMEM_BUDGET_BYTES:
            break
        if bo <= 8:
            return None
        bo = max(8, bo // 2)
    return bo, cin_p, _phases.round_up(cout, bo), _swizzle_bytes(cin_p * isz), smem


def _conv_mgpu_kernel(x_gmem, w_gmem, o_gmem, x_smem, w_smem, o_smem, barriers, *, table, shifts, bo, plgpu):
    """One program: o_gmem[i, phase, row, cols of tile u, block j] for every output phase.

    x_gmem: [S, N, phases, Jy, cols, Cp] polyphase (scaled) input, shifted left by shifts[s] columns;
    w_gmem: [kh, kw, Coutp, Cp] (transposed taps); o_gmem: [N, Uy*Ux, rows, cols, Coutp].
    One barrier per tap: each is awaited once.
    """
    from jax.experimental import pallas as pl

    i, row, u, j = (jax.lax.axis_index(a) for a in ("n", "row", "u", "j"))
    b = 0
    for phase, (_, _, taps) in enumerate(table):
        def accumulate(acc_ref, taps=taps, b0=b):
            for t, (ky, kx, r, oy, ox) in enumerate(taps):
                x_tap = x_gmem.at[shifts.index(ox), i, r, row + oy, pl.ds(u * TILE_W, TILE_W)]
                plgpu.copy_gmem_to_smem(x_tap, x_smem, barriers.at[b0 + t])
                plgpu.copy_gmem_to_smem(w_gmem.at[ky, kx, pl.ds(j * bo, bo)], w_smem, barriers.at[b0 + t])
                plgpu.barrier_wait(barriers.at[b0 + t])
                plgpu.wgmma(acc_ref, x_smem, w_smem.T)
                plgpu.wgmma_wait(0)  # the next tap's copies overwrite the operands
            return acc_ref[...]

        acc = pl.run_scoped(accumulate, plgpu.ACC((TILE_W, bo), jnp.float32))
        b += len(taps)
        o_smem[...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[i, phase, row, pl.ds(u * TILE_W, TILE_W), pl.ds(j * bo, bo)])
        plgpu.wait_smem_to_gmem(0)  # o_smem is written again by the next phase


def _phased_conv_mosaic_gpu(x, w, in_scale, out_scale, plan_y, plan_x, tiles, *, interpret: bool):
    """Wrapper: y = out_scale * correlate(phases of (x * in_scale), w), [N, out_h, out_w, Cout] in x's
    dtype, through the Mosaic GPU kernel (`interpret`: in jax's GPU interpreter, for tests on CPU).
    `tiles`: `mgpu_conv_tiles(...)` of this call (not None)."""
    plgpu = _plgpu()
    table = _phases.tap_table(plan_y, plan_x)
    bo, cin_p, cout_p, swizzle, _ = tiles
    n, _, _, cin = x.shape
    kh, kw, _, cout = w.shape
    dtype = x.dtype
    rows = plan_y.out_per_phase
    cols = _phases.round_up(plan_x.out_per_phase, TILE_W)
    xs = (x.astype(jnp.float32) * in_scale.astype(jnp.float32)[:, None, None, :]).astype(dtype)
    xs = jnp.pad(xs, [(0, 0)] * 3 + [(0, cin_p - cin)])
    xph = _phases.split_phases(xs, plan_y, plan_x, rows, cols)
    # One copy of the phases per column offset ox of the taps, shifted by it: a TMA copy into a
    # swizzled buffer must start on a whole tile of 8 rows (jax 0.12's layout inference refuses the
    # tap's own offset), so every copy starts at a multiple of 64 in its shifted copy.
    shifts = sorted({ox for _, _, taps in table for *_, ox in taps})
    xsh = jnp.stack([xph[:, :, :, s:s + cols] for s in shifts])
    wt = jnp.pad(w.astype(dtype), [(0, 0), (0, 0), (0, cin_p - cin), (0, cout_p - cout)]).transpose(0, 1, 3, 2)
    uy, ux = plan_y.up, plan_x.up
    transforms = (plgpu.TilingTransform((8, swizzle // dtype.itemsize)), plgpu.SwizzleTransform(swizzle))
    body = functools.partial(_conv_mgpu_kernel, table=table, shifts=tuple(shifts), bo=bo, plgpu=plgpu)
    y = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((n, uy * ux, rows, cols, cout_p), dtype),
        scratch_types=[plgpu.SMEM((TILE_W, cin_p), dtype, transforms=transforms),
                       plgpu.SMEM((bo, cin_p), dtype, transforms=transforms),
                       plgpu.SMEM((TILE_W, bo), dtype),
                       plgpu.Barrier(num_arrivals=2, num_barriers=sum(len(t) for _, _, t in table))],
        grid=(n, rows, cols // TILE_W, cout_p // bo),
        grid_names=("n", "row", "u", "j"),
        interpret=interpret_params() if interpret else None,
    )(xsh, wt)
    y = y.reshape(n, uy, ux, rows, cols, cout_p).transpose(0, 3, 1, 4, 2, 5)
    y = _phases.merge_phases(y, plan_y, plan_x)[..., :cout]
    return (y.astype(jnp.float32) * out_scale.astype(jnp.float32)[:, None, None, :]).astype(dtype)


__all__ = ["mgpu_conv_tiles", "TILE_W", "MAX_BLOCK_OUT", "SUPPORTED_DTYPES"]
