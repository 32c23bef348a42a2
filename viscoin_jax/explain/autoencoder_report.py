"""The autoencoder counterfactuals in the report: f's counterfactuals through a trained autoencoder,
with the metrics the other counterfactual methods get (validity, L1, the factors changed, measured on
the pixels), against the input and against the autoencoder's own reconstruction (the decoder alone
changes an image, so the move's share is the second comparison)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..metrics.counterfactual_metrics import proximity, validity
from . import autoencoder_counterfactual as aecf
from .bundles import AutoencoderFunctions
from .factor_changes import measured_changes
from .report import save_arrays

# The code moves until f gives the target at least this probability, at most this many times the
# distance between the class means (aimed past the boundary, as for the i-ResNet). Measured on 32
# test images (autoencoder_synthetic, 600 steps; the 150-step ResNet of classifier_synthetic):
# p >= 0.9 is valid for all but leaves every blob colour in between the stains (f is sure long before
# the colour is a stain's); p >= 0.99: 41 % change the colour, 59 % in between; p >= 0.999: 88 %
# change the colour (72 % nothing else), 12 % in between, 91 % reach it within 8 distances, L1 0.10;
# p >= 0.9999 needs alpha about 4 and moves the blob too (nuisance changes 56 %).
AUTOENCODER_CONFIDENCE = 0.999
AUTOENCODER_MAX_ALPHA = 8.0
AUTOENCODER_TRAINING_IMAGES = 512  # the autoencoder run's images the class means of the codes come from


def autoencoder_counterfactuals(classifier_fn, autoencoder: AutoencoderFunctions, data, report, out: Path,
                                variant: str | None = None, collect: dict | None = None) -> dict:
    """Counterfactuals of data["images"] to the class after f's prediction; fills `report`, saves
    OUT/autoencoder_counterfactual.npz, returns the summary rows (and adds them to `collect`)."""
    images = jnp.asarray(data["images"])
    logits = np.asarray(jax.jit(classifier_fn)(images))
    target = ((logits.argmax(-1) + 1) % logits.shape[-1]).astype(np.int32)
    train_x, train_y = autoencoder.training_images(AUTOENCODER_TRAINING_IMAGES, "train")
    if train_x.shape[1:] != images.shape[1:]:
        raise ValueError(f"the autoencoder was trained on {train_x.shape[1]}x{train_x.shape[2]} images, the "
                         f"classifier explains {images.shape[1]}x{images.shape[2]}")
    means, _ = aecf.code_class_means(autoencoder.encode_fn, jnp.asarray(train_x), np.asarray(train_y), logits.shape[-1])
    result = aecf.counterfactuals(autoencoder.encode_fn, autoencoder.decode_fn, classifier_fn, images, target,
                                  method="class_means", means=means, max_alpha=AUTOENCODER_MAX_ALPHA,
                                  confidence=AUTOENCODER_CONFIDENCE)
    cfs, recon = np.asarray(result.images), np.asarray(result.reconstructions)
    valid = validity(np.asarray(jax.jit(classifier_fn)(jnp.asarray(cfs))), target=target)
    save_arrays(out, "autoencoder_counterfactual", images=data["images"], counterfactuals=cfs, reconstructions=recon,
                target=target, valid=valid.valid, alpha=np.asarray(result.amount),
                target_prob=np.asarray(result.target_prob))
    if collect is not None:
        collect["autoencoder"] = (cfs, target)
    n = len(target)
    report.add_image_grid(f"Autoencoder counterfactuals (code moved between class means until f gives the target "
                          f"p >= {AUTOENCODER_CONFIDENCE:g}): inputs, reconstructions, counterfactuals",
                          np.concatenate([data["images"], recon, cfs]),
                          [f"input, f: {p}" for p in logits.argmax(-1)] + ["reconstruction"] * n +
                          [f"-> {t}, p {q:.2f}, alpha {a:.2f}" for t, q, a in
                           zip(target, np.asarray(result.target_prob), np.asarray(result.amount))], cols=n)
    metrics = {"autoencoder counterfactual validity": valid.rate,
               "autoencoder counterfactual target confidence": AUTOENCODER_CONFIDENCE,
               "autoencoder counterfactuals reaching the confidence": float(np.mean(np.asarray(result.found))),
               "autoencoder counterfactual alpha (class-mean distances, mean)": float(np.mean(np.asarray(result.amount))),
               "autoencoder counterfactual L1": float(np.mean(proximity(images, cfs)["l1"])),
               "autoencoder counterfactual L1 to the reconstruction": float(np.mean(proximity(recon, cfs)["l1"])),
               "autoencoder reconstruction L1": float(np.mean(proximity(images, recon)["l1"]))}
    if variant is not None:
        metrics.update(measured_changes(images, cfs, variant, report, "autoencoder counterfactuals")[0])
        metrics.update(measured_changes(images, recon, variant, report, "autoencoder reconstructions")[0])
        metrics.update(measured_changes(recon, cfs, variant, report,
                                        "autoencoder counterfactuals against the reconstruction")[0])
    return metrics


__all__ = ["AUTOENCODER_CONFIDENCE", "autoencoder_counterfactuals"]
