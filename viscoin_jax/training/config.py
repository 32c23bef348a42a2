"""Run configurations: `configs/*.py` files, command-line overrides, and the copy kept in a workdir.

A config file is a Python file exposing `get_config(arg=None) -> ml_collections.ConfigDict`; the
optional `arg` selects a variant (`configs/x.py:variant`). A spec is either a path to such a file
(`configs/demo.py`, `my/exp.py:big`) or the bare name of one shipped in the package (`demo`,
`demo:quick`): the repository's configs/ installs as `viscoin_jax.configs`, so names work from any
directory and from a wheel. Every config starts from `base_config()`,
which declares the sections the training framework reads, so a config can only set keys the code
knows about. Overrides use the `--config.a.b=value` syntax and are type-checked against the value
already in the config: an unknown key or a value of the wrong type fails before anything runs.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import logging
import os
import pkgutil
from collections.abc import Sequence
from pathlib import Path

from ml_collections import ConfigDict

log = logging.getLogger(__name__)

CONFIG_JSON = "config.json"
CONFIG_TXT = "config.txt"


def base_config() -> ConfigDict:
    """The sections every run has; trainers add `model`, `data`, `loss`, ... on top."""
    c = ConfigDict()
    c.trainer = ""  # name in viscoin_jax.training.registry.TRAINERS
    c.seed = 0

    c.mesh = ConfigDict()
    c.mesh.data = -1  # -1: every device not used by the other axis
    c.mesh.fsdp = 1
    c.mesh.fsdp_min_size = 2**14  # arrays with fewer elements stay replicated under FSDP

    c.train = ConfigDict()
    c.train.num_steps = 1000
    c.train.batch_size = 64  # global batch, summed over all processes
    c.train.log_every = 50
    c.train.eval_every = 0  # 0: never
    c.train.sample_every = 0  # 0: never (image grids from task.sample_images)
    c.train.progress_every = 100

    c.checkpoint = ConfigDict()
    c.checkpoint.every = 500
    c.checkpoint.max_to_keep = 3  # the latest N are kept ...
    c.checkpoint.best_metric = ""  # ... plus the best one by this metric (e.g. "eval/accuracy")
    c.checkpoint.best_mode = "max"  # "max" or "min"
    c.checkpoint.async_save = True
    return c


# ----------------------------------------------------------------------------------------------
# Loading config files


CONFIG_PACKAGE = "viscoin_jax.configs"  # the repository's configs/, installed with the package


def _is_name(text: str) -> bool:
    """`demo` names a packaged config; anything with a `/`, `.` or other punctuation is a path."""
    return text.isidentifier()


def config_names() -> list[str]:
    """The packaged configs (the repository's configs/*.py), by the name `--config NAME` takes."""
    package = importlib.import_module(CONFIG_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__)
                  if not m.ispkg and not m.name.startswith("_"))


def _split_variant(spec: str) -> tuple[str, str | None]:
    """`configs/x.py:variant` -> (`configs/x.py`, `variant`), `x:variant` -> (`x`, `variant`);
    `C:/x.py` has no variant."""
    path, sep, variant = spec.rpartition(":")
    if (sep and variant and "/" not in variant and "\\" not in variant
            and (path.endswith(".py") or _is_name(path))):
        return path, variant
    return spec, None


def _import_file(path: Path):
    name = "viscoin_config_" + "".join(ch if ch.isalnum() else "_" for ch in str(path.resolve()))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _import_config(source: str):
    """The module of a packaged config name or of a config file; one-line errors for neither."""
    if _is_name(source):
        names = config_names()
        if source not in names:
            raise ValueError(f"unknown config {source!r}: packaged configs are {', '.join(names)} "
                             "(or give the path of a .py file)")
        return importlib.import_module(f"{CONFIG_PACKAGE}.{source}")
    path = Path(source)
    if not path.is_file():
        hint = ""
        if path.suffix == ".py" and path.stem in config_names():
            hint = f" (the packaged config of that name loads from any directory with --config {path.stem})"
        raise FileNotFoundError(f"config file not found: {path}{hint}")
    return _import_file(path)


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Loads `path.py[:variant]` or `name[:variant]`, applies `--config.a.b=value` overrides, and
    locks the result.

    Raises FileNotFoundError for a missing file and ValueError for an unknown config name, a file
    without `get_config`, a variant the file rejects, an unknown key or a badly typed value (the
    message names the key).
    """
    source, variant = _split_variant(spec)
    module = _import_config(source)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ValueError(f"config {source} defines no get_config(arg=None) function")
    config = get_config(variant) if variant is not None else get_config()
    if not isinstance(config, ConfigDict):
        raise ValueError(f"{source}: get_config() returned {type(config).__name__}, not a ConfigDict")
    config = ConfigDict(config)  # a private, unlocked copy
    apply_overrides(config, overrides)
    config.lock()
    return config


# ----------------------------------------------------------------------------------------------
# Overrides


def parse_override_args(args: Sequence[str]) -> list[tuple[str, str]]:
    """`["--config.a.b=1", "--config.c", "x"]` -> `[("a.b", "1"), ("c", "x")]`.

    Also accepts the prefix-less form `a.b=1`, convenient from Python.
    """
    pairs, i = [], 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                key, value = body, args[i + 1]
                i += 1
            else:
                raise ValueError(f"override {arg!r} has no value (use --config.{body}=VALUE)")
        elif not arg.startswith("-") and "=" in arg:
            key, value = arg.split("=", 1)
        else:
            raise ValueError(f"not a config override: {arg!r} (expected --config.KEY=VALUE)")
        if not key:
            raise ValueError(f"empty key in override {arg!r}")
        pairs.append((key, value))
        i += 1
    return pairs


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_value(key: str, text: str, current, field_type):
    """Converts `text` to the type of the value the key already holds."""
    if field_type is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"config key {key!r}: expected a bool (true/false), got {text!r}")
    if field_type is int:
        try:
            return int(text.strip())
        except ValueError:
            raise ValueError(f"config key {key!r}: expected an int, got {text!r}") from None
    if field_type is float:
        try:
            return float(text.strip())
        except ValueError:
            raise ValueError(f"config key {key!r}: expected a float, got {text!r}") from None
    if field_type is str:
        return text
    if field_type in (tuple, list):
        value = _literal(text)
        if isinstance(value, str):  # bare words: `--config.x=a,b` means ("a", "b")
            value = [s.strip() for s in value.split(",") if s.strip()]
        elif not isinstance(value, (tuple, list)):
            value = (value,)  # `--config.x=3` means (3,)
        if current:  # check elements against the existing (homogeneous) element type
            kinds = {type(v) for v in current}
            if len(kinds) == 1:
                kind = kinds.pop()
                for v in value:
                    ok = isinstance(v, kind) or (kind is float and isinstance(v, int))
                    if not ok or (kind is not bool and isinstance(v, bool)):
                        raise ValueError(f"config key {key!r}: elements must be {kind.__name__}, "
                                         f"got {v!r} in {text!r}")
                if kind is float:
                    value = [float(v) for v in value]
        return field_type(value)
    if field_type is type(None):
        return _literal(text)  # an unset field takes whatever the literal is
    raise ValueError(f"config key {key!r} holds a {field_type.__name__}; it cannot be overridden "
                     "from the command line")


def _unknown_key(key: str, node: ConfigDict, part: str) -> ValueError:
    close = difflib.get_close_matches(part, list(node.keys()), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ValueError(f"unknown config key {key!r}: no {part!r} among {sorted(node.keys())}{hint}")


def apply_overrides(config: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
    """Applies `--config.a.b=value` overrides in place; see `load_config` for the errors."""
    for key, text in parse_override_args(overrides):
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            if not isinstance(node, ConfigDict) or part not in node:
                raise _unknown_key(key, node, part)
            node = node[part]
        if not isinstance(node, ConfigDict):
            raise ValueError(f"config key {key!r}: {'.'.join(parents)} is not a section")
        if leaf not in node:
            raise _unknown_key(key, node, leaf)
        current = node[leaf]
        if isinstance(current, ConfigDict):
            raise ValueError(f"config key {key!r} is a section; override its fields one by one")
        value = _parse_value(key, text, current, node.get_type(leaf))
        try:
            node[leaf] = value
        except TypeError as e:
            raise ValueError(f"config key {key!r}: {e}") from None
    return config


# ----------------------------------------------------------------------------------------------
# The copy of the config kept with a run


def _to_plain(value):
    if isinstance(value, ConfigDict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_to_plain(v) for v in value]
    return value


def config_to_dict(config: ConfigDict) -> dict:
    """A JSON-ready dict (tuples become lists)."""
    return _to_plain(config)


def _from_plain(value):
    if isinstance(value, dict):
        return ConfigDict({k: _from_plain(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_from_plain(v) for v in value)
    return value


def config_from_dict(data: dict) -> ConfigDict:
    """Inverse of `config_to_dict`; sequences come back as tuples."""
    return _from_plain(data)


def save_config(config: ConfigDict, workdir: str | os.PathLike) -> Path:
    """Writes `config.json` (machine-readable) and `config.txt` (for people) into `workdir`."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / CONFIG_JSON
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config_to_dict(config), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)  # never leaves a half-written config behind
    (workdir / CONFIG_TXT).write_text(str(config))
    return path


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): value}


def config_changes(old: dict, new: dict) -> list[str]:
    """`["train.num_steps: 6 -> 8", "optim.b3: (absent) -> 0.5", ...]` between two config dicts."""
    a, b = _flat(json.loads(json.dumps(old))), _flat(json.loads(json.dumps(new)))
    missing = "(absent)"
    return [f"{key}: {a.get(key, missing)!r} -> {b.get(key, missing)!r}".replace("'(absent)'", missing)
            for key in sorted(set(a) | set(b)) if a.get(key, missing) != b.get(key, missing)]


def record_config(config: ConfigDict, workdir: str | os.PathLike, *, resuming: bool) -> list[str]:
    """Writes the run's config into `workdir`, except over the config of a run being resumed.

    A resumed run whose config differs from its saved `config.json` keeps that file (it describes
    the checkpoints already there) and logs the keys that changed; returns them (empty when equal).
    """
    path = Path(workdir) / CONFIG_JSON
    if resuming and path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if isinstance(old, dict):
            changes = config_changes(old, config_to_dict(config))
            if changes:
                log.warning("resuming %s with a changed config (%s kept as it was; the new config "
                            "goes into the new checkpoints): %s", workdir, path, "; ".join(changes))
            return changes
    save_config(config, workdir)
    return []


def load_saved_config(workdir: str | os.PathLike) -> ConfigDict:
    """Reads the `config.json` that `save_config` wrote into `workdir`; returns a locked config."""
    path = Path(workdir) / CONFIG_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no saved config at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"corrupt config file {path}: top level is not an object")
    config = config_from_dict(data)
    config.lock()
    return config


__all__ = [
    "base_config", "load_config", "config_names", "apply_overrides", "parse_override_args", "config_to_dict",
    "config_from_dict", "save_config", "load_saved_config", "config_changes", "record_config",
]
