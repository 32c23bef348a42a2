"""Which path `impl="auto"` takes on an accelerator: measured tables, never hope.

A Pallas kernel is not faster than XLA for every layer shape on every chip, so "auto" runs the kernel
only where a table measured on that device kind says it won, and the XLA path everywhere else:
shapes the table does not list, and device kinds without a table. `viscoin-jax bench-kernels
--write-table` measures the tables (forward + backward, the training case) and writes one JSON file
per device kind, e.g. `kernels/tuning/NVIDIA_H200.json`. Tables are looked up in the directory named
by $VISCOIN_JAX_TUNING_DIR first (a user's own measurements), then in the tables shipped with the
package.

A table entry is keyed by the op and everything that shapes its work except the batch size
(`modconv_key`, `upfirdn2d_key`); the batch it was measured at is recorded beside it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.resources
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterator, Mapping

import jax
import numpy as np

from ._args import parse_padding, parse_scaling

log = logging.getLogger(__name__)

TUNING_DIR_ENV = "VISCOIN_JAX_TUNING_DIR"
TABLE_FORMAT = 1
# "mosaic_gpu": the Mosaic GPU variant (NVIDIA Hopper and newer), a winner only where timed
WINNERS = ("pallas", "mosaic_gpu", "xla")

# The device kind the dispatch consults when tracing for a platform that is not the host's
# (ahead-of-time compilation for a TPU or GPU topology names it); None = the host's first device.
_DEVICE_KIND: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "viscoin_jax_tuning_device_kind", default=None)


def table_file_name(device_kind: str) -> str:
    """'NVIDIA H200' -> 'NVIDIA_H200.json' (any run of other characters becomes one underscore)."""
    stem = re.sub(r"[^A-Za-z0-9]+", "_", device_kind).strip("_")
    if not stem:
        raise ValueError(f"device kind {device_kind!r} has no letters or digits to name a table after")
    return stem + ".json"


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def modconv_key(x_shape, w_shape, up: int, down: int, padding, demodulate: bool, dtype) -> str:
    """The table key of a modulated_conv2d call: its shapes without the batch, resampling, dtype."""
    _, h, w, cin = x_shape
    kh, kw, _, cout = w_shape
    pad = ",".join(map(str, parse_padding(padding)))
    return (f"modconv h{h} w{w} cin{cin} cout{cout} k{kh}x{kw} up{int(up)} down{int(down)} pad{pad} "
            f"demod{int(bool(demodulate))} {_dtype_name(dtype)}")


def upfirdn2d_key(x_shape, f_shape, up, down, padding, dtype) -> str:
    """The table key of an upfirdn2d call: its shapes without the batch, filter size, resampling, dtype."""
    _, h, w, c = x_shape
    fsize = "x".join(str(int(s)) for s in f_shape) or "1"
    pair = lambda v, name: ",".join(map(str, parse_scaling(v, name)))
    return (f"upfirdn2d h{h} w{w} c{c} f{fsize} up{pair(up, 'up')} down{pair(down, 'down')} "
            f"pad{','.join(map(str, parse_padding(padding)))} {_dtype_name(dtype)}")


def check_table(table: Mapping, source: str) -> dict[str, str]:
    """{key: winner} of a parsed table; a ValueError naming `source` and the problem otherwise."""
    if not isinstance(table, Mapping) or table.get("format") != TABLE_FORMAT:
        raise ValueError(f"{source}: not a viscoin-jax tuning table (format {TABLE_FORMAT} expected)")
    entries = table.get("entries")
    if not isinstance(entries, list):
        raise ValueError(f"{source}: 'entries' must be a list")
    winners = {}
    for i, e in enumerate(entries):
        if not isinstance(e, Mapping) or not isinstance(e.get("key"), str) or e.get("winner") not in WINNERS:
            raise ValueError(f"{source}: entry {i} needs a string 'key' and a 'winner' in {WINNERS}")
        winners[e["key"]] = e["winner"]
    return winners


def _table_paths(device_kind: str) -> list:
    name = table_file_name(device_kind)
    paths = []
    if os.environ.get(TUNING_DIR_ENV):
        paths.append(Path(os.environ[TUNING_DIR_ENV]) / name)
    paths.append(importlib.resources.files(__package__).joinpath("tuning", name))
    return paths


@functools.cache
def load_table(device_kind: str) -> tuple[dict[str, str], str] | None:
    """({key: winner}, where it was read) of the device kind's table, or None when there is none.
    Cached: a table is read once per process (`load_table.cache_clear()` after writing one)."""
    for path in _table_paths(device_kind):
        if path.is_file():
            source = str(path)
            try:
                table = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{source}: unreadable tuning table ({e})") from None
            return check_table(table, source), source
    return None


@contextlib.contextmanager
def tuning_device_kind(device_kind: str | None) -> Iterator[None]:
    """Consult `device_kind`'s table while tracing (for a target that is not the host's device)."""
    token = _DEVICE_KIND.set(device_kind)
    try:
        yield
    finally:
        _DEVICE_KIND.reset(token)


def current_device_kind(family: str) -> str | None:
    """The device kind whose table decides for `family` ("gpu" / "tpu"): the one named by
    `tuning_device_kind`, else the host's first device when it is of that family, else None."""
    named = _DEVICE_KIND.get()
    if named is not None:
        return named
    device = jax.devices()[0]
    host_family = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu"}.get(device.platform)
    return device.device_kind if host_family == family else None


@functools.cache
def _say_once(message: str) -> None:
    log.info(message)


def table_winner(family: str, key: str) -> str:
    """The path "auto" runs for `key` on `family`'s current device kind: the table's winner ("pallas",
    "mosaic_gpu" or "xla") when that kind's table lists the key, "xla" otherwise. One log line per
    device kind says which table decides (or that none exists, so "auto" is XLA there)."""
    kind = current_device_kind(family)
    if kind is None:
        _say_once(f'impl="auto" traced for {family} without a device kind: the XLA path everywhere')
        return "xla"
    found = load_table(kind)
    if found is None:
        _say_once(f'impl="auto" on {kind}: no tuning table ({table_file_name(kind)}), so the XLA path '
                  f"everywhere; `viscoin-jax bench-kernels --write-table` measures one")
        return "xla"
    winners, source = found
    _say_once(f'impl="auto" on {kind}: tuning table {source} ({sum(w != "xla" for w in winners.values())} '
              f"of {len(winners)} measured shapes run a Pallas kernel, the rest XLA)")
    return winners.get(key, "xla")


def kernel_wins(family: str, key: str) -> bool:
    """Whether "auto" runs a Pallas kernel (either GPU variant) for `key` (`table_winner`)."""
    return table_winner(family, key) != "xla"


def table_from_rows(rows, device_kind: str, platform: str, batch: int, jax_version: str) -> dict:
    """A tuning table from bench-kernels rows: per layer key, the fastest of the "pallas", "mosaic_gpu"
    (where timed) and "xla" forward + backward medians (a kernel must beat XLA strictly to win)."""
    by_key: dict[str, dict] = {}
    for r in rows:
        if r["pass_"] != "fwd+bwd" or r["impl"] not in WINNERS:
            continue
        by_key.setdefault(r["key"], {"layer": r["layer"]})[f"{r['impl']}_ms"] = r["ms"]
    entries = []
    for key, e in sorted(by_key.items()):
        times = {w: e[f"{w}_ms"] for w in WINNERS if f"{w}_ms" in e}
        if "xla" not in times or len(times) < 2:
            continue
        best = min(times, key=times.get)
        e["winner"] = best if times[best] < times["xla"] else "xla"
        entries.append({"key": key, **e})
    return {"format": TABLE_FORMAT, "device_kind": device_kind, "platform": platform, "batch": batch,
            "jax": jax_version, "entries": entries}
