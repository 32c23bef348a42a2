"""The Pallas kernels on the accelerator itself against the XLA path on the same device: forward,
first and second order, float32 and bfloat16, fresh random inputs of odd sizes. Skipped where JAX
sees no GPU or TPU (CI); `launch/device_check.sh` runs it on a lent machine. On CPU the same kernels
are checked in interpret mode (test_modulated_conv2d.py, test_upfirdn2d.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from viscoin_jax.kernels import modulated_conv2d, setup_filter, upfirdn2d

pytestmark = pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"),
                                reason="needs a GPU or TPU (JAX's default backend is CPU)")

# float32: both paths at "highest" precision (conftest sets it), so only the summation order differs
TOL = {jnp.float32: dict(rtol=2e-4, atol=2e-4), jnp.bfloat16: dict(rtol=3e-2, atol=3e-2)}
# at the platform's default precision (TF32 on NVIDIA Ampere and newer, bf16 passes on TPU) both paths
# round their inputs to a 10-bit (TF32) or 8-bit (bf16) mantissa
DEFAULT_PRECISION_TOL = dict(rtol=3e-2, atol=3e-2)
CONV_CASES = [  # (N, H, W, Cin, Cout, k, up, down)
    (3, 13, 11, 24, 40, 3, 1, 1), (2, 9, 7, 32, 16, 3, 2, 1), (2, 17, 15, 16, 24, 3, 1, 2), (1, 8, 8, 64, 64, 1, 1, 1),
]
FIR_CASES = [  # (N, H, W, C, up, down, padding)
    (3, 13, 11, 5, 1, 1, 1), (2, 9, 7, 32, 2, 1, (2, 1, 2, 1)), (2, 17, 15, 3, 1, 2, (1, 1, 1, 1)),
]


def _rand(seed, shape, dtype):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _close(a, b, dtype):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    scale = max(1.0, float(np.max(np.abs(b))))
    np.testing.assert_allclose(a / scale, b / scale, **TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", CONV_CASES)
def test_modulated_conv2d_on_device_equals_xla(case, dtype):
    n, h, w, cin, cout, k, up, down = case
    x, wt = _rand(1, (n, h, w, cin), dtype), _rand(2, (k, k, cin, cout), dtype)
    styles = (_rand(3, (n, cin), jnp.float32) * 0.5 + 1.0).astype(dtype)
    pad = k // 2

    def f(impl):
        def loss(x, wt, styles):
            y = modulated_conv2d(x, wt, styles, up=up, down=down, padding=pad, impl=impl)
            return jnp.sum(jnp.tanh(y.astype(jnp.float32)))
        grad = jax.grad(loss, argnums=(0, 1, 2))

        def second(x, wt, styles):  # R1-style: the gradient's norm, differentiated again
            gx = grad(x, wt, styles)[0].astype(jnp.float32)
            return jnp.sum(gx * gx)
        return jax.jit(lambda *a: (modulated_conv2d(a[0], a[1], a[2], up=up, down=down, padding=pad, impl=impl),
                                   grad(*a), jax.grad(second, argnums=(0, 1))(*a)))

    ref = f("xla")(x, wt, styles)
    # the Triton (or TPU Mosaic) kernel, and on Hopper+ the Mosaic GPU variant (for bfloat16: under the
    # tests' "highest" precision float32 stays on Triton, see modulated_conv2d.mosaic_gpu_conv_applies)
    for impl in ["pallas"] + (["mosaic_gpu"] if _hopper_or_newer() else []):
        for a, b in zip(jax.tree.leaves(f(impl)(x, wt, styles)), jax.tree.leaves(ref)):
            _close(a, b, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", FIR_CASES)
def test_upfirdn2d_on_device_equals_xla(case, dtype):
    n, h, w, c, up, down, padding = case
    x = _rand(4, (n, h, w, c), dtype)
    filt = setup_filter([1, 3, 3, 1])

    def f(impl):
        def loss(x):
            return jnp.sum(jnp.sin(upfirdn2d(x, filt, up=up, down=down, padding=padding, impl=impl)
                                   .astype(jnp.float32)))
        second = jax.grad(lambda x: jnp.sum(jnp.square(jax.grad(loss)(x).astype(jnp.float32))))
        return jax.jit(lambda x: (upfirdn2d(x, filt, up=up, down=down, padding=padding, impl=impl),
                                  jax.grad(loss)(x), second(x)))

    impls = ["pallas"] + (["mosaic_gpu"] if _hopper_or_newer() else [])
    ref = f("xla")(x)
    for impl in impls:  # the Triton (or TPU Mosaic) kernel, and on Hopper+ the Mosaic GPU variant too
        for a, b in zip(f(impl)(x), ref):
            _close(a, b, dtype)


def _hopper_or_newer():
    from viscoin_jax.kernels.bench import mosaic_gpu_capable
    return mosaic_gpu_capable()


@pytest.mark.parametrize("case", CONV_CASES[:2])
def test_kernels_at_the_default_precision_stay_near_the_fp32_result(case):
    """The precision policy: by default both paths run what XLA runs on the platform (not fp32), and
    stay within the rounding of that arithmetic of the "highest" result."""
    n, h, w, cin, cout, k, up, down = case
    x, wt = _rand(5, (n, h, w, cin), jnp.float32), _rand(6, (k, k, cin, cout), jnp.float32)
    styles = _rand(7, (n, cin), jnp.float32) * 0.5 + 1.0
    fn = lambda impl: jax.jit(lambda x, wt, s: modulated_conv2d(x, wt, s, up=up, down=down, padding=k // 2,
                                                                impl=impl))
    exact = np.asarray(fn("xla")(x, wt, styles))
    with jax.default_matmul_precision("default"):
        for impl in ("pallas", "xla"):
            got = np.asarray(fn(impl)(x, wt, styles))
            scale = max(1.0, float(np.abs(exact).max()))
            np.testing.assert_allclose(got / scale, exact / scale, **DEFAULT_PRECISION_TOL)
