"""modulated_conv2d's `block_sizes`: explicit tiles give the default path's values and the float64
definition's, forward and backward; bad tiles fail at once with a one-line ValueError."""

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_reference import modulated_conv2d_np, rel_err
from viscoin_jax.kernels import ConvBlockSizes, lowering_for, modulated_conv2d, setup_filter

FIR = setup_filter([1, 3, 3, 1])

# (x shape [N, H, W, Cin], kernel size, Cout, up, down, padding): odd sizes, Cin above one 16-channel
# block so that explicit channel blocks change the input-channel loop.
CASES = [((2, 7, 5, 37), 3, 19, 1, 1, 1), ((1, 5, 7, 33), 3, 21, 2, 1, 0), ((1, 9, 11, 17), 3, 5, 1, 2, 0)]
BLOCKS = [ConvBlockSizes(tile_h=1, tile_w=16, block_in=16, block_out=16),
          ConvBlockSizes(tile_h=4, tile_w=8, block_in=64, block_out=32)]


def _inputs(case, seed):
    shape, k, cout, *_ = CASES[case]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((k, k, shape[-1], cout)).astype(np.float32)
    s = (rng.standard_normal((shape[0], shape[-1])) * 0.5 + 1.0).astype(np.float32)
    return x, w, s


def _op(case, impl, block_sizes=None):
    _, _, _, up, down, padding = CASES[case]
    f = FIR if (up > 1 or down > 1) else None
    return lambda x, w, s: modulated_conv2d(x, w, s, True, up, down, padding, f, impl=impl,
                                            block_sizes=block_sizes)


@pytest.mark.parametrize("blocks", range(len(BLOCKS)))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_explicit_block_sizes_match_default_and_float64_definition(case, blocks):
    x, w, s = _inputs(case, seed=100 + 10 * case + blocks)
    _, _, _, up, down, padding = CASES[case]
    expected = modulated_conv2d_np(x.astype(np.float64), w.astype(np.float64), s.astype(np.float64),
                                   True, up, down, padding, FIR if (up > 1 or down > 1) else None)
    args = (jnp.asarray(x), jnp.asarray(w), jnp.asarray(s))
    got = _op(case, "interpret", BLOCKS[blocks])(*args)
    default = _op(case, "interpret")(*args)
    assert got.shape == default.shape == expected.shape
    assert rel_err(got, default) < 1e-6  # only the summation order may differ
    assert rel_err(got, expected) < 1e-5


def test_tpu_layout_takes_tile_h():
    x, w, s = (jnp.asarray(a) for a in _inputs(1, seed=7))
    got = _op(1, "tpu_interpret", ConvBlockSizes(tile_h=2, tile_w=8, block_in=16, block_out=16))(x, w, s)
    assert rel_err(got, _op(1, "tpu_interpret")(x, w, s)) < 1e-6
    mc = importlib.import_module("viscoin_jax.kernels.modulated_conv2d")
    small = mc.tpu_vmem_estimate(x.shape, w.shape, 2, 1, (2, 1, 2, 1), ConvBlockSizes(2, 8, 16, 16))
    assert small < mc.tpu_vmem_estimate(x.shape, w.shape, 2, 1, (2, 1, 2, 1))


@pytest.mark.parametrize("case", [0, 1])
def test_gradients_with_explicit_block_sizes_match_default(case):
    # The backward pass (transposed conv, weight-gradient kernel) runs on the same tiles.
    x, w, s = (jnp.asarray(a) for a in _inputs(case, seed=200 + case))
    loss = lambda op: lambda *a: jnp.sum(jnp.sin(op(*a)))
    got = jax.grad(loss(_op(case, "interpret", BLOCKS[0])), argnums=(0, 1, 2))(x, w, s)
    default = jax.grad(loss(_op(case, "interpret")), argnums=(0, 1, 2))(x, w, s)
    expected = jax.grad(loss(_op(case, "xla")), argnums=(0, 1, 2))(x, w, s)
    for name, g, d, e in zip("xws", got, default, expected):
        assert rel_err(g, d) < 1e-5 and rel_err(g, e) < 1e-4, name


def test_automatic_choice_is_the_default():
    plans = importlib.import_module("viscoin_jax.kernels.plans")
    for rows, cols, cin, cout in [(3, 5, 3, 4), (16, 16, 512, 512), (1, 33, 17, 3)]:
        auto = ConvBlockSizes.automatic(rows, cols, cin, cout)
        for backend in ("gpu", "interpret", "tpu", "tpu_interpret"):
            assert plans.conv_tiles(backend, rows, cols, cin, cout, auto if "tpu" not in backend else None) == \
                plans.conv_tiles(backend, rows, cols, cin, cout)
    assert ConvBlockSizes(np.int64(8), 2, 16, 32) == ConvBlockSizes(8, 2, 16, 32)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_explicit_block_sizes_lower(platform):
    x = jax.ShapeDtypeStruct((2, 9, 7, 24), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 24, 40), jnp.float32)
    s = jax.ShapeDtypeStruct((2, 24), jnp.float32)
    op = lambda x, w, s: modulated_conv2d(x, w, s, padding=1, impl="pallas", block_sizes=BLOCKS[0])
    fn = jax.grad(lambda *a: jnp.sum(op(*a) ** 2), argnums=(0, 1, 2))
    with lowering_for(platform):
        text = jax.jit(fn).trace(x, w, s).lower(lowering_platforms=(platform,)).as_text()
    assert text.count("__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") >= 3


@pytest.mark.parametrize("kwargs,match", [
    (dict(tile_h=3, tile_w=8, block_in=16, block_out=16), "tile_h must be a positive power of two, got 3"),
    (dict(tile_h=4, tile_w=0, block_in=16, block_out=16), "tile_w must be a positive power of two, got 0"),
    (dict(tile_h=4, tile_w=8, block_in=16.0, block_out=16), "block_in must be a positive power of two"),
    (dict(tile_h=4, tile_w=8, block_in=16, block_out=True), "block_out must be a positive power of two"),
    (dict(tile_h=4, tile_w=8, block_in=8, block_out=16), "block_in must be at least 16"),
    (dict(tile_h=2, tile_w=4, block_in=16, block_out=16), r"tile_h \* tile_w must be at least 16"),
])
def test_bad_block_sizes_raise_one_line_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        ConvBlockSizes(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [(8, 16, 32, 64), {"tile_h": 8}, "auto"])
def test_block_sizes_must_be_the_dataclass(bad):
    x, w, s = jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 3, 2)), jnp.ones((1, 3))
    for impl in ("xla", "interpret"):  # checked before any dispatch, whatever the implementation
        with pytest.raises(ValueError, match="block_sizes must be a ConvBlockSizes or None") as info:
            modulated_conv2d(x, w, s, padding=1, impl=impl, block_sizes=bad)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_weight_gradient_split_over_pixel_parts_equals_the_reference(case):
    """The GPU weight gradient cut into parts (partial sums added after) gives the XLA path's gradient,
    for an explicit number of parts that divides the batch x pixel-tile steps, and one that does not
    is refused in one line."""
    x, w, s = (jnp.asarray(a) for a in _inputs(case, seed=300 + case))
    cot = jnp.asarray(np.random.default_rng(case).standard_normal(_op(case, "xla")(x, w, s).shape), jnp.float32)
    grad = lambda impl, blocks=None: jax.grad(lambda w: jnp.sum(_op(case, impl, blocks)(x, w, s) * cot))(w)
    want = grad("xla")
    blocks = dict(tile_h=1, tile_w=16, block_in=16, block_out=16)
    accepted, refused, steps = [], [], None
    for splits in range(2, 9):
        try:
            got = grad("interpret", ConvBlockSizes(**blocks, weight_grad_splits=splits))
        except ValueError as e:
            m = re.search(rf"weight_grad_splits={splits} must divide the weight gradient's (\d+) ", str(e))
            assert m and "\n" not in str(e).splitlines()[0], str(e)
            steps = int(m.group(1))
            refused.append(splits)
            continue
        assert rel_err(got, want) < 1e-5, splits
        accepted.append(splits)
    assert accepted and refused  # both paths were taken
    assert accepted == [d for d in range(2, 9) if steps % d == 0]  # exactly the divisors run


def test_automatic_weight_gradient_splits_are_the_smallest_divisor_reaching_the_target():
    plans = importlib.import_module("viscoin_jax.kernels.plans")
    rng = np.random.default_rng(5)
    for _ in range(200):
        steps, channel_programs, target = (int(v) for v in rng.integers(1, 400, 3))
        got = plans.weight_grad_splits(steps, channel_programs, None, target)
        ok = [d for d in range(1, steps + 1) if steps % d == 0 and d * channel_programs >= target]
        assert got == (ok[0] if ok else steps)
    # a 64 -> 64 channel layer at 256 px, batch 32: 2 channel programs alone would idle 130 of 132 SMs
    tiles = 32 * (256 // 8) * (256 // 16)
    splits = plans.weight_grad_splits(tiles, 2)
    assert splits * 2 >= plans.GPU_TARGET_PROGRAMS and tiles % splits == 0
    with pytest.raises(ValueError, match="weight_grad_splits must be an int >= 0"):
        ConvBlockSizes(8, 16, 32, 64, weight_grad_splits=-1)
