"""upfirdn2d's Mosaic GPU variant (impl="mosaic_gpu"): against the float64 numpy loop in jax's GPU
interpreter where the installed jax has one (>= 0.11), lowered for cuda to a Mosaic GPU custom call
from this GPU-less host (jax 0.10.2 through 0.12), and never picked by "auto" without a table."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_reference import rel_err, upfirdn2d_np
from test_upfirdn2d import CASES, FIR, _np_args
from viscoin_jax.kernels import lowering_for, modulated_conv2d, tuning, upfirdn2d
from viscoin_jax.kernels import upfirdn2d_mosaic_gpu as mgpu

needs_interpreter = pytest.mark.skipif(
    not mgpu.interpret_supported(),
    reason=f"jax {jax.__version__} has no Mosaic GPU interpreter (jax.experimental.pallas.mosaic_gpu."
           "InterpretGPUParams, jax >= 0.11): interpret-mode equality is tested on the newest-JAX job")
MOSAIC_CALL = re.compile(r"custom_call @mosaic_gpu\w*")


@needs_interpreter
@pytest.mark.parametrize("case", [0, 1, 2, 3, 5, 6])
def test_interpreted_kernel_matches_numpy(case):
    shape, f, up, down, padding, flip, gain = CASES[case]
    rng = np.random.default_rng(100 + case)
    x = rng.standard_normal(shape).astype(np.float32)
    expected = upfirdn2d_np(x, f, *_np_args(up, down, padding), flip_filter=flip, gain=gain)
    y = upfirdn2d(jnp.asarray(x), jnp.asarray(f, jnp.float32), up, down, padding, flip, gain,
                  impl="mosaic_gpu_interpret")
    assert y.shape == expected.shape and y.dtype == jnp.float32
    assert rel_err(y, expected) < 1e-5


@needs_interpreter
def test_interpreted_gradient_and_bfloat16():
    """The backward pass (the same kernel on the transposed plan) against the numpy loop's adjoint,
    <upfirdn(x), dy> = <x, grad>, and bfloat16 inputs with float32 accumulation."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 9, 7, 3)).astype(np.float32)
    f = jnp.asarray(FIR)
    op = lambda x, impl: upfirdn2d(x, f, up=2, padding=(2, 1, 2, 1), gain=4.0, impl=impl)  # noqa: E731
    dy = rng.standard_normal(op(jnp.asarray(x), "xla").shape).astype(np.float32)
    grad = jax.grad(lambda x: jnp.sum(op(x, "mosaic_gpu_interpret") * dy))(jnp.asarray(x))
    # numpy: the gradient column by column of the linear map, on a random projection of it
    probe = rng.standard_normal(x.shape)
    lhs = np.sum(upfirdn2d_np(probe, FIR, (2, 2), (1, 1), (2, 1, 2, 1), gain=4.0) * dy)
    assert abs(float(np.sum(np.asarray(grad, np.float64) * probe)) - lhs) < 1e-4 * max(1.0, abs(lhs))
    xb = jnp.asarray(x, jnp.bfloat16)
    yb = op(xb, "mosaic_gpu_interpret")
    expected = upfirdn2d_np(np.asarray(xb.astype(jnp.float32)), FIR, (2, 2), (1, 1), (2, 1, 2, 1), gain=4.0)
    assert yb.dtype == jnp.bfloat16 and rel_err(yb.astype(jnp.float32), expected) < 1e-2


@pytest.mark.parametrize("shape, up, down, padding, dtype", [
    ((2, 9, 11, 5), 2, 1, (2, 1, 2, 1), jnp.float32),
    ((1, 12, 10, 8), 1, 2, (1, 1, 1, 1), jnp.float32),
    ((1, 16, 16, 64), 2, 1, (2, 1, 2, 1), jnp.bfloat16),
    ((1, 7, 6, 3), 1, 1, (1, 2, 2, 1), jnp.float32),
])
def test_lowers_for_cuda_to_a_mosaic_gpu_call(shape, up, down, padding, dtype):
    """Forward and backward lower for cuda on this CPU host (an abstract H100 where jax 0.12 needs
    one): Mosaic GPU custom calls, and no Triton call."""
    x = jnp.zeros(shape, dtype)
    fn = jax.value_and_grad(lambda x: jnp.sum(upfirdn2d(x, jnp.asarray(FIR), up, down, padding,
                                              impl="mosaic_gpu").astype(jnp.float32)))
    with lowering_for("cuda"):
        text = jax.jit(fn).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert len(MOSAIC_CALL.findall(text)) >= 2, "forward and backward kernels"
    assert "triton" not in text


def test_mosaic_gpu_tiles_fit_shared_memory_and_whole_copies():
    """Every StyleGAN2 filter shape at every width: shared memory within budget, each async copy a
    multiple of 128 bytes (Mosaic GPU's rule), channel blocks of at least 16 bytes."""
    from viscoin_jax.kernels.plans import fir_plans
    for c in (3, 32, 64, 512):
        for itemsize in (2, 4):
            for up, down, pad in ((1, 1, (1, 2, 1, 2)), (2, 1, (2, 1, 2, 1)), (1, 2, (1, 1, 1, 1))):
                py, px = fir_plans((1, 64, 64, c), (4, 4), (up, up), (down, down), pad)
                th, tw, wh, ww, cb, cp, smem = mgpu.mgpu_tiles(py, px, c, itemsize)
                assert smem <= mgpu.SMEM_BUDGET_BYTES and cp % cb == 0 and cp >= c
                assert cb * itemsize >= 16
                assert (down * down * wh * ww * cb * itemsize) % 128 == 0
                assert (up * up * th * tw * cb * itemsize) % 128 == 0


def test_auto_never_picks_mosaic_gpu_without_a_table(write_tuning_table):
    x = jax.ShapeDtypeStruct((2, 11, 7, 5), jnp.float32)
    f = jnp.asarray(FIR)
    fir = lambda x: upfirdn2d(x, f, up=2, padding=(2, 1, 2, 1), gain=4.0)  # noqa: E731
    kind = "NVIDIA H200"
    with lowering_for("cuda", device_kind="Some GPU without a table"):
        jaxpr = str(jax.make_jaxpr(fir)(x))
    assert "mosaic" not in jaxpr and "pallas_call" not in jaxpr
    write_tuning_table({tuning.upfirdn2d_key(x.shape, f.shape, 2, 1, (2, 1, 2, 1), jnp.float32): "mosaic_gpu"}, kind)
    with lowering_for("cuda", device_kind=kind):
        text = jax.jit(fir).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert MOSAIC_CALL.search(text) and "triton" not in text
    with lowering_for("tpu", device_kind=kind):  # a Mosaic GPU winner never runs off NVIDIA GPUs
        assert "pallas_call" not in str(jax.make_jaxpr(fir)(x))


def test_table_from_rows_can_pick_mosaic_gpu():
    rows = [dict(layer="L", key="k", pass_="fwd+bwd", impl=impl, ms=ms)
            for impl, ms in (("xla", 3.0), ("pallas", 2.0), ("mosaic_gpu", 1.5))]
    rows += [dict(layer="M", key="m", pass_="fwd+bwd", impl=impl, ms=ms)
             for impl, ms in (("xla", 1.0), ("pallas", 2.0), ("mosaic_gpu", 1.0))]  # a tie is no win
    table = tuning.table_from_rows(rows, "NVIDIA H200", "gpu", 32, jax.__version__)
    assert {e["key"]: e["winner"] for e in table["entries"]} == {"k": "mosaic_gpu", "m": "xla"}


def test_mosaic_gpu_is_refused_for_tpu_and_the_conv_uses_its_mosaic_gpu_kernel():
    x = jnp.zeros((1, 8, 8, 4), jnp.float32)
    with lowering_for("tpu"), pytest.raises(ValueError, match="targets NVIDIA GPUs"):
        jax.make_jaxpr(lambda x: upfirdn2d(x, jnp.asarray(FIR), padding=1, impl="mosaic_gpu"))(x)
    w, s = jnp.ones((3, 3, 4, 4)), jnp.ones((1, 4))
    # (TF32 asked for: under exact float32 the float32 conv stays on Triton; see that test file)
    with lowering_for("cuda"), jax.default_matmul_precision("tensorfloat32"):
        text = jax.jit(lambda x: modulated_conv2d(x, w, s, padding=1, impl="mosaic_gpu")).trace(x).lower(
            lowering_platforms=("cuda",)).as_text()
    # the convolution's own Mosaic GPU variant (tests/test_modulated_conv2d_mosaic_gpu.py)
    assert "triton" not in text and MOSAIC_CALL.search(text)
