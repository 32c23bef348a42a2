"""`viscoin-jax explain` from a classifier checkpoint, in a new process; bad input fails clearly."""

import html.parser
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from viscoin_jax.cli import explain as explain_run
from viscoin_jax.explain.classifier_report import cascade_layers, explain_classifier
from viscoin_jax.trainers.classifier import explanation_bundle
from viscoin_jax.trainers import classifier
from viscoin_jax.training.config import load_config
from viscoin_jax.training.loop import run_training


pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("clf")
    config = load_config("configs/classifier_synthetic.py", [
        "--config.model.width=4", "--config.train.batch_size=8", "--config.train.num_steps=2",
        "--config.train.eval_every=0", "--config.checkpoint.every=2", "--config.checkpoint.async_save=False",
        "--config.data.synthetic_size=64"])
    run_training(classifier.make_task(config), config, workdir)
    return workdir


class _Images(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.count = 0

    def handle_starttag(self, tag, attrs):
        self.count += tag == "img" and dict(attrs).get("src", "").startswith("data:image/png;base64,")


def test_explain_in_a_new_process_writes_report_and_arrays(checkpoint, tmp_path):
    out = tmp_path / "report"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "viscoin_jax.cli", "explain", "--checkpoint", str(checkpoint),
           "--images", "synthetic/blob_binary:test:3", "--methods", "gradient", "grad_cam", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    parser = _Images()
    parser.feed((out / "report.html").read_text())
    assert parser.count == 3 * 3  # inputs + two heat-map grids
    with np.load(out / "grad_cam.npz") as arrays:
        assert arrays["maps"].shape == (3, 32, 32) and np.all(arrays["maps"] >= 0)  # ReLU'd CAM


def test_explain_maps_equal_the_library_functions(checkpoint, tmp_path):
    from viscoin_jax.explain import attributions as attr
    from viscoin_jax.explain.report import Report
    from viscoin_jax.training.common import restore_task_state

    task, state, config, _ = restore_task_state(checkpoint)
    data = explain_run.load_images("synthetic/blob_binary:test:2", 32)
    explain_classifier(explanation_bundle(task, state), data, ["gradient"], Report("t"), tmp_path)
    fn = explanation_bundle(task, state).classifier_fn
    pred = np.asarray(fn(data["images"])).argmax(-1)
    expected = np.asarray(attr.vanilla_gradient(fn, data["images"], pred, reduce="abs_max"))
    with np.load(tmp_path / "gradient.npz") as arrays:
        np.testing.assert_allclose(arrays["maps"], expected, rtol=1e-6)


def test_bad_input_gives_clear_errors(checkpoint, tmp_path):
    npz = tmp_path / "wrong.npz"
    np.savez(npz, images=np.zeros((2, 48, 48, 3), np.uint8))
    with pytest.raises(ValueError, match="images are 48x48 but the model takes 32x32"):
        explain_run.explain(str(checkpoint), str(npz), ["gradient"], str(tmp_path / "o"))
    np.savez(npz, images=np.zeros((2, 32, 32, 1), np.uint8))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\] RGB"):
        explain_run.explain(str(checkpoint), str(npz), ["gradient"], str(tmp_path / "o"))
    with pytest.raises(ValueError, match="iresnet_counterfactual does not apply to a ResNet classifier; it needs an i-ResNet"):
        explain_run.explain(str(checkpoint), "synthetic/blob_binary:test:2", ["iresnet_counterfactual"],
                            str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        explain_run.explain(str(tmp_path / "nothing"), "synthetic/blob_binary:test:2", ["gradient"],
                            str(tmp_path / "o"))


def test_images_from_the_runs_own_data_set(checkpoint, tmp_path):
    """--images dataset:<split>:N reads the run's data set (here the synthetic one) in order."""
    from viscoin_jax.data.synthetic import SyntheticConcepts

    explain_run.explain(str(checkpoint), "dataset:test:3", ["gradient"], str(tmp_path))
    with np.load(tmp_path / "gradient.npz") as arrays:
        images = arrays["images"]
    source = SyntheticConcepts("blob_binary", resolution=32, size=64, split="test")
    expected = np.stack([source[i]["image"] for i in range(3)]).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(images, expected, atol=1e-6)


def test_sanity_check_and_deletion_against_direct_computations(checkpoint, tmp_path):
    """`sanity_check`: Spearman of |gradient| maps, trained vs f with its layers randomised from the top
    (scipy on maps of the randomised model); `deletion_insertion`: AUCs with the background fill, and a
    random-attribution row."""
    import json

    import scipy.stats

    from viscoin_jax.explain import attributions as attr
    from viscoin_jax.explain.report import Report
    from viscoin_jax.metrics.attribution_metrics import deletion_insertion, randomise_params
    from viscoin_jax.training.common import restore_task_state

    task, state, config, _ = restore_task_state(checkpoint)
    data = explain_run.load_images("synthetic/blob_binary:test:3", 32)
    layers = cascade_layers("resnet", state["params"])
    assert layers == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    bundle = explanation_bundle(task, state)
    summary = explain_classifier(bundle, data, ["gradient", "sanity_check", "deletion_insertion"], Report("t"), tmp_path)
    fn = bundle.classifier_fn
    x = data["images"]
    pred = np.asarray(fn(x)).argmax(-1)
    trained = np.abs(np.asarray(attr.vanilla_gradient(fn, x, pred, reduce="abs_max")))
    rng = jax.random.fold_in(jax.random.key(0), 7)
    with np.load(tmp_path / "sanity_check.npz") as a:
        rho = a["spearman_gradient"]
        assert list(a["layers_top_down"]) == layers[::-1]
    full = randomise_params(state["params"], rng, layers=layers)  # every layer re-drawn, once
    for n in (1, 3):  # the top n layers take their re-drawn weights, the others stay trained
        top = tuple(layers[-n:])
        params = jax.tree_util.tree_map_with_path(
            lambda path, t, r: r if str(getattr(path[0], "key", path[0])).startswith(top) else t,
            state["params"], full)
        rfn, _ = bundle.functions_of(params)
        rand = np.abs(np.asarray(attr.vanilla_gradient(rfn, x, pred, reduce="abs_max")))
        expected = [scipy.stats.spearmanr(trained[i].ravel(), rand[i].ravel())[0] for i in range(3)]
        np.testing.assert_allclose(rho[:, n - 1], expected, atol=2e-3)
    assert summary["sanity check gradient: Spearman, all layers randomised"] == pytest.approx(np.mean(rho[:, -1]))
    # deletion: the fill is each image's background (per-channel median), and the random row is there
    fill = np.broadcast_to(np.median(x, axis=(1, 2), keepdims=True), x.shape)
    auc = deletion_insertion(fn, x, trained, pred, mode="deletion", num_steps=16, baseline=fill).auc
    assert summary["gradient deletion AUC"] == pytest.approx(float(np.mean(auc)), abs=1e-5)
    assert 0.0 <= summary["random attribution deletion AUC"] <= 1.0
    assert summary["best attribution deletion AUC minus random"] == pytest.approx(
        summary["gradient deletion AUC"] - summary["random attribution deletion AUC"])
    json.dumps(summary)  # every value is JSON-serialisable


def test_a_setting_reaches_the_method_and_bad_ones_fail_before_loading(checkpoint, tmp_path):
    """--setting METHOD.KEY=VALUE changes what the method computes (here SmoothGrad's sample count,
    checked against the library function called directly); a bad one is one line, before any work."""
    from viscoin_jax.explain import attributions as attr
    from viscoin_jax.training.common import restore_task_state

    explain_run.explain(str(checkpoint), "synthetic/blob_binary:test:3", ["smoothgrad"], str(tmp_path),
                        settings=["smoothgrad.num_samples=3", "smoothgrad.noise_level=0.3"])
    task, state, _, _ = restore_task_state(checkpoint)
    fn = explanation_bundle(task, state).classifier_fn
    data = explain_run.load_images("synthetic/blob_binary:test:3", 32)
    pred = np.asarray(fn(data["images"])).argmax(-1)
    want = np.asarray(attr.smoothgrad(fn, data["images"], pred, key=0, num_samples=3, noise_level=0.3,
                                      reduce="abs_max"))
    default = np.asarray(attr.smoothgrad(fn, data["images"], pred, key=0, num_samples=16, noise_level=0.15,
                                         reduce="abs_max"))
    with np.load(tmp_path / "smoothgrad.npz") as arrays:
        np.testing.assert_allclose(arrays["maps"], want, rtol=1e-5, atol=1e-7)
        assert not np.allclose(arrays["maps"], default, rtol=1e-3)
    for bad, message in [("smoothgrad.samples=3", "smoothgrad has no setting 'samples'; its settings: num_samples"),
                         ("lime.x=1", "unknown method 'lime'"), ("smoothgrad=3", "expected METHOD.KEY=VALUE"),
                         ("smoothgrad.num_samples=many", "must be an integer")]:
        with pytest.raises(ValueError, match=message):
            explain_run.explain(str(tmp_path / "not even a run"), "synthetic/blob_binary:test:2", ["gradient"],
                                str(tmp_path / "o"), settings=[bad])
    with pytest.raises(ValueError, match="grad_cam reads the feature map 'stage9'; this resnet"):
        explain_run.explain(str(checkpoint), "synthetic/blob_binary:test:2", ["grad_cam"], str(tmp_path / "o"),
                            settings=["grad_cam.layer=stage9"])
