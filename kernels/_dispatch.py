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

from ._args import check_impl

# Backends of the kernel wrappers: "gpu" compiles through Triton, "tpu" through Mosaic, and
# "interpret" runs the GPU variant of the same kernel body in the Pallas interpreter (any platform).
KERNEL_BACKENDS = ("gpu", "tpu", "interpret")


def dispatch(impl: str, xla_fn: Callable, kernel_fn: Callable, *args):
    """Run `xla_fn(*args)` or `kernel_fn(*args, backend=...)` according to `impl`.

    - "xla": the reference.
    - "interpret": the kernel in interpret mode (CPU tests).
    - "pallas": the kernel compiled for the platform being lowered for; on a platform without a
      Pallas compiler (CPU) it runs in interpret mode, which is correct but slow.
    - "auto": the kernel on GPU and TPU, the reference elsewhere.
    """
    check_impl(impl)
    if impl == "xla":
        return xla_fn(*args)
    if impl == "interpret":
        return kernel_fn(*args, backend="interpret")
    gpu = functools.partial(kernel_fn, backend="gpu")
    tpu = functools.partial(kernel_fn, backend="tpu")
    default = xla_fn if impl == "auto" else functools.partial(kernel_fn, backend="interpret")
    return jax.lax.platform_dependent(*args, cuda=gpu, rocm=gpu, tpu=tpu, default=default)
