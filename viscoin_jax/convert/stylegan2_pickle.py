"""Official StyleGAN2-ADA network pickles -> our Generator / Discriminator and Orbax checkpoints.

`nvlabs_pickle.load_stylegan2_pickle` reads the pickle without running it. `convert_stylegan2(pkl,
out_dir)` then builds our `Generator` / `Discriminator` from the pickle's constructor kwargs, maps the
reference weights onto them (layouts in `viscoin_jax.models.stylegan2`: transposed to [kh, kw, Cin,
Cout], up-sampling kernels flipped, `const` and the epilogue fc permuted to NHWC) and writes Orbax
checkpoints plus `config.json`. `load_converted_generator(dir)` restores the generator. The command
line is `viscoin-jax convert stylegan2 PKL OUT_DIR` (convert/cli.py).

Flax, Orbax and the models (which import Flax) are imported inside the functions that convert or
load: importing this module loads neither (tests/test_lean_install.py).
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from viscoin_jax.kernels import setup_filter

# the reader's names stay importable from here (the converter's callers know this module)
from .nvlabs_pickle import NETWORK_KEYS, PickledModule, describe as _describe, load_stylegan2_pickle

CHECKPOINT_FORMAT = "viscoin_jax.stylegan2/1"


# --------------------------------------------------------------------------------------------------
# Constructor kwargs -> our models

_G_POSITIONAL = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs",
                 "synthesis_kwargs")
_D_POSITIONAL = ("c_dim", "img_resolution", "img_channels", "architecture", "channel_base",
                 "channel_max", "num_fp16_res", "conv_clamp", "cmap_dim", "block_kwargs",
                 "mapping_kwargs", "epilogue_kwargs")
# Reference options that only affect speed / mixed precision / training, not the function computed.
_IGNORED = {"num_fp16_res", "fp16_channels_last", "channels_last", "fused_modconv_default",
            "freeze_layers", "use_fp16"}


def _malformed_as_value_error(fn):
    """Whatever a malformed network in a pickle makes `fn` raise becomes a one-line ValueError."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            if isinstance(exc, ValueError) and "\n" not in str(exc).strip():
                raise
            kind = "" if isinstance(exc, ValueError) else f"{type(exc).__name__}: "
            raise ValueError(f"malformed network in the pickle ({kind}{detail})") from None
    return wrapper


def _kwargs_of(net: PickledModule, positional: tuple[str, ...]) -> dict:
    kwargs = dict(zip(positional, net.init_args))
    kwargs.update(net.init_kwargs)
    return kwargs


def _take(kwargs: dict, what: str, allowed: dict[str, Any], checks: dict[str, Any]) -> dict:
    """Translate reference kwargs by `allowed` (ref name -> our name), verify `checks`, refuse the rest."""
    out = {}
    for key, value in kwargs.items():
        if key in allowed:
            if value is not None:
                out[allowed[key]] = value
        elif key in checks:
            expected = checks[key]
            ok = expected(value) if callable(expected) else value == expected
            if not ok:
                raise ValueError(f"{what}: unsupported {_describe(key)}={_describe(value)}")
        elif key not in _IGNORED:
            raise ValueError(f"{what}: unsupported option {_describe(key)}={_describe(value)}")
    return out


def _same_filter(value) -> bool:
    from viscoin_jax.models.stylegan2_layers import DEFAULT_RESAMPLE_FILTER

    return value is None or list(value) == list(DEFAULT_RESAMPLE_FILTER)


@_malformed_as_value_error
def generator_kwargs(net: PickledModule) -> dict[str, Any]:
    """Our `Generator` kwargs from a pickled reference Generator's constructor arguments."""
    if net.class_name != "Generator":
        raise ValueError(f"expected a Generator, got class {_describe(net.class_name)}")
    kw = _kwargs_of(net, _G_POSITIONAL)
    mapping = dict(kw.pop("mapping_kwargs", None) or {})
    synthesis = dict(kw.pop("synthesis_kwargs", None) or {})
    top = {k: kw.pop(k) for k in list(kw) if k in _G_POSITIONAL}
    synthesis.update(kw)  # StyleGAN3's copy of the networks passes synthesis kwargs flat
    out = _take(top, "Generator", {k: k for k in top}, {})
    w_dim = out.get("w_dim")
    out.update(_take(mapping, "Generator mapping",
                     {"num_layers": "mapping_layers", "lr_multiplier": "mapping_lr_multiplier",
                      "w_avg_beta": "w_avg_beta"},
                     {"activation": "lrelu", "embed_features": lambda v: v in (None, w_dim),
                      "layer_features": lambda v: v in (None, w_dim)}))
    out.update(_take(synthesis, "Generator synthesis",
                     {"channel_base": "channel_base", "channel_max": "channel_max",
                      "conv_clamp": "conv_clamp", "use_noise": "use_noise"},
                     {"architecture": "skip", "resample_filter": _same_filter, "activation": "lrelu",
                      "kernel_size": 3}))
    return out


@_malformed_as_value_error
def discriminator_kwargs(net: PickledModule) -> dict[str, Any]:
    """Our `Discriminator` kwargs from a pickled reference Discriminator's constructor arguments."""
    if net.class_name != "Discriminator":
        raise ValueError(f"expected a Discriminator, got class {_describe(net.class_name)}")
    kw = _kwargs_of(net, _D_POSITIONAL)
    block = dict(kw.pop("block_kwargs", None) or {})
    mapping = dict(kw.pop("mapping_kwargs", None) or {})
    epilogue = dict(kw.pop("epilogue_kwargs", None) or {})
    names = ("c_dim", "img_resolution", "img_channels", "channel_base", "channel_max", "conv_clamp",
             "cmap_dim")
    out = _take(kw, "Discriminator", {k: k for k in names}, {"architecture": "resnet"})
    _take(block, "Discriminator block", {}, {"activation": "lrelu", "resample_filter": _same_filter,
                                             "architecture": "resnet"})
    out.update(_take(mapping, "Discriminator mapping", {"num_layers": "mapping_layers"},
                     {"lr_multiplier": 0.01, "activation": "lrelu", "w_avg_beta": lambda v: True,
                      "embed_features": lambda v: v in (None, out.get("cmap_dim")),
                      "layer_features": lambda v: v in (None, out.get("cmap_dim"))}))
    epi = _take(epilogue, "Discriminator epilogue",
                {"mbstd_group_size": "mbstd_group_size", "mbstd_num_channels": "mbstd_num_channels"},
                {"activation": "lrelu", "architecture": "resnet"})
    if "mbstd_group_size" in epilogue and epilogue["mbstd_group_size"] is None:
        epi["mbstd_group_size"] = None
    out.update(epi)
    return out


# --------------------------------------------------------------------------------------------------
# Reference state -> our state


def _convert_leaf(path: tuple, value: np.ndarray, modules: dict) -> np.ndarray:
    from viscoin_jax.models.stylegan2 import (DiscriminatorEpilogue, SynthesisBlock,
                                              SynthesisLayer)
    from viscoin_jax.models.stylegan2_layers import FullyConnected

    owner = modules[path[:-1]]
    leaf = path[-1]
    if leaf == "weight" and isinstance(owner, FullyConnected):
        parent = modules.get(path[:-2])
        if isinstance(parent, DiscriminatorEpilogue) and path[-2] == "fc":
            # torch flattens [C, H, W]; we flatten [H, W, C].
            r, c = parent.resolution, parent.in_channels
            if value.shape != (c, c * r * r):
                raise ValueError(f"{'.'.join(map(str, path))}: expected shape {(c, c * r * r)}, got {value.shape}")
            return value.reshape(c, c, r, r).transpose(2, 3, 1, 0).reshape(r * r * c, c)
        return value.T
    if leaf == "weight" and value.ndim == 4:  # [Cout, Cin, kh, kw] -> [kh, kw, Cin, Cout]
        value = value.transpose(2, 3, 1, 0)
        if isinstance(owner, SynthesisLayer) and owner.up > 1:
            value = value[::-1, ::-1]  # the reference convolves (flip_weight=False) when up-sampling
        return value
    if leaf == "const" and isinstance(owner, SynthesisBlock):
        return value.transpose(1, 2, 0)
    return value


def reference_to_state(model, state_dict: dict[str, np.ndarray]) -> dict:
    """Our model's pure-dict state from a reference state dict (official names); strict.

    Every variable of `model` (parameters, noise buffers, w_avg) must be present with the right
    shape, and every reference entry must be used (the FIR `resample_filter` buffers are only
    checked against our filter).
    """
    from flax import nnx

    modules = {tuple(p): m for p, m in nnx.iter_modules(model)}
    flat = {}
    used = set()
    for path, var in nnx.to_flat_state(nnx.state(model)):
        key = ".".join(str(p) for p in path)
        if key not in state_dict:
            raise ValueError(f"the pickle has no '{key}' (needed by {type(model).__name__})")
        value = np.asarray(state_dict[key])
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"'{key}' has dtype {value.dtype}, expected floating point")
        value = _convert_leaf(tuple(path), value.astype(np.float32), modules)
        if value.shape != tuple(var.shape):
            raise ValueError(f"'{key}': converted shape {value.shape} does not match the model's "
                             f"{tuple(var.shape)} (wrong config?)")
        flat[tuple(path)] = np.array(value, dtype=np.float32, order="C")  # keeps 0-d shapes
        used.add(key)
    expected_filter = None
    for key, value in state_dict.items():
        if key in used:
            continue
        if key.split(".")[-1] == "resample_filter":
            if expected_filter is None:
                from viscoin_jax.models.stylegan2_layers import DEFAULT_RESAMPLE_FILTER
                expected_filter = setup_filter(DEFAULT_RESAMPLE_FILTER)
            if value.shape != expected_filter.shape or not np.allclose(value, expected_filter, atol=1e-6):
                raise ValueError(f"'{key}' is not the [1, 3, 3, 1] filter this model uses")
            continue
        raise ValueError(f"the pickle has '{key}', which {type(model).__name__} does not use "
                         "(different architecture?)")
    out: dict = {}
    for path, value in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return out


def _from_reference(cls, kwargs: dict, state_dict: dict, impl: str):
    """`cls(**kwargs)` built abstractly (no initialisers run), then filled from `state_dict`."""
    from flax import nnx

    try:
        abstract = nnx.eval_shape(lambda: cls(**kwargs, impl=impl, rngs=nnx.Rngs(0)))
    except Exception as exc:  # the kwargs come from the file: any failure is the file's
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ValueError(f"the pickle's {cls.__name__} arguments do not build a model "
                         f"({type(exc).__name__}: {detail})") from None
    pure = reference_to_state(abstract, state_dict)
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    return nnx.merge(graphdef, state)


@_malformed_as_value_error
def generator_from_pickle(net: PickledModule, impl: str = "auto"):
    """Our `Generator` holding the weights of a pickled reference Generator (G or G_ema)."""
    from viscoin_jax.models.stylegan2 import Generator

    return _from_reference(Generator, generator_kwargs(net), net.state_dict(), impl)


@_malformed_as_value_error
def discriminator_from_pickle(net: PickledModule, impl: str = "auto"):
    """Our `Discriminator` holding the weights of a pickled reference Discriminator."""
    from viscoin_jax.models.stylegan2 import Discriminator

    return _from_reference(Discriminator, discriminator_kwargs(net), net.state_dict(), impl)


# --------------------------------------------------------------------------------------------------
# Orbax checkpoints


def convert_stylegan2(pkl_path, out_dir, networks=("G_ema", "D"), overwrite: bool = False) -> Path:
    """Convert the `networks` of an official pickle into Orbax checkpoints under `out_dir`.

    Layout: out_dir/config.json ({"format", "source", "networks": {name: {"class", "config"}}})
    and one Orbax StandardCheckpointer directory per network (out_dir/G_ema, out_dir/D, ...)
    holding `nnx.state(model)` as a pure dict. Returns out_dir.
    """
    import orbax.checkpoint as ocp
    from flax import nnx

    out_dir = Path(out_dir).absolute()
    data = load_stylegan2_pickle(pkl_path)
    unknown = [n for n in networks if n not in NETWORK_KEYS]
    if unknown:
        raise ValueError(f"unknown network names {unknown}; choose from {NETWORK_KEYS}")
    missing = [n for n in networks if not isinstance(data.get(n), PickledModule)]
    if missing:
        raise ValueError(f"{pkl_path}: the pickle has no {missing}")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ValueError(f"{out_dir} exists and is not empty (pass overwrite=True / --force)")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"format": CHECKPOINT_FORMAT, "source": str(Path(pkl_path).name), "networks": {}}
    checkpointer = ocp.StandardCheckpointer()
    for name in networks:
        net = data[name]
        model = (generator_from_pickle(net) if net.class_name == "Generator"
                 else discriminator_from_pickle(net))
        checkpointer.save(out_dir / name, nnx.to_pure_dict(nnx.state(model)))
        checkpointer.wait_until_finished()
        config["networks"][name] = {"class": net.class_name, "config": model.config()}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def _load_converted(ckpt_dir, network: str, expected_class: str, impl: str):
    import orbax.checkpoint as ocp
    from flax import nnx

    from viscoin_jax.models.stylegan2 import Discriminator, Generator

    ckpt_dir = Path(ckpt_dir).absolute()
    config_path = ckpt_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {ckpt_dir} (not a converted StyleGAN2 checkpoint)")
    config = json.loads(config_path.read_text())
    if config.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{config_path}: unknown format {config.get('format')!r}")
    entry = config.get("networks", {}).get(network)
    if entry is None:
        raise ValueError(f"{ckpt_dir} holds {sorted(config.get('networks', {}))}, not {network!r}")
    if entry["class"] != expected_class:
        raise ValueError(f"{network!r} in {ckpt_dir} is a {entry['class']}, not a {expected_class}")
    cls = Generator if expected_class == "Generator" else Discriminator
    kwargs = dict(entry["config"])
    kwargs.pop("impl", None)
    kwargs["resample_filter"] = tuple(kwargs.get("resample_filter", (1, 3, 3, 1)))
    abstract = nnx.eval_shape(lambda: cls(**kwargs, impl=impl, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    restored = ocp.StandardCheckpointer().restore(ckpt_dir / network, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def load_converted_generator(ckpt_dir, network: str = "G_ema", impl: str = "auto"):
    """The `Generator` stored by `convert_stylegan2` (default: the EMA generator)."""
    return _load_converted(ckpt_dir, network, "Generator", impl)


def load_converted_discriminator(ckpt_dir, network: str = "D", impl: str = "auto"):
    """The `Discriminator` stored by `convert_stylegan2`."""
    return _load_converted(ckpt_dir, network, "Discriminator", impl)
