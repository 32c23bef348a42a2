"""`viscoin-jax bench-stylegan2`: StyleGAN2 training-step throughput (images/s) at 64 and 256 px.

Times the compiled training step of the StyleGAN2 trainer (G and D forward + backward with the
non-saturating loss, ADA, style mixing, and the lazy R1 / path-length terms on their intervals) on
random images, over whole R1 periods so the lazy terms are amortised as in training; and, for
reference, G's synthesis forward alone. Network widths: `paper256` (channel_base 16384, channel_max
512, 8 mapping layers, z/w 512) or `narrow` (channel_max 32: fits a CPU), for every resolution.

    viscoin-jax bench-stylegan2 --resolutions 64 256 --batch 8 --widths paper256 --impl auto
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the repository's configs/ (editable install)

WIDTHS = {
    "paper256": dict(channel_base=16384, channel_max=512, z_dim=512, w_dim=512, mapping_layers=8),
    "narrow": dict(channel_base=1024, channel_max=32, z_dim=64, w_dim=64, mapping_layers=2),
}


def stylegan2_config(resolution: int, batch: int, widths: str, impl: str):
    """The tiny StyleGAN2 config resized to `resolution`, `widths` networks and `impl` kernels."""
    from .config import load_config

    if widths not in WIDTHS:
        raise ValueError(f"unknown widths {widths!r}; known: {sorted(WIDTHS)}")
    w = WIDTHS[widths]
    over = [f"--config.train.batch_size={batch}", f"--config.data.resolution={resolution}",
            f"--config.model.generator.img_resolution={resolution}",
            f"--config.model.discriminator.img_resolution={resolution}",
            f"--config.model.generator.impl={impl}", f"--config.model.discriminator.impl={impl}",
            "--config.fid.num_samples=0"]
    for net in ("generator", "discriminator"):
        over += [f"--config.model.{net}.channel_base={w['channel_base']}",
                 f"--config.model.{net}.channel_max={w['channel_max']}"]
    over += [f"--config.model.generator.z_dim={w['z_dim']}", f"--config.model.generator.w_dim={w['w_dim']}",
             f"--config.model.generator.mapping_layers={w['mapping_layers']}"]
    return load_config(str(CONFIGS / "stylegan2_synthetic.py"), over)


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


def bench_one(resolution: int, batch: int, widths: str, impl: str, periods: int) -> dict:
    from . import mesh as mesh_lib
    from . import stylegan2
    from .loop import compile_task

    config = stylegan2_config(resolution, batch, widths, impl)
    task = stylegan2.make_task(config)
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    compiled = compile_task(task, mesh)
    state = compiled.init(jax.random.key_data(jax.random.key(0)))
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, resolution, resolution, 3)), jnp.float32)
    batch_in = {"image": images}
    t0 = time.perf_counter()
    state, metrics = compiled.train_step(state, batch_in)  # step 0: compiles (all lax.cond branches)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    box = {"state": state}

    def one_period():
        out = None
        for _ in range(task.r1_interval):
            box["state"], out = compiled.train_step(box["state"], batch_in)
        return out

    box["state"], out = compiled.train_step(box["state"], batch_in)  # warm-up (every branch is compiled)
    jax.block_until_ready(out)
    period_times = _time(one_period, periods)
    step_s = statistics.median(period_times) / task.r1_interval

    G = stylegan2.generator_from_state(task, jax.device_get(box["state"]["task"]))
    from flax import nnx
    graphdef, g_state = nnx.split(G)
    ws = jnp.broadcast_to(G.mapping.w_avg[...], (batch, G.num_ws, G.w_dim))
    synth = jax.jit(lambda s, w: nnx.merge(graphdef, s).synthesis(w, noise_mode="const"))
    jax.block_until_ready(synth(g_state, ws))
    synth_s = statistics.median(_time(lambda: synth(g_state, ws), max(periods, 3)))
    n_g = sum(x.size for x in jax.tree.leaves(nnx.state(G, nnx.Param)))
    return {"resolution": resolution, "batch": batch, "widths": widths, "impl": impl,
            "device": jax.devices()[0].device_kind, "G_params": int(n_g), "compile_s": compile_s,
            "train_step_ms": step_s * 1e3, "train_images_per_s": batch / step_s,
            "synthesis_ms": synth_s * 1e3, "synthesis_images_per_s": batch / synth_s,
            "period_spread": (max(period_times) - min(period_times)) / statistics.median(period_times)}


def print_table(rows: list[dict]) -> None:
    header = (f"{'res':>4} {'batch':>5} {'widths':>9} {'impl':>5} {'G params':>10} {'compile s':>9} "
              f"{'step ms':>9} {'train img/s':>11} {'G fwd ms':>9} {'G fwd img/s':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['resolution']:>4} {r['batch']:>5} {r['widths']:>9} {r['impl']:>5} {r['G_params']:>10,} "
              f"{r['compile_s']:>9.1f} {r['train_step_ms']:>9.1f} {r['train_images_per_s']:>11.2f} "
              f"{r['synthesis_ms']:>9.1f} {r['synthesis_images_per_s']:>11.2f}")


def main(args: argparse.Namespace) -> int:
    rows = []
    for widths in args.widths:
        for res in args.resolutions:
            row = bench_one(res, args.batch, widths, args.impl, args.periods)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nStyleGAN2 training step on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"lazy R1 / path-length terms amortised over {args.periods} R1 period(s) of 16 steps:\n")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench-stylegan2", help="StyleGAN2 training-step throughput (images/s)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 256])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--widths", nargs="+", default=["paper256"], choices=sorted(WIDTHS))
    p.add_argument("--impl", default="auto", choices=["auto", "xla", "pallas"])
    p.add_argument("--periods", type=int, default=1, help="R1 periods (of 16 steps) timed")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.set_defaults(func=main)
