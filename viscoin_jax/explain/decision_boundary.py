"""The decision boundary view (seed 001): a 2-D picture of how a classifier separates two classes.

Features (a classifier's penultimate vector, or an i-ResNet's latent z) are projected onto the plane
through the midpoint of the two class means spanned by
- the class axis u1: the unit difference of the class means (from class a to class b), and
- the spread axis u2: the top principal direction of the features once their u1 component is removed,
so the picture shows the direction that separates the classes and the largest variation besides it.
The classifier's head, evaluated at the plane's points lifted back to feature space, draws f's
decision regions over the plane; counterfactuals are arrows from an image's point to its
counterfactual's. The numbers, not the picture, are the result: the fraction of held-out points on
their class's side of the midpoint (and classified correctly from their in-plane point), and where
each counterfactual ends (the target's side, the head's decision at its in-plane point).

The plane is fitted in float64 numpy: it is a small dense problem (N x D, D up to a few thousand).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Callable, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np

HeadFn = Callable  # features [N, *shape] -> logits [N, C]


@dataclasses.dataclass(frozen=True)
class Plane:
    origin: np.ndarray  # [D] midpoint of the two class means
    class_axis: np.ndarray  # [D] unit vector from class a's mean to class b's
    spread_axis: np.ndarray  # [D] unit vector orthogonal to class_axis (top principal direction of the rest)
    classes: tuple[int, int]  # (a, b): a lies at negative, b at positive class coordinates
    feature_shape: tuple[int, ...]  # the shape of one feature array (to lift points back)
    half_distance: float  # |mean_b - mean_a| / 2: class b's mean sits at (half_distance, 0)


def _flat(features, name="features") -> np.ndarray:
    x = np.asarray(features, np.float64)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N, ...] array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} have non-finite values")
    return x.reshape(x.shape[0], -1)


def fit_plane(features, labels, classes: tuple[int, int] | None = None) -> Plane:
    """The class-axis / spread-axis plane of `features` [N, ...] with `labels` [N]; `classes` names
    the pair (default: the two classes present, which must be exactly two). Only the two classes'
    samples are used. The spread axis's sign makes its largest-magnitude entry positive."""
    x = _flat(features)
    y = np.asarray(labels)
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be [N] = [{x.shape[0]}] integers, got {y.dtype} {y.shape}")
    if classes is None:
        present = np.unique(y)
        if len(present) != 2:
            raise ValueError(f"the labels hold classes {present.tolist()}; name the two to separate (classes=(a, b))")
        classes = (int(present[0]), int(present[1]))
    a, b = (int(c) for c in classes)
    if a == b:
        raise ValueError(f"classes must be two different classes, got {classes}")
    for c in (a, b):
        if not np.any(y == c):
            raise ValueError(f"class {c} has no samples to fit the plane on")
    keep = (y == a) | (y == b)
    x = x[keep]
    mean_a, mean_b = x[y[keep] == a].mean(0), x[y[keep] == b].mean(0)
    diff = mean_b - mean_a
    dist = float(np.linalg.norm(diff))
    if dist == 0.0:
        raise ValueError(f"classes {a} and {b} have the same mean feature: no class axis")
    u1 = diff / dist
    centred = x - x.mean(0)
    rest = centred - np.outer(centred @ u1, u1)
    _, s, vt = np.linalg.svd(rest, full_matrices=False)
    if s.size == 0 or s[0] <= 1e-12 * max(1.0, dist):
        raise ValueError("the features vary only along the class axis: no second direction for the plane")
    u2 = vt[0] - (vt[0] @ u1) * u1  # exactly orthogonal
    u2 /= np.linalg.norm(u2)
    u2 *= np.sign(u2[np.argmax(np.abs(u2))])
    shape = tuple(np.shape(features)[1:])
    return Plane(0.5 * (mean_a + mean_b), u1, u2, (a, b), shape, 0.5 * dist)


def project(plane: Plane, features) -> np.ndarray:
    """[N, 2] plane coordinates (class coordinate, spread coordinate) of features [N, ...]."""
    x = _flat(features)
    if x.shape[1] != plane.origin.shape[0]:
        raise ValueError(f"features have {x.shape[1]} values each, the plane was fitted on {plane.origin.shape[0]}")
    d = x - plane.origin
    return np.stack([d @ plane.class_axis, d @ plane.spread_axis], axis=1)


def lift(plane: Plane, coords) -> np.ndarray:
    """Features [M, *feature_shape] (float32) at plane coordinates [M, 2]."""
    c = np.asarray(coords, np.float64)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"coords must be [M, 2], got shape {c.shape}")
    x = plane.origin + c[:, :1] * plane.class_axis + c[:, 1:] * plane.spread_axis
    return x.reshape((c.shape[0],) + plane.feature_shape).astype(np.float32)


class Regions(NamedTuple):
    xs: np.ndarray  # [R] class coordinates of the grid
    ys: np.ndarray  # [R] spread coordinates
    decision: np.ndarray  # [R, R] head's class at (ys[i], xs[j])


def decision_regions(plane: Plane, head_fn: HeadFn, extent: tuple[float, float, float, float], resolution: int = 48,
                     batch_size: int = 1024) -> Regions:
    """The head's decision at a resolution x resolution grid over extent (x0, x1, y0, y1) of the plane."""
    if int(resolution) < 2:
        raise ValueError(f"resolution must be >= 2, got {resolution}")
    xs = np.linspace(extent[0], extent[1], int(resolution))
    ys = np.linspace(extent[2], extent[3], int(resolution))
    gx, gy = np.meshgrid(xs, ys)
    pts = np.stack([gx.ravel(), gy.ravel()], 1)
    out = [np.asarray(head_fn(jnp.asarray(lift(plane, pts[s:s + batch_size])))).argmax(-1)
           for s in range(0, len(pts), batch_size)]
    return Regions(xs, ys, np.concatenate(out).reshape(gx.shape))


def in_plane_decisions(plane: Plane, head_fn: HeadFn, coords) -> np.ndarray:
    """[N] the head's class at the lifted plane points `coords` [N, 2]."""
    return np.asarray(head_fn(jnp.asarray(lift(plane, coords)))).argmax(-1)


def side_of(plane: Plane, coords) -> np.ndarray:
    """[N] the class whose side of the midpoint each point lies on (class coordinate < 0: a; >= 0: b)."""
    a, b = plane.classes
    return np.where(np.asarray(coords)[:, 0] < 0, a, b)


def plot(plane: Plane, regions: Regions, points, labels, arrows: Mapping[str, tuple] | None = None, *,
         title: str = "", size: float = 5.0) -> np.ndarray:
    """uint8 [H, W, 3] picture: decision regions, held-out points by label, counterfactual arrows
    ({method: (start coords [N, 2], end coords [N, 2])})."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    fig = Figure(figsize=(size, size), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    a, b = plane.classes
    ax.pcolormesh(regions.xs, regions.ys, (regions.decision == b).astype(float), cmap="coolwarm", alpha=0.25,
                  vmin=0, vmax=1, shading="auto")
    points, labels = np.asarray(points), np.asarray(labels)
    for c, colour in ((a, "tab:blue"), (b, "tab:red")):
        m = labels == c
        ax.scatter(points[m, 0], points[m, 1], s=14, c=colour, label=f"class {c}", edgecolors="k", linewidths=0.3)
    colours = ["tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:olive"]
    for j, (name, (start, end)) in enumerate((arrows or {}).items()):
        start, end = np.asarray(start), np.asarray(end)
        for s, e in zip(start, end):
            ax.annotate("", xy=e, xytext=s, arrowprops=dict(arrowstyle="->", color=colours[j % len(colours)], lw=1))
        ax.plot([], [], color=colours[j % len(colours)], label=f"{name} counterfactuals")
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(f"class axis (class {a} -> class {b})")
    ax.set_ylabel("top principal direction of the rest")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return np.asarray(Image.open(buf).convert("RGB"))


def extent_of(*coords, margin: float = 0.15) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) covering every [N, 2] array given, with a margin."""
    allc = np.concatenate([np.asarray(c).reshape(-1, 2) for c in coords])
    lo, hi = allc.min(0), allc.max(0)
    pad = margin * np.maximum(hi - lo, 1e-6)
    return float(lo[0] - pad[0]), float(hi[0] + pad[0]), float(lo[1] - pad[1]), float(hi[1] + pad[1])


__all__ = ["Plane", "Regions", "fit_plane", "project", "lift", "decision_regions", "in_plane_decisions", "side_of",
           "plot", "extent_of"]


# ----------------------------------------------------------------------------------------------
# The report's view


def boundary_classes(train_labels, labels) -> tuple[int, int]:
    """The pair of classes the view separates (a < b): the training labels' only two, else the two most
    frequent among the held-out `labels` (ties: the lower class), so a many-class classifier's picture
    shows the images being explained; the most frequent training classes complete the pair."""
    train_labels, labels = np.asarray(train_labels).ravel(), np.asarray(labels).ravel()
    present = np.unique(train_labels)
    if len(present) < 2:
        raise ValueError(f"the training images hold classes {present.tolist()}: a boundary needs two")
    if len(present) == 2:
        return int(present[0]), int(present[1])
    held = np.array([np.sum(labels == c) for c in present])
    seen = np.array([np.sum(train_labels == c) for c in present])
    order = np.lexsort((present, -seen, -held))  # most held-out images, then most training images, then lowest
    a, b = sorted(int(c) for c in present[order[:2]])
    return a, b


def _batched(fn, x, batch_size=64) -> np.ndarray:
    return np.concatenate([np.asarray(fn(jnp.asarray(x[s:s + batch_size]))) for s in range(0, len(x), batch_size)])


def add_decision_boundary_view(report, out, view, train_images, train_labels, images, labels,
                               counterfactuals: Mapping[str, tuple] | None = None, *, subject: str,
                               decode_steps: int = 9, classes: tuple[int, int] | None = None) -> dict:
    """Fits the plane of `view` (a bundles.BoundaryView) on the training images, shows the held-out
    `images` with their `labels`, f's regions and the `counterfactuals` ({method: (images [N, H, W, 3],
    targets [N])}, drawn from their input's point); for an invertible view also decodes the class
    axis. The plane separates `classes` (a at negative class coordinates), by default `boundary_classes`;
    with more than two classes only the images and counterfactuals within that pair are drawn and counted.
    Adds the picture and tables, saves OUT/decision_boundary_<view>.npz, returns summary rows."""
    from .report import save_arrays

    import jax

    features_fn, head_fn = jax.jit(view.features_fn), jax.jit(view.head_fn)
    labels = np.asarray(labels)
    pair = boundary_classes(train_labels, labels) if classes is None else (int(classes[0]), int(classes[1]))
    many = len(np.unique(np.asarray(train_labels))) > 2
    plane = fit_plane(_batched(features_fn, np.asarray(train_images)), np.asarray(train_labels), classes=pair)
    feats = _batched(features_fn, np.asarray(images))
    pts = project(plane, feats)
    two = np.isin(labels, plane.classes)
    key = f"{subject} boundary ({view.name})"
    summary = {
        f"{key}: held-out points on their class's side": float(np.mean(side_of(plane, pts)[two] == labels[two])),
        f"{key}: held-out points classified correctly at their in-plane point":
            float(np.mean(in_plane_decisions(plane, head_fn, pts)[two] == labels[two])),
        f"{key}: held-out accuracy from the full features": float(np.mean(
            np.asarray(head_fn(jnp.asarray(feats))).argmax(-1)[two] == labels[two])),
    }
    arrays = dict(points=pts, labels=labels, origin=plane.origin, class_axis=plane.class_axis,
                  spread_axis=plane.spread_axis, classes=np.asarray(plane.classes))
    arrows, rows = {}, []
    for name, (cf_images, targets) in (counterfactuals or {}).items():
        targets = np.asarray(targets)
        within = two & np.isin(targets, plane.classes)  # from one class of the pair to the other
        if not within.any():
            continue
        cf_feats = _batched(features_fn, np.asarray(cf_images)[within])
        ends = project(plane, cf_feats)
        targets = targets[within]
        arrows[name] = (pts[within], ends)
        on_side = float(np.mean(side_of(plane, ends) == targets))
        in_plane = float(np.mean(in_plane_decisions(plane, head_fn, ends) == targets))
        full = float(np.mean(np.asarray(head_fn(jnp.asarray(cf_feats))).argmax(-1) == targets))
        sign = np.where(targets == plane.classes[1], 1.0, -1.0)
        depth = float(np.mean(sign * ends[:, 0]) / plane.half_distance)
        rows.append([name, len(targets), on_side, in_plane, full, depth])
        summary[f"{key}: {name} counterfactuals ending on the target's side"] = on_side
        summary[f"{key}: {name} counterfactuals decided as the target at their in-plane point"] = in_plane
        summary[f"{key}: {name} counterfactual depth into the target side (class-mean units)"] = depth
        arrays[f"ends_{name.replace(' ', '_')}"] = ends
        arrays[f"images_of_{name.replace(' ', '_')}"] = np.nonzero(within)[0]  # which image each end belongs to
    class_means = np.asarray([[-plane.half_distance, 0], [plane.half_distance, 0]])
    regions = decision_regions(plane, head_fn, extent_of(pts[two] if two.any() else pts,
                                                         *[e for _, e in arrows.values()], class_means))
    picture = plot(plane, regions, pts, labels, arrows, title=f"{subject}: {view.name}")
    chosen = "the most frequent among the explained images" if classes is None else "as asked"
    which = (f" (classes {plane.classes[0]} and {plane.classes[1]}, {chosen}; other classes' images are left out)"
             if many else "")
    report.add_image_grid(f"Decision boundary of {subject} on its {view.name}{which}: the plane of the class-mean "
                          "difference and the top principal direction of the rest; shaded: f's decision at "
                          "each point of the plane", picture[None], cols=1, display_width=int(picture.shape[1]))
    report.add_table([[k.split(": ", 1)[1], v] for k, v in summary.items() if "counterfactual" not in k],
                     ["held-out points", "fraction"], title=f"Decision boundary ({view.name}): held-out points")
    if rows:
        report.add_table(rows, ["method", "images", "ends on the target's side", "in-plane point decided as the target",
                                "decided as the target (full features)", "depth past the midpoint (class-mean units)"],
                         title=f"Decision boundary ({view.name}): where each counterfactual ends")
    if view.decode_fn is not None:  # walk the class axis and decode (the i-ResNet's inverse)
        ts = np.linspace(-2.0, 2.0, int(decode_steps)) * plane.half_distance
        walk = np.stack([ts, np.zeros_like(ts)], 1)
        decoded = np.asarray(jax.jit(view.decode_fn)(jnp.asarray(lift(plane, walk))))
        probs = np.asarray(jax.nn.softmax(head_fn(jnp.asarray(lift(plane, walk))), -1))
        report.add_series(f"Decoded along the class axis of {view.name} (class {plane.classes[0]} mean at -1, "
                          f"class {plane.classes[1]} mean at +1)", np.clip(decoded, -1, 1),
                          [f"t={t / plane.half_distance:+.2f} p{plane.classes[1]}={p[plane.classes[1]]:.2f}"
                           for t, p in zip(ts, probs)])
        arrays["class_axis_images"] = decoded
    save_arrays(out, f"decision_boundary_{view.name.split(' ')[0]}", **arrays)
    return summary


__all__ += ["boundary_classes", "add_decision_boundary_view"]
