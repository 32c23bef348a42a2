"""JAX's persistent compilation cache for the `train`, `run` and `explain` commands.

A restarted or resumed job compiles the same programs again (a StyleGAN2 step is minutes of XLA on
a pod); with the cache on, it loads them from disk instead. On by default for those commands, in
`$VISCOIN_JAX_CACHE_DIR` or else `~/.cache/viscoin_jax/jax_compilation_cache` (any path JAX's cache
accepts, gs:// included), `--compilation-cache DIR` to choose, `--no-compilation-cache` to turn it
off. The first program loaded from the cache is reported in the log, and `summary()` counts them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as cc

log = logging.getLogger("viscoin_jax.compilation_cache")

ENV_DIR = "VISCOIN_JAX_CACHE_DIR"
_HITS = "/jax/compilation_cache/cache_hits"
_REQUESTS = "/jax/compilation_cache/compile_requests_use_cache"
_counts = {"hits": 0, "requests": 0}
_state = {"dir": None, "listening": False}


def default_dir() -> str:
    return os.environ.get(ENV_DIR) or str(Path.home() / ".cache" / "viscoin_jax" / "jax_compilation_cache")


def _on_event(event: str, **_) -> None:
    if event == _REQUESTS:
        _counts["requests"] += 1
    elif event == _HITS:
        _counts["hits"] += 1
        if _counts["hits"] == 1:
            log.info("compilation cache hit: compiled programs are loaded from %s", _state["dir"])


def enable(cache_dir: str | None = None) -> str:
    """Turn the persistent cache on (every program, however quick to compile); returns its dir."""
    cache_dir = str(cache_dir or default_dir())
    if "://" not in cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    _state["dir"] = cache_dir
    if not _state["listening"]:
        jax.monitoring.register_event_listener(_on_event)
        _state["listening"] = True
    log.info("persistent compilation cache: %s (--no-compilation-cache to turn it off)", cache_dir)
    return cache_dir


def summary() -> dict:
    """{"dir", "hits", "requests"}: programs loaded from the cache out of those that asked it."""
    return {"dir": _state["dir"], **_counts}


def add_arguments(parser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--compilation-cache", metavar="DIR", default=None,
                       help=f"persistent compilation cache directory (default: ${ENV_DIR} or "
                            "~/.cache/viscoin_jax/jax_compilation_cache)")
    group.add_argument("--no-compilation-cache", action="store_true",
                       help="compile everything afresh (no persistent compilation cache)")


def from_args(args) -> str | None:
    """Enable the cache as the command line asks; returns its directory, or None when off."""
    if getattr(args, "no_compilation_cache", False):
        return None
    return enable(getattr(args, "compilation_cache", None))


__all__ = ["enable", "summary", "default_dir", "add_arguments", "from_args", "ENV_DIR"]
