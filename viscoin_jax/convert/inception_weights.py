"""Import the FID Inception weights (pytorch-fid `pt_inception-2015-12-05-6726825d.pth`).

The file is a PyTorch state dict of torchvision's Inception3 layout (1008-class head, no aux
logits). Each conv + batch-norm (eps 1e-3) pair is folded in float64 into one conv with a bias:

    kernel = W * s,  bias = beta - running_mean * s,  s = gamma / sqrt(running_var + 1e-3)

and stored under the lower-cased module name (`Mixed_5b.branch1x1` -> `mixed_5b/branch1x1/conv`).
The head (`fc`) is not needed for FID and is dropped.

Also holds the small weight-file helpers shared by the LPIPS importer: reading a PyTorch state
dict with `torch.load(weights_only=True)` (torch is only needed for `.pth` files), and saving /
loading converted parameters as `.npz` (flat `a/b/c` keys) or as an Orbax checkpoint directory,
neither of which needs torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from viscoin_jax.models.inception import FIDInceptionV3

BN_EPS = 1e-3
TORCH_SUFFIXES = (".pth", ".pt", ".bin")

Params = dict[str, Any]  # nested dict of numpy arrays, the shape of nnx.State.to_pure_dict()


# ----------------------------------------------------------------------------- generic helpers

def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict (tensors only, no code execution) into float numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such weight file: {path}")
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs torch (pip install 'viscoin-jax[convert]'), "
                          "or convert it once elsewhere and load the .npz / Orbax output") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, a pickled module instead of a state dict, ...
        raise ValueError(f"could not read {path} as a PyTorch state dict: {e}") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    out = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            out[str(key)] = value.detach().cpu().numpy()
    if not out:
        raise ValueError(f"{path} holds no tensors")
    return out


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict -> {"a/b/c": leaf} (leaves are kept as they are)."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, name + "/"))
        else:
            flat[name] = value
    return flat


def unflatten_params(flat: Mapping[str, np.ndarray]) -> Params:
    """{"a/b/c": leaf} -> nested dict."""
    nested: Params = {}
    for name, value in flat.items():
        node = nested
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def check_output_path(out_path: str | os.PathLike, overwrite: bool) -> Path:
    """Absolute output path; FileExistsError if it exists and overwrite is False (checked before any work)."""
    out_path = Path(out_path).absolute()
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists (pass overwrite=True to replace it)")
    return out_path


def save_params(params: Mapping[str, Any], out_path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save converted parameters: `*.npz` -> one numpy archive; any other path -> Orbax directory."""
    out_path = check_output_path(out_path, overwrite)
    flat = {name: np.asarray(value) for name, value in flatten_params(params).items()}
    if out_path.suffix == ".npz":
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "wb") as f:  # a file object stops numpy from appending another .npz
            np.savez(f, **flat)
        return out_path
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out_path, unflatten_params(flat), force=overwrite)
    checkpointer.wait_until_finished()
    return out_path


def load_params(path: str | os.PathLike) -> Params:
    """Load parameters written by `save_params` (a `.npz` file or an Orbax directory)."""
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"no such weight file or directory: {path}")
    if path.is_dir():
        try:
            restored = ocp.StandardCheckpointer().restore(path)
        except Exception as e:
            raise ValueError(f"could not restore an Orbax checkpoint from {path}: {e}") from e
        return unflatten_params(flatten_params(restored))
    if path.suffix != ".npz":
        raise ValueError(f"unknown weight format {path.suffix!r} for {path}: expected .npz, an Orbax "
                         f"directory, or a PyTorch file ({', '.join(TORCH_SUFFIXES)}) where supported")
    try:
        with np.load(path, allow_pickle=False) as data:
            return unflatten_params({k: data[k] for k in data.files})
    except Exception as e:
        raise ValueError(f"could not read {path} as a .npz archive: {e}") from e


def build_with_params(factory: Callable[[], nnx.Module], params: Mapping[str, Any], what: str) -> nnx.Module:
    """`factory()` (which should build zero placeholders, rngs=None) filled with `params`.

    Names and shapes must match the module exactly; values are cast to the module's dtypes and put
    on the default device.
    """
    module = factory()
    graphdef, state = nnx.split(module)
    expected = flatten_params(nnx.to_pure_dict(state))
    given = flatten_params(params)
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing or extra:
        raise ValueError(f"{what} parameters do not match the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    arrays = {}
    for name, leaf in expected.items():
        value = np.asarray(given[name])
        if value.shape != tuple(np.shape(leaf)):
            raise ValueError(f"{what} parameter {name} has shape {value.shape}, the model expects {np.shape(leaf)}")
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{what} parameter {name} has dtype {value.dtype}, expected floating point")
        arrays[name] = jax.device_put(np.ascontiguousarray(value, dtype=leaf.dtype))
    nnx.replace_by_pure_dict(state, unflatten_params(arrays))
    return nnx.merge(graphdef, state)


def param_shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
    """{"a/b/kernel": shape} of a module's state."""
    return {name: tuple(np.shape(leaf)) for name, leaf in flatten_params(nnx.to_pure_dict(nnx.state(module))).items()}


# ----------------------------------------------------------------------------- FID Inception

def _torch_module_name(path: tuple[str, ...]) -> str:
    """("mixed_5b", "branch1x1") -> "Mixed_5b.branch1x1" (torchvision's capitalised top level)."""
    top = path[0]
    top = "Conv2d" + top[len("conv2d"):] if top.startswith("conv2d") else "Mixed" + top[len("mixed"):]
    return ".".join((top,) + tuple(path[1:]))


def fid_inception_params_from_torch(state_dict: Mapping[str, np.ndarray]) -> Params:
    """pytorch-fid Inception state dict -> our parameters (batch-norm folded, NHWC/HWIO layout)."""
    # torchvision's ImageNet Inception-v3 has the same layer names but other weights (and a
    # 1000-class head plus AuxLogits): refuse it, or its FIDs would be labelled standard.
    has_aux = any(k.startswith("AuxLogits.") for k in state_dict)
    classes = np.shape(state_dict["fc.weight"])[0] if "fc.weight" in state_dict else None
    if has_aux or classes not in (None, 1008):
        raise ValueError(f"this is not the FID Inception pt_inception-2015-12-05 (AuxLogits: {has_aux}, "
                         f"{classes} classes instead of 1008); torchvision's ImageNet Inception-v3 would "
                         "give FIDs that are not comparable with published ones")
    out = {}
    # every parameter belongs to a folded conv: ".../conv/kernel" and ".../conv/bias"
    for name, kernel_shape in param_shapes(FIDInceptionV3(rngs=None)).items():
        parts = tuple(name.split("/"))
        if parts[-1] != "kernel":
            continue  # the bias is written together with its kernel
        module = _torch_module_name(parts[:-2])
        keys = {k: f"{module}.{k}"
                for k in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")}
        missing = [v for v in keys.values() if v not in state_dict]
        if missing:
            raise ValueError(f"not a pytorch-fid Inception state dict: missing {missing}")
        w = np.asarray(state_dict[keys["conv.weight"]], np.float64)  # [out, in, kh, kw]
        gamma, beta, mean, var = (np.asarray(state_dict[keys[k]], np.float64).reshape(-1)
                                  for k in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"))
        if w.ndim != 4 or w.transpose(2, 3, 1, 0).shape != kernel_shape:
            raise ValueError(f"{keys['conv.weight']} has shape {w.shape}; expected [out, in, kh, kw] matching "
                             f"kernel {kernel_shape}")
        if not gamma.shape == beta.shape == mean.shape == var.shape == (kernel_shape[-1],):
            raise ValueError(f"batch-norm statistics of {module} do not have {kernel_shape[-1]} channels")
        scale = gamma / np.sqrt(var + BN_EPS)
        prefix = "/".join(parts[:-1])
        out[prefix + "/kernel"] = np.ascontiguousarray((w.transpose(2, 3, 1, 0) * scale), dtype=np.float32)
        out[prefix + "/bias"] = (beta - mean * scale).astype(np.float32)
    return unflatten_params(out)


def load_fid_inception_params(path: str | os.PathLike) -> Params:
    """Parameters from the original `.pth` (needs torch) or a converted `.npz` / Orbax directory."""
    path = Path(path)
    if path.suffix in TORCH_SUFFIXES:
        return fid_inception_params_from_torch(read_torch_state_dict(path))
    return load_params(path)


def load_fid_inception(path: str | os.PathLike, *, precision="highest") -> FIDInceptionV3:
    """FIDInceptionV3 with the weights at `path` (.pth, converted .npz, or converted Orbax dir)."""
    params = load_fid_inception_params(path)
    return build_with_params(lambda: FIDInceptionV3(precision=precision, rngs=None), params,
                             f"FID Inception ({path})")


def convert_fid_inception(pth_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                          overwrite: bool = False) -> Path:
    """Convert pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` for use without torch.

    `out_dir` becomes an Orbax checkpoint directory, or a single numpy archive if it ends in `.npz`.
    Returns the written path. Backs `viscoin-jax convert inception FILE OUT`.
    """
    check_output_path(out_dir, overwrite)
    params = fid_inception_params_from_torch(read_torch_state_dict(pth_path))
    return save_params(params, out_dir, overwrite=overwrite)
