"""The polyphase XLA path of the resampling convolution against float64 direct loops.

Values against a numpy loop over the zero-inserted, padded signal; first derivatives (x and the
weight) against the numpy adjoint loops; second derivatives against XLA's autodiff of the textbook
dilated form, in float64; odd sizes, every up/down the models use and a few they do not.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_reference import rel_err
from viscoin_jax.kernels import modulated_conv2d, setup_filter
from viscoin_jax.kernels.conv2d_resample import dilated_conv, polyphase_conv

# (x shape, kernel (kh, kw), Cout, up, down, pads (x0, x1, y0, y1))
CASES = [
    ((2, 5, 7, 3), (3, 3), 4, 2, 1, (3, 3, 3, 3)),   # the G up-sampling layer's geometry
    ((1, 9, 7, 2), (3, 3), 3, 1, 2, (0, 0, 0, 0)),   # the D down-sampling conv (after the blur)
    ((2, 7, 6, 3), (3, 3), 2, 1, 1, (1, 1, 1, 1)),   # plain 3x3, same size
    ((1, 6, 5, 2), (1, 1), 5, 1, 1, (0, 0, 0, 0)),   # 1x1 (toRGB)
    ((1, 4, 6, 3), (4, 3), 2, 3, 1, (2, 1, 3, 0)),   # up 3, non-square kernel, uneven pads
    ((2, 11, 9, 2), (3, 2), 3, 1, 3, (1, 2, 2, 0)),  # down 3
    ((1, 8, 7, 2), (3, 3), 2, 1, 1, (-1, 2, 0, -1)),  # negative pads crop
]


def _pad_zero_insert(x, up, pads):
    n, h, w, c = x.shape
    px0, px1, py0, py1 = pads
    u = np.zeros((n, h * up, w * up, c))
    u[:, ::up, ::up] = x
    v = np.zeros((n, h * up + py0 + py1, w * up + px0 + px1, c))
    for i in range(v.shape[1]):
        for j in range(v.shape[2]):
            si, sj = i - py0, j - px0
            if 0 <= si < h * up and 0 <= sj < w * up:
                v[:, i, j] = u[:, si, sj]
    return v


def conv_np(x, w, up, down, pads):
    v = _pad_zero_insert(np.asarray(x, np.float64), up, pads)
    kh, kw = w.shape[:2]
    ho, wo = (v.shape[1] - kh) // down + 1, (v.shape[2] - kw) // down + 1
    y = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for i in range(ho):
        for j in range(wo):
            y[:, i, j] = np.einsum("nhwc,hwco->no", v[:, i * down:i * down + kh, j * down:j * down + kw], w)
    return y


def conv_np_adjoints(x, w, g, up, down, pads):
    """d<conv(x, w), g>/dx and /dw by direct loops (the adjoint scatters g back over the windows)."""
    n, h, wd, c = x.shape
    kh, kw = w.shape[:2]
    px0, _, py0, _ = pads
    v = _pad_zero_insert(np.asarray(x, np.float64), up, pads)
    dv = np.zeros_like(v)
    dw = np.zeros(w.shape)
    for i in range(g.shape[1]):
        for j in range(g.shape[2]):
            win = v[:, i * down:i * down + kh, j * down:j * down + kw]
            dw += np.einsum("nhwc,no->hwco", win, g[:, i, j])
            dv[:, i * down:i * down + kh, j * down:j * down + kw] += np.einsum("hwco,no->nhwc", w, g[:, i, j])
    dx = np.zeros(x.shape)
    for i in range(h):
        for j in range(wd):
            vi, vj = i * up + py0, j * up + px0
            if 0 <= vi < v.shape[1] and 0 <= vj < v.shape[2]:
                dx[:, i, j] = dv[:, vi, vj]
    return dx, dw


def _inputs(case, seed, dtype=np.float64):
    shape, (kh, kw), cout, up, down, pads = CASES[case]
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape).astype(dtype),
            rng.standard_normal((kh, kw, shape[-1], cout)).astype(dtype), up, down, pads)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_values_match_direct_loop(case):
    x, w, up, down, pads = _inputs(case, seed=100 + case)
    expected = conv_np(x, w, up, down, pads)
    with jax.enable_x64(True):
        got = np.asarray(polyphase_conv(jnp.asarray(x), jnp.asarray(w), up, down, pads))
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-12
    got32 = polyphase_conv(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), up, down, pads)
    assert got32.dtype == jnp.float32 and rel_err(got32, expected) < 1e-5


@pytest.mark.parametrize("case", range(len(CASES)))
def test_first_derivatives_match_adjoint_loops(case):
    x, w, up, down, pads = _inputs(case, seed=200 + case)
    g = np.random.default_rng(300 + case).standard_normal(conv_np(x, w, up, down, pads).shape)
    dx_np, dw_np = conv_np_adjoints(x, w, g, up, down, pads)
    with jax.enable_x64(True):
        dx, dw = jax.grad(lambda x, w: jnp.sum(polyphase_conv(x, w, up, down, pads) * g),
                          argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
    assert rel_err(dx, dx_np) < 1e-12
    assert rel_err(dw, dw_np) < 1e-12


@pytest.mark.parametrize("case", [0, 1, 2, 4])
def test_second_derivatives_match_dilated_form(case):
    # R1 / path-length shape: the gradient of a squared-gradient norm, w.r.t. the other operand.
    x, w, up, down, pads = _inputs(case, seed=400 + case)

    def second(conv, x, w):
        gx = jax.grad(lambda x: jnp.sum(jnp.sin(conv(x, w, up, down, pads))))(x)
        gw = jax.grad(lambda w: jnp.sum(jnp.cos(conv(x, w, up, down, pads))))(w)
        return jnp.sum(gx ** 2) + jnp.sum(gw ** 2)

    with jax.enable_x64(True):
        args = (jnp.asarray(x), jnp.asarray(w))
        got = jax.grad(lambda *a: second(polyphase_conv, *a), argnums=(0, 1))(*args)
        expected = jax.grad(lambda *a: second(dilated_conv, *a), argnums=(0, 1))(*args)
    for g, e in zip(got, expected):
        assert rel_err(g, e) < 1e-10


@pytest.mark.parametrize("up, down", [(1, 1), (2, 1), (1, 2)])
def test_all_zero_styles_stay_finite(up, down):
    # Demodulation divides by sqrt(sum (w * s)^2 + 1e-8): with every style zero, the output is zero
    # and every gradient finite only because of the 1e-8.
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 7, 5, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
    s = jnp.zeros((2, 3), jnp.float32)
    f = setup_filter([1, 3, 3, 1]) if up > 1 or down > 1 else None
    op = lambda x, w, s: modulated_conv2d(x, w, s, True, up, down, 1 if up == down == 1 else 0, f, impl="xla")
    y = op(x, w, s)
    assert np.all(np.isfinite(y)) and np.all(y == 0)  # x * s = 0 everywhere
    grads = jax.grad(lambda *a: jnp.sum(jnp.sin(op(*a) + 0.3)), argnums=(0, 1, 2))(x, w, s)
    second = jax.grad(lambda s: jnp.sum(jax.grad(lambda x: jnp.sum(op(x, w, s) ** 2))(x) ** 2))(s)
    for g in (*grads, second):
        assert np.all(np.isfinite(np.asarray(g)))
    # d y / d s at s = 0 is w * x / sqrt(1e-8) per output: large but finite, and nonzero.
    assert np.max(np.abs(np.asarray(grads[2]))) > 0
