"""Invertible residual network (i-ResNet, Behrmann et al. 2019) classifier with an explicit inverse.

Why invertible: counterfactuals (ECINN, see `viscoin_jax.explain.iresnet_counterfactual`) move the
feature map z = forward(x) towards another class and map it back to an image with `inverse`.

Architecture (NHWC throughout):
  x [N, H, W, C] -> (optional) squeeze -> injective zero padding of the channels to `channels`
  -> stage 1 blocks -> squeeze -> stage 2 blocks -> ... -> z      (invertible; `forward`)
  z -> BN -> ReLU -> global average pool -> linear                    (`head`, not invertible)
Each block is ActNorm (optional; an invertible per-channel affine map) followed by y = x + F(x) with
  F = [ELU] -> SNConv3x3 -> ELU -> SNConv1x1 -> ELU -> SNConv3x3
(the leading ELU is `preactivation`). Every conv is spectrally normalised to Lipschitz <= `coeff`
(default 0.9) and ELU is 1-Lipschitz, so Lip(F) <= coeff**3 < 1: the map x -> x + F(x) is then
invertible, and the inverse is the fixed-point iteration x <- y - F(x) (a contraction).

Spectral normalisation: the kernel is multiplied by coeff / sigma only when sigma > coeff, where
sigma is the operator norm estimated by power iteration. For a 3x3 conv the operator is the
convolution itself at the block's input shape (zero "SAME" padding), iterated with the conv and its
transpose on [1, H, W, C_in] vectors; for a 1x1 conv it is the [C_in, C_out] matrix. The power
iteration vector u is an `nnx.Variable` (`SpectralVector`, not a trained parameter):
`__call__/forward(..., train=True)` advance it by `n_power_iter` steps (and the gradient flows
through sigma, as in torch's spectral_norm); eval mode uses the stored u unchanged, so forward and
inverse see exactly the same weights. `update_spectral_norms(n)` runs n steps on every conv (do it
before inverting a freshly initialised or freshly loaded model).

`inverse(z, tol, max_iter)` returns (x, info): info["converged"] [N] bool (every block reached a
relative step ||x_k+1 - x_k|| / ||x_k+1|| <= tol), info["iterations"] [N] (fixed-point steps summed
over blocks), info["max_residual"] [N] (largest final relative step over blocks). Converged
samples stop updating. The padded channels are dropped at the end (the inverse of an injective map
is defined on its range; for a z off the range, the result is the projection).

For an accurate inverse on TPU/GPU pass precision="highest" (the default backend precision uses
bf16 passes there).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

BN_MOMENTUM = 0.9


class SpectralVector(nnx.Variable):
    """Power-iteration vector of a spectrally normalised conv: state, not a trained parameter."""


# ----------------------------------------------------------------------------- squeeze

def squeeze(x: jax.Array) -> jax.Array:
    """Space-to-depth 2x2: [N, H, W, C] -> [N, H/2, W/2, 4C]; channel index (2 dy + dx) * C + c."""
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"squeeze needs even height and width, got {h}x{w}")
    x = x.reshape(n, h // 2, 2, w // 2, 2, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h // 2, w // 2, 4 * c)


def unsqueeze(x: jax.Array) -> jax.Array:
    """Inverse of `squeeze`: [N, H, W, 4C] -> [N, 2H, 2W, C]."""
    n, h, w, c4 = x.shape
    if c4 % 4:
        raise ValueError(f"unsqueeze needs a channel count divisible by 4, got {c4}")
    c = c4 // 4
    x = x.reshape(n, h, w, 2, 2, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, c)


# ----------------------------------------------------------------------------- spectral norm

def _normalize(v: jax.Array) -> jax.Array:
    return v / (jnp.linalg.norm(v.reshape(-1)) + 1e-12)


def _linear_op(kernel: jax.Array, u: jax.Array, precision=None) -> jax.Array:
    """The conv's linear part (no bias): u [1, H, W, Cin] for k x k kernels, u [Cin] for 1x1 as a matrix."""
    if u.ndim == 1:
        return jnp.dot(u, kernel.reshape(-1, kernel.shape[-1]), precision=precision)
    ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
    return jax.lax.conv_general_dilated(u, kernel, (1, 1), ((ph, ph), (pw, pw)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)


def power_iteration(kernel: jax.Array, u: jax.Array, n_iter, precision=None) -> jax.Array:
    """n_iter steps u <- normalise(A^T normalise(A u)) for the conv operator A; returns the unit u."""
    op = lambda t: _linear_op(kernel, t, precision)  # noqa: E731
    op_t = jax.linear_transpose(op, u)

    def step(_, u):
        v = _normalize(op(u))
        return _normalize(op_t(v)[0])

    return jax.lax.fori_loop(0, n_iter, step, _normalize(u))


_power_iteration_jit = jax.jit(power_iteration, static_argnames=("precision",))


def spectral_scale(sigma: jax.Array, coeff: float) -> jax.Array:
    """coeff / sigma where sigma > coeff, else 1: only kernels that are too large are scaled."""
    return jnp.where(sigma > coeff, coeff / jnp.maximum(sigma, 1e-12), 1.0)


class SNConv(nnx.Module):
    """Stride-1 "SAME" conv whose kernel is spectrally normalised to operator norm <= coeff."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, spatial: tuple[int, int], *,
                 coeff: float, n_power_iter: int, precision=None, rngs: nnx.Rngs):
        if kernel_size not in (1, 3):
            raise ValueError(f"kernel_size must be 1 or 3, got {kernel_size}")
        self.coeff, self.n_power_iter, self.precision = float(coeff), int(n_power_iter), precision
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (kernel_size, kernel_size, in_channels, out_channels)))
        self.bias = nnx.Param(jnp.zeros((out_channels,)))
        u_shape = (in_channels,) if kernel_size == 1 else (1, *spatial, in_channels)
        self.u = SpectralVector(_normalize(jax.random.normal(rngs.params(), u_shape)))

    def sigma(self) -> jax.Array:
        """Operator-norm estimate ||A u|| from the stored (unit) power-iteration vector."""
        return jnp.linalg.norm(_linear_op(self.kernel[...], _normalize(self.u[...]), self.precision).reshape(-1))

    def power_iterate(self, n_iter: int) -> jax.Array:
        """Advance the stored vector by n_iter steps; returns the new sigma estimate."""
        self.u[...] = jax.lax.stop_gradient(
            _power_iteration_jit(self.kernel[...], self.u[...], n_iter, precision=self.precision))
        return self.sigma()

    def normalized_kernel(self, update: bool = False) -> jax.Array:
        """The kernel actually applied: kernel * min(1, coeff / sigma). update=True advances u first."""
        kernel = self.kernel[...]
        u = self.u[...]
        if update and self.n_power_iter > 0:  # no gradient through the iteration itself
            u = power_iteration(jax.lax.stop_gradient(kernel), u, self.n_power_iter, self.precision)
            self.u[...] = u
        sigma = jnp.linalg.norm(_linear_op(kernel, _normalize(u), self.precision).reshape(-1))
        return kernel * spectral_scale(sigma, self.coeff)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return _conv(x, self.normalized_kernel(update=train), self.bias[...], self.precision)


def _conv(x, kernel, bias, precision):
    ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((ph, ph), (pw, pw)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    return y + bias


# ----------------------------------------------------------------------------- blocks

class ActNorm(nnx.Module):
    """y = (x + bias) * exp(log_scale), per channel: invertible for any parameter values.

    `initialize(x)` sets the parameters from a batch (data-dependent init, as in Glow) so that the
    output has zero mean and unit variance per channel.
    """

    def __init__(self, channels: int):
        self.bias = nnx.Param(jnp.zeros((channels,)))
        self.log_scale = nnx.Param(jnp.zeros((channels,)))

    def __call__(self, x):
        return (x + self.bias[...]) * jnp.exp(self.log_scale[...])

    def inverse(self, y):
        return y * jnp.exp(-self.log_scale[...]) - self.bias[...]

    def initialize(self, x, eps: float = 1e-6):
        """Channels with (near) zero spread, e.g. injective zero padding, keep scale 1."""
        mean = jnp.mean(x, axis=(0, 1, 2))
        std = jnp.std(x, axis=(0, 1, 2))
        self.bias[...] = -mean
        self.log_scale[...] = jnp.where(std > eps, -jnp.log(jnp.maximum(std, eps)), 0.0)


def _fixed_point(branch, y, tol: float, max_iter: int):
    """Solve x + branch(x) = y per sample by x <- y - branch(x); converged samples stop moving."""
    n = y.shape[0]

    def norms(t):
        return jnp.sqrt(jnp.sum(jnp.square(t.reshape(n, -1)), axis=1))

    def cond(state):
        it, _, done, _, _ = state
        return (it < max_iter) & ~jnp.all(done)

    def body(state):
        it, x, done, iters, res = state
        x_new = y - branch(x)
        r = norms(x_new - x) / (norms(x_new) + 1e-12)
        x = jnp.where(done[:, None, None, None], x, x_new)
        res = jnp.where(done, res, r)
        iters = iters + (~done).astype(jnp.int32)
        done = done | (r <= tol)
        return it + 1, x, done, iters, res

    state = (jnp.asarray(0), y, jnp.zeros((n,), bool), jnp.zeros((n,), jnp.int32), jnp.full((n,), jnp.inf, y.dtype))
    _, x, done, iters, res = jax.lax.while_loop(cond, body, state)
    return x, done, iters, res


class InvertibleBlock(nnx.Module):
    """[ActNorm] then y = x + F(x), F = [ELU] SNConv3x3 -> ELU -> SNConv1x1 -> ELU -> SNConv3x3."""

    def __init__(self, channels: int, hidden_channels: int, spatial: tuple[int, int], *, coeff: float,
                 n_power_iter: int, actnorm: bool = True, preactivation: bool = True, precision=None,
                 rngs: nnx.Rngs):
        kw = dict(coeff=coeff, n_power_iter=n_power_iter, precision=precision, rngs=rngs)
        self.actnorm = ActNorm(channels) if actnorm else None
        self.preactivation = bool(preactivation)
        self.precision = precision
        self.conv1 = SNConv(channels, hidden_channels, 3, spatial, **kw)
        self.conv2 = SNConv(hidden_channels, hidden_channels, 1, spatial, **kw)
        self.conv3 = SNConv(hidden_channels, channels, 3, spatial, **kw)

    @property
    def convs(self) -> tuple[SNConv, SNConv, SNConv]:
        return (self.conv1, self.conv2, self.conv3)

    def branch_params(self, train: bool = False):
        """((kernel, bias) x 3) with normalised kernels; train=True advances the power iterations."""
        return tuple((c.normalized_kernel(update=train), c.bias[...]) for c in self.convs)

    def _branch(self, params, x):
        (k1, b1), (k2, b2), (k3, b3) = params
        h = jax.nn.elu(x) if self.preactivation else x
        h = jax.nn.elu(_conv(h, k1, b1, self.precision))
        h = jax.nn.elu(_conv(h, k2, b2, self.precision))
        return _conv(h, k3, b3, self.precision)

    def residual(self, x: jax.Array) -> jax.Array:
        """F(x) with the eval-mode weights (the contraction whose Lipschitz constant is < 1)."""
        return self._branch(self.branch_params(False), x)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.actnorm is not None:
            x = self.actnorm(x)
        return x + self._branch(self.branch_params(train), x)

    def inverse(self, y: jax.Array, tol: float = 1e-5, max_iter: int = 100):
        """x with block(x) = y: (x, converged [N], iterations [N], final relative step [N])."""
        params = self.branch_params(False)
        x, done, iters, res = _fixed_point(lambda t: self._branch(params, t), y, tol, max_iter)
        if self.actnorm is not None:
            x = self.actnorm.inverse(x)
        return x, done, iters, res


# ----------------------------------------------------------------------------- network

class IResNet(nnx.Module):
    """i-ResNet classifier: `forward(x) -> z` (invertible), `head(z) -> logits`, `inverse(z) -> (x, info)`.

    Args:
      in_shape: (H, W, C) of the input images (fixed: the spectral norms of the 3x3 convs are
        computed at these sizes). H and W must be divisible by 2**(number of squeezes).
      num_classes: size of the linear head.
      blocks_per_stage: blocks in each stage; a squeeze precedes every stage but the first.
      channels: channels of stage 1 after the injective zero padding (>= C, or 4C with
        init_squeeze); stage s has channels * 4**(s-1).
      hidden_channels: width inside F per stage (int or one per stage; default: the stage's channels).
      init_squeeze: squeeze the input once before padding (as i-ResNet does on CIFAR).
      coeff: Lipschitz bound of each conv (< 1).
      n_power_iter: power-iteration steps per training forward pass.
      actnorm / preactivation: ActNorm before each block / ELU before the first conv of F.
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int, *, blocks_per_stage: Sequence[int] = (4, 4, 4),
                 channels: int = 16, hidden_channels: int | Sequence[int] | None = None, init_squeeze: bool = True,
                 coeff: float = 0.9, n_power_iter: int = 5, actnorm: bool = True, preactivation: bool = True,
                 precision: Any = None, rngs: nnx.Rngs):
        if len(in_shape) != 3:
            raise ValueError(f"in_shape must be (H, W, C), got {in_shape}")
        h, w, c = (int(v) for v in in_shape)
        blocks_per_stage = tuple(int(b) for b in blocks_per_stage)
        if not blocks_per_stage or min(blocks_per_stage) < 1:
            raise ValueError(f"blocks_per_stage must be a non-empty sequence of positive ints, got {blocks_per_stage}")
        if not 0.0 < coeff < 1.0:
            raise ValueError(f"coeff must lie in (0, 1) for the blocks to be invertible, got {coeff}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        n_stages = len(blocks_per_stage)
        n_squeeze = n_stages - 1 + int(init_squeeze)
        if h % 2 ** n_squeeze or w % 2 ** n_squeeze:
            raise ValueError(f"in_shape {h}x{w} must be divisible by 2**{n_squeeze} ({n_squeeze} squeezes)")
        c_embed = c * (4 if init_squeeze else 1)
        if channels < c_embed:
            raise ValueError(f"channels={channels} is smaller than the {c_embed} input channels"
                             f"{' after the initial squeeze' if init_squeeze else ''}: zero padding cannot shrink")
        stage_channels = tuple(channels * 4 ** s for s in range(n_stages))
        if hidden_channels is None:
            hidden = stage_channels
        elif isinstance(hidden_channels, int):
            hidden = (hidden_channels,) * n_stages
        else:
            hidden = tuple(int(v) for v in hidden_channels)
            if len(hidden) != n_stages:
                raise ValueError(f"hidden_channels has {len(hidden)} entries for {n_stages} stages")

        self.in_shape = (h, w, c)
        self.num_classes = int(num_classes)
        self.init_squeeze = bool(init_squeeze)
        self.channels = int(channels)
        self.embed_channels = c_embed
        self.coeff = float(coeff)
        self.n_power_iter = int(n_power_iter)
        stages = []
        sh, sw = (h // 2, w // 2) if init_squeeze else (h, w)
        for s, n_blocks in enumerate(blocks_per_stage):
            if s > 0:
                sh, sw = sh // 2, sw // 2
            stages.append(nnx.List([
                InvertibleBlock(stage_channels[s], hidden[s], (sh, sw), coeff=coeff, n_power_iter=n_power_iter,
                                actnorm=actnorm, preactivation=preactivation, precision=precision, rngs=rngs)
                for _ in range(n_blocks)]))
        self.stages = nnx.List(stages)
        self.z_shape = (sh, sw, stage_channels[-1])
        self.head_bn = nnx.BatchNorm(stage_channels[-1], momentum=BN_MOMENTUM, epsilon=1e-5,
                                     use_fast_variance=False, rngs=rngs)
        self.head_fc = nnx.Linear(stage_channels[-1], num_classes, precision=precision, rngs=rngs)

    # -- helpers
    def blocks(self) -> list[InvertibleBlock]:
        return [b for stage in self.stages for b in stage]

    def sn_convs(self) -> list[SNConv]:
        return [c for b in self.blocks() for c in b.convs]

    def _check(self, x, shape, what):
        x = jnp.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
            raise ValueError(f"{what} must have shape [N, {', '.join(map(str, shape))}], got {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{what} must be floating point, got {x.dtype}")
        return x

    def _embed(self, x):
        x = self._check(x, self.in_shape, "i-ResNet input")
        if self.init_squeeze:
            x = squeeze(x)
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.channels - self.embed_channels)))

    # -- API
    def forward(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Images [N, H, W, C] -> invertible feature map z [N, *z_shape]."""
        x = self._embed(x)
        for s, stage in enumerate(self.stages):
            if s > 0:
                x = squeeze(x)
            for block in stage:
                x = block(x, train)
        return x

    def stage_outputs(self, x: jax.Array) -> dict[str, jax.Array]:
        """{"stage1": ..., "stage<S>": z}: each stage's output in eval mode, for the activation maps."""
        x = self._embed(x)
        out = {}
        for s, stage in enumerate(self.stages):
            if s > 0:
                x = squeeze(x)
            for block in stage:
                x = block(x, False)
            out[f"stage{s + 1}"] = x
        return out

    def head(self, z: jax.Array, train: bool = False) -> jax.Array:
        """z -> logits: BN -> ReLU -> global average pool -> linear (not invertible)."""
        return self.head_fc(self.pool(z, train))

    def pool(self, z: jax.Array, train: bool = False) -> jax.Array:
        """z -> the penultimate vector the linear layer reads: BN -> ReLU -> global average pool."""
        z = self._check(z, self.z_shape, "z")
        return jnp.mean(jax.nn.relu(self.head_bn(z, use_running_average=not train)), axis=(1, 2))

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.head(self.forward(x, train), train)

    def inverse(self, z: jax.Array, tol: float = 1e-5, max_iter: int = 100) -> tuple[jax.Array, dict]:
        """x with forward(x) = z by per-block fixed-point iteration; see the module docstring for info.

        tol and max_iter may be traced values (one compilation serves every setting under jit).
        """
        if isinstance(tol, (int, float)) and tol <= 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        if isinstance(max_iter, int) and max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        z = self._check(z, self.z_shape, "z")
        n = z.shape[0]
        converged = jnp.ones((n,), bool)
        iterations = jnp.zeros((n,), jnp.int32)
        max_residual = jnp.zeros((n,), z.dtype)
        x = z
        for s in reversed(range(len(self.stages))):
            for block in reversed(list(self.stages[s])):
                x, done, iters, res = block.inverse(x, tol, max_iter)
                converged = converged & done
                iterations = iterations + iters
                max_residual = jnp.maximum(max_residual, res)
            if s > 0:
                x = unsqueeze(x)
        x = x[..., : self.embed_channels]
        if self.init_squeeze:
            x = unsqueeze(x)
        return x, {"converged": converged, "iterations": iterations, "max_residual": max_residual}

    def update_spectral_norms(self, n_iter: int) -> jax.Array:
        """Run n_iter power-iteration steps on every conv (one compiled call); returns the sigma
        estimates [num_convs] in `sn_convs()` order."""
        return _update_spectral_norms(self, jnp.asarray(n_iter, jnp.int32))

    def initialize_actnorm(self, x: jax.Array) -> None:
        """Data-dependent ActNorm init: each ActNorm normalises the batch that reaches it."""
        h = self._embed(x)
        for s, stage in enumerate(self.stages):
            if s > 0:
                h = squeeze(h)
            for block in stage:
                if block.actnorm is not None:
                    block.actnorm.initialize(h)
                h = block(h)


@nnx.jit
def _update_spectral_norms(model: IResNet, n_iter: jax.Array) -> jax.Array:
    return jnp.stack([conv.power_iterate(n_iter) for conv in model.sn_convs()])
