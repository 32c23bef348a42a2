"""modulated_conv2d under every CPU impl against the float64 numpy definition, gradients, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kernel_reference import modulated_conv2d_np, rel_err
from viscoin_jax.kernels import (modulated_conv2d, modulated_conv2d_grouped_reference,
                                 modulated_conv2d_reference, setup_filter)

IMPLS = ["xla", "interpret", "tpu_interpret"]
FIR = setup_filter([1, 3, 3, 1])

# (x shape [N, H, W, Cin], kernel size, Cout, up, down, padding, demodulate)
CASES = [
    ((2, 7, 5, 3), 3, 4, 1, 1, 1, True),     # plain 3x3, odd non-square image
    ((2, 5, 6, 4), 3, 3, 2, 1, 0, True),     # StyleGAN2 up-sampling layer (padding from the filter)
    ((1, 9, 7, 3), 3, 5, 1, 2, 0, True),     # down-sampling conv (blur + stride 2)
    ((3, 4, 4, 5), 1, 3, 1, 1, 0, False),    # toRGB-like 1x1, no demodulation
    ((1, 6, 5, 2), 3, 2, 1, 1, 0, False),    # valid conv (no padding), output shrinks
    ((2, 3, 5, 33), 3, 7, 2, 1, 0, False),   # odd channel counts, up without demodulation
]


def _inputs(case, seed, dtype=np.float32):
    shape, k, cout, *_ = CASES[case]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((k, k, shape[-1], cout)).astype(dtype)
    s = (rng.standard_normal((shape[0], shape[-1])) * 0.5 + 1.0).astype(dtype)
    return x, w, s


def _run(case, x, w, s, impl, **kw):
    _, _, _, up, down, padding, demod = CASES[case]
    f = FIR if (up > 1 or down > 1) else None
    return modulated_conv2d(jnp.asarray(x), jnp.asarray(w), jnp.asarray(s), demod, up, down, padding,
                            f, impl=impl, **kw)


def _expected(case, x, w, s):
    _, _, _, up, down, padding, demod = CASES[case]
    f = FIR if (up > 1 or down > 1) else None
    return modulated_conv2d_np(x, w, s, demod, up, down, padding, f)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_numpy_float32(impl, case):
    x, w, s = _inputs(case, seed=case)
    y = _run(case, x, w, s, impl)
    expected = _expected(case, x, w, s)
    assert y.shape == expected.shape and y.dtype == jnp.float32
    assert rel_err(y, expected) < 1e-5


@pytest.mark.parametrize("case", [0, 1, 2])
def test_grouped_reference_equals_definition(case):
    x, w, s = _inputs(case, seed=40 + case)
    _, _, _, up, down, padding, demod = CASES[case]
    f = FIR if (up > 1 or down > 1) else None
    y = modulated_conv2d_grouped_reference(jnp.asarray(x), jnp.asarray(w), jnp.asarray(s), demod, up,
                                           down, padding, f)
    assert rel_err(y, _expected(case, x, w, s)) < 1e-5


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_matches_numpy_bfloat16(impl):
    x, w, s = _inputs(1, seed=9)
    xb, wb, sb = (jnp.asarray(a, jnp.bfloat16) for a in (x, w, s))
    expected = _expected(1, *(np.asarray(a.astype(jnp.float32)) for a in (xb, wb, sb)))
    y = _run(1, xb, wb, sb, impl)
    assert y.dtype == jnp.bfloat16
    assert rel_err(y.astype(jnp.float32), expected) < 2e-2


def test_demodulated_output_has_unit_weight_norm():
    # With demodulation, scaling a sample's styles by a constant leaves its output unchanged.
    x, w, s = _inputs(0, seed=3)
    for impl in ("xla", "interpret"):
        y1 = _run(0, x, w, s, impl)
        y2 = _run(0, x, w, s * np.array([[3.0], [0.25]], np.float32), impl)
        assert rel_err(y2, y1) < 1e-5


@pytest.mark.parametrize("case", [0, 1, 2, 3])
def test_gradients_match_autodiff_of_reference(case):
    x, w, s = (jnp.asarray(a) for a in _inputs(case, seed=60 + case))
    _, _, _, up, down, padding, demod = CASES[case]
    f = FIR if (up > 1 or down > 1) else None

    def loss(op, x, w, s, **kw):
        return jnp.sum(jnp.sin(op(x, w, s, demod, up, down, padding, f, **kw)))

    expected = jax.grad(lambda *a: loss(modulated_conv2d_reference, *a), argnums=(0, 1, 2))(x, w, s)
    got = jax.grad(lambda *a: loss(modulated_conv2d, *a, impl="interpret"), argnums=(0, 1, 2))(x, w, s)
    for name, g, e in zip("xws", got, expected):
        assert rel_err(g, e) < 1e-4, name


def test_gradients_against_finite_differences():
    x, w, s = (jnp.asarray(a, jnp.float32) for a in _inputs(1, seed=5))
    x, s = x[:1, :3, :3], s[:1]
    op = lambda x, w, s: modulated_conv2d(x, w, s, up=2, impl="interpret")
    check_grads(op, (x, w, s), order=1, modes=("rev",), atol=3e-2, rtol=3e-2)


def test_second_order_gradient_matches_reference():
    # Path-length-style: gradient of a gradient norm, through the Pallas weight-grad custom_vjp.
    x, w, s = (jnp.asarray(a) for a in _inputs(1, seed=13))

    def pl(op, w, **kw):
        g = jax.grad(lambda s: jnp.sum(jnp.cos(op(x, w, s, True, 2, 1, 0, FIR, **kw))))(s)
        return jnp.sum(g ** 2)

    expected = jax.grad(lambda w: pl(modulated_conv2d_reference, w))(w)
    got = jax.grad(lambda w: pl(modulated_conv2d, w, impl="interpret"))(w)
    assert rel_err(got, expected) < 1e-4


def test_jit_matches_eager():
    x, w, s = (jnp.asarray(a) for a in _inputs(2, seed=21))
    eager = modulated_conv2d(x, w, s, down=2, impl="interpret")
    jitted = jax.jit(lambda x, w, s: modulated_conv2d(x, w, s, down=2, impl="interpret"))(x, w, s)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=np.zeros((4, 4, 3), np.float32)), "x must be"),
        (dict(weight=np.zeros((3, 3, 3), np.float32)), "weight must be"),
        (dict(styles=np.zeros((1, 5), np.float32)), "styles"),
        (dict(weight=np.zeros((3, 3, 4, 2), np.float32)), "input channels"),
        (dict(up=0), "up must be"),
        (dict(down=-1), "down must be"),
        (dict(impl="triton"), "impl must be one of"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    args = dict(x=np.zeros((1, 6, 6, 3), np.float32), weight=np.zeros((3, 3, 3, 2), np.float32),
                styles=np.ones((1, 3), np.float32))
    args.update(kwargs)
    x, w, s = (jnp.asarray(args.pop(k)) for k in ("x", "weight", "styles"))
    with pytest.raises(ValueError, match=match):
        modulated_conv2d(x, w, s, padding=1, **args)
