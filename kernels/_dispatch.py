"""Choosing between the Pallas kernels and the XLA reference, per platform, at lowering time.

`jax.lax.platform_dependent` keeps every branch in the traced program and lowers the one that matches
the platform being compiled for. That is what lets `impl="pallas"` be traced on a CPU host and
lowered for `cuda` or `tpu` (ahead-of-time compilation, CI lowering checks) without any branch
being picked by the host's own backend.

Under a device mesh (`jax.set_mesh(mesh)` while tracing, as the training loop does), a Pallas call
cannot be partitioned by XLA's SPMD partitioner (Mosaic refuses; a Triton call would be replicated).
The kernel branches are therefore wrapped in `jax.shard_map` over the batch dimension: each device
runs the kernel on its slice of the batch, and per-batch-element inputs (x, styles) are split while
shared ones (filters, weights) are replicated; shard_map's transpose sums the shared inputs'
gradients over the mesh. A batch the mesh does not divide runs replicated (every device computes the
whole batch; correct, not fast). The XLA reference branch is left to the partitioner.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from ._args import check_impl

# Backends of the kernel wrappers: "gpu" compiles through Triton, "tpu" through Mosaic,
# "interpret" runs the GPU variant of the kernels in the Pallas interpreter (any platform), and
# "tpu_interpret" runs the TPU variant (VMEM/SMEM windows, sequential grid axes) in Pallas's TPU
# interpreter, so the TPU code path is tested on CPU too.
KERNEL_BACKENDS = ("gpu", "tpu", "interpret", "tpu_interpret")


TPU_LANES = 128  # Mosaic's lane width: channel windows of the TPU kernels are whole multiples of it


def uses_tpu_layout(backend: str) -> bool:
    """Whether the wrapper builds the Mosaic (TPU) variant of a kernel."""
    return backend in ("tpu", "tpu_interpret")


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
        return jax.shard_map(kernel_fn, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)(*args)

    return wrapped


def dispatch(impl: str, xla_fn: Callable, kernel_fn: Callable, *args, batched: Sequence[bool] | None = None):
    """Run `xla_fn(*args)` or `kernel_fn(*args, backend=...)` according to `impl`.

    - "xla": the reference.
    - "interpret": the kernel (GPU variant) in interpret mode, for CPU tests.
    - "tpu_interpret": the TPU variant in Pallas's TPU interpreter, for CPU tests of the TPU path.
    - "pallas": the kernel compiled for the platform being lowered for; on a platform without a
      Pallas compiler (CPU) it runs in interpret mode, which is correct but slow.
    - "auto": the kernel on GPU and TPU, the reference elsewhere.

    `batched` flags the args whose dim 0 is the batch (default: the first only); under a mesh the
    kernel runs per device on its batch slice (see the module docstring).
    """
    check_impl(impl)
    if impl == "xla":
        return xla_fn(*args)
    batched = tuple(batched) if batched is not None else (True,) + (False,) * (len(args) - 1)

    def kernel(backend):
        return shard_over_batch(functools.partial(kernel_fn, backend=backend), batched)

    if impl in ("interpret", "tpu_interpret"):
        return kernel(impl)(*args)
    default = xla_fn if impl == "auto" else kernel("interpret")
    return jax.lax.platform_dependent(*args, cuda=kernel("gpu"), rocm=kernel("gpu"), tpu=kernel("tpu"),
                                      default=default)
