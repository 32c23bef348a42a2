"""Choosing between the Pallas kernels and the XLA reference, per platform, at lowering time.

`jax.lax.platform_dependent` keeps every branch in the traced program and lowers the one that matches
the platform being compiled for. That is what lets `impl="pallas"` be traced on a CPU host and
lowered for `cuda` or `tpu` (ahead-of-time compilation, CI lowering checks) without any branch
being picked by the host's own backend.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
from jax.experimental.pallas import tpu as pltpu

from ._args import check_impl

# Backends of the kernel wrappers: "gpu" compiles through Triton, "tpu" through Mosaic,
# "interpret" runs the GPU variant of the kernels in the Pallas interpreter (any platform), and
# "tpu_interpret" runs the TPU variant (VMEM/SMEM windows, sequential grid axes) in Pallas's TPU
# interpreter, so the TPU code path is tested on CPU too.
KERNEL_BACKENDS = ("gpu", "tpu", "interpret", "tpu_interpret")


def uses_tpu_layout(backend: str) -> bool:
    """Whether the wrapper builds the Mosaic (TPU) variant of a kernel."""
    return backend in ("tpu", "tpu_interpret")


def interpret_mode(backend: str):
    """The `interpret` argument of pallas_call for a kernel backend."""
    if backend == "tpu_interpret":
        return pltpu.InterpretParams()
    return backend == "interpret"


def dispatch(impl: str, xla_fn: Callable, kernel_fn: Callable, *args):
    """Run `xla_fn(*args)` or `kernel_fn(*args, backend=...)` according to `impl`.

    - "xla": the reference.
    - "interpret": the kernel (GPU variant) in interpret mode, for CPU tests.
    - "tpu_interpret": the TPU variant in Pallas's TPU interpreter, for CPU tests of the TPU path.
    - "pallas": the kernel compiled for the platform being lowered for; on a platform without a
      Pallas compiler (CPU) it runs in interpret mode, which is correct but slow.
    - "auto": the kernel on GPU and TPU, the reference elsewhere.
    """
    check_impl(impl)
    if impl == "xla":
        return xla_fn(*args)
    if impl in ("interpret", "tpu_interpret"):
        return kernel_fn(*args, backend=impl)
    gpu = functools.partial(kernel_fn, backend="gpu")
    tpu = functools.partial(kernel_fn, backend="tpu")
    default = xla_fn if impl == "auto" else functools.partial(kernel_fn, backend="interpret")
    return jax.lax.platform_dependent(*args, cuda=gpu, rocm=gpu, tpu=tpu, default=default)
