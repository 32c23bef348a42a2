"""`viscoin-jax train`: train from a config file.

    viscoin-jax train --config configs/x.py[:variant] --workdir DIR [--config.a.b=VALUE ...]

The config's `trainer` field picks the trainer module (see TRAINERS); each exposes
`make_task(config)` and `train(config, workdir)`. Running the same command again resumes from the
latest checkpoint in DIR; a run stopped by SIGTERM or a preemption notice saves a checkpoint,
skips its final evaluation and exits with status 75 (EXIT_PREEMPTED, sysexits' EX_TEMPFAIL) so
that a scheduler requeues it. Multi-process launches (TPU pods, SLURM) are detected from the
environment and initialise `jax.distributed` before anything else touches the devices.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .config import load_config, parse_override_args

# config.trainer -> module with make_task(config) and train(config, workdir)
TRAINERS = {
    "toy": "viscoin_jax.training.toy",
    "classifier": "viscoin_jax.training.classifier",
    "stylegan2": "viscoin_jax.training.stylegan2",
    "viscoin": "viscoin_jax.training.viscoin",
}


def trainer_module(name: str):
    """Imports the trainer module registered for `config.trainer`."""
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r} (config.trainer); known: {sorted(TRAINERS)}")
    try:
        return importlib.import_module(TRAINERS[name])
    except ModuleNotFoundError as e:
        if e.name == TRAINERS[name]:
            raise ValueError(f"trainer {name!r}: module {TRAINERS[name]} is not available") from e
        raise


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model from a config file",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE[:VARIANT]",
                   help="config file exposing get_config(arg=None)")
    p.add_argument("--workdir", required=True, help="checkpoints, logs and samples go here")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit without training")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    # `--config.a.b=VALUE` overrides arrive as unknown arguments (see viscoin_jax.cli).
    p.set_defaults(func=main, allow_unknown=True)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":  # Orbax logs every file operation at INFO through absl
        logging.getLogger("absl").setLevel(logging.WARNING)
    if args.log_level != "DEBUG":  # Orbax logs every file operation at INFO through absl
        logging.getLogger("absl").setLevel(logging.WARNING)
    overrides = list(getattr(args, "unknown", []) or [])
    try:
        parse_override_args(overrides)  # rejects anything that is not --config.KEY=VALUE
        config = load_config(args.config, overrides)
        if config.trainer not in TRAINERS:
            raise ValueError(f"unknown trainer {config.trainer!r} (config.trainer); known: "
                             f"{sorted(TRAINERS)}")
    except (ValueError, FileNotFoundError) as e:
        print(f"viscoin-jax train: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config)
        return 0

    from .distributed import maybe_initialize_distributed
    from .loop import Preempted
    maybe_initialize_distributed()  # before anything touches the devices
    try:
        trainer_module(config.trainer).train(config, args.workdir)
    except Preempted as e:  # the checkpoint is saved; the same command resumes
        print(f"viscoin-jax train: {e}", file=sys.stderr)
        return e.exit_code
    return 0
