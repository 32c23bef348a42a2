"""Activation maps: the chosen channels, the top-activating images and the colour-mapped grid
against direct numpy computations (float64) on random maps of odd sizes; the i-ResNet's stage
outputs against its forward pass; the report view end to end on a random ResNet."""

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
from flax import nnx

from viscoin_jax.explain import activations as act
from viscoin_jax.explain.report import Report
from viscoin_jax.models.resnet import ResNet
from tests.test_iresnet import IN_SHAPE, _images, numpy_iresnet


def test_most_active_channels_against_numpy():
    rng = np.random.default_rng(1)
    maps = rng.standard_normal((5, 3, 7, 11)).astype(np.float32)
    k = 4
    chans, scores = act.most_active_channels(maps, k)
    ref_scores = maps.astype(np.float64).mean(axis=(1, 2))
    for i in range(5):
        ref = sorted(range(11), key=lambda c: -ref_scores[i, c])[:k]
        assert chans[i].tolist() == ref
        np.testing.assert_allclose(scores[i], ref_scores[i, ref], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="k must lie in"):
        act.most_active_channels(maps, 12)
    with pytest.raises(ValueError, match=r"\[N, h, w, C\]"):
        act.channel_scores(maps[0])


def test_top_activating_images_against_a_direct_loop():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((3, 5)).astype(np.float32)
    images = rng.uniform(-1, 1, (13, 7, 5, 3)).astype(np.float32)

    def feature_fn(x):
        return {"a": jax.nn.relu(x @ weight), "pooled": jnp.mean(x, axis=(1, 2))}

    k = 3
    batches = [images[s:s + 4] for s in range(0, 13, 4)]  # 4, 4, 4, 1: uneven batches
    top = act.top_activating_images(feature_fn, batches, "a", k)
    ref = np.maximum(images.astype(np.float64) @ weight.astype(np.float64), 0).mean(axis=(1, 2))  # [13, 5]
    for c in range(5):
        order = sorted(range(13), key=lambda i: -ref[i, c])[:k]
        np.testing.assert_allclose(top.scores[c], ref[order, c], rtol=1e-5, atol=1e-6)
        assert top.ids[c].tolist() == order
    # fewer images than k: the rest is marked -1
    few = act.top_activating_images(feature_fn, [images[:2]], "a", 5)
    assert (few.ids[:, 2:] == -1).all() and np.isneginf(few.scores[:, 2:]).all()
    assert act.spatial_maps(feature_fn(images[:1])) == ["a"]
    with pytest.raises(ValueError, match="no feature map 'b'"):
        act.top_activating_images(feature_fn, batches, "b", k)
    with pytest.raises(ValueError, match="batches were empty"):
        act.top_activating_images(feature_fn, [], "a", k)


def test_channel_grid_colours_and_colour_bar():
    rng = np.random.default_rng(3)
    maps = rng.standard_normal((5, 3, 9))
    chans = [7, 2, 4]
    grid, (lo, hi) = act.channel_grid(maps, chans, cols=2, scale=3, cmap="viridis")
    shown = maps[..., chans]
    assert (lo, hi) == (shown.min(), shown.max())
    cmap = matplotlib.colormaps["viridis"]
    th, tw, gap = 5 * 3, 3 * 3, 1
    for j, c in enumerate(chans):
        r, col = divmod(j, 2)
        for (y, x) in ((0, 0), (4, 2), (2, 1)):
            want = np.round(np.asarray(cmap((maps[y, x, c] - lo) / (hi - lo))[:3]) * 255)
            got = grid[r * (th + gap) + y * 3 + 1, col * (tw + gap) + x * 3 + 1]
            np.testing.assert_allclose(got, want, atol=1)
    bar = grid[-1]  # the colour bar runs from the colormap's low end to its high end
    np.testing.assert_allclose(bar[0], np.round(np.asarray(cmap(0.0)[:3]) * 255), atol=1)
    np.testing.assert_allclose(bar[-1], np.round(np.asarray(cmap(1.0)[:3]) * 255), atol=1)
    with pytest.raises(ValueError, match="indices in"):
        act.channel_grid(maps, [9])
    with pytest.raises(ValueError, match="colormap"):
        act.channel_grid(maps, [1], cmap="nope")


def test_iresnet_stage_outputs_end_in_z():
    model = numpy_iresnet(seed=4)
    x = _images(5, n=3)
    stages = model.stage_outputs(x)
    assert list(stages) == ["stage1", "stage2"]
    np.testing.assert_allclose(np.asarray(stages["stage2"]), np.asarray(model.forward(x)), rtol=1e-6, atol=1e-6)
    assert stages["stage1"].shape == (3, IN_SHAPE[0] // 2, IN_SHAPE[1] // 2, 16)


def test_activation_view_on_a_resnet(tmp_path):
    model = ResNet(18, 3, width=4, small_input=True, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(6)
    images = rng.uniform(-1, 1, (3, 12, 12, 3)).astype(np.float32)
    train = rng.uniform(-1, 1, (7, 12, 12, 3)).astype(np.float32)

    def feature_fn(x):
        return model(x)[1]

    report = Report("t")
    summary = act.add_activation_views(report, tmp_path, feature_fn, images, train, subject="f",
                                       names=["stage1", "stage3"], top_channels=3, top_images=2, batch_size=3)
    saved = np.load(tmp_path / "activations_f.npz")
    for name in ("stage1", "stage3"):
        ref = np.asarray(feature_fn(images)[name], np.float64).mean(axis=(1, 2))
        for i in range(3):
            want = np.sort(ref[i])[::-1][:3]
            np.testing.assert_allclose(ref[i, saved[f"{name}_channels"][i]], want, rtol=1e-5, atol=1e-6)
        train_ref = np.asarray(feature_fn(train)[name], np.float64).mean(axis=(1, 2))
        best = saved[f"{name}_top_image_ids"][:, 0]
        np.testing.assert_allclose(train_ref[best, np.arange(len(best))], train_ref.max(0), rtol=1e-5, atol=1e-6)
        assert summary[f"f {name}: channels"] == ref.shape[1]
    assert report.num_images > 0
