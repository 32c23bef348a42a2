"""`viscoin-jax explain` with the activation and decision-boundary views on tiny ResNet and i-ResNet
checkpoints: the saved channels are each image's most active ones (recomputed from the restored
model), the boundary view's held-out fraction is recomputed from its saved points."""

import json

import numpy as np
import pytest

from viscoin_jax.cli.explain import explain
from viscoin_jax.trainers import classifier
from viscoin_jax.training.runs import restore_task_state
from viscoin_jax.training.config import load_config
from viscoin_jax.training.loop import run_training

pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")

TINY = ["--config.train.batch_size=8", "--config.train.num_steps=2", "--config.train.eval_every=0",
        "--config.checkpoint.every=2", "--config.checkpoint.async_save=False", "--config.data.synthetic_size=64"]


def _train(tmp_path_factory, variant, extra):
    workdir = tmp_path_factory.mktemp(variant)
    config = load_config(f"configs/classifier_synthetic.py:{variant}", TINY + extra)
    run_training(classifier.make_task(config), config, workdir)
    return workdir


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    return _train(tmp_path_factory, "resnet", ["--config.model.width=4"])


@pytest.fixture(scope="module")
def iresnet(tmp_path_factory):
    return _train(tmp_path_factory, "iresnet", ["--config.model.blocks_per_stage=(1, 1)"])


def _images(n=5):
    from viscoin_jax.cli.explain import load_images
    return load_images(f"synthetic/blob_binary:test:{n}", 32)


def test_resnet_activations_and_boundary(resnet, tmp_path):
    out = tmp_path / "r"
    explain(str(resnet), "synthetic/blob_binary:test:5", ["activations", "decision_boundary"], str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    task, state, _, _ = restore_task_state(str(resnet))
    model = task.model(state)
    feats = model(_images()["images"], train=False)[1]
    with np.load(out / "activations_f.npz") as saved:
        for name in ("stage1", "stage4"):
            scores = np.asarray(feats[name], np.float64).mean(axis=(1, 2))
            chosen = saved[f"{name}_channels"]
            k = chosen.shape[1]
            np.testing.assert_allclose(np.take_along_axis(scores, chosen, 1), -np.sort(-scores, 1)[:, :k],
                                       rtol=1e-5, atol=1e-6)
    with np.load(out / "decision_boundary_penultimate.npz") as saved:
        side = np.where(saved["points"][:, 0] < 0, saved["classes"][0], saved["classes"][1])
        assert metrics["f boundary (penultimate): held-out points on their class's side"] == pytest.approx(
            np.mean(side == saved["labels"]))


def test_iresnet_boundary_in_z_with_its_counterfactuals(iresnet, tmp_path):
    out = tmp_path / "i"
    explain(str(iresnet), "synthetic/blob_binary:test:4",
            ["iresnet_counterfactual", "activations", "decision_boundary", "counterfactual_comparison"], str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["i-ResNet (z between class means): validity"] == pytest.approx(
        metrics["i-ResNet counterfactual validity"])
    assert metrics["i-ResNet (z between class means): L1 to the input"] == pytest.approx(
        metrics["i-ResNet counterfactual L1"], rel=1e-5)
    assert "f boundary (z): i-ResNet counterfactuals ending on the target's side" in metrics
    with np.load(out / "decision_boundary_z.npz") as saved:
        assert saved["class_axis_images"].shape == (9, 32, 32, 3)
        assert saved["ends_i-ResNet"].shape == (4, 2)
    with np.load(out / "activations_f.npz") as saved:
        assert {"stage1_channels", "stage2_channels"} <= set(saved.files)


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    from viscoin_jax.trainers import autoencoder as trainer

    workdir = tmp_path_factory.mktemp("ae")
    config = load_config("autoencoder_synthetic", TINY + ["--config.eval.batch_size=8", "--config.eval.max_batches=1"])
    trainer.train(config, str(workdir))
    return workdir


def test_autoencoder_counterfactuals_on_the_boundary(resnet, autoencoder, tmp_path):
    out = tmp_path / "a"
    explain(str(resnet), "synthetic/blob_binary:test:5", ["autoencoder_counterfactual", "decision_boundary",
                                                           "counterfactual_comparison"],
            str(out), autoencoder=str(autoencoder))
    metrics = json.loads((out / "metrics.json").read_text())
    name = "autoencoder (code between class means)"
    assert metrics[f"{name}: changing a causal factor"] == pytest.approx(
        metrics["autoencoder counterfactuals changing a causal factor"])
    assert metrics[f"{name}: L1 to its own rendering"] == pytest.approx(
        metrics["autoencoder counterfactual L1 to the reconstruction"], rel=1e-5)
    task, state, _, _ = restore_task_state(str(resnet))
    model = task.model(state)
    with np.load(out / "autoencoder_counterfactual.npz") as saved:
        cfs, target, x = saved["counterfactuals"], saved["target"], saved["images"]
        pred = np.asarray(model(cfs, train=False)[0]).argmax(-1)
        np.testing.assert_array_equal(saved["valid"], pred == target)
        assert metrics["autoencoder counterfactual validity"] == pytest.approx(np.mean(pred == target))
        assert metrics["autoencoder counterfactual L1"] == pytest.approx(
            np.mean(np.abs(cfs.astype(np.float64) - x)), rel=1e-5)
        np.testing.assert_array_equal(target, 1 - np.asarray(model(x, train=False)[0]).argmax(-1))
    assert "autoencoder counterfactuals changing a causal factor" in metrics
    assert "f boundary (penultimate): autoencoder counterfactuals ending on the target's side" in metrics
    with pytest.raises(ValueError, match="--autoencoder"):
        explain(str(resnet), "synthetic/blob_binary:test:5", ["autoencoder_counterfactual"], str(tmp_path / "b"))


def test_other_methods_counterfactuals_on_the_boundary(resnet, tmp_path):
    """The latent direction's saved counterfactuals (here: random stand-ins) reach f's boundary view."""
    from viscoin_jax.cli.explain import _latent_counterfactuals
    from viscoin_jax.explain.classifier_report import explain_classifier
    from viscoin_jax.explain.report import Report

    data = _images(5)
    rng = np.random.default_rng(8)
    cfs = rng.uniform(-1, 1, data["images"].shape).astype(np.float32)
    target = rng.integers(0, 2, 5)
    np.savez(tmp_path / "latent_direction.npz", images=data["images"], counterfactuals=cfs,
             projections=data["images"], valid=np.ones(5, bool), target=target)
    extra = _latent_counterfactuals(tmp_path, ["latent_direction", "decision_boundary"])
    assert list(extra) == ["StyleGAN latent direction"] and _latent_counterfactuals(tmp_path, ["latent_direction"]) == {}
    task, state, _, _ = restore_task_state(str(resnet))
    summary = explain_classifier(classifier.explanation_bundle(task, state), data, ["decision_boundary"], Report("t"),
                                 tmp_path, counterfactuals=extra)
    with np.load(tmp_path / "decision_boundary_penultimate.npz") as saved:
        ends = saved["ends_StyleGAN_latent_direction"]
        side = np.where(ends[:, 0] < 0, saved["classes"][0], saved["classes"][1])
    key = "f boundary (penultimate): StyleGAN latent direction counterfactuals ending on the target's side"
    assert summary[key] == pytest.approx(np.mean(side == target))


@pytest.fixture(scope="module")
def resnet_4class(tmp_path_factory):
    return _train(tmp_path_factory, "resnet", ["--config.model.width=4", "--config.model.num_classes=4",
                                               "--config.data.name=synthetic/blob_4class"])


def test_a_four_class_classifier_gets_every_view(resnet_4class, autoencoder, tmp_path):
    """More than two classes: the views run (the boundary view used to stop the run), the boundary separates
    two of the most frequent classes among the explained images, and only counterfactuals from one of the
    pair to the other are drawn on it."""
    from viscoin_jax.cli.explain import load_images

    out = tmp_path / "c4"
    spec = "synthetic/blob_4class:test:11"
    explain(str(resnet_4class), spec, ["gradient", "grad_cam", "deletion_insertion", "activations",
                                       "autoencoder_counterfactual", "decision_boundary"],
            str(out), autoencoder=str(autoencoder))
    metrics = json.loads((out / "metrics.json").read_text())
    labels = load_images(spec, 32)["labels"]
    counts = np.bincount(labels, minlength=4)
    with np.load(out / "autoencoder_counterfactual.npz") as saved:
        target = saved["target"]
    with np.load(out / "decision_boundary_penultimate.npz") as saved:
        pair = saved["classes"].tolist()
        np.testing.assert_array_equal(saved["labels"], labels)
        points, files = saved["points"], set(saved.files)
        chosen = saved["images_of_autoencoder"] if "images_of_autoencoder" in files else None
    assert pair[0] < pair[1] and min(counts[pair]) >= max(np.delete(counts, pair))
    two = np.isin(labels, pair)
    side = np.where(points[:, 0] < 0, pair[0], pair[1])
    assert metrics["f boundary (penultimate): held-out points on their class's side"] == pytest.approx(
        np.mean(side[two] == labels[two]))
    expected = np.flatnonzero(two & np.isin(target, pair))  # none, on this untrained f: then no row and no arrows
    if len(expected):
        np.testing.assert_array_equal(chosen, expected)
    else:
        assert chosen is None and not any("autoencoder counterfactuals ending" in k for k in metrics)
    assert 0.0 <= metrics["gradient deletion AUC"] <= 1.0
    # --setting decision_boundary.classes picks the pair, in its own orientation
    explain(str(resnet_4class), spec, ["decision_boundary"], str(tmp_path / "p"), settings=["decision_boundary.classes=3,1"])
    with np.load(tmp_path / "p" / "decision_boundary_penultimate.npz") as saved:
        assert saved["classes"].tolist() == [3, 1]
