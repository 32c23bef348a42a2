"""The device mesh and the sharding rules of the training state and of batches.

The mesh has two axes: `data` (pure data parallelism: parameters replicated) and `fsdp` (fully
sharded data parallelism: every large array of the train state is split along one dimension over
this axis and gathered by XLA when used). Batches are split along their leading dimension over both
axes, so every device sees a different slice of the global batch.

The rule works on shapes only, so it applies equally to parameters, optimiser states (optax states
mirror parameter shapes, hence get the same sharding as their parameter) and anything else in the
state: no per-model annotations are needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the leading batch dimension is split over both axes


def _get(mesh_config: Any, name: str, default: Any = None) -> Any:
    if isinstance(mesh_config, Mapping):
        return mesh_config.get(name, default)
    return getattr(mesh_config, name, default)


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int]:
    """Resolves the (data, fsdp) sizes; one of them may be -1: "all the remaining devices"."""
    sizes = [_get(mesh_config, axis, 1) for axis in MESH_AXES]
    for axis, size in zip(MESH_AXES, sizes):
        is_int = isinstance(size, (int, np.integer)) and not isinstance(size, bool)
        if not is_int or size == 0 or size < -1:
            raise ValueError(f"mesh.{axis} must be a positive int or -1, got {size!r}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={sizes[0]}, fsdp={sizes[1]}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if num_devices % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not "
                             f"divisible by {known}")
        sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} = {math.prod(sizes)} devices, "
                         f"but {num_devices} are available; the product must equal the device "
                         "count (set one axis to -1 to use the rest)")
    return int(sizes[0]), int(sizes[1])


def make_mesh(mesh_config: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over `devices` (default: all devices of all processes).

    `mesh_config` is the `config.mesh` section (or any mapping) with `data` and `fsdp` sizes.
    `create_device_mesh` orders the devices so that each axis follows the physical interconnect
    (TPU torus, GPU NVLink within a host) where it can.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        # Subsets of a TPU slice or odd shapes have no topology-aware layout: plain order then.
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


# ----------------------------------------------------------------------------------------------
# Sharding rules


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = 2**14) -> P:
    """The partition spec of one array under FSDP.

    An array with at least `min_size` elements is split over the `fsdp` axis along its largest
    dimension that `fsdp_size` divides (the earliest such dimension on ties); smaller arrays, and
    arrays with no divisible dimension, stay replicated.
    """
    shape = tuple(int(d) for d in shape)
    if fsdp_size <= 1 or math.prod(shape) < min_size:
        return P()
    candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
    if not candidates:
        return P()
    best = max(candidates, key=lambda i: (shape[i], -i))
    return P(*([None] * best + ["fsdp"]))


def fsdp_sharding(tree: Any, mesh: Mesh, min_size: int = 2**14) -> Any:
    """NamedShardings for every leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s) by `fsdp_spec`.

    On a mesh whose fsdp axis has size 1 everything is replicated (data parallelism).
    """
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp_size, min_size)),
                        tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading dimension split over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def num_batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def local_batch_size(global_batch_size: int, mesh: Mesh | None = None) -> int:
    """The per-process share of a global batch; checks that the batch splits evenly."""
    shards = num_batch_shards(mesh) if mesh is not None else jax.device_count()
    if global_batch_size % shards:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{shards} batch shards of the mesh (data x fsdp)")
    if global_batch_size % jax.process_count():
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")
    return global_batch_size // jax.process_count()


def make_global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Assembles each process's part of the batch into global arrays sharded by `batch_sharding`.

    Every process passes its own rows (the same number on each); the global batch is their
    concatenation in process order.
    """
    sharding = batch_sharding(mesh)
    shards = num_batch_shards(mesh)

    def one(path, x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError(f"batch entry {jax.tree_util.keystr(path)} is a scalar; batch arrays "
                             "need a leading batch dimension")
        global_rows = x.shape[0] * jax.process_count()
        if global_rows % shards:
            raise ValueError(f"batch entry {jax.tree_util.keystr(path)}: global batch of "
                             f"{global_rows} rows does not split over {shards} devices")
        return jax.make_array_from_process_local_data(sharding, x, (global_rows, *x.shape[1:]))

    return jax.tree_util.tree_map_with_path(one, local_batch)


def abstract_with_sharding(tree: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct`s carrying the given shardings (targets for restore / AOT lowering)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        tree, shardings)


__all__ = [
    "MESH_AXES", "BATCH_AXES", "mesh_shape", "make_mesh", "fsdp_spec", "fsdp_sharding",
    "replicated", "batch_sharding", "num_batch_shards", "local_batch_size", "make_global_batch",
    "abstract_with_sharding",
]
