"""The Pallas kernels lower for GPU (Triton) and TPU (Mosaic) from a CPU-only machine.

This is how CI checks that the kernels stay accelerator-agnostic: `jax.export` for platform `cuda`
and `tpu` runs the whole Pallas lowering (block shapes, index maps, Triton/Mosaic MLIR emission)
without a device. Forward and forward+backward (the backward pass is Pallas too), f32 and bf16.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from viscoin_jax.kernels import modulated_conv2d, setup_filter, upfirdn2d

TRITON = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
FIR = setup_filter([1, 3, 3, 1])


def _export_text(fn, args, platform):
    exported = export.export(jax.jit(fn), platforms=(platform,), disabled_checks=[TRITON])(*args)
    return exported.mlir_module()


def _assert_uses_pallas(text, platform):
    marker = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
    assert marker in text, f"no {marker} custom call: the op fell back to XLA on {platform}"


def _updown_cases():
    # (x shape, up, down, padding): a StyleGAN2 toRGB up-sample, a D down-sample, odd sizes.
    return [((2, 16, 16, 3), 2, 1, (2, 1, 2, 1)), ((2, 32, 32, 128), 1, 2, 1), ((1, 13, 9, 5), 2, 2, 1)]


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", range(3))
def test_upfirdn2d_lowers(platform, dtype, case):
    shape, up, down, padding = _updown_cases()[case]
    x = jax.ShapeDtypeStruct(shape, dtype)
    f = jnp.asarray(FIR)
    fwd = lambda x: upfirdn2d(x, f, up, down, padding, gain=up * up, impl="pallas")
    _assert_uses_pallas(_export_text(fwd, (x,), platform), platform)
    bwd = jax.grad(lambda x: jnp.sum(fwd(x).astype(jnp.float32) ** 2))
    text = _export_text(bwd, (x,), platform)
    assert text.count("__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") >= 2


def _modconv_cases():
    # (x shape, kernel, Cout, up, down, demodulate): synthesis conv0 (up), conv1, toRGB, D conv down.
    return [((2, 8, 8, 64), 3, 64, 2, 1, True), ((2, 16, 16, 32), 3, 48, 1, 1, True),
            ((2, 16, 16, 32), 1, 3, 1, 1, False), ((2, 17, 11, 6), 3, 5, 1, 2, False)]


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", range(4))
def test_modulated_conv2d_lowers(platform, dtype, case):
    shape, k, cout, up, down, demod = _modconv_cases()[case]
    args = (jax.ShapeDtypeStruct(shape, dtype), jax.ShapeDtypeStruct((k, k, shape[-1], cout), dtype),
            jax.ShapeDtypeStruct((shape[0], shape[-1]), dtype))
    padding = 1 if (k == 3 and up == 1 and down == 1) else 0
    fwd = lambda x, w, s: modulated_conv2d(x, w, s, demod, up, down, padding, impl="pallas")
    _assert_uses_pallas(_export_text(fwd, args, platform), platform)
    loss = lambda x, w, s: jnp.sum(fwd(x, w, s).astype(jnp.float32) ** 2)
    text = _export_text(jax.grad(loss, argnums=(0, 1, 2)), args, platform)
    marker = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
    assert text.count(marker) >= 3  # forward, input gradient, weight gradient


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_second_order_lowers(platform):
    # R1 / path length differentiate a gradient: the transposes are Pallas kernels again.
    x = jax.ShapeDtypeStruct((2, 8, 8, 16), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 16, 16), jnp.float32)
    s = jax.ShapeDtypeStruct((2, 16), jnp.float32)

    def pl(w, x, s):
        g = jax.grad(lambda s: jnp.sum(modulated_conv2d(x, w, s, up=2, impl="pallas") ** 2))(s)
        return jnp.sum(g ** 2)

    _assert_uses_pallas(_export_text(jax.grad(pl), (w, x, s), platform), platform)


def test_trace_lower_api_from_design_notes():
    # The form the developer guide names: jit(f).trace(*args).lower(lowering_platforms=...).
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 8, 4)), jnp.float32)
    f = lambda x: upfirdn2d(x, jnp.asarray(FIR), up=2, padding=(2, 1, 2, 1), gain=4.0, impl="pallas")
    for platform in ("cuda", "tpu"):
        text = jax.jit(f).trace(x).lower(lowering_platforms=(platform,)).as_text()
        _assert_uses_pallas(text, platform)


def test_auto_is_xla_on_cpu():
    # On CPU, "auto" must pick the XLA reference: no Pallas custom call in the CPU lowering.
    x = jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32)
    text = jax.jit(lambda x: upfirdn2d(x, jnp.asarray(FIR), up=2, padding=(2, 1, 2, 1))).trace(x).lower(
        lowering_platforms=("cpu",)).as_text()
    assert "triton" not in text and "tpu_custom_call" not in text


def test_layer_too_large_for_tpu_vmem_is_routed_to_xla(monkeypatch):
    # A layer whose blocks exceed the VMEM budget is compiled through XLA for TPU, with a warning,
    # and still computes the right values (checked in the TPU interpreter).
    mc = importlib.import_module("viscoin_jax.kernels.modulated_conv2d")
    up = importlib.import_module("viscoin_jax.kernels.upfirdn2d")
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 4)), jnp.float32)
    s = jnp.ones((1, 4), jnp.float32)
    assert mc.tpu_vmem_estimate(x.shape, w.shape, 2, 1, (2, 1, 2, 1)) < mc.TPU_VMEM_BUDGET_BYTES
    monkeypatch.setattr(mc, "TPU_VMEM_BUDGET_BYTES", 1024)
    monkeypatch.setattr(up, "TPU_VMEM_BUDGET_BYTES", 1024)
    fwd = lambda x, w, s: modulated_conv2d(x, w, s, up=2, impl="pallas")
    with pytest.warns(UserWarning, match="TPU VMEM"):
        text = _export_text(fwd, (x, w, s), "tpu")
    assert "tpu_custom_call" not in text
    with pytest.warns(UserWarning, match="using the XLA path"):
        routed = modulated_conv2d(x, w, s, up=2, impl="tpu_interpret")
    expected = modulated_conv2d(x, w, s, up=2, impl="xla")
    np.testing.assert_allclose(np.asarray(routed), np.asarray(expected), rtol=1e-6, atol=1e-6)
    with pytest.warns(UserWarning, match="upfirdn2d"):
        text = _export_text(lambda x: upfirdn2d(x, jnp.asarray(FIR), up=2, padding=(2, 1, 2, 1)),
                            (x,), "tpu")
    assert "tpu_custom_call" not in text


@pytest.mark.parametrize("channels", [3, 5, 32, 130])
def test_tpu_channel_windows_are_whole_lane_tiles(channels):
    # Mosaic cannot prove that a channel window narrower than 128 lanes starts on a lane-tile
    # boundary, and rejects the kernel at compile time (not at lowering, which CI checks). The TPU
    # layout therefore pads channels to whole 128-lane blocks; values stay exact (tpu_interpret tests).
    mc = importlib.import_module("viscoin_jax.kernels.modulated_conv2d")
    up = importlib.import_module("viscoin_jax.kernels.upfirdn2d")
    _, _, bi, bo, cin_p, cout_p = mc._conv_tiles("tpu", 9, 13, channels, channels + 1)
    assert bi % 128 == 0 and bo % 128 == 0 and cin_p % bi == 0 and cout_p % bo == 0
    assert channels <= cin_p < channels + 128 and channels + 1 <= cout_p < channels + 129
    _, _, cb, cp = up._tiles("tpu", 9, 13, channels)
    assert cb % 128 == 0 and cp % cb == 0 and channels <= cp < channels + 128


def _libtpu_available():
    try:
        return importlib.util.find_spec("libtpu") is not None
    except (ImportError, ValueError):
        return False


@pytest.mark.skipif(not _libtpu_available(), reason="needs libtpu (pip install 'jax[tpu]') to run Mosaic")
@pytest.mark.parametrize("channels", [3, 32, 256])
def test_mosaic_compiles_without_a_tpu(channels):
    # With libtpu installed, a deviceless TPU v5e topology runs the real Mosaic compiler from a CPU
    # host, which checks what lowering alone cannot (tiling proofs, VMEM layout).
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    device = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices[0]
    spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=SingleDeviceSharding(device))
    x, w, s = spec((2, 16, 16, channels)), spec((3, 3, channels, channels)), spec((2, channels))
    loss = lambda x, w, s: jnp.sum(modulated_conv2d(x, w, s, up=2, padding=1, impl="pallas") ** 2)
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, w, s).lower().compile()
    f = jnp.asarray(FIR)
    fir = lambda x: jnp.sum(upfirdn2d(x, f, down=2, padding=1, impl="pallas") ** 2)
    jax.jit(jax.grad(fir)).trace(x).lower().compile()
