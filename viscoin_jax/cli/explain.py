"""`viscoin-jax explain`: explain a trained classifier from its Orbax checkpoint.

    viscoin-jax explain --checkpoint runs/clf --images synthetic/blob_binary:test:16 \\
        --methods gradient smoothgrad integrated_gradients grad_cam occlusion --out runs/report
    viscoin-jax explain --checkpoint runs/viscoin --images synthetic/blob_binary:test:16 \\
        --methods concepts faithfulness consistency latent_direction latent_interpolation --out runs/report

The methods and the checkpoints each applies to are the table in `viscoin_jax.explain.methods`
(`explain --help` prints it). On a VisCoIN checkpoint the attribution methods explain its f.

Writes `OUT/report.html` (self-contained, images embedded), `OUT/metrics.json` and one
`OUT/<method>.npz` per method with the raw arrays. `--images` is a synthetic split
(`synthetic/<variant>:<split>[:count]`; the report then also measures which generative factors the
counterfactuals and concepts change), a folder of images, or an `.npz` holding `images` (NHWC,
uint8 or [-1, 1]) and optionally `labels`. Every method is also a plain function
(`viscoin_jax.explain.attributions`, `concepts`, `latent_direction`, ...), usable from a notebook;
this module loads a checkpoint, has its trainer turn it into the callables each report takes
(`explanation_bundle`, `latent_models`), runs the reports and writes them. Launched on every
process of a multi-process run (a pod), process 0 explains alone, on one device, and writes every
file; the other processes wait for it and exit with its status.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..explain import methods as registry
from .log_setup import setup_logging

# The reports, the trainers and the data sets (JAX, Orbax, TFDS) are imported when a command runs,
# not when the command line is parsed: `viscoin-jax --help` and the other commands start fast.

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Images


def load_images(spec: str, resolution: int, count: int | None = None) -> dict[str, Any]:
    """{'images': float32 [N, R, R, 3] in [-1, 1], 'labels': int [N] or None, 'factors': dict or None}."""
    if spec.startswith("synthetic/"):
        from ..data.synthetic import SyntheticConcepts

        parts = spec[len("synthetic/"):].split(":")
        variant, split = parts[0], parts[1] if len(parts) > 1 else "test"
        n = int(parts[2]) if len(parts) > 2 else (count or 16)
        n = min(n, count) if count else n
        source = SyntheticConcepts(variant, resolution=resolution, size=max(n, 1), split=split)
        items = [source[i] for i in range(n)]
        images = np.stack([it["image"] for it in items]).astype(np.float32) / 127.5 - 1.0
        labels = np.asarray([it["label"] for it in items], np.int32)
        factors = {k: np.asarray([it["factors"][k] for it in items]) for k in items[0]["factors"]}
        return {"images": images, "labels": labels, "factors": factors, "class_names": source.class_names}
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--images {spec}: no such file or folder (or use synthetic/<variant>:<split>)")
    labels = None
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"))
        if not files:
            raise ValueError(f"--images {spec}: the folder holds no .png/.jpg/.tif images")
        arrays = []
        for f in files[:count] if count else files:
            try:
                arrays.append(np.asarray(Image.open(f).convert("RGB")))
            except OSError as e:
                raise ValueError(f"cannot read image {f}: {e}") from None
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"--images {spec}: images of different sizes {sorted(shapes)}")
        images = np.stack(arrays)
    elif path.suffix == ".npz":
        with np.load(path) as data:
            if "images" not in data:
                raise ValueError(f"{path} has no 'images' array (has {sorted(data.files)})")
            images = data["images"]
            labels = data["labels"] if "labels" in data else None
    else:
        raise ValueError(f"--images {spec}: expected a folder, an .npz or synthetic/<variant>:<split>")
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3] RGB, got shape {images.shape}")
    if images.shape[1:3] != (resolution, resolution):
        raise ValueError(f"images are {images.shape[1]}x{images.shape[2]} but the model takes "
                         f"{resolution}x{resolution}")
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 127.5 - 1.0
    elif images.min() < -1.001 or images.max() > 1.001:
        raise ValueError("float images must be in [-1, 1]")
    if count:
        images = images[:count]
        labels = labels[:count] if labels is not None else None
    return {"images": images.astype(np.float32), "labels": labels, "factors": None}


def class_names_of(config) -> tuple[str, ...] | None:
    """The run's class names, from its data source (None where the source names none or cannot be
    opened here, e.g. a TFDS set not downloaded: the report then says "class 3")."""
    from ..data.pipeline import make_source

    try:
        names = getattr(make_source(config.data, split="test"), "class_names", None)
    except (ValueError, OSError, ImportError) as e:
        log.info("no class names: %s", e)
        return None
    return tuple(str(n) for n in names) if names else None


def run_dir(checkpoint: str) -> Path:
    """The run's workdir (where its TensorBoard event files are) from --checkpoint (workdir or its checkpoints/)."""
    path = Path(checkpoint)
    return path.parent if path.name == "checkpoints" else path


def _latest_step(run: Path) -> int:
    """The step of the run's newest checkpoint (the step the explanations' TensorBoard images carry)."""
    import jax

    from ..training.checkpoint import CHECKPOINT_SUBDIR, Checkpointer

    # read by the one process that explains (see `main`): no other process takes part
    checkpointer = Checkpointer(run / CHECKPOINT_SUBDIR, read_only=True, this_process_only=jax.process_count() > 1)
    try:
        return int(checkpointer.latest_step() or 0)
    finally:
        checkpointer.close()


def log_key_images(report, out_dir: Path, logdir: Path, step: int) -> dict[str, Path]:
    """Writes the report's key figures as OUT/key_images/<name>.png (the pipeline index shows them) and
    as TensorBoard images `explain/<name>` in the run's event files (skipped, with a warning, where
    the run's folder is not writable)."""
    from PIL import Image as PILImage

    from ..training.monitor import MetricWriter

    files = {}
    if not report.key_images:
        return files
    folder = out_dir / "key_images"
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in report.key_images.items():
        files[name] = folder / f"{name.replace('/', '_')}.png"
        PILImage.fromarray(image).save(files[name])
    try:
        writer = MetricWriter(logdir)
    except OSError as e:
        log.warning("explanations not logged to TensorBoard: %s", e)
        return files
    writer.write_images(step, {f"explain/{name}": image for name, image in report.key_images.items()})
    writer.close()
    return files


def _num_classes(config) -> int | None:
    """The run's class count, where its model config names one."""
    num_classes = config.model.get("num_classes") if "model" in config else None
    return None if num_classes is None else int(num_classes)


def check_labels(labels, config, images: str) -> None:
    """Refuses labels the model has no class for: images of another task (say, 4-class synthetic images for a
    2-class run) would otherwise be scored against the wrong classes and read as a low accuracy."""
    num_classes = _num_classes(config)
    if labels is None or num_classes is None or len(labels) == 0:
        return
    labels = np.asarray(labels)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"--images {images}: its labels run from {int(labels.min())} to {int(labels.max())}, but the "
                         f"{config.trainer} run has {num_classes} classes (0 to {num_classes - 1}): images of "
                         "another task?")


def check_boundary_pair(pair, config) -> None:
    """The decision boundary's asked-for pair must be classes the run has (before any method runs)."""
    num_classes = _num_classes(config)
    if pair is not None and num_classes is not None and max(pair) >= num_classes:
        raise ValueError(f"--setting decision_boundary.classes: class {max(pair)} is not one of the "
                         f"{config.trainer} run's {num_classes} classes (0 to {num_classes - 1})")


def _summary_text(checkpoint, config, images, data, methods) -> str:
    names = data.get("class_names")
    classes = f" (classes: {', '.join(names)})" if names else ""
    return (f"{len(data['images'])} images from {images}{classes}, explained with the {config.trainer} run "
            f"{checkpoint} (model {config.model.get('name', config.trainer)}); methods: {', '.join(methods)}.")
# ----------------------------------------------------------------------------------------------
# Command line


def _variant(images: str) -> str | None:
    """The synthetic variant named by an --images spec (its factors can be measured), else None."""
    if not images.startswith("synthetic/"):
        return None
    return images[len("synthetic/"):].split(":")[0]


def explain(checkpoint: str, images: str, methods, out: str, *, count: int | None = None,
            generator: str | None = None, latent_settings=None, concept_settings=None,
            autoencoder: str | None = None, settings: Sequence[str] = ()) -> Path:
    """Loads `checkpoint`, runs `methods` on `images`, writes OUT/report.html and the npz arrays.

    A classifier checkpoint takes the attribution methods, the i-ResNet counterfactual and, given a
    StyleGAN2 run as `generator`, the latent methods. A VisCoIN checkpoint takes the concept methods,
    the latent methods (its own f and G) and the attribution methods (on its classifier f).
    `settings`: METHOD.KEY=VALUE overrides of the method registry's default settings.
    """
    from ..explain.classifier_report import explain_classifier
    from ..explain.headline import headline_rows
    from ..explain.latent_report import LatentSettings, explain_latent
    from ..explain.report import Report
    from ..explain.viscoin_report import ConceptSettings, explain_viscoin
    from ..trainers import classifier as classifier_trainer
    from ..trainers import stylegan2 as stylegan2_trainer
    from ..trainers import viscoin as viscoin_trainer
    from ..training.batches import training_images
    from ..training.runs import restore_task_state

    out_dir = Path(out)
    registry.check_request(list(methods), registry.KINDS)  # unknown names fail before anything is loaded
    method_settings = registry.resolve_settings(settings)  # so do bad --setting values
    task, state, config, _ = restore_task_state(checkpoint)
    if config.trainer not in ("classifier", "viscoin"):
        raise ValueError(f"{checkpoint} holds a {config.trainer!r} run; explain takes a classifier or "
                         "a viscoin checkpoint")
    offers = {registry.VISCOIN} if config.trainer == "viscoin" else {str(config.model.name)}
    if generator and config.trainer == "classifier":
        offers.add(registry.WITH_GENERATOR)
    if autoencoder:
        offers.add(registry.WITH_AUTOENCODER)
    groups = registry.check_request(list(methods), offers)
    autoencoder_fns = None
    if autoencoder and "autoencoder_counterfactual" in methods:
        from ..trainers import autoencoder as autoencoder_trainer

        ae_task, ae_state, _ = autoencoder_trainer.load(autoencoder)
        autoencoder_fns = autoencoder_trainer.autoencoder_functions(ae_task, ae_state)
    resolution = int(config.data.resolution)
    if images.startswith("dataset:"):  # dataset:<split>[:N]: the run's own data set (TFDS, folders, ...)
        parts = images.split(":")
        n = int(parts[2]) if len(parts) > 2 else (count or 16)
        x, y = training_images(config, min(n, count) if count else n, split=parts[1] if len(parts) > 1 else "test")
        data = {"images": x, "labels": np.asarray(y, np.int32), "factors": None}
    else:
        data = load_images(images, resolution, count)
    check_labels(data["labels"], config, images)
    if "decision_boundary" in methods:
        check_boundary_pair(registry.class_pair(method_settings["decision_boundary"]["classes"]), config)
    if data.get("class_names") is None:
        data["class_names"] = class_names_of(config)
    variant = _variant(images)
    report = Report(f"viscoin-jax explanations: {Path(checkpoint).name}")
    report.add_section("Run", f"checkpoint {checkpoint} ({config.trainer}), images {images}, "
                              f"methods {', '.join(methods)}")
    summary: dict = {"explained images": int(len(data["images"]))}
    titles = {registry.CLASSIFIER: "attributions", registry.CONCEPTS: "VisCoIN concepts", registry.LATENT: "latent"}
    comparison = groups.pop(registry.COMPARISON, None)  # drawn last, from what the other methods saved
    if "decision_boundary" in methods and registry.CLASSIFIER in groups:
        # f's boundary view draws the other groups' counterfactuals (the latent direction's) too: they go first
        groups[registry.CLASSIFIER] = groups.pop(registry.CLASSIFIER)
    for i, (group, names) in enumerate(groups.items(), 1):
        t0 = time.perf_counter()
        log.info("[%d/%d] %s: %s", i, len(groups), titles[group], ", ".join(names))
        if group == registry.CLASSIFIER:
            if config.trainer == "viscoin":  # on the frozen classifier f of the VisCoIN run
                f_task, f_state, _ = classifier_trainer.load(config.classifier_workdir)
                report.add_section("Classifier f", f"attributions of {config.classifier_workdir}")
                bundle = classifier_trainer.explanation_bundle(f_task, f_state)
            else:
                bundle = classifier_trainer.explanation_bundle(task, state)
            summary.update(explain_classifier(bundle, data, names, report, out_dir, variant=variant,
                                              autoencoder=autoencoder_fns,
                                              counterfactuals=_latent_counterfactuals(out_dir, methods),
                                              settings=method_settings))
        elif group == registry.CONCEPTS:
            summary.update(explain_viscoin(viscoin_trainer.explanation_bundle(task, state), data, names, report,
                                           out_dir, concept_settings or ConceptSettings(), variant=variant))
        else:
            if config.trainer == "viscoin":
                models = viscoin_trainer.latent_models(task, state)
            else:
                f = classifier_trainer.explanation_bundle(task, state)
                models = stylegan2_trainer.latent_models(generator, f.classifier_fn)
            summary.update(explain_latent(models, data, names, report, out_dir, latent_settings or LatentSettings(),
                                          variant=variant))
        log.info("[%d/%d] %s done in %.1fs", i, len(groups), titles[group], time.perf_counter() - t0)
    if comparison:
        from ..explain.counterfactual_comparison import add_comparison

        summary.update(add_comparison(report, [out_dir], variant, methods=list(methods)))
    report.add_metrics(summary, title="All metrics")
    (out_dir / "metrics.json").parent.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=1, default=float))
    log_key_images(report, out_dir, run_dir(checkpoint), _latest_step(run_dir(checkpoint)))
    report.set_summary(_summary_text(checkpoint, config, images, data, methods), headline_rows(summary),
                       links=[("contents", "#contents"), ("all metrics", f"#{report.last_block_id}"),
                              ("metrics.json", "metrics.json")],
                       thumbnails=[(name, image, f"#{report.key_anchors[name]}")
                                   for name, image in report.key_images.items()])
    path = report.write(out_dir)
    print(f"report: {path}")
    return path


def _latent_counterfactuals(out_dir: Path, methods) -> dict:
    """{method: (counterfactuals, targets)} that the latent group of this call saved, for the
    decision-boundary view of f (the latent methods explain the same f: a VisCoIN run's own, or the
    classifier given a --generator); empty otherwise."""
    from ..explain.counterfactual_comparison import counterfactual_sets

    if "decision_boundary" not in methods or "latent_direction" not in methods:
        return {}
    return {s.method: (s.counterfactuals, s.target) for s in counterfactual_sets([out_dir], ["latent_direction"])}


def main(args: argparse.Namespace) -> int:
    """Under several processes (a pod launch) process 0 explains alone and writes every file; the
    others wait for it and exit with its status (the explanations are small: one device does)."""
    setup_logging("INFO")
    from ..training.distributed import ProcessZeroFailed, maybe_initialize_distributed, on_process_zero

    try:
        from ..explain.latent_report import LatentSettings

        maybe_initialize_distributed()
        latent = LatentSettings(projection_steps=args.projection_steps, direction_samples=args.direction_samples,
                                confidence=args.latent_confidence)
        on_process_zero(lambda: explain(args.checkpoint, args.images, args.methods, args.out, count=args.count,
                                        generator=args.generator, latent_settings=latent,
                                        autoencoder=args.autoencoder, settings=args.setting),
                        "the explanations", user_errors=(ValueError, FileNotFoundError))
    except (ValueError, FileNotFoundError) as e:
        print(f"viscoin-jax explain: error: {e}", file=sys.stderr)
        return 2
    except ProcessZeroFailed as e:
        print(f"viscoin-jax explain: error: {e}", file=sys.stderr)
        return 2 if e.user_error else 1
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("explain", help="explain a classifier (or a VisCoIN run) from its checkpoint",
                              description=__doc__, epilog=registry.help_text(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run's workdir (or its checkpoints/ folder)")
    p.add_argument("--images", required=True,
                   help="synthetic/<variant>:<split>[:N], dataset:<split>[:N] (the run's data set), a folder, or an .npz")
    p.add_argument("--methods", nargs="+", default=["gradient", "integrated_gradients", "grad_cam", "occlusion"],
                   metavar="METHOD", help="methods to run (the table below says which apply to which checkpoint)")
    p.add_argument("--out", required=True, help="output folder for report.html and the npz arrays")
    p.add_argument("--count", type=int, default=None, help="use at most this many images")
    p.add_argument("--generator", default=None,
                   help="a stylegan2 run for the latent methods on a classifier checkpoint")
    p.add_argument("--autoencoder", default=None,
                   help="an autoencoder run for autoencoder_counterfactual (on f of any checkpoint)")
    p.add_argument("--setting", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="change a method's setting (repeatable), e.g. smoothgrad.num_samples=32; the "
                        "defaults are listed below")
    p.add_argument("--projection-steps", type=int, default=300, help="W+ projection steps per image batch")
    p.add_argument("--direction-samples", type=int, default=512,
                   help="generated samples the logistic-regression direction is fitted on")
    p.add_argument("--latent-confidence", type=float, default=0.99,
                   help="a latent counterfactual is the first image along the direction that f gives the target "
                        "class with at least this probability")
    p.set_defaults(func=main)
