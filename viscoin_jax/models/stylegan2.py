"""StyleGAN2 generator and discriminator (StyleGAN2-ADA semantics), NHWC, in Flax NNX.

Architecture (config "stylegan2"/"paper256" of StyleGAN2-ADA): mapping network z -> w with
equalised lr (multiplier 0.01), a synthesis network from a learned 4x4 constant with modulated
3x3 convolutions, per-layer noise and the "skip" toRGB architecture, and a "resnet" discriminator
with minibatch standard deviation and an optional projection on a mapping of the class label.

Module and parameter names mirror the reference (`mapping.fc0.weight`, `synthesis.b32.conv0.affine.bias`,
`b4.fc.weight`, ...) so an official pickle maps onto `nnx.state(model)` name for name; see
`viscoin_jax.convert.stylegan2_pickle` and the layouts below.

Weight orientation (DESIGN.md section 4). Every convolution weight here is [kh, kw, Cin, Cout] and is
applied by correlation. The reference applies its up-sampling synthesis layers (conv0 of each block)
with flip_weight=False, i.e. as a true convolution, and all other layers by correlation. So an
imported up-sampling kernel is stored spatially flipped (`w_ours = w_torch.transpose(2, 3, 1, 0)[::-1, ::-1]`)
and every other kernel just transposed. Other layout changes: `const` is [4, 4, C]; the discriminator's
`b4.fc` reads the [4, 4, C] map flattened in (h, w, c) order, where the reference flattens (c, h, w).

Non-trainable state: `mapping.w_avg` is an `nnx.BatchStat` (updated when `update_emas=True`),
`*.noise_const` are `Buffer` variables; neither counts as a parameter.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from viscoin_jax.kernels import modulated_conv2d, setup_filter, upsample2d
from viscoin_jax.models.stylegan2_layers import (
    ACTIVATIONS,
    DEFAULT_RESAMPLE_FILTER,
    Buffer,
    Conv2dLayer,
    FullyConnected,
    bias_act,
    minibatch_std,
    normalize_2nd_moment,
)

__all__ = [
    "MappingNetwork",
    "SynthesisLayer",
    "ToRGBLayer",
    "SynthesisBlock",
    "SynthesisNetwork",
    "Generator",
    "DiscriminatorBlock",
    "DiscriminatorEpilogue",
    "Discriminator",
    "mix_styles",
    "style_mixing",
    "count_params",
    "channels_for",
    "Buffer",
]

NOISE_MODES = ("random", "const", "none")


def _log2_resolution(img_resolution: int) -> int:
    if not isinstance(img_resolution, (int, np.integer)) or img_resolution < 4 or (
            img_resolution & (img_resolution - 1)):
        raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution!r}")
    return int(np.log2(img_resolution))


def channels_for(res: int, channel_base: int, channel_max: int) -> int:
    """Feature maps at resolution `res`: min(channel_base // res, channel_max), as the reference."""
    ch = min(channel_base // res, channel_max)
    if ch < 1:
        raise ValueError(f"channel_base={channel_base} gives no channels at resolution {res}")
    return ch


def _as_key(rngs):
    """A PRNG key from None, a key, or an nnx.Rngs (its `noise` stream)."""
    if rngs is None or isinstance(rngs, jax.Array):
        return rngs
    if isinstance(rngs, nnx.Rngs):
        return rngs.noise()
    raise ValueError(f"rngs must be None, a PRNG key or nnx.Rngs, got {type(rngs).__name__}")


def _frozen_config(**kwargs) -> tuple:
    """Constructor kwargs as a hashable tuple (module attributes end up in the static graphdef)."""
    return tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in kwargs.items())


def _thaw_config(items: tuple) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in items}


MIXED_PRECISION = ("auto", "bfloat16", "float16", "float32")


def mixed_dtype(mixed_precision: str):
    """The compute dtype of the reduced-precision blocks: "auto" is bfloat16 on GPU and TPU and float32
    on CPU (where bfloat16 is slow); float16 as asked (it needs loss scaling to train)."""
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    if mixed_precision == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return jnp.dtype(mixed_precision).type


def block_dtype(res: int, img_resolution: int, num_fp16_res: int, mixed_precision: str):
    """A block's compute dtype, as the reference: the `num_fp16_res` highest resolutions (never below
    8 px) run in the reduced dtype, the others in float32. Parameters stay float32 (master weights)
    and are cast where used; toRGB's output, the image skip path and D's epilogue stay float32."""
    if num_fp16_res <= 0:
        return jnp.float32
    fp16_resolution = max(2 ** (_log2_resolution(img_resolution) + 1 - num_fp16_res), 8)
    return mixed_dtype(mixed_precision) if res >= fp16_resolution else jnp.float32


def _is_one(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and value == 1


# --------------------------------------------------------------------------------------------------
# Mapping network


class MappingNetwork(nnx.Module):
    """z (and class label c) -> w, broadcast to [N, num_ws, w_dim]; tracks w_avg for truncation.

    num_ws=None returns [N, w_dim] (the discriminator's label mapping); w_avg_beta=None disables
    the average (and truncation).
    """

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int | None, *,
                 num_layers: int = 8, embed_features: int | None = None,
                 layer_features: int | None = None, activation: str = "lrelu",
                 lr_multiplier: float = 0.01, w_avg_beta: float | None = 0.995, rngs: nnx.Rngs):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if z_dim < 0 or c_dim < 0 or z_dim + c_dim == 0:
            raise ValueError(f"the mapping needs z_dim > 0 or c_dim > 0, got {z_dim}, {c_dim}")
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        if embed_features is None:
            embed_features = w_dim
        if c_dim == 0:
            embed_features = 0
        if layer_features is None:
            layer_features = w_dim
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        self.embed = FullyConnected(c_dim, embed_features, rngs=rngs) if c_dim > 0 else None
        for idx in range(num_layers):
            setattr(self, f"fc{idx}", FullyConnected(features[idx], features[idx + 1],
                                                     activation=activation,
                                                     lr_multiplier=lr_multiplier, rngs=rngs))
        if num_ws is not None and w_avg_beta is not None:
            self.w_avg = nnx.BatchStat(jnp.zeros((w_dim,), jnp.float32))
        else:
            self.w_avg = None

    def __call__(self, z, c=None, truncation_psi=1.0, truncation_cutoff: int | None = None,
                 update_emas: bool = False):
        parts = []
        if self.z_dim > 0:
            if z is None or z.ndim != 2 or z.shape[1] != self.z_dim:
                raise ValueError(f"z must be [N, {self.z_dim}], got shape {getattr(z, 'shape', None)}")
            parts.append(normalize_2nd_moment(z.astype(jnp.float32)))
        if self.c_dim > 0:
            if c is None or c.ndim != 2 or c.shape[1] != self.c_dim:
                raise ValueError(f"c must be [N, {self.c_dim}], got shape {getattr(c, 'shape', None)}")
            parts.append(normalize_2nd_moment(self.embed(c.astype(jnp.float32))))
        x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)

        if update_emas and self.w_avg is not None:
            batch_mean = jax.lax.stop_gradient(jnp.mean(x, axis=0))
            self.w_avg[...] = batch_mean + self.w_avg_beta * (self.w_avg[...] - batch_mean)

        if self.num_ws is not None:
            x = jnp.broadcast_to(x[:, None, :], (x.shape[0], self.num_ws, self.w_dim))
        if not _is_one(truncation_psi):
            if self.w_avg is None:
                raise ValueError("truncation needs a tracked w_avg (num_ws and w_avg_beta set)")
            w_avg = jax.lax.stop_gradient(self.w_avg[...])
            truncated = w_avg + truncation_psi * (x - w_avg)
            if self.num_ws is None or truncation_cutoff is None:
                x = truncated
            else:
                keep = jnp.arange(self.num_ws) < truncation_cutoff
                x = jnp.where(keep[None, :, None], truncated, x)
        return x


# --------------------------------------------------------------------------------------------------
# Synthesis network


class SynthesisLayer(nnx.Module):
    """Modulated 3x3 conv (optionally up-sampling x2), noise, bias, leaky ReLU (gain sqrt 2), clamp."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, *,
                 kernel_size: int = 3, up: int = 1, use_noise: bool = True,
                 activation: str = "lrelu", resample_filter=DEFAULT_RESAMPLE_FILTER,
                 conv_clamp: float | None = None, impl: str = "auto", rngs: nnx.Rngs):
        if up not in (1, 2):
            raise ValueError(f"up must be 1 or 2, got {up}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.resample_filter = tuple(float(v) for v in resample_filter)
        self.conv_clamp = conv_clamp
        self.impl = impl
        self.padding = kernel_size // 2
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0, rngs=rngs)
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.weight = nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32))
        if use_noise:
            self.noise_const = Buffer(jax.random.normal(rngs.params(), (resolution, resolution), jnp.float32))
            self.noise_strength = nnx.Param(jnp.zeros((), jnp.float32))
        else:
            self.noise_const = None
            self.noise_strength = None
        self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32))

    def __call__(self, x, w, noise_mode: str = "random", noise_rng=None, gain: float = 1.0,
                 noise=None):
        """noise_mode 'random' adds `noise` ([N, res, res, 1], e.g. drawn by the synthesis network
        for all layers at once) or, if None, a map drawn from `noise_rng`."""
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if x.shape[1] * self.up != self.resolution or x.shape[-1] != self.in_channels:
            raise ValueError(f"SynthesisLayer expects [N, {self.resolution // self.up}, "
                             f"{self.resolution // self.up}, {self.in_channels}], got shape {x.shape}")
        styles = self.affine(w)
        f = setup_filter(self.resample_filter) if self.up > 1 else None
        x = modulated_conv2d(x, self.weight[...].astype(x.dtype), styles, demodulate=True, up=self.up,
                             padding=self.padding, resample_filter=f, impl=self.impl)
        if self.use_noise and noise_mode == "random":
            shape = (x.shape[0], self.resolution, self.resolution, 1)
            if noise is None:
                if noise_rng is None:
                    raise ValueError("noise_mode='random' needs a PRNG key (noise_rng / rngs)")
                noise = jax.random.normal(noise_rng, shape, jnp.float32)
            elif noise.shape != shape:
                raise ValueError(f"noise must have shape {shape}, got {noise.shape}")
            x = x + (noise * self.noise_strength[...]).astype(x.dtype)
        elif self.use_noise and noise_mode == "const":
            x = x + (self.noise_const[...] * self.noise_strength[...])[None, :, :, None].astype(x.dtype)
        act_gain = ACTIVATIONS[self.activation][1] * gain
        clamp = None if self.conv_clamp is None else self.conv_clamp * gain
        return bias_act(x, self.bias[...], self.activation, gain=act_gain, clamp=clamp)


class ToRGBLayer(nnx.Module):
    """1x1 modulated conv without demodulation (styles scaled by 1/sqrt(fan_in)), bias, clamp."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, *, kernel_size: int = 1,
                 conv_clamp: float | None = None, impl: str = "auto", rngs: nnx.Rngs):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv_clamp = conv_clamp
        self.impl = impl
        self.padding = kernel_size // 2
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0, rngs=rngs)
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.weight = nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32))
        self.weight_gain = float(1.0 / np.sqrt(in_channels * kernel_size ** 2))

    def __call__(self, x, w):
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight[...].astype(x.dtype), styles, demodulate=False,
                             padding=self.padding, impl=self.impl)
        return bias_act(x, self.bias[...], "linear", clamp=self.conv_clamp)


class SynthesisBlock(nnx.Module):
    """One resolution of the skip generator: [const | conv0 (up x2)], conv1, toRGB added to the
    up-sampled image of the previous block."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int,
                 img_channels: int, *, use_noise: bool = True,
                 resample_filter=DEFAULT_RESAMPLE_FILTER, conv_clamp: float | None = None,
                 dtype=jnp.float32, impl: str = "auto", rngs: nnx.Rngs):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.resolution = resolution
        self.resample_filter = tuple(float(v) for v in resample_filter)
        self.dtype = dtype  # compute dtype of the convolutions (block_dtype); parameters stay float32
        self.impl = impl
        layer_kw = dict(use_noise=use_noise, resample_filter=resample_filter,
                        conv_clamp=conv_clamp, impl=impl, rngs=rngs)
        if in_channels == 0:
            self.const = nnx.Param(jax.random.normal(rngs.params(), (resolution, resolution, out_channels),
                                                     jnp.float32))
            self.conv0 = None
        else:
            self.const = None
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2, **layer_kw)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, **layer_kw)
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp, impl=impl,
                                rngs=rngs)
        self.num_conv = 1 if in_channels == 0 else 2
        self.num_torgb = 1

    def __call__(self, x, img, ws, noise_mode="const", noise=None):
        """ws: [N, num_conv + 1, w_dim] (the last one feeds toRGB); noise: one [N, res, res, 1]
        map per conv layer for noise_mode 'random'. Returns (x, img)."""
        if noise is None:
            noise = (None,) * self.num_conv
        if noise_mode == "random" and any(n is None for n in noise):
            raise ValueError("noise_mode='random' needs one noise map per conv layer")
        if self.in_channels == 0:
            x = jnp.broadcast_to(self.const[...][None], (ws.shape[0],) + self.const.shape).astype(self.dtype)
            x = self.conv1(x, ws[:, 0], noise_mode, noise=noise[0])
        else:
            x = self.conv0(x.astype(self.dtype), ws[:, 0], noise_mode, noise=noise[0])
            x = self.conv1(x, ws[:, 1], noise_mode, noise=noise[1])
        if img is not None:
            img = upsample2d(img, setup_filter(self.resample_filter), impl=self.impl)
        y = self.torgb(x, ws[:, self.num_conv]).astype(jnp.float32)
        img = y if img is None else img + y
        return x, img


class SynthesisNetwork(nnx.Module):
    """W+ [N, num_ws, w_dim] -> image [N, R, R, img_channels], blocks b4 ... bR (skip architecture).

    num_ws = 2 * log2(R) - 2: one w per conv layer plus one for the last toRGB; block bR's toRGB
    shares its w with the first conv of the next block, as in the reference.
    """

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, *,
                 channel_base: int = 32768, channel_max: int = 512, num_fp16_res: int = 0,
                 conv_clamp: float | None = None, use_noise: bool = True,
                 resample_filter=DEFAULT_RESAMPLE_FILTER, mixed_precision: str = "auto",
                 impl: str = "auto", rngs: nnx.Rngs):
        log2 = _log2_resolution(img_resolution)
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.block_resolutions = tuple(2 ** i for i in range(2, log2 + 1))
        num_ws = 0
        for res in self.block_resolutions:
            in_channels = channels_for(res // 2, channel_base, channel_max) if res > 4 else 0
            block = SynthesisBlock(in_channels, channels_for(res, channel_base, channel_max), w_dim,
                                   res, img_channels, use_noise=use_noise,
                                   resample_filter=resample_filter, conv_clamp=conv_clamp,
                                   dtype=block_dtype(res, img_resolution, num_fp16_res, mixed_precision),
                                   impl=impl, rngs=rngs)
            setattr(self, f"b{res}", block)
            num_ws += block.num_conv
        self.num_ws = num_ws + 1  # the last block's toRGB

    def __call__(self, ws, noise_mode: str = "const", noise_rng=None):
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must be [N, {self.num_ws}, {self.w_dim}], got shape {ws.shape}")
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if noise_mode == "random" and noise_rng is None:
            raise ValueError("noise_mode='random' needs a PRNG key (noise_rng / rngs)")
        ws = ws.astype(jnp.float32)
        noise = self._draw_noise(ws.shape[0], noise_rng) if noise_mode == "random" else {}
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            cur = ws[:, w_idx:w_idx + block.num_conv + block.num_torgb]
            x, img = block(x, img, cur, noise_mode, noise.get(res))
            w_idx += block.num_conv
        return img

    def _draw_noise(self, n: int, key) -> dict[int, tuple]:
        """Independent N(0, 1) maps [n, res, res, 1] for every conv layer, from one draw.

        One random call for the whole network (rather than one per layer) keeps the compiled
        program small; the maps are slices of it, so they are independent.
        """
        sizes = [(res, getattr(self, f"b{res}").num_conv) for res in self.block_resolutions]
        flat = jax.random.normal(key, (n, sum(r * r * k for r, k in sizes)), jnp.float32)
        out, start = {}, 0
        for res, k in sizes:
            maps = []
            for _ in range(k):
                maps.append(flat[:, start:start + res * res].reshape(n, res, res, 1))
                start += res * res
            out[res] = tuple(maps)
        return out


class Generator(nnx.Module):
    """StyleGAN2 generator: `G(z, c)` -> images [N, R, R, img_channels], roughly in [-1, 1].

    The arguments follow the reference's Generator with its mapping / synthesis keyword dicts
    flattened (`mapping_layers` = mapping_kwargs.num_layers, ...). The `num_fp16_res` highest
    resolutions compute in `mixed_precision`'s dtype (`block_dtype`; "auto": bfloat16 on GPU / TPU,
    float32 on CPU). `impl` selects the kernels' implementation ("auto", "pallas", "interpret", "xla").
    """

    def __init__(self, z_dim: int = 512, c_dim: int = 0, w_dim: int = 512, img_resolution: int = 256,
                 img_channels: int = 3, *, mapping_layers: int = 8,
                 mapping_lr_multiplier: float = 0.01, w_avg_beta: float = 0.995,
                 channel_base: int = 32768, channel_max: int = 512, num_fp16_res: int = 0,
                 conv_clamp: float | None = None, use_noise: bool = True,
                 resample_filter=DEFAULT_RESAMPLE_FILTER, mixed_precision: str = "auto",
                 impl: str = "auto", rngs: nnx.Rngs):
        mixed_dtype(mixed_precision)  # a bad name fails here, before any parameter is drawn
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self._config = _frozen_config(
            z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, img_resolution=img_resolution,
            img_channels=img_channels, mapping_layers=mapping_layers,
            mapping_lr_multiplier=mapping_lr_multiplier, w_avg_beta=w_avg_beta,
            channel_base=channel_base, channel_max=channel_max, num_fp16_res=num_fp16_res,
            conv_clamp=conv_clamp, use_noise=use_noise, resample_filter=resample_filter,
            mixed_precision=mixed_precision, impl=impl)
        self.synthesis = SynthesisNetwork(w_dim, img_resolution, img_channels,
                                          channel_base=channel_base, channel_max=channel_max,
                                          num_fp16_res=num_fp16_res, conv_clamp=conv_clamp,
                                          use_noise=use_noise, resample_filter=resample_filter,
                                          mixed_precision=mixed_precision, impl=impl, rngs=rngs)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, c_dim, w_dim, self.num_ws, num_layers=mapping_layers,
                                      lr_multiplier=mapping_lr_multiplier, w_avg_beta=w_avg_beta,
                                      rngs=rngs)

    def config(self) -> dict[str, Any]:
        """The constructor's keyword arguments (JSON-serialisable), to rebuild this generator."""
        return _thaw_config(self._config)

    def __call__(self, z, c=None, truncation_psi=1.0, truncation_cutoff: int | None = None,
                 noise_mode: str = "const", rngs=None, update_emas: bool = False):
        """rngs: a PRNG key or nnx.Rngs for noise_mode='random' (ignored otherwise)."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_emas=update_emas)
        return self.synthesis(ws, noise_mode=noise_mode, noise_rng=_as_key(rngs))


def mix_styles(ws1, ws2, cutoff):
    """W+ with rows [:cutoff] from ws1 and [cutoff:] from ws2 (cutoff may be a traced int)."""
    if ws1.shape != ws2.shape:
        raise ValueError(f"ws1 and ws2 must have the same shape, got {ws1.shape} and {ws2.shape}")
    take_first = jnp.arange(ws1.shape[1]) < cutoff
    return jnp.where(take_first[None, :, None], ws1, ws2)


def style_mixing(G: Generator, z, c, prob: float, key, update_emas: bool = False):
    """The training-time style-mixing regulariser: map z, and with probability `prob` replace the
    rows from a random cutoff in [1, num_ws) on by the mapping of a fresh z (as the reference loss).

    Returns (ws, cutoff); cutoff == num_ws when no mixing happened.
    """
    k_cut, k_prob, k_z = jax.random.split(key, 3)
    ws = G.mapping(z, c, update_emas=update_emas)
    num_ws = ws.shape[1]
    cutoff = jax.random.randint(k_cut, (), 1, num_ws)
    cutoff = jnp.where(jax.random.uniform(k_prob, ()) < prob, cutoff, num_ws)
    ws2 = G.mapping(jax.random.normal(k_z, z.shape, jnp.float32), c, update_emas=False)
    return mix_styles(ws, ws2, cutoff), cutoff


# --------------------------------------------------------------------------------------------------
# Discriminator


class DiscriminatorBlock(nnx.Module):
    """resnet block: [fromRGB], conv0 3x3, conv1 3x3 down x2, plus a 1x1 down x2 skip; both
    branches scaled by sqrt(1/2)."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, resolution: int,
                 img_channels: int, *, resample_filter=DEFAULT_RESAMPLE_FILTER,
                 conv_clamp: float | None = None, dtype=jnp.float32, impl: str = "auto", rngs: nnx.Rngs):
        if in_channels not in (0, tmp_channels):
            raise ValueError(f"in_channels must be 0 or {tmp_channels}, got {in_channels}")
        self.in_channels = in_channels
        self.resolution = resolution
        self.dtype = dtype  # compute dtype (block_dtype); parameters stay float32
        kw = dict(resample_filter=resample_filter, impl=impl, rngs=rngs)
        self.fromrgb = (Conv2dLayer(img_channels, tmp_channels, 1, activation="lrelu",
                                    conv_clamp=conv_clamp, **kw) if in_channels == 0 else None)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, activation="lrelu",
                                 conv_clamp=conv_clamp, **kw)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, 3, activation="lrelu", down=2,
                                 conv_clamp=conv_clamp, **kw)
        self.skip = Conv2dLayer(tmp_channels, out_channels, 1, bias=False, down=2, **kw)

    def __call__(self, x, img):
        if self.in_channels == 0:
            x = self.fromrgb(img.astype(self.dtype))
        x = x.astype(self.dtype)
        y = self.skip(x, gain=math.sqrt(0.5))
        x = self.conv0(x)
        x = self.conv1(x, gain=math.sqrt(0.5))
        return y + x


class DiscriminatorEpilogue(nnx.Module):
    """4x4 head: minibatch std, conv 3x3, fc, out; projection on cmap when conditional."""

    def __init__(self, in_channels: int, cmap_dim: int, resolution: int = 4, *,
                 mbstd_group_size: int | None = 4, mbstd_num_channels: int = 1,
                 conv_clamp: float | None = None, impl: str = "auto", rngs: nnx.Rngs):
        self.in_channels = in_channels
        self.cmap_dim = cmap_dim
        self.resolution = resolution
        self.mbstd_group_size = mbstd_group_size
        self.mbstd_num_channels = mbstd_num_channels
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, 3, activation="lrelu",
                                conv_clamp=conv_clamp, impl=impl, rngs=rngs)
        # Reads the [4, 4, C] map flattened in (h, w, c) order.
        self.fc = FullyConnected(in_channels * resolution ** 2, in_channels, activation="lrelu", rngs=rngs)
        self.out = FullyConnected(in_channels, 1 if cmap_dim == 0 else cmap_dim, rngs=rngs)

    def __call__(self, x, cmap=None):
        if self.mbstd_num_channels > 0:
            x = minibatch_std(x, self.mbstd_group_size, self.mbstd_num_channels)
        x = self.conv(x)
        x = self.fc(x.reshape(x.shape[0], -1))
        x = self.out(x)
        if self.cmap_dim > 0:
            x = jnp.sum(x * cmap, axis=1, keepdims=True) * (1.0 / np.sqrt(self.cmap_dim))
        return x


class Discriminator(nnx.Module):
    """StyleGAN2 resnet discriminator: `D(img, c)` -> logits [N, 1]; img NHWC in [-1, 1].

    Blocks bR ... b8 halve the resolution; b4 is the epilogue. With c_dim > 0 a mapping network
    (z_dim 0) embeds c into cmap [N, cmap_dim] and the output is the projection <out, cmap> / sqrt(cmap_dim).
    """

    def __init__(self, c_dim: int = 0, img_resolution: int = 256, img_channels: int = 3, *,
                 channel_base: int = 32768, channel_max: int = 512, num_fp16_res: int = 0,
                 conv_clamp: float | None = None, cmap_dim: int | None = None,
                 mbstd_group_size: int | None = 4, mbstd_num_channels: int = 1,
                 mapping_layers: int = 8, resample_filter=DEFAULT_RESAMPLE_FILTER,
                 mixed_precision: str = "auto", impl: str = "auto", rngs: nnx.Rngs):
        mixed_dtype(mixed_precision)  # a bad name fails here, before any parameter is drawn
        log2 = _log2_resolution(img_resolution)
        if img_resolution < 8:
            raise ValueError(f"the discriminator needs img_resolution >= 8, got {img_resolution}")
        self.c_dim = c_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self._config = _frozen_config(
            c_dim=c_dim, img_resolution=img_resolution, img_channels=img_channels,
            channel_base=channel_base, channel_max=channel_max, num_fp16_res=num_fp16_res,
            conv_clamp=conv_clamp, cmap_dim=cmap_dim, mbstd_group_size=mbstd_group_size,
            mbstd_num_channels=mbstd_num_channels, mapping_layers=mapping_layers,
            resample_filter=resample_filter, mixed_precision=mixed_precision, impl=impl)
        self.block_resolutions = tuple(2 ** i for i in range(log2, 2, -1))
        ch = lambda res: channels_for(res, channel_base, channel_max)  # noqa: E731
        if cmap_dim is None:
            cmap_dim = ch(4)
        if c_dim == 0:
            cmap_dim = 0
        self.cmap_dim = cmap_dim
        for res in self.block_resolutions:
            in_channels = ch(res) if res < img_resolution else 0
            setattr(self, f"b{res}", DiscriminatorBlock(
                in_channels, ch(res), ch(res // 2), res, img_channels, resample_filter=resample_filter,
                conv_clamp=conv_clamp, dtype=block_dtype(res, img_resolution, num_fp16_res, mixed_precision),
                impl=impl, rngs=rngs))
        self.mapping = (MappingNetwork(0, c_dim, cmap_dim, None, num_layers=mapping_layers,
                                       w_avg_beta=None, rngs=rngs) if c_dim > 0 else None)
        self.b4 = DiscriminatorEpilogue(ch(4), cmap_dim, 4, mbstd_group_size=mbstd_group_size,
                                        mbstd_num_channels=mbstd_num_channels,
                                        conv_clamp=conv_clamp, impl=impl, rngs=rngs)

    def config(self) -> dict[str, Any]:
        """The constructor's keyword arguments (JSON-serialisable), to rebuild this discriminator."""
        return _thaw_config(self._config)

    def __call__(self, img, c=None):
        r = self.img_resolution
        if img.ndim != 4 or img.shape[1:] != (r, r, self.img_channels):
            raise ValueError(f"img must be [N, {r}, {r}, {self.img_channels}], got shape {img.shape}")
        x = None
        img = img.astype(jnp.float32)
        for res in self.block_resolutions:
            x = getattr(self, f"b{res}")(x, img)
        cmap = None
        if self.c_dim > 0:
            cmap = self.mapping(None, c)
        return self.b4(x.astype(jnp.float32), cmap)


def count_params(module_or_state) -> int:
    """Number of trainable parameters (nnx.Param leaves); works on `nnx.eval_shape` results."""
    state = module_or_state
    if isinstance(module_or_state, nnx.Module):
        state = nnx.state(module_or_state, nnx.Param)
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(state)))
