"""VisCoIN networks (Parekh et al., ICLR 2025): concept extractor Psi, interpretable head Theta,
concept translator Omega, and a container holding the three.

Conventions (shared with `viscoin_jax.explain.concepts` and `viscoin_jax.trainers.viscoin_losses`):
phi is [N, g, g, K] (concepts last, g = 3 by default, b = g * g cells), phi_prime is [N, b K],
the head weight is [K, C], the concept conv1x1 kernel is [1, 1, C_in, K], ws is [N, num_ws, w_dim].

Psi reads three classifier feature maps (for ResNet-50 at 256 px: stage 2 512x32x32, stage 3
1024x16x16, the penultimate block of stage 4 2048x8x8). Each goes through a ReLU conv onto the grid
of the smallest map: for a map of size s and grid size t (s divisible by t) the conv has stride
r = s / t, kernel r + 1 for even r (r + 2 for odd r; 3 when r = 1) and padding kernel // 2, which
gives exactly t outputs. At 256 px this is k5/s4, k3/s2, k3/s1 as in the paper. The three maps
are concatenated, mixed by a ReLU conv3x3, and a ReLU conv1x1 gives the K concept maps,
adaptive-average-pooled (PyTorch's bins) to g x g: phi. phi_prime = ReLU(FC(ReLU(FC(flatten(
adaptive_avg_pool(mixed map, g x g)))))), the unconstrained second output that helps
reconstruction.

Theta: (dropout) -> max over the g x g cells -> Linear(K -> C), returning logits.

Omega: one affine map per W+ vector from the flattened concepts (phi flattened in (row, col,
concept) order, or phi_prime), plus the generator's average latent w_avg (the public code starts
from zero instead). Routing follows the paper's split by resolution: at 256 px (num_ws = 14)
phi_prime feeds the W+ vectors of the 4 and 8 px layers (the first 3: at most 1/32 of the image
side) and of the 256 px block (the last 2), phi the middle 9. `default_prime_split` applies the
same relative resolutions at any size: at 32 px no layer is that coarse, so the concepts drive every
vector but the 32 px block's two (they decide the colour there: with the first 3 vectors from
phi_prime, removing a concept moved f by 0.007 on the demo, with none 0.2). `prime_split=(first,
last)` overrides the rule. The per-vector maps are stored batched ([n_vectors, b K, w_dim] kernels) and
initialised small (std init_scale / sqrt(b K)) with zero biases, so an all-zero concept input
decodes exactly to w_avg.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..checks import check_float_array

FEATURE_KEYS = ("stage2", "stage3", "stage4_penultimate")


class LatentAverage(nnx.Variable):
    """The frozen generator's average latent w_avg: state, not a trained parameter."""


# ----------------------------------------------------------------------------- helpers

def _pair(v) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    v = tuple(int(t) for t in v)
    if len(v) != 2:
        raise ValueError(f"expected a size or an (h, w) pair, got {v}")
    return v


def branch_conv_geometry(size: int, target: int) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a conv mapping `size` cells onto exactly `target` cells."""
    if size < target or size % target:
        raise ValueError(f"a feature map of size {size} cannot be brought to the {target}-cell grid "
                         f"(its size must be a multiple of {target})")
    stride = size // target
    kernel = stride + 1 if stride % 2 == 0 else stride + 2
    return kernel, stride, kernel // 2


def adaptive_avg_pool(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """PyTorch AdaptiveAvgPool2d on NHWC: bin i covers [floor(i H / o), ceil((i + 1) H / o))."""
    h, w = x.shape[1], x.shape[2]
    oh, ow = out_hw
    rows = []
    for i in range(oh):
        r0, r1 = (i * h) // oh, -((-(i + 1) * h) // oh)
        cols = []
        for j in range(ow):
            c0, c1 = (j * w) // ow, -((-(j + 1) * w) // ow)
            cols.append(jnp.mean(x[:, r0:r1, c0:c1, :], axis=(1, 2)))
        rows.append(jnp.stack(cols, axis=1))
    return jnp.stack(rows, axis=1)


def ws_resolutions(num_ws: int) -> list[tuple[int, int]]:
    """(lowest, highest) resolution of the layers that read each W+ vector of a StyleGAN2 synthesis
    network with `num_ws` vectors: vector 2k feeds conv1 of block 4 * 2^k, vector 2k + 1 that block's
    toRGB and the next block's conv0 (the last vector only the final toRGB)."""
    if num_ws < 2 or num_ws % 2:
        raise ValueError(f"num_ws must be an even number >= 2 (2 log2(R) - 2 for a StyleGAN2 at R px), got {num_ws}")
    out = []
    for i in range(num_ws):
        res = 4 * 2 ** (i // 2)
        out.append((res, res) if i % 2 == 0 or i == num_ws - 1 else (res, 2 * res))
    return out


def default_prime_split(num_ws: int) -> tuple[int, int]:
    """(first, last) W+ vectors fed by phi_prime: those whose layers all run at <= 1/32 of the image
    side (the 4 and 8 px layers at 256 px) and those of the final block ((3, 2) at 256 px, as in the
    paper; (0, 2) at 32 px)."""
    res = ws_resolutions(num_ws)
    top = res[-1][1]
    first = next((i for i, (_, hi) in enumerate(res) if 32 * hi > top), num_ws)
    last = next((i for i, (lo, _) in enumerate(reversed(res)) if lo < top), num_ws)
    if first + last >= num_ws:
        raise ValueError(f"the translator needs a W+ vector for phi besides the final block's two; num_ws={num_ws} "
                         "(an 8 px or larger generator) or an explicit prime_split")
    return first, last


def _check_map(x, name):
    return check_float_array(x, name, 4, "[N, H, W, C] (feature map)")


# ----------------------------------------------------------------------------- Psi

class ConceptExtractor(nnx.Module):
    """Psi: three classifier feature maps -> (phi [N, g, g, K], phi_prime [N, g g K]).

    Args:
      n_concepts: K.
      in_channels: channels of the three maps (ResNet-50: 512, 1024, 2048).
      feature_sizes: spatial size of each map, an int or (h, w) (ResNet-50 at 256 px: 32, 16, 8);
        the last one is the common grid.
      branch_channels: channels of each branch conv (512 in the paper; the mixed map has 3x).
      concept_grid: g, the side of the pooled concept maps (3 in the paper).
    """

    def __init__(self, n_concepts: int, in_channels: Sequence[int] = (512, 1024, 2048),
                 feature_sizes: Sequence[Any] = (32, 16, 8), *, branch_channels: int = 512, concept_grid: int = 3,
                 precision: Any = None, rngs: nnx.Rngs):
        if len(in_channels) != 3 or len(feature_sizes) != 3:
            raise ValueError(f"expected 3 feature maps, got in_channels={in_channels}, feature_sizes={feature_sizes}")
        if n_concepts < 1 or concept_grid < 1:
            raise ValueError(f"n_concepts and concept_grid must be >= 1, got {n_concepts}, {concept_grid}")
        self.n_concepts, self.concept_grid = int(n_concepts), int(concept_grid)
        self.in_channels = tuple(int(c) for c in in_channels)
        self.feature_sizes = tuple(_pair(s) for s in feature_sizes)
        grid = self.feature_sizes[-1]
        if min(grid) < concept_grid:
            raise ValueError(f"the last feature map ({grid}) is smaller than the "
                             f"{concept_grid}x{concept_grid} concept grid")
        self.grid = grid
        branches = []
        for cin, (h, w) in zip(self.in_channels, self.feature_sizes):
            kh, sh, ph = branch_conv_geometry(h, grid[0])
            kw, sw, pw = branch_conv_geometry(w, grid[1])
            branches.append(nnx.Conv(cin, branch_channels, (kh, kw), strides=(sh, sw), padding=((ph, ph), (pw, pw)),
                                     precision=precision, rngs=rngs))
        self.branches = nnx.List(branches)
        mixed = 3 * branch_channels
        self.mix = nnx.Conv(mixed, mixed, (3, 3), padding=((1, 1), (1, 1)), precision=precision, rngs=rngs)
        self.concept_conv = nnx.Conv(mixed, n_concepts, (1, 1), precision=precision, rngs=rngs)
        b = concept_grid * concept_grid
        self.fc1 = nnx.Linear(mixed * b, b * n_concepts, precision=precision, rngs=rngs)
        self.fc2 = nnx.Linear(b * n_concepts, b * n_concepts, precision=precision, rngs=rngs)

    @property
    def concept_kernel(self) -> jax.Array:
        """The conv1x1 kernel [1, 1, C_in, K] whose normalised columns the orthogonality loss uses."""
        return self.concept_conv.kernel[...]

    def _maps(self, features) -> list[jax.Array]:
        if isinstance(features, Mapping):
            missing = [k for k in FEATURE_KEYS if k not in features]
            if missing:
                raise ValueError(f"features lack {missing} (expected the keys {FEATURE_KEYS})")
            features = [features[k] for k in FEATURE_KEYS]
        if len(features) != 3:
            raise ValueError(f"expected 3 feature maps, got {len(features)}")
        maps = []
        for i, (x, cin, size) in enumerate(zip(features, self.in_channels, self.feature_sizes)):
            x = _check_map(x, f"feature map {i}")
            if tuple(x.shape[1:]) != (*size, cin):
                raise ValueError(f"feature map {i} must be [N, {size[0]}, {size[1]}, {cin}], got {x.shape}")
            maps.append(x)
        if len({m.shape[0] for m in maps}) != 1:
            raise ValueError(f"feature maps have different batch sizes {[m.shape[0] for m in maps]}")
        return maps

    def __call__(self, features) -> tuple[jax.Array, jax.Array]:
        """features: 3 maps (tuple) or a ResNet feature dict (keys FEATURE_KEYS)."""
        maps = self._maps(features)
        x = jnp.concatenate([jax.nn.relu(conv(m)) for conv, m in zip(self.branches, maps)], axis=-1)
        x = jax.nn.relu(self.mix(x))
        g = (self.concept_grid, self.concept_grid)
        phi = adaptive_avg_pool(jax.nn.relu(self.concept_conv(x)), g)
        pooled = adaptive_avg_pool(x, g).reshape(x.shape[0], -1)
        phi_prime = jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(pooled))))
        return phi, phi_prime


# ----------------------------------------------------------------------------- Theta

class InterpretableHead(nnx.Module):
    """Theta: dropout (training only) -> max over the concept grid -> Linear(K -> C) logits."""

    def __init__(self, n_concepts: int, num_classes: int, dropout: float = 0.01, *, precision: Any = None,
                 rngs: nnx.Rngs):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.n_concepts = int(n_concepts)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.linear = nnx.Linear(n_concepts, num_classes, precision=precision, rngs=rngs)

    @property
    def weight(self) -> jax.Array:
        """W [K, C]: alpha_k = maxpool(phi_k) * W[k, c] is concept k's share of logit c."""
        return self.linear.kernel[...]

    def __call__(self, phi: jax.Array, train: bool = False) -> jax.Array:
        phi = _check_map(phi, "phi")
        if phi.shape[-1] != self.n_concepts:
            raise ValueError(f"phi has {phi.shape[-1]} concepts, the head expects {self.n_concepts}")
        phi = self.dropout(phi, deterministic=not train)
        return self.linear(jnp.max(phi, axis=(1, 2)))


def concept_relevance(phi: jax.Array, head_weight: jax.Array, class_idx) -> jax.Array:
    """r [N, K]: alpha_k = maxpool(phi_k) * W[k, c], r_k = alpha_k / max_l |alpha_l| (0 if all alpha are 0).

    class_idx: an int (same class for every image) or [N] ints.
    """
    phi = _check_map(phi, "phi")
    w = jnp.asarray(head_weight)
    if w.ndim != 2 or w.shape[0] != phi.shape[-1]:
        raise ValueError(f"head_weight must be [K={phi.shape[-1]}, C], got shape {w.shape}")
    c = jnp.broadcast_to(jnp.asarray(class_idx), (phi.shape[0],))
    if not jnp.issubdtype(c.dtype, jnp.integer):
        raise ValueError(f"class_idx must be integer, got {c.dtype}")
    try:
        c_np = np.asarray(c)
    except jax.errors.TracerArrayConversionError:  # under jit: no range check
        c_np = None
    if c_np is not None and (np.any(c_np < 0) or np.any(c_np >= w.shape[1])):
        raise ValueError(f"class_idx must lie in [0, {w.shape[1]}), got {c_np}")
    alpha = jnp.max(phi, axis=(1, 2)) * w.T[c]
    scale = jnp.max(jnp.abs(alpha), axis=-1, keepdims=True)
    return jnp.where(scale > 0, alpha / jnp.where(scale > 0, scale, 1.0), 0.0)


# ----------------------------------------------------------------------------- Omega

class ConceptTranslator(nnx.Module):
    """Omega: (phi, phi_prime) -> ws [N, num_ws, w_dim] = per-vector affine maps + w_avg.

    Args:
      n_concepts: K; the concept input has concept_grid**2 * K features.
      num_ws, w_dim: the generator's W+ layout (14 x 512 at 256 px).
      w_avg: the generator's average latent [w_dim] (None = zeros, only for building a model whose
        state is then loaded).
      prime_split: (first, last) vectors fed by phi_prime; default `default_prime_split(num_ws)`.
      init_scale: weights ~ N(0, (init_scale / sqrt(g g K))^2); biases start at 0.
    """

    def __init__(self, n_concepts: int, num_ws: int, w_dim: int, w_avg=None, *, concept_grid: int = 3,
                 prime_split: tuple[int, int] | None = None, init_scale: float = 0.1, precision: Any = None,
                 rngs: nnx.Rngs):
        first, last = default_prime_split(num_ws) if prime_split is None else (int(prime_split[0]), int(prime_split[1]))
        if first < 0 or last < 0 or first + last >= num_ws:
            raise ValueError(f"prime_split {(first, last)} leaves no W+ vector for phi (num_ws={num_ws})")
        if first + last == 0:
            raise ValueError("prime_split (0, 0) feeds no W+ vector from phi_prime (its layers would never train); "
                             "give at least one")
        if w_avg is None:
            w_avg = jnp.zeros((w_dim,), jnp.float32)
        w_avg = jnp.asarray(w_avg, jnp.float32)
        if w_avg.shape != (w_dim,):
            raise ValueError(f"w_avg must have shape ({w_dim},), got {w_avg.shape}")
        self.n_concepts, self.num_ws, self.w_dim = int(n_concepts), int(num_ws), int(w_dim)
        self.concept_grid = int(concept_grid)
        self.first, self.last = first, last
        self.precision = precision
        d = concept_grid * concept_grid * n_concepts
        self.in_features = d
        n_prime, n_phi = first + last, num_ws - first - last
        std = init_scale / math.sqrt(d)
        init = nnx.initializers.normal(std)
        self.prime_kernel = nnx.Param(init(rngs.params(), (n_prime, d, w_dim)))
        self.prime_bias = nnx.Param(jnp.zeros((n_prime, w_dim)))
        self.phi_kernel = nnx.Param(init(rngs.params(), (n_phi, d, w_dim)))
        self.phi_bias = nnx.Param(jnp.zeros((n_phi, w_dim)))
        self.w_avg = LatentAverage(w_avg)

    @property
    def routing(self) -> tuple[str, ...]:
        """Source of each W+ vector: 'phi_prime' or 'phi'."""
        n_phi = self.num_ws - self.first - self.last
        return ("phi_prime",) * self.first + ("phi",) * n_phi + ("phi_prime",) * self.last

    def __call__(self, phi: jax.Array, phi_prime: jax.Array) -> jax.Array:
        phi = _check_map(phi, "phi")
        n = phi.shape[0]
        g = self.concept_grid
        if phi.shape[1:] != (g, g, self.n_concepts):
            raise ValueError(f"phi must be [N, {g}, {g}, {self.n_concepts}], got {phi.shape}")
        phi_prime = jnp.asarray(phi_prime)
        if phi_prime.shape != (n, self.in_features):
            raise ValueError(f"phi_prime must be [{n}, {self.in_features}], got {phi_prime.shape}")
        hp = jnp.einsum("nd,jde->nje", phi_prime, self.prime_kernel[...], precision=self.precision)
        hp = hp + self.prime_bias[...]
        hm = jnp.einsum("nd,jde->nje", phi.reshape(n, -1), self.phi_kernel[...], precision=self.precision)
        hm = hm + self.phi_bias[...]
        ws = jnp.concatenate([hp[:, : self.first], hm, hp[:, self.first:]], axis=1)
        return ws + self.w_avg[...]


# ----------------------------------------------------------------------------- container

class VisCoIN(nnx.Module):
    """Psi, Theta and Omega together: `model(features, train) -> dict(phi, phi_prime, logits, ws)`.

    The classifier f and the generator G stay outside (both frozen during VisCoIN training).
    """

    def __init__(self, n_concepts: int, num_classes: int, num_ws: int, w_dim: int, w_avg=None, *,
                 in_channels: Sequence[int] = (512, 1024, 2048), feature_sizes: Sequence[Any] = (32, 16, 8),
                 branch_channels: int = 512, concept_grid: int = 3, dropout: float = 0.01,
                 prime_split: tuple[int, int] | None = None, init_scale: float = 0.1, precision: Any = None,
                 rngs: nnx.Rngs):
        self.extractor = ConceptExtractor(n_concepts, in_channels, feature_sizes, branch_channels=branch_channels,
                                          concept_grid=concept_grid, precision=precision, rngs=rngs)
        self.head = InterpretableHead(n_concepts, num_classes, dropout, precision=precision, rngs=rngs)
        self.translator = ConceptTranslator(n_concepts, num_ws, w_dim, w_avg, concept_grid=concept_grid,
                                            prime_split=prime_split, init_scale=init_scale, precision=precision,
                                            rngs=rngs)

    def __call__(self, features, train: bool = False) -> dict[str, jax.Array]:
        phi, phi_prime = self.extractor(features)
        return {"phi": phi, "phi_prime": phi_prime, "logits": self.head(phi, train),
                "ws": self.translator(phi, phi_prime)}
