"""`viscoin-jax serve`: a local web app and JSON API that explain new images with a trained run.

    viscoin-jax serve --workdir runs/demo            # then open http://127.0.0.1:8000/

RUN is a pipeline workdir (its classifier/, iresnet/ and viscoin/ stages are used where present) or
one classifier or VisCoIN run. Upload an image (or pick one of the run's test images) and get f's
prediction, attribution maps, VisCoIN's concepts with their relevance drawn at each lambda, and an
i-ResNet counterfactual series, computed on demand by functions compiled at start-up. The server
binds to 127.0.0.1 (this machine only) unless --host says otherwise. Flask serves it
(`pip install 'viscoin-jax[serve]'`).

The API (GET /api returns this as JSON):
  GET  /api/info       -> {resolution, classes, methods, concepts, counterfactual_series, lambdas, max_upload_bytes}
  GET  /api/examples   -> {examples: [{id, image (PNG data URI), label}]}
  POST /api/explain    multipart/form-data with `image` (a PNG/JPEG/... file of the model's size) or `example`
                       (an id from /api/examples); optional `methods` (comma-separated, default all)
                       -> {input, prediction {class, name, probability, probabilities},
                           attributions {method: {map, signed, colour_bar}},
                           concepts {g_class, g_name, g_probability, reconstruction, relevance [K],
                                     top [{concept, relevance, frames [{lambda, image, f_probability}]}]} | null,
                           counterfactual {source, target, target_name, alpha, reached_confidence_in_z,
                                           frames [{t, image, target_probability}]} | null}
Errors are JSON {"error": "..."}: 400 (no image, not an image, unknown method), 404 (unknown
example or path), 413 (upload or image too large), 422 (an image of the wrong size).
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import logging
import sys
from pathlib import Path

import numpy as np

from .log_setup import setup_logging

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 4 * 1024 * 1024  # a request body larger than this gets 413 before it is read
MAX_PIXELS = 4096 * 4096  # a (compressed, small) file that decodes to more pixels gets 413, never decoded
NUM_EXAMPLES = 8
API = {
    "GET /api": "this description",
    "GET /api/info": "resolution, class names, attribution methods, whether concepts / counterfactual series exist",
    "GET /api/examples": "the run's test images: [{id, image (PNG data URI), label}]",
    "POST /api/explain": "multipart/form-data: image=<file of the model's size> or example=<id>; methods=a,b "
                         "(optional) -> prediction, attributions, concepts, counterfactual (see the module docstring)",
    "errors": "JSON {error}: 400 bad request / not an image, 404 unknown example, 413 too large, 422 wrong size",
}


class UploadError(ValueError):
    """A request the server refuses, with the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, resolution: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """uint8 [R, R, 3] from an uploaded file's bytes; UploadError (400 / 413 / 422) otherwise. The
    header is read first, so a huge or wrongly sized image is refused before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UploadError(400, "the uploaded file is empty")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError):
        raise UploadError(400, "the upload is not an image Pillow can read (PNG, JPEG, TIFF, BMP, ...)") from None
    if width * height > max_pixels:
        raise UploadError(413, f"the image is {width}x{height}, more than {max_pixels} pixels")
    if (width, height) != (resolution, resolution):
        raise UploadError(422, f"the image is {width}x{height} but the model takes {resolution}x{resolution}")
    try:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UploadError(400, f"the image could not be decoded: {e}") from None


# ----------------------------------------------------------------------------------------------
# Loading a run


def _stages(workdir: Path) -> dict[str, Path]:
    """{classifier, iresnet, viscoin: run folder} found in a pipeline workdir or a single run."""
    from ..training.runs import restore_task_state

    if (workdir / "checkpoints").is_dir():
        _, _, config, _ = restore_task_state(str(workdir))
        if config.trainer == "viscoin":
            return {"viscoin": workdir, "classifier": Path(config.classifier_workdir)}
        if config.trainer != "classifier":
            raise ValueError(f"{workdir} holds a {config.trainer!r} run; serve takes a classifier, a VisCoIN "
                             "run or a pipeline workdir")
        return {"iresnet" if config.model.name == "iresnet" else "classifier": workdir}
    found = {name: workdir / name for name in ("classifier", "iresnet", "viscoin")
             if (workdir / name / "checkpoints").is_dir()}
    if not found:
        raise FileNotFoundError(f"{workdir} holds no trained run (no checkpoints/ in it or in its classifier/, "
                                "iresnet/ or viscoin/ folders)")
    return found


def load_explainer(workdir: str | Path, methods=None):
    """(LiveExplainer over the run's models, example images uint8 [M, R, R, 3], their labels)."""
    from ..explain.live import DEFAULT_METHODS, LiveExplainer
    from ..trainers import classifier as classifier_trainer
    from ..trainers import viscoin as viscoin_trainer
    from ..training.batches import training_images
    from ..training.runs import restore_task_state
    from .explain import class_names_of

    root = Path(workdir)
    if not root.is_dir():
        raise FileNotFoundError(f"--workdir {root}: no such folder")
    stages = _stages(root)
    loaded = {name: restore_task_state(str(path)) for name, path in stages.items()}
    bundles = {name: classifier_trainer.explanation_bundle(task, state)
               for name, (task, state, _, _) in loaded.items() if name != "viscoin"}
    classifier = bundles.get("classifier") or bundles["iresnet"]
    config = loaded["classifier" if "classifier" in loaded else "iresnet"][2]
    viscoin = None
    if "viscoin" in loaded:
        task, state, _, _ = loaded["viscoin"]
        viscoin = viscoin_trainer.explanation_bundle(task, state)
    resolution = int(config.data.resolution)
    explainer = LiveExplainer(classifier, resolution, class_names=class_names_of(config),
                              methods=methods or DEFAULT_METHODS, viscoin=viscoin,
                              invertible=bundles.get("iresnet"))
    x, y = training_images(config, NUM_EXAMPLES, split="test")
    examples = np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)
    return explainer, examples, np.asarray(y)


# ----------------------------------------------------------------------------------------------
# The web app


def create_app(explainer, examples: np.ndarray, labels=None, *, max_upload_bytes: int = MAX_UPLOAD_BYTES):
    """The Flask app: the page at /, the JSON API under /api (see the module docstring)."""
    from flask import Flask, jsonify, render_template, request
    from werkzeug.exceptions import HTTPException

    from ..explain.live import data_uri
    from ..explain.report import class_label

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(max_upload_bytes)
    app.json.sort_keys = False  # keep the answer's order: classes by index, methods as asked
    info = dict(explainer.info(), max_upload_bytes=int(max_upload_bytes))

    def error(status: int, message: str):
        return jsonify(error=message), status

    @app.errorhandler(HTTPException)
    def http_error(e):  # 404, 405, 413 ... as JSON, with a one-line reason
        message = {413: f"the upload is larger than {max_upload_bytes} bytes"}.get(e.code, e.description)
        return error(e.code or 500, message)

    @app.errorhandler(Exception)
    def unexpected(e):  # never a crash: log it, answer 500
        log.exception("request failed")
        return error(500, f"internal error: {type(e).__name__}: {e}")

    @app.get("/")
    def page():
        return render_template("serve.html", info=info, api=API)

    @app.get("/api")
    def api():
        return jsonify(API)

    @app.get("/api/info")
    def api_info():
        return jsonify(info)

    @app.get("/api/examples")
    def api_examples():
        return jsonify(examples=[{"id": i, "image": data_uri(img),
                                  "label": class_label(explainer.class_names, labels[i]) if labels is not None else None}
                                 for i, img in enumerate(examples)])

    @app.post("/api/explain")
    def api_explain():
        methods = request.form.get("methods") or request.args.get("methods")
        methods = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
        try:
            if "image" in request.files:
                image = decode_upload(request.files["image"].read(), explainer.resolution)
            elif request.form.get("example") is not None:
                try:
                    index = int(request.form["example"])
                except ValueError:
                    raise UploadError(400, f"example must be an id from /api/examples, got {request.form['example']!r}")
                if not 0 <= index < len(examples):
                    raise UploadError(404, f"no example {index}: there are {len(examples)}")
                image = examples[index]
            else:
                raise UploadError(400, "send an image file in the field 'image' (multipart/form-data) "
                                       "or an example id in the field 'example'")
            return jsonify(explainer.explain(image, methods))
        except UploadError as e:
            return error(e.status, str(e))
        except ValueError as e:  # e.g. an unknown method
            return error(400, str(e))

    return app


def main(args: argparse.Namespace) -> int:
    setup_logging("INFO")
    try:
        import flask  # noqa: F401
    except ImportError:
        print("viscoin-jax serve: error: needs Flask: pip install 'viscoin-jax[serve]'", file=sys.stderr)
        return 2
    from werkzeug.serving import make_server

    try:
        if args.max_upload_mb <= 0:
            raise ValueError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
        explainer, examples, labels = load_explainer(args.workdir, args.methods)
    except (ValueError, FileNotFoundError) as e:
        print(f"viscoin-jax serve: error: {e}", file=sys.stderr)
        return 2
    log.info("compiling the explanations (once) ...")
    explainer.warm()
    app = create_app(explainer, examples, labels, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024))
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        log.warning("serving on %s: anyone who can reach this machine can use the app", args.host)
    server = make_server(args.host, args.port, app, threaded=True)
    print(f"viscoin-jax serve: http://{args.host}:{server.server_port}/ (API: /api), Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="a local web app and JSON API explaining new images with a run",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a pipeline workdir, or one classifier / VisCoIN run")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="attribution methods to offer (default: gradient integrated_gradients grad_cam)")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20,
                   help="larger uploads are refused with 413")
    p.set_defaults(func=main)
