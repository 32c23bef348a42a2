"""Activation maps (seed 003): which channels of each stage fire on an image, and which images of a
data set fire each channel most. Beside the attribution maps they show what a network computes, not
why it decided, so they are a view, not an explanation score.

- `channel_scores(maps)`: mean activation of every channel over the spatial positions, [N, C].
- `most_active_channels(maps, k)`: for each image the k channels with the largest mean activation.
- `top_activating_images(feature_fn, batches, name, k)`: for every channel of the named map, the k
  images (indices into the stream of batches) with the largest mean activation, streamed so a data
  set never has to fit in memory.
- `channel_grid(maps, channels)`: one image's chosen channels as a colour-mapped grid with a colour
  bar (one shared scale, so channels compare), uint8, ready for `Report.add_image_grid`.

They work on any named feature maps [N, h, w, C]: a ResNet's stages, an i-ResNet's stage outputs
(the last is z) and VisCoIN's concept maps phi.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

FeatureFn = Callable[[jax.Array], Mapping[str, jax.Array]]  # images -> {name: [N, h, w, C]}


def _check_maps(maps, name: str = "feature maps") -> np.ndarray:
    m = np.asarray(maps)
    if m.ndim != 4 or min(m.shape) == 0:
        raise ValueError(f"{name} must be a non-empty [N, h, w, C] array, got shape {m.shape}")
    if not np.issubdtype(m.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got {m.dtype}")
    return m


def spatial_maps(features: Mapping[str, jax.Array]) -> list[str]:
    """Names of the [N, h, w, C] maps among `features` (pooled vectors are left out), in their order."""
    return [k for k, v in features.items() if np.ndim(v) == 4]


def channel_scores(maps) -> np.ndarray:
    """Mean activation of each channel over its spatial positions: [N, C] float32."""
    return np.asarray(jnp.mean(jnp.asarray(_check_maps(maps), jnp.float32), axis=(1, 2)))


def most_active_channels(maps, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(channels [N, k], scores [N, k]): each image's k channels of largest mean activation, largest
    first (ties: the lower channel index first)."""
    scores = channel_scores(maps)
    if not 1 <= int(k) <= scores.shape[1]:
        raise ValueError(f"k must lie in [1, {scores.shape[1]}] (the number of channels), got {k}")
    order = np.argsort(-scores, axis=1, kind="stable")[:, : int(k)]
    return order, np.take_along_axis(scores, order, axis=1)


class TopImages(NamedTuple):
    ids: np.ndarray  # [C, k] indices of the images in the stream, largest activation first (-1: too few images)
    scores: np.ndarray  # [C, k] their mean activation (-inf where ids is -1)


def top_activating_images(feature_fn: FeatureFn, batches: Iterable, name: str, k: int) -> TopImages:
    """For every channel of feature map `name`, the k images of `batches` (arrays [B, H, W, 3]) with
    the largest mean activation; ids count images across the batches in order."""
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    best_s = best_i = None
    offset = 0
    for batch in batches:
        feats = feature_fn(jnp.asarray(batch))
        if name not in feats:
            raise ValueError(f"no feature map {name!r}; the model gives {sorted(feats)}")
        s = channel_scores(feats[name]).T  # [C, B]
        ids = np.broadcast_to(np.arange(offset, offset + s.shape[1]), s.shape)
        offset += s.shape[1]
        if best_s is None:
            best_s = np.full((s.shape[0], 0), -np.inf, np.float32)
            best_i = np.zeros((s.shape[0], 0), np.int64)
        all_s, all_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, ids], 1)
        order = np.argsort(-all_s, axis=1, kind="stable")[:, : int(k)]
        best_s, best_i = np.take_along_axis(all_s, order, 1), np.take_along_axis(all_i, order, 1)
    if best_s is None:
        raise ValueError("no images: the batches were empty")
    pad = int(k) - best_s.shape[1]
    if pad > 0:
        best_s = np.pad(best_s, ((0, 0), (0, pad)), constant_values=-np.inf)
        best_i = np.pad(best_i, ((0, 0), (0, pad)), constant_values=-1)
    return TopImages(best_i, best_s)


COLOUR_BAR_HEIGHT = 6  # pixels of each tile height the colour bar takes


def channel_grid(maps, channels, *, cols: int = 4, scale: int = 4, cmap: str = "viridis"
                 ) -> tuple[np.ndarray, tuple[float, float]]:
    """(image uint8 [H', W', 3], (low, high)): one image's channels `channels` of `maps` [h, w, C],
    tiled `cols` per row, each pixel enlarged `scale` times, coloured on one shared scale from the
    lowest to the highest value shown, with a colour bar (low at the left) along the bottom."""
    m = np.asarray(maps)
    if m.ndim != 3:
        raise ValueError(f"maps must be one image's [h, w, C] feature maps, got shape {m.shape}")
    channels = np.asarray(channels, np.int64).reshape(-1)
    if channels.size == 0 or channels.min() < 0 or channels.max() >= m.shape[-1]:
        raise ValueError(f"channels must be non-empty indices in [0, {m.shape[-1]}), got {channels.tolist()}")
    if int(cols) < 1 or int(scale) < 1:
        raise ValueError(f"cols and scale must be >= 1, got {cols}, {scale}")
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown matplotlib colormap {cmap!r}") from None
    tiles = m[..., channels].astype(np.float64)  # [h, w, k]
    if not np.all(np.isfinite(tiles)):
        raise ValueError("feature maps have non-finite values")
    lo, hi = float(tiles.min()), float(tiles.max())
    unit = (tiles - lo) / (hi - lo) if hi > lo else np.zeros_like(tiles)
    h, w, k = unit.shape
    cols = min(int(cols), k)
    rows = -(-k // cols)
    gap = 1
    th, tw = h * scale, w * scale
    canvas = np.ones((rows * (th + gap) + COLOUR_BAR_HEIGHT * scale // 2 + gap, cols * (tw + gap) - gap, 3))
    for j in range(k):
        r, c = divmod(j, cols)
        tile = colormap(np.kron(unit[..., j], np.ones((scale, scale))))[..., :3]
        canvas[r * (th + gap): r * (th + gap) + th, c * (tw + gap): c * (tw + gap) + tw] = tile
    bar = colormap(np.linspace(0.0, 1.0, canvas.shape[1]))[None, :, :3]
    canvas[rows * (th + gap):] = bar
    return np.round(canvas * 255).astype(np.uint8), (lo, hi)


__all__ = ["FeatureFn", "TopImages", "spatial_maps", "channel_scores", "most_active_channels",
           "top_activating_images", "channel_grid"]


# ----------------------------------------------------------------------------------------------
# The report's view


def add_activation_views(report, out, feature_fn: FeatureFn, images, training_images, *, subject: str,
                         names=None, top_channels: int = 8, top_images: int = 6, shown_images: int = 4,
                         shown_channels: int = 4, batch_size: int = 64) -> dict:
    """Fills `report` with, per feature map (`names`, default every spatial map feature_fn gives):
    the most active channels of the first `shown_images` images as a grid with its colour range,
    and the `top_images` training images that activate the `shown_channels` channels most active
    on the explained images. Saves OUT/activations_<subject>.npz; returns summary rows."""
    from .report import save_arrays, to_uint8

    feats = feature_fn(jnp.asarray(images))
    names = list(names) if names is not None else spatial_maps(feats)
    if not names:
        raise ValueError(f"{subject}: the model gives no spatial feature maps to show")
    train = np.asarray(training_images)
    arrays, summary = {}, {}
    for name in names:
        maps = np.asarray(feats[name])
        k = min(int(top_channels), maps.shape[-1])
        chans, scores = most_active_channels(maps, k)
        arrays[f"{name}_channels"], arrays[f"{name}_scores"] = chans, scores
        grids, caps = [], []
        for i in range(min(int(shown_images), maps.shape[0])):
            grid, (lo, hi) = channel_grid(maps[i], chans[i], cols=4, scale=max(1, 64 // maps.shape[1]))
            grids.append(grid)
            caps.append(f"image {i}: channels {', '.join(map(str, chans[i]))} (colour bar {lo:.2f} .. {hi:.2f})")
        width = max(g.shape[1] for g in grids)
        height = max(g.shape[0] for g in grids)
        padded = np.stack([np.pad(g, ((0, height - g.shape[0]), (0, width - g.shape[1]), (0, 0)),
                                  constant_values=255) for g in grids])
        report.add_image_grid(f"{subject}, {name}: the {k} most active channels (mean activation), one "
                              "colour scale per image", padded, caps, cols=min(2, len(grids)))
        # the channels most active on average over the explained images, and their top training images
        shown = np.argsort(-channel_scores(maps).mean(0), kind="stable")[: int(shown_channels)]
        top = top_activating_images(feature_fn, (train[s: s + batch_size] for s in range(0, len(train), batch_size)),
                                    name, int(top_images))
        arrays[f"{name}_top_image_ids"], arrays[f"{name}_top_image_scores"] = top.ids, top.scores
        for c in shown:
            ids = top.ids[c][top.ids[c] >= 0]
            report.add_image_grid(f"{subject}, {name}, channel {c}: the training images that activate it most",
                                  to_uint8(train[ids]), [f"#{i} mean {s:.2f}" for i, s in zip(ids, top.scores[c])],
                                  cols=max(len(ids), 1))
        summary[f"{subject} {name}: channels"] = int(maps.shape[-1])
        summary[f"{subject} {name}: share of channels never active on these images"] = float(
            np.mean(np.all(maps <= 0, axis=(0, 1, 2))))
    save_arrays(out, f"activations_{subject.replace(' ', '_')}", **arrays)
    return summary


__all__ += ["add_activation_views"]
