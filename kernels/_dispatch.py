"""Choosing between the Pallas kernels and the XLA reference, per platform.

A program is normally compiled for the platform it runs on, so by default the choice is made while
tracing, from `jax.default_backend()`: only that platform's branch is traced (tracing every
kernel variant for every platform made a StyleGAN2 step 18x slower to trace on CPU).

Ahead-of-time compilation for another platform (a CPU host lowering for `cuda` or `tpu`: the AOT
check, the lowering tests) names its target with `lowering_for("tpu")`, or `lowering_for("any")`
to keep every branch: then `jax.lax.platform_dependent` holds them all and lowering keeps the one
that matches the platform being compiled for.

`impl="auto"` runs a kernel only where it was measured to beat XLA (`tuning`): the public ops resolve
it to "pallas" or "xla" per call shape with `resolve_auto`, from the tuning table of the device kind
being traced for; no table, no kernel.

Under a device mesh (`jax.set_mesh(mesh)` while tracing, as the training loop does), a Pallas call
cannot be partitioned by XLA's SPMD partitioner (Mosaic refuses; a Triton call would be replicated).
The kernel branches are therefore wrapped in `jax.shard_map` over the batch dimension: each device
runs the kernel on its slice of the batch, and per-batch-element inputs (x, styles) are split while
shared ones (filters, weights) are replicated; shard_map's transpose sums the shared inputs'
gradients over the mesh. A batch the mesh does not divide runs replicated (every device computes the
whole batch; correct, not fast). The XLA reference branch is left to the partitioner.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable, Iterator, Sequence

import jax
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from ._args import check_impl
from .tuning import table_winner, tuning_device_kind

# Backends of the kernel wrappers: "gpu" compiles through Triton, "tpu" through Mosaic,
# "interpret" runs the GPU variant of the kernels in the Pallas interpreter (any platform), and
# "tpu_interpret" runs the TPU variant (VMEM/SMEM windows, sequential grid axes) in Pallas's TPU
# interpreter, so the TPU code path is tested on CPU too. "mosaic_gpu" compiles the Mosaic GPU variant
# (NVIDIA Hopper and newer; upfirdn2d, and the modulated conv's forward and x-gradient) and "mosaic_gpu_interpret" runs it in jax's GPU
# interpreter (jax >= 0.11).
KERNEL_BACKENDS = ("gpu", "tpu", "interpret", "tpu_interpret", "mosaic_gpu", "mosaic_gpu_interpret")
MOSAIC_GPU_IMPLS = ("mosaic_gpu", "mosaic_gpu_interpret")


# The platforms being traced for: None = the host's default backend; ("any",) = every platform.
_TARGET: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "viscoin_jax_kernel_lowering_target", default=None)
_PLATFORM_FAMILY = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


@contextlib.contextmanager
def lowering_for(*platforms: str, device_kind: str | None = None) -> Iterator[None]:
    """Trace the kernels' dispatch for `platforms` ("cpu", "cuda", "rocm", "tpu") instead of the host's
    backend, or for every platform with "any" (`platform_dependent`). Use around `.trace()` /
    `.lower()` when compiling for a platform that is not the host's. `device_kind` (e.g. "NVIDIA
    H200", a topology's `device_kind`) names the tuning table `impl="auto"` consults; without it
    "auto" is the XLA path for a platform that is not the host's. Clears JAX's caches on entry
    and exit (jit's trace cache does not key on this setting)."""
    if not platforms:
        raise ValueError("lowering_for needs at least one platform")
    for p in platforms:
        if p != "any" and p not in _PLATFORM_FAMILY:
            raise ValueError(f"lowering_for: unknown platform {p!r}; use one of "
                             f"{sorted(_PLATFORM_FAMILY)} or 'any'")
    # jit's trace cache does not know this setting: a function traced for the host must not be
    # reused for another platform, nor the other way round, so the caches are cleared on both sides.
    jax.clear_caches()
    token = _TARGET.set(tuple(platforms))
    try:
        with tuning_device_kind(device_kind), _abstract_gpu_for(platforms, device_kind):
            yield
    finally:
        _TARGET.reset(token)
        jax.clear_caches()


# The GPU a CPU host lowers Triton kernels for when none is named (compute capability 9.0).
DEFAULT_ABSTRACT_GPU = ("NVIDIA H100", 132)


@contextlib.contextmanager
def _abstract_gpu_for(platforms: Sequence[str], device_kind: str | None) -> Iterator[None]:
    """Newer JAX (0.12) lowers a Triton kernel only for a GPU it can see or an abstract one in the
    current abstract mesh ("No supported GPU devices found, please specify an abstract GPU device").
    A host without a GPU lowering for "cuda"/"rocm"/"any" therefore names one: `device_kind` when it
    is a GPU kind, else an H100; the mesh axes stay those of the current mesh. Lower inside
    `lowering_for` for the abstract device to apply."""
    wants_gpu = any(_PLATFORM_FAMILY.get(p) == "gpu" or p == "any" for p in platforms)
    current = jax.sharding.get_abstract_mesh()
    has_gpu = jax.default_backend() == "gpu" or getattr(getattr(current, "abstract_device", None),
                                                        "platform", None) in ("gpu", "cuda", "rocm")
    if not wants_gpu or has_gpu or not hasattr(jax.sharding, "AbstractDevice"):
        yield
        return
    kind, cores = DEFAULT_ABSTRACT_GPU
    if device_kind and device_kind.startswith(("NVIDIA", "AMD", "gfx")):
        kind, cores = device_kind, None
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=cores, platform="gpu")
    token = _ABSTRACT_GPU.set(device)
    try:
        with jax.sharding.use_abstract_mesh(_with_device(current, device)):
            yield
    finally:
        _ABSTRACT_GPU.reset(token)


# The abstract GPU `lowering_for` names on a host without one: shard_over_batch gives it to the
# per-device region too (a caller that sets its concrete mesh again while tracing would hide it).
_ABSTRACT_GPU: contextvars.ContextVar = contextvars.ContextVar("viscoin_jax_abstract_gpu", default=None)


def _with_device(mesh, device):
    """The abstract mesh `mesh` (its axes and types) on `device`."""
    return jax.sharding.AbstractMesh(mesh.axis_sizes, mesh.axis_names, axis_types=mesh.axis_types,
                                     abstract_device=device)


def target_family() -> str | None:
    """'cpu', 'gpu' or 'tpu' when the dispatch is traced for one platform family, None for several."""
    target = _TARGET.get()
    if target is None:
        return _PLATFORM_FAMILY.get(jax.default_backend(), "cpu")
    families = {_PLATFORM_FAMILY.get(p) for p in target}
    return None if "any" in target or len(families) != 1 else families.pop()


def jit_per_shape(fn: Callable | None = None, **jit_kwargs) -> Callable:
    """`fn` jitted with `jit_kwargs` (its static arguments) when traced for one platform family, so
    that a call repeated with the same shapes and static arguments (a layer shape used three times
    per training step, forward and backward sharing kernels) is traced and lowered once per
    program. Traced for several platforms (`lowering_for("any")`) it is called as is: a nested jit
    is lowered for every platform, including the branches `platform_dependent` would drop."""
    if fn is None:
        return functools.partial(jit_per_shape, **jit_kwargs)
    jitted = jax.jit(fn, **jit_kwargs)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return (fn if target_family() is None else jitted)(*args, **kwargs)
    return wrapper


TPU_LANES = 128  # Mosaic's lane width: channel windows of the TPU kernels are whole multiples of it


def uses_tpu_layout(backend: str) -> bool:
    """Whether the wrapper builds the Mosaic (TPU) variant of a kernel."""
    return backend in ("tpu", "tpu_interpret")


def uses_mosaic_gpu(backend: str) -> bool:
    """Whether the wrapper builds the Mosaic GPU variant of a kernel."""
    return backend in MOSAIC_GPU_IMPLS


def interpret_mode(backend: str):
    """The `interpret` argument of pallas_call for a kernel backend."""
    if backend == "tpu_interpret":
        return pltpu.InterpretParams()
    return backend == "interpret"


def shard_over_batch(kernel_fn: Callable, batched: Sequence[bool]) -> Callable:
    """`kernel_fn` wrapped in shard_map over the batch (dim 0) of the args flagged in `batched`, when a
    mesh is set while tracing; `kernel_fn` itself otherwise. Outputs are batch-first."""

    def wrapped(*args):
        mesh = jax.sharding.get_abstract_mesh()
        # Already per device (inside a shard_map, e.g. a kernel calling another kernel's public op):
        # splitting again would cut the local batch a second time.
        if mesh.empty or mesh.size == 1 or mesh.manual_axes:
            return kernel_fn(*args)
        axes = tuple(mesh.axis_names)
        batch = args[batched.index(True)].shape[0]
        split = batch % math.prod(mesh.axis_sizes) == 0
        spec = P(axes) if split else P()
        in_specs = tuple(spec if b else P() for b in batched)
        if (device := _ABSTRACT_GPU.get()) is not None and getattr(mesh, "abstract_device", None) != device:
            mesh = _with_device(mesh, device)
            with jax.sharding.use_abstract_mesh(mesh):
                return jax.shard_map(kernel_fn, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)(*args)
        return jax.shard_map(kernel_fn, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)(*args)

    return wrapped


def resolve_auto(impl: str, tuning_key: str) -> str:
    """`impl`, with "auto" made concrete for the platform being traced for: "pallas" where the device
    kind's tuning table says the kernel beats XLA on `tuning_key`'s shape, "xla" everywhere else (the
    CPU, shapes or device kinds never measured, several platforms at once). The public ops resolve
    once, so a custom_vjp's backward pass runs the path its forward pass took."""
    check_impl(impl)
    if impl != "auto":
        return impl
    family = target_family()
    if family not in ("gpu", "tpu"):
        return "xla"
    winner = table_winner(family, tuning_key)
    if winner == "mosaic_gpu" and (family != "gpu" or "rocm" in (_TARGET.get() or ())):
        return "xla"  # a Mosaic GPU winner is for NVIDIA GPUs only
    return winner


def dispatch(impl: str, xla_fn: Callable, kernel_fn: Callable, *args, batched: Sequence[bool] | None = None):
    """Run `xla_fn(*args)` or `kernel_fn(*args, backend=...)` according to `impl`.

    - "xla": the reference.
    - "interpret": the kernel (GPU variant) in interpret mode, for CPU tests.
    - "tpu_interpret": the TPU variant in Pallas's TPU interpreter, for CPU tests of the TPU path.
    - "pallas": the kernel compiled for the platform being lowered for; on a platform without a
      Pallas compiler (CPU) it runs in interpret mode, which is correct but slow.
    - "mosaic_gpu": the Mosaic GPU variant, for NVIDIA Hopper and newer (traced for cuda; on CPU it
      runs in jax's GPU interpreter where jax has one, and elsewhere is refused with a message).
      Traced for several platforms, the XLA reference serves every platform but cuda.
    - "mosaic_gpu_interpret": the Mosaic GPU variant in jax's GPU interpreter (jax >= 0.11), for CPU tests.
    "auto" is resolved by the public op first (`resolve_auto`, from its call's tuning key).

    The platform is the host's backend unless `lowering_for(...)` names another (module docstring).

    `batched` flags the args whose dim 0 is the batch (default: the first only); under a mesh the
    kernel runs per device on its batch slice (see the module docstring).
    """
    check_impl(impl)
    if impl == "auto":
        raise ValueError('dispatch takes a concrete impl: resolve impl="auto" with resolve_auto first')
    if impl == "xla":
        return xla_fn(*args)
    batched = tuple(batched) if batched is not None else (True,) + (False,) * (len(args) - 1)

    def kernel(backend):
        return shard_over_batch(functools.partial(kernel_fn, backend=backend), batched)

    if impl in ("interpret", "tpu_interpret", "mosaic_gpu_interpret"):
        return kernel(impl)(*args)
    family = target_family()
    if impl == "mosaic_gpu":
        if family == "gpu" and "rocm" not in (_TARGET.get() or ()):
            return kernel("mosaic_gpu")(*args)
        if family == "cpu":
            return kernel("mosaic_gpu_interpret")(*args)
        if family is None:
            return jax.lax.platform_dependent(*args, cuda=kernel("mosaic_gpu"), default=xla_fn)
        raise ValueError(f'impl="mosaic_gpu" targets NVIDIA GPUs (Hopper and newer), not {family} '
                         f"({_TARGET.get() or jax.default_backend()}); use impl=\"pallas\" or \"auto\"")
    default = kernel("interpret")  # "pallas" on a platform without a Pallas compiler
    if family == "cpu":
        return default(*args)
    if family in ("gpu", "tpu"):
        return kernel(family)(*args)
    gpu = kernel("gpu")
    return jax.lax.platform_dependent(*args, cuda=gpu, rocm=gpu, tpu=kernel("tpu"), default=default)
