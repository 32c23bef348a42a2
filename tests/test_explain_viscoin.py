"""`explain` on a VisCoIN checkpoint (concepts, FF, CC, latent direction and interpolation), and on a
classifier checkpoint with a separate generator; values checked against direct numpy computations."""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from viscoin_jax.cli import explain as explain_run
from viscoin_jax.explain.latent_report import LatentSettings, counterfactual_index
from viscoin_jax.explain.viscoin_report import ConceptSettings
from viscoin_jax.trainers import viscoin

from browser import check_report_page, chromium
from viscoin_fixtures import make_frozen_runs, make_viscoin_run

pytestmark = pytest.mark.filterwarnings("ignore:config.loss.lpips_weights is empty")

SMALL_LATENT = LatentSettings(projection_steps=4, direction_samples=64, num_series=5, interpolation_steps=3,
                              ig_steps=5, coverage_samples=70)
SMALL_CONCEPTS = ConceptSettings(top_k=2, num_training_images=16, top_images=3, max_images_drawn=2, cc_test_images=12,
                                 ff_test_images=10)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    clf, sg2, _ = make_frozen_runs(root)
    return clf, sg2, make_viscoin_run(root, clf, sg2)


@pytest.fixture(scope="module")
def viscoin_report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    explain_run.explain(str(runs[2]), "synthetic/blob_binary:test:3",
                        ["gradient", "concepts", "faithfulness", "consistency", "latent_direction",
                         "latent_interpolation"], str(out), latent_settings=SMALL_LATENT,
                        concept_settings=SMALL_CONCEPTS)
    return out


def test_relevance_and_drawings_match_direct_computation(runs, viscoin_report):
    task, state, _ = viscoin.load(str(runs[2]))
    head_weight = np.asarray(viscoin.viscoin_apply(task, state).head_weight, np.float64)
    with np.load(viscoin_report / "concepts.npz") as a:
        phi, relevance, top, pred = a["phi"], a["relevance"], a["top_concepts"], a["g_predictions"]
        drawings, recon, lambdas = a["drawings"], a["reconstructions"], list(a["lambdas"])
    # relevance: alpha_k = maxpool(phi_k) W[k, c], normalised by max |alpha| (a direct loop)
    for i in range(phi.shape[0]):
        alpha = np.array([phi[i, :, :, k].max() * head_weight[k, pred[i]] for k in range(phi.shape[-1])])
        np.testing.assert_allclose(relevance[i], alpha / np.abs(alpha).max(), rtol=1e-5, atol=1e-6)
        assert list(top[i]) == list(np.argsort(-relevance[i], kind="stable")[: top.shape[1]])
    # a concept drawn at lambda 1 is the unedited reconstruction
    np.testing.assert_allclose(drawings[:, 0, lambdas.index(1.0)], recon, atol=1e-4)
    assert drawings.shape[:3] == (3, 2, 4)
    assert np.abs(drawings[:, 0, lambdas.index(0.0)] - recon).max() > 0  # removing a concept changes x~
    # the grid's caption under each drawing: f's probability of g's class (named) for that drawing
    f = viscoin.viscoin_apply(task, state).classifier_fn
    p = np.asarray(jax.nn.softmax(f(drawings[0, 0]), -1))[:, pred[0]]
    name = ("pink", "purple")[pred[0]]
    html = (viscoin_report / "report.html").read_text()
    for lam, value in zip(lambdas, p):
        assert f"lambda {lam:g}: f p({name}) {value:.2f}" in html


def test_metrics_and_arrays_are_consistent(viscoin_report):
    metrics = json.loads((viscoin_report / "metrics.json").read_text())
    with np.load(viscoin_report / "faithfulness.npz") as a:
        np.testing.assert_allclose(a["median"], np.median(a["per_image"], axis=1))
        assert metrics["FF median (tau 0.2)"] == pytest.approx(float(a["median"][1]))
        # the median is over the 10 held-out images asked for, not the 3 explained ones
        assert a["per_image"].shape == (3, 10) and metrics["FF images"] == 10
    with np.load(viscoin_report / "consistency.npz") as a:
        acc, pairs = a["accuracy"], a["test_pairs"]
        # pairs only where the concept is active, on the 12 held-out images (not the 3 explained)
        assert acc.shape == (8,) and np.all((pairs >= 0) & (pairs <= 12)) and pairs.max() > 3
        assert np.array_equal(np.isnan(acc), pairs == 0)
        assert np.all((acc[pairs > 0] >= 0) & (acc[pairs > 0] <= 1))
        assert metrics["CC mean"] == pytest.approx(float(np.nanmean(acc)))
        assert metrics["CC held-out images"] == 12
    with np.load(viscoin_report / "latent_direction.npz") as a:
        probs, target, flipped = a["probs"], a["target"], a["flipped"]
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
        assert np.array_equal(flipped, (probs.argmax(-1) == target[:, None]).any(1))
        # the counterfactual is the first image f assigns to the target: valid exactly where one exists
        assert metrics["latent counterfactual validity"] == pytest.approx(float(np.mean(flipped)))
    with np.load(viscoin_report / "latent_interpolation.npz") as a:
        # integrated gradients in W+ sum to the change of the target logit (loose: 5 steps)
        assert a["layer_attributions"].shape[0] == 3
        assert np.all(np.isfinite(a["completeness_gap"]))
    for key in ("latent counterfactuals changing a causal factor", "top concepts whose removal changes a causal factor",
                "g fidelity to f (these images)", "top concepts removed: blob removed",
                "top concepts removed: colour ambiguous", "latent counterfactuals: blob removed"):
        assert 0.0 <= metrics[key] <= 1.0
    # outcomes of their own: a removal is counted under at most one of them or as a change
    outcomes = sum(metrics[f"top concepts removed: {o}"] for o in ("no blob in the input", "blob removed",
                                                                    "colour ambiguous"))
    assert outcomes + metrics["top concepts whose removal changes a causal factor"] <= 1.0 + 1e-9
    html = (viscoin_report / "report.html").read_text()
    for heading in ("VisCoIN reconstructions", "Class-level concept relevance", "most activating training images",
                    "Faithfulness FF", "Consistency CC_k", "Projections into W+",
                    "Interpolation from each projection to its counterfactual", "Counterfactual series along the",
                    "Image 0 (g: ", "Contents", "Summary"):
        assert heading in html, heading
    # one concept grid per drawn image (2), one slider per concept row (2 each), per latent series, per path
    assert html.count('class="block frame_rows"') >= 2 + 2 and html.count('type="range"') >= 2 * 2 + 3 + 3


@pytest.mark.skipif(chromium() is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_viscoin_report_in_headless_chromium(viscoin_report):
    """The whole report in a real browser: every image loads, every lambda / t / a slider shows its frame."""
    seen = check_report_page(viscoin_report / "report.html",
                             Path(os.environ.get("VISCOIN_SHOTS", "/tmp/shots")) / "viscoin_report.png")
    assert seen["sliders"] >= 2 * 2 + 3 + 3 and seen["images"] > 50


def test_counterfactual_index_matches_a_loop():
    rng = np.random.default_rng(3)
    probs = jax.nn.softmax(rng.normal(size=(7, 5, 3)), -1)
    target = rng.integers(0, 3, 7)
    index, found = counterfactual_index(probs, target)
    for i in range(7):
        hits = [j for j in range(5) if np.argmax(probs[i, j]) == target[i]]
        assert found[i] == bool(hits) and index[i] == (hits[0] if hits else 4)


@pytest.mark.parametrize("confidence", [0.5, 0.6, 0.9])
def test_counterfactual_index_aims_past_the_boundary(confidence):
    rng = np.random.default_rng(4)
    probs = np.array(jax.nn.softmax(3 * rng.normal(size=(11, 6, 2)), -1))
    probs[0, :, 1] = np.linspace(0.1, 1.0, 6)  # crosses 0.5 at index 3, reaches 0.9 only at the end
    probs[0, :, 0] = 1 - probs[0, :, 1]
    target = rng.integers(0, 2, 11)
    target[0] = 1
    index, found = counterfactual_index(probs, target, confidence)
    for i in range(11):
        flipped = [j for j in range(6) if np.argmax(probs[i, j]) == target[i]]
        sure = [j for j in flipped if probs[i, j, target[i]] >= confidence]
        want = sure[0] if sure else (flipped[0] if flipped else 5)
        assert found[i] == bool(flipped) and index[i] == want
    assert index[0] == {0.5: 3, 0.6: 3, 0.9: 5}[confidence]  # p: .1 .28 .46 .64 .82 1.0


def test_classifier_checkpoint_with_generator_and_bad_requests(runs, tmp_path):
    clf, sg2, vis = runs
    with pytest.raises(ValueError, match="latent_direction does not apply to a ResNet classifier; it needs a VisCoIN run or a classifier with --generator"):
        explain_run.explain(str(clf), "synthetic/blob_binary:test:2", ["latent_direction"], str(tmp_path / "a"))
    with pytest.raises(ValueError, match="concepts does not apply to a ResNet classifier; it needs a VisCoIN run"):
        explain_run.explain(str(clf), "synthetic/blob_binary:test:2", ["concepts"], str(tmp_path / "a"))
    with pytest.raises(ValueError, match="unknown methods"):
        explain_run.explain(str(vis), "synthetic/blob_binary:test:2", ["concept"], str(tmp_path / "a"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="images are 16x16 but the model takes 32x32"):
        explain_run.explain(str(vis), str(bad), ["concepts"], str(tmp_path / "a"))
    explain_run.explain(str(clf), "synthetic/blob_binary:test:2", ["latent_direction"], str(tmp_path / "b"),
                        generator=str(sg2), latent_settings=SMALL_LATENT)
    with np.load(tmp_path / "b" / "latent_direction.npz") as a:
        assert a["series"].shape == (2, 5, 32, 32, 3) and np.all(np.isfinite(a["series"]))
        np.testing.assert_allclose(a["series"][:, 0], a["projections"], atol=1e-4)  # t = 0 is the projection


def test_what_g_draws_is_measured_on_real_generator_samples(runs, viscoin_report):
    from viscoin_jax.data.synthetic import colour_in_between, measure_factors
    from viscoin_jax.trainers.stylegan2 import latent_models

    metrics = json.loads((viscoin_report / "metrics.json").read_text())
    with np.load(viscoin_report / "latent_direction.npz") as a:
        z, images, logits = a["sample_z"], a["sample_images"], a["sample_logits"]
    assert z.shape[0] == images.shape[0] == logits.shape[0] == 70  # 64 + a partial batch of 6
    # the images are the frozen G's (EMA weights, constant noise) at those latents
    G = latent_models(str(runs[1]), lambda x: x)
    np.testing.assert_allclose(images[-9:], np.asarray(G.synthesis_fn(G.mapping_fn(z[-9:]))), atol=2e-4)
    for c in range(logits.shape[1]):
        assert metrics[f"G samples f assigns to class {c}"] == pytest.approx(float(np.mean(logits.argmax(-1) == c)))
    m = measure_factors(images)
    assert metrics["G samples with a measurable blob"] == pytest.approx(float(np.mean(m["found"])))
    if m["found"].any():
        assert metrics["G samples whose blob colour is in between the stains"] == pytest.approx(
            float(np.mean(colour_in_between(m["colour_score"])[m["found"]])))
    assert "What G draws" in (viscoin_report / "report.html").read_text()


def test_top_concept_rows_per_class_against_a_direct_measurement(viscoin_report):
    """Per class of g, the share of images whose top concept's removal (lambda 1 -> 0) changed the colour
    and no nuisance factor, recomputed image by image from the saved drawings; the classes' shares
    weighted by their counts give the overall row."""
    from viscoin_jax.data.synthetic import MEASURED_TOLERANCES, colour_in_between, measure_factors

    metrics = json.loads((viscoin_report / "metrics.json").read_text())
    with np.load(viscoin_report / "concepts.npz") as a:
        drawings, lambdas, pred = a["drawings"], list(a["lambdas"]), a["g_predictions"]
    before = measure_factors(drawings[:, 0, lambdas.index(1.0)])
    after = measure_factors(drawings[:, 0, lambdas.index(0.0)])
    only = []
    for i in range(len(pred)):
        comparable = (before["found"][i] and after["found"][i]
                      and not colour_in_between(np.array([before["colour_score"][i], after["colour_score"][i]])).any())
        nuisance = [abs(float(after[k][i]) - float(before[k][i])) > t for k, t in MEASURED_TOLERANCES.items()
                    if k != "colour"]
        only.append(bool(comparable and before["colour"][i] != after["colour"][i] and not any(nuisance)))
    only = np.array(only)
    names = ("pink", "purple")
    for c in np.unique(pred):
        key = f"top concepts changing only causal factors, {names[c]} images"
        assert metrics[key] == pytest.approx(float(np.mean(only[pred == c])))
    assert not any(k.endswith(f"{names[c]} images") for c in set(range(2)) - set(pred.tolist()) for k in metrics)
    assert metrics["top concepts changing only causal factors"] == pytest.approx(float(np.mean(only)))
