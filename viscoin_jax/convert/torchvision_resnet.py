"""Import torchvision ResNet weights (`resnet50-*.pth` state dicts) into `viscoin_jax.models.resnet.ResNet`.

Name mapping (torchvision -> this project's nnx state):
  conv1.weight [O, I, kh, kw]          -> conv1/kernel [kh, kw, I, O]
  bn1.{weight, bias}                   -> bn1/{scale, bias}
  bn1.{running_mean, running_var}      -> bn1/{mean, var}    (num_batches_tracked is ignored)
  layer{s}.{b}.conv{k}.weight          -> layer{s}/{b}/conv{k}/kernel
  layer{s}.{b}.downsample.0.weight     -> layer{s}/{b}/downsample_conv/kernel
  layer{s}.{b}.downsample.1.*          -> layer{s}/{b}/downsample_bn/*
  fc.weight [C, F], fc.bias            -> fc/kernel [F, C], fc/bias
Batch norm is kept unfolded (the model can be fine-tuned). The ImageNet input normalisation is
inside the model, so the converted model takes [-1, 1] images.

Checkpoints: `save_resnet_checkpoint(model, out_dir)` writes `out_dir/config.json` (architecture plus
any extra metadata) and `out_dir/state/` (an Orbax checkpoint of the pure dict of `nnx.state(model)`,
list indices as strings); `load_resnet_checkpoint(out_dir)` rebuilds the model. torch is only needed
to read `.pth` files.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from viscoin_jax.models.resnet import RESNET_SPECS, ResNet

CONFIG_FILE = "config.json"
STATE_DIR = "state"
ARCH_KEYS = ("depth", "num_classes", "width", "small_input")

_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


# ----------------------------------------------------------------------------- reading torch files

def load_torchvision_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict with `torch.load(weights_only=True)` into float32/int numpy arrays.

    Accepts a bare state dict or a dict holding one under "state_dict" / "model"; strips a common
    "module." prefix (DataParallel checkpoints). Raises FileNotFoundError / ValueError with the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such ResNet weight file: {path}")
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a test dependency
        raise ImportError(f"reading {path} needs torch (pip install 'viscoin-jax[convert]')") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / corrupt file, pickled code refused by weights_only, ...
        raise ValueError(f"could not read {path} as a PyTorch state dict: {type(e).__name__}: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    out = {str(k): v.detach().cpu().numpy() for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise ValueError(f"{path} holds no tensors")
    if all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


# ----------------------------------------------------------------------------- name mapping

def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    flat = {}
    for key, value in tree.items():
        path = prefix + (key,)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def _torch_key(path: tuple) -> str:
    """nnx state path (e.g. ('layer1', 0, 'downsample_bn', 'mean')) -> torchvision state-dict key."""
    *mods, leaf = [str(p) for p in path]
    last = mods[-1]
    if last.startswith("conv") or last == "downsample_conv":
        name = "weight"
    elif last == "fc":
        name = {"kernel": "weight", "bias": "bias"}[leaf]
    else:  # batch norm
        name = _BN_NAMES[leaf]
    mods = ["downsample.0" if m == "downsample_conv" else "downsample.1" if m == "downsample_bn" else m
            for m in mods]
    return ".".join(mods + [name])


def _to_jax_layout(path: tuple, value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 4:  # [O, I, kh, kw] -> [kh, kw, I, O]
        return value.transpose(2, 3, 1, 0)
    if path[-1] == "kernel" and value.ndim == 2:  # linear [out, in] -> [in, out]
        return value.T
    return value


def _infer_arch(sd: Mapping[str, np.ndarray]) -> dict:
    if "conv1.weight" not in sd or "fc.weight" not in sd:
        missing = [k for k in ("conv1.weight", "fc.weight") if k not in sd]
        raise ValueError(f"not a torchvision ResNet state dict: missing keys {missing}")
    conv1, fc = np.asarray(sd["conv1.weight"]), np.asarray(sd["fc.weight"])
    if conv1.ndim != 4 or conv1.shape[2] != conv1.shape[3] or conv1.shape[2] not in (3, 7):
        raise ValueError(f"conv1.weight has shape {conv1.shape}, expected [width, 3, 7, 7] (or 3x3 small-input stem)")
    if fc.ndim != 2:
        raise ValueError(f"fc.weight has shape {fc.shape}, expected [num_classes, features]")
    return {"width": int(conv1.shape[0]), "small_input": conv1.shape[2] == 3, "num_classes": int(fc.shape[0])}


def resnet_state_from_torch(state_dict: Mapping[str, np.ndarray], depth: int, num_classes: int | None = None,
                            *, width: int | None = None, small_input: bool | None = None) -> ResNet:
    """Build a ResNet from an in-memory torchvision state dict, checking every name and shape."""
    if depth not in RESNET_SPECS:
        raise ValueError(f"unknown ResNet depth {depth!r}: expected one of {sorted(RESNET_SPECS)}")
    sd = {str(k): np.asarray(v) for k, v in state_dict.items()}
    arch = _infer_arch(sd)
    for name, given in (("num_classes", num_classes), ("width", width), ("small_input", small_input)):
        if given is not None and given != arch[name]:
            raise ValueError(f"{name}={given!r} was requested but the state dict has {name}={arch[name]!r}")

    graphdef, abstract_state = _abstract_resnet(depth, arch["num_classes"], arch["width"], arch["small_input"])
    expected = _flatten(nnx.to_pure_dict(abstract_state))
    key_of = {path: _torch_key(path) for path in expected}
    wanted = set(key_of.values())
    given = {k for k in sd if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(wanted - given), sorted(given - wanted)
    if missing or unexpected:
        raise ValueError(f"state dict does not match a torchvision ResNet-{depth}: {len(missing)} missing keys "
                         f"{_head(missing)}, {len(unexpected)} unexpected keys {_head(unexpected)}")
    values = {}
    for path, leaf in expected.items():
        key = key_of[path]
        value = _to_jax_layout(path, sd[key])
        if tuple(value.shape) != tuple(leaf.shape):
            raise ValueError(f"{key} has shape {tuple(sd[key].shape)}, which does not fit ResNet-{depth} "
                             f"parameter {'/'.join(map(str, path))} of shape {tuple(leaf.shape)}")
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{key} has dtype {value.dtype}, expected floating point")
        values[path] = value.astype(np.float32)
    return _merge(graphdef, abstract_state, values)


@functools.lru_cache(maxsize=16)
def _abstract_resnet_cached(depth: int, num_classes: int, width: int, small_input: bool):
    return nnx.split(nnx.eval_shape(lambda: ResNet(depth, num_classes, width=width, small_input=small_input,
                                                   rngs=nnx.Rngs(0))))


def _abstract_resnet(depth, num_classes, width, small_input):
    """(graphdef, a fresh abstract state) of a ResNet; tracing the constructor is cached."""
    graphdef, state = _abstract_resnet_cached(int(depth), int(num_classes), int(width), bool(small_input))
    return graphdef, jax.tree_util.tree_map(lambda leaf: leaf, state)


def _head(names: list[str], n: int = 20) -> str:
    return str(names[:n])[:-1] + (f", ... ({len(names) - n} more)]" if len(names) > n else "]")


def _merge(graphdef, abstract_state, values: Mapping[tuple, np.ndarray]) -> ResNet:
    def fill(path, leaf):
        keys = tuple(p.key if hasattr(p, "key") else p.idx for p in path)
        return jax.numpy.asarray(values[keys])

    pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(abstract_state))
    nnx.replace_by_pure_dict(abstract_state, pure)
    return nnx.merge(graphdef, abstract_state)


def convert_resnet(state_dict_or_path: Mapping[str, Any] | str | os.PathLike, depth: int = 50,
                   num_classes: int | None = None, *, width: int | None = None,
                   small_input: bool | None = None) -> ResNet:
    """torchvision ResNet weights (a `.pth` path or a state dict) -> `ResNet` in eval-ready form.

    num_classes, width and small_input are read from the weights; passing them checks them.
    """
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        sd = load_torchvision_state_dict(state_dict_or_path)
    elif isinstance(state_dict_or_path, Mapping):
        sd = {}
        for k, v in state_dict_or_path.items():
            sd[str(k)] = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
    else:
        raise ValueError(f"expected a state dict or a path, got {type(state_dict_or_path).__name__}")
    return resnet_state_from_torch(sd, depth, num_classes, width=width, small_input=small_input)


# ----------------------------------------------------------------------------- Orbax checkpoints

def _str_keys(tree):
    if isinstance(tree, Mapping):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return np.asarray(tree)


def save_resnet_checkpoint(model: ResNet, out_dir: str | os.PathLike, config: Mapping[str, Any] | None = None,
                           *, overwrite: bool = False) -> Path:
    """Write `out_dir/config.json` + an Orbax checkpoint of nnx.state(model) under `out_dir/state`.

    `config` may add JSON-serialisable metadata (class names, data set, ...); architecture keys in
    it must agree with the model.
    """
    if not isinstance(model, ResNet):
        raise ValueError(f"expected a viscoin_jax ResNet, got {type(model).__name__}")
    out_dir = Path(out_dir).absolute()
    full = dict(config or {})
    for key, value in model.config.items():
        if key in full and full[key] != value:
            raise ValueError(f"config[{key!r}] = {full[key]!r} disagrees with the model's {key} = {value!r}")
        full[key] = value
    try:
        text = json.dumps(full, indent=2, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"config must be JSON-serialisable: {e}") from e
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out_dir / STATE_DIR, _str_keys(nnx.to_pure_dict(nnx.state(model))), force=True)
    checkpointer.wait_until_finished()
    (out_dir / CONFIG_FILE).write_text(text)
    return out_dir


def read_resnet_config(ckpt_dir: str | os.PathLike) -> dict:
    """The config.json of a checkpoint written by `save_resnet_checkpoint`."""
    ckpt_dir = Path(ckpt_dir).absolute()
    path = ckpt_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no ResNet checkpoint at {ckpt_dir} (missing {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    missing = [k for k in ARCH_KEYS if k not in config]
    if missing:
        raise ValueError(f"{path} lacks architecture keys {missing}")
    return config


def load_resnet_checkpoint(ckpt_dir: str | os.PathLike) -> ResNet:
    """Rebuild the ResNet saved by `save_resnet_checkpoint` (config via `read_resnet_config`)."""
    ckpt_dir = Path(ckpt_dir).absolute()
    config = read_resnet_config(ckpt_dir)
    if not (ckpt_dir / STATE_DIR).is_dir():
        raise FileNotFoundError(f"no ResNet checkpoint state at {ckpt_dir / STATE_DIR}")

    try:
        graphdef, abstract_state = _abstract_resnet(config["depth"], config["num_classes"], config["width"],
                                                    config["small_input"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{ckpt_dir / CONFIG_FILE} holds an invalid ResNet config: {e}") from e
    try:
        restored = ocp.StandardCheckpointer().restore(ckpt_dir / STATE_DIR)
    except Exception as e:
        raise ValueError(f"could not restore the Orbax checkpoint in {ckpt_dir / STATE_DIR}: {e}") from e
    given = {tuple(path): v for path, v in _flatten(restored).items()}
    expected = {tuple(str(p) for p in path): (path, leaf)
                for path, leaf in _flatten(nnx.to_pure_dict(abstract_state)).items()}
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unexpected:
        fmt = lambda ps: ["/".join(p) for p in ps]  # noqa: E731
        raise ValueError(f"checkpoint {ckpt_dir} does not match ResNet config {config}: "
                         f"missing {fmt(missing)}, unexpected {fmt(unexpected)}")
    values = {}
    for skey, (path, leaf) in expected.items():
        value = np.asarray(given[skey])
        if value.shape != tuple(leaf.shape):
            raise ValueError(f"checkpoint parameter {'/'.join(skey)} has shape {value.shape}, "
                             f"the model expects {tuple(leaf.shape)}")
        values[path] = value.astype(leaf.dtype)
    return _merge(graphdef, abstract_state, values)
