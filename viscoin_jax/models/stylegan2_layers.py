"""StyleGAN2 building blocks (StyleGAN2-ADA semantics, NHWC): equalised-lr layers and activations.

Equalised learning rate: every weight is stored as N(0, 1) / lr_multiplier and scaled at run time
by lr_multiplier / sqrt(fan_in) (biases by lr_multiplier), so Adam sees parameters of unit scale
whatever the layer's fan-in. The stored values are therefore the same numbers as in the reference
(PyTorch) networks, only laid out for NHWC:

- `FullyConnected.weight` is [in, out] (torch: [out, in]).
- convolution weights are [kh, kw, Cin, Cout] (torch: [Cout, Cin, kh, kw]), applied by correlation
  (as `lax.conv` and `torch.nn.functional.conv2d`).

Non-trainable state that the reference keeps as registered buffers lives in `Buffer` variables
(noise inputs) or in `nnx.BatchStat` (the tracked average latent `w_avg`), so `nnx.Param` holds
exactly the trainable parameters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from viscoin_jax.kernels import modulated_conv2d, setup_filter

# activation name -> (function, default gain). Leaky ReLU uses slope 0.2 like the reference.
LRELU_ALPHA = 0.2
ACTIVATIONS = {
    "linear": (lambda x: x, 1.0),
    "relu": (jax.nn.relu, math.sqrt(2.0)),
    "lrelu": (lambda x: jnp.where(x >= 0, x, x * LRELU_ALPHA), math.sqrt(2.0)),
}
DEFAULT_RESAMPLE_FILTER = (1, 3, 3, 1)


class Buffer(nnx.Variable):
    """Fixed, non-trainable state saved in checkpoints (the reference's registered buffers)."""


def _check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return activation


def bias_act(x, b=None, activation="linear", gain=None, clamp=None):
    """act(x + b) * gain, then clip to [-clamp, clamp]; b broadcasts over the last (channel) axis.

    gain defaults to the activation's own gain (sqrt(2) for (l)relu, 1 for linear), as in the
    reference's `bias_act`; clamp=None (or negative) means no clipping.
    """
    fn, default_gain = ACTIVATIONS[_check_activation(activation)]
    if b is not None:
        x = x + b.astype(x.dtype)
    x = fn(x)
    gain = default_gain if gain is None else gain
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = jnp.clip(x, -clamp, clamp)
    return x


def normalize_2nd_moment(x, axis=1, eps=1e-8):
    """Scale x so that mean(x^2) along `axis` is 1 (the mapping network's input normalisation)."""
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=axis, keepdims=True) + eps)


class FullyConnected(nnx.Module):
    """Equalised-lr dense layer: act(x @ (W * lr / sqrt(in)) + b * lr)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 activation: str = "linear", lr_multiplier: float = 1.0, bias_init: float = 0.0,
                 rngs: nnx.Rngs):
        if in_features < 1 or out_features < 1:
            raise ValueError(f"FullyConnected needs positive sizes, got {in_features} -> {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.activation = _check_activation(activation)
        weight = jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32)
        self.weight = nnx.Param(weight / lr_multiplier)
        self.bias = nnx.Param(jnp.full((out_features,), bias_init, jnp.float32)) if bias else None
        self.weight_gain = float(lr_multiplier / np.sqrt(in_features))
        self.bias_gain = float(lr_multiplier)

    def __call__(self, x):
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FullyConnected expects {self.in_features} input features, got shape {x.shape}")
        y = jnp.matmul(x.astype(jnp.float32), self.weight[...] * self.weight_gain)
        b = None if self.bias is None else self.bias[...] * self.bias_gain
        return bias_act(y, b, self.activation)


class Conv2dLayer(nnx.Module):
    """Equalised-lr convolution (correlation), optional FIR-blur + stride-2 down-sampling.

    The discriminator's layers. Runs through `kernels.modulated_conv2d` with unit styles and no
    demodulation, so it uses the Pallas kernels on GPU/TPU (differentiable to second order for R1).
    Down-sampling follows the reference's conv2d_resample: blur with the resample filter, then a
    stride-2 convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, bias: bool = True,
                 activation: str = "linear", down: int = 1,
                 resample_filter=DEFAULT_RESAMPLE_FILTER, conv_clamp: float | None = None,
                 impl: str = "auto", rngs: nnx.Rngs):
        if down not in (1, 2):
            raise ValueError(f"down must be 1 or 2, got {down}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.activation = _check_activation(activation)
        self.down = down
        self.resample_filter = tuple(float(v) for v in resample_filter)
        self.conv_clamp = conv_clamp
        self.impl = impl
        self.padding = kernel_size // 2
        self.weight_gain = float(1.0 / np.sqrt(in_channels * kernel_size ** 2))
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.weight = nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32)) if bias else None

    def __call__(self, x, gain: float = 1.0):
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"Conv2dLayer expects [N, H, W, {self.in_channels}], got shape {x.shape}")
        w = (self.weight[...] * self.weight_gain).astype(x.dtype)  # float32 master weights, cast here
        ones = jnp.ones((x.shape[0], self.in_channels), jnp.float32)
        f = setup_filter(self.resample_filter) if self.down > 1 else None
        y = modulated_conv2d(x, w, ones, demodulate=False, down=self.down,
                             padding=self.padding, resample_filter=f, impl=self.impl)
        b = None if self.bias is None else self.bias[...]
        act_gain = ACTIVATIONS[self.activation][1] * gain
        clamp = None if self.conv_clamp is None else self.conv_clamp * gain
        return bias_act(y, b, self.activation, gain=act_gain, clamp=clamp)


def batch_shards(n: int) -> int:
    """How many devices the batch of `n` rows is split over while tracing: the size of the mesh
    set with `jax.set_mesh` (the training loop's batches are split over all its axes) when it
    divides `n`, else 1."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes or n % mesh.size:
        return 1
    return int(mesh.size)


def minibatch_std(x, group_size: int | None = 4, num_channels: int = 1, num_shards: int | None = None):
    """Append the reference's minibatch-standard-deviation feature maps (NHWC).

    The batch is cut into `num_shards` equal consecutive parts (default `batch_shards`: one per
    device of the mesh set while tracing), as the reference runs one per GPU on that GPU's batch.
    Within each part of n rows: groups of G = min(group_size, n) samples taken with stride n / G
    (sample i of the part belongs to group i mod (n / G)), the channels in `num_channels` slices;
    each appended channel is the std over the group, averaged over its channel slice and all
    pixels. The groups therefore never span devices (no communication) and depend on the device
    count but not on how devices are spread over processes; one device is the reference on one GPU.
    """
    n, h, w, c = x.shape
    shards = batch_shards(n) if num_shards is None else int(num_shards)
    if shards < 1 or n % shards:
        raise ValueError(f"minibatch_std: batch size {n} does not split into {shards} device parts")
    local = n // shards
    g = local if group_size is None else min(group_size, local)
    if local % g:
        raise ValueError(f"minibatch_std: batch size {local} (per device) is not divisible by the "
                         f"group size {g}")
    if num_channels < 1 or c % num_channels:
        raise ValueError(f"minibatch_std: {c} channels cannot be split into {num_channels} groups")
    y = x.astype(jnp.float32).reshape(shards, g, local // g, h, w, num_channels, c // num_channels)
    y = y - jnp.mean(y, axis=1, keepdims=True)
    y = jnp.sqrt(jnp.mean(jnp.square(y), axis=1) + 1e-8)  # [shards, n/G, H, W, F, c]
    y = jnp.mean(y, axis=(2, 3, 5))  # [shards, n/G, F]
    # sample i of a part gets the statistics of group i mod (n / G)
    y = jnp.broadcast_to(y[:, None], (shards, g, local // g, num_channels)).reshape(n, num_channels)
    y = jnp.broadcast_to(y[:, None, None, :], (n, h, w, num_channels))
    return jnp.concatenate([x, y.astype(x.dtype)], axis=-1)
