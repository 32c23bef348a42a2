"""Pallas kernels for the hot StyleGAN2 ops, with plain-JAX (XLA) references beside them.

Installed as `viscoin_jax.kernels`. Every op takes `impl` in {"auto", "pallas", "interpret", "xla"}:
"auto" runs the Pallas kernel on GPU (Triton) and TPU (Mosaic) and the XLA reference elsewhere.
"""

from ._args import setup_filter
from ._dispatch import lowering_for
from .modulated_conv2d import (
    ConvBlockSizes,
    conv2d_resample_reference,
    demodulation_coefficients,
    modulated_conv2d,
    modulated_conv2d_grouped_reference,
    modulated_conv2d_reference,
)
from .upfirdn2d import downsample2d, filter2d, upfirdn2d, upfirdn2d_reference, upsample2d

__all__ = [
    "setup_filter",
    "lowering_for",
    "upfirdn2d",
    "upfirdn2d_reference",
    "upsample2d",
    "downsample2d",
    "filter2d",
    "modulated_conv2d",
    "ConvBlockSizes",
    "modulated_conv2d_reference",
    "modulated_conv2d_grouped_reference",
    "conv2d_resample_reference",
    "demodulation_coefficients",
]
