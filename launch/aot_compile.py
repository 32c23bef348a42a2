#!/usr/bin/env python
"""Compile a config's train step ahead of time for a device topology, without those devices.

Prints the per-device memory XLA plans for the step and the collectives in the compiled program,
so a mesh / batch size / model size can be checked before a pod is booked.

    python launch/aot_compile.py --config configs/toy_regression.py:fsdp --topology cpu:8
    python launch/aot_compile.py --config configs/x.py --topology tpu:v5e:4x4 --config.mesh.fsdp=16

Topologies:
  cpu:N       N fake CPU devices (the script re-executes itself with the XLA flag that makes them)
  tpu:NAME    a Cloud TPU topology by name (e.g. v5e:4x4, v4:2x2x2), through
              jax.experimental.topologies; needs libtpu installed (pip install 'jax[tpu]')
  cuda:SxHxG  S slices of H hosts with G GPUs each (cuda:1x1x8: one 8-GPU node), through
              jax.experimental.topologies and the CUDA plugin (pip install jax-cuda12-plugin; no
              GPU or CUDA install needed); needs --gpu-target-config, a GpuTargetConfig text proto
              describing the GPU model (a file, or h100 / a100 from launch/gpu_targets/)

--lower-only stops after lowering and prints the trace and lowering times; with cpu:N and
--lowering-platform cuda|tpu it lowers for that platform on N host devices (the kernels' Triton /
Mosaic lowering, no libtpu or CUDA plugin needed):

    python launch/aot_compile.py --config configs/stylegan2_cub.py --topology cpu:8 --lowering-platform cuda --lower-only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_REEXEC_MARK = "VISCOIN_AOT_REEXEC"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="NAME|FILE.py[:VARIANT]",
                   help="a packaged config name (e.g. toy_regression) or a .py file")
    p.add_argument("--topology", required=True, help="cpu:N, tpu:NAME or cuda:SxHxG")
    p.add_argument("--num-slices", type=int, default=1, help="TPU multi-slice count")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    p.add_argument("--hlo", default=None, help="also write the compiled HLO text to this file")
    p.add_argument("--lower-only", action="store_true",
                   help="stop after tracing and lowering (print their times; no compile, no memory)")
    p.add_argument("--lowering-platform", default=None, choices=["cuda", "rocm", "tpu"],
                   help="with cpu:N and --lower-only: lower for this platform on N host devices "
                        "(the kernels' Triton / Mosaic lowering without libtpu or the CUDA plugin)")
    p.add_argument("--gpu-target-config", default=None, metavar="PBTXT",
                   help="GpuTargetConfig text proto of the GPU model (cuda topologies): a file, "
                        "or h100 / a100 (launch/gpu_targets/)")
    return p.parse_known_args(argv)


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Occurrences of each collective op (sync, or the -start half of async ones) in HLO text."""
    counts = {}
    for name in COLLECTIVES:
        counts[name] = len(re.findall(rf"\s{name}(?:-start)?\(", hlo_text))
    return counts


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _cpu_devices_or_reexec(count: int, argv: list[str]) -> None:
    """Makes sure this process has `count` CPU devices, re-executing itself if needed."""
    flag = f"--xla_force_host_platform_device_count={count}"
    flags = os.environ.get("XLA_FLAGS", "")
    if flag in flags.split() and os.environ.get("JAX_PLATFORMS") == "cpu":
        return
    if os.environ.get(_REEXEC_MARK):
        raise SystemExit(f"aot_compile: could not get {count} CPU devices (XLA_FLAGS={flags!r})")
    env = dict(os.environ)
    kept = [f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*kept, flag])
    env["JAX_PLATFORMS"] = "cpu"
    env[_REEXEC_MARK] = "1"
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)


def _topology_devices(topology: str, num_slices: int, gpu_target_config: str | None = None):
    kind, _, name = topology.partition(":")
    if kind == "cpu":
        import jax
        count = int(name)
        devices = jax.devices("cpu")
        if len(devices) != count:
            raise SystemExit(f"aot_compile: expected {count} CPU devices, found {len(devices)}")
        return devices
    if kind == "tpu":
        import importlib.util
        if importlib.util.find_spec("libtpu") is None:
            raise SystemExit("aot_compile: TPU topologies need libtpu, which is not installed "
                             "(pip install 'jax[tpu]'); use --topology cpu:N to check sharding on "
                             "fake CPU devices instead")
        from jax.experimental import topologies
        kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
        desc = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs)
        return desc.devices
    if kind == "cuda":
        if not gpu_target_config:
            raise SystemExit("aot_compile: cuda topologies need --gpu-target-config")
        from jax.experimental import topologies
        named = Path(__file__).resolve().parent / "gpu_targets" / f"{gpu_target_config}.pbtxt"
        path = named if named.is_file() else Path(gpu_target_config)
        if not path.is_file():
            known = sorted(p.stem for p in named.parent.glob("*.pbtxt"))
            raise SystemExit(f"aot_compile: --gpu-target-config {gpu_target_config!r} is neither a file nor "
                             f"one of {known}")
        target_config = path.read_text()
        desc = topologies.get_topology_desc(topology_name="gpu", platform="cuda",
                                            target_config=target_config, topology=name)
        return desc.devices
    raise SystemExit(f"aot_compile: unknown topology {topology!r} "
                     "(use cpu:N, tpu:NAME or cuda:SxHxG)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parse_args(argv)
    kind, _, count = args.topology.partition(":")
    if args.lowering_platform and (kind != "cpu" or not args.lower_only):
        raise SystemExit("aot_compile: --lowering-platform needs a cpu:N topology and --lower-only")
    if kind == "cpu":
        if not count.isdigit() or int(count) < 1:
            raise SystemExit(f"aot_compile: bad topology {args.topology!r} (cpu:N with N >= 1)")
        _cpu_devices_or_reexec(int(count), argv)
    if kind == "cuda":  # compiling only: the plugin's check of a local CUDA install is moot
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

    import jax  # only now: the device flags above must be set first

    from viscoin_jax.kernels import lowering_for
    from viscoin_jax.training import loop, mesh as mesh_lib
    from viscoin_jax.training.config import load_config
    from viscoin_jax.training.registry import trainer_module

    config = load_config(args.config, overrides)
    devices = _topology_devices(args.topology, args.num_slices, args.gpu_target_config)
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    task = trainer_module(config.trainer).make_task(config)
    compiled_task = loop.compile_task(task, mesh)
    batch = loop.abstract_global_batch(task, config, mesh)
    start = time.perf_counter()
    platform = args.lowering_platform or kind
    # The kernels shard_map themselves over the mesh they see, and trace only the target's branch;
    # impl="auto" consults the tuning table of the topology's device kind (none: the XLA path).
    device_kind = None if kind == "cpu" else devices[0].device_kind
    with jax.set_mesh(mesh), lowering_for(platform, device_kind=device_kind):
        traced = compiled_task.train_step.trace(compiled_task.abstract_state, batch)
        traced_at = time.perf_counter()
        lowered = traced.lower(lowering_platforms=(platform,)) if args.lowering_platform else traced.lower()
        lowered_at = time.perf_counter()
        compiled = None if args.lower_only else lowered.compile()
    seconds = {"trace": round(traced_at - start, 1), "lower": round(lowered_at - start, 1),
               "compile": None if compiled is None else round(time.perf_counter() - lowered_at, 1)}
    if compiled is None:
        text = lowered.as_text()
        kernels = text.count("__gpu$xla.gpu.triton") + text.count("tpu_custom_call")
        report = {"config": args.config, "topology": args.topology, "lowering_platform": platform,
                  "devices": len(devices), "mesh": {k: int(v) for k, v in mesh.shape.items()},
                  "kernel_calls": kernels, "seconds": seconds}
        print(f"train step of {args.config} lowered for {platform} on {args.topology}: mesh "
              f"{report['mesh']}, {kernels} Pallas calls in the lowered module")
        print(f"trace {seconds['trace']}s, trace + lower {seconds['lower']}s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        return 0

    hlo_text = compiled.as_text()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(hlo_text)
    memory = {}
    stats = compiled.memory_analysis()
    if stats is not None:
        for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                      "alias_size_in_bytes", "generated_code_size_in_bytes"):
            memory[field] = int(getattr(stats, field, 0) or 0)
        memory["total_bytes"] = (memory["argument_size_in_bytes"] + memory["output_size_in_bytes"]
                                 + memory["temp_size_in_bytes"] - memory["alias_size_in_bytes"]
                                 + memory["generated_code_size_in_bytes"])
    params = sum(x.size for x in jax.tree.leaves(compiled_task.abstract_state["task"]))
    report = {
        "config": args.config,
        "topology": args.topology,
        "devices": len(devices),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "global_batch": config.train.batch_size,
        "state_elements": int(params),
        "memory_per_device": memory,
        "collectives": count_collectives(hlo_text),
        "seconds": seconds,
    }
    print(f"train step of {args.config} on {args.topology}: mesh {report['mesh']}, "
          f"global batch {report['global_batch']}, {params:,} state elements")
    if memory:
        print("per-device memory: " + ", ".join(
            f"{k.removesuffix('_size_in_bytes').removesuffix('_bytes')}={_human(v)}"
            for k, v in memory.items()))
    else:
        print("per-device memory: not reported by this backend")
    print("collectives: " + ", ".join(f"{k}={v}" for k, v in report["collectives"].items()))
    print(f"trace {seconds['trace']}s, trace + lower {seconds['lower']}s, compile {seconds['compile']}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
