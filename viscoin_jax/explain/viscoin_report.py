"""VisCoIN explanations for the report: concepts, their drawings, and the FF / CC metrics.

For a trained VisCoIN (frozen f and G, trained extractor Psi, head Theta, translator Omega):
- per image: g's prediction, the reconstruction x~ = G(Omega(Psi(x))), the relevance of each
  concept for the predicted class, and the top concepts drawn at lambda in {0, 1, 2, 4};
- per class: the mean relevance over training images the head assigns to that class;
- per concept: the training images that activate it most;
- faithfulness FF (median per tau) over >= 128 held-out images of the run's test split, and
  consistency CC_k (SVM trained on pairs from training images, tested on pairs from >= 128 held-out
  images of that split), not only the few explained ones; CC pairs only where the concept is active.

On the embedded synthetic data, the measured factors of each image's top concept drawn at lambda 1
vs 0 say whether removing the concept changes the causal factor or a nuisance factor.
The math lives in `explain.concepts` and `metrics.viscoin_metrics`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..data.synthetic import measure_factors
from ..metrics import viscoin_metrics
from ..models import concepts as concept_ops
from . import concepts as concepts_lib
from . import methods as registry
from .activations import add_activation_views
from .bundles import VisCoINBundle
from .factor_changes import measured_changes, only_causal_by_class
from .report import Report, class_label, save_arrays

log = logging.getLogger(__name__)

VISCOIN_METHODS = registry.names(registry.CONCEPTS)


@dataclasses.dataclass(frozen=True)
class ConceptSettings:
    top_k: int = 3  # concepts drawn per image
    lambdas: tuple[float, ...] = concepts_lib.DEFAULT_LAMBDAS
    num_training_images: int = 256  # for class relevance, top-activating images and CC's training pairs
    top_images: int = 6  # top-activating training images shown per concept
    max_images_drawn: int = 8  # images whose concepts are drawn in the report
    cc_amplification: float = 4.0
    cc_test_images: int = 128  # held-out images (the run's test split) CC is tested on
    # held-out images (the run's test split) FF's median is taken over; 0: the explained images. A median
    # over the few explained images swings with the draw (0.44 on 16 images where 128 gave 0.08)
    ff_test_images: int = 128


def _batches(images: np.ndarray, size: int) -> list[np.ndarray]:
    return [images[i:i + size] for i in range(0, len(images), size)]


def explain_viscoin(bundle: VisCoINBundle, data: dict, methods, report: Report, out: Path,
                    settings: ConceptSettings = ConceptSettings(), *, variant: str | None = None) -> dict:
    """Runs the VisCoIN `methods` on data["images"]; fills `report`, writes npz arrays, returns metrics."""
    unknown = [m for m in methods if m not in VISCOIN_METHODS]
    if unknown:
        raise ValueError(f"unknown VisCoIN methods {unknown}; known: {VISCOIN_METHODS}")
    fns = bundle.functions
    concepts_fn, head_fn = jax.jit(fns.concepts_fn), jax.jit(fns.head_fn)
    decode = jax.jit(lambda phi, phi_prime: concept_ops.decode_concepts(fns.translator_fn, fns.synthesis_fn,
                                                                         phi, phi_prime))
    images = jnp.asarray(data["images"])
    phi, phi_prime = concepts_fn(images)
    g_pred = np.asarray(head_fn(phi)).argmax(-1)
    f_pred = np.asarray(jax.jit(fns.classifier_fn)(images)).argmax(-1)
    reconstruction = np.asarray(decode(phi, phi_prime))
    summary: dict = {"g fidelity to f (these images)": float(np.mean(g_pred == f_pred)),
                     "reconstruction MSE": float(np.mean((reconstruction - np.asarray(images)) ** 2))}
    if data.get("labels") is not None:
        summary["g accuracy (these images)"] = float(np.mean(g_pred == data["labels"]))
    n = len(g_pred)
    names = data.get("class_names")
    report.add_frame_rows("VisCoIN reconstructions x~ = G(Omega(Psi(x)))", [
        {"label": f"image {i}", "frames": (np.stack([np.asarray(images)[i], reconstruction[i]]),
                                           [f"input; g: {class_label(names, g_pred[i])}, f: {class_label(names, f_pred[i])}",
                                            "reconstruction"])} for i in range(n)])
    need_train = "concepts" in methods or "consistency" in methods
    if need_train:
        train_x, _ = bundle.training_images(settings.num_training_images, "train")
    # held-out images (the first of the run's test split), read once for FF and CC
    held_out = max([settings.ff_test_images if "faithfulness" in methods else 0,
                    settings.cc_test_images if "consistency" in methods else 0])
    if held_out > 0:
        held_out_x, _ = bundle.training_images(held_out, "test")

    if "concepts" in methods:
        t0 = time.perf_counter()
        k = min(settings.top_k, int(phi.shape[-1]))
        relevance = np.asarray(concept_ops.concept_relevance(phi, fns.head_weight, g_pred))
        top_r, top_ids = (np.asarray(a) for a in concepts_lib.top_concepts(relevance, k))
        shown = min(n, settings.max_images_drawn)
        drawings = np.asarray(concepts_lib.concept_visualisation(
            fns.translator_fn, fns.synthesis_fn, phi, phi_prime, top_ids, lambdas=settings.lambdas))
        # f's probability of g's class for each drawing: does scaling the concept keep or lose the class?
        flat = drawings[:shown].reshape((-1,) + drawings.shape[-3:])
        drawn_p = np.asarray(jax.nn.softmax(jax.jit(fns.classifier_fn)(jnp.asarray(flat)), -1)).reshape(
            drawings[:shown].shape[:3] + (-1,))
        for i in range(shown):
            cls = class_label(names, g_pred[i])
            report.add_frame_rows(
                f"Image {i} (g: {cls}): its top {k} concepts drawn at lambda {', '.join(f'{v:g}' for v in settings.lambdas)}",
                [{"label": f"concept {top_ids[i, j]}, relevance {top_r[i, j]:+.2f}",
                  "lead": (np.stack([np.asarray(images)[i], reconstruction[i]]), ["input", "reconstruction"]),
                  "frames": (drawings[i, j], [f"lambda {lam:g}: f p({cls}) {drawn_p[i, j, li, g_pred[i]]:.2f}"
                                              for li, lam in enumerate(settings.lambdas)])} for j in range(k)],
                slider="lambda",
                text="lambda scales the concept's activation phi_k (0 removes it, 1 is the image's own value); "
                     "under each drawing, f's probability of g's class.")
            if i == 0:
                report.add_key_image("concepts", np.concatenate(
                    [np.concatenate([np.asarray(images)[0], reconstruction[0], *drawings[0, j]], axis=1)
                     for j in range(k)], axis=0))
        # class-level relevance and top-activating images, over training images
        train_phi = np.concatenate([np.asarray(concepts_fn(b)[0]) for b in _batches(train_x, 64)])
        train_pred = np.concatenate([np.asarray(head_fn(p)) for p in _batches(train_phi, 256)]).argmax(-1)
        train_rel = concept_ops.concept_relevance(train_phi, fns.head_weight, train_pred)
        class_rel, counts = (np.asarray(a) for a in concepts_lib.class_relevance(
            train_rel, train_pred, int(fns.head_weight.shape[1])))
        report.add_table([[class_label(names, c), int(counts[c])] + [f"{v:+.2f}" for v in class_rel[c]]
                          for c in range(len(counts))],
                         ["class (g)", "images"] + [f"c{j}" for j in range(class_rel.shape[1])],
                         title=f"Class-level concept relevance (mean over {len(train_x)} training images)")
        top = concepts_lib.top_activating_images(fns.concepts_fn, _batches(train_x, 64), settings.top_images)
        top_ids_train, top_scores = np.asarray(top.ids), np.asarray(top.scores)
        rows = []
        for c in range(top_ids_train.shape[0]):
            ids = top_ids_train[c][top_ids_train[c] >= 0]
            if len(ids):
                rows.append({"label": f"concept {c}", "frames": (
                    train_x[ids], [f"#{i} act {s:.2f}" for i, s in zip(ids, top_scores[c])])})
        if rows:
            report.add_frame_rows("Each concept's most activating training images", rows)
        arrays = dict(phi=np.asarray(phi), phi_prime=np.asarray(phi_prime), relevance=relevance,
                      top_concepts=top_ids, top_relevance=top_r, drawings=drawings,
                      lambdas=np.asarray(settings.lambdas), g_predictions=g_pred, f_predictions=f_pred,
                      reconstructions=reconstruction, class_relevance=class_rel, class_counts=counts,
                      top_activating_ids=top_ids_train, top_activating_scores=top_scores)
        lambdas = list(settings.lambdas)
        arrays["images"] = np.asarray(images)
        if 0.0 in lambdas:  # f's class of each image once its top concept is removed (the comparison's validity)
            arrays["top_concept_removed_f_predictions"] = np.asarray(
                jax.jit(fns.classifier_fn)(jnp.asarray(drawings[:, 0, lambdas.index(0.0)]))).argmax(-1)
        if variant is not None and 0.0 in lambdas and 1.0 in lambdas:
            summary["reconstructions with a measurable blob"] = float(np.mean(measure_factors(reconstruction)["found"]))
            rows, changes = measured_changes(
                drawings[:, 0, lambdas.index(1.0)], drawings[:, 0, lambdas.index(0.0)], variant, report,
                "top concepts", causal_key="top concepts whose removal changes a causal factor",
                nuisance_key="top concepts whose removal changes a nuisance factor",
                outcome_prefix="top concepts removed: ")
            summary.update(rows)
            arrays["top_concept_changed_causal"] = changes.causal_changed
            summary.update(only_causal_by_class(changes, g_pred, names, "top concepts changing only causal factors"))
        save_arrays(out, "concepts", **arrays)
        log.info("concepts: %.1fs", time.perf_counter() - t0)

    if "concept_activations" in methods:
        train_act, _ = bundle.training_images(settings.num_training_images, "train")
        summary.update(add_activation_views(report, out, jax.jit(lambda x: {"phi": fns.concepts_fn(x)[0]}),
                                            np.asarray(images), train_act, subject="concepts"))

    if "faithfulness" in methods:
        t0 = time.perf_counter()
        if settings.ff_test_images > 0:
            ff_x = held_out_x[:settings.ff_test_images]
            ff_on = f"{len(ff_x)} held-out images (the run's test split)"
        else:
            ff_x, ff_on = np.asarray(images), f"the {len(images)} explained images"
        ff = viscoin_metrics.faithfulness(_batches(np.asarray(ff_x), 32), concepts_fn=fns.concepts_fn,
                                          head_fn=fns.head_fn, head_weight=fns.head_weight,
                                          translator_fn=fns.translator_fn, synthesis_fn=fns.synthesis_fn)
        report.add_table([[f"{t:g}", m] for t, m in zip(ff.taus, ff.median)], ["tau", "median FF"],
                         title="Faithfulness FF (g's class probability lost when concepts with r >= tau are "
                               f"removed), median over {ff_on}")
        summary.update({f"FF median (tau {t:g})": float(m) for t, m in zip(ff.taus, ff.median)})
        summary["FF images"] = int(ff.per_image.shape[1])
        save_arrays(out, "faithfulness", taus=ff.taus, per_image=ff.per_image, median=ff.median)
        log.info("faithfulness: %.1fs", time.perf_counter() - t0)

    if "consistency" in methods:
        t0 = time.perf_counter()
        test_x = held_out_x[:settings.cc_test_images]
        cc = viscoin_metrics.consistency(_batches(train_x, 64), _batches(test_x, 64),
                                         concepts_fn=fns.concepts_fn, translator_fn=fns.translator_fn,
                                         synthesis_fn=fns.synthesis_fn, feature_fn=fns.features_fn,
                                         amplification=settings.cc_amplification)
        report.add_table([[int(c), a, t, int(p)] for c, a, t, p in zip(cc.concept_ids, cc.accuracy,
                                                                        cc.train_accuracy, cc.test_pairs)],
                         ["concept", "test accuracy", "train accuracy", "test pairs (concept active)"],
                         title=f"Consistency CC_k: linear SVM on f's stage-2 features, x+ (phi_k x "
                               f"{settings.cc_amplification:g}) vs x- (phi_k = 0), on {len(test_x)} held-out "
                               "images, pairs only where phi_k > 0")
        summary["CC mean"], summary["CC std"] = cc.mean, cc.std
        summary["CC held-out images"] = len(test_x)
        save_arrays(out, "consistency", concept_ids=cc.concept_ids, accuracy=cc.accuracy,
                    train_accuracy=cc.train_accuracy, test_pairs=cc.test_pairs)
        log.info("consistency: %.1fs", time.perf_counter() - t0)
    return summary


__all__ = ["VISCOIN_METHODS", "ConceptSettings", "explain_viscoin"]
