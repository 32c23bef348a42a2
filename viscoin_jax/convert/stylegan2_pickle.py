"""Import official StyleGAN2-ADA network pickles (`network-snapshot-*.pkl`) without running them.

The official pickles hold `torch_utils.persistence` objects: each network is stored as a call to
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` carries the Python source
of the network module, the class name and the instance's `__dict__` (parameters, buffers, sub-modules
and the constructor's arguments). Loading them with `pickle` or `torch.load` would execute that
source. This module instead reads them with a restricted unpickler:

- only the globals such files need are resolved (tensor and storage rebuilders, `OrderedDict`,
  `set`, numpy scalars/arrays/dtypes, `dnnlib.util.EasyDict`, the persistence reconstructor), and
  each resolves to an inert stand-in defined here; any other global (`os.system`, `builtins.eval`,
  a torch module class, ...) raises `RefusedPickleError` naming it, before anything is called;
- the embedded source code is dropped unread: `_reconstruct_persistent_obj` returns a
  `PickledModule` holding the class name, constructor kwargs and state;
- tensors become numpy arrays: each storage is a nested legacy `torch.save` stream that is parsed
  here (magic number, pickled header, storage records, raw little-endian data) with the same
  restricted (pure-Python) unpickler, so torch is not needed;
- hostile files fail with a `ValueError` before they cost memory: numpy dtypes, scalars and arrays
  are rebuilt by stand-ins that accept only plain numeric dtypes and raw data of exactly the
  declared size (an object dtype with its flags cleared would turn bytes into pointers), a tensor
  may not hold more elements than its storage (stride 0 with a huge size), the file is read from
  memory (a length field cannot make a read allocate), and error messages describe untrusted
  values by type and shape instead of printing them.

`convert_stylegan2(pkl, out_dir)` then builds our `Generator` / `Discriminator` from the pickle's
constructor kwargs, maps the reference weights onto them (layouts in `viscoin_jax.models.stylegan2`:
transposed to [kh, kw, Cin, Cout], up-sampling kernels flipped, `const` and the epilogue fc
permuted to NHWC) and writes Orbax checkpoints plus `config.json`. `load_converted_generator(dir)`
restores the generator.

Command line (wired into `viscoin-jax convert stylegan2 PKL OUT_DIR` through `add_convert_parser`,
or `python -m viscoin_jax.convert.stylegan2_pickle PKL OUT_DIR`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import io
import json
import pickle
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # installed with jax
import numpy as np

from viscoin_jax.kernels import setup_filter

# `viscoin-jax convert` builds its parser from this module (`add_convert_parser`), so Flax, Orbax and
# the models (which import Flax) are imported inside the functions that convert or load, not here:
# parsing the command line loads no Flax or Orbax (tests/test_lean_install.py).

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # legacy torch.save header
LEGACY_PROTOCOL_VERSION = 1001
CHECKPOINT_FORMAT = "viscoin_jax.stylegan2/1"
NETWORK_KEYS = ("G", "D", "G_ema")


class RefusedPickleError(pickle.UnpicklingError, ValueError):
    """The pickle references a global that an official StyleGAN2-ADA pickle does not use."""


# --------------------------------------------------------------------------------------------------
# Inert stand-ins for what the pickles reference


class EasyDict(dict):
    """Stand-in for `dnnlib.util.EasyDict` (a dict with attribute access)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclasses.dataclass
class PickledModule:
    """One `torch_utils.persistence` object: class name, constructor arguments and raw state.

    `state` is the module's `__dict__` as pickled (`_parameters`, `_buffers`, `_modules`, plain
    attributes); `state_dict()` flattens it to the reference's dotted names -> numpy arrays.
    """

    class_name: str
    init_args: tuple
    init_kwargs: dict
    state: dict

    def state_dict(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        _collect_state(self, "", out)
        return out


def _collect_state(module: PickledModule, prefix: str, out: dict) -> None:
    state = module.state
    non_persistent = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(value, np.ndarray):
                raise ValueError(f"{prefix}{name}: expected a tensor, got {type(value).__name__}")
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, PickledModule):
            raise ValueError(f"{prefix}{name}: sub-module is a {type(child).__name__}, "
                             "not a persistent network object")
        _collect_state(child, f"{prefix}{name}.", out)


def _reconstruct_persistent_obj(meta):
    """Stand-in for `torch_utils.persistence._reconstruct_persistent_obj`: never runs meta's source."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or "class_name" not in meta:
        raise ValueError("malformed persistent object (expected meta with type='class' and class_name)")
    if not isinstance(meta["class_name"], str):
        raise ValueError(f"persistent object with class name {_describe(meta['class_name'])}")
    state = meta.get("state") or {}
    if not isinstance(state, dict):
        raise ValueError(f"persistent object {_describe(meta['class_name'])} has a non-dict state")
    return PickledModule(class_name=str(meta["class_name"]),
                         init_args=tuple(state.get("_init_args") or ()),
                         init_kwargs=dict(state.get("_init_kwargs") or {}),
                         state=state)


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stand-in for a `torch.*Storage` class: only its element dtype matters."""

    name: str
    dtype: Any


def _describe(value: Any, limit: int = 60) -> str:
    """A short description of an untrusted value for error messages: never its full repr."""
    if isinstance(value, (bool, int, float, type(None))):
        text = repr(value)
    elif isinstance(value, (str, bytes)):
        text = repr(value[:limit])
    elif isinstance(value, np.ndarray):
        return f"array(shape={value.shape}, dtype={value.dtype.str})"
    else:
        return type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."


_PLAIN_KINDS = "biufc"  # bool, signed / unsigned integers, floats, complex
_MAX_NDIM = 16


def _plain_dtype(value: Any) -> np.dtype:
    """`value` as a plain numeric numpy dtype, or a ValueError (objects, records, sub-arrays...)."""
    if isinstance(value, _DtypeStandIn):
        return value.dtype
    if isinstance(value, np.dtype) and value.kind in _PLAIN_KINDS and value.fields is None \
            and value.subdtype is None and not value.hasobject:
        return value
    raise ValueError(f"refusing numpy dtype {_describe(value)}: only plain numeric dtypes are "
                     "allowed")


class _DtypeStandIn:
    """What `numpy.dtype(name, align, copy)` builds while unpickling: a plain numeric dtype.

    Its pickled state may only set the byte order; any other state (fields, sub-arrays, object
    flags) is refused, so no dtype can make numpy read raw bytes as object pointers.
    """

    def __init__(self, name: Any = None, align: Any = False, copy: Any = False):
        del align, copy
        if not isinstance(name, str) or not 1 <= len(name) <= 4:
            raise ValueError(f"refusing numpy dtype {_describe(name)}")
        try:
            dtype = np.dtype(name)
        except TypeError:
            raise ValueError(f"refusing numpy dtype {_describe(name)}") from None
        if dtype.kind not in _PLAIN_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise ValueError(f"refusing numpy dtype {name!r} (kind {dtype.kind!r}): only plain "
                             "numeric dtypes are allowed")
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        ok = (isinstance(state, tuple) and len(state) == 8 and state[0] in (3, 4)
              and state[1] in ("<", ">", "|", "=") and state[2:5] == (None, None, None)
              and state[5:8] == (-1, -1, 0))
        if not ok:
            raise ValueError(f"refusing numpy dtype state for {self.dtype.str} (only the byte "
                             "order of a plain numeric dtype may be set)")
        if state[1] in "<>" and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder(state[1])


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > _MAX_NDIM or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value):
        raise ValueError(f"bad array shape {_describe(value)}")
    return tuple(value)


def _scalar(dtype: Any, data: Any = None):
    """Stand-in for `numpy.core.multiarray.scalar`: a plain numeric scalar from its raw bytes."""
    dtype = _plain_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise ValueError(f"bad numpy scalar data for {dtype.str} ({_describe(data)})")
    return np.frombuffer(data, dtype)[0]


class _NdarrayMarker:
    """Stand-in for `numpy.ndarray` as an argument of `_reconstruct`; it cannot be called."""


class _ArrayStandIn:
    """Stand-in for `numpy.core.multiarray._reconstruct(ndarray, shape, typecode)`.

    Its state (version, shape, dtype, is_fortran, raw bytes) becomes `self.array` only for a plain
    numeric dtype and raw data of exactly shape x itemsize bytes; the loader swaps it for the array.
    """

    def __init__(self, subtype: Any = None, shape: Any = None, typecode: Any = None):
        if subtype is not _NdarrayMarker:
            raise ValueError(f"refusing numpy _reconstruct of {_describe(subtype)}")
        self.array = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise ValueError("bad numpy array state")
        shape, dtype, fortran, raw = state[-4:]
        shape, dtype = _shape(shape), _plain_dtype(dtype)
        count = int(np.prod(shape, dtype=object)) if shape else 1
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != count * dtype.itemsize:
            raise ValueError(f"numpy array of shape {shape} and dtype {dtype.str} needs "
                             f"{count * dtype.itemsize} bytes of data, got {_describe(raw)} "
                             f"({len(raw) if isinstance(raw, (bytes, bytearray)) else '?'} bytes)")
        self.array = np.frombuffer(bytes(raw), dtype).reshape(
            shape, order="F" if fortran is True else "C").copy()


def _materialise(value: Any, depth: int = 0) -> Any:
    """Replaces the `_ArrayStandIn`s left by unpickling with their arrays (in place for dicts)."""
    if depth > 200:
        raise ValueError("the pickle nests deeper than any network pickle")
    if isinstance(value, _ArrayStandIn):
        if value.array is None:
            raise ValueError("a numpy array in the pickle has no data")
        return value.array
    if isinstance(value, dict):
        for key in list(value):
            value[key] = _materialise(value[key], depth + 1)
        return value
    if isinstance(value, list):
        value[:] = [_materialise(v, depth + 1) for v in value]
        return value
    if isinstance(value, tuple):
        return tuple(_materialise(v, depth + 1) for v in value)
    if isinstance(value, PickledModule):
        value.init_args = _materialise(value.init_args, depth + 1)
        _materialise(value.init_kwargs, depth + 1)
        _materialise(value.state, depth + 1)
    return value


def _storage_types() -> dict[str, _StorageType]:
    dtypes = {
        "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
        "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
        "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
        "BoolStorage": np.bool_,
    }
    return {name: _StorageType(name, np.dtype(dt)) for name, dt in dtypes.items()}


def _as_strided(storage, storage_offset, size, stride):
    """A copy of storage viewed with (offset, size, stride), with the bounds checked."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise ValueError(f"tensor storage must be a decoded storage, got {type(storage).__name__}")
    size, stride = _shape(size), _shape(stride)
    if not isinstance(storage_offset, int):
        raise ValueError(f"bad tensor storage offset {_describe(storage_offset)}")
    offset = int(storage_offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise ValueError(f"bad tensor geometry: offset {offset}, size {size}, stride {stride}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    count = int(np.prod(size, dtype=object))
    if count > storage.size:  # e.g. stride 0 and a huge size: refused before anything is allocated
        raise ValueError(f"tensor of size {size} ({count} elements) is larger than its storage "
                         f"({storage.size} elements)")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise ValueError(f"tensor (offset {offset}, size {size}, stride {stride}) reads past its "
                         f"storage of {storage.size} elements")
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=[s * storage.itemsize for s in stride],
                                           writeable=False)
    return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _as_strided(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    del requires_grad, backward_hooks, metadata
    return _as_strided(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _load_from_bytes(data: bytes) -> np.ndarray:
    """Stand-in for `torch.storage._load_from_bytes`: parse one legacy torch.save'd storage."""
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError("storage payload must be bytes")
    f = io.BytesIO(data)
    if _RestrictedUnpickler(f).load() != MAGIC_NUMBER:
        raise ValueError("storage payload is not a legacy torch.save stream (bad magic number)")
    if _RestrictedUnpickler(f).load() != LEGACY_PROTOCOL_VERSION:
        raise ValueError("unsupported legacy torch.save protocol version")
    sys_info = _RestrictedUnpickler(f).load()
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise ValueError("only little-endian torch storages are supported")
    records: list[tuple] = []
    root = _RestrictedUnpickler(f, records=records).load()
    keys = _RestrictedUnpickler(f).load()
    if not isinstance(keys, list):
        raise ValueError("corrupt storage payload (storage key list)")
    kinds = {}
    for record in records:
        _, storage_type, key, _, _, _ = record
        kinds[key] = storage_type
    arrays = {}
    for key in keys:
        if key not in kinds:
            raise ValueError(f"corrupt storage payload (unknown storage key {_describe(key)})")
        header = f.read(8)
        if len(header) != 8:
            raise ValueError("corrupt storage payload (truncated header)")
        (numel,) = struct.unpack("<q", header)
        dtype = kinds[key].dtype
        if numel < 0:
            raise ValueError("corrupt storage payload (negative size)")
        raw = f.read(numel * dtype.itemsize)
        if len(raw) != numel * dtype.itemsize:
            raise ValueError("corrupt storage payload (truncated data)")
        arrays[key] = np.frombuffer(raw, dtype).copy()
    if not isinstance(root, _StorageRef):
        raise ValueError("storage payload does not hold a storage")
    base = arrays.get(root.key)
    if base is None:
        raise ValueError("corrupt storage payload (missing data)")
    if root.view is not None:
        _, offset, size = root.view
        return base[int(offset):int(offset) + int(size)]
    return base


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    key: str
    view: tuple | None


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("torch.storage", "_load_from_bytes"): _load_from_bytes,
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
        ("dnnlib.util", "EasyDict"): EasyDict,
        ("dnnlib", "EasyDict"): EasyDict,
        ("numpy", "dtype"): _DtypeStandIn,
        ("numpy", "ndarray"): _NdarrayMarker,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "scalar")] = _scalar
        allowed[(mod, "_reconstruct")] = _ArrayStandIn
    for name, kind in _storage_types().items():
        allowed[("torch", name)] = kind
        allowed[("torch.cuda", name)] = kind
    return allowed


class _RestrictedUnpickler(pickle._Unpickler):
    """Resolves only the allow-listed globals, to inert stand-ins; refuses everything else.

    Built on the pure-Python unpickler: the C one allocates what a length field or a memo index
    asks for before reading (a flipped byte can ask for gigabytes); this one reads at most what
    the file holds and keeps its memo in a dict.
    """

    _allowed: dict | None = None

    def __init__(self, file, records: list | None = None):
        super().__init__(file)
        self._records = records
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _allowed_globals()

    def find_class(self, module, name):
        target = self._allowed.get((module, name))
        if target is None:
            shown = f"{module}.{name}"
            shown = shown if shown.isprintable() and len(shown) <= 120 else _describe(shown)
            raise RefusedPickleError(
                f"refusing to load global '{shown}': it is not used by official "
                "StyleGAN2-ADA pickles (only tensors, numpy values, dicts and "
                "torch_utils.persistence network objects are allowed)")
        return target

    def persistent_load(self, pid):
        # Only the nested legacy storage streams use persistent ids:
        # ('storage', storage_type, key, location, numel, view_metadata).
        if (self._records is None or not isinstance(pid, tuple) or len(pid) != 6
                or pid[0] != "storage" or not isinstance(pid[1], _StorageType)):
            raise RefusedPickleError(f"refusing persistent id {_describe(pid)}")
        self._records.append(pid)
        return _StorageRef(str(pid[2]), tuple(pid[5]) if pid[5] is not None else None)


def load_stylegan2_pickle(path) -> dict[str, Any]:
    """Read an official StyleGAN2-ADA pickle safely.

    Returns the pickle's top-level dict: 'G', 'D', 'G_ema' (and 'augment_pipe' when present) as
    `PickledModule`s (`.class_name`, `.init_kwargs`, `.state_dict()` -> {reference name: np.ndarray}),
    plus plain entries such as 'training_set_kwargs'.

    Raises FileNotFoundError for a missing file, RefusedPickleError (a ValueError) when the pickle
    references anything outside the allow-list, ValueError when it is corrupt or holds no network.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such StyleGAN2 pickle: {path}")
    # From memory: a length field in the file can then never make a read allocate more than the file.
    buffer = io.BytesIO(path.read_bytes())
    try:
        data = _materialise(_RestrictedUnpickler(buffer).load())
    except RefusedPickleError as exc:
        raise RefusedPickleError(f"{path}: {exc}") from None
    except Exception as exc:  # whatever a damaged file raises: one line naming the file
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ValueError(f"{path}: not a readable StyleGAN2-ADA pickle ({type(exc).__name__}: "
                         f"{detail})") from None
    if not isinstance(data, dict) or not any(isinstance(data.get(k), PickledModule) for k in NETWORK_KEYS):
        raise ValueError(f"{path}: expected a dict with 'G', 'D' or 'G_ema' networks "
                         f"(a StyleGAN2-ADA network pickle), got {_describe(data)}")
    return data


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


# --------------------------------------------------------------------------------------------------
# Command line


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("pkl", help="official StyleGAN2-ADA network pickle (network-snapshot-*.pkl)")
    parser.add_argument("out_dir", help="directory for the Orbax checkpoints and config.json")
    parser.add_argument("--networks", default="G_ema,D",
                        help="comma-separated networks to convert, from G, G_ema, D (default: G_ema,D)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty out_dir")
    parser.set_defaults(func=run)
    return parser


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Register `stylegan2` on the `viscoin-jax convert` sub-command's subparsers."""
    return _configure(subparsers.add_parser(
        "stylegan2", help="convert an official StyleGAN2-ADA pickle to Orbax checkpoints",
        description=__doc__.splitlines()[0]))


def run(args: argparse.Namespace) -> int:
    networks = tuple(n.strip() for n in args.networks.split(",") if n.strip())
    out = convert_stylegan2(args.pkl, args.out_dir, networks=networks, overwrite=args.force)
    print(f"wrote {', '.join(networks)} to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _configure(argparse.ArgumentParser(prog="viscoin-jax convert stylegan2",
                                                description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
