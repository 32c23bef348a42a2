"""`viscoin-jax explain`: explain a trained classifier from its Orbax checkpoint.

    viscoin-jax explain --checkpoint runs/clf --images synthetic/blob_binary:test:16 \\
        --methods gradient smoothgrad integrated_gradients grad_cam occlusion --out runs/report
    viscoin-jax explain --checkpoint runs/viscoin --images synthetic/blob_binary:test:16 \\
        --methods concepts faithfulness consistency latent_direction latent_interpolation --out runs/report

Methods: attributions of the classifier, the i-ResNet counterfactual (i-ResNet checkpoints), the
VisCoIN concept methods (VisCoIN checkpoints) and the latent methods (a VisCoIN checkpoint, or a
classifier checkpoint with `--generator <stylegan2 run>`); `--help` lists them by checkpoint. On
a VisCoIN checkpoint the attributions explain its f.

Writes `OUT/report.html` (self-contained, images embedded), `OUT/metrics.json` and one
`OUT/<method>.npz` per method with the raw arrays. `--images` is a synthetic split
(`synthetic/<variant>:<split>[:count]`; the report then also measures which generative factors the
counterfactuals and concepts change), a folder of images, or an `.npz` holding `images` (NHWC,
uint8 or [-1, 1]) and optionally `labels`. Every method is also a plain function
(`viscoin_jax.explain.attributions`, `concepts`, `latent_direction`, ...), usable from a notebook;
this module only loads, runs and reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

ATTRIBUTION_METHODS = ("gradient", "smoothgrad", "integrated_gradients", "grad_cam", "occlusion")
CLASSIFIER_METHODS = ATTRIBUTION_METHODS + ("sanity_check", "deletion_insertion", "iresnet_counterfactual")
RESNET_ONLY = ("grad_cam",)  # needs a ResNet's named stages
IRESNET_ONLY = ("iresnet_counterfactual",)  # needs an invertible classifier


def methods_by_checkpoint() -> dict[str, tuple[str, ...]]:
    """The methods `explain` takes on each kind of checkpoint (printed by `explain --help`)."""
    from .latent_report import LATENT_METHODS
    from .viscoin_report import VISCOIN_METHODS

    return {
        "classifier (ResNet)": tuple(m for m in CLASSIFIER_METHODS if m not in IRESNET_ONLY),
        "iresnet (i-ResNet classifier)": tuple(m for m in CLASSIFIER_METHODS if m not in RESNET_ONLY),
        "viscoin (and, run on its classifier f, the methods of f's kind)": VISCOIN_METHODS + LATENT_METHODS,
        "stylegan2 + classifier: a classifier checkpoint with --generator <stylegan2 run> (and the "
        "classifier's own methods)": LATENT_METHODS,
    }


def methods_help() -> str:
    """`explain --help`'s epilog: the methods of each kind of checkpoint, from the lists above."""
    import textwrap

    lines = ["methods by checkpoint (--checkpoint):"]
    for kind, methods in methods_by_checkpoint().items():
        lines += textwrap.wrap(f"{kind}:", 100, initial_indent="  ", subsequent_indent="    ")
        lines += textwrap.wrap(" ".join(methods), 100, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)


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
        return {"images": images, "labels": labels, "factors": factors}
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--images {spec}: no such file or folder (or use synthetic/<variant>:<split>)")
    labels = None
    if path.is_dir():
        from PIL import Image

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


# ----------------------------------------------------------------------------------------------
# Classifier explanations


def classifier_functions(task, state):
    """Pure callables of a trained classifier (frozen weights): logits, and (features, logits)."""
    from ..training.classifier import classifier_logits

    model = task.model(state)

    def classifier_fn(images):
        return classifier_logits(model, images, train=False)

    def features_and_logits_fn(images):
        out = model(images, train=False)
        return (out[1], out[0]) if isinstance(out, tuple) else ({}, out)

    return classifier_fn, features_and_logits_fn


def attribution_map(name: str, classifier_fn, feats_fn, images, targets, *, key: int = 0) -> jax.Array:
    """The [N, H, W] map of one attribution method with the report's settings (IG: signed channel sum;
    the others: max |.| over channels, Grad-CAM at stage 4, occlusion patches of 1/8 of the side)."""
    from . import attributions as attr

    if name == "gradient":
        m = attr.vanilla_gradient(classifier_fn, images, targets, reduce="abs_max")
    elif name == "smoothgrad":
        m = attr.smoothgrad(classifier_fn, images, targets, key=key, num_samples=16, reduce="abs_max")
    elif name == "integrated_gradients":
        m = attr.reduce_channels(attr.integrated_gradients(classifier_fn, images, targets, num_steps=64), "sum")
    elif name == "grad_cam":
        m = attr.grad_cam(feats_fn, images, "stage4", targets)
    elif name == "occlusion":
        size = images.shape[1]
        m = attr.occlusion(classifier_fn, images, targets, patch_size=max(size // 8, 2), stride=max(size // 16, 1))
    else:
        raise ValueError(f"unknown attribution method {name!r}; known: {ATTRIBUTION_METHODS}")
    return jnp.asarray(m)


def cascade_layers(model_name: str, params) -> list[str]:
    """f's layers as path prefixes in network order (input to output), at the granularity of stages,
    for the cascading randomisation of the sanity check."""
    from ..metrics.attribution_metrics import param_groups

    groups = param_groups(params)
    if model_name == "resnet":
        order = ["conv1", "bn1"] + sorted({g.split("/")[0] for g in groups if g.startswith("layer")},
                                          key=lambda g: int(g[len("layer"):])) + ["fc"]
    elif model_name == "iresnet":
        stages = sorted({g.split("/")[1] for g in groups if g.startswith("stages/")}, key=int)
        order = [f"stages/{i}" for i in stages] + ["head_bn", "head_fc"]
    else:
        raise ValueError(f"sanity_check knows the layer order of resnet and iresnet classifiers, not {model_name!r}")
    return [layer for layer in order if any(g == layer or g.startswith(layer + "/") for g in groups)]


SANITY_IMAGES = 8  # images the randomisation check explains (a compile per method, a run per layer)


def _sanity_check(task, state, images, pred, maps, report, out: Path, *, key: int = 0) -> dict:
    """Adebayo et al.'s model-randomisation check: re-initialise f's layers from the top down (cascading,
    each leaf drawn from N(mean, std) of its trained values) and compare each method's map with the
    trained model's map by the Spearman rank correlation of |map|, per image (the first SANITY_IMAGES),
    averaged. A method whose maps survive the destruction of the weights (rho near 1) does not
    explain the model."""
    from ..metrics.attribution_metrics import cascading_randomisations, spearman_correlation
    from .report import save_arrays

    layers = cascade_layers(task.config.model.name, state["params"])
    rng = jax.random.fold_in(jax.random.key(key), 7)
    images, targets = images[:SANITY_IMAGES], np.asarray(pred)[:SANITY_IMAGES]
    maps = {name: m[:SANITY_IMAGES] for name, m in maps.items()}

    def one(name):  # the method's map as a function of f's params: one compile per method, not per level
        return jax.jit(lambda p: jnp.abs(attribution_map(name, *classifier_functions(task, dict(state, params=p)),
                                                         images, targets, key=key)))

    fns = {name: one(name) for name in maps}
    rho = {name: [] for name in maps}
    for params in cascading_randomisations(state["params"], rng, layers):
        for name, trained in maps.items():
            rho[name].append(np.asarray(spearman_correlation(np.abs(trained), fns[name](params))))
    rho = {name: np.stack(v, axis=1) for name, v in rho.items()}  # [N, levels]
    top_down = list(reversed(layers))
    columns = [f"+{layer}" for layer in top_down]
    report.add_table([[name] + [f"{np.nanmean(r[:, j]):.3f}" for j in range(r.shape[1])] for name, r in rho.items()],
                     ["method"] + columns,
                     title="Sanity check (Adebayo et al.): Spearman rank correlation of |map| with the trained "
                           "model's, as f's layers are randomised from the top (cumulative); near 1 = the map "
                           "ignores the weights")
    save_arrays(out, "sanity_check", layers_top_down=np.asarray(top_down),
                **{f"spearman_{k}": v for k, v in rho.items()})
    summary = {}
    for name, r in rho.items():
        summary[f"sanity check {name}: Spearman, top layer randomised"] = float(np.nanmean(r[:, 0]))
        summary[f"sanity check {name}: Spearman, all layers randomised"] = float(np.nanmean(r[:, -1]))
    return summary


DELETION_BASELINE = "image_median"
# i-ResNet counterfactuals: the class-mean move goes on until the head gives the target this
# probability (past the boundary), at most this many times the distance between the class means.
# Measured on the demo's i-ResNet (16 test images): at the boundary (p 0.5) 81 % stay valid after
# re-encoding and none changes the stain colour; at p >= 0.9 all are valid but 69 % of the blobs
# are in between the stains (the head is sure long before the colour is a stain's); p >= 0.99
# changes the colour in 50 %, p >= 0.999 in 88 % (L1 0.18, re-encoding drift 2.6 % of |z|).
IRESNET_CONFIDENCE = 0.999
IRESNET_MAX_ALPHA = 8.0


def deletion_baseline(images, kind: str = DELETION_BASELINE) -> np.ndarray:
    """What deletion puts in place of removed pixels (and insertion starts from), [N, H, W, 3].

    "image_median": each image's own per-channel median colour, i.e. its background: a deleted blob
    pixel becomes background, which removes the stain colour, the class evidence of the synthetic
    data. "grey": 0 (mid-grey), RISE's plain choice, adds evidence instead: grey is bluer than the
    pale pink background, and a demo-trained f reads an all-grey image as the purple class with
    p = 1.0, so deleting even 1/16 of the pixels at random sends every pink image to the purple
    class and every curve to 0.5 (deletion AUC 0.51-0.53 for every method and for a random map,
    measured). With the background as fill the random map scores 0.90 and the maps 0.55-0.79. A
    blurred copy measured alike (it keeps the stain colour only where the blob was large).
    """
    images = np.asarray(images, np.float32)
    if kind == "image_median":
        return np.broadcast_to(np.median(images, axis=(1, 2), keepdims=True), images.shape).copy()
    if kind == "grey":
        return np.zeros_like(images)
    raise ValueError(f"unknown deletion baseline {kind!r} (image_median or grey)")


def _deletion_insertion(classifier_fn, images, pred, maps, report, *, key: int = 0,
                        baseline: str = DELETION_BASELINE) -> dict:
    """RISE deletion / insertion AUC of each method's map and of a random map (the baseline row a method
    must beat: an attribution no better than random ranks pixels no better than chance)."""
    from ..metrics import attribution_metrics

    fill = deletion_baseline(images, baseline)
    random_map = np.asarray(jax.random.uniform(jax.random.fold_in(jax.random.key(key), 11), images.shape[:3]))
    rows = []
    for name, m in list(maps.items()) + [("random attribution", random_map)]:
        auc = {mode: float(np.mean(np.asarray(attribution_metrics.deletion_insertion(
            classifier_fn, images, m, pred, mode=mode, num_steps=16, baseline=fill).auc)))
            for mode in ("deletion", "insertion")}
        rows.append([name, auc["deletion"], auc["insertion"]])
    report.add_table(rows, ["method", "deletion AUC (lower is better)", "insertion AUC (higher is better)"],
                     title=f"Deletion / insertion (RISE), most positive pixels first, replaced by {baseline} "
                           "(the image's background colour); the random row is the chance level")
    summary = {f"{r[0]} deletion AUC": r[1] for r in rows}
    summary.update({f"{r[0]} insertion AUC": r[2] for r in rows})
    best = min(rows[:-1], key=lambda r: r[1])
    summary["best attribution deletion AUC"] = best[1]
    summary["best attribution (deletion)"] = best[0]
    summary["best attribution deletion AUC minus random"] = best[1] - rows[-1][1]
    return summary


def explain_classifier(task, state, data, methods, report, out: Path, *, key: int = 0,
                       variant: str | None = None) -> dict:
    from . import attributions as attr
    from .report import save_arrays

    classifier_fn, feats_fn = classifier_functions(task, state)
    images = jnp.asarray(data["images"])
    logits = np.asarray(jax.jit(classifier_fn)(images))
    probs = np.asarray(jax.nn.softmax(logits, -1))
    pred = logits.argmax(-1)
    captions = [f"pred {p} ({probs[i, p]:.2f})" + (f", label {data['labels'][i]}" if data["labels"] is not None
                                                   else "") for i, p in enumerate(pred)]
    report.add_image_grid("Inputs", data["images"], captions, cols=8)
    summary = {}
    if data["labels"] is not None:
        summary["accuracy on these images"] = float(np.mean(pred == data["labels"]))
    maps = {}
    is_resnet = task.config.model.name == "resnet"
    for name in methods:
        t0 = time.perf_counter()
        if name in ("sanity_check", "deletion_insertion", "iresnet_counterfactual"):
            continue  # handled below, after the maps they need
        if name not in ATTRIBUTION_METHODS:
            raise ValueError(f"unknown method {name!r} for a classifier checkpoint; known: {CLASSIFIER_METHODS}")
        if name in RESNET_ONLY and not is_resnet:
            raise ValueError("grad_cam needs a ResNet checkpoint (named stages)")
        maps[name] = np.asarray(attribution_map(name, classifier_fn, feats_fn, images, pred, key=key))
        if name == "integrated_gradients":
            ig = attr.integrated_gradients(classifier_fn, images, pred, num_steps=64)
            gap = attr.completeness_gap(classifier_fn, images, ig, pred)
            summary["integrated_gradients completeness gap (max |.|)"] = float(np.max(np.abs(np.asarray(gap))))
        save_arrays(out, name, maps=maps[name], images=data["images"], predictions=pred)
        report.add_heatmaps(data["images"], maps[name], captions, title=f"{name} (target: predicted class)",
                            cols=8, signed=(name == "integrated_gradients"))
        log.info("%s: %.1fs", name, time.perf_counter() - t0)
    if "sanity_check" in methods:
        if not maps:
            raise ValueError("sanity_check needs an attribution method in --methods")
        t0 = time.perf_counter()
        summary.update(_sanity_check(task, state, images, pred, maps, report, out, key=key))
        log.info("sanity_check: %.1fs", time.perf_counter() - t0)
    if "deletion_insertion" in methods:
        if not maps:
            raise ValueError("deletion_insertion needs an attribution method in --methods")
        summary.update(_deletion_insertion(classifier_fn, images, pred, maps, report, key=key))
    if "iresnet_counterfactual" in methods:
        summary.update(_iresnet_counterfactuals(task, state, data, report, out, variant))
    report.add_metrics(summary, title="Summary")
    return summary


def _iresnet_counterfactuals(task, state, data, report, out: Path, variant: str | None = None) -> dict:
    if task.config.model.name != "iresnet":
        raise ValueError("iresnet_counterfactual needs an i-ResNet checkpoint, got a "
                         f"{task.config.model.name!r} classifier")
    from ..metrics.counterfactual_metrics import proximity
    from . import iresnet_counterfactual as icf
    from .report import save_arrays

    model = task.model(state)
    images = jnp.asarray(data["images"])
    labels = data["labels"]
    logits = np.asarray(model(images))
    pred = logits.argmax(-1)
    target = (pred + 1) % logits.shape[-1]
    # class means in z over training images of the run (the explained images may miss a class)
    from .viscoin_report import training_images

    train_x, train_y = training_images(task.config, 256)
    means, _ = icf.class_means(model.forward, jnp.asarray(train_x), np.asarray(train_y), logits.shape[-1])
    # aim past the decision boundary: a z' on it flips back once inverted and re-encoded
    result = icf.counterfactuals(model.forward, model.head, lambda z: model.inverse(z), images, target,
                                 method="closed_form", means=means, source=pred, max_alpha=IRESNET_MAX_ALPHA,
                                 confidence=IRESNET_CONFIDENCE)
    cfs = np.asarray(result.images)
    save_arrays(out, "iresnet_counterfactual", images=data["images"], counterfactuals=cfs, target=target,
                alpha=np.asarray(result.amount), target_prob=np.asarray(result.target_prob),
                latent_drift=np.asarray(result.latent_drift))
    report.add_image_grid(f"i-ResNet counterfactuals (to the other class, aimed at p >= {IRESNET_CONFIDENCE:g})",
                          np.concatenate([data["images"], cfs]),
                          [f"input, pred {p}" for p in pred] +
                          [f"-> {t}, p {q:.2f} re-encoded" for t, q in zip(target, np.asarray(result.target_prob))],
                          cols=len(pred))
    metrics = {"i-ResNet counterfactual validity": float(np.mean(np.asarray(result.valid))),
               "i-ResNet counterfactual target confidence": IRESNET_CONFIDENCE,
               "i-ResNet counterfactuals reaching the confidence in z": float(np.mean(np.asarray(result.latent_valid))),
               "i-ResNet counterfactual target probability after re-encoding (mean)":
                   float(np.mean(np.asarray(result.target_prob))),
               "i-ResNet re-encoding drift (|z(x') - z'| / |z'|, mean)":
                   float(np.mean(np.asarray(result.latent_drift))),
               "i-ResNet inverse converged": float(np.mean(np.asarray(result.converged))),
               "i-ResNet counterfactual L1": float(np.mean(np.asarray(proximity(images, cfs)["l1"])))}
    if variant is not None:  # which generative factors the counterfactuals changed (measured on the images)
        from ..data.synthetic import measure_factors, measured_factor_roles, measurement_outcomes
        from ..metrics.counterfactual_metrics import factor_change_analysis

        causal, nuisance, tolerance = measured_factor_roles(variant)
        changes = factor_change_analysis(measure_factors, images, cfs, causal=causal, nuisance=nuisance,
                                         tolerance=tolerance,
                                         outcomes_fn=measurement_outcomes)
        metrics["i-ResNet counterfactuals changing a causal factor"] = changes.any_causal
        metrics["i-ResNet counterfactuals changing a nuisance factor"] = changes.any_nuisance
        metrics["i-ResNet counterfactuals changing only causal factors"] = changes.causal_only
        for outcome, rate in changes.outcome_rate.items():  # not counted as changes
            metrics[f"i-ResNet counterfactuals: {outcome}"] = rate
        report.add_table([[k, v] for k, v in changes.change_rate.items()], ["factor", "fraction changed"],
                         title=f"Factors changed by the i-ResNet counterfactuals (causal: {', '.join(causal)})")
    return metrics


# ----------------------------------------------------------------------------------------------
# Command line


def _variant(images: str) -> str | None:
    """The synthetic variant named by an --images spec (its factors can be measured), else None."""
    if not images.startswith("synthetic/"):
        return None
    return images[len("synthetic/"):].split(":")[0]


def _split_methods(methods) -> tuple[list, list, list]:
    from .latent_report import LATENT_METHODS
    from .viscoin_report import VISCOIN_METHODS

    known = CLASSIFIER_METHODS + VISCOIN_METHODS + LATENT_METHODS
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(known)}")
    return ([m for m in methods if m in CLASSIFIER_METHODS], [m for m in methods if m in VISCOIN_METHODS],
            [m for m in methods if m in LATENT_METHODS])


def explain(checkpoint: str, images: str, methods, out: str, *, count: int | None = None,
            generator: str | None = None, latent_settings=None, concept_settings=None) -> Path:
    """Loads `checkpoint`, runs `methods` on `images`, writes OUT/report.html and the npz arrays.

    A classifier checkpoint takes the attribution methods, the i-ResNet counterfactual and, given a
    StyleGAN2 run as `generator`, the latent methods. A VisCoIN checkpoint takes the concept methods,
    the latent methods (its own f and G) and the attribution methods (on its classifier f).
    """
    from ..training.common import restore_task_state
    from .latent_report import LatentSettings, explain_latent, models_from_generator
    from .report import Report
    from .viscoin_report import ConceptSettings, explain_viscoin, latent_models

    clf_methods, viscoin_methods, latent_methods = _split_methods(list(methods))
    out_dir = Path(out)
    task, state, config, metadata = restore_task_state(checkpoint)
    if config.trainer not in ("classifier", "viscoin"):
        raise ValueError(f"{checkpoint} holds a {config.trainer!r} run; explain takes a classifier or "
                         "a viscoin checkpoint")
    if viscoin_methods and config.trainer != "viscoin":
        raise ValueError(f"{', '.join(viscoin_methods)} need a VisCoIN checkpoint; {checkpoint} holds a "
                         f"{config.trainer!r} run")
    if latent_methods and config.trainer == "classifier" and not generator:
        raise ValueError(f"{', '.join(latent_methods)} need a generator: this classifier checkpoint has none; "
                         "pass --generator <a stylegan2 run> or explain a VisCoIN checkpoint")
    resolution = int(config.data.resolution)
    if images.startswith("dataset:"):  # dataset:<split>[:N]: the run's own data set (TFDS, folders, ...)
        from .viscoin_report import training_images

        parts = images.split(":")
        n = int(parts[2]) if len(parts) > 2 else (count or 16)
        x, y = training_images(config, min(n, count) if count else n, split=parts[1] if len(parts) > 1 else "test")
        data = {"images": x, "labels": np.asarray(y, np.int32), "factors": None}
    else:
        data = load_images(images, resolution, count)
    variant = _variant(images)
    report = Report(f"viscoin-jax explanations: {Path(checkpoint).name}")
    report.add_section("Run", f"checkpoint {checkpoint} ({config.trainer}), images {images}, "
                              f"methods {', '.join(methods)}")
    summary: dict = {}
    steps = [("attributions", clf_methods), ("VisCoIN concepts", viscoin_methods), ("latent", latent_methods)]
    steps = [(name, m) for name, m in steps if m]
    for i, (name, group) in enumerate(steps, 1):
        t0 = time.perf_counter()
        log.info("[%d/%d] %s: %s", i, len(steps), name, ", ".join(group))
        if name == "attributions":
            if config.trainer == "viscoin":  # on the frozen classifier f of the VisCoIN run
                from ..training import classifier as classifier_lib

                f_task, f_state, _ = classifier_lib.load(config.classifier_workdir)
                report.add_section("Classifier f", f"attributions of {config.classifier_workdir}")
                summary.update(explain_classifier(f_task, f_state, data, group, report, out_dir, variant=variant))
            else:
                summary.update(explain_classifier(task, state, data, group, report, out_dir, variant=variant))
        elif name == "VisCoIN concepts":
            summary.update(explain_viscoin(task, state, data, group, report, out_dir,
                                           concept_settings or ConceptSettings(), variant=variant))
        else:
            if config.trainer == "viscoin":
                models = latent_models(task, state)
            else:
                classifier_fn, _ = classifier_functions(task, state)
                models = models_from_generator(generator, classifier_fn)
            summary.update(explain_latent(models, data, group, report, out_dir, latent_settings or LatentSettings(),
                                          variant=variant))
        log.info("[%d/%d] %s done in %.1fs", i, len(steps), name, time.perf_counter() - t0)
    report.add_metrics(summary, title="All metrics")
    (out_dir / "metrics.json").parent.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=1, default=float))
    path = report.write(out_dir)
    print(f"report: {path}")
    return path


def main(args: argparse.Namespace) -> int:
    from ..cli_logging import setup_logging

    setup_logging("INFO")
    try:
        from .latent_report import LatentSettings

        latent = LatentSettings(projection_steps=args.projection_steps, direction_samples=args.direction_samples)
        explain(args.checkpoint, args.images, args.methods, args.out, count=args.count, generator=args.generator,
                latent_settings=latent)
    except (ValueError, FileNotFoundError) as e:
        print(f"viscoin-jax explain: error: {e}", file=sys.stderr)
        return 2
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("explain", help="explain a classifier (or a VisCoIN run) from its checkpoint",
                              description=__doc__, epilog=methods_help(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run's workdir (or its checkpoints/ folder)")
    p.add_argument("--images", required=True,
                   help="synthetic/<variant>:<split>[:N], dataset:<split>[:N] (the run's data set), a folder, or an .npz")
    p.add_argument("--methods", nargs="+", default=["gradient", "integrated_gradients", "grad_cam", "occlusion"],
                   help="what to run (default: %(default)s); the methods of each kind of checkpoint are "
                   "listed below")
    p.add_argument("--out", required=True, help="output folder for report.html and the npz arrays")
    p.add_argument("--count", type=int, default=None, help="use at most this many images")
    p.add_argument("--generator", default=None,
                   help="a stylegan2 run for the latent methods on a classifier checkpoint")
    p.add_argument("--projection-steps", type=int, default=300, help="W+ projection steps per image batch")
    p.add_argument("--direction-samples", type=int, default=512,
                   help="generated samples the logistic-regression direction is fitted on")
    p.set_defaults(func=main)
