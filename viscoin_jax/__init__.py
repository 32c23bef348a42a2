"""viscoin-jax: explaining image classifiers with generative models, in JAX/Flax.

Subpackages: `kernels` (Pallas ops), `models`, `data`, `training`, `explain`, `metrics`, `convert`.
"""

__version__ = "0.1.0"
