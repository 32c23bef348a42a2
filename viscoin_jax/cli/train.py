"""`viscoin-jax train`: train from a config file.

    viscoin-jax train --config NAME[:variant] --workdir DIR [--config.a.b=VALUE ...]
    viscoin-jax train --config path/to/x.py[:variant] --workdir DIR

NAME is a config shipped with the package (the repository's configs/, e.g. `classifier_synthetic`,
`toy_regression:fsdp`); a path loads any file exposing `get_config(arg=None)`.

The config's `trainer` field picks the trainer module (see TRAINERS); each exposes
`make_task(config)` and `train(config, workdir)`. Running the same command again resumes from the
latest checkpoint in DIR; a run stopped by SIGTERM or a preemption notice saves a checkpoint,
skips its final evaluation and exits with status 75 (EXIT_PREEMPTED, sysexits' EX_TEMPFAIL) so
that a scheduler requeues it. Problems of the inputs (config, data, paths, a workdir in use) end
with one line on stderr and exit status 2 (`--log-level DEBUG` logs the traceback). Multi-process
launches (TPU pods, SLURM) are detected from the environment and initialise `jax.distributed`
before anything else touches the devices.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..training.config import config_names, load_config, parse_override_args
from ..training.distributed import maybe_initialize_distributed
from ..training.registry import TRAINERS, trainer_module
from ..training.workdir_lock import WorkdirLockedError
from .log_setup import LEVELS, setup_logging


def user_errors() -> tuple[type[BaseException], ...]:
    """What a run raises for a problem of its inputs (config, data, paths, a busy workdir): the
    command line reports these in one line with exit status 2 instead of a traceback."""
    return (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            WorkdirLockedError)


def report_user_error(prog: str, error: BaseException) -> int:
    """Prints `prog: error: <first line>` to stderr (the traceback at DEBUG level); returns 2."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    logging.getLogger(__name__).debug("%s failed", prog, exc_info=error)
    print(f"{prog}: error: {line}", file=sys.stderr)
    return 2


def config_help() -> str:
    """`--config`'s help: the packaged names, so that `--help` shows what a bare name can be."""
    return ("a packaged config (" + ", ".join(config_names()) + ") or a .py file exposing "
            "get_config(arg=None); :VARIANT selects a variant")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model from a config file",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="NAME|FILE.py[:VARIANT]", help=config_help())
    p.add_argument("--workdir", required=True, help="checkpoints, logs and samples go here")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit without training")
    p.add_argument("--log-level", default="INFO", choices=LEVELS,
                   help="DEBUG adds the hyper-parameters (also in WORKDIR/config.txt), Orbax's file "
                   "operations and the traceback of an input error")
    # `--config.a.b=VALUE` overrides arrive as unknown arguments (see viscoin_jax.cli).
    p.set_defaults(func=main, allow_unknown=True)


def main(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)  # absl (Orbax's file operations) at WARNING unless DEBUG
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

    # the training loop (Flax, Orbax) only now, after logging is set up: not when the command line is parsed
    from ..training.loop import Preempted
    maybe_initialize_distributed()  # before anything touches the devices
    try:
        trainer_module(config.trainer).train(config, args.workdir)
    except Preempted as e:  # the checkpoint is saved; the same command resumes
        print(f"viscoin-jax train: {e}", file=sys.stderr)
        return e.exit_code
    except user_errors() as e:
        return report_user_error("viscoin-jax train", e)
    return 0
