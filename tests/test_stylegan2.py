"""StyleGAN2 generator / discriminator: layers against numpy (float64), model behaviour, counts.

The reference-weight import (and so the exact StyleGAN2-ADA semantics, including the up-sampling
kernels' orientation) is checked against a torch re-implementation in test_convert_stylegan2.py.
Models here are built abstractly and filled with numpy values (CPU compiles of dozens of random
initialisers would dominate the run time); the initialisers themselves are checked on single layers.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from viscoin_jax.kernels import setup_filter
from viscoin_jax.models import stylegan2 as sg
from viscoin_jax.models.stylegan2_layers import (Buffer, Conv2dLayer, FullyConnected, bias_act,
                                                 minibatch_std)

SQRT2 = math.sqrt(2.0)
Z, W, RES = 8, 8, 32
G_KW = dict(z_dim=Z, c_dim=0, w_dim=W, img_resolution=RES, img_channels=3, mapping_layers=2,
            channel_base=256, channel_max=16, impl="xla")
D_KW = dict(c_dim=0, img_resolution=RES, img_channels=3, channel_base=256, channel_max=16,
            mbstd_group_size=4, impl="xla")
# The test programs are tiny, so XLA's compile time dominates: skip the LLVM optimisations.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


# --------------------------------------------------------------------------------------------------
# Helpers


def _filled(cls, seed, *args, **kwargs):
    """cls(*args, **kwargs) with numpy-random values in every variable (no JAX initialisers run).

    Stored values follow the reference's conventions (mapping weights N(0,1)/0.01, affine biases
    near 1) but biases and noise strengths are non-zero so every term is exercised.
    """
    abstract = nnx.eval_shape(lambda: cls(*args, **kwargs, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def value(path, leaf):
        names = [k.key for k in path]
        name, parent = names[-1], (names[-2] if len(names) > 1 else "")
        x = rng.standard_normal(leaf.shape)
        if name == "bias":
            x = 1 + 0.2 * x if parent == "affine" else 0.2 * x
        elif name == "noise_strength":
            x = 0.5 + 0.1 * x
        elif name == "weight" and re.fullmatch(r"fc\d+", parent):
            x = 100 * x  # mapping layers: lr_multiplier 0.01
        return jnp.asarray(x, jnp.float32)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(value, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def np_upfirdn2d(x, f, up=1, down=1, pad=(0, 0, 0, 0), gain=1.0):
    """NHWC float64: zero insertion, padding (x0, x1, y0, y1), convolution with f * gain, down."""
    n, h, w, c = x.shape
    if up > 1:
        z = np.zeros((n, h * up, w * up, c))
        z[:, ::up, ::up] = x
        x = z
    x0, x1, y0, y1 = pad
    x = np.pad(x, ((0, 0), (y0, y1), (x0, x1), (0, 0)))
    g = (np.asarray(f, np.float64) * gain)[::-1, ::-1]
    fh, fw = g.shape
    ho, wo = x.shape[1] - fh + 1, x.shape[2] - fw + 1
    out = sum(g[i, j] * x[:, i:i + ho, j:j + wo] for i in range(fh) for j in range(fw))
    return out[:, ::down, ::down]


def np_correlate(x, w, pad):
    """NHWC x [kh, kw, Cin, Cout] correlation with symmetric zero padding, float64."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = w.shape[:2]
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    return sum(np.einsum("nhwc,co->nhwo", x[:, i:i + ho, j:j + wo], w[i, j])
               for i in range(kh) for j in range(kw))


def np_lrelu(x, gain=SQRT2, clamp=None):
    y = np.where(x >= 0, x, 0.2 * x) * gain
    return y if clamp is None else np.clip(y, -clamp, clamp)


def np_fc(layer, x):
    w = np.asarray(layer.weight[...], np.float64) * layer.weight_gain
    y = x @ w
    if layer.bias is not None:
        y = y + np.asarray(layer.bias[...], np.float64) * layer.bias_gain
    return np_lrelu(y) if layer.activation == "lrelu" else y


FILTER = setup_filter([1, 3, 3, 1]).astype(np.float64)


def np_synthesis_layer(layer, x, w, noise=None):
    styles = np_fc(layer.affine, w)
    weight = np.asarray(layer.weight[...], np.float64)
    xs = x * styles[:, None, None, :]
    if layer.up > 1:
        xs = np_upfirdn2d(xs, FILTER, up=2, pad=(3, 2, 3, 2), gain=4)
        y = np_correlate(xs, weight, 0)
    else:
        y = np_correlate(xs, weight, 1)
    wsq = np.einsum("ni,io->no", styles ** 2, np.sum(weight ** 2, axis=(0, 1)))
    y = y / np.sqrt(wsq + 1e-8)[:, None, None, :]
    if noise is not None:
        y = y + noise
    clamp = layer.conv_clamp
    return np_lrelu(y + np.asarray(layer.bias[...], np.float64), clamp=clamp)


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def G():
    return _filled(sg.Generator, 0, **G_KW)


@pytest.fixture(scope="module")
def synthesize(G):
    """Pure functional use: split once, merge inside jax.jit (the graphdef is a static argument).

    Returns (image with const noise, image with random noise from `key`)."""
    graphdef, state = nnx.split(G)

    @functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
    def run(graphdef, state, ws, key):
        g = nnx.merge(graphdef, state)
        return (g.synthesis(ws, noise_mode="const"),
                g.synthesis(ws, noise_mode="random", noise_rng=key))

    return lambda ws, key=_key(0): run(graphdef, state, ws, key)


def _fast_jit(fn):
    """fn(model, *args) as a jax.jit function of (graphdef, state, *args), with FAST_COMPILE."""

    @functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
    def run(graphdef, state, *args):
        return fn(nnx.merge(graphdef, state), *args)

    return lambda model, *args: run(*nnx.split(model), *args)


def _jit_apply(model, fn, *args):
    return _fast_jit(fn)(model, *args)


def _maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _key(seed):
    """An "rbg" PRNG key: any key type works; this one compiles several times faster on CPU."""
    return jax.random.key(seed, impl="rbg")


def _z(n=4, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, Z)), jnp.float32)


# --------------------------------------------------------------------------------------------------
# Layers


def test_bias_act_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 7)).astype(np.float32) * 3
    b = rng.standard_normal(7).astype(np.float32)
    np.testing.assert_allclose(bias_act(x, b, "lrelu"), np_lrelu(x + b), rtol=1e-6)
    np.testing.assert_allclose(bias_act(x, b, "lrelu", gain=0.5, clamp=1.1),
                               np_lrelu(x + b, 0.5, 1.1), rtol=1e-6)
    np.testing.assert_allclose(bias_act(x, b, "relu"), np.maximum(x + b, 0) * SQRT2, rtol=1e-6)
    np.testing.assert_allclose(bias_act(x, None, "linear", clamp=0.3), np.clip(x, -0.3, 0.3))
    with pytest.raises(ValueError, match="activation"):
        bias_act(x, b, "gelu")


def test_fully_connected_equalised_lr():
    fc = _filled(FullyConnected, 3, 24, 20, activation="lrelu", lr_multiplier=0.01)
    assert fc.weight_gain == pytest.approx(0.01 / math.sqrt(24)) and fc.bias_gain == 0.01
    x = np.random.default_rng(2).standard_normal((3, 24))
    w = np.asarray(fc.weight[...], np.float64) * 0.01 / math.sqrt(24)
    want = np_lrelu(x @ w + np.asarray(fc.bias[...], np.float64) * 0.01)
    np.testing.assert_allclose(fc(jnp.asarray(x, jnp.float32)), want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="24 input features"):
        fc(jnp.ones((3, 23)))


@pytest.mark.parametrize("cin, cout, k, down, bias, clamp, size", [
    (5, 6, 3, 2, True, 0.5, 9),   # the discriminator's conv1 (odd size)
    (5, 4, 1, 2, False, None, 8),  # the skip
    (3, 6, 3, 1, True, None, 7),   # conv0 / epilogue conv
])
def test_conv2d_layer_matches_numpy(cin, cout, k, down, bias, clamp, size):
    layer = _filled(Conv2dLayer, 4, cin, cout, k, bias=bias, activation="lrelu" if bias else "linear",
                    down=down, conv_clamp=clamp, impl="xla")
    x = np.random.default_rng(5).standard_normal((2, size, size, cin))
    gain = 0.7
    w = np.asarray(layer.weight[...], np.float64) / math.sqrt(cin * k * k)
    if down > 1:
        p = k // 2 + 1
        y = np_correlate(np_upfirdn2d(x, FILTER, pad=(p, p, p, p)), w, 0)[:, ::2, ::2]
    else:
        y = np_correlate(x, w, k // 2)
    if bias:
        y = np_lrelu(y + np.asarray(layer.bias[...]), SQRT2 * gain, None if clamp is None else clamp * gain)
    else:
        y = y * gain
    got = _jit_apply(layer, lambda m, x: m(x, gain=gain), jnp.asarray(x, jnp.float32))
    assert got.shape == y.shape
    np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("up", [1, 2])
def test_synthesis_layer_matches_numpy(up):
    layer = _filled(sg.SynthesisLayer, 6, 5, 7, W, 10, up=up, conv_clamp=1.5, impl="xla")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 10 // up, 10 // up, 5))
    w = rng.standard_normal((3, W))
    noise = (np.asarray(layer.noise_const[...]) * float(layer.noise_strength[...]))[None, :, :, None]
    want = np_synthesis_layer(layer, x, w, noise)
    run = nnx.jit(lambda m, x, w: m(x, w, noise_mode="const"))
    got = run(layer, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    eager = layer(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), noise_mode="const")
    np.testing.assert_allclose(eager, got, rtol=1e-5, atol=1e-6)  # jit == eager
    assert np.abs(want).max() == pytest.approx(1.5)  # the clamp is exercised
    if up == 2:  # the kernel dispatcher's "auto" path gives the same result
        layer_auto = _filled(sg.SynthesisLayer, 6, 5, 7, W, 10, up=up, conv_clamp=1.5, impl="auto")
        got_auto = run(layer_auto, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
        np.testing.assert_allclose(got_auto, got, rtol=1e-5, atol=1e-6)


def test_torgb_matches_numpy():
    layer = _filled(sg.ToRGBLayer, 8, 6, 3, W, conv_clamp=None, impl="xla")
    rng = np.random.default_rng(9)
    x, w = rng.standard_normal((2, 5, 5, 6)), rng.standard_normal((2, W))
    styles = np_fc(layer.affine, w) / math.sqrt(6)
    want = np.einsum("nhwc,co->nhwo", x * styles[:, None, None, :],
                     np.asarray(layer.weight[...], np.float64)[0, 0]) + np.asarray(layer.bias[...])
    got = _jit_apply(layer, lambda m, x, w: m(x, w), jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_demodulation_gives_unit_norm_kernels():
    """Impulse inputs read out the modulated kernel: its norm per output channel must be 1."""
    cin, cout = 4, 5
    layer = _filled(sg.SynthesisLayer, 10, cin, cout, W, 5, impl="xla")
    layer.bias[...] = jnp.zeros(cout)
    w = jnp.asarray(np.random.default_rng(11).standard_normal((1, W)) * 3, jnp.float32)
    x = np.zeros((cin, 5, 5, cin), np.float32)
    x[np.arange(cin), 2, 2, np.arange(cin)] = 1.0  # sample i: impulse in channel i
    run = _fast_jit(lambda m, x, w: m(x, w, noise_mode="none"))
    y = np.asarray(run(layer, jnp.asarray(x), jnp.repeat(w, cin, 0)), np.float64)
    pre = np.where(y >= 0, y, y / 0.2) / SQRT2  # undo the leaky ReLU and its gain
    np.testing.assert_allclose(np.sum(pre ** 2, axis=(0, 1, 2)), np.ones(cout), rtol=1e-5)
    # Demodulation also makes the output invariant to the scale of the styles.
    layer.affine.weight[...] = layer.affine.weight[...] * 4.0
    layer.affine.bias[...] = layer.affine.bias[...] * 4.0
    y4 = run(layer, jnp.asarray(x), jnp.repeat(w, cin, 0))
    np.testing.assert_allclose(y4, y, rtol=1e-5, atol=1e-6)


def test_initialisers_follow_the_reference():
    """Stored weights N(0, 1) (mapping: N(0, 1) / lr_multiplier), affine biases 1, others 0."""
    layer = sg.SynthesisLayer(12, 24, 12, 8, up=2, rngs=nnx.Rngs(_key(0)))
    np.testing.assert_array_equal(layer.affine.bias[...], np.ones(12, np.float32))
    np.testing.assert_array_equal(layer.bias[...], np.zeros(24, np.float32))
    assert float(layer.noise_strength[...]) == 0.0 and layer.noise_strength.shape == ()
    weight = np.asarray(layer.weight[...])
    assert weight.shape == (3, 3, 12, 24) and 0.9 < weight.std() < 1.1 and abs(weight.mean()) < 0.06
    assert isinstance(layer.noise_const, Buffer) and layer.noise_const.shape == (8, 8)
    assert sg.count_params(layer) == 12 * 12 + 12 + 9 * 12 * 24 + 1 + 24
    mapping = sg.MappingNetwork(12, 0, 12, 5, num_layers=2, rngs=nnx.Rngs(_key(1)))
    assert isinstance(mapping.w_avg, nnx.BatchStat)
    np.testing.assert_array_equal(mapping.w_avg[...], np.zeros(12, np.float32))
    assert mapping.fc0.weight_gain == pytest.approx(0.01 / math.sqrt(12))
    stored = np.concatenate([np.ravel(mapping.fc0.weight[...]), np.ravel(mapping.fc1.weight[...])]) * 0.01
    assert 0.8 < stored.std() < 1.2 and abs(stored.mean()) < 0.2
    np.testing.assert_array_equal(mapping.fc1.bias[...], np.zeros(12, np.float32))


def _mbstd_reference(x, group, nf):
    """The reference's minibatch std on one GPU's batch, by a loop in float64."""
    n, h, w, c = x.shape
    g = min(group, n)
    out = np.zeros((n, h, w, nf))
    for i in range(n):
        members = [j for j in range(n) if j % (n // g) == i % (n // g)]  # stride-n/G groups
        xs = x[members].astype(np.float64).reshape(g, h, w, nf, c // nf)
        std = np.sqrt(xs.var(axis=0) + 1e-8)  # population variance over the group
        out[i] = std.mean(axis=(0, 1, 3))[None, None, :]
    return np.concatenate([x, out], axis=-1)


def test_minibatch_std_matches_numpy():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((8, 3, 5, 6)).astype(np.float32)
    reference = _mbstd_reference

    mbstd = jax.jit(minibatch_std, static_argnums=(1, 2))
    for group, nf in ((4, 2), (8, 3), (2, 6)):
        np.testing.assert_allclose(mbstd(jnp.asarray(x), group, nf), reference(x, group, nf),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mbstd(jnp.asarray(x[:2]), 4, 1), reference(x[:2], 4, 1), rtol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        minibatch_std(jnp.asarray(x[:6]), 4, 1)
    with pytest.raises(ValueError, match="channels"):
        minibatch_std(jnp.asarray(x), 4, 4)


def test_minibatch_std_groups_within_each_device():
    """Under a mesh each device's rows (3 of 24 here, G = 3) form their own groups, as each GPU's batch does in the
    reference: the same numbers as the one-GPU reference on every device's part."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    rng = np.random.default_rng(13)
    x = rng.standard_normal((24, 2, 3, 4)).astype(np.float32)
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "fsdp"))  # Auto axes, as the loop's
    mbstd = jax.jit(minibatch_std, static_argnums=(1, 2))
    sharded = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
    with jax.set_mesh(mesh):
        got = mbstd(sharded, 4, 2)
        program = mbstd.lower(sharded, 4, 2).compile().as_text()
    assert not any(op in program for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute"))
    expected = np.concatenate([_mbstd_reference(part, 4, 2) for part in np.split(x, 8)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    explicit = minibatch_std(jnp.asarray(x), 4, 1, num_shards=2)  # 2 parts of 12 rows, G = 4
    np.testing.assert_allclose(explicit, np.concatenate([_mbstd_reference(p, 4, 1) for p in np.split(x, 2)]),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not split into 5"):
        minibatch_std(jnp.asarray(x), 4, 1, num_shards=5)
    with pytest.raises(ValueError, match="per device"):
        minibatch_std(jnp.asarray(x[:18]), 4, 1, num_shards=2)  # 9 rows per device, G = 4


# --------------------------------------------------------------------------------------------------
# Mapping, truncation, w_avg


def test_truncation_moves_toward_w_avg(G):
    z = _z()
    ws, psi0, psi4, cut = _jit_apply(G.mapping, lambda m, z: (
        m(z), m(z, truncation_psi=0.0), m(z, truncation_psi=0.4),
        m(z, truncation_psi=0.4, truncation_cutoff=3)), z)
    assert ws.shape == (4, G.num_ws, W) and G.num_ws == 2 * 5 - 2
    np.testing.assert_array_equal(ws, jnp.broadcast_to(ws[:, :1], ws.shape))  # one w, broadcast
    w_avg = G.mapping.w_avg[...]
    np.testing.assert_allclose(psi0, jnp.broadcast_to(w_avg, ws.shape), atol=1e-6)
    np.testing.assert_allclose(psi4, w_avg + 0.4 * (ws - w_avg), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cut[:, :3], w_avg + 0.4 * (ws[:, :3] - w_avg), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cut[:, 3:], ws[:, 3:])
    # The mapping itself, against numpy: normalise z, then the equalised-lr lrelu layers.
    x = np.asarray(z, np.float64)
    x = x / np.sqrt(np.mean(x ** 2, axis=1, keepdims=True) + 1e-8)
    for i in range(2):
        x = np_fc(getattr(G.mapping, f"fc{i}"), x)
    np.testing.assert_allclose(ws[:, 0], x, rtol=1e-4, atol=1e-6)


def test_w_avg_update(G):
    mapping = nnx.clone(G.mapping)
    z = _z(seed=3)
    old = np.asarray(mapping.w_avg[...])
    w = np.asarray(mapping(z)[:, 0])
    np.testing.assert_array_equal(mapping.w_avg[...], old)  # no update by default
    mapping(z, update_emas=True)
    want = w.mean(0) + 0.995 * (old - w.mean(0))
    np.testing.assert_allclose(mapping.w_avg[...], want, rtol=1e-5, atol=1e-6)
    # Under nnx.jit the update propagates back to the module, and again through split/merge.
    nnx.jit(lambda m, z: m(z, update_emas=True))(mapping, z)
    want2 = w.mean(0) + 0.995 * (want - w.mean(0))
    np.testing.assert_allclose(mapping.w_avg[...], want2, rtol=1e-5, atol=1e-6)
    graphdef, state = nnx.split(mapping)

    @jax.jit
    def step(state, z):
        m = nnx.merge(graphdef, state)
        m(z, update_emas=True)
        return nnx.state(m)

    new_state = step(state, z)
    want3 = w.mean(0) + 0.995 * (want2 - w.mean(0))
    np.testing.assert_allclose(new_state["w_avg"][...], want3, rtol=1e-5, atol=1e-6)
    assert nnx.state(mapping, nnx.Param) and "w_avg" not in nnx.state(mapping, nnx.Param)


def test_conditional_mapping():
    m = _filled(sg.MappingNetwork, 13, Z, 3, W, 4, num_layers=2)
    z = jnp.repeat(_z(1), 3, 0)
    ws = m(z, jnp.eye(3))
    assert ws.shape == (3, 4, W)
    assert _maxdiff(ws[0], ws[1]) > 1e-3
    with pytest.raises(ValueError, match="c must be"):
        m(z)
    d_map = _filled(sg.MappingNetwork, 14, 0, 3, 6, None, num_layers=1, w_avg_beta=None)
    assert d_map(None, jnp.eye(3)).shape == (3, 6) and d_map.w_avg is None
    with pytest.raises(ValueError, match="w_avg"):
        d_map(None, jnp.eye(3), truncation_psi=0.5)


# --------------------------------------------------------------------------------------------------
# Synthesis, generator, discriminator


def test_generator_wplus_and_noise(G, synthesize):
    z = _z()
    ws = G.mapping(z)
    img, noisy = synthesize(ws)
    assert img.shape == (4, RES, RES, 3) and np.isfinite(np.asarray(img)).all()
    img2, noisy2 = synthesize(ws)
    np.testing.assert_array_equal(img2, img)  # const noise: reproducible
    np.testing.assert_array_equal(noisy2, noisy)  # same key, same noise
    _, noisy3 = synthesize(ws, _key(1))
    assert _maxdiff(noisy, noisy3) > 1e-3 and _maxdiff(noisy, img) > 1e-3
    # Every W+ row reaches the output.
    delta = jnp.asarray(np.random.default_rng(4).standard_normal((4, W)), jnp.float32)
    for i in range(G.num_ws):
        changed, _ = synthesize(ws.at[:, i].add(delta))
        assert _maxdiff(changed, img) > 1e-4, f"ws[:, {i}] has no effect"
    # Random noise: one independent N(0, 1) map per conv layer, drawn at once.
    maps = G.synthesis._draw_noise(4, _key(2))
    assert sorted(maps) == [4, 8, 16, 32]
    assert [m.shape for m in maps[8]] == [(4, 8, 8, 1)] * 2 and len(maps[4]) == 1
    flat = np.concatenate([np.ravel(m) for r in maps for m in maps[r]])
    assert abs(flat.mean()) < 0.05 and 0.95 < flat.std() < 1.05
    assert _maxdiff(maps[8][0], maps[8][1]) > 0.5
    with pytest.raises(ValueError, match="PRNG key"):
        G.synthesis(ws, noise_mode="random")
    # G(..., rngs=...) takes a key or an nnx.Rngs (its `noise` stream).
    assert sg._as_key(nnx.Rngs(noise=_key(3))).dtype == _key(3).dtype
    with pytest.raises(ValueError, match="rngs must be"):
        sg._as_key(3)
    with pytest.raises(ValueError, match="noise_mode"):
        G.synthesis(ws, noise_mode="off")
    with pytest.raises(ValueError, match=r"ws must be \[N, 8, 8\]"):
        G.synthesis(ws[:, :-1])
    with pytest.raises(ValueError, match=r"z must be \[N, 8\]"):
        G(jnp.ones((2, 9)))


def test_noise_modes_on_a_layer():
    layer = _filled(sg.SynthesisLayer, 15, 4, 4, W, 6, impl="xla")
    x = jnp.asarray(np.random.default_rng(16).standard_normal((2, 6, 6, 4)), jnp.float32)
    w = jnp.ones((2, W))
    run = _fast_jit(lambda m, key: (m(x, w, "const"), m(x, w, "none"), m(x, w, "random", key)))
    const, none, r0 = run(layer, _key(0))
    _, _, r1 = run(layer, _key(1))
    assert _maxdiff(const, none) > 1e-3 and _maxdiff(r0, r1) > 1e-3
    np.testing.assert_array_equal(run(layer, _key(0))[2], r0)
    # Random noise is one [H, W] map per sample, shared by the channels and scaled by the strength.
    d = np.asarray(r0 - none)
    pos = (np.asarray(r0) > 0) & (np.asarray(none) > 0)  # where lrelu is the identity (times sqrt 2)
    ref = np.where(pos[..., :1], d[..., :1], np.nan)
    both = pos & pos[..., :1]
    np.testing.assert_allclose(np.where(both, d, 0), np.where(both, np.broadcast_to(ref, d.shape), 0),
                               atol=1e-5)
    # With zero strength every mode gives the noise-free output.
    layer.noise_strength[...] = jnp.zeros(())
    for out in run(layer, _key(0)):
        np.testing.assert_allclose(out, none, rtol=1e-6, atol=1e-6)


def test_style_mixing(G):
    z = _z(seed=6)
    ws1, ws2 = G.mapping(z), G.mapping(_z(seed=7))
    mixed = sg.mix_styles(ws1, ws2, 3)
    np.testing.assert_array_equal(mixed[:, :3], ws1[:, :3])
    np.testing.assert_array_equal(mixed[:, 3:], ws2[:, 3:])
    mix = _fast_jit(lambda g, z, key, prob: sg.style_mixing(g, z, None, prob, key))
    for key in range(4):
        ws, cutoff = mix(G, z, _key(key), 1.0)
        cutoff = int(cutoff)
        assert 1 <= cutoff < G.num_ws
        np.testing.assert_allclose(ws[:, :cutoff], ws1[:, :cutoff], rtol=1e-6)
        assert np.abs(np.asarray(ws[:, cutoff:]) - np.asarray(ws1[:, cutoff:])).max(-1).min() > 1e-4
    ws, cutoff = mix(G, z, _key(0), 0.0)
    assert int(cutoff) == G.num_ws
    np.testing.assert_allclose(ws, ws1, rtol=1e-6)


def test_gradients_finite():
    """Gradients of the non-saturating G loss w.r.t. G and D (8 px: a const and an up block)."""
    g = _filled(sg.Generator, 2, **dict(G_KW, img_resolution=8))
    d = _filled(sg.Discriminator, 3, **dict(D_KW, img_resolution=8))
    z = _z()

    # The functional training pattern: differentiate the parameters, keep the buffers aside.
    g_def, g_params, g_rest = nnx.split(g, nnx.Param, ...)
    d_def, d_params, d_rest = nnx.split(d, nnx.Param, ...)

    def loss(g_params, d_params):
        fake = nnx.merge(g_def, g_params, g_rest)(z)
        return jnp.mean(jax.nn.softplus(-nnx.merge(d_def, d_params, d_rest)(fake)))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), compiler_options=FAST_COMPILE)
    value, grads = step(g_params, d_params)
    g_grads, d_grads = (nnx.to_pure_dict(x) for x in grads)
    assert np.isfinite(float(value)) and float(value) > 0
    for grads in (g_grads, d_grads):
        leaves = jax.tree.leaves(grads)
        assert leaves and all(np.isfinite(np.asarray(v)).all() for v in leaves)
    for grad in (g_grads["synthesis"]["b4"]["const"], g_grads["synthesis"]["b8"]["conv0"]["weight"],
                 g_grads["mapping"]["fc0"]["weight"], d_grads["b8"]["fromrgb"]["weight"],
                 d_grads["b4"]["out"]["bias"]):
        assert np.abs(np.asarray(grad)).sum() > 0
    assert "w_avg" not in g_grads["mapping"]  # buffers are not differentiated
    with pytest.raises(ValueError, match=r"img must be \[N, 8, 8, 3\]"):
        d(jnp.zeros((4, 16, 16, 3)))


# --------------------------------------------------------------------------------------------------
# Configuration checks and parameter counts


def test_bad_configurations():
    for res in (48, 2, 0):
        with pytest.raises(ValueError, match="power of two"):
            nnx.eval_shape(lambda: sg.Generator(img_resolution=res, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="channel_base"):
        nnx.eval_shape(lambda: sg.Generator(img_resolution=64, channel_base=32, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="up must be"):
        nnx.eval_shape(lambda: sg.SynthesisLayer(4, 4, 4, 8, up=4, rngs=nnx.Rngs(0)))


def expected_generator_params(z_dim, c_dim, w_dim, res, img_channels, mapping_layers, cbase, cmax):
    """Layer by layer, as the reference networks define them (parameters only, no buffers)."""
    ch = lambda r: min(cbase // r, cmax)  # noqa: E731
    n = 0
    if c_dim:
        n += c_dim * w_dim + w_dim  # mapping.embed
    fan_in = z_dim + (w_dim if c_dim else 0)
    for _ in range(mapping_layers):  # mapping.fc*
        n += fan_in * w_dim + w_dim
        fan_in = w_dim
    for log2 in range(2, int(math.log2(res)) + 1):
        r = 2 ** log2
        convs = [(ch(r), ch(r))] if r == 4 else [(ch(r // 2), ch(r)), (ch(r), ch(r))]
        if r == 4:
            n += ch(4) * 4 * 4  # const
        for cin, cout in convs:  # affine, weight, noise_strength, bias
            n += (w_dim * cin + cin) + cout * cin * 9 + 1 + cout
        n += (w_dim * ch(r) + ch(r)) + img_channels * ch(r) + img_channels  # torgb
    return n


def expected_discriminator_params(c_dim, res, img_channels, cbase, cmax, mapping_layers=8, mbstd=1):
    ch = lambda r: min(cbase // r, cmax)  # noqa: E731
    n = 0
    for log2 in range(int(math.log2(res)), 2, -1):
        r = 2 ** log2
        tmp, out = ch(r), ch(r // 2)
        if r == res:
            n += img_channels * tmp + tmp  # fromrgb
        n += (tmp * tmp * 9 + tmp) + (tmp * out * 9 + out) + tmp * out  # conv0, conv1, skip
    c4 = ch(4)
    cmap = c4 if c_dim else 0
    if c_dim:
        n += c_dim * cmap + cmap + mapping_layers * (cmap * cmap + cmap)
    n += ((c4 + mbstd) * c4 * 9 + c4) + (c4 * 16 * c4 + c4) + (c4 * (cmap or 1) + (cmap or 1))
    return n


@pytest.mark.parametrize("name, res, cbase, map_layers, c_dim, g_total, d_total", [
    # StyleGAN2-ADA `paper256`: fmaps 0.5 -> channel_base 16384. Published summaries: the TF ADA
    # G at 256 px with this channel schedule and a 2-layer mapping has 23,191,522 parameters;
    # 6 more 512x512 mapping layers add 6 * 262,656.
    ("paper256", 256, 16384, 8, 0, 23_191_522 + 6 * 262_656, 24_001_089),
    # Config F (`stylegan2`, 1024 px): the PyTorch ADA training log prints G 28,794,124 with a
    # 2-layer mapping (so 30,370,060 with 8) and D 29,012,513.
    ("stylegan2", 1024, 32768, 8, 0, 28_794_124 + 6 * 262_656, 29_012_513),
    ("cond256", 256, 16384, 2, 10, None, None),
])
def test_parameter_counts(name, res, cbase, map_layers, c_dim, g_total, d_total):
    G = nnx.eval_shape(lambda: sg.Generator(512, c_dim, 512, res, 3, mapping_layers=map_layers,
                                            channel_base=cbase, channel_max=512, rngs=nnx.Rngs(0)))
    D = nnx.eval_shape(lambda: sg.Discriminator(c_dim, res, 3, channel_base=cbase, channel_max=512,
                                                rngs=nnx.Rngs(0)))
    g_want = expected_generator_params(512, c_dim, 512, res, 3, map_layers, cbase, 512)
    d_want = expected_discriminator_params(c_dim, res, 3, cbase, 512)
    assert sg.count_params(G) == g_want
    assert sg.count_params(D) == d_want
    if g_total is not None:
        assert g_want == g_total and d_want == d_total
    assert G.num_ws == 2 * int(math.log2(res)) - 2
    # Buffers exist in the state but are not parameters.
    assert nnx.state(G, nnx.BatchStat)["mapping"]["w_avg"].shape == (512,)
    assert len(jax.tree.leaves(nnx.state(G, Buffer))) == G.num_ws - 1  # one noise map per conv


def test_tiny_config_counts(G):
    D = nnx.eval_shape(lambda: sg.Discriminator(**D_KW, rngs=nnx.Rngs(0)))
    assert sg.count_params(G) == expected_generator_params(Z, 0, W, RES, 3, 2, 256, 16)
    assert sg.count_params(D) == expected_discriminator_params(0, RES, 3, 256, 16)
    assert [sg.channels_for(r, 256, 16) for r in (4, 8, 16, 32)] == [16, 16, 16, 8]
