"""modulated_conv2d's Mosaic GPU variant (impl="mosaic_gpu"): against the float64 numpy definition in
jax's GPU interpreter where the installed jax has one (>= 0.11), lowered for cuda to Mosaic GPU custom
calls from this GPU-less host (jax 0.10.2 through 0.12), the Triton fallback where the kernel does not
apply, and never picked by "auto" without a tuning table."""

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_reference import modulated_conv2d_np, rel_err
from test_modulated_conv2d import CASES, FIR, _inputs, _run
from viscoin_jax.kernels import lowering_for, modulated_conv2d, tuning
from viscoin_jax.kernels import modulated_conv2d_mosaic_gpu as mgpu_conv
from viscoin_jax.kernels import upfirdn2d_mosaic_gpu as mgpu

needs_interpreter = pytest.mark.skipif(
    not mgpu.interpret_supported(),
    reason=f"jax {jax.__version__} has no Mosaic GPU interpreter (jax.experimental.pallas.mosaic_gpu."
           "InterpretGPUParams, jax >= 0.11): interpret-mode equality is tested on the newest-JAX job")
# the module (the package attribute of that name is the function)
modconv_module = importlib.import_module("viscoin_jax.kernels.modulated_conv2d")
MOSAIC_V2 = re.compile(r"custom_call @mosaic_gpu_v2")


@pytest.fixture(autouse=True)
def tensorfloat32():
    """wgmma computes float32 as TF32, so under the suite's "highest" precision float32 convolutions
    stay on Triton (`mosaic_gpu_conv_applies`); these tests ask for TF32 (jax's GPU interpreter on
    CPU still computes float32 exactly)."""
    with jax.default_matmul_precision("tensorfloat32"):
        yield


@pytest.fixture
def mosaic_calls(monkeypatch):
    """Counts the traces of the Mosaic GPU wrapper (the shapes here are this file's own, so no call
    was traced before)."""
    calls = []
    real = mgpu_conv._phased_conv_mosaic_gpu

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(mgpu_conv, "_phased_conv_mosaic_gpu", spy)
    return calls


@needs_interpreter
@pytest.mark.parametrize("case", [0, 1, 2, 3, 5])
def test_interpreted_kernel_matches_numpy(case, mosaic_calls):
    """Plain 3x3 on odd sizes, the up- and down-sampling layers, the 1x1 toRGB, 33 input channels."""
    x, w, s = _inputs(case, 300 + case)
    *_, up, down, padding, demod = CASES[case]
    expected = modulated_conv2d_np(x, w, s, demod, up, down, padding, FIR if (up > 1 or down > 1) else None)
    y = _run(case, x, w, s, "mosaic_gpu_interpret")
    assert mosaic_calls, "the Mosaic GPU kernel ran"
    assert y.shape == expected.shape and y.dtype == jnp.float32
    assert rel_err(y, expected) < 1e-5


@needs_interpreter
def test_interpreted_kernel_over_several_column_tiles_and_bfloat16(mosaic_calls):
    """71 output columns (two 64-column tiles, the second mostly padding) and 13 output channels;
    bfloat16 inputs with float32 accumulation, within bfloat16's rounding of the result."""
    rng = np.random.default_rng(17)
    x = rng.standard_normal((1, 3, 71, 6)).astype(np.float32)
    w = rng.standard_normal((3, 3, 6, 13)).astype(np.float32)
    s = (rng.standard_normal((1, 6)) * 0.5 + 1.0).astype(np.float32)
    expected = modulated_conv2d_np(x, w, s, True, 1, 1, 1)
    y = modulated_conv2d(jnp.asarray(x), jnp.asarray(w), jnp.asarray(s), padding=1, impl="mosaic_gpu_interpret")
    assert rel_err(y, expected) < 1e-5
    xb, wb, sb = (jnp.asarray(a, jnp.bfloat16) for a in (x, w, s))
    yb = modulated_conv2d(xb, wb, sb, padding=1, impl="mosaic_gpu_interpret")
    expected_b = modulated_conv2d_np(*(np.asarray(a.astype(jnp.float32)) for a in (xb, wb, sb)), True, 1, 1, 1)
    assert len(mosaic_calls) == 2
    assert yb.dtype == jnp.bfloat16 and rel_err(yb.astype(jnp.float32), expected_b) < 1e-2


@needs_interpreter
def test_interpreted_gradients_match_the_numpy_adjoint(mosaic_calls):
    """Without demodulation the op is linear in x and in the weight, so <grad, probe> must equal the
    numpy loop on the probe against dy (the x-gradient runs the Mosaic GPU kernel on the transposed
    plan, the weight gradient the interpreted Pallas kernel)."""
    rng = np.random.default_rng(23)
    x = rng.standard_normal((1, 5, 7, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    s = (rng.standard_normal((1, 3)) * 0.5 + 1.0).astype(np.float32)
    dy = rng.standard_normal((1, 8, 12, 4))  # 2 * 5 - 2, 2 * 7 - 2: the 3x3 taps trim 1 pixel a side
    op = lambda x, w: modulated_conv2d(x, w, jnp.asarray(s), False, up=2, resample_filter=FIR,  # noqa: E731
                                       impl="mosaic_gpu_interpret")
    gx, gw = jax.grad(lambda x, w: jnp.sum(op(x, w) * dy), argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
    assert len(mosaic_calls) >= 2, "forward and x-gradient"
    px, pw = rng.standard_normal(x.shape), rng.standard_normal(w.shape)
    lhs_x = np.sum(modulated_conv2d_np(px, w, s, False, 2, 1, 0, FIR) * dy)
    lhs_w = np.sum(modulated_conv2d_np(x, pw, s, False, 2, 1, 0, FIR) * dy)
    assert abs(np.sum(np.asarray(gx, np.float64) * px) - lhs_x) < 1e-4 * max(1.0, abs(lhs_x))
    assert abs(np.sum(np.asarray(gw, np.float64) * pw) - lhs_w) < 1e-4 * max(1.0, abs(lhs_w))


@needs_interpreter
def test_interpreted_second_order_gradient_matches_reference(mosaic_calls):
    """R1-style: the gradient of an x-gradient norm, whose terms are phased convolutions again (the
    Mosaic GPU kernel) and weight gradients (the interpreted Pallas kernel), against the XLA
    reference's own second derivatives (odd sizes, 3 -> 5 channels, demodulated)."""
    rng = np.random.default_rng(29)
    x = jnp.asarray(rng.standard_normal((1, 5, 7, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 5)), jnp.float32)
    s = jnp.asarray(rng.standard_normal((1, 3)) * 0.5 + 1.0, jnp.float32)

    def r1(w, impl):
        gx = jax.grad(lambda x: jnp.sum(jnp.sin(modulated_conv2d(x, w, s, padding=1, impl=impl))))(x)
        return jnp.sum(gx * gx)

    got = jax.grad(r1)(w, "mosaic_gpu_interpret")
    # (traced once per shape: the weight gradient's transposes share the forward's and x-gradient's)
    assert len(mosaic_calls) >= 2, "the forward and the x-gradient shapes"
    assert rel_err(got, jax.grad(r1)(w, "xla")) < 1e-4


def _lower(fn, *args):
    with lowering_for("cuda"):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("shape, cout, up, down, dtype", [
    ((2, 9, 11, 5), 7, 1, 1, jnp.float32),
    ((1, 8, 8, 64), 64, 2, 1, jnp.bfloat16),
    ((1, 16, 16, 512), 512, 1, 2, jnp.float32),
])
def test_lowers_for_cuda_to_mosaic_gpu_calls(shape, cout, up, down, dtype):
    """Forward and backward lower for cuda on this CPU host (an abstract H100 where jax 0.12 needs
    one): the forward conv and the x-gradient are Mosaic GPU calls (the filters too), the weight
    gradient the Triton kernel (it has no Mosaic GPU variant yet)."""
    x, w, s = jnp.zeros(shape, dtype), jnp.zeros((3, 3, shape[3], cout), dtype), jnp.ones((shape[0], shape[3]))
    loss = lambda x, w: jnp.sum(modulated_conv2d(x, w, s, up=up, down=down, padding=1,  # noqa: E731
                                                 impl="mosaic_gpu").astype(jnp.float32))
    forward = _lower(loss, x, w)
    assert len(MOSAIC_V2.findall(forward)) == 1 + (up > 1 or down > 1) and "triton" not in forward
    both = _lower(jax.value_and_grad(loss, argnums=(0, 1)), x, w)
    assert len(MOSAIC_V2.findall(both)) >= 2 * len(MOSAIC_V2.findall(forward))
    assert both.count("triton") >= 1


def test_the_fallback_engages_where_the_kernel_does_not_apply():
    """float32 with 768 input channels needs more shared memory than an H100 block has even with an
    8-channel output block: that conv runs the Triton kernel; the StyleGAN2 widths fit."""
    geometry = (1, 1, (1, 1, 1, 1))
    assert not modconv_module.mosaic_gpu_conv_applies((1, 4, 4, 768), (3, 3, 768, 16), geometry, jnp.float32)
    for c in (3, 32, 512):
        for dtype in (jnp.float32, jnp.bfloat16):
            assert modconv_module.mosaic_gpu_conv_applies((1, 9, 9, c), (3, 3, c, c), geometry, dtype)
            tiles = mgpu_conv.mgpu_conv_tiles([(0, 0, [(0, 0, 0, 0, 0)])], c, c, dtype)
            assert tiles[-1] <= mgpu.SMEM_BUDGET_BYTES and tiles[0] % 8 == 0 and tiles[2] % tiles[0] == 0
    x, w, s = jnp.zeros((1, 4, 5, 768)), jnp.zeros((3, 3, 768, 16)), jnp.ones((1, 768))
    text = _lower(lambda x: modulated_conv2d(x, w, s, padding=1, impl="mosaic_gpu"), x)
    assert "triton" in text and not MOSAIC_V2.search(text)
    # exact float32 asked for: wgmma's TF32 would not give it, so float32 runs the Triton kernel
    x, w, s = jnp.zeros((1, 4, 5, 8)), jnp.zeros((3, 3, 8, 16)), jnp.ones((1, 8))
    with jax.default_matmul_precision("highest"):
        assert not modconv_module.mosaic_gpu_conv_applies(x.shape, w.shape, geometry, jnp.float32)
        assert modconv_module.mosaic_gpu_conv_applies(x.shape, w.shape, geometry, jnp.bfloat16)
        text = _lower(lambda x: modulated_conv2d(x, w, s, padding=1, impl="mosaic_gpu"), x)
    assert "triton" in text and not MOSAIC_V2.search(text)
    assert mgpu_conv.mgpu_conv_tiles([(0, 0, [(0, 0, 0, 0, 0)])], 8, 8, jnp.int8) is None


def test_auto_never_picks_mosaic_gpu_without_a_table(write_tuning_table):
    x = jax.ShapeDtypeStruct((2, 11, 7, 5), jnp.float32)
    w, s = jnp.zeros((3, 3, 5, 6)), jnp.ones((2, 5))
    conv = lambda x: modulated_conv2d(x, w, s, padding=1)  # noqa: E731
    kind = "NVIDIA H200"
    with lowering_for("cuda", device_kind="Some GPU without a table"):
        jaxpr = str(jax.make_jaxpr(conv)(x))
    assert "mosaic" not in jaxpr and "pallas_call" not in jaxpr
    write_tuning_table({tuning.modconv_key(x.shape, w.shape, 1, 1, 1, True, jnp.float32): "mosaic_gpu"}, kind)
    with lowering_for("cuda", device_kind=kind):
        text = jax.jit(conv).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert MOSAIC_V2.search(text) and "triton" not in text
