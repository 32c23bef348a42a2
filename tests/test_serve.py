"""`viscoin-jax serve`: the JSON API on a pipeline-like workdir of tiny untrained runs (classifier,
i-ResNet, VisCoIN) against direct computations, bad uploads answered with 4xx, and the page in
headless Chromium (skipped, with the reason, where Chromium is absent)."""

import io
import json
import os
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("flask", reason="viscoin-jax serve needs Flask (pip install 'viscoin-jax[serve]')")

from viscoin_jax.cli import serve  # noqa: E402
from viscoin_jax.explain import attributions as attr  # noqa: E402
from viscoin_jax.trainers import classifier  # noqa: E402
from viscoin_jax.training.runs import restore_task_state  # noqa: E402

from browser import BROKEN_IMAGES, IMAGES_LOADED, Browser, chromium
from viscoin_fixtures import make_frozen_runs, make_iresnet_run, make_viscoin_run

pytestmark = [pytest.mark.usefixtures("persistent_compilation_cache"),
              pytest.mark.filterwarnings("ignore:config.loss.lpips_weights is empty")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """classifier/ (ResNet), iresnet/ and viscoin/ beside each other, as `viscoin-jax run` leaves them."""
    root = tmp_path_factory.mktemp("run")
    clf, sg2, _ = make_frozen_runs(root / "frozen")
    (root / "classifier").symlink_to(clf)
    make_viscoin_run(root, clf, sg2)
    make_iresnet_run(root / "iresnet")
    return root


@pytest.fixture(scope="module")
def app(workdir):
    explainer, examples, labels = serve.load_explainer(workdir, ["gradient", "integrated_gradients", "grad_cam"])
    explainer.warm()
    flask_app = serve.create_app(explainer, examples, labels, max_upload_bytes=64 * 1024)
    return flask_app, explainer, examples


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _decode(uri: str) -> np.ndarray:
    import base64

    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def test_api_answers_json_that_matches_the_models(app, workdir):
    flask_app, explainer, examples = app
    client = flask_app.test_client()
    info = client.get("/api/info").get_json()
    assert info["resolution"] == 32 and info["classes"] == ["pink", "purple"]
    assert info["concepts"] and info["counterfactual_series"] and info["methods"] == [
        "gradient", "integrated_gradients", "grad_cam"]
    assert set(client.get("/api").get_json()) >= {"GET /api/info", "POST /api/explain"}
    listed = client.get("/api/examples").get_json()["examples"]
    np.testing.assert_array_equal(_decode(listed[2]["image"]), examples[2])

    image = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    response = client.post("/api/explain", data={"image": (io.BytesIO(_png(image)), "x.png")})
    assert response.status_code == 200 and response.mimetype == "application/json"
    answer = json.loads(response.data)
    np.testing.assert_array_equal(_decode(answer["input"]), image)
    # f's probabilities, and the gradient map's colour bar ends, from the restored classifier directly
    task, state, _, _ = restore_task_state(str(workdir / "classifier"))
    fn = classifier.explanation_bundle(task, state).classifier_fn
    x = jnp.asarray(image[None].astype(np.float32) / 127.5 - 1)
    probs = np.asarray(jax.nn.softmax(fn(x), -1))[0]
    assert answer["prediction"]["class"] == int(probs.argmax())
    assert list(answer["prediction"]["probabilities"]) == ["pink", "purple"]  # in class order
    np.testing.assert_allclose(list(answer["prediction"]["probabilities"].values()), probs, rtol=1e-4, atol=1e-6)
    grad = np.asarray(attr.vanilla_gradient(fn, x, np.array([probs.argmax()]), reduce="abs_max"))
    bar = answer["attributions"]["gradient"]["colour_bar"]
    assert (bar["lo"], bar["hi"]) == (f"{grad.min():.3g}", f"{grad.max():.3g}")
    assert answer["attributions"]["integrated_gradients"]["signed"] and float(
        answer["attributions"]["integrated_gradients"]["colour_bar"]["lo"]) < 0
    # concepts: top relevances sorted, in [-1, 1]; the drawing at lambda 1 is the reconstruction
    concepts = answer["concepts"]
    rel = [t["relevance"] for t in concepts["top"]]
    assert rel == sorted(rel, reverse=True) and max(map(abs, concepts["relevance"])) == pytest.approx(1.0)
    assert rel[0] == pytest.approx(max(concepts["relevance"]))
    lam1 = [f for f in concepts["top"][0]["frames"] if f["lambda"] == 1.0][0]
    assert np.abs(_decode(lam1["image"]).astype(int) - _decode(concepts["reconstruction"])).max() <= 1
    # the counterfactual series starts at the input (inverse of its own z) and moves to the target
    series = answer["counterfactual"]
    assert [f["t"] for f in series["frames"]][0] == 0.0 and series["frames"][-1]["t"] == 1.0
    assert np.abs(_decode(series["frames"][0]["image"]).astype(int) - image).mean() < 8
    assert series["target"] != series["source"]


def test_bad_requests_get_a_clear_4xx(app):
    flask_app, _, _ = app
    client = flask_app.test_client()

    def post(data):
        response = client.post("/api/explain", data=data)
        return response.status_code, response.get_json()["error"]

    status, message = post({"image": (io.BytesIO(b"this is text, not a picture"), "x.png")})
    assert status == 400 and "not an image" in message
    status, message = post({"image": (io.BytesIO(_png(np.zeros((48, 40, 3), np.uint8))), "x.png")})
    assert status == 422 and "40x48 but the model takes 32x32" in message
    status, message = post({"image": (io.BytesIO(os.urandom(80 * 1024)), "big.png")})
    assert status == 413 and "larger than" in message
    huge = io.BytesIO()
    Image.new("L", (5000, 5000)).save(huge, format="PNG")  # a small file that decodes to 25 M pixels
    assert len(huge.getvalue()) < 64 * 1024
    status, message = post({"image": (io.BytesIO(huge.getvalue()), "bomb.png")})
    assert status == 413 and "5000x5000" in message
    assert post({"image": (io.BytesIO(b""), "empty.png")})[0] == 400
    assert post({})[0] == 400
    assert post({"example": "99"})[0] == 404
    status, message = post({"example": "0", "methods": "gradient,nope"})
    assert status == 400 and "nope" in message
    assert client.get("/api/nothing").status_code == 404 and client.get("/api/nothing").get_json()["error"]


def test_serve_refuses_a_folder_without_a_run(tmp_path, capsys):
    from viscoin_jax.cli import main

    assert main(["serve", "--workdir", str(tmp_path)]) == 2
    assert "holds no trained run" in capsys.readouterr().err


@pytest.mark.skipif(chromium() is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_the_page_in_headless_chromium(app):
    """The served page in a real browser: examples load, clicking one shows the explanation (every
    image loads), the lambda and t sliders change the frame shown, the method switch changes the map."""
    from werkzeug.serving import make_server

    flask_app, _, _ = app
    server = make_server("127.0.0.1", 0, flask_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    shots = Path(os.environ.get("VISCOIN_SHOTS", "/tmp/shots"))
    try:
        with Browser(height=1400) as browser:
            page = browser.open(f"http://127.0.0.1:{server.server_port}/")
            page.wait_for("document.querySelectorAll('#examples img').length === 8")
            page.eval("document.querySelector('#examples img').click()")
            page.wait_for("!document.getElementById('result').hidden", timeout=120)
            assert page.eval(IMAGES_LOADED), page.eval(BROKEN_IMAGES)
            assert page.eval("document.getElementById('error').textContent") == ""
            for k in range(page.eval("document.querySelectorAll('.slider').length")):
                before = page.eval(f"document.querySelectorAll('.slider')[{k}].querySelector('img').src")
                after = page.eval(f"""(() => {{ const s = document.querySelectorAll('.slider')[{k}];
                    const i = s.querySelector('input'); i.value = i.max; i.dispatchEvent(new Event('input'));
                    return s.querySelector('img').src; }})()""")
                frames = page.eval(f"Array.from(document.querySelectorAll('.slider')[{k}].parentElement"
                                   ".querySelectorAll('figure img')).map(i => i.src)")
                assert after != before and after == frames[-1]
            page.screenshot(shots / "serve_example_explained.png")
            shown = "document.querySelector('#attribution div img')"  # the map beside the input
            assert page.eval(f"{shown}.src === last.attributions.gradient.map")
            page.eval("(() => { const s = document.getElementById('method'); s.value = 'grad_cam';"
                      " s.dispatchEvent(new Event('change')); })()")
            assert page.eval(f"{shown}.alt") == "grad_cam"
            assert page.eval(f"{shown}.src === last.attributions.grad_cam.map")
            # a bad upload shows the server's one-line reason on the page
            page.eval("""(() => { const f = new FormData(); f.append('image', new Blob(['not a picture']), 'x.png');
                                  return explain(f); })()""")
            assert "not an image" in page.eval("document.getElementById('error').textContent")
            assert page.eval("document.getElementById('result').hidden")
            page.screenshot(shots / "serve_bad_upload.png", full_page=False)
    finally:
        server.shutdown()
