"""viscoin-jax: explaining image classifiers with generative models, in JAX/Flax.

Subpackages: `kernels` (Pallas ops), `models`, `data`, `training`, `explain`, `metrics`, `convert`.
Importing the package sets one XLA:CPU flag for the XLA path's speed (`kernels.cpu_flags`), unless
XLA has already started or VISCOIN_JAX_XLA_CPU_FLAGS=0.
"""

from .kernels import cpu_flags as _cpu_flags

_cpu_flags.apply()

__version__ = "0.1.0"
