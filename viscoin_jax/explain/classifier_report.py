"""Explanations of a trained classifier f for the report: attribution maps, the model-randomisation
sanity check, deletion / insertion against a random map, and i-ResNet counterfactuals (with the
generative factors they change, on the synthetic data). The methods themselves are plain functions
in `attributions`, `iresnet_counterfactual` and `viscoin_jax.metrics`; this module runs them with the
report's settings and fills the report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..metrics import attribution_metrics
from ..metrics.attribution_metrics import cascading_randomisations, param_groups, spearman_correlation
from ..metrics.counterfactual_metrics import proximity
from ..models.registry import classifier_spec, layer_order
from . import attributions as attr
from . import iresnet_counterfactual as icf
from . import methods as registry
from .activations import add_activation_views
from .autoencoder_report import autoencoder_counterfactuals
from .bundles import AutoencoderFunctions, ClassifierBundle
from .decision_boundary import add_decision_boundary_view
from .factor_changes import measured_changes
from .report import class_label, save_arrays

log = logging.getLogger(__name__)

ATTRIBUTION_METHODS = registry.names(registry.CLASSIFIER, attribution=True)
CLASSIFIER_METHODS = registry.names(registry.CLASSIFIER)
SIGNED_METHODS = ("integrated_gradients",)  # maps with a sign (shown on a diverging colormap)


def attribution_map(name: str, classifier_fn, feats_fn, images, targets, *, key: int = 0,
                    settings=None) -> jax.Array:
    """The [N, H, W] map of one attribution method: the registry's function with its settings
    (`settings`: the method's, default the registry's defaults)."""
    if name not in ATTRIBUTION_METHODS:
        raise ValueError(f"unknown attribution method {name!r}; known: {ATTRIBUTION_METHODS}")
    options = dict(registry.METHODS[name].settings if settings is None else settings)
    return jnp.asarray(registry.map_function(name)(classifier_fn, feats_fn, images, targets, key=key, **options))


def cascade_layers(model_name: str, params) -> list[str]:
    """f's layers as path prefixes in network order (input to output), at the granularity of stages,
    for the cascading randomisation of the sanity check."""
    return layer_order(model_name, param_groups(params))


def _sanity_check(bundle: ClassifierBundle, images, pred, maps, report, out: Path, *, settings: dict,
                  key: int = 0) -> dict:
    """Adebayo et al.'s model-randomisation check: re-initialise f's layers from the top down (cascading,
    each leaf drawn from N(mean, std) of its trained values) and compare each method's map with the
    trained model's map by the Spearman rank correlation of |map|, per image (the first
    `images` of the sanity_check settings: a compile per method, a run per layer),
    averaged. A method whose maps survive the destruction of the weights (rho near 1) does not
    explain the model."""
    layers = cascade_layers(bundle.architecture, bundle.params)
    rng = jax.random.fold_in(jax.random.key(key), 7)
    count = int(settings["sanity_check"]["images"])
    images, targets = images[:count], np.asarray(pred)[:count]
    maps = {name: m[:count] for name, m in maps.items()}

    def one(name):  # the method's map as a function of f's params: one compile per method, not per level
        return jax.jit(lambda p: jnp.abs(attribution_map(name, *bundle.functions_of(p),
                                                         images, targets, key=key, settings=settings[name])))

    fns = {name: one(name) for name in maps}
    rho = {name: [] for name in maps}
    for params in cascading_randomisations(bundle.params, rng, layers):
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


ACTIVATION_TRAINING_IMAGES = 256  # the images searched for each channel's top activations
BOUNDARY_TRAINING_IMAGES = 512  # the images the decision-boundary plane is fitted on
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
    fill = deletion_baseline(images, baseline)
    random_map = np.asarray(jax.random.uniform(jax.random.fold_in(jax.random.key(key), 11), images.shape[:3]))
    rows, curves, fractions = [], {"deletion": {}, "insertion": {}}, None
    for name, m in list(maps.items()) + [("random attribution", random_map)]:
        auc = {}
        for mode in ("deletion", "insertion"):
            result = attribution_metrics.deletion_insertion(classifier_fn, images, m, pred, mode=mode, num_steps=16,
                                                            baseline=fill)
            auc[mode] = float(np.mean(np.asarray(result.auc)))
            curves[mode][name] = np.mean(np.asarray(result.scores), axis=0)
            fractions = np.asarray(result.fractions)
        rows.append([name, auc["deletion"], auc["insertion"]])
    report.add_curves("Deletion / insertion curves (mean over the images)", fractions,
                      {"deletion: lower is better": curves["deletion"],
                       "insertion: higher is better": curves["insertion"]},
                      ylabel="p of the predicted class", baseline="random attribution",
                      text="Deletion removes the most important pixels first (a good map makes p fall fast); "
                           "insertion adds them first (p should rise fast). The dashed line is a random map: "
                           "the chance level a method must beat.")
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


def explain_classifier(bundle: ClassifierBundle, data, methods, report, out: Path, *, key: int = 0,
                       variant: str | None = None, autoencoder: AutoencoderFunctions | None = None,
                       counterfactuals: dict | None = None, settings=None) -> dict:
    """Runs the classifier `methods` on data["images"]; fills `report`, writes npz arrays, returns metrics.
    `autoencoder` (a trained one's functions) is needed by autoencoder_counterfactual; `counterfactuals`
    ({method: (images, targets)} of other methods on the same images, e.g. the latent direction's)
    are drawn on the decision boundary beside the ones made here. `settings`: every method's settings
    (`methods.resolve_settings`), default the registry's."""
    settings = settings or registry.resolve_settings()
    classifier_fn, feats_fn = bundle.functions_of(bundle.params)
    images = jnp.asarray(data["images"])
    logits = np.asarray(jax.jit(classifier_fn)(images))
    probs = np.asarray(jax.nn.softmax(logits, -1))
    pred = logits.argmax(-1)
    names = data.get("class_names")
    captions = [f"f: {class_label(names, p)} (p {probs[i, p]:.2f})" + (
        f", label: {class_label(names, data['labels'][i])}" if data["labels"] is not None else "")
        for i, p in enumerate(pred)]
    report.add_image_grid("Inputs, f's prediction and the label", data["images"], captions, cols=8)
    summary = {}
    if data["labels"] is not None:
        summary["accuracy on these images"] = float(np.mean(pred == data["labels"]))
    maps = {}
    named_stages = classifier_spec(bundle.architecture).feature_maps  # what Grad-CAM can read
    for name in methods:
        t0 = time.perf_counter()
        if name in CLASSIFIER_METHODS and name not in ATTRIBUTION_METHODS:
            continue  # handled below, after the maps they need
        if name not in ATTRIBUTION_METHODS:
            raise ValueError(f"unknown method {name!r} for a classifier checkpoint; known: {CLASSIFIER_METHODS}")
        if name == "grad_cam" and settings["grad_cam"]["layer"] not in named_stages:
            raise ValueError(f"grad_cam reads the feature map {settings['grad_cam']['layer']!r}; this "
                             f"{bundle.architecture} names {', '.join(named_stages) or 'none'}")
        maps[name] = np.asarray(attribution_map(name, classifier_fn, feats_fn, images, pred, key=key,
                                                settings=settings[name]))
        if name == "integrated_gradients":
            ig = attr.integrated_gradients(classifier_fn, images, pred, **settings[name])
            gap = attr.completeness_gap(classifier_fn, images, ig, pred)
            summary["integrated_gradients completeness gap (max |.|)"] = float(np.max(np.abs(np.asarray(gap))))
        save_arrays(out, name, maps=maps[name], images=data["images"], predictions=pred)
        log.info("%s: %.1fs", name, time.perf_counter() - t0)
    if maps:
        report.add_attribution_maps(data["images"], maps, captions,
                                    title="Attribution maps for f's predicted class (" + ", ".join(maps) + ")",
                                    signed=[n for n in maps if n in SIGNED_METHODS])
    if "sanity_check" in methods:
        if not maps:
            raise ValueError("sanity_check needs an attribution method in --methods")
        t0 = time.perf_counter()
        summary.update(_sanity_check(bundle, images, pred, maps, report, out, key=key, settings=settings))
        log.info("sanity_check: %.1fs", time.perf_counter() - t0)
    if "deletion_insertion" in methods:
        if not maps:
            raise ValueError("deletion_insertion needs an attribution method in --methods")
        summary.update(_deletion_insertion(classifier_fn, images, pred, maps, report, key=key))
    counterfactual_sets: dict = dict(counterfactuals or {})  # method -> (images, targets), for the boundary view
    if "iresnet_counterfactual" in methods:
        summary.update(_iresnet_counterfactuals(bundle, data, report, out, variant, collect=counterfactual_sets))
    if "autoencoder_counterfactual" in methods:
        if autoencoder is None:
            raise ValueError("autoencoder_counterfactual needs an autoencoder run (--autoencoder)")
        summary.update(autoencoder_counterfactuals(classifier_fn, autoencoder, data, report, out, variant,
                                                   collect=counterfactual_sets))
    if "activations" in methods:
        train_x, _ = bundle.training_images(ACTIVATION_TRAINING_IMAGES, "train")
        summary.update(add_activation_views(report, out, jax.jit(lambda x: feats_fn(x)[0]), data["images"], train_x,
                                            subject="f"))
    if "decision_boundary" in methods:
        if not bundle.boundary_views:
            raise ValueError(f"decision_boundary: the {bundle.architecture!r} classifier names no penultimate features")
        train_x, train_y = bundle.training_images(BOUNDARY_TRAINING_IMAGES, "train")
        labels = data["labels"] if data["labels"] is not None else pred
        for view in bundle.boundary_views:
            summary.update(add_decision_boundary_view(report, out, view, train_x, train_y, data["images"], labels,
                                                      counterfactual_sets, subject="f",
                                                      classes=registry.class_pair(settings["decision_boundary"]["classes"])))
    report.add_metrics(summary, title="Classifier metrics")
    return summary


def _iresnet_counterfactuals(bundle: ClassifierBundle, data, report, out: Path, variant: str | None = None,
                             collect: dict | None = None) -> dict:
    if bundle.invertible is None:
        raise ValueError("iresnet_counterfactual needs an i-ResNet checkpoint, got a "
                         f"{bundle.architecture!r} classifier")
    model = bundle.invertible
    images = jnp.asarray(data["images"])
    logits = np.asarray(bundle.classifier_fn(images))
    pred = logits.argmax(-1)
    target = (pred + 1) % logits.shape[-1]
    # class means in z over training images of the run (the explained images may miss a class)
    train_x, train_y = bundle.training_images(256, "train")
    means, _ = icf.class_means(model.forward, jnp.asarray(train_x), np.asarray(train_y), logits.shape[-1])
    # aim past the decision boundary: a z' on it flips back once inverted and re-encoded
    result = icf.counterfactuals(model.forward, model.head, model.inverse, images, target,
                                 method="closed_form", means=means, source=pred, max_alpha=IRESNET_MAX_ALPHA,
                                 confidence=IRESNET_CONFIDENCE)
    cfs = np.asarray(result.images)
    if collect is not None:
        collect["i-ResNet"] = (cfs, target)
    save_arrays(out, "iresnet_counterfactual", images=data["images"], counterfactuals=cfs, target=target,
                valid=np.asarray(result.valid),
                alpha=np.asarray(result.amount), target_prob=np.asarray(result.target_prob),
                latent_drift=np.asarray(result.latent_drift))
    names = data.get("class_names")
    report.add_counterfactuals(
        f"i-ResNet counterfactuals (to the next class, aimed at p >= {IRESNET_CONFIDENCE:g})", data["images"], cfs,
        [f"-> {class_label(names, t)}: p {q:.2f}" for t, q in zip(target, np.asarray(result.target_prob))],
        row_labels=[f"image {i}: f says {class_label(names, p)}" for i, p in enumerate(pred)])
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
        metrics.update(measured_changes(images, cfs, variant, report, "i-ResNet counterfactuals")[0])
    return metrics


__all__ = ["ATTRIBUTION_METHODS", "CLASSIFIER_METHODS", "attribution_map", "cascade_layers", "deletion_baseline",
           "explain_classifier"]
