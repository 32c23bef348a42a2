"""Decision boundary view: the plane (class-mean axis, top principal direction of the rest) and the
projections against a float64 numpy reference built another way (eigenvectors of the scatter
matrix instead of an SVD), on random data of odd sizes; the decision regions and the report's
fractions against direct loops with a linear head."""

import jax.numpy as jnp
import numpy as np
import pytest

from viscoin_jax.explain import decision_boundary as db
from viscoin_jax.explain.bundles import BoundaryView
from viscoin_jax.explain.report import Report


def _reference_axes(x, y, a, b):
    x = x.reshape(len(x), -1).astype(np.float64)
    keep = (y == a) | (y == b)
    x, y = x[keep], y[keep]
    ma, mb = x[y == a].mean(0), x[y == b].mean(0)
    u1 = (mb - ma) / np.linalg.norm(mb - ma)
    c = x - x.mean(0)
    p = np.eye(len(u1)) - np.outer(u1, u1)  # projector off the class axis
    scatter = p @ c.T @ c @ p
    w, v = np.linalg.eigh(scatter)
    u2 = v[:, -1]
    u2 = u2 * np.sign(u2[np.argmax(np.abs(u2))])
    return (ma + mb) / 2, u1, u2


def test_plane_and_projection_against_numpy():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((37, 3, 5)) * np.linspace(0.5, 3, 15).reshape(3, 5)
    y = rng.choice([1, 2, 5], size=37)
    x[y == 5] += 0.7  # class 5 sits apart
    plane = db.fit_plane(x.astype(np.float32), y, classes=(2, 5))
    origin, u1, u2 = _reference_axes(x.astype(np.float32), y, 2, 5)
    np.testing.assert_allclose(plane.origin, origin, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(plane.class_axis, u1, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(plane.spread_axis, u2, rtol=1e-7, atol=1e-8)
    assert plane.classes == (2, 5) and plane.feature_shape == (3, 5)
    new = rng.standard_normal((9, 3, 5))
    coords = db.project(plane, new)
    d = new.reshape(9, -1) - origin
    np.testing.assert_allclose(coords, np.stack([d @ u1, d @ u2], 1), rtol=1e-7, atol=1e-8)
    # lifting then projecting gives the coordinates back; projecting then lifting is the orthogonal projection
    np.testing.assert_allclose(db.project(plane, db.lift(plane, coords)), coords, rtol=1e-5, atol=1e-5)
    onto = origin + np.outer(d @ u1, u1) + np.outer(d @ u2, u2)
    np.testing.assert_allclose(db.lift(plane, coords).reshape(9, -1), onto, rtol=1e-5, atol=1e-5)
    # class 5's mean sits at (+half distance, 0 along u1)
    mean5 = x[y == 5].astype(np.float32).mean(0)[None]
    np.testing.assert_allclose(db.project(plane, mean5)[0, 0], plane.half_distance, rtol=1e-6)
    assert db.side_of(plane, db.project(plane, mean5))[0] == 5


def test_bad_inputs():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((7, 4))
    with pytest.raises(ValueError, match="name the two"):
        db.fit_plane(x, np.array([0, 1, 2, 0, 1, 2, 0]))
    with pytest.raises(ValueError, match="class 3 has no samples"):
        db.fit_plane(x, np.array([0, 1, 0, 1, 0, 1, 0]), classes=(0, 3))
    with pytest.raises(ValueError, match="same mean"):
        db.fit_plane(np.ones((4, 3)), np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="non-finite"):
        db.fit_plane(np.full((4, 3), np.nan), np.array([0, 1, 0, 1]))
    plane = db.fit_plane(x, np.array([0, 1, 0, 1, 0, 1, 0]))
    with pytest.raises(ValueError, match="fitted on 4"):
        db.project(plane, np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"\[M, 2\]"):
        db.lift(plane, np.zeros((2, 3)))


def test_decision_regions_against_a_direct_loop():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((29, 7))
    y = rng.integers(0, 2, 29)
    w, bias = rng.standard_normal((7, 3)), rng.standard_normal(3)
    plane = db.fit_plane(x, y)
    regions = db.decision_regions(plane, lambda f: f @ jnp.asarray(w, jnp.float32) + bias, (-2.0, 1.5, -1.0, 3.0),
                                  resolution=5, batch_size=7)
    for i, yy in enumerate(np.linspace(-1.0, 3.0, 5)):
        for j, xx in enumerate(np.linspace(-2.0, 1.5, 5)):
            point = plane.origin + xx * plane.class_axis + yy * plane.spread_axis
            assert regions.decision[i, j] == np.argmax(point @ w + bias)


def _linear_view(rng, pixels: int, dim: int, num_classes: int):
    """(features, head, head weights): a random linear feature map of flattened images and a linear head."""
    mix = rng.standard_normal((pixels, dim)).astype(np.float32)
    w = rng.standard_normal((dim, num_classes)).astype(np.float32)
    return (lambda images: images.reshape(images.shape[0], -1) @ mix), (lambda f: f @ w), w


def _reference_coords(features, train, train_y, a, b):
    """(origin, u1, u2, image -> plane coordinates) of the numpy reference plane of classes a and b."""
    origin, u1, u2 = _reference_axes(features(train), train_y, a, b)

    def coords(images):
        d = features(images).astype(np.float64) - origin
        return np.stack([d @ u1, d @ u2], 1)

    return origin, u1, u2, coords


def test_report_view_fractions_against_numpy(tmp_path):
    rng = np.random.default_rng(14)
    features, head, w = _linear_view(rng, 5 * 5 * 3, 6, 2)
    train = rng.uniform(-1, 1, (41, 5, 5, 3)).astype(np.float32)
    train_y = rng.integers(0, 2, 41)
    train[train_y == 1] += 0.2
    images = rng.uniform(-1, 1, (11, 5, 5, 3)).astype(np.float32)
    labels = rng.integers(0, 2, 11)
    cfs = rng.uniform(-1, 1, (11, 5, 5, 3)).astype(np.float32)
    targets = 1 - labels
    report = Report("t")
    summary = db.add_decision_boundary_view(report, tmp_path, BoundaryView("penultimate", features, head), train,
                                            train_y, images, labels, {"random": (cfs, targets)}, subject="f")
    # reference: plane from numpy, fractions by loops
    origin, u1, u2, coords = _reference_coords(features, train, train_y, 0, 1)
    pts, ends = coords(images), coords(cfs)
    side = [int(p[0] >= 0) for p in pts]
    in_plane = [int(np.argmax((origin + p[0] * u1 + p[1] * u2) @ w)) for p in pts]
    key = "f boundary (penultimate)"
    assert summary[f"{key}: held-out points on their class's side"] == pytest.approx(np.mean(np.equal(side, labels)))
    assert summary[f"{key}: held-out points classified correctly at their in-plane point"] == pytest.approx(
        np.mean(np.equal(in_plane, labels)))
    assert summary[f"{key}: random counterfactuals ending on the target's side"] == pytest.approx(
        np.mean([int(e[0] >= 0) == t for e, t in zip(ends, targets)]))
    half = np.linalg.norm(features(train[train_y == 1]).mean(0) - features(train[train_y == 0]).mean(0)) / 2
    depth = np.mean([(e[0] if t == 1 else -e[0]) for e, t in zip(ends, targets)]) / half
    assert summary[f"{key}: random counterfactual depth into the target side (class-mean units)"] == pytest.approx(
        depth, rel=1e-4, abs=1e-6)
    with np.load(tmp_path / "decision_boundary_penultimate.npz") as saved:
        np.testing.assert_allclose(saved["points"], pts, rtol=1e-4, atol=1e-4)
    assert report.num_images == 1


def test_boundary_classes_by_hand():
    assert db.boundary_classes([4, 1, 4, 1], [1, 1, 1]) == (1, 4)  # two classes: those two, whatever is held out
    # the two most frequent among the held-out labels, returned in order
    assert db.boundary_classes([0, 1, 2, 3] * 3, [3, 1, 3, 1, 0, 3, 1, 2, 2]) == (1, 3)
    # a tie among the held-out labels goes to the class with more training images, then to the lower class
    assert db.boundary_classes([0, 1, 2, 2, 3], [0, 2, 1, 3]) == (0, 2)
    assert db.boundary_classes([0, 1, 2, 3], [3, 2, 1, 0]) == (0, 1)
    # held-out images of one class: the most frequent training class completes the pair
    assert db.boundary_classes([0, 2, 2, 1, 2], [1, 1, 1]) == (1, 2)
    with pytest.raises(ValueError, match="a boundary needs two"):
        db.boundary_classes([5, 5, 5], [5])


def test_the_pair_setting_by_hand():
    from viscoin_jax.explain.methods import class_pair, resolve_settings

    assert class_pair("auto") is None and class_pair(" AUTO ") is None
    assert class_pair("3,1") == (3, 1) and class_pair(" 0, 12") == (0, 12)
    for bad in ("", "1", "1,2,3", "2,2", "-1,0", "a,b", "1.5,2"):
        with pytest.raises(ValueError, match="must be 'auto' or two different class numbers"):
            class_pair(bad)
    assert resolve_settings()["decision_boundary"] == {"classes": "auto"}
    assert resolve_settings(["decision_boundary.classes=4,2"])["decision_boundary"] == {"classes": "4,2"}


def test_report_view_of_a_four_class_classifier(tmp_path):
    """A 4-class head: the plane separates the two most frequent held-out classes, and only images and
    counterfactuals within that pair are drawn and counted (the view used to refuse more than two classes)."""
    rng = np.random.default_rng(15)
    features, head, w = _linear_view(rng, 3 * 3 * 3, 7, 4)
    train_y = rng.integers(0, 4, 53)
    train = (rng.uniform(-1, 1, (53, 3, 3, 3)) + 0.3 * train_y[:, None, None, None]).astype(np.float32)
    labels = np.array([2, 0, 2, 3, 0, 2, 1, 0, 2, 3, 0, 1, 2])  # 2 and 0 are the most frequent
    images = rng.uniform(-1, 1, (len(labels), 3, 3, 3)).astype(np.float32)
    cfs = rng.uniform(-1, 1, images.shape).astype(np.float32)
    targets = np.array([0, 2, 1, 2, 2, 0, 0, 3, 0, 0, 2, 2, 3])  # within the pair where both ends are 0 or 2
    report = Report("t")
    summary = db.add_decision_boundary_view(report, tmp_path, BoundaryView("penultimate", features, head), train,
                                            train_y, images, labels, {"random": (cfs, targets)}, subject="f")
    origin, u1, u2, coords = _reference_coords(features, train, train_y, 0, 2)
    pair = np.isin(labels, (0, 2))
    within = [i for i in range(len(labels)) if labels[i] in (0, 2) and targets[i] in (0, 2)]
    assert within == [0, 1, 4, 5, 8, 10]
    pts, ends = coords(images), coords(cfs[within])
    key = "f boundary (penultimate)"
    side = np.where(pts[:, 0] >= 0, 2, 0)
    assert summary[f"{key}: held-out points on their class's side"] == pytest.approx(np.mean(side[pair] == labels[pair]))
    in_plane = [int(np.argmax((origin + p[0] * u1 + p[1] * u2) @ w)) for p in pts[pair]]
    assert summary[f"{key}: held-out points classified correctly at their in-plane point"] == pytest.approx(
        np.mean(np.equal(in_plane, labels[pair])))
    assert summary[f"{key}: random counterfactuals ending on the target's side"] == pytest.approx(
        np.mean([(2 if e[0] >= 0 else 0) == targets[i] for e, i in zip(ends, within)]))
    half = np.linalg.norm(features(train[train_y == 2]).mean(0) - features(train[train_y == 0]).mean(0)) / 2
    depth = np.mean([(e[0] if targets[i] == 2 else -e[0]) for e, i in zip(ends, within)]) / half
    assert summary[f"{key}: random counterfactual depth into the target side (class-mean units)"] == pytest.approx(
        depth, rel=1e-4, abs=1e-6)
    with np.load(tmp_path / "decision_boundary_penultimate.npz") as saved:
        assert saved["classes"].tolist() == [0, 2]
        np.testing.assert_array_equal(saved["images_of_random"], within)
        np.testing.assert_allclose(saved["ends_random"], ends, rtol=1e-4, atol=1e-4)
    assert report.num_images == 1
    assert "classes 0 and 2" in report.write(tmp_path).read_text()

    # an asked-for pair, in its own orientation (3 at negative class coordinates, 1 at positive)
    asked = db.add_decision_boundary_view(Report("t"), tmp_path, BoundaryView("penultimate", features, head), train,
                                          train_y, images, labels, {"random": (cfs, targets)}, subject="f",
                                          classes=(3, 1))
    _, v1, _, coords31 = _reference_coords(features, train, train_y, 3, 1)
    keep = np.isin(labels, (1, 3))
    side31 = np.where(coords31(images)[:, 0] >= 0, 1, 3)
    assert asked[f"{key}: held-out points on their class's side"] == pytest.approx(np.mean(side31[keep] == labels[keep]))
    assert not any("random counterfactuals" in k for k in asked)  # no image goes from 1 to 3 or back
    with np.load(tmp_path / "decision_boundary_penultimate.npz") as saved:
        assert saved["classes"].tolist() == [3, 1]
        np.testing.assert_allclose(saved["class_axis"], v1, rtol=1e-6, atol=1e-7)
