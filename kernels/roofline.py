"""`bench-kernels --plan`: every Pallas kernel a layer's forward + backward pass launches, without a
device: its grid against the SMs of an H100 / H200 and the cores of a TPU chip, the FLOPs and bytes
it moves, and its roofline time (the larger of compute and memory time at the chips' spec-sheet
peaks). It says which kernels cannot fill a GPU and which are memory bound before any is timed.

The grids are the ones the wrappers build (same plans, tiles and weight-gradient split); FLOPs count
the useful multiply-adds (no inserted zero), bytes each operand read once and the result written once.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import _phases
from ._args import filter_size, parse_padding
from .modulated_conv2d import _transposed_geometry
from .modulated_conv2d_ref import resample_padding
from .plans import (GPU_SM_COUNT, GPU_TARGET_PROGRAMS, conv_plans, conv_tiles, fir_plans, fir_tiles,
                    weight_grad_splits)

# Dense peaks from the vendors' spec sheets (not measured here): matmul TFLOP/s at the default
# precision (fp32 inputs run as TF32 on NVIDIA tensor cores, as bf16 passes on TPU) and HBM TB/s.
SPECS = {
    "H100 SXM": dict(tflops={"float32": 494.7, "bfloat16": 989.4}, tbps=3.35, cores=GPU_SM_COUNT),
    "H200 SXM": dict(tflops={"float32": 494.7, "bfloat16": 989.4}, tbps=4.8, cores=GPU_SM_COUNT),
    "TPU v5e": dict(tflops={"float32": 197.0, "bfloat16": 197.0}, tbps=0.819, cores=1),
}


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """One pallas_call of a layer: which, its GPU grid and TPU grid, and the work it does."""

    layer: str
    kernel: str
    gpu_grid: tuple[int, ...]
    tpu_grid: tuple[int, ...]
    flops: float
    bytes: float

    @property
    def gpu_programs(self) -> int:
        return math.prod(self.gpu_grid)

    def roofline_us(self, spec: str, dtype: str) -> float:
        s = SPECS[spec]
        return max(self.flops / (s["tflops"][dtype] * 1e12), self.bytes / (s["tbps"] * 1e12)) * 1e6


def _conv_grids(x_shape, w_shape, geometry):
    """(GPU grid, TPU grid, output shape) of the phased-convolution kernel."""
    plan_y, plan_x = conv_plans(x_shape, w_shape, geometry)
    n, cout = x_shape[0], w_shape[3]
    grids = []
    for backend in ("gpu", "tpu"):
        tile_h, tile_w, _, bo, _, cout_p = conv_tiles(backend, plan_y.out_per_phase, plan_x.out_per_phase,
                                                       x_shape[3], cout)
        rows = _phases.round_up(plan_y.out_per_phase, tile_h)
        cols = _phases.round_up(plan_x.out_per_phase, tile_w)
        grids.append((n, cout_p // bo, rows // tile_h, cols // tile_w))
    return grids[0], grids[1], (n, plan_y.out_size, plan_x.out_size, cout)


def _weight_grad_grids(x_shape, w_shape, geometry):
    plan_y, plan_x = conv_plans(x_shape, w_shape, geometry)
    tile_h, tile_w, bi, bo, cin_p, cout_p = conv_tiles("gpu", plan_y.out_per_phase, plan_x.out_per_phase,
                                                       x_shape[3], w_shape[3])
    steps = x_shape[0] * -(-plan_y.out_per_phase // tile_h) * -(-plan_x.out_per_phase // tile_w)
    channel_programs = (cin_p // bi) * (cout_p // bo)
    gpu = (cin_p // bi, cout_p // bo, weight_grad_splits(steps, channel_programs, None, GPU_TARGET_PROGRAMS))
    t_h, _, _, _, tcin_p, tcout_p = conv_tiles("tpu", plan_y.out_per_phase, plan_x.out_per_phase,
                                               x_shape[3], w_shape[3])
    tpu = (tcin_p // 128, tcout_p // 128, x_shape[0], -(-plan_y.out_per_phase // t_h))
    return gpu, tpu


def _taps(x_shape, w_shape, geometry) -> int:
    """Useful multiply-adds per (input channel, output channel), summed over output pixels."""
    plan_y, plan_x = conv_plans(x_shape, w_shape, geometry)
    per_y = sum(len(t) for t in plan_y.taps) * plan_y.out_per_phase
    per_x = sum(len(t) for t in plan_x.taps) * plan_x.out_per_phase
    return x_shape[0] * per_y * per_x


def _fir(layer: str, name: str, x_shape, f_shape, up, down, padding, itemsize) -> tuple[KernelPlan, tuple]:
    up2, down2, pads = (up, up), (down, down), parse_padding(padding)
    plan_y, plan_x = fir_plans(x_shape, f_shape, up2, down2, pads)
    n, _, _, c = x_shape
    grids = []
    for backend in ("gpu", "tpu"):
        tile_h, tile_w, cb, cp = fir_tiles(backend, plan_y.out_per_phase, plan_x.out_per_phase, c)
        grids.append((n, cp // cb, -(-plan_y.out_per_phase // tile_h), -(-plan_x.out_per_phase // tile_w)))
    out_shape = (n, plan_y.out_size, plan_x.out_size, c)
    fw, fh = filter_size(np.zeros(f_shape))
    flops = 2.0 * math.prod(out_shape) * fw * fh / (up * up)  # inserted zeros are skipped
    nbytes = itemsize * (math.prod(x_shape) + math.prod(out_shape))
    return KernelPlan(layer, name, grids[0], grids[1], flops, nbytes), out_shape


def _fir_with_grad(layer: str, name: str, x_shape, f_shape, up, down, padding, itemsize):
    """([forward, input gradient] plans, output shape) of an upfirdn2d call: its backward pass is
    upfirdn2d again, up and down swapped, on the transposed padding."""
    fwd, out = _fir(layer, name, x_shape, f_shape, up, down, padding, itemsize)
    pads = parse_padding(padding)
    ty = _phases.transpose_padding(x_shape[1], out[1], up, down, pads[2], f_shape[0])
    tx = _phases.transpose_padding(x_shape[2], out[2], up, down, pads[0], f_shape[1])
    bwd, _ = _fir(layer, f"{name} input grad", out, f_shape, down, up, (*tx, *ty), itemsize)
    return [fwd, bwd], out


def layer_kernels(layer, itemsize: int = 4, fir_shape=(4, 4)) -> list[KernelPlan]:
    """The kernels of one bench-kernels `Layer` (forward and backward), as the wrappers launch them."""
    plans = []
    if layer.op == "upfirdn2d":
        return _fir_with_grad(layer.name, "upfirdn2d", layer.x_shape, fir_shape, layer.up, layer.down,
                              layer.padding, itemsize)[0]
    x_shape, w_shape, up, down = layer.x_shape, layer.w_shape, layer.up, layer.down
    f = np.zeros(fir_shape) if (up > 1 or down > 1) else None
    pads = resample_padding(layer.padding, up, down, f)
    if down > 1:  # blur first (upfirdn2d), then the stride-`down` conv
        blur, x_shape = _fir_with_grad(layer.name, "blur (upfirdn2d)", x_shape, fir_shape, 1, 1, pads, itemsize)
        plans += blur
        geometry = (1, down, (0, 0, 0, 0))
    else:
        geometry = (up, 1, pads)
    cin, cout = w_shape[2], w_shape[3]
    gpu, tpu, y_shape = _conv_grids(x_shape, w_shape, geometry)
    macs = _taps(x_shape, w_shape, geometry) * cin * cout
    conv_bytes = itemsize * (math.prod(x_shape) + math.prod(y_shape)) + 4 * math.prod(w_shape)
    plans.append(KernelPlan(layer.name, "conv", gpu, tpu, 2.0 * macs, conv_bytes))
    if up > 1:
        plans += _fir_with_grad(layer.name, "blur (upfirdn2d)", y_shape, fir_shape, 1, 1, 0, itemsize)[0]
    # backward: the same conv kernel on the transposed plan (input gradient), then the weight gradient
    t_geometry = _transposed_geometry(x_shape, y_shape, w_shape, geometry)
    t_w = (w_shape[0], w_shape[1], cout, cin)
    gpu, tpu, _ = _conv_grids(y_shape, t_w, t_geometry)
    plans.append(KernelPlan(layer.name, "conv (input grad)", gpu, tpu, 2.0 * macs, conv_bytes))
    gpu, tpu = _weight_grad_grids(x_shape, w_shape, geometry)
    wg_bytes = itemsize * (math.prod(x_shape) + math.prod(y_shape)) + 4 * math.prod(w_shape) * gpu[2]
    plans.append(KernelPlan(layer.name, "conv (weight grad)", gpu, tpu, 2.0 * macs, wg_bytes))
    return plans


def format_plan(layers, dtype: str = "float32") -> str:
    """The --plan table: per kernel, its grids, SM waves, work and roofline time on each spec."""
    itemsize = 2 if dtype == "bfloat16" else 4
    head = ["layer", "kernel", "GPU grid", "programs / 132 SMs", "TPU grid", "GFLOP", "MB",
            *(f"{s} us" for s in SPECS), "bound (H200)"]
    rows = []
    for layer in layers:
        for k in layer_kernels(layer, itemsize):
            h200 = SPECS["H200 SXM"]
            bound = "compute" if k.flops / (h200["tflops"][dtype] * 1e12) > k.bytes / (h200["tbps"] * 1e12) else "memory"
            rows.append([k.layer, k.kernel, "x".join(map(str, k.gpu_grid)),
                         f"{k.gpu_programs} ({k.gpu_programs / GPU_SM_COUNT:.2f})", "x".join(map(str, k.tpu_grid)),
                         f"{k.flops / 1e9:.2f}", f"{k.bytes / 1e6:.1f}",
                         *(f"{k.roofline_us(s, dtype):.1f}" for s in SPECS), bound])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    lines = [f"kernel plan, {dtype} (peaks: vendor spec sheets, dense; roofline = max(FLOPs / peak, bytes / "
             f"bandwidth); not measured)", "", fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(lines + [fmt(r) for r in rows])
