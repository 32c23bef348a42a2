"""A small convolutional autoencoder (seed 001's counterfactual generator): images -> code vector ->
images. Moving an image's code toward the other class and decoding gives a counterfactual without a
GAN or an invertible classifier (see `viscoin_jax.explain.autoencoder_counterfactual`).

    encode: [conv3x3 stride 2 -> ReLU] per entry of `channels` -> flatten -> linear -> code [N, code_dim]
    decode: linear -> reshape -> [nearest x2 upsample -> conv3x3 -> ReLU] per level -> conv3x3 -> tanh
Images are NHWC in [-1, 1]; the side must be divisible by 2 ** len(channels).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class ConvAutoencoder(nnx.Module):
    def __init__(self, resolution: int, *, channels: Sequence[int] = (16, 32), code_dim: int = 32,
                 rngs: nnx.Rngs):
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty sequence of positive ints, got {channels}")
        if int(code_dim) < 1:
            raise ValueError(f"code_dim must be >= 1, got {code_dim}")
        levels = len(channels)
        if int(resolution) < 2 ** levels or int(resolution) % 2 ** levels:
            raise ValueError(f"resolution {resolution} must be a positive multiple of 2**{levels} "
                             f"({levels} downsamplings)")
        self.resolution, self.channels, self.code_dim = int(resolution), channels, int(code_dim)
        self.bottom = self.resolution // 2 ** levels
        cins = (3,) + channels[:-1]
        self.down = nnx.List([nnx.Conv(a, b, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
                              for a, b in zip(cins, channels)])
        flat = self.bottom * self.bottom * channels[-1]
        self.to_code = nnx.Linear(flat, self.code_dim, rngs=rngs)
        self.from_code = nnx.Linear(self.code_dim, flat, rngs=rngs)
        outs = tuple(reversed(channels))[1:] + (channels[0],)
        self.up = nnx.List([nnx.Conv(a, b, (3, 3), padding="SAME", rngs=rngs)
                            for a, b in zip(reversed(channels), outs)])
        self.to_rgb = nnx.Conv(channels[0], 3, (3, 3), padding="SAME", rngs=rngs)

    def encode(self, images: jax.Array) -> jax.Array:
        """Images [N, R, R, 3] in [-1, 1] -> codes [N, code_dim]."""
        x = jnp.asarray(images)
        if x.ndim != 4 or x.shape[1:] != (self.resolution, self.resolution, 3):
            raise ValueError(f"autoencoder input must be [N, {self.resolution}, {self.resolution}, 3], got {x.shape}")
        for conv in self.down:
            x = jax.nn.relu(conv(x))
        return self.to_code(x.reshape(x.shape[0], -1))

    def decode(self, codes: jax.Array) -> jax.Array:
        """Codes [N, code_dim] -> images [N, R, R, 3] in (-1, 1)."""
        c = jnp.asarray(codes)
        if c.ndim != 2 or c.shape[1] != self.code_dim:
            raise ValueError(f"codes must be [N, {self.code_dim}], got {c.shape}")
        x = self.from_code(c).reshape(c.shape[0], self.bottom, self.bottom, self.channels[-1])
        for conv in self.up:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = jax.nn.relu(conv(x))
        return jnp.tanh(self.to_rgb(x))

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decode(self.encode(images))


__all__ = ["ConvAutoencoder"]
