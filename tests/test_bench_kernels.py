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
