"""upfirdn2d on Pallas's Mosaic GPU backend (NVIDIA Hopper and newer: H100, H200).

The Triton backend of Pallas is deprecated since jax 0.11; Mosaic GPU is its maintained successor.
This is the same polyphase FIR filter as `upfirdn2d._upfirdn2d_kernel`, written for Mosaic GPU's
model: the kernel gets its operands in global memory and moves them itself, with TMA copies, into
shared memory.

Layout of this module (the JAX Pallas ops pattern; the public op and its custom_vjp are
`upfirdn2d.upfirdn2d(..., impl="mosaic_gpu")`, whose backward pass runs this kernel again, and its
plain-JAX reference is `upfirdn2d.upfirdn2d_reference`):
- `_upfirdn2d_mgpu_kernel`: the kernel body, one program per (image, row tile, column tile, channel
  block): a TMA copy of the input window (with its halo) and the taps into shared memory, the taps'
  multiply-adds in float32 registers one output row at a time, a TMA copy of every output phase out.
- `_upfirdn2d_mosaic_gpu`: the wrapper: polyphase split, tiles, and `plgpu.kernel`.
- `mgpu_tiles`: the tile sizes and the shared-memory estimate.

Why `plgpu.kernel` and not `pallas_call` with BlockSpecs: on jax 0.12 a `pallas_call` with Mosaic GPU
compiler params has no lowering rule any more (only `plgpu.kernel` / `core_map` lowers), and the GPU
interpreter (`plgpu.InterpretGPUParams`, jax >= 0.11) takes only whole-array windows; explicit TMA
copies from whole-array refs work on jax 0.10.2 through 0.12 and in the interpreter.
Mosaic GPU's constraints shape the tiles: every async copy moves a multiple of 128 bytes (the
window's width is rounded up to 16 columns, the taps padded to 32 columns), at most 5 strided
dimensions (outputs are written phase-major, [N, Uy*Ux, rows, cols, C], and merged after), the
channel block at least 16 bytes.
Speed on a device: not measured (no session has had a GPU); `impl="auto"` picks this kernel only where
a tuning table measured it fastest.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import _phases
from .plans import fir_plans

TILE_H = 8  # output rows per program and phase
TILE_W = 16  # output columns per program and phase (TILE_H * TILE_W = 128: whole 128-byte copies)
MAX_CHANNEL_BLOCK = 32
SMEM_BUDGET_BYTES = 200 * 1024  # H100/H200: 227 KiB of shared memory per block
_TAP_COLUMNS = 32  # taps padded to whole 128-byte rows of float32


def _plgpu():
    """jax.experimental.pallas.mosaic_gpu, imported when a kernel is built (not at import time)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return plgpu


def interpret_supported() -> bool:
    """Whether the installed jax runs Mosaic GPU kernels in its GPU interpreter on any platform."""
    return hasattr(_plgpu(), "InterpretGPUParams")


def interpret_params():
    if not interpret_supported():
        raise NotImplementedError(
            f"Mosaic GPU interpret mode needs jax >= 0.11 (jax.experimental.pallas.mosaic_gpu."
            f"InterpretGPUParams); jax {jax.__version__} is installed. Lowering for cuda works here.")
    return _plgpu().InterpretGPUParams()


def mgpu_tiles(plan_y, plan_x, channels: int, itemsize: int):
    """(tile_h, tile_w, window_h, window_w, channel_block, padded_channels, smem_bytes).

    The channel block is the widest of 32, 16, 8 channels (at least 16 bytes) whose shared memory
    fits SMEM_BUDGET_BYTES; the window is the input a tile reads (tile plus halo), its width rounded
    up to 16 columns so that its copy is whole 128-byte units."""
    phases_in = plan_y.down * plan_x.down
    phases_out = plan_y.up * plan_x.up
    window_h = TILE_H + plan_y.halo
    window_w = _phases.round_up(TILE_W + plan_x.halo, 16)
    min_cb = max(8, 16 // itemsize)
    cb = min(MAX_CHANNEL_BLOCK, _phases.round_up(channels, min_cb))
    while True:
        smem = (phases_in * window_h * window_w + phases_out * TILE_H * TILE_W) * cb * itemsize
        if smem <= SMEM_BUDGET_BYTES or cb <= min_cb:
            break
        cb //= 2
    return TILE_H, TILE_W, window_h, window_w, cb, _phases.round_up(channels, cb), smem


def _upfirdn2d_mgpu_kernel(g_gmem, x_gmem, o_gmem, g_smem, x_smem, o_smem, barrier, *, table, tile_h,
                           tile_w, window_h, window_w, cb, plgpu):
    """One program: x_smem <- x_gmem[i, :, rows of tile t + halo, cols of tile u + halo, block j],
    then per output phase and row the taps' multiply-adds, o_smem -> o_gmem[i, :, tile t, tile u, j].

    g_gmem: [fh, 32] correlation taps (float32, zero-padded columns).
    x_gmem: [N, phases, Jy, Jx, Cp] polyphase input.  o_gmem: [N, Uy*Ux, rows, cols, Cp].
    """
    from jax.experimental import pallas as pl

    i, t, u, j = (jax.lax.axis_index(a) for a in ("n", "t", "u", "j"))
    plgpu.copy_gmem_to_smem(g_gmem, g_smem, barrier)
    plgpu.copy_gmem_to_smem(x_gmem.at[i, :, pl.ds(t * tile_h, window_h), pl.ds(u * tile_w, window_w),
                                      pl.ds(j * cb, cb)], x_smem, barrier)
    plgpu.barrier_wait(barrier)
    for phase, (_, _, taps) in enumerate(table):
        for row in range(tile_h):
            acc = jnp.zeros((tile_w, cb), jnp.float32)
            for ky, kx, r, oy, ox in taps:
                acc = acc + x_smem[r, oy + row, pl.ds(ox, tile_w), :].astype(jnp.float32) * g_smem[ky, kx]
            o_smem[phase, row] = acc.astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[i, :, pl.ds(t * tile_h, tile_h), pl.ds(u * tile_w, tile_w),
                                              pl.ds(j * cb, cb)])
    plgpu.wait_smem_to_gmem(0)


def _upfirdn2d_mosaic_gpu(x, g, *, up, down, padding, interpret: bool):
    """Wrapper: [N, H, W, C] and the [fh, fw] correlation taps (gain folded in) -> [N, out_h, out_w, C]
    through the Mosaic GPU kernel (`interpret`: in jax's GPU interpreter, for tests on CPU)."""
    plgpu = _plgpu()
    plan_y, plan_x = fir_plans(x.shape, g.shape, up, down, padding)
    table = _phases.tap_table(plan_y, plan_x)
    n, _, _, c = x.shape
    tile_h, tile_w, window_h, window_w, cb, cp, _ = mgpu_tiles(plan_y, plan_x, c, x.dtype.itemsize)
    rows = _phases.round_up(plan_y.out_per_phase, tile_h)
    cols = _phases.round_up(plan_x.out_per_phase, tile_w)
    if cp != c:
        x = jnp.pad(x, [(0, 0), (0, 0), (0, 0), (0, cp - c)])
    # long enough for the last column tile's rounded-up window
    xph = _phases.split_phases(x, plan_y, plan_x, rows, cols - tile_w + window_w - plan_x.halo)
    phases_in, phases_out = xph.shape[1], plan_y.up * plan_x.up
    fh, fw = g.shape
    g = jnp.zeros((fh, _phases.round_up(fw, _TAP_COLUMNS)), jnp.float32).at[:, :fw].set(g)
    body = functools.partial(_upfirdn2d_mgpu_kernel, table=table, tile_h=tile_h, tile_w=tile_w,
                             window_h=window_h, window_w=window_w, cb=cb, plgpu=plgpu)
    y = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((n, phases_out, rows, cols, cp), x.dtype),
        scratch_types=[plgpu.SMEM(g.shape, jnp.float32),
                       plgpu.SMEM((phases_in, window_h, window_w, cb), x.dtype),
                       plgpu.SMEM((phases_out, tile_h, tile_w, cb), x.dtype),
                       plgpu.Barrier(num_arrivals=2)],
        grid=(n, rows // tile_h, cols // tile_w, cp // cb),
        grid_names=("n", "t", "u", "j"),
        interpret=interpret_params() if interpret else None,
    )(g, xph)
    y = y.reshape(n, plan_y.up, plan_x.up, rows, cols, cp).transpose(0, 3, 1, 4, 2, 5)
    return _phases.merge_phases(y, plan_y, plan_x)[..., :c]


__all__ = ["mgpu_tiles", "interpret_supported", "TILE_H", "TILE_W", "SMEM_BUDGET_BYTES"]
