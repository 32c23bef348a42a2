"""ResNet-18/34/50/101/152 classifiers in the torchvision layout, with the feature taps VisCoIN reads.

Layout (so torchvision weights import one to one, see `viscoin_jax.convert.torchvision_resnet`):
stem conv 7x7/2 (pad 3) -> BN -> ReLU -> max-pool 3x3/2 (pad 1), four stages of basic (18/34) or
bottleneck (50+) blocks, global average pool, linear head. Bottleneck blocks stride on the 3x3 conv
("ResNet v1.5"); a block whose shape changes has a downsample branch 1x1 conv (stride s) + BN.
`small_input=True` swaps the stem for a 3x3/1 conv without max-pool, for 32-64 px images.
`width` (64 in torchvision) scales every stage; small widths keep tests fast.

Inputs are NHWC float images in [-1, 1], the range used everywhere in this project. The model maps
them to ImageNet normalisation internally, x01 = (x + 1) / 2, (x01 - mean) / std with torchvision's
mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), so torchvision weights see the inputs
they were trained on and callers never normalise.

Batch norm: momentum 0.9 on the running statistics (torch's 0.1), eps 1e-5. `__call__(x, train)`
selects batch statistics (and updates the running ones in place) when `train=True`, the running
statistics otherwise; the flag is the only switch (`model.train()/eval()` are not used). Flax
updates the running variance with the biased batch variance; torch uses the unbiased one.

`__call__` returns (logits, features): features["stage1".."stage4"] are the stage outputs,
features["stage4_penultimate"] the output of the penultimate block of stage 4 (the map VisCoIN's
concept extractor reads at 8x8 for 256 px inputs), features["pooled"] the [N, C] pooled vector.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_MOMENTUM = 0.9
BN_EPS = 1e-5

# depth -> (block kind, blocks per stage)
RESNET_SPECS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
FEATURE_KEYS = ("stage1", "stage2", "stage3", "stage4", "stage4_penultimate", "pooled")

_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision: kaiming fan_out


def stage_channels(depth: int, width: int = 64) -> tuple[int, int, int, int]:
    """Output channels of stages 1-4 (e.g. (256, 512, 1024, 2048) for ResNet-50)."""
    kind, _ = _spec(depth)
    return tuple(width * m * EXPANSION[kind] for m in (1, 2, 4, 8))


def _spec(depth: int):
    if depth not in RESNET_SPECS:
        raise ValueError(f"unknown ResNet depth {depth!r}: expected one of {sorted(RESNET_SPECS)}")
    return RESNET_SPECS[depth]


def _conv(cin, cout, k, stride, pad, *, dtype, precision, rngs):
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                    use_bias=False, kernel_init=_conv_init, dtype=dtype, precision=precision, rngs=rngs)


def _bn(c, *, dtype, rngs):
    return nnx.BatchNorm(c, momentum=BN_MOMENTUM, epsilon=BN_EPS, use_fast_variance=False, dtype=dtype,
                         rngs=rngs)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torch MaxPool2d(3, stride=2, padding=1): padding never wins the max.

    The init value is a Python scalar: a traced array there makes jit(grad(.)) fail to linearise.
    """
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


class BasicBlock(nnx.Module):
    """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, plus the (downsampled) input, ReLU."""

    def __init__(self, cin: int, planes: int, stride: int, *, dtype=None, precision=None, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, precision=precision, rngs=rngs)
        self.conv1 = _conv(cin, planes, 3, stride, 1, **kw)
        self.bn1 = _bn(planes, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(planes, planes, 3, 1, 1, **kw)
        self.bn2 = _bn(planes, dtype=dtype, rngs=rngs)
        if stride != 1 or cin != planes:
            self.downsample_conv = _conv(cin, planes, 1, stride, 0, **kw)
            self.downsample_bn = _bn(planes, dtype=dtype, rngs=rngs)
        else:
            self.downsample_conv = self.downsample_bn = None

    def __call__(self, x, train: bool):
        ura = not train
        y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = self.bn2(self.conv2(y), use_running_average=ura)
        if self.downsample_conv is not None:
            x = self.downsample_bn(self.downsample_conv(x), use_running_average=ura)
        return jax.nn.relu(x + y)


class Bottleneck(nnx.Module):
    """conv1x1 -> conv3x3(stride) -> conv1x1 (x4 channels), BN + ReLU between, residual, ReLU."""

    def __init__(self, cin: int, planes: int, stride: int, *, dtype=None, precision=None, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, precision=precision, rngs=rngs)
        cout = planes * EXPANSION["bottleneck"]
        self.conv1 = _conv(cin, planes, 1, 1, 0, **kw)
        self.bn1 = _bn(planes, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(planes, planes, 3, stride, 1, **kw)
        self.bn2 = _bn(planes, dtype=dtype, rngs=rngs)
        self.conv3 = _conv(planes, cout, 1, 1, 0, **kw)
        self.bn3 = _bn(cout, dtype=dtype, rngs=rngs)
        if stride != 1 or cin != cout:
            self.downsample_conv = _conv(cin, cout, 1, stride, 0, **kw)
            self.downsample_bn = _bn(cout, dtype=dtype, rngs=rngs)
        else:
            self.downsample_conv = self.downsample_bn = None

    def __call__(self, x, train: bool):
        ura = not train
        y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = jax.nn.relu(self.bn2(self.conv2(y), use_running_average=ura))
        y = self.bn3(self.conv3(y), use_running_average=ura)
        if self.downsample_conv is not None:
            x = self.downsample_bn(self.downsample_conv(x), use_running_average=ura)
        return jax.nn.relu(x + y)


class ResNet(nnx.Module):
    """torchvision-layout ResNet: `model(x, train=False) -> (logits [N, C], features dict)`.

    Args:
      depth: 18, 34, 50, 101 or 152.
      num_classes: size of the linear head.
      width: channels of the stem (64 in torchvision); stage k has width * 2**(k-1) * expansion.
      small_input: 3x3/1 stem without max-pool (CIFAR-style) instead of 7x7/2 + max-pool.
      dtype: compute dtype (e.g. jnp.bfloat16 on TPU); parameters stay float32.
      precision: conv / matmul precision (None = backend default).
    """

    def __init__(self, depth: int = 50, num_classes: int = 1000, *, width: int = 64, small_input: bool = False,
                 dtype: Any = None, precision: Any = None, rngs: nnx.Rngs):
        kind, blocks = _spec(depth)
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if int(width) < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.depth, self.num_classes = int(depth), int(num_classes)
        self.width, self.small_input = int(width), bool(small_input)
        self.dtype = dtype
        kw = dict(dtype=dtype, precision=precision, rngs=rngs)
        if small_input:
            self.conv1 = _conv(3, width, 3, 1, 1, **kw)
        else:
            self.conv1 = _conv(3, width, 7, 2, 3, **kw)
        self.bn1 = _bn(width, dtype=dtype, rngs=rngs)
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        cin = width
        for s, n in enumerate(blocks):
            planes = width * 2 ** s
            stage = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                stage.append(block_cls(cin, planes, stride, **kw))
                cin = planes * EXPANSION[kind]
            setattr(self, f"layer{s + 1}", nnx.List(stage))
        self.num_features = cin
        self.fc = nnx.Linear(cin, num_classes, dtype=dtype, precision=precision, rngs=rngs)

    @property
    def config(self) -> dict:
        """The constructor arguments that fix the parameter shapes (saved with checkpoints)."""
        return {"depth": self.depth, "num_classes": self.num_classes, "width": self.width,
                "small_input": self.small_input}

    @property
    def feature_channels(self) -> dict[str, int]:
        c = stage_channels(self.depth, self.width)
        return {"stage1": c[0], "stage2": c[1], "stage3": c[2], "stage4": c[3], "stage4_penultimate": c[3],
                "pooled": c[3]}

    @staticmethod
    def normalize(x: jax.Array) -> jax.Array:
        """[-1, 1] images -> ImageNet-normalised images (what torchvision weights expect)."""
        mean = jnp.asarray(IMAGENET_MEAN, x.dtype)
        std = jnp.asarray(IMAGENET_STD, x.dtype)
        return ((x + 1.0) * 0.5 - mean) / std

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"ResNet input must be NHWC images [N, H, W, 3] in [-1, 1], got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"ResNet input must be floating point in [-1, 1], got dtype {x.dtype}")
        min_size = 8 if self.small_input else 32
        if min(x.shape[1], x.shape[2]) < min_size:
            raise ValueError(f"ResNet input must be at least {min_size}x{min_size}, got {x.shape[1]}x{x.shape[2]}")
        ura = not train
        x = self.normalize(x.astype(jnp.float32))
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
        if not self.small_input:
            x = max_pool_3x3_s2(x)
        feats = {}
        for s in range(1, 5):
            stage = getattr(self, f"layer{s}")
            for b, block in enumerate(stage):
                if s == 4 and b == len(stage) - 1:
                    feats["stage4_penultimate"] = x
                x = block(x, train)
            feats[f"stage{s}"] = x
        pooled = jnp.mean(x, axis=(1, 2))
        feats["pooled"] = pooled
        logits = self.fc(pooled)
        return logits, feats


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (nnx.Param leaves; BN running statistics excluded)."""
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))))
