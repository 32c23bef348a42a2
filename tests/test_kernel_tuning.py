"""impl="auto" runs a Pallas kernel only where a measured tuning table says it beats XLA."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from viscoin_jax.kernels import _dispatch, bench, lowering_for, modulated_conv2d, setup_filter, tuning, upfirdn2d

FIR = setup_filter([1, 3, 3, 1])
KIND = "Test Chip v9 (8 GB)"


def _has_kernel(fn, *args, platform, kind=KIND):
    with lowering_for(platform, device_kind=kind):
        return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def test_table_file_names_are_the_device_kind_in_safe_characters():
    assert tuning.table_file_name("NVIDIA H200") == "NVIDIA_H200.json"
    assert tuning.table_file_name("TPU v5 lite") == "TPU_v5_lite.json"
    assert tuning.table_file_name(KIND) == "Test_Chip_v9_8_GB.json"
    with pytest.raises(ValueError, match="no letters or digits"):
        tuning.table_file_name(" / ")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_auto_follows_the_table_per_shape(write_tuning_table, platform):
    rng = np.random.default_rng(4)
    f = jnp.asarray(FIR)
    x = jax.ShapeDtypeStruct((3, 11, 7, 5), jnp.float32)
    y = jax.ShapeDtypeStruct((3, 6, 9, 5), jnp.float32)  # another shape, never measured
    w = jnp.asarray(rng.normal(size=(3, 3, 5, 4)), jnp.float32)
    s = jnp.ones((3, 5), jnp.float32)
    fir = lambda x: upfirdn2d(x, f, up=2, padding=(2, 1, 2, 1), gain=4.0)
    conv = lambda x: modulated_conv2d(x, w, s, padding=1)
    fir_key = tuning.upfirdn2d_key(x.shape, f.shape, 2, 1, (2, 1, 2, 1), jnp.float32)
    conv_key = tuning.modconv_key(x.shape, w.shape, 1, 1, 1, True, jnp.float32)

    write_tuning_table({fir_key: "pallas", conv_key: "xla"}, KIND)
    assert _has_kernel(fir, x, platform=platform)
    assert not _has_kernel(fir, y, platform=platform)  # not in the table: XLA
    assert not _has_kernel(conv, x, platform=platform)  # measured, XLA won
    assert not _has_kernel(fir, x, platform=platform, kind="another chip")  # no table for that kind
    assert not _has_kernel(fir, x, platform="cpu")

    # the backward pass takes the forward pass's path (resolved once, at the public op)
    grad = jax.grad(lambda x: jnp.sum(fir(x) ** 2))
    xv = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    with lowering_for(platform, device_kind=KIND):
        assert str(jax.make_jaxpr(grad)(xv)).count("pallas_call") >= 2

    write_tuning_table({fir_key: "xla", conv_key: "pallas"}, KIND)
    assert not _has_kernel(fir, x, platform=platform)
    assert _has_kernel(conv, x, platform=platform)


def test_the_keys_bench_kernels_writes_are_the_keys_the_ops_look_up(monkeypatch):
    seen = []
    monkeypatch.setattr(_dispatch, "table_winner", lambda family, key: seen.append(key) or "xla")
    layers = [bench.Layer("conv up", "modconv", (2, 5, 7, 6), (3, 3, 6, 4), up=2),
              bench.Layer("conv", "modconv", (2, 9, 5, 6), (3, 3, 6, 4), padding=1),
              bench.Layer("toRGB", "modconv", (2, 9, 5, 6), (1, 1, 6, 3), demodulate=False),
              bench.Layer("img up", "upfirdn2d", (2, 5, 7, 3), up=2, padding=(2, 1, 2, 1)),
              bench.Layer("down", "upfirdn2d", (2, 10, 14, 6), down=2, padding=(1, 1, 1, 1))]
    for dtype in (jnp.float32, jnp.bfloat16):
        for layer in layers:
            fn, args = bench._make_fn(layer, "auto", False, dtype)
            seen.clear()
            with lowering_for("cuda", device_kind=KIND):
                jax.make_jaxpr(fn)(*args)
            assert seen and seen[0] == bench.layer_key(layer, dtype), layer.name
    keys = {bench.layer_key(l, d) for l in layers for d in (jnp.float32, jnp.bfloat16)}
    assert len(keys) == 2 * len(layers)  # every layer and dtype its own entry


def test_table_from_rows_picks_the_faster_forward_backward():
    rng = np.random.default_rng(9)
    rows, want = [], {}
    for i in range(7):
        key = f"op{i}"
        ms = {impl: float(rng.uniform(1, 5)) for impl in ("xla", "pallas", "auto")}
        for impl, t in ms.items():
            rows.append(dict(layer=f"L{i}", key=key, pass_="fwd+bwd", impl=impl, ms=t))
            rows.append(dict(layer=f"L{i}", key=key, pass_="fwd", impl=impl, ms=10 - t))  # ignored
        want[key] = "pallas" if ms["pallas"] < ms["xla"] else "xla"
    rows.append(dict(layer="only xla", key="lonely", pass_="fwd+bwd", impl="xla", ms=1.0))
    table = tuning.table_from_rows(rows, KIND, "gpu", 32, jax.__version__)
    assert {e["key"]: e["winner"] for e in table["entries"]} == want
    assert tuning.check_table(json.loads(json.dumps(table)), "t") == want


def test_write_table_round_trips_through_the_loader(table_dir):
    rows = [dict(layer="L", key="k1", pass_="fwd+bwd", impl="xla", ms=2.0),
            dict(layer="L", key="k1", pass_="fwd+bwd", impl="pallas", ms=1.5)]
    path = bench.write_table(rows, str(table_dir), "gpu", 8)
    kind = jax.devices()[0].device_kind
    assert path.endswith(tuning.table_file_name(kind))
    winners, source = tuning.load_table(kind)
    assert winners == {"k1": "pallas"} and source == path
    with pytest.raises(SystemExit, match="both 'pallas' and 'xla'"):
        bench.write_table(rows[:1], str(table_dir), "gpu", 8)


@pytest.mark.parametrize("content, problem", [
    ("{not json", "unreadable tuning table"),
    (json.dumps({"format": 7, "entries": []}), "not a viscoin-jax tuning table"),
    (json.dumps({"format": 1, "entries": {}}), "'entries' must be a list"),
    (json.dumps({"format": 1, "entries": [{"key": "k", "winner": "triton"}]}), "entry 0 needs"),
])
def test_a_bad_table_is_named_in_one_line(table_dir, content, problem):
    (table_dir / tuning.table_file_name(KIND)).write_text(content)
    with pytest.raises(ValueError, match=problem) as info:
        tuning.load_table(KIND)
    assert str(table_dir) in str(info.value) and "\n" not in str(info.value)
