"""`viscoin-jax bench-stylegan2`: StyleGAN2 training-step throughput (images/s) at 64 and 256 px.

Times the compiled training step of the StyleGAN2 trainer (G and D forward + backward with the
non-saturating loss, ADA, style mixing, and the lazy R1 / path-length terms on their intervals) on
random images, over whole R1 periods so the lazy terms are amortised as in training; and, for
reference, G's synthesis forward alone. Network widths: `paper256` (channel_base 16384, channel_max
512, 8 mapping layers, z/w 512) or `narrow` (channel_max 32: fits a CPU), for every resolution.

    viscoin-jax bench-stylegan2 --resolutions 64 256 --batch 8 --widths paper256 --impl auto

Side by side with NVlabs' stylegan2-ada-pytorch (a checkout the user supplies; run in a subprocess
by `nvlabs_worker`, alternating with this process's own measurement, same shapes and settings):

    viscoin-jax bench-stylegan2 --compare-nvlabs ~/src/stylegan2-ada-pytorch --units g step \
        --resolutions 64 256 --batch 8 4 --widths paper256 --mapping-layers 2 --impl xla
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..training import mesh as mesh_lib
from ..training.config import load_config
from . import op_profile

# The trainer, the training loop, Flax and the models are imported when a benchmark runs, not when
# the command line is parsed (`viscoin-jax --help` builds this command's parser).

WIDTHS = {
    "paper256": dict(channel_base=16384, channel_max=512, z_dim=512, w_dim=512, mapping_layers=8),
    "narrow": dict(channel_base=1024, channel_max=32, z_dim=64, w_dim=64, mapping_layers=2),
}


def _widths(widths: str, mapping_layers: int | None = None) -> dict:
    if widths not in WIDTHS:
        raise ValueError(f"unknown widths {widths!r}; known: {sorted(WIDTHS)}")
    w = dict(WIDTHS[widths])
    if mapping_layers is not None:
        w["mapping_layers"] = int(mapping_layers)
    return w


def stylegan2_config(resolution: int, batch: int, widths: str, impl: str, mapping_layers: int | None = None,
                     extra: tuple[str, ...] = ()):
    """The tiny StyleGAN2 config resized to `resolution`, `widths` networks and `impl` kernels."""
    w = _widths(widths, mapping_layers)
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
    return load_config("stylegan2_synthetic", over + list(extra))  # the packaged config, from any directory


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


def bench_one(resolution: int, batch: int, widths: str, impl: str, periods: int,
              mapping_layers: int | None = None) -> dict:
    from ..trainers import stylegan2
    from ..training.loop import compile_task

    config = stylegan2_config(resolution, batch, widths, impl, mapping_layers)
    task = stylegan2.make_task(config)
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    compiled = compile_task(task, mesh)
    state = compiled.init(jax.random.key_data(jax.random.key(0)))
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, resolution, resolution, 3)), jnp.float32)
    batch_in = {"image": images}
    t0 = time.perf_counter()
    box = {"state": state, "step": 0}

    def steps(count):
        out = None
        for _ in range(count):
            variant = task.step_variant(box["step"])
            box["state"], out = compiled.train_step(box["state"], batch_in, variant)
            box["step"] += 1
        return out

    # compiles every program: one step of each variant (lazy terms on / off) or all lax.cond branches
    jax.block_until_ready(steps(max(task.r1_interval, task.pl_interval, 1)))
    compile_s = time.perf_counter() - t0
    one_period = lambda: steps(task.r1_interval)  # noqa: E731
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


# -- side by side with NVlabs' stylegan2-ada-pytorch ------------------------------------------------

COMPARE_R1_GAMMA = 1.0  # any positive value: the R1 step's cost does not depend on it


def _our_g_unit(resolution: int, batch: int, widths: dict, impl: str):
    """One G forward + backward (loss mean(img^2), gradients w.r.t. every parameter, random noise)."""
    from flax import nnx

    from ..models.stylegan2 import Generator

    G = Generator(z_dim=widths["z_dim"], w_dim=widths["w_dim"], img_resolution=resolution,
                  mapping_layers=widths["mapping_layers"], channel_base=widths["channel_base"],
                  channel_max=widths["channel_max"], impl=impl, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(G, nnx.Param, ...)

    @jax.jit
    def g_step(params, rest, key):
        k_z, k_noise = jax.random.split(key)
        z = jax.random.normal(k_z, (batch, widths["z_dim"]), jnp.float32)

        def loss(p):
            img = nnx.merge(graphdef, p, rest)(z, noise_mode="random", rngs=k_noise)
            return jnp.mean(jnp.square(img))
        return jax.value_and_grad(loss)(params)

    counter = iter(range(1 << 30))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    run = lambda: g_step(params, rest, jax.random.key(next(counter)))  # noqa: E731
    run.hlo_texts = lambda: [g_step.lower(params, rest, jax.random.key(0)).compile().as_text()]
    return run, int(n_params)


def _our_step_unit(resolution: int, batch: int, widths_name: str, mapping_layers, impl: str):
    """One R1 period of the trainer's step with the settings of the NVlabs side (no ADA, no path
    length, style mixing 0.9, lazy R1 every 16 steps)."""
    from ..trainers import stylegan2
    from ..training.loop import compile_task

    extra = ("--config.ada.enabled=False", "--config.stylegan2.pl_weight=0.0",
             f"--config.stylegan2.r1_gamma={COMPARE_R1_GAMMA}", "--config.stylegan2.style_mixing_prob=0.9",
             "--config.stylegan2.r1_interval=16")
    config = stylegan2_config(resolution, batch, widths_name, impl, mapping_layers, extra)
    task = stylegan2.make_task(config)
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    compiled = compile_task(task, mesh)
    box = {"state": compiled.init(jax.random.key_data(jax.random.key(0))), "step": 0}
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, resolution, resolution, 3)), jnp.float32)

    def steps(count=task.r1_interval):  # default: one R1 period (the lazy R1 at its first step)
        out = None
        for _ in range(count):
            variant = task.step_variant(box["step"] % task.r1_interval)  # each unit starts a period
            box["state"], out = compiled.train_step(box["state"], {"image": images}, variant)
            box["step"] += 1
        return out

    def hlo_texts():  # the compiled programs of one period (one per step variant)
        variants = {task.step_variant(i) for i in range(task.r1_interval)}
        return [compiled.train_step.lower(box["state"], {"image": images}, v).compile().as_text()
                for v in variants]
    steps.hlo_texts = hlo_texts
    n_params = sum(x.size for x in jax.tree.leaves(box["state"]["task"]["G"]))
    return steps, int(n_params)


class NVlabsWorker:
    """The NVlabs side in a subprocess (`nvlabs_worker`): `run()` times one unit there."""

    def __init__(self, path: str, spec: dict):
        if not (Path(path) / "training" / "networks.py").is_file():
            raise SystemExit(f"--compare-nvlabs: {path} is not a stylegan2-ada-pytorch checkout "
                             "(no training/networks.py)")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "viscoin_jax.benchmarks.nvlabs_worker", str(Path(path).resolve()),
             json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=path)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the NVlabs worker exited (rc {self.proc.wait()}); see its error above")
        return json.loads(line)

    def run(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return float(self._read()["seconds"])

    def profile(self) -> dict:
        """{bucket: seconds} of one unit under torch.profiler (`op_profile.torch_profile`)."""
        self.proc.stdin.write("profile\n")
        self.proc.stdin.flush()
        return dict(self._read()["buckets"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def compare_one(path: str, unit: str, resolution: int, batch: int, widths_name: str, mapping_layers,
                impl: str, repeats: int, threads: int | None, profile: bool = False) -> dict:
    """This project and NVlabs on one unit and shape, alternating `repeats` times; medians, ratio."""
    widths = _widths(widths_name, mapping_layers)
    spec = dict(unit=unit, resolution=resolution, batch=batch, threads=threads, style_mixing_prob=0.9,
                r1_gamma=COMPARE_R1_GAMMA, r1_interval=16, mbstd_group_size=4, conv_clamp=None,
                **{k: widths[k] for k in ("z_dim", "w_dim", "mapping_layers", "channel_base", "channel_max")})
    print(f"[compare] {unit} {resolution} px batch {batch}: starting the NVlabs worker", flush=True)
    worker = NVlabsWorker(path, spec)
    try:
        print(f"[compare] {unit} {resolution} px: compiling ours (impl {impl})", flush=True)
        if unit == "g":
            run, n_params = _our_g_unit(resolution, batch, widths, impl)
        else:
            run, n_params = _our_step_unit(resolution, batch, widths_name, mapping_layers, impl)
        t0 = time.perf_counter()
        # compile (both lax.cond branches) and warm up: one step for "g", two steps for "step"
        jax.block_until_ready(run() if unit == "g" else run(1))
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(run() if unit == "g" else run(1))
        ours, theirs = [], []
        for i in range(repeats):
            ours.append(_time(run, 1)[0])
            theirs.append(worker.run())
            print(f"[compare] {unit} {resolution} px round {i + 1}/{repeats}: ours {ours[-1]:.3f} s, "
                  f"NVlabs {theirs[-1]:.3f} s", flush=True)
        if profile:
            print(f"[compare] {unit} {resolution} px: profiling one unit on each side", flush=True)
            our_buckets, our_ops = op_profile.trace_jax(run, run.hlo_texts())
            their_buckets = worker.profile()
    finally:
        worker.close()
    images = batch * (16 if unit == "step" else 1)
    ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
    extra = {}
    if profile:
        extra = {"profile_ours": our_buckets, "profile_nvlabs": their_buckets,
                 "profile_ours_top_ops": [dict(seconds=t, op=op, bucket=b, derivative_order=o, where=w)
                                          for t, op, b, o, w in our_ops[:40]]}
    return {**extra, "unit": unit, "resolution": resolution, "batch": batch, "widths": widths_name,
            "mapping_layers": widths["mapping_layers"], "impl": impl, "G_params": n_params,
            "compile_s": compile_s, "ours_s": ours_s, "nvlabs_s": theirs_s,
            "ours_images_per_s": images / ours_s, "nvlabs_images_per_s": images / theirs_s,
            "speed_vs_nvlabs": theirs_s / ours_s, "ours_all_s": ours, "nvlabs_all_s": theirs,
            "torch": worker.info.get("torch"), "torch_threads": worker.info.get("threads"),
            "jax": jax.__version__, "device": jax.devices()[0].device_kind}


def print_rows(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """A fixed-width table: `columns` are (title, row key, format spec such as ">9.3f")."""
    widths = [re.match(r"[<>^]?\d+", spec).group(0) for _, _, spec in columns]
    header = " ".join(f"{title:{width}}" for (title, _, _), width in zip(columns, widths))
    print(header)
    print("-" * len(header))
    for r in rows:
        print(" ".join(f"{r[key]:{spec}}" for _, key, spec in columns))


COMPARE_COLUMNS = [("unit", "unit", ">5"), ("res", "resolution", ">4"), ("batch", "batch", ">5"),
                   ("G params", "G_params", ">11,"), ("ours s", "ours_s", ">8.3f"), ("NVlabs s", "nvlabs_s", ">9.3f"),
                   ("ours img/s", "ours_images_per_s", ">10.2f"), ("NVlabs img/s", "nvlabs_images_per_s", ">12.2f"),
                   ("x NVlabs", "speed_vs_nvlabs", ">8.2f")]
STEP_COLUMNS = [("res", "resolution", ">4"), ("batch", "batch", ">5"), ("widths", "widths", ">9"), ("impl", "impl", ">5"),
                ("G params", "G_params", ">10,"), ("compile s", "compile_s", ">9.1f"), ("step ms", "train_step_ms", ">9.1f"),
                ("train img/s", "train_images_per_s", ">11.2f"), ("G fwd ms", "synthesis_ms", ">9.1f"),
                ("G fwd img/s", "synthesis_images_per_s", ">11.2f")]


def print_profile(row: dict) -> None:
    """The op-by-op split of one compared unit (seconds per bucket on each side, top ops of ours)."""
    print(f"\nWhere one '{row['unit']}' unit at {row['resolution']} px, batch {row['batch']} spends its time "
          "(profiled once per side; bucket sums):\n")
    op_profile.print_profile_table(row["profile_ours"], row["profile_nvlabs"], row["ours_s"], row["nvlabs_s"])
    print("\nLargest ops of ours (derivative order 0 = forward, 1 = backward, 2 = R1's second order):\n")
    print(f"{'seconds':>8} {'bucket':<15} {'order':>5}  {'where':<40} op")
    for r in row["profile_ours_top_ops"][:20]:
        print(f"{r['seconds']:>8.3f} {r['bucket']:<15} {r['derivative_order']:>5}  {r['where']:<40} {r['op']}")
    print()


def _batches(args) -> list[int]:
    if len(args.batch) not in (1, len(args.resolutions)):
        raise SystemExit(f"--batch takes one value or one per resolution ({len(args.resolutions)}), "
                         f"got {len(args.batch)}")
    return args.batch * len(args.resolutions) if len(args.batch) == 1 else args.batch


def main(args: argparse.Namespace) -> int:
    rows = []
    batches = _batches(args)
    if args.compare_nvlabs:
        for unit in args.units:
            for widths in args.widths:
                for res, batch in zip(args.resolutions, batches):
                    row = compare_one(args.compare_nvlabs, unit, res, batch, widths, args.mapping_layers,
                                      args.impl, args.repeats, args.threads, args.profile)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.profile:
                        print_profile(row)
        print(f"\nThis project (jax {jax.__version__}, impl {args.impl}) and NVlabs stylegan2-ada-pytorch "
              f"(torch {rows[0]['torch']}, {rows[0]['torch_threads']} threads) alternating on "
              f"{jax.devices()[0].device_kind}; medians of {args.repeats}; 'step' = one R1 period of 16 "
              "training steps:\n")
        print_rows(rows, COMPARE_COLUMNS)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    for widths in args.widths:
        for res, batch in zip(args.resolutions, batches):
            row = bench_one(res, batch, widths, args.impl, args.periods, args.mapping_layers)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nStyleGAN2 training step on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"lazy R1 / path-length terms amortised over {args.periods} R1 period(s) of 16 steps:\n")
    print_rows(rows, STEP_COLUMNS)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench-stylegan2", help="StyleGAN2 training-step throughput (images/s)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 256])
    p.add_argument("--batch", type=int, nargs="+", default=[8], help="one value, or one per resolution")
    p.add_argument("--widths", nargs="+", default=["paper256"], choices=sorted(WIDTHS))
    p.add_argument("--impl", default="auto", choices=["auto", "xla", "pallas"])
    p.add_argument("--periods", type=int, default=1, help="R1 periods (of 16 steps) timed")
    p.add_argument("--mapping-layers", type=int, default=None, help="override the widths' mapping depth")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--compare-nvlabs", metavar="PATH", default=None,
                   help="a checkout of NVlabs stylegan2-ada-pytorch: time its networks on the same shapes, "
                        "alternating with ours, and print the ratio")
    p.add_argument("--units", nargs="+", default=["g", "step"], choices=["g", "step"],
                   help="with --compare-nvlabs: G forward+backward and/or the whole training step")
    p.add_argument("--repeats", type=int, default=3, help="with --compare-nvlabs: alternating rounds")
    p.add_argument("--threads", type=int, default=None, help="torch threads on the NVlabs side (default: torch's)")
    p.add_argument("--profile", action="store_true",
                   help="with --compare-nvlabs: also profile one unit per side and print where the time goes, "
                        "op by op (JAX profiler / torch.profiler)")
    p.set_defaults(func=main)
