"""Inception-v3 as used for FID: the network of pytorch-fid's `pt_inception-2015-12-05` weights.

FID is only comparable between papers when it is computed with one particular Inception: the 2015
TensorFlow graph, whose weights pytorch-fid ported to PyTorch. That graph differs from torchvision's
Inception-v3 in its pooling:

- the 3x3/stride-1 average pools inside the A, C and first E blocks ignore the zero padding
  (`count_include_pad=False`: border outputs are averaged over the in-image pixels only);
- the last E block (Mixed_7c) max-pools instead of average-pooling in its pool branch.

The feature used by FID is the 2048-d global average ("pool3") after Mixed_7c.

Every conv + batch-norm pair is stored folded into one conv with a bias (the network is only ever
evaluated), so a block is conv -> bias -> ReLU. Module names are the lower-cased PyTorch names
(`Mixed_5b.branch1x1` -> `mixed_5b.branch1x1`), which keeps the weight converter a name mapping.

`fid_preprocess` turns project images ([-1, 1] float, any size) into the network's input exactly
as the standard pipeline does: quantise to uint8 levels, bilinear resize to 299x299 (half-pixel
centres, no anti-aliasing, like `F.interpolate(..., align_corners=False)`), scale to [-1, 1].
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FID_INPUT_SIZE = 299
POOL3_DIM = 2048


def quantize_to_uint8_levels(images: jax.Array) -> jax.Array:
    """Map images to the 256 integer levels 0..255 (as float32) exactly as saving them as uint8 does.

    Float input is taken to be in [-1, 1] (project convention): v = floor(clip(x * 127.5 + 128,
    0, 255)), i.e. (x + 1) * 127.5 rounded half-up and clipped. uint8 input is passed through.
    """
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32)
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be float in [-1, 1] or uint8, got dtype {images.dtype}")
    x = images.astype(jnp.float32)
    return jnp.floor(jnp.clip(x * 127.5 + 128.0, 0.0, 255.0))


def fid_preprocess(images: jax.Array, size: int = FID_INPUT_SIZE) -> jax.Array:
    """[N, H, W, 3] images in [-1, 1] (or uint8) -> [N, size, size, 3] network input in [-1, 1].

    Same order of operations as pytorch-fid: uint8 levels / 255, bilinear resize, then 2x - 1.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3] (NHWC RGB), got shape {images.shape}")
    x = quantize_to_uint8_levels(images) / 255.0
    n, h, w, c = x.shape
    if (h, w) != (size, size):
        x = jax.image.resize(x, (n, size, size, c), method="bilinear", antialias=False)
    return 2.0 * x - 1.0


def _avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool with 1-pixel padding that does not count the padding."""
    window, strides, pad = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)
    return total / count


def _max_pool_3x3(x: jax.Array, stride: int, pad: int) -> jax.Array:
    """3x3 max pool; padding (if any) is -inf so it never wins, like PyTorch's max_pool2d."""
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), padding)


class Conv2d(nnx.Module):
    """NHWC conv with a bias; kernel [kh, kw, in, out] (HWIO).

    rngs=None builds zero placeholders without touching the RNG (fast; for modules whose weights
    are loaded right after, see `build_with_params`); otherwise kernels are He-normal, biases zero.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int | tuple[int, int], *, stride: int = 1,
                 padding: int | tuple[int, int] = 0, precision=None, rngs: nnx.Rngs | None):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        shape = (kh, kw, in_ch, out_ch)
        if rngs is None:
            kernel_value = np.zeros(shape, np.float32)
        else:
            kernel_value = jax.random.normal(rngs.params(), shape, jnp.float32) * np.sqrt(2.0 / (kh * kw * in_ch))
        self.kernel = nnx.Param(kernel_value)
        self.bias = nnx.Param(np.zeros((out_ch,), np.float32))
        self.stride = stride
        self.padding = ((ph, ph), (pw, pw))
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(x, jnp.asarray(self.kernel[...], x.dtype), (self.stride, self.stride),
                                         self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=self.precision)
        return y + jnp.asarray(self.bias[...], x.dtype)


class BasicConv(nnx.Module):
    """Conv (batch-norm folded into kernel and bias) followed by ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int | tuple[int, int], *, stride: int = 1,
                 padding: int | tuple[int, int] = 0, precision=None, rngs: nnx.Rngs | None):
        self.conv = Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, precision=precision, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.conv(x))


class InceptionA(nnx.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and (padding-excluding) avg-pool branches."""

    def __init__(self, in_ch: int, pool_features: int, *, precision=None, rngs: nnx.Rngs | None):
        c = dict(precision=precision, rngs=rngs)
        self.branch1x1 = BasicConv(in_ch, 64, 1, **c)
        self.branch5x5_1 = BasicConv(in_ch, 48, 1, **c)
        self.branch5x5_2 = BasicConv(48, 64, 5, padding=2, **c)
        self.branch3x3dbl_1 = BasicConv(in_ch, 64, 1, **c)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, **c)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1, **c)
        self.branch_pool = BasicConv(in_ch, pool_features, 1, **c)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """35x35 -> 17x17 reduction: strided 3x3, strided double 3x3 and max-pool branches."""

    def __init__(self, in_ch: int, *, precision=None, rngs: nnx.Rngs | None):
        c = dict(precision=precision, rngs=rngs)
        self.branch3x3 = BasicConv(in_ch, 384, 3, stride=2, **c)
        self.branch3x3dbl_1 = BasicConv(in_ch, 64, 1, **c)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, **c)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2, **c)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = _max_pool_3x3(x, stride=2, pad=0)
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nnx.Module):
    """17x17 block with factorised 7x7 convs and a (padding-excluding) avg-pool branch."""

    def __init__(self, in_ch: int, channels_7x7: int, *, precision=None, rngs: nnx.Rngs | None):
        c = dict(precision=precision, rngs=rngs)
        c7 = channels_7x7
        self.branch1x1 = BasicConv(in_ch, 192, 1, **c)
        self.branch7x7_1 = BasicConv(in_ch, c7, 1, **c)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3), **c)
        self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0), **c)
        self.branch7x7dbl_1 = BasicConv(in_ch, c7, 1, **c)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0), **c)
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3), **c)
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0), **c)
        self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3), **c)
        self.branch_pool = BasicConv(in_ch, 192, 1, **c)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """17x17 -> 8x8 reduction: strided 3x3, 7x7-then-strided-3x3 and max-pool branches."""

    def __init__(self, in_ch: int, *, precision=None, rngs: nnx.Rngs | None):
        c = dict(precision=precision, rngs=rngs)
        self.branch3x3_1 = BasicConv(in_ch, 192, 1, **c)
        self.branch3x3_2 = BasicConv(192, 320, 3, stride=2, **c)
        self.branch7x7x3_1 = BasicConv(in_ch, 192, 1, **c)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3), **c)
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0), **c)
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2, **c)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = _max_pool_3x3(x, stride=2, pad=0)
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nnx.Module):
    """8x8 block with split 1x3/3x1 convs. `pool` is "avg" (Mixed_7b) or "max" (Mixed_7c)."""

    def __init__(self, in_ch: int, pool: str, *, precision=None, rngs: nnx.Rngs | None):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        c = dict(precision=precision, rngs=rngs)
        self.pool = pool
        self.branch1x1 = BasicConv(in_ch, 320, 1, **c)
        self.branch3x3_1 = BasicConv(in_ch, 384, 1, **c)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1), **c)
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0), **c)
        self.branch3x3dbl_1 = BasicConv(in_ch, 448, 1, **c)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1, **c)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1), **c)
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0), **c)
        self.branch_pool = BasicConv(in_ch, 192, 1, **c)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = _avg_pool_3x3_exclude_pad(x) if self.pool == "avg" else _max_pool_3x3(x, stride=1, pad=1)
        bp = self.branch_pool(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nnx.Module):
    """The FID Inception-v3 up to pool3: [N, H, W, 3] input in [-1, 1] -> [N, 2048] features.

    Input is the preprocessed network input (see `fid_preprocess`); the net is fully convolutional
    up to the global pool, so any H, W >= 75 works, but only 299x299 gives standard FID features.
    `precision` is the conv matmul precision (default "highest": a metric should not depend on the
    accelerator's default reduced-precision convolutions). rngs=None gives zero placeholders for
    weights loaded afterwards (`load_fid_inception`); nnx.Rngs(seed) gives a He-normal random net.
    """

    def __init__(self, *, precision="highest", rngs: nnx.Rngs | None):
        c = dict(precision=precision, rngs=rngs)
        self.conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2, **c)
        self.conv2d_2a_3x3 = BasicConv(32, 32, 3, **c)
        self.conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1, **c)
        self.conv2d_3b_1x1 = BasicConv(64, 80, 1, **c)
        self.conv2d_4a_3x3 = BasicConv(80, 192, 3, **c)
        self.mixed_5b = InceptionA(192, 32, **c)
        self.mixed_5c = InceptionA(256, 64, **c)
        self.mixed_5d = InceptionA(288, 64, **c)
        self.mixed_6a = InceptionB(288, **c)
        self.mixed_6b = InceptionC(768, 128, **c)
        self.mixed_6c = InceptionC(768, 160, **c)
        self.mixed_6d = InceptionC(768, 160, **c)
        self.mixed_6e = InceptionC(768, 192, **c)
        self.mixed_7a = InceptionD(768, **c)
        self.mixed_7b = InceptionE(1280, "avg", **c)
        self.mixed_7c = InceptionE(2048, "max", **c)

    def stem(self, x: jax.Array) -> jax.Array:
        """Input -> 192-channel map at 1/8 resolution (35x35 for 299 input)."""
        x = self.conv2d_2b_3x3(self.conv2d_2a_3x3(self.conv2d_1a_3x3(x)))
        x = _max_pool_3x3(x, stride=2, pad=0)
        x = self.conv2d_4a_3x3(self.conv2d_3b_1x1(x))
        return _max_pool_3x3(x, stride=2, pad=0)

    def blocks(self) -> Sequence[nnx.Module]:
        return (self.mixed_5b, self.mixed_5c, self.mixed_5d, self.mixed_6a, self.mixed_6b, self.mixed_6c,
                self.mixed_6d, self.mixed_6e, self.mixed_7a, self.mixed_7b, self.mixed_7c)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"input must be [N, H, W, 3], got shape {x.shape}")
        if min(x.shape[1], x.shape[2]) < 75:
            raise ValueError(f"Inception-v3 needs inputs of at least 75x75, got {x.shape[1]}x{x.shape[2]}")
        x = self.stem(x.astype(jnp.float32))
        for block in self.blocks():
            x = block(x)
        return jnp.mean(x, axis=(1, 2))
