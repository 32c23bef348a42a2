"""The counterfactual comparison table: validity, L1 and the factor columns against direct loops on
rendered synthetic images with known edits (colour flipped: causal; blob moved: nuisance), and the
sets read back from the arrays each explain report saves."""

import numpy as np
import pytest

from viscoin_jax.data.synthetic import (COLOUR_THRESHOLD, STAIN_COLOUR_SCORES, SyntheticConcepts, measure_factors,
                                        measured_factor_roles, render)
from viscoin_jax.explain import counterfactual_comparison as cmp
from viscoin_jax.explain.report import Report


def _rendered(n=7, seed=3):
    src = SyntheticConcepts("blob_binary", resolution=32, size=n, seed=seed, split="test")
    items = [src[i] for i in range(n)]
    factors = {k: np.stack([it["factors"][k] for it in items]) for k in items[0]["factors"]}
    images = np.stack([it["image"] for it in items]).astype(np.float32) / 127.5 - 1
    return images, factors


def _unit(images_uint8):
    return np.asarray(images_uint8, np.float32) / 127.5 - 1


def _reference_rates(before, after, variant):
    """Direct per-image loop: which measured factors changed beyond their tolerance."""
    causal, nuisance, tol = measured_factor_roles(variant)
    mb, ma = measure_factors(before), measure_factors(after)
    # a colour in between: closer to the threshold than half way to either stain
    lo = COLOUR_THRESHOLD + 0.5 * (STAIN_COLOUR_SCORES.min() - COLOUR_THRESHOLD)
    hi = COLOUR_THRESHOLD + 0.5 * (STAIN_COLOUR_SCORES.max() - COLOUR_THRESHOLD)
    rows = {"causal": [], "nuisance": [], "only": [], "out": []}
    for i in range(len(before)):
        between = any(lo < m["colour_score"][i] < hi for m in (mb, ma) if np.isfinite(m["colour_score"][i]))
        if not mb["found"][i] or not ma["found"][i] or between:
            rows["out"].append(1)
            rows["causal"].append(0), rows["nuisance"].append(0), rows["only"].append(0)
            continue
        rows["out"].append(0)
        ch = {k: abs(float(mb[k][i]) - float(ma[k][i])) > tol[k] for k in causal + nuisance}
        c, nu = any(ch[k] for k in causal), any(ch[k] for k in nuisance)
        rows["causal"].append(c), rows["nuisance"].append(nu), rows["only"].append(c and not nu)
    return [float(np.mean(rows[k])) for k in ("causal", "nuisance", "only", "out")]


def test_rows_against_direct_loops():
    images, factors = _rendered()
    flipped = dict(factors, colour=1 - factors["colour"])
    moved = dict(factors, center_x=np.clip(factors["center_x"] + 0.3, 0.2, 0.8).astype(np.float32))
    cf_colour, cf_moved = _unit(render(flipped, 32)), _unit(render(moved, 32))
    rng = np.random.default_rng(5)
    valid_a, valid_b = rng.random(7) < 0.5, rng.random(7) < 0.7
    sets = [cmp.CounterfactualSet("colour", "f", images, cf_colour, valid_a),
            cmp.CounterfactualSet("moved", "g", images, cf_moved, valid_b, rendering=images * 0.5)]
    header, rows = cmp.comparison_rows(sets, "blob_binary")
    assert header == cmp.HEADER + cmp.FACTOR_HEADER
    for row, s in zip(rows, sets):
        assert row[:3] == [s.method, s.judge, 7]
        assert row[3] == pytest.approx(np.mean(s.valid))
        assert row[4] == pytest.approx(np.mean(np.abs(s.counterfactuals.astype(np.float64) - images)), rel=1e-6)
        np.testing.assert_allclose(row[6:], _reference_rates(images, s.counterfactuals, "blob_binary"))
    assert rows[0][5] == "-"
    assert rows[1][5] == pytest.approx(np.mean(np.abs(cf_moved.astype(np.float64) - images * 0.5)), rel=1e-6)
    assert rows[0][6] > 0.5 and rows[1][7] > 0.5  # the known edits read as what they are
    _, plain = cmp.comparison_rows(sets)  # no variant: no factor columns
    assert len(plain[0]) == len(cmp.HEADER)
    with pytest.raises(ValueError, match="other images"):
        cmp.comparison_rows([sets[0], cmp.CounterfactualSet("x", "f", cf_colour, images, valid_a)])
    with pytest.raises(ValueError, match="no counterfactual sets"):
        cmp.comparison_rows([])


def test_sets_read_back_from_the_saved_arrays(tmp_path):
    rng = np.random.default_rng(6)
    n = 5
    x = rng.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32)

    def img():
        return rng.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32)

    a, b = tmp_path / "viscoin", tmp_path / "iresnet"
    a.mkdir(), b.mkdir()
    valid = rng.random(n) < 0.5
    target = rng.integers(0, 2, n)
    np.savez(a / "latent_direction.npz", images=x, counterfactuals=img(), projections=img(), valid=valid,
             target=target)
    drawings = rng.uniform(-1, 1, (n, 2, 3, 8, 8, 3)).astype(np.float32)
    f_pred, removed_pred = rng.integers(0, 2, n), rng.integers(0, 2, n)
    np.savez(a / "concepts.npz", images=x, drawings=drawings, lambdas=np.array([1.0, 0.0, 2.0]),
             f_predictions=f_pred, top_concept_removed_f_predictions=removed_pred)
    np.savez(b / "iresnet_counterfactual.npz", images=x, counterfactuals=img(), valid=~valid, target=1 - target)
    np.savez(a / "autoencoder_counterfactual.npz", images=x, counterfactuals=img(), reconstructions=img(), valid=valid,
             target=target)
    sets = cmp.counterfactual_sets([b, a])
    assert [s.method.split(" ")[0] for s in sets] == ["StyleGAN", "VisCoIN", "i-ResNet", "autoencoder"]
    concept = sets[1]
    np.testing.assert_array_equal(concept.counterfactuals, drawings[:, 0, 1])  # lambda 0: the concept removed
    np.testing.assert_array_equal(concept.rendering, drawings[:, 0, 0])  # lambda 1: the plain drawing
    np.testing.assert_array_equal(concept.valid, removed_pred != f_pred)
    assert sets[2].judge == "i-ResNet (iresnet)" and np.array_equal(sets[2].valid, ~valid)
    np.testing.assert_array_equal(sets[2].target, 1 - target)
    assert concept.target is None  # concept removal names no class to reach
    only = cmp.counterfactual_sets([a, b], methods=["iresnet_counterfactual"])
    assert [s.method.split(" ")[0] for s in only] == ["i-ResNet"]
    report = Report("t")
    summary = cmp.add_comparison(report, [a, b])
    assert summary["i-ResNet (z between class means): validity"] == pytest.approx(np.mean(~valid))
    assert cmp.add_comparison(report, [tmp_path]) == {}
