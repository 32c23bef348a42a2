"""ResNet model: parameter counts, input normalisation, batch-norm modes, feature taps, jit / split-merge.

Values against torch are checked in test_convert_resnet.py; here the model is filled with numpy
random parameters (building it through jax.random compiles one kernel per shape, slow on CPU).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from viscoin_jax.models.resnet import IMAGENET_MEAN, IMAGENET_STD, ResNet, count_params, stage_channels

# torchvision's published parameter counts (torchvision.models.resnet*, 1000 classes)
TORCHVISION_COUNTS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160}


def numpy_resnet(seed=0, **kwargs):
    """A ResNet whose parameters and BN statistics are numpy random values (no jax.random compiles)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ResNet(rngs=nnx.Rngs(0), **kwargs)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            v = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        elif name == "scale":
            v = 0.5 + rng.random(leaf.shape)
        elif name == "var":
            v = 0.5 + rng.random(leaf.shape)
        else:  # bias, mean
            v = 0.1 * rng.standard_normal(leaf.shape)
        return jnp.asarray(v, jnp.float32)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def _images(seed, n, size):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)), jnp.float32)


@functools.lru_cache(maxsize=None)
def _abstract(depth):
    return nnx.eval_shape(lambda: ResNet(depth, 1000, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("depth", [18, 50])
def test_param_counts_match_torchvision(depth):
    assert count_params(_abstract(depth)) == TORCHVISION_COUNTS[depth]


def test_feature_shapes_at_256px():
    """The maps VisCoIN reads at 256 px: 512x32x32, 1024x16x16, 2048x8x8 (penultimate block)."""
    graphdef, state = nnx.split(_abstract(50))
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                         jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32))
    logits, feats = out
    assert logits.shape == (2, 1000)
    assert feats["stage1"].shape == (2, 64, 64, 256)
    assert feats["stage2"].shape == (2, 32, 32, 512)
    assert feats["stage3"].shape == (2, 16, 16, 1024)
    assert feats["stage4"].shape == feats["stage4_penultimate"].shape == (2, 8, 8, 2048)
    assert feats["pooled"].shape == (2, 2048)
    assert stage_channels(50) == (256, 512, 1024, 2048) and stage_channels(18, 8) == (8, 16, 32, 64)


def test_normalize_matches_imagenet_stats():
    x = _images(0, 2, 5)
    x01 = (np.asarray(x, np.float64) + 1) / 2
    ref = (x01 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(ResNet.normalize(x), ref, rtol=1e-6, atol=1e-6)


def test_features_consistent_under_split_merge_jit():
    model = numpy_resnet(1, depth=18, num_classes=6, width=4)
    x = _images(1, 2, 35)
    # pure functional use: split / merge inside jax.jit
    graphdef, state = nnx.split(model)
    logits, feats = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    # taps: pooled is the mean of stage4, logits the linear head on it, stage4 the last block on
    # the penultimate map
    np.testing.assert_allclose(feats["pooled"], np.asarray(feats["stage4"]).mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    kernel, bias = np.asarray(model.fc.kernel[...]), np.asarray(model.fc.bias[...])
    np.testing.assert_allclose(logits, np.asarray(feats["pooled"]) @ kernel + bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.layer4[-1](feats["stage4_penultimate"], False), feats["stage4"], rtol=1e-5,
                               atol=1e-6)
    assert not np.allclose(feats["stage4_penultimate"], feats["stage4"])
    # 35 px: 7x7/2 stem -> 18, max-pool -> 9, then 5, 3, 2 (floor of strided convs)
    assert [feats[f"stage{i}"].shape[1] for i in range(1, 5)] == [9, 5, 3, 2]


def test_train_mode_uses_batch_stats_and_updates_running_stats():
    model = numpy_resnet(2, depth=18, num_classes=3, width=4, small_input=True)
    x = _images(2, 4, 16)
    old_mean = np.asarray(model.bn1.mean[...]).copy()
    old_var = np.asarray(model.bn1.var[...]).copy()
    pre = np.asarray(model.conv1(ResNet.normalize(x)), np.float64)  # stem conv output, [N, H, W, C]

    _, feats = nnx.jit(lambda m, x: m(x, train=True))(model, x)
    batch_mean, batch_var = pre.mean(axis=(0, 1, 2)), pre.var(axis=(0, 1, 2))
    np.testing.assert_allclose(model.bn1.mean[...], 0.9 * old_mean + 0.1 * batch_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bn1.var[...], 0.9 * old_var + 0.1 * batch_var, rtol=1e-5, atol=1e-6)
    # batch statistics normalise each stem channel to zero mean before the affine map
    scale, bias = np.asarray(model.bn1.scale[...]), np.asarray(model.bn1.bias[...])
    stem = np.maximum((pre - batch_mean) / np.sqrt(batch_var + 1e-5) * scale + bias, 0)
    # small_input: no stride, no max-pool in the stem, so stage1 keeps the 16x16 grid
    assert feats["stage1"].shape == (4, 16, 16, 4)
    # stage1 in train mode == layer1 (batch statistics do not depend on the running ones) on the
    # numpy stem normalised with the batch statistics
    y = jnp.asarray(stem, jnp.float32)
    for block in model.layer1:
        y = block(y, True)
    np.testing.assert_allclose(y, feats["stage1"], rtol=1e-4, atol=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown ResNet depth 20"):
        ResNet(20, 10, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_classes"):
        nnx.eval_shape(lambda: ResNet(18, 0, rngs=nnx.Rngs(0)))
    model = numpy_resnet(0, depth=18, num_classes=2, width=2)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        model(jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="floating point"):
        model(jnp.zeros((1, 32, 32, 3), jnp.int32))
    with pytest.raises(ValueError, match="at least 32x32"):
        model(jnp.zeros((1, 16, 16, 3)))


def test_max_pool_matches_a_loop_and_differentiates_under_jit():
    """The stem's max pool equals a direct loop (padding never wins) and jit(grad) works through it:
    the VisCoIN step differentiates through f's stem (the fallback perceptual loss)."""
    from viscoin_jax.models.resnet import max_pool_3x3_s2

    x = np.random.default_rng(0).normal(size=(2, 7, 6, 3)).astype(np.float32) - 5.0  # all negative
    got = np.asarray(max_pool_3x3_s2(jnp.asarray(x)))
    ref = np.full((2, 4, 3, 3), -np.inf)
    for i in range(4):
        for j in range(3):
            ref[:, i, j] = x[:, max(2 * i - 1, 0):2 * i + 2, max(2 * j - 1, 0):2 * j + 2].max(axis=(1, 2))
    np.testing.assert_array_equal(got, ref)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(max_pool_3x3_s2(v) ** 2)))(jnp.asarray(x))
    # each output's gradient 2 * max lands on its arg-max input
    assert np.isclose(float(np.sum(grad)), float(np.sum(2 * ref)), rtol=1e-5)
