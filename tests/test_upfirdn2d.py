"""upfirdn2d under every CPU impl against a direct float64 numpy loop, plus gradients and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kernel_reference import rel_err, upfirdn2d_np
from viscoin_jax.kernels import (downsample2d, filter2d, setup_filter, upfirdn2d, upfirdn2d_reference,
                                 upsample2d)

IMPLS = ["xla", "interpret", "tpu_interpret"]
FIR = [1.0, 3.0, 3.0, 1.0]
F2D = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 1.0, 1.0]])

# (shape, filter, up, down, padding as given to the op, numpy padding, flip, gain)
CASES = [
    ((2, 5, 7, 3), FIR, 1, 1, (1, 2, 0, 1), False, 1.0),
    ((1, 6, 5, 4), FIR, 2, 1, (2, 1, 2, 1), False, 4.0),
    ((1, 7, 9, 3), [1.0, 2.0, 1.0], 1, 2, 1, True, 1.0),
    ((2, 8, 6, 2), F2D, (2, 1), (1, 2), (-1, 2, 1, -2), False, 1.5),
    ((1, 9, 8, 5), FIR, 2, 2, (1, 1), False, 1.0),
    ((1, 5, 5, 33), FIR, 1, 2, (2, 1, 2, 1), False, 1.0),
    ((3, 4, 11, 1), F2D, 2, 1, (0, -1, 3, 0), True, 2.0),
    ((1, 3, 3, 6), [2.0], 3, 1, 0, False, 1.0),
]


def _np_args(up, down, padding):
    as_pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    if isinstance(padding, int):
        padding = (padding,) * 4
    elif len(padding) == 2:
        padding = (padding[0], padding[0], padding[1], padding[1])
    return as_pair(up), as_pair(down), tuple(padding)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_numpy_float32(impl, case):
    shape, f, up, down, padding, flip, gain = CASES[case]
    rng = np.random.default_rng(case)
    x = rng.standard_normal(shape).astype(np.float32)
    expected = upfirdn2d_np(x, f, *_np_args(up, down, padding), flip_filter=flip, gain=gain)
    y = upfirdn2d(jnp.asarray(x), jnp.asarray(f, jnp.float32), up, down, padding, flip, gain, impl=impl)
    assert y.shape == expected.shape and y.dtype == jnp.float32
    assert rel_err(y, expected) < 1e-5


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_matches_numpy_bfloat16(impl):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 9, 6, 4)).astype(np.float32)
    xb = jnp.asarray(x, jnp.bfloat16)
    expected = upfirdn2d_np(np.asarray(xb.astype(jnp.float32)), FIR, (2, 2), (1, 1), (2, 1, 2, 1), gain=4.0)
    y = upfirdn2d(xb, jnp.asarray(FIR), up=2, padding=(2, 1, 2, 1), gain=4.0, impl=impl)
    assert y.dtype == jnp.bfloat16
    assert rel_err(y.astype(jnp.float32), expected) < 1e-2


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_resampling_helpers(impl):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 10, 3)).astype(np.float32)
    f = setup_filter(FIR)  # normalised 2-D [1,3,3,1] outer product
    up = upsample2d(jnp.asarray(x), f, impl=impl)
    assert up.shape == (2, 12, 20, 3)
    assert rel_err(up, upfirdn2d_np(x, f, (2, 2), (1, 1), (2, 1, 2, 1), gain=4.0)) < 1e-5
    # A constant image stays constant in the interior: the gain up**2 preserves the mean.
    ones = upsample2d(jnp.ones((1, 8, 8, 1)), f, impl=impl)
    np.testing.assert_allclose(np.asarray(ones)[0, 3:-3, 3:-3, 0], 1.0, rtol=1e-6)
    down = downsample2d(jnp.asarray(x), f, impl=impl)
    assert down.shape == (2, 3, 5, 3)
    assert rel_err(down, upfirdn2d_np(x, f, (1, 1), (2, 2), (1, 1, 1, 1))) < 1e-5
    same = filter2d(jnp.asarray(x), f, impl=impl)
    assert same.shape == x.shape
    assert rel_err(same, upfirdn2d_np(x, f, pad=(2, 1, 2, 1))) < 1e-5


def test_setup_filter_matches_reference_conventions():
    f = setup_filter([1, 3, 3, 1])
    np.testing.assert_allclose(f, np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0)
    sep = setup_filter(np.ones(8), gain=4.0)  # >= 8 taps stays separable; gain per dimension
    assert sep.shape == (8,)
    np.testing.assert_allclose(sep, np.full(8, 2.0 / 8.0))


@pytest.mark.parametrize("case", [1, 3, 4])
def test_gradients_match_autodiff_of_reference(case):
    shape, f, up, down, padding, flip, gain = CASES[case]
    rng = np.random.default_rng(100 + case)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    f = jnp.asarray(f, jnp.float32)

    def loss(op, x, f, **kw):
        return jnp.sum(jnp.sin(op(x, f, up, down, padding, flip, gain, **kw)))

    expected = jax.grad(lambda x, f: loss(upfirdn2d_reference, x, f), argnums=(0, 1))(x, f)
    for impl in ("xla", "interpret"):
        got = jax.grad(lambda x, f: loss(upfirdn2d, x, f, impl=impl), argnums=(0, 1))(x, f)
        for g, e in zip(got, expected):
            assert rel_err(g, e) < 1e-5, impl


def test_gradients_against_finite_differences():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((1, 5, 4, 2)), jnp.float32)
    f = jnp.asarray(FIR)
    for up, down in ((2, 1), (1, 2)):
        op = lambda x: upfirdn2d(x, f, up=up, down=down, padding=(1, 2, 2, 1), impl="interpret")
        check_grads(op, (x,), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("case", [1, 2, 3, 6])
def test_reference_gradients_against_finite_differences(case):
    # The XLA path (shifted-slice taps) differentiated by autodiff, in x and in the filter, checked
    # against finite differences rather than against another autodiff.
    shape, f, up, down, padding, flip, gain = CASES[case]
    rng = np.random.default_rng(200 + case)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    op = lambda x, f: upfirdn2d_reference(x, f, up, down, padding, flip, gain)
    check_grads(op, (x, jnp.asarray(f, jnp.float32)), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)


def test_second_order_gradient_matches_reference():
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((2, 5, 6, 3)), jnp.float32)
    f = jnp.asarray(FIR)

    def grad_norm(op, x, **kw):
        g = jax.grad(lambda x: jnp.sum(jnp.sin(op(x, f, 2, 1, (2, 1, 2, 1), False, 4.0, **kw))))(x)
        return jnp.sum(g ** 2)

    expected = jax.grad(lambda x: grad_norm(upfirdn2d_reference, x))(x)
    got = jax.grad(lambda x: grad_norm(upfirdn2d, x, impl="interpret"))(x)
    assert rel_err(got, expected) < 1e-5


def test_jit_and_vmap():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 2, 7, 5, 2)), jnp.float32)
    f = jnp.asarray(FIR)
    op = jax.jit(jax.vmap(lambda x: upfirdn2d(x, f, down=2, padding=1, impl="interpret")))
    y = op(x)
    for i in range(3):
        np.testing.assert_allclose(y[i], upfirdn2d_np(np.asarray(x[i]), FIR, down=(2, 2), pad=(1,) * 4),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=np.zeros((4, 4, 3), np.float32)), "x must be a 4-D"),
        (dict(x=np.zeros((1, 4, 4, 3), np.int32)), "x must be float32"),
        (dict(up=0), "up must be positive"),
        (dict(down=(1, 2, 3)), "down must be an int or an"),
        (dict(f=np.zeros((2, 2, 2))), "f must be a 1-D"),
        (dict(impl="cuda"), "impl must be one of"),
        (dict(padding=(1, 2, 3)), "padding must be"),
        (dict(padding=-4), "smaller than the filter"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    args = dict(x=np.zeros((1, 4, 4, 3), np.float32), f=np.asarray(FIR, np.float32))
    args.update(kwargs)
    x = args.pop("x")
    f = args.pop("f")
    with pytest.raises(ValueError, match=match):
        upfirdn2d(jnp.asarray(x), f, **args)
