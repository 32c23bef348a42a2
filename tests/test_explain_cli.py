"""`viscoin-jax explain` from a classifier checkpoint, in a new process; bad input fails clearly."""

import html.parser
import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from browser import check_report_page, chromium
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
    html = (out / "report.html").read_text()
    parser.feed(html)
    # the summary's thumbnail, the inputs, and per image the original beside each method's map
    assert parser.count == 1 + 3 + 3 * 3
    assert "higher is better" in html and "pink" in html and "purple" in html  # directions and class names
    with np.load(out / "grad_cam.npz") as arrays:
        assert arrays["maps"].shape == (3, 32, 32) and np.all(arrays["maps"] >= 0)  # ReLU'd CAM
    # the key figure is a file of the report's folder and an image in the run's TensorBoard event files
    key = np.asarray(Image.open(out / "key_images" / "attribution_maps.png"))
    assert key.shape == (32, 3 * 32, 3)  # the original, then gradient and Grad-CAM over it
    logged = [_event_pngs(f, "explain/attribution_maps") for f in checkpoint.glob("events.out.tfevents.*")]
    logged = [item for items in logged for item in items]
    assert logged and np.array_equal(np.asarray(Image.open(io.BytesIO(logged[-1][1]))), key)
    assert logged[-1][0] == 2  # at the step of the checkpoint explained


def _event_pngs(path, tag: str) -> list[tuple[int, bytes]]:
    """(step, PNG) of the images logged under `tag` in a TensorBoard event file, read from its records
    (length, crc, record, crc) without TensorFlow: an Event is wall_time (field 1, 8 bytes), then its
    step (field 2, a varint); each image's encoded PNG follows its tag."""
    data, out, pos = path.read_bytes(), [], 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        record = data[pos + 12:pos + 12 + length]
        pos += 12 + length + 4
        at = record.find(tag.encode())
        if at >= 0 and b"\x89PNG" in record[at:]:
            assert record[0] == 0x09 and record[9] == 0x10, "an Event starting with wall_time, then step"
            step, shift, i = 0, 0, 10
            while True:
                step |= (record[i] & 0x7F) << shift
                shift, i = shift + 7, i + 1
                if record[i - 1] < 0x80:
                    break
            start = record.index(b"\x89PNG", at)
            out.append((step, record[start:record.index(b"IEND", start) + 8]))
    return out


def test_explain_maps_equal_the_library_functions(checkpoint, tmp_path):
    from viscoin_jax.explain import attributions as attr
    from viscoin_jax.explain.report import Report
    from viscoin_jax.training.runs import restore_task_state

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
    # labels the 2-class model has no class for: images of another task, refused before any method runs
    with pytest.raises(ValueError, match=r"labels run from 0 to 3, but the classifier run has 2 classes"):
        explain_run.explain(str(checkpoint), "synthetic/blob_4class:test:12", ["gradient"], str(tmp_path / "o4"))
    np.savez(npz, images=np.zeros((3, 32, 32, 3), np.uint8), labels=np.array([0, -1, 1]))
    with pytest.raises(ValueError, match=r"labels run from -1 to 1"):
        explain_run.explain(str(checkpoint), str(npz), ["gradient"], str(tmp_path / "o5"))
    assert not (tmp_path / "o4").exists() and not (tmp_path / "o5").exists()
    np.savez(npz, images=np.zeros((3, 32, 32, 3), np.uint8), labels=np.array([1, 0, 1]))  # in range: explained
    explain_run.explain(str(checkpoint), str(npz), ["gradient"], str(tmp_path / "o6"))
    assert (tmp_path / "o6" / "metrics.json").is_file()


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
    from viscoin_jax.training.runs import restore_task_state

    task, state, config, _ = restore_task_state(checkpoint)
    data = explain_run.load_images("synthetic/blob_binary:test:3", 32)
    layers = cascade_layers("resnet", state["params"])
    assert layers == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    bundle = explanation_bundle(task, state)
    report = Report("t")
    summary = explain_classifier(bundle, data, ["gradient", "sanity_check", "deletion_insertion"], report, tmp_path)
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
    # the curves: deletion and insertion plots, each with the method's mean curve and the dashed random one
    html = report.to_html()
    assert html.count("<polyline") == 4 and html.count("stroke-dasharray") >= 2 + 2  # lines and legend
    if chromium() is not None:
        seen = check_report_page(report.write(tmp_path), Path(os.environ.get("VISCOIN_SHOTS", "/tmp/shots")) /
                                 "classifier_report.png")
        assert seen["images"] >= 3 + 3 * 2


def test_a_setting_reaches_the_method_and_bad_ones_fail_before_loading(checkpoint, tmp_path):
    """--setting METHOD.KEY=VALUE changes what the method computes (here SmoothGrad's sample count,
    checked against the library function called directly); a bad one is one line, before any work."""
    from viscoin_jax.explain import attributions as attr
    from viscoin_jax.training.runs import restore_task_state

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
                         ("smoothgrad.num_samples=many", "must be an integer"),
                         ("decision_boundary.classes=2", "classes must be 'auto' or two different class numbers"),
                         ("decision_boundary.classes=1,1", "two different class numbers 'a,b', got '1,1'"),
                         ("decision_boundary.classes=0,-2", "two different class numbers"),
                         ("decision_boundary.classes=0,x", "two different class numbers")]:
        with pytest.raises(ValueError, match=message):
            explain_run.explain(str(tmp_path / "not even a run"), "synthetic/blob_binary:test:2", ["gradient"],
                                str(tmp_path / "o"), settings=[bad])
    # a pair the 2-class run does not have: refused once the run is loaded, before any method runs
    with pytest.raises(ValueError, match=r"decision_boundary.classes: class 2 is not one of the classifier run's 2"):
        explain_run.explain(str(checkpoint), "synthetic/blob_binary:test:2", ["gradient", "decision_boundary"],
                            str(tmp_path / "o7"), settings=["decision_boundary.classes=2,0"])
    assert not (tmp_path / "o7").exists()
    with pytest.raises(ValueError, match="grad_cam reads the feature map 'stage9'; this resnet"):
        explain_run.explain(str(checkpoint), "synthetic/blob_binary:test:2", ["grad_cam"], str(tmp_path / "o"),
                            settings=["grad_cam.layer=stage9"])


@pytest.mark.parametrize("value", ["1", "0", "1.5"])
def test_a_bad_latent_confidence_is_one_line_before_loading(tmp_path, capsys, value):
    from viscoin_jax.cli import main

    rc = main(["explain", "--checkpoint", str(tmp_path / "not even a run"), "--images", "synthetic/blob_binary:test:2",
               "--methods", "latent_direction", "--out", str(tmp_path / "o"), "--latent-confidence", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "confidence must lie in (0, 1)" in err[0] and value in err[0]
    assert not (tmp_path / "o").exists()
