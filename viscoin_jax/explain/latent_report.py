"""Latent-space explanations for the report: projection, decision directions, interpolation.

Works with any frozen StyleGAN2 and classifier f: the ones inside a VisCoIN run (the translator then
warm-starts the projection), or a classifier checkpoint plus a StyleGAN2 run (`explain --generator`).
For each image: project it into W+, find the direction that moves f toward a target class (the
logistic regression of f's decisions on sampled latents, Schutte et al., and the gradient of the
target logit in W+), decode a series along it with f's probabilities, take the first image of the
series that f assigns to the target with p >= 0.9 as the counterfactual (else the first it assigns
to the target at all), then interpolate between the projection
and the counterfactual with integrated gradients of f along the latent path (medXGAN style).

The math lives in `projection`, `latent_direction` and `interpolation`; this module chooses
settings, runs them on a batch, measures the counterfactuals and fills the report.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..data.synthetic import colour_in_between, measure_factors
from ..metrics import counterfactual_metrics as cfm
from ..phases import announce
from . import interpolation, latent_direction, projection
from . import methods as registry
from .bundles import LatentModels
from .factor_changes import measured_changes
from .report import Report, class_label, save_arrays

log = logging.getLogger(__name__)

LATENT_METHODS = registry.names(registry.LATENT)


@dataclasses.dataclass(frozen=True)
class LatentSettings:
    projection_steps: int = 300
    direction_samples: int = 512  # generated samples the logistic regression is fitted on
    num_series: int = 13  # images along each direction (0.25 w_std apart)
    max_shift: float = 3.0  # the series ends at max_shift * w_std along the unit direction
    # The counterfactual: the first image of a series with p(target) >= this. f is sure of in-between
    # colours too: on the demo, 0.99 rather than 0.9 took the colour past the in-between band in more
    # series and never fewer (docs/performance.md, "What the demo's explanations are limited by").
    confidence: float = 0.99
    interpolation_steps: int = 7
    ig_steps: int = 33
    coverage_samples: int = 256  # random G samples whose classes (f) and measured factors are reported

    def __post_init__(self):
        if not 0.0 < float(self.confidence) < 1.0:
            raise ValueError(f"the latent counterfactuals' confidence must lie in (0, 1), got {self.confidence}")


def generated_samples(models: LatentModels, key: jax.Array, num_samples: int, batch_size: int = 64):
    """(z [M, z_dim], images [M, R, R, 3], f's logits [M, C]) of G from z ~ N(0, I): what G draws, seen by f."""
    draw = jax.jit(lambda z: models.synthesis_fn(models.mapping_fn(z)))
    zs, images, logits = [], [], []
    for b, start in enumerate(range(0, num_samples, batch_size)):
        z = jax.random.normal(jax.random.fold_in(key, b), (min(batch_size, num_samples - start), models.z_dim))
        x = draw(z)
        zs.append(np.asarray(z))
        images.append(np.asarray(x))
        logits.append(np.asarray(models.classifier_fn(x)))
    return np.concatenate(zs), np.concatenate(images), np.concatenate(logits)


def counterfactual_index(probs, target, confidence: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per series (probs [N, T, C]): the counterfactual's index and whether f's argmax reaches `target` [N].

    The index is the first image whose target probability is >= `confidence` (past the decision
    boundary, where the first flipped image sits on it and its colour is often in between); where the
    series never gets there (or confidence is None), the first image whose argmax is the target; else
    the last image.
    """
    probs, target = np.asarray(probs), np.asarray(target)
    hits = probs.argmax(-1) == target[:, None]
    found = hits.any(axis=1)
    index = np.where(found, hits.argmax(axis=1), probs.shape[1] - 1)
    if confidence is not None:
        p_target = np.take_along_axis(probs, target[:, None, None], axis=-1)[..., 0]  # [N, T]
        sure = hits & (p_target >= confidence)
        index = np.where(sure.any(axis=1), sure.argmax(axis=1), index)
    return index, found


def explain_latent(models: LatentModels, data: dict, methods, report: Report, out: Path,
                   settings: LatentSettings = LatentSettings(), *, key: int = 0,
                   variant: str | None = None) -> dict:
    """Runs the latent `methods` on data["images"]; fills `report`, writes npz arrays, returns metrics.

    `variant` (a synthetic data set) adds which measured factors the counterfactuals changed.
    """
    unknown = [m for m in methods if m not in LATENT_METHODS]
    if unknown:
        raise ValueError(f"unknown latent methods {unknown}; known: {LATENT_METHODS}")
    images = jnp.asarray(data["images"])
    names = data.get("class_names")
    if images.shape[1] != models.resolution:
        raise ValueError(f"the generator makes {models.resolution} px images, the images are {images.shape[1]} px")
    rng = jax.random.key(key)
    k_stats, k_proj, k_dir = jax.random.split(rng, 3)
    summary: dict = {}

    # --- project into W+ ---------------------------------------------------------------------------
    with announce(log, f"projecting {len(images)} images into W+ ({settings.projection_steps} steps)"):
        w_avg, w_std = projection.estimate_w_stats(models.mapping_fn, k_stats, z_dim=models.z_dim,
                                                   num_samples=2048, batch_size=256)
        init = models.init_ws_fn(images) if models.init_ws_fn is not None else None
        proj = projection.project(models.synthesis_fn, images, init_ws=init, w_avg=w_avg, num_ws=models.num_ws,
                                  w_std=float(w_std), perceptual_fn=models.perceptual_fn, key=k_proj,
                                  config=projection.ProjectionConfig(num_steps=settings.projection_steps))
        ws = proj.ws
        logits_in = np.asarray(models.classifier_fn(images))
        logits_proj = np.asarray(models.classifier_fn(proj.images))
        pred = logits_in.argmax(-1)
        # the target: f's second most likely class for the input (the other class of a binary task)
        target = np.argsort(-logits_in, axis=-1)[:, 1].astype(np.int32)
        summary["projection MSE (mean)"] = float(np.mean(np.asarray(proj.final_loss)))
        summary["f agrees on projection and input"] = float(np.mean(logits_proj.argmax(-1) == pred))
        report.add_image_grid(
            f"Projections into W+ ({settings.projection_steps} steps, perceptual: {models.perceptual_name}"
            f"{', warm start: VisCoIN translator' if init is not None else ', start: w_avg'})",
            np.concatenate([np.asarray(images), np.asarray(proj.images)]),
            [f"input, f: {class_label(names, p)}" for p in pred] +
            [f"projection, f: {class_label(names, p)}" for p in logits_proj.argmax(-1)],
            cols=len(pred))

    # --- what G draws: a G that never draws a class cannot show a counterfactual into it ------------
    coverage = {}
    if settings.coverage_samples > 0:
        sample_z, samples, sample_logits = generated_samples(models, jax.random.fold_in(rng, 1), settings.coverage_samples)
        sample_class = sample_logits.argmax(-1)
        shares = [float(np.mean(sample_class == c)) for c in range(sample_logits.shape[-1])]
        for c, share in enumerate(shares):
            summary[f"G samples f assigns to class {c}"] = share
        summary["G samples f assigns to the rarer class"] = min(shares)
        captions = [f"f: {class_label(names, c)}" for c in sample_class[:16]]
        if variant is not None:
            measured = measure_factors(samples)
            between = colour_in_between(measured["colour_score"])
            summary["G samples with a measurable blob"] = float(np.mean(measured["found"]))
            # of the samples with a measurable blob (NaN where G draws none)
            summary["G samples whose blob colour is in between the stains"] = (
                float(np.mean(between[measured["found"]])) if measured["found"].any() else float("nan"))
            captions = [f"{cap}{', colour in between' if b else ''}" for cap, b in zip(captions, between)]
        report.add_image_grid(f"What G draws: random samples (of {len(samples)}) and f's class", samples[:16],
                              captions, cols=8)
        coverage = dict(sample_z=sample_z, sample_images=samples, sample_logits=sample_logits)

    # --- directions toward each target class ------------------------------------------------------
    t0 = time.perf_counter()
    ts = np.linspace(0.0, settings.max_shift * float(w_std), settings.num_series).astype(np.float32)
    directions, notes = {}, []
    for c in np.unique(target):
        try:
            fitted = latent_direction.logistic_regression_direction(
                models.mapping_fn, models.synthesis_fn, models.classifier_fn, jax.random.fold_in(k_dir, int(c)),
                int(c), num_samples=settings.direction_samples, z_dim=models.z_dim, batch_size=64)
            directions[int(c)] = np.asarray(fitted.direction)
            summary[f"direction to class {c}: logistic-regression accuracy"] = float(fitted.accuracy)
        except ValueError as e:  # f gives every sample the same class: no regression possible
            notes.append(f"class {c}: {e}")
    grad_dirs = np.asarray(latent_direction.gradient_direction(
        models.synthesis_fn, models.classifier_fn, ws, target, per_sample=True))
    series, probs, grad_series, grad_probs, used = [], [], [], [], []
    for i in range(len(pred)):
        g_imgs, g_probs = latent_direction.decode_along_direction(
            models.synthesis_fn, models.classifier_fn, ws[i], grad_dirs[i], ts)
        grad_series.append(np.asarray(g_imgs))
        grad_probs.append(np.asarray(g_probs))
        if int(target[i]) in directions:
            imgs, p = latent_direction.decode_along_direction(
                models.synthesis_fn, models.classifier_fn, ws[i], directions[int(target[i])], ts)
            series.append(np.asarray(imgs))
            probs.append(np.asarray(p))
            used.append("logistic regression")
        else:
            series.append(grad_series[-1])
            probs.append(grad_probs[-1])
            used.append("gradient")
    series, probs = np.stack(series), np.stack(probs)
    grad_series, grad_probs = np.stack(grad_series), np.stack(grad_probs)
    cf_at, flipped = counterfactual_index(probs, target, settings.confidence)
    p_cf = probs[np.arange(len(target)), cf_at, target]
    rows = np.arange(len(pred))
    counterfactuals = series[rows, cf_at]
    cf_ws = np.asarray(ws) + ts[cf_at][:, None, None] * np.stack(
        [np.broadcast_to(directions.get(int(t), grad_dirs[i]), ws.shape[1:]) for i, t in enumerate(target)])
    validity = cfm.validity(np.asarray(models.classifier_fn(jnp.asarray(counterfactuals))), target=target)
    save_arrays(out, "latent_direction", images=np.asarray(images), projected_ws=np.asarray(ws),
                projections=np.asarray(proj.images), target=target, shifts=ts, series=series, probs=probs,
                gradient_series=grad_series, gradient_probs=grad_probs, counterfactuals=counterfactuals,
                counterfactual_ws=cf_ws, flipped=flipped, valid=validity.valid,
                **coverage, **{f"direction_to_{c}": d for c, d in directions.items()})
    for name, ser, pr in (("logistic-regression direction", series, probs), ("gradient direction", grad_series,
                                                                             grad_probs)):
        if name.startswith("logistic") and not directions:
            continue
        report.add_frame_rows(
            f"Counterfactual series along the {name} (t: shift in units of w_std {float(w_std):.2f})",
            [{"label": f"image {i}: f says {class_label(names, pred[i])}, toward {class_label(names, target[i])}",
              "frames": (ser[i], [f"t={t / float(w_std):.2f}: p({class_label(names, target[i])}) "
                                  f"{pr[i, j, target[i]]:.2f}" for j, t in enumerate(ts)])}
             for i in range(min(len(pred), 8))], slider="t")
    if notes:
        report.add_section("Directions not fitted", "; ".join(notes) + " (the gradient direction is used)")
    report.add_counterfactuals(
        f"Latent counterfactuals (first t reaching p >= {settings.confidence:g}), beside the projection they start from",
        proj.images, counterfactuals,
        [f"-> {class_label(names, t)}: p {q:.2f}" for t, q in zip(target, p_cf)],
        row_labels=[f"image {i}: f says {class_label(names, p)}" for i, p in enumerate(pred)])
    proximity = cfm.proximity(np.asarray(proj.images), counterfactuals)
    summary["latent counterfactual validity"] = float(np.mean(validity.valid))
    summary["latent counterfactual L1 to the projection"] = float(np.mean(proximity["l1"]))
    summary["latent counterfactual shift (w_std units, mean)"] = float(np.mean(ts[cf_at]) / float(w_std))
    summary["latent counterfactual target confidence"] = settings.confidence
    summary["latent counterfactuals reaching the confidence"] = float(np.mean(p_cf >= settings.confidence))
    if variant is not None:
        summary["projections with a measurable blob"] = float(np.mean(measure_factors(np.asarray(proj.images))["found"]))
        summary.update(measured_changes(proj.images, counterfactuals, variant, report, "latent counterfactuals")[0])
    log.info("latent directions: %.1fs", time.perf_counter() - t0)

    # --- interpolation between the projection and the counterfactual --------------------------------
    if "latent_interpolation" in methods:
        t0 = time.perf_counter()
        paths, maps, path_probs, layer_attr, gaps = [], [], [], [], []
        for i in range(len(pred)):
            inter = interpolation.latent_interpolation(models.synthesis_fn, ws[i], cf_ws[i],
                                                       num_steps=settings.interpolation_steps,
                                                       classifier_fn=models.classifier_fn)
            ig = interpolation.latent_integrated_gradients(models.synthesis_fn, models.classifier_fn, ws[i],
                                                           cf_ws[i], int(target[i]), num_steps=settings.ig_steps)
            paths.append(np.asarray(inter.images))
            maps.append(np.asarray(inter.difference_maps))
            path_probs.append(np.asarray(inter.probs))
            layer_attr.append(np.asarray(ig.layer_attributions))  # per W+ vector
            gaps.append(float(ig.completeness_gap))
        paths, maps, path_probs, layer_attr = map(np.stack, (paths, maps, path_probs, layer_attr))
        save_arrays(out, "latent_interpolation", paths=paths, difference_maps=maps, probs=path_probs,
                    layer_attributions=layer_attr, completeness_gap=np.asarray(gaps), target=target)
        shown = min(len(pred), 8)
        alphas = np.linspace(0, 1, settings.interpolation_steps)
        caps = [[f"a={a:.2f}: p({class_label(names, target[i])}) {path_probs[i, j, target[i]]:.2f}"
                 for j, a in enumerate(alphas)] for i in range(shown)]
        report.add_frame_rows("Interpolation from each projection to its counterfactual (a: 0 to 1)", [
            {"label": f"image {i}: toward {class_label(names, target[i])}", "frames": (paths[i], caps[i])}
            for i in range(shown)], slider="a")
        report.add_heatmaps(np.concatenate([paths[i][1:] for i in range(shown)]),
                            np.concatenate([maps[i][1:] for i in range(shown)]),
                            [f"image {i}, {c}" for i in range(shown) for c in caps[i][1:]],
                            title="Where the path changes each image (difference to the start)",
                            label="difference to a=0")
        report.add_table([[i] + [f"{v:+.3f}" for v in layer_attr[i]] for i in range(len(pred))],
                         ["image"] + [f"w{j}" for j in range(layer_attr.shape[1])],
                         title="Integrated gradients of f's target logit per W+ vector (sum = logit change)")
        summary["latent IG completeness gap (max |.|)"] = float(np.max(np.abs(gaps)))
        log.info("latent interpolation: %.1fs", time.perf_counter() - t0)
    return summary


__all__ = ["LATENT_METHODS", "LatentSettings", "generated_samples",
           "counterfactual_index", "explain_latent"]
