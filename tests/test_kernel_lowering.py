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

from viscoin_jax.kernels import lowering_for, modulated_conv2d, setup_filter, upfirdn2d

TRITON = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
FIR = setup_filter([1, 3, 3, 1])


def _export_text(fn, args, platform):
    with lowering_for(platform):  # a CPU host tracing for another platform says so
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
        with lowering_for(platform):
            text = jax.jit(f).trace(x).lower(lowering_platforms=(platform,)).as_text()
        _assert_uses_pallas(text, platform)
    # One trace for every platform: platform_dependent keeps each branch until lowering.
    with lowering_for("any"):
        traced = jax.jit(f).trace(x)
    for platform in ("cuda", "tpu"):
        _assert_uses_pallas(traced.lower(lowering_platforms=(platform,)).as_text(), platform)


@pytest.mark.parametrize("op", ["upfirdn2d", "modulated_conv2d"])
def test_auto_traces_only_the_host_branch_on_cpu(op):
    # On a CPU host "auto" is the XLA path and nothing else is traced: no Pallas call in the jaxpr
    # (first and second order) nor in the lowering. Traced for "any" or for an accelerator whose
    # device kind has no tuning table, "auto" stays XLA (tests/test_kernel_tuning.py has the tables).
    x = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32)
    w = jnp.ones((3, 3, 4, 4), jnp.float32)
    fn = {"upfirdn2d": lambda x: upfirdn2d(x, jnp.asarray(FIR), up=2, padding=(2, 1, 2, 1)),
          "modulated_conv2d": lambda x: modulated_conv2d(x, w, jnp.ones((2, 4)), up=2)}[op]
    second = jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(jnp.sin(fn(x))))(x) ** 2))
    for f in (fn, second):
        assert "pallas_call" not in str(jax.make_jaxpr(f)(x))
        text = jax.jit(f).trace(x).lower(lowering_platforms=("cpu",)).as_text()
        assert "triton" not in text and "tpu_custom_call" not in text
    for target in ({}, {"device_kind": "a chip nobody measured"}):
        for platform in ("any", "tpu"):
            with lowering_for(platform, **target):
                assert "pallas_call" not in str(jax.make_jaxpr(fn)(x))


def test_lowering_for_rejects_unknown_platforms():
    with pytest.raises(ValueError, match="unknown platform 'cuda12'"):
        with lowering_for("cuda12"):
            pass


def test_layer_too_large_for_tpu_vmem_is_routed_to_xla(monkeypatch):
    # A layer whose blocks exceed the VMEM budget is compiled through XLA for TPU, with a warning,
    # and still computes the right values (checked in the TPU interpreter).
    mc = importlib.import_module("viscoin_jax.kernels.modulated_conv2d")
    plans = importlib.import_module("viscoin_jax.kernels.plans")
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 4)), jnp.float32)
    s = jnp.ones((1, 4), jnp.float32)
    assert mc.tpu_vmem_estimate(x.shape, w.shape, 2, 1, (2, 1, 2, 1)) < mc.TPU_VMEM_BUDGET_BYTES
    monkeypatch.setattr(plans, "TPU_VMEM_BUDGET_BYTES", 1024)  # the one budget of both ops
    fwd = lambda x, w, s: modulated_conv2d(x, w, s, up=2, impl="pallas")
    with pytest.warns(UserWarning, match="TPU VMEM"):
        text = _export_text(fwd, (x, w, s), "tpu")
    assert "tpu_custom_call" not in text
    with pytest.warns(UserWarning, match="using the XLA path"):
        routed = modulated_conv2d(x, w, s, up=2, impl="tpu_interpret")
    expected = modulated_conv2d(x, w, s, up=2, impl="xla")
    np.testing.assert_allclose(np.asarray(routed), np.asarray(expected), rtol=1e-6, atol=1e-6)
    with pytest.warns(UserWarning, match="upfirdn2d"):
        text = _export_text(lambda x: upfirdn2d(x, jnp.asarray(FIR), up=2, padding=(2, 1, 2, 1), impl="pallas"),
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


def _cuda_plugin_available():
    try:
        return importlib.util.find_spec("jax_cuda12_plugin") is not None
    except (ImportError, ValueError):
        return False


def _gpu_device(optin_bytes):
    """A deviceless A100 whose per-block shared-memory limit is `optin_bytes` (XLA:GPU then fails any
    Triton kernel that asks for more, naming the size it asked for)."""
    import re
    from pathlib import Path

    from jax.experimental import topologies

    text = (Path(__file__).resolve().parents[1] / "launch" / "gpu_targets" / "a100.pbtxt").read_text()
    text = re.sub(r"shared_memory_per_block_optin: \d+", f"shared_memory_per_block_optin: {optin_bytes}", text)
    return topologies.get_topology_desc(topology_name="gpu", platform="cuda", target_config=text,
                                        topology="1x1x1").devices[0]


@pytest.mark.parametrize("res,cin,cout,up,down,k", [(16, 64, 64, 1, 1, 3), (5, 512, 512, 2, 1, 3),
                                                    (32, 256, 256, 1, 2, 3), (16, 512, 3, 1, 1, 1),
                                                    (64, 48, 17, 1, 1, 3)])
def test_gpu_pipelining_choice_keeps_every_tile_within_the_budget(res, cin, cout, up, down, k):
    # Whatever tiles the GPU layout picks, the kernel it runs (pipelined or not) fits the budget.
    mc = importlib.import_module("viscoin_jax.kernels.modulated_conv2d")
    ph = importlib.import_module("viscoin_jax.kernels._phases")
    budget = mc.GPU_SHARED_MEMORY_BUDGET_BYTES
    geometry = (up, 1, (k // 2,) * 4) if down == 1 else (1, down, (0, 0, 0, 0))
    for c_in, c_out in ((cin, cout), (cout, cin)):  # forward and input gradient
        plan_y, plan_x = mc._plans((8, res, res, c_in), (k, k, c_in, c_out), geometry)
        table = ph.tap_table(plan_y, plan_x)
        tile_h, tile_w, bi, bo, cin_p, _ = mc._conv_tiles("gpu", plan_y.out_per_phase, plan_x.out_per_phase,
                                                          c_in, c_out)
        for kind, loop in (("conv", cin_p > bi), ("weight_grad", True)):
            stages, need = mc.triton_pipelining(kind, tile_h * tile_w, bi, bo, table, loop=loop)
            assert need <= budget and stages in (1, 2), (kind, stages, need)
    # the 64 -> 64 layer at 16 px pipelined would need about 240 KiB: it must run unpipelined
    assert mc.triton_pipelining("conv", 128, 32, 64, [(0, 0, [None] * 9)])[0] == 1
    assert mc.triton_shared_memory_estimate("conv", 128, 32, 64, 9) > 227 * 2**10
    with pytest.raises(ValueError, match="kind"):
        mc.triton_shared_memory_estimate("fir", 128, 32, 64, 9)


@pytest.mark.skipif(not _cuda_plugin_available(), reason="needs jax-cuda12-plugin to compile for a GPU")
@pytest.mark.parametrize("cin,cout,up,down", [(64, 64, 1, 1), (512, 512, 2, 1), (256, 256, 1, 2), (32, 32, 1, 1)])
def test_triton_kernels_compile_within_the_shared_memory_budget(cin, cout, up, down):
    # XLA:GPU compiles the Triton kernels deviceless (no GPU, no CUDA install) for an A100 whose
    # per-block limit is lowered to the budget: every kernel of the forward and backward pass fits.
    import os

    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from jax.sharding import SingleDeviceSharding

    mc = importlib.import_module("viscoin_jax.kernels.modulated_conv2d")
    sharding = SingleDeviceSharding(_gpu_device(mc.GPU_SHARED_MEMORY_BUDGET_BYTES))
    spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
    x, w, s = spec((8, 16, 16, cin)), spec((3, 3, cin, cout)), spec((8, cin))
    loss = lambda x, w, s: jnp.sum(modulated_conv2d(x, w, s, up=up, down=down, padding=1, impl="pallas") ** 2)
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, w, s).lower().compile()


@pytest.mark.skipif(not _cuda_plugin_available(), reason="needs jax-cuda12-plugin to compile for a GPU")
@pytest.mark.parametrize("kind,res,cin,cout,up", [("conv", 16, 64, 64, 1), ("conv", 16, 32, 64, 1),
                                                  ("conv", 8, 512, 16, 1), ("conv", 8, 512, 512, 2),
                                                  ("weight_grad", 16, 64, 64, 1), ("weight_grad", 16, 32, 32, 1),
                                                  ("weight_grad", 8, 512, 512, 2)])
def test_triton_shared_memory_estimate_bounds_what_xla_reports(kind, res, cin, cout, up):
    # With a 1 KiB limit every kernel fails and XLA:GPU names the bytes it asked for; the estimate the
    # pipelining choice relies on must be at least that, and not far above it.
    import os
    import re

    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from jax.sharding import SingleDeviceSharding

    mc = importlib.import_module("viscoin_jax.kernels.modulated_conv2d")
    ph = importlib.import_module("viscoin_jax.kernels._phases")
    sharding = SingleDeviceSharding(_gpu_device(1024))
    spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
    geometry = (up, 1, (1, 1, 1, 1))
    plan_y, plan_x = mc._plans((8, res, res, cin), (3, 3, cin, cout), geometry)
    table = ph.tap_table(plan_y, plan_x)
    tile_h, tile_w, bi, bo, cin_p, _ = mc._conv_tiles("gpu", plan_y.out_per_phase, plan_x.out_per_phase, cin, cout)
    stages, estimate = mc.triton_pipelining(kind, tile_h * tile_w, bi, bo, table, loop=kind != "conv" or cin_p > bi)
    if kind == "conv":
        fn = lambda x, w, a, b: mc._phased_conv_forward(x, w, a, b, geometry, "gpu")
        args = (8, res, res, cin), (3, 3, cin, cout), (8, cin), (8, cout)
    else:
        fn = lambda x, g, a: mc._weight_grad_forward(x, g, a, (3, 3, cin, cout), geometry, "gpu")
        args = (8, res, res, cin), (8, res * up, res * up, cout), (8, cin)
    with pytest.raises(Exception, match="Shared memory size limit exceeded") as info:
        jax.jit(fn).trace(*(spec(a) for a in args)).lower().compile()
    asked = int(re.search(r"requested (\d+)", str(info.value)).group(1))
    assert asked <= estimate <= 2 * asked + 1024, (kind, stages, asked, estimate)
