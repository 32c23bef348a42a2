"""Metrics for attribution maps: the model-randomisation sanity check and deletion/insertion AUC.

- Sanity check (Adebayo et al. 2018, "Sanity Checks for Saliency Maps"): an explanation that
  describes the model must change when the model's learned weights are destroyed. Compare the maps
  of the trained model with those of a copy whose top layers (cascading) or all layers are
  re-initialised: a Spearman rank correlation near 1 means the method ignores the weights.
- Deletion / insertion (Petsiuk et al. 2018, RISE): remove the most important pixels first (replace
  them by a baseline) and watch the target probability fall (low AUC = good), or insert them into
  the baseline and watch it rise (high AUC = good).

Maps are [N, H, W] (reduce channels first, see `viscoin_jax.metrics.maps.reduce_channels`).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..checks import as_key, broadcast_to_images, check_choice, check_images, check_positive_int
from ..scores import SCORES, class_score, prepare_targets, resolve_targets
from .maps import normalize_maps, reduce_channels

# ----------------------------------------------------------------------------------------------
# Rank correlation and SSIM


def average_ranks(x) -> jax.Array:
    """1-based ranks along the last axis, ties given the mean of the ranks they span (as scipy's
    rankdata(method="average")): rank = (#smaller + #smaller-or-equal + 1) / 2."""
    x = jnp.asarray(x)
    s = jnp.sort(x, axis=-1)
    flat_s = s.reshape(-1, s.shape[-1])
    flat_x = x.reshape(-1, x.shape[-1])
    lo = jax.vmap(lambda a, v: jnp.searchsorted(a, v, side="left"))(flat_s, flat_x)
    hi = jax.vmap(lambda a, v: jnp.searchsorted(a, v, side="right"))(flat_s, flat_x)
    return ((lo + hi + 1).astype(jnp.float32) * 0.5).reshape(x.shape)


def spearman_correlation(a, b) -> jax.Array:
    """[N] Spearman rank correlation between a[n] and b[n] (each flattened), ties by average rank.

    NaN where either map is constant (no ranking), as scipy.stats.spearmanr.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"a and b must be batches [N, ...] of the same shape, got {a.shape} and {b.shape}")
    if a.size // a.shape[0] < 2:
        raise ValueError("need at least 2 values per map for a rank correlation")
    return _spearman(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))


@jax.jit
def _spearman(a, b):
    ra, rb = average_ranks(a), average_ranks(b)
    ra = ra - jnp.mean(ra, axis=1, keepdims=True)
    rb = rb - jnp.mean(rb, axis=1, keepdims=True)
    num = jnp.sum(ra * rb, axis=1)
    den = jnp.sqrt(jnp.sum(ra * ra, axis=1) * jnp.sum(rb * rb, axis=1))
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim(a, b, *, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> jax.Array:
    """[N] structural similarity (Wang et al. 2004) of 2-D maps a, b [N, H, W].

    Gaussian window (11, sigma 1.5), constants (k1 L)^2, (k2 L)^2 with L = data_range, local
    statistics without sample-size correction, averaged over the 'valid' window positions (the
    convention of tf.image.ssim). Maps must be at least win_size on each side.
    """
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"a and b must be maps [N, H, W] of the same shape, got {a.shape} and {b.shape}")
    win_size = check_positive_int(win_size, "win_size")
    if min(a.shape[1:]) < win_size:
        raise ValueError(f"maps {a.shape[1:]} are smaller than the SSIM window {win_size}")
    window = jnp.asarray(_gaussian_window(win_size, sigma), jnp.float32)
    return _ssim(a, b, window, float(data_range), float(k1), float(k2))


@jax.jit
def _ssim(a, b, window, data_range, k1, k2):
    def blur(x):  # separable 'valid' filtering of [N, H, W]
        x = jax.vmap(lambda r: jnp.convolve(r, window, mode="valid", precision=jax.lax.Precision.HIGHEST),
                     in_axes=0)(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], x.shape[1], -1)
        x = jnp.swapaxes(x, 1, 2)
        x = jax.vmap(lambda r: jnp.convolve(r, window, mode="valid", precision=jax.lax.Precision.HIGHEST),
                     in_axes=0)(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], x.shape[1], -1)
        return jnp.swapaxes(x, 1, 2)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return jnp.mean(s, axis=(1, 2))


# ----------------------------------------------------------------------------------------------
# Parameter randomisation


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _leaf_group(path) -> str:
    """'a/b/c' for the module holding a leaf: its path minus the leaf's own name (and an nnx
    Variable's trailing '.value')."""
    names = [_key_name(k) for k in path]
    if len(path) and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names = names[:-1]
    return "/".join(names[:-1]) if len(names) > 1 else (names[0] if names else "")


def param_groups(params) -> list[str]:
    """The layer names of a params pytree (paths of the modules holding leaves) in flattening order.

    Flattening sorts dict keys, which is rarely the network's order: pass `layers` in network order
    to `randomise_params` for a cascade (prefixes such as "layer4" select whole stages).
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise ValueError("params has no leaves")
    return list(dict.fromkeys(_leaf_group(p) for p, _ in leaves))


def _matches(group: str, prefix: str) -> bool:
    return group == prefix or group.startswith(prefix + "/")


RANDOMISATIONS = ("gaussian", "permute")


def randomise_params(params, key, *, from_top: bool = True, n_layers: int | None = None,
                     layers: Sequence[str] | None = None, method: str | Callable = "gaussian"):
    """A copy of `params` with `n_layers` layers re-initialised, counted from the output (from_top,
    Adebayo et al.'s cascading randomisation) or from the input; n_layers=None randomises all.

    layers: layer names or path prefixes in network order, input to output (default
    `param_groups(params)`, i.e. flattening order). Leaves under no listed layer are kept.
    method: "gaussian" draws N(mean, std) of each leaf (keeps its scale, destroys what was learned);
    "permute" shuffles each leaf's entries (both from one random stream of `key` over the chosen
    leaves); or a callable (key, leaf) -> new leaf, called with fold_in(key, leaf index). Only floating
    leaves change. Pass trainable parameters only (e.g. `nnx.state(model, nnx.Param)`), not batch-norm
    statistics, whose variances must stay positive.
    """
    key = as_key(key)
    layers = param_groups(params) if layers is None else [str(layer) for layer in layers]
    if not layers:
        raise ValueError("layers is empty")
    if n_layers is None:
        n_layers = len(layers)
    if isinstance(n_layers, bool) or not isinstance(n_layers, (int, np.integer)) or not 0 <= n_layers <= len(layers):
        raise ValueError(f"n_layers must be an integer in [0, {len(layers)}], got {n_layers!r}")
    if isinstance(method, str):
        check_choice(method, RANDOMISATIONS, "randomisation method")
    elif not callable(method):
        raise ValueError(f"method must be one of {RANDOMISATIONS} or a callable, got {method!r}")
    chosen = set(layers[len(layers) - n_layers:] if from_top else layers[:n_layers])
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    groups = [_leaf_group(p) for p, _ in leaves]
    for layer in layers:
        if not any(_matches(g, layer) for g in groups):
            raise ValueError(f"layer {layer!r} matches no parameter; layers are {param_groups(params)}")
    picked = []
    for i, group in enumerate(groups):
        hits = [layer for layer in layers if _matches(group, layer)]
        if len(hits) > 1:
            raise ValueError(f"parameter {group!r} matches several layers {hits}")
        leaf = leaves[i][1]
        if hits and hits[0] in chosen and jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
            picked.append(i)
    out = [leaf for _, leaf in leaves]
    if picked:
        if callable(method):
            new = [_call_init(method, jax.random.fold_in(key, i), jnp.asarray(out[i])) for i in picked]
        else:
            new = _randomise_leaves(key, tuple(jnp.asarray(out[i]) for i in picked), method)
        for i, leaf in zip(picked, new):
            out[i] = leaf
    return jax.tree_util.tree_unflatten(treedef, out)


def cascading_randomisations(params, key, layers: Sequence[str], *, method: str | Callable = "gaussian") -> list:
    """Adebayo et al.'s cascade: [params with the top 1, 2, ..., len(layers) layers re-initialised].

    One fully randomised copy (`randomise_params` of every listed layer) supplies the new values, so
    a layer keeps the same random weights at every level of the cascade, and the randomisation
    compiles once rather than once per level. `layers` are path prefixes in network order.
    """
    layers = [str(layer) for layer in layers]
    full = randomise_params(params, key, layers=layers, method=method)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    random_leaves = jax.tree_util.tree_leaves(full)
    groups = [_leaf_group(p) for p, _ in leaves]
    out = []
    for n in range(1, len(layers) + 1):
        chosen = layers[len(layers) - n:]
        mixed = [r if any(_matches(g, layer) for layer in chosen) else leaf
                 for g, (_, leaf), r in zip(groups, leaves, random_leaves)]
        out.append(jax.tree_util.tree_unflatten(treedef, mixed))
    return out


def _call_init(init, key, leaf):
    new = jnp.asarray(init(key, leaf))
    if new.shape != leaf.shape:
        raise ValueError(f"randomisation callable returned shape {new.shape} for a leaf of shape {leaf.shape}")
    return new.astype(leaf.dtype)


@functools.partial(jax.jit, static_argnames=("method",))
def _randomise_leaves(key, leaves, method):
    """One random stream over all chosen leaves (one PRNG call, one compile), split per leaf."""
    sizes = [leaf.size for leaf in leaves]
    total = sum(sizes)
    draw = jax.random.normal(key, (total,)) if method == "gaussian" else jax.random.uniform(key, (total,))
    out, start = [], 0
    for leaf, size in zip(leaves, sizes):
        r = draw[start:start + size]
        start += size
        if method == "permute":
            new = leaf.reshape(-1)[jnp.argsort(r)].reshape(leaf.shape)
        else:
            x = leaf.astype(jnp.float32)
            new = (jnp.mean(x) + jnp.std(x) * r.reshape(leaf.shape)).astype(leaf.dtype)
        out.append(new)
    return out


# ----------------------------------------------------------------------------------------------
# Model randomisation check


class RandomisationCheck(NamedTuple):
    spearman: np.ndarray  # [N] rank correlation, trained vs randomised maps
    ssim: np.ndarray | None  # [N] SSIM of the [0, 1]-normalised maps (None unless asked)
    maps_trained: np.ndarray  # [N, H, W]
    maps_random: np.ndarray  # [N, H, W]
    targets: np.ndarray  # [N] classes explained (the trained model's argmax unless given)


def model_randomisation_check(attribution_fn: Callable, params_trained, params_random, apply_fn: Callable,
                              images, targets=None, *, absolute: bool = True, with_ssim: bool = False,
                              reduce: str = "abs_max") -> RandomisationCheck:
    """Adebayo et al.'s model-parameter randomisation test.

    attribution_fn(classifier_fn, images, targets) -> maps, e.g.
    `functools.partial(integrated_gradients, num_steps=32)`; apply_fn(params, images) -> logits.
    Both models explain the same targets (the trained model's argmax when None). 4-D maps are
    reduced with `reduce`; absolute=True compares |maps| (the paper reports both). High Spearman
    correlation after randomisation means the method is insensitive to the model: it fails.
    """
    images = check_images(images)
    if not callable(attribution_fn) or not callable(apply_fn):
        raise ValueError("attribution_fn and apply_fn must be callable")
    if jax.tree.structure(params_trained) != jax.tree.structure(params_random):
        raise ValueError("params_trained and params_random must have the same tree structure")
    _, targets = prepare_targets(functools.partial(apply_fn, params_trained), images, targets)
    if targets is None:
        targets = jnp.argmax(apply_fn(params_trained, images), axis=-1).astype(jnp.int32)

    @jax.jit
    def run(params, x, t):
        return attribution_fn(lambda im: apply_fn(params, im), x, t)

    maps = []
    for params in (params_trained, params_random):
        m = jnp.asarray(run(params, images, targets))
        if m.ndim == 4:
            m = reduce_channels(m, reduce)
        if m.ndim != 3 or m.shape[0] != images.shape[0]:
            raise ValueError(f"attribution_fn must return maps [N, H, W] or [N, H, W, C], got {m.shape}")
        maps.append(jnp.abs(m) if absolute else m)
    rho = spearman_correlation(maps[0], maps[1])
    s = None
    if with_ssim:
        s = np.asarray(ssim(normalize_maps(maps[0]), normalize_maps(maps[1]), data_range=1.0))
    return RandomisationCheck(np.asarray(rho), s, np.asarray(maps[0]), np.asarray(maps[1]), np.asarray(targets))


# ----------------------------------------------------------------------------------------------
# Deletion / insertion


class DeletionInsertion(NamedTuple):
    fractions: np.ndarray  # [num_steps + 1] fraction of pixels deleted / inserted
    scores: np.ndarray  # [N, num_steps + 1] target score at each fraction
    auc: np.ndarray  # [N] trapezoid area under scores over fractions in [0, 1]


def deletion_insertion(classifier_fn: Callable, images, saliency, targets=None, *, mode: str = "deletion",
                       num_steps: int = 32, baseline=0.0, score: str = "prob",
                       batch_size: int = 8) -> DeletionInsertion:
    """RISE deletion / insertion curves and their AUC.

    Pixels are ranked by saliency [N, H, W] (highest first; ties by raster order). At step k of
    num_steps the first floor(k H W / num_steps) pixels (all channels) are replaced by the baseline
    ("deletion", start from the image) or copied from the image into the baseline ("insertion",
    start from the baseline). baseline: scalar (0 = mid-grey) or array broadcastable to the images
    (RISE inserts into a blurred copy). Targets are fixed from the intact images (argmax if None).
    """
    images, targets = prepare_targets(classifier_fn, images, targets)
    check_choice(mode, ("deletion", "insertion"), "mode")
    check_choice(score, SCORES, "score")
    num_steps = check_positive_int(num_steps, "num_steps")
    batch_size = check_positive_int(batch_size, "batch_size")
    saliency = jnp.asarray(saliency)
    if saliency.shape != images.shape[:3]:
        raise ValueError(f"saliency must be [N, H, W] = {images.shape[:3]}, got {saliency.shape}; "
                         "reduce channels first (metrics.maps.reduce_channels)")
    if not np.all(np.isfinite(np.asarray(saliency))):
        raise ValueError("saliency has non-finite values")
    baseline = broadcast_to_images(baseline, images, "baseline")
    hw = images.shape[1] * images.shape[2]
    counts = (np.arange(num_steps + 1) * hw) // num_steps
    scores = _curves(classifier_fn, images, saliency, targets, baseline, jnp.asarray(counts, jnp.int32),
                     mode == "deletion", score, batch_size)
    scores = np.asarray(scores, np.float64)
    fractions = counts / hw
    auc = np.sum(0.5 * (scores[:, 1:] + scores[:, :-1]) * np.diff(fractions), axis=1)
    return DeletionInsertion(fractions, scores, auc)


@functools.partial(jax.jit, static_argnames=("classifier_fn", "delete", "score", "batch_size"))
def _curves(classifier_fn, images, saliency, targets, baseline, counts, delete, score, batch_size):
    n, h, w, _ = images.shape
    targets = resolve_targets(classifier_fn(images), targets)
    order = jnp.argsort(-saliency.reshape(n, h * w), axis=1, stable=True)
    ranks = jnp.argsort(order, axis=1, stable=True).reshape(n, h, w, 1)  # 0 = most salient

    def at(count):
        mask = ranks < count
        x = jnp.where(mask, baseline, images) if delete else jnp.where(mask, images, baseline)
        return class_score(classifier_fn(x), targets, score)

    return jax.lax.map(at, counts, batch_size=min(batch_size, counts.shape[0])).T


__all__ = [
    "average_ranks", "spearman_correlation", "ssim", "param_groups", "randomise_params", "RANDOMISATIONS",
    "cascading_randomisations",
    "RandomisationCheck", "model_randomisation_check", "DeletionInsertion", "deletion_insertion",
]
