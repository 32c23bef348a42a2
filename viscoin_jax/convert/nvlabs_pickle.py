"""Read official StyleGAN2-ADA network pickles (`network-snapshot-*.pkl`) without running them.

The official pickles hold `torch_utils.persistence` objects: each network is stored as a call to
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` carries the Python source
of the network module, the class name and the instance's `__dict__` (parameters, buffers, sub-modules
and the constructor's arguments). Loading them with `pickle` or `torch.load` would execute that
source. `load_stylegan2_pickle` instead reads them with a restricted unpickler:

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

`stylegan2_pickle` turns what this returns into our models.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import struct
from pathlib import Path
from typing import Any

import ml_dtypes  # installed with jax
import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # legacy torch.save header
LEGACY_PROTOCOL_VERSION = 1001
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
        raise ValueError(f"persistent object with class name {describe(meta['class_name'])}")
    state = meta.get("state") or {}
    if not isinstance(state, dict):
        raise ValueError(f"persistent object {describe(meta['class_name'])} has a non-dict state")
    return PickledModule(class_name=str(meta["class_name"]),
                         init_args=tuple(state.get("_init_args") or ()),
                         init_kwargs=dict(state.get("_init_kwargs") or {}),
                         state=state)


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stand-in for a `torch.*Storage` class: only its element dtype matters."""

    name: str
    dtype: Any


def describe(value: Any, limit: int = 60) -> str:
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
    raise ValueError(f"refusing numpy dtype {describe(value)}: only plain numeric dtypes are "
                     "allowed")


class _DtypeStandIn:
    """What `numpy.dtype(name, align, copy)` builds while unpickling: a plain numeric dtype.

    Its pickled state may only set the byte order; any other state (fields, sub-arrays, object
    flags) is refused, so no dtype can make numpy read raw bytes as object pointers.
    """

    def __init__(self, name: Any = None, align: Any = False, copy: Any = False):
        del align, copy
        if not isinstance(name, str) or not 1 <= len(name) <= 4:
            raise ValueError(f"refusing numpy dtype {describe(name)}")
        try:
            dtype = np.dtype(name)
        except TypeError:
            raise ValueError(f"refusing numpy dtype {describe(name)}") from None
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
        raise ValueError(f"bad array shape {describe(value)}")
    return tuple(value)


def _scalar(dtype: Any, data: Any = None):
    """Stand-in for `numpy.core.multiarray.scalar`: a plain numeric scalar from its raw bytes."""
    dtype = _plain_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise ValueError(f"bad numpy scalar data for {dtype.str} ({describe(data)})")
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
            raise ValueError(f"refusing numpy _reconstruct of {describe(subtype)}")
        self.array = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise ValueError("bad numpy array state")
        shape, dtype, fortran, raw = state[-4:]
        shape, dtype = _shape(shape), _plain_dtype(dtype)
        count = int(np.prod(shape, dtype=object)) if shape else 1
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != count * dtype.itemsize:
            raise ValueError(f"numpy array of shape {shape} and dtype {dtype.str} needs "
                             f"{count * dtype.itemsize} bytes of data, got {describe(raw)} "
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
        raise ValueError(f"bad tensor storage offset {describe(storage_offset)}")
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
            raise ValueError(f"corrupt storage payload (unknown storage key {describe(key)})")
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
            shown = shown if shown.isprintable() and len(shown) <= 120 else describe(shown)
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
            raise RefusedPickleError(f"refusing persistent id {describe(pid)}")
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
                         f"(a StyleGAN2-ADA network pickle), got {describe(data)}")
    return data
