"""The kernel benchmark runs end to end through the CLI and its work accounting is right."""


from viscoin_jax import cli
from viscoin_jax.kernels import bench


def test_layer_work_counts():
    up = bench.Layer("up", "upfirdn2d", (2, 8, 8, 3), up=2, padding=(2, 1, 2, 1))
    nbytes, unit = bench.layer_work(up, backward=False, itemsize=4)
    assert unit == "GB/s" and nbytes == 4 * (2 * 8 * 8 * 3 + 2 * 16 * 16 * 3)
    conv = bench.Layer("c", "modconv", (2, 8, 8, 4), (3, 3, 4, 5), padding=1)
    flops, unit = bench.layer_work(conv, backward=True, itemsize=4)
    assert unit == "TFLOP/s" and flops == 3 * 2.0 * 2 * 8 * 8 * 4 * 5 * 9


def test_channel_schedule_matches_stylegan2_ada():
    assert [bench._channels(256, r) for r in (4, 32, 64, 128, 256)] == [512, 512, 256, 128, 64]
    assert [bench._channels(1024, r) for r in (64, 128, 1024)] == [512, 256, 32]


def test_cli_prints_a_table(monkeypatch, capsys):
    small = lambda img_res, batch: [bench.Layer("tiny up", "upfirdn2d", (batch, 8, 8, 3), up=2,
                                                padding=(2, 1, 2, 1)),
                                    bench.Layer("tiny conv", "modconv", (batch, 8, 8, 4), (3, 3, 4, 4),
                                                padding=1)]
    monkeypatch.setattr(bench, "stylegan2_layers", small)
    assert cli.main(["bench-kernels", "--repeats", "1", "--impls", "xla", "auto", "interpret"]) == 0
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if l.startswith("| tiny")]
    assert len(rows) == 2 * 2 * 3  # layers x passes x impls
    assert all(" 1.00x " in r for r in rows if "| xla " in r)


def test_plan_grids_are_the_grids_the_kernels_launch(monkeypatch):
    """bench-kernels --plan computes each kernel's GPU grid without a device: the grids pallas_call
    really receives when the layer's forward + backward is traced for cuda."""
    import collections

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import pallas as pl

    from viscoin_jax.kernels import bench, lowering_for, roofline

    layers = [bench.Layer("conv", "modconv", (3, 13, 11, 40), (3, 3, 40, 24), padding=1),
              bench.Layer("conv up", "modconv", (2, 9, 7, 24), (3, 3, 24, 16), up=2),
              bench.Layer("conv down", "modconv", (2, 17, 15, 16), (3, 3, 16, 24), down=2),
              bench.Layer("toRGB", "modconv", (2, 9, 5, 32), (1, 1, 32, 3), demodulate=False),
              bench.Layer("fir up", "upfirdn2d", (2, 7, 9, 3), up=2, padding=(2, 1, 2, 1)),
              bench.Layer("fir down", "upfirdn2d", (2, 18, 14, 5), down=2, padding=(1, 1, 1, 1))]
    grids = []
    real = pl.pallas_call
    monkeypatch.setattr(pl, "pallas_call", lambda *a, **k: grids.append(tuple(k["grid"])) or real(*a, **k))
    for layer in layers:
        fn, args = bench._make_fn(layer, "pallas", True, jnp.float32)
        for platform, grid_of in (("cuda", lambda k: k.gpu_grid), ("tpu", lambda k: k.tpu_grid)):
            grids.clear()
            with lowering_for(platform):
                jax.make_jaxpr(fn)(*args)
            want = collections.Counter(grid_of(k) for k in roofline.layer_kernels(layer))
            assert collections.Counter(grids) == want, (layer.name, platform)
    # the plain conv's FLOPs are the direct count; each weight gradient fills at least two waves of SMs
    plain = roofline.layer_kernels(layers[0])[0]
    assert plain.flops == 2.0 * 3 * 13 * 11 * 40 * 24 * 9
    big = roofline.layer_kernels(bench.Layer("c", "modconv", (32, 256, 256, 64), (3, 3, 64, 64), padding=1))
    assert [k for k in big if k.kernel == "conv (weight grad)"][0].gpu_programs >= 2 * 132
    assert np.isfinite(big[0].roofline_us("H200 SXM", "float32"))


def test_plan_prints_without_timing_anything(capsys):
    assert cli.main(["bench-kernels", "--plan", "--batch", "4", "--ops", "modconv"]) == 0
    out = capsys.readouterr().out
    assert "programs / 132 SMs" in out and "conv (weight grad)" in out and "upfirdn2d |" not in out
