"""The `viscoin-jax` command line: one sub-command per job.

Each sub-command lives in its own module and exposes `add_parser(subparsers)`, which registers the
sub-command and sets `func` to the function that runs it. Modules are imported only when the
command line is parsed, so a sub-command's heavy imports do not slow the others.
"""

from __future__ import annotations

import argparse
import importlib

from viscoin_jax import compilation_cache

# sub-command name -> module that defines it
COMMANDS = {
    "bench-kernels": "viscoin_jax.kernels.bench",
    "train": "viscoin_jax.cli.train",
    "explain": "viscoin_jax.cli.explain",
    "run": "viscoin_jax.cli.run",
    "convert": "viscoin_jax.convert.cli",
    "results": "viscoin_jax.cli.results",
    "serve": "viscoin_jax.cli.serve",
    "bench-stylegan2": "viscoin_jax.benchmarks.bench_step",
}
# sub-commands that keep JAX's persistent compilation cache (see viscoin_jax.compilation_cache)
CACHED_COMMANDS = ("train", "explain", "run", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="viscoin-jax", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    for name in CACHED_COMMANDS:
        compilation_cache.add_arguments(subparsers.choices[name])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "allow_unknown", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.unknown = unknown
    if args.command in CACHED_COMMANDS:
        compilation_cache.from_args(args)
    return int(args.func(args) or 0)

