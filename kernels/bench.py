"""`viscoin-jax bench-kernels`: times upfirdn2d and modulated_conv2d on StyleGAN2 layer shapes.

For each layer (taken from a StyleGAN2 generator at 256 px, `paper256` channels, and at 1024 px,
config-f channels) and each implementation available on the device, it times the forward pass and
forward+backward, and prints: median milliseconds, achieved GB/s (upfirdn2d, memory bound) or
TFLOP/s (modulated conv, compute bound), the speed-up over the XLA path measured in the same run,
and on GPU/TPU the fraction of the copy bandwidth measured in the same run (a large on-device copy).
Timings: compile, warm up, block until ready, median over repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ._args import setup_filter
from . import tuning
from .modulated_conv2d import modulated_conv2d
from .upfirdn2d import upfirdn2d

FIR = setup_filter([1, 3, 3, 1])

# channels = min(channel_base // res, channel_max), as StyleGAN2-ADA's synthesis network
GENERATORS = {256: dict(channel_base=16384, channel_max=512), 1024: dict(channel_base=32768, channel_max=512)}


def _channels(img_res: int, res: int) -> int:
    g = GENERATORS[img_res]
    return min(g["channel_base"] // res, g["channel_max"])


@dataclasses.dataclass(frozen=True)
class Layer:
    """One benchmarked call: the op, its keyword arguments, and the array shapes it takes."""

    name: str
    op: str  # "upfirdn2d" | "modconv"
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...] | None = None
    up: int = 1
    down: int = 1
    padding: tuple[int, ...] | int = 0
    demodulate: bool = True


def stylegan2_layers(img_res: int, batch: int) -> list[Layer]:
    """The layers that dominate a StyleGAN2 step at `img_res`: the top two resolutions' convs,
    toRGB, the image up-sampling of the skip generator and the discriminator's blur-downsample."""
    layers = []
    for res in (img_res // 2, img_res):
        cin, cout = _channels(img_res, res // 2), _channels(img_res, res)
        layers.append(Layer(f"G{img_res} conv0 {res}px up", "modconv", (batch, res // 2, res // 2, cin),
                            (3, 3, cin, cout), up=2))
        layers.append(Layer(f"G{img_res} conv1 {res}px", "modconv", (batch, res, res, cout),
                            (3, 3, cout, cout), padding=1))
    c = _channels(img_res, img_res)
    layers.append(Layer(f"G{img_res} toRGB {img_res}px", "modconv", (batch, img_res, img_res, c),
                        (1, 1, c, 3), demodulate=False))
    layers.append(Layer(f"G{img_res} img up {img_res}px", "upfirdn2d", (batch, img_res // 2, img_res // 2, 3),
                        up=2, padding=(2, 1, 2, 1)))
    layers.append(Layer(f"D{img_res} blur+down {img_res}px", "upfirdn2d", (batch, img_res, img_res, c),
                        down=2, padding=(1, 1, 1, 1)))
    layers.append(Layer(f"G{img_res} blur {img_res}px", "upfirdn2d",
                        (batch, img_res + 1, img_res + 1, c), padding=(1, 1, 1, 1)))
    return layers


def layer_key(layer: Layer, dtype) -> str:
    """The tuning-table key of the op call this layer times (the key the op computes when called)."""
    if layer.op == "upfirdn2d":
        return tuning.upfirdn2d_key(layer.x_shape, FIR.shape, layer.up, layer.down, layer.padding, dtype)
    return tuning.modconv_key(layer.x_shape, layer.w_shape, layer.up, layer.down, layer.padding,
                              layer.demodulate, dtype)


def _make_fn(layer: Layer, impl: str, backward: bool, dtype) -> tuple[Callable, tuple]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(layer.x_shape), dtype)
    if layer.op == "upfirdn2d":
        gain = layer.up ** 2
        f = jnp.asarray(FIR)
        op = lambda x: upfirdn2d(x, f, layer.up, layer.down, layer.padding, gain=gain, impl=impl)
        args = (x,)
    else:
        w = jnp.asarray(rng.standard_normal(layer.w_shape), dtype)
        s = jnp.asarray(rng.uniform(0.5, 1.5, (layer.x_shape[0], layer.x_shape[3])), dtype)
        op = lambda x, w, s: modulated_conv2d(x, w, s, layer.demodulate, layer.up, layer.down,
                                              layer.padding, impl=impl)
        args = (x, w, s)
    if not backward:
        return jax.jit(op), args
    out_shape = jax.eval_shape(op, *args)
    ct = jnp.asarray(rng.standard_normal(out_shape.shape), dtype)

    def fwd_bwd(ct, *a):  # the cotangent is an argument, not a folded constant
        y, vjp = jax.vjp(op, *a)
        return y, vjp(ct)

    return jax.jit(fwd_bwd), (ct, *args)


def time_fn(fn: Callable, args: tuple, repeats: int, warmup: int = 2) -> float:
    """Median wall time in milliseconds of `fn(*args)`, after compilation and warm-up."""
    jax.block_until_ready(fn(*args))
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def layer_work(layer: Layer, backward: bool, itemsize: int) -> tuple[float, str]:
    """(amount, unit): bytes moved for upfirdn2d (memory bound), FLOPs for the conv."""
    n, h, w, c = layer.x_shape
    if layer.op == "upfirdn2d":
        fh = len(FIR)
        ho = (h * layer.up + sum(_pad4(layer.padding)[2:]) - fh) // layer.down + 1
        wo = (w * layer.up + sum(_pad4(layer.padding)[:2]) - fh) // layer.down + 1
        nbytes = itemsize * (n * h * w * c + n * ho * wo * c)
        return nbytes * (2 if backward else 1), "GB/s"
    kh, kw, cin, cout = layer.w_shape
    # useful multiply-adds: every input pixel meets every tap once for the transposed (up) conv,
    # every output pixel for plain and strided convs
    pixels = n * h * w if layer.up > 1 else n * (h // layer.down) * (w // layer.down)
    flops = 2.0 * pixels * cin * cout * kh * kw
    return flops * (3 if backward else 1), "TFLOP/s"


def _pad4(p):
    if isinstance(p, int):
        return (p,) * 4
    return tuple(p) if len(p) == 4 else (p[0], p[0], p[1], p[1])


def copy_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device copy bandwidth (read + write) measured on a large array."""
    a = jnp.ones((nbytes // 4,), jnp.float32)
    ms = time_fn(jax.jit(lambda a: a + 1.0), (a,), repeats)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def mosaic_gpu_capable() -> bool:
    """Whether the first device is an NVIDIA GPU of compute capability 9.0 or newer (Hopper+), where
    the Mosaic GPU variant runs."""
    cc = getattr(jax.devices()[0], "compute_capability", None)
    try:
        return jax.default_backend() == "gpu" and cc is not None and float(cc) >= 9.0
    except ValueError:
        return False


def default_impls(platform: str) -> list[str]:
    if platform == "gpu" and mosaic_gpu_capable():
        return ["xla", "pallas", "mosaic_gpu", "auto"]
    if platform in ("gpu", "tpu"):
        return ["xla", "pallas", "auto"]
    return ["xla", "auto"]  # the Pallas interpreter is a correctness tool, not a fast path


def run(resolutions, batch, impls, repeats, dtype, ops, copy_bytes) -> list[dict]:
    platform = jax.default_backend()
    copy_gbs = copy_bandwidth_gbs(copy_bytes) if platform in ("gpu", "tpu") else None
    rows = []
    for img_res in resolutions:
        for layer in stylegan2_layers(img_res, batch):
            if layer.op not in ops:
                continue
            for backward in (False, True):
                base_ms = None
                for impl in impls:
                    fn, args = _make_fn(layer, impl, backward, dtype)
                    ms = time_fn(fn, args, repeats)
                    base_ms = ms if impl == "xla" else base_ms
                    work, unit = layer_work(layer, backward, jnp.dtype(dtype).itemsize)
                    rate = work / (ms * 1e-3) / (1e9 if unit == "GB/s" else 1e12)
                    rows.append(dict(
                        layer=layer.name, op=layer.op, shape="x".join(map(str, layer.x_shape)),
                        key=layer_key(layer, dtype),
                        pass_="fwd+bwd" if backward else "fwd", impl=impl, ms=ms, rate=rate, unit=unit,
                        speedup=(base_ms / ms) if base_ms else None,
                        copy_fraction=(rate / copy_gbs) if (copy_gbs and unit == "GB/s") else None))
    return rows, platform, copy_gbs


def format_table(rows, platform, copy_gbs) -> str:
    head = f"device: {jax.devices()[0].device_kind} ({platform})"
    if copy_gbs:
        head += f", copy bandwidth {copy_gbs:.0f} GB/s"
    cols = ["layer", "shape", "pass", "impl", "median ms", "rate", "vs xla", "of copy bw"]
    lines = []
    for r in rows:
        lines.append([r["layer"], r["shape"], r["pass_"], r["impl"], f"{r['ms']:.3f}",
                      f"{r['rate']:.2f} {r['unit']}", f"{r['speedup']:.2f}x" if r["speedup"] else "-",
                      f"{100 * r['copy_fraction']:.0f}%" if r["copy_fraction"] else "-"])
    widths = [max(len(c), *(len(l[i]) for l in lines)) for i, c in enumerate(cols)]
    fmt = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [head, "", fmt(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(l) for l in lines]
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    platform = jax.default_backend()
    on_accel = platform in ("gpu", "tpu")
    if args.plan:  # no device needed: grids, work and roofline times of the kernels
        from .roofline import format_plan
        layers = [l for r in (args.resolutions or [256]) for l in stylegan2_layers(r, args.batch or 32)
                  if l.op in args.ops]
        print(format_plan(layers, args.dtype))
        return 0
    batch = args.batch or (32 if on_accel else 1)
    resolutions = args.resolutions or ([256, 1024] if on_accel else [256])
    impls = args.impls or default_impls(platform)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    repeats = args.repeats or (20 if on_accel else 3)
    print(f"bench-kernels: batch {batch}, resolutions {resolutions}, impls {impls}, {args.dtype}, "
          f"matmul precision {args.precision}", flush=True)
    # one precision policy for both paths (jax_default_matmul_precision): they do the same arithmetic
    with jax.default_matmul_precision(args.precision):
        rows, platform, copy_gbs = run(resolutions, batch, impls, repeats, dtype, args.ops, args.copy_bytes)
    print(format_table(rows, platform, copy_gbs))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(platform=platform, device=jax.devices()[0].device_kind, copy_gbs=copy_gbs,
                           batch=batch, dtype=args.dtype, precision=args.precision, rows=rows), fh, indent=1)
    if args.write_table is not None:
        write_table(rows, args.write_table, platform, batch, args.precision)
    return 0


def write_table(rows, where: str, platform: str, batch: int, precision: str = "default") -> str:
    """Write the tuning table of this device kind from the run's rows; `where` is a directory (the
    file is named after the device kind) or a .json path. Returns the path written."""
    kind = jax.devices()[0].device_kind
    table = tuning.table_from_rows(rows, kind, platform, batch, jax.__version__)
    table["precision"] = precision  # the matmul precision both paths were timed at
    if not table["entries"]:
        raise SystemExit("bench-kernels --write-table: no layer was timed with both 'pallas' and 'xla' "
                         "(run it on a GPU or TPU, or pass --impls xla pallas)")
    path = where if where.endswith(".json") else os.path.join(where, tuning.table_file_name(kind))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(table, fh, indent=1)
    wins = sum(e["winner"] != "xla" for e in table["entries"])
    mosaic = sum(e["winner"] == "mosaic_gpu" for e in table["entries"])
    print(f"tuning table for {kind}: {path} (a Pallas kernel wins {wins} of {len(table['entries'])} layer "
          f"shapes, {mosaic} of them Mosaic GPU's)")
    tuning.load_table.cache_clear()
    return path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench-kernels", help="time the Pallas kernels against the XLA path",
                              description=__doc__)
    p.add_argument("--batch", type=int, default=None, help="default: 32 on GPU/TPU, 1 on CPU")
    p.add_argument("--resolutions", type=int, nargs="+", choices=sorted(GENERATORS), default=None,
                   help="generator resolutions whose layers are timed (default: 256 1024; 256 on CPU)")
    p.add_argument("--impls", nargs="+", choices=["xla", "pallas", "mosaic_gpu", "auto", "interpret"], default=None)
    p.add_argument("--ops", nargs="+", choices=["upfirdn2d", "modconv"], default=["upfirdn2d", "modconv"])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--precision", choices=["default", "high", "highest"], default="default",
                   help="matmul precision of both paths (jax.default_matmul_precision): 'default' is what "
                        "XLA runs on the platform (TF32 on NVIDIA Ampere and newer, bf16 passes on TPU)")
    p.add_argument("--copy-bytes", type=int, default=1 << 30, help="array size for the copy bandwidth")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--plan", action="store_true",
                   help="time nothing: print each kernel's grid against the SMs of an H100/H200 and a TPU's "
                        "cores, the FLOPs and bytes it moves and its roofline time (batch 32 unless --batch)")
    p.add_argument("--write-table", nargs="?", const=".", default=None, metavar="DIR_OR_JSON",
                   help="write the tuning table impl='auto' reads (per layer shape, the faster of pallas and "
                        "xla, forward + backward) for this device kind into DIR (default: the current "
                        f"directory); point ${tuning.TUNING_DIR_ENV} at DIR, or copy the file into "
                        "kernels/tuning/ to ship it")
    p.set_defaults(func=main)
