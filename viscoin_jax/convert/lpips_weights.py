"""Import LPIPS-VGG weights: torchvision's VGG16 trunk plus the LPIPS linear layers.

Two PyTorch files are needed (neither ships with this project):

- the ImageNet VGG16 of torchvision, `vgg16-397923af.pth` (keys `features.{i}.weight/bias`; a
  state dict of the `features` Sequential alone, keys `{i}.weight`, also works);
- the LPIPS v0.1 calibration `vgg.pth` of the `lpips` package (`lpips/weights/v0.1/vgg.pth`,
  keys `lin{k}.model.1.weight`, each [1, C, 1, 1], k = 0..4).

Converted parameters: {"vgg": {"conv1_1": {"kernel": [3, 3, in, out], "bias": [out]}, ...},
"lin0": [64], ..., "lin4": [512]}, saved as `.npz` or an Orbax directory (see `save_params`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from viscoin_jax.convert.inception_weights import (Params, check_output_path, load_params, read_torch_state_dict,
                                                   save_params)
from viscoin_jax.models.vgg import TAP_CHANNELS, TORCHVISION_INDEX, VGG16_CONVS

NUM_LIN = len(TAP_CHANNELS)


def vgg16_params_from_torch(state_dict: Mapping[str, np.ndarray]) -> Params:
    """torchvision vgg16 (or its `features`) state dict -> {"conv1_1": {"kernel", "bias"}, ...}."""
    prefix = "features." if any(k.startswith("features.") for k in state_dict) else ""
    out: Params = {}
    for name, cin, cout in VGG16_CONVS:
        wkey = f"{prefix}{TORCHVISION_INDEX[name]}.weight"
        bkey = f"{prefix}{TORCHVISION_INDEX[name]}.bias"
        if wkey not in state_dict or bkey not in state_dict:
            raise ValueError(f"not a torchvision VGG16 state dict: missing {wkey} / {bkey}")
        w = np.asarray(state_dict[wkey], np.float32)
        b = np.asarray(state_dict[bkey], np.float32)
        if w.shape != (cout, cin, 3, 3) or b.shape != (cout,):
            raise ValueError(f"{wkey} / {bkey} have shapes {w.shape} / {b.shape}; VGG16 {name} expects "
                             f"{(cout, cin, 3, 3)} / {(cout,)}")
        out[name] = {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0)), "bias": b}
    return out


def lpips_lin_params_from_torch(state_dict: Mapping[str, np.ndarray]) -> Params:
    """LPIPS `vgg.pth` state dict -> {"lin0": [64], ..., "lin4": [512]}."""
    out: Params = {}
    for k, channels in enumerate(TAP_CHANNELS):
        # "model.1" when the layer was built with dropout (the default), "model.0" without.
        key = next((f"lin{k}.model.{i}.weight" for i in (1, 0) if f"lin{k}.model.{i}.weight" in state_dict), None)
        if key is None:
            raise ValueError(f"not an LPIPS-VGG linear-layer state dict: missing lin{k}.model.1.weight")
        w = np.asarray(state_dict[key], np.float32)
        if w.shape != (1, channels, 1, 1):
            raise ValueError(f"{key} has shape {w.shape}; LPIPS-VGG expects {(1, channels, 1, 1)}")
        out[f"lin{k}"] = w.reshape(channels)
    return out


def lpips_params_from_torch(vgg_state_dict: Mapping[str, np.ndarray],
                            lin_state_dict: Mapping[str, np.ndarray]) -> Params:
    return {"vgg": vgg16_params_from_torch(vgg_state_dict), **lpips_lin_params_from_torch(lin_state_dict)}


def load_lpips_params(weights: str | os.PathLike | Sequence[str | os.PathLike]) -> Params:
    """Parameters from a converted `.npz` / Orbax directory, or from the pair (vgg16.pth, vgg.pth)."""
    if isinstance(weights, (str, os.PathLike)):
        return load_params(weights)
    weights = list(weights)
    if len(weights) != 2:
        raise ValueError("LPIPS weights must be one converted file/directory or the pair "
                         f"(torchvision vgg16 .pth, lpips vgg.pth); got {len(weights)} paths")
    return lpips_params_from_torch(read_torch_state_dict(weights[0]), read_torch_state_dict(weights[1]))


def convert_lpips_vgg(vgg16_pth: str | os.PathLike, lin_pth: str | os.PathLike, out_dir: str | os.PathLike,
                      *, overwrite: bool = False) -> Path:
    """Convert (torchvision `vgg16-397923af.pth`, lpips `vgg.pth`) into one file usable without torch.

    `out_dir` becomes an Orbax checkpoint directory, or a numpy archive if it ends in `.npz`.
    """
    check_output_path(out_dir, overwrite)
    params = lpips_params_from_torch(read_torch_state_dict(vgg16_pth), read_torch_state_dict(lin_pth))
    return save_params(params, out_dir, overwrite=overwrite)
