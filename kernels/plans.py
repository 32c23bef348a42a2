"""Tile choices and memory budgets of the Pallas kernels, in one place for every op.

Both ops (`upfirdn2d`, `modulated_conv2d`) tile the same polyphase plan (`_phases`) and live under
the same limits: Triton's shared memory per block on GPU, Mosaic's VMEM on TPU. The budgets, the
models that estimate a kernel's footprint against them, the automatic tiles and the public
`ConvBlockSizes` that overrides them sit here so that the two ops cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pl_triton

from . import _phases
from ._dispatch import TPU_LANES, uses_tpu_layout

# --------------------------------------------------------------------------------------------------
# Budgets

# Mosaic (TPU) holds every block in VMEM, double-buffered. A call whose blocks would not fit is
# routed to the XLA path when compiling for TPU (with a warning) instead of failing inside Mosaic.
TPU_VMEM_BUDGET_BYTES = 12 * 2**20

# Triton software-pipelines a kernel's loop (num_stages=2) by keeping a second copy of every load of
# the loop body in shared memory: for a 3x3 conv that is 10 copies of the tap operands. The 64 -> 64
# channel 3x3 layer at 16 px then asked for 240 KiB (over even the H100's 227 KiB limit per block;
# found by the 8 x H100 AOT compile of the CUB config). Kernels whose pipelined footprint would pass
# this budget run their loop unpipelined (num_stages=1: 24-48 KiB). 96 KiB fits every GPU Triton
# targets (sm_86/89 allow 99 KiB per block; A100 163 KiB; H100 227 KiB). The upfirdn2d kernel has
# no loop and asks for under 1 KiB at any size (docs/performance.md), so it needs no estimate.
GPU_SHARED_MEMORY_BUDGET_BYTES = 96 * 2**10

# Streaming multiprocessors of the GPUs the kernels are sized for (H100 / H200 SXM: 132). A grid of
# fewer programs leaves SMs idle; the weight gradient splits its pixel loop until it has two waves.
GPU_SM_COUNT = 132
GPU_TARGET_PROGRAMS = 2 * GPU_SM_COUNT


# --------------------------------------------------------------------------------------------------
# Block sizes


def _is_power_of_two(value) -> bool:
    return (isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
            and value > 0 and value & (value - 1) == 0)


@dataclasses.dataclass(frozen=True)
class ConvBlockSizes:
    """Tiles of the modulated_conv2d kernels (forward, input gradient and weight gradient).

    tile_h x tile_w output pixels per program (per output phase), block_in input channels per step of
    the channel loop, block_out output channels per program. All are powers of two, the channel
    blocks and tile_h * tile_w at least 16 (Triton's smallest dot operand). They tile the GPU
    (Triton) layout and the interpreter as given; the TPU (Mosaic) layout takes tile_h only and keeps
    whole rows and 128-lane channel blocks, which its alignment rules require.
    """

    tile_h: int
    tile_w: int
    block_in: int
    block_out: int
    # GPU weight gradient: the batch x pixel-tile loop cut into this many parts run by separate
    # programs (partial sums, added up after); 0 = `weight_grad_splits` chooses
    weight_grad_splits: int = 0

    def __post_init__(self):
        splits = self.weight_grad_splits
        if not isinstance(splits, (int, np.integer)) or isinstance(splits, (bool, np.bool_)) or splits < 0:
            raise ValueError(f"ConvBlockSizes: weight_grad_splits must be an int >= 0 (0: automatic), got {splits!r}")
        object.__setattr__(self, "weight_grad_splits", int(splits))
        for field in dataclasses.fields(self)[:4]:
            value = getattr(self, field.name)
            if not _is_power_of_two(value):
                raise ValueError(f"ConvBlockSizes: {field.name} must be a positive power of two, got {value!r}")
            object.__setattr__(self, field.name, int(value))  # numpy ints hash and print as ints
        for name in ("block_in", "block_out"):
            if getattr(self, name) < 16:
                raise ValueError(f"ConvBlockSizes: {name} must be at least 16 (Triton's smallest dot "
                                 f"operand), got {getattr(self, name)}")
        if self.tile_h * self.tile_w < 16:
            raise ValueError(f"ConvBlockSizes: tile_h * tile_w must be at least 16 (Triton's smallest dot "
                             f"operand), got {self.tile_h} * {self.tile_w}")

    @classmethod
    def automatic(cls, rows: int, cols: int, cin: int, cout: int) -> "ConvBlockSizes":
        """The choice made when none is given, for an output of rows x cols pixels per phase."""
        tile_h = min(8, pl.next_power_of_2(rows))
        return cls(tile_h=tile_h,
                   tile_w=max(min(16, pl.next_power_of_2(cols)), 16 // tile_h),
                   block_in=max(16, min(32, pl.next_power_of_2(cin))),
                   block_out=max(16, min(64, pl.next_power_of_2(cout))))


def weight_grad_splits(steps: int, channel_programs: int, block_sizes=None,
                       target_programs: int = GPU_TARGET_PROGRAMS) -> int:
    """How many parts the GPU weight gradient cuts its `steps` (batch x pixel tiles) into: the
    smallest divisor of `steps` that brings channel_programs x parts to `target_programs` (all of
    `steps` when none does), or the block sizes' own choice, which must divide `steps`."""
    if block_sizes is not None and block_sizes.weight_grad_splits:
        splits = block_sizes.weight_grad_splits
        if steps % splits:
            raise ValueError(f"ConvBlockSizes.weight_grad_splits={splits} must divide the weight gradient's "
                             f"{steps} batch x pixel-tile steps")
        return splits
    want = -(-target_programs // max(channel_programs, 1))
    return next((d for d in range(1, steps + 1) if steps % d == 0 and d >= want), steps)


def check_block_sizes(block_sizes) -> None:
    if block_sizes is not None and not isinstance(block_sizes, ConvBlockSizes):
        raise ValueError(f"block_sizes must be a ConvBlockSizes or None, got {block_sizes!r}")


# --------------------------------------------------------------------------------------------------
# Plans and tiles


def conv_plans(x_shape, w_shape, geometry):
    """(plan_y, plan_x) of the phased convolution; geometry = (up, down, (x0, x1, y0, y1))."""
    up, down, (px0, px1, py0, py1) = geometry
    plan_y = _phases.plan_1d(x_shape[1], up, down, py0, py1, w_shape[0], "modulated_conv2d (height)")
    plan_x = _phases.plan_1d(x_shape[2], up, down, px0, px1, w_shape[1], "modulated_conv2d (width)")
    return plan_y, plan_x


def conv_tiles(backend, rows, cols, cin, cout, block_sizes=None):
    """(tile_h, tile_w, block_in, block_out, padded Cin, padded Cout) per backend.

    Triton needs power-of-two tiles and dot operands of at least 16; Mosaic keeps whole rows in
    VMEM (tile_w a multiple of 8) and channels padded to whole 128-lane vregs: Mosaic cannot prove
    that a channel window narrower than 128 lanes starts on a lane-tile boundary, so 3- or
    32-channel layers compile only when padded (the padding is zeros and is sliced off).
    """
    if uses_tpu_layout(backend):
        cin_p, cout_p = _phases.round_up(cin, TPU_LANES), _phases.round_up(cout, TPU_LANES)
        tile_h = 8 if block_sizes is None else block_sizes.tile_h
        return tile_h, _phases.round_up(cols, 8), cin_p, TPU_LANES, cin_p, cout_p
    b = block_sizes or ConvBlockSizes.automatic(rows, cols, cin, cout)
    return (b.tile_h, b.tile_w, b.block_in, b.block_out,
            _phases.round_up(cin, b.block_in), _phases.round_up(cout, b.block_out))


def fir_plans(x_shape, f_shape, up, down, padding):
    """(plan_y, plan_x) of upfirdn2d; up, down are (x, y) pairs, padding (x0, x1, y0, y1)."""
    (ux, uy), (dx, dy), (px0, px1, py0, py1) = up, down, padding
    fw, fh = (f_shape[0], f_shape[0]) if len(f_shape) == 1 else (f_shape[1], f_shape[0])
    _, h, w, _ = x_shape
    plan_y = _phases.plan_1d(h, uy, dy, py0, py1, fh, "upfirdn2d (height)")
    plan_x = _phases.plan_1d(w, ux, dx, px0, px1, fw, "upfirdn2d (width)")
    return plan_y, plan_x


def fir_tiles(backend, rows, cols, channels):
    """(tile_h, tile_w, channel_block, padded_channels) of upfirdn2d per backend.

    GPU (Triton) tiles must be powers of two; TPU (Mosaic) keeps whole rows in VMEM, tiles only
    the rows, and pads the channels to blocks of 128 lanes (Mosaic rejects narrower channel windows
    whose start it cannot prove lane-aligned, e.g. the 3-channel RGB path).
    """
    if uses_tpu_layout(backend):
        tile_w = _phases.round_up(cols, 8)
        return 8, tile_w, TPU_LANES, _phases.round_up(channels, TPU_LANES)
    tile_h = min(8, pl.next_power_of_2(rows))
    tile_w = min(32, pl.next_power_of_2(cols))
    cb = min(32, pl.next_power_of_2(channels))
    return tile_h, tile_w, cb, _phases.round_up(channels, cb)


def compiler_params(backend, semantics, num_stages=2):
    """pallas_call's compiler_params: Triton's warps and stages, or Mosaic's grid semantics."""
    if backend == "gpu":
        return pl_triton.CompilerParams(num_warps=4, num_stages=num_stages)
    if uses_tpu_layout(backend):
        return pltpu.CompilerParams(dimension_semantics=semantics)
    return None


# --------------------------------------------------------------------------------------------------
# GPU: Triton shared memory


def triton_shared_memory_estimate(kind, m, bi, bo, taps, phases=1, stages=2) -> int:
    """Upper bound on the shared memory Triton allocates for one conv kernel program, in bytes.

    kind: "conv" (loop over input-channel blocks; `taps` = the most taps of one output phase) or
    "weight_grad" (loop over pixel tiles; `taps` = all taps, `phases` = output phases); m = pixels per
    tile, bi / bo = input / output channel block. Fitted to the sizes XLA:GPU reported for these
    kernels compiled for an H100 (jax 0.10.2; tests/test_kernel_lowering.py rechecks it where the
    CUDA plugin is installed): float32 operands, one copy each unpipelined, taps + 1 copies pipelined.
    A conv with a single input-channel block has no loop, so its footprint is the unpipelined one.
    """
    if kind == "conv":
        per_tap = m * bi + bi * bo
        return 4 * per_tap if stages == 1 else 4 * (taps + 1) * per_tap + 128
    if kind == "weight_grad":
        if stages == 1:
            return 4 * (m * bi + m * bo)
        return 4 * ((taps + 1) * m * bi + (phases + 1) * m * bo) + 128
    raise ValueError(f"kind must be 'conv' or 'weight_grad', got {kind!r}")


def triton_pipelining(kind, m, bi, bo, table, loop=True) -> tuple[int, int]:
    """(num_stages, estimated shared-memory bytes) of one conv kernel on GPU, from its tap table.

    Pipelined (2) when that fits GPU_SHARED_MEMORY_BUDGET_BYTES, else 1; without a loop (`loop`
    False: a conv with one input-channel block) there is nothing to pipeline and one copy is held.
    """
    if kind == "conv":
        taps, phases = max((len(t) for _, _, t in table), default=0), 1
    else:
        taps, phases = sum(len(t) for _, _, t in table), len(table)
    pipelined = triton_shared_memory_estimate(kind, m, bi, bo, taps, phases, stages=2)
    if loop and pipelined <= GPU_SHARED_MEMORY_BUDGET_BYTES:
        return 2, pipelined
    return (1 if loop else 2), triton_shared_memory_estimate(kind, m, bi, bo, taps, phases, stages=1)


# --------------------------------------------------------------------------------------------------
# TPU: VMEM


def _tpu_block_bytes(plan_y, plan_x, tile_h, tile_w, in_channels, out_channels, weight_elements=0) -> int:
    """VMEM of one grid step, float32: the input window, weights and output block double-buffered,
    plus the float32 accumulator of one output phase."""
    cols = _phases.round_up(plan_x.out_per_phase, tile_w)
    x_block = plan_y.down * plan_x.down * (tile_h + plan_y.halo) * (cols + plan_x.halo) * in_channels
    out_block = tile_h * plan_y.up * cols * plan_x.up * out_channels
    return 4 * (2 * (x_block + weight_elements + out_block) + tile_h * cols * out_channels)


def conv_tpu_vmem_estimate(x_shape, w_shape, up, down, pads, block_sizes=None) -> int:
    """Bytes of VMEM the TPU conv kernels need for this layer (forward and backward), float32."""
    n, h, w, cin = x_shape
    kh, kw, _, cout = w_shape
    if down > 1:  # the conv runs on the blurred input with no extra padding
        h, w = h + pads[2] + pads[3], w + pads[0] + pads[1]
        geometry = (1, down, (0, 0, 0, 0))
    else:
        geometry = (up, 1, pads)
    plan_y, plan_x = conv_plans((n, h, w, cin), w_shape, geometry)
    need = 0
    for c_in, c_out in ((cin, cout), (cout, cin)):  # the input gradient swaps the channels
        tile_h, tile_w, _, bo, c_in, _ = conv_tiles("tpu", plan_y.out_per_phase, plan_x.out_per_phase,
                                                    c_in, c_out, block_sizes)  # c_in: padded to the lanes
        need = max(need, _tpu_block_bytes(plan_y, plan_x, tile_h, tile_w, c_in, bo, kh * kw * c_in * bo))
    return need


def fir_tpu_vmem_estimate(x_shape, f_shape, up, down, padding) -> int:
    """Bytes of VMEM the TPU upfirdn2d kernel needs for one grid step, float32."""
    plan_y, plan_x = fir_plans(x_shape, f_shape, up, down, padding)
    tile_h, tile_w, cb, _ = fir_tiles("tpu", plan_y.out_per_phase, plan_x.out_per_phase, x_shape[3])
    return _tpu_block_bytes(plan_y, plan_x, tile_h, tile_w, cb, cb)


def fits_tpu_vmem(need: int, what: str) -> bool:
    """Whether `need` bytes fit TPU_VMEM_BUDGET_BYTES; if not, warns that `what` takes the XLA path."""
    if need <= TPU_VMEM_BUDGET_BYTES:
        return True
    warnings.warn(f"{what} needs about {need / 2**20:.1f} MiB of TPU VMEM (budget "
                  f"{TPU_VMEM_BUDGET_BYTES / 2**20:.1f} MiB); using the XLA path", stacklevel=3)
    return False
