"""VGG16 convolutional trunk (torchvision `vgg16().features`), returning the five ReLU taps of LPIPS.

LPIPS-VGG reads relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 (64, 128, 256, 512, 512 channels at
1, 1/2, 1/4, 1/8, 1/16 resolution). Only the 13 convs are kept; the last max-pool and the
classifier are not needed. Convs are 3x3, stride 1, padding 1; pools are 2x2 stride 2 (floor:
odd sizes drop the last row/column, like PyTorch's MaxPool2d).

Conv names are `conv{stage}_{index}`; `TORCHVISION_INDEX` gives the matching index in torchvision's
`features` Sequential (used by the weight converter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from viscoin_jax.models.inception import Conv2d

# (name, in_channels, out_channels) of each conv, in order; a 2x2 max-pool precedes each stage > 1.
VGG16_CONVS = (
    ("conv1_1", 3, 64), ("conv1_2", 64, 64),
    ("conv2_1", 64, 128), ("conv2_2", 128, 128),
    ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256),
    ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512),
    ("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512),
)
# index of each conv in torchvision's vgg16().features
TORCHVISION_INDEX = dict(zip([name for name, _, _ in VGG16_CONVS], (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)))
TAP_CHANNELS = (64, 128, 256, 512, 512)


def _max_pool_2x2(x: jax.Array) -> jax.Array:
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class VGG16Features(nnx.Module):
    """[N, H, W, 3] (already normalised for the weights) -> tuple of the 5 ReLU feature maps.

    `precision` is the conv matmul precision: None (the backend default, fast on TPU/GPU) suits
    a training loss; pass "highest" when reporting LPIPS as a metric. rngs=None gives zero
    placeholders for weights loaded afterwards; nnx.Rngs(seed) a He-normal random net.
    """

    def __init__(self, *, precision=None, rngs: nnx.Rngs | None):
        for name, cin, cout in VGG16_CONVS:
            setattr(self, name, Conv2d(cin, cout, 3, padding=1, precision=precision, rngs=rngs))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"input must be [N, H, W, 3], got shape {x.shape}")
        if min(x.shape[1], x.shape[2]) < 16:
            raise ValueError(f"VGG16 needs inputs of at least 16x16 (4 halvings), got {x.shape[1]}x{x.shape[2]}")
        taps = []
        stage = "1"
        for name, _, _ in VGG16_CONVS:
            if name[4] != stage:  # first conv of a new stage: record the previous stage's output, pool
                taps.append(x)
                x = _max_pool_2x2(x)
                stage = name[4]
            x = jax.nn.relu(getattr(self, name)(x))
        taps.append(x)
        return tuple(taps)
