"""Explanations of one image at a time, on demand, for `viscoin-jax serve`: f's prediction, its
attribution maps, VisCoIN's concepts with their relevance and drawings, and an i-ResNet
counterfactual series. Every function is compiled once for a batch of one and run at start-up
(`warm`), so a request pays only for running them. Results are plain JSON-able dicts, the images
PNG data URIs coloured as in the report (same colormaps and colour bars).
"""

from __future__ import annotations

import functools
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..models import concepts as concept_ops
from ..models.registry import classifier_spec
from . import concepts as concepts_lib
from . import iresnet_counterfactual as icf
from . import methods as registry
from .bundles import ClassifierBundle, VisCoINBundle
from .classifier_report import (ATTRIBUTION_METHODS, IRESNET_CONFIDENCE, IRESNET_MAX_ALPHA, SIGNED_METHODS,
                                attribution_map)
from .report import (DIVERGING_CMAP, SEQUENTIAL_CMAP, class_label, colour_bar, heatmap_overlay, map_limits,
                     png_base64, to_uint8)

DEFAULT_METHODS = ("gradient", "integrated_gradients", "grad_cam")
SERIES_STEPS = 7  # frames of a counterfactual series, t = 0 (the input) to 1 (the counterfactual)


def data_uri(image: np.ndarray) -> str:
    """A PNG data URI of one uint8 image [H, W, 3]."""
    return "data:image/png;base64," + png_base64(image)


class LiveExplainer:
    """Holds the compiled functions of a run's models and explains one uint8 image [R, R, 3] per call."""

    def __init__(self, classifier: ClassifierBundle, resolution: int, *, class_names: Sequence[str] | None = None,
                 methods: Sequence[str] = DEFAULT_METHODS, viscoin: VisCoINBundle | None = None,
                 invertible: ClassifierBundle | None = None, top_k: int = 3,
                 lambdas: Sequence[float] = concepts_lib.DEFAULT_LAMBDAS):
        unknown = [m for m in methods if m not in ATTRIBUTION_METHODS]
        if unknown:
            raise ValueError(f"unknown attribution methods {unknown}; known: {ATTRIBUTION_METHODS}")
        grad_cam_layer = registry.METHODS["grad_cam"].settings["layer"]
        if "grad_cam" in methods and grad_cam_layer not in classifier_spec(classifier.architecture).feature_maps:
            methods = [m for m in methods if m != "grad_cam"]  # Grad-CAM reads a ResNet's named stage
        self.resolution, self.class_names, self.methods = int(resolution), class_names, tuple(methods)
        self.top_k, self.lambdas = int(top_k), tuple(float(v) for v in lambdas)
        self._lock = threading.Lock()  # one request at a time on the device
        f, feats = classifier.functions_of(classifier.params)
        self._probs = jax.jit(lambda x: jax.nn.softmax(f(x), -1))
        self.num_classes = int(jax.eval_shape(self._probs, jax.ShapeDtypeStruct(
            (1, self.resolution, self.resolution, 3), jnp.float32)).shape[-1])
        self._maps = {m: jax.jit(functools.partial(lambda name, x, t: attribution_map(name, f, feats, x, t), m))
                      for m in self.methods}
        self._concepts = self._series = None
        if viscoin is not None:
            self._concepts = self._compile_concepts(viscoin, f)
        if invertible is not None:
            self._series = self._compile_series(invertible)

    # -- compiled parts ---------------------------------------------------------------------------
    def _compile_concepts(self, bundle: VisCoINBundle, f):
        fns = bundle.functions
        lambdas = self.lambdas
        k = min(self.top_k, int(fns.head_weight.shape[0]))

        @jax.jit
        def run(x):
            phi, phi_prime = fns.concepts_fn(x)
            g_logits = fns.head_fn(phi)
            g_pred = jnp.argmax(g_logits, -1)
            relevance = concept_ops.concept_relevance(phi, fns.head_weight, g_pred)
            top_r, top_ids = jax.lax.top_k(relevance, k)
            recon = concept_ops.decode_concepts(fns.translator_fn, fns.synthesis_fn, phi, phi_prime)
            # one batch of k x L edits of the image's phi: concept top_ids[j] scaled by lambda (as the report draws)
            ids = jnp.repeat(top_ids[0], len(lambdas))
            factors = jnp.tile(jnp.asarray(lambdas, phi.dtype), k)
            edited = concept_ops.scale_concepts(jnp.repeat(phi, k * len(lambdas), axis=0), ids, factors)
            flat = concept_ops.decode_concepts(fns.translator_fn, fns.synthesis_fn, edited,
                                               jnp.repeat(phi_prime, k * len(lambdas), axis=0))
            drawings = flat.reshape((1, k, len(lambdas)) + flat.shape[1:])
            p = jax.nn.softmax(f(flat), -1)
            return dict(g_probs=jax.nn.softmax(g_logits, -1), relevance=relevance, top_ids=top_ids, top_r=top_r,
                        reconstruction=recon, drawings=drawings, drawn_probs=p.reshape(drawings.shape[:3] + (-1,)))
        return run

    def _compile_series(self, bundle: ClassifierBundle):
        model = bundle.invertible
        train_x, train_y = bundle.training_images(256, "train")
        num_classes = int(np.asarray(bundle.classifier_fn(jnp.asarray(train_x[:1]))).shape[-1])
        means, _ = icf.class_means(model.forward, jnp.asarray(train_x), np.asarray(train_y), num_classes)
        ts = jnp.linspace(0.0, 1.0, SERIES_STEPS)

        @jax.jit
        def run(x):
            z = model.forward(x)
            src = jnp.argmax(model.head(z), -1)
            tgt = (src + 1) % num_classes
            _, alpha, found = icf.closed_form_latents(model.head, z, src, tgt, means.astype(z.dtype),
                                                      max_alpha=IRESNET_MAX_ALPHA, confidence=IRESNET_CONFIDENCE)
            step = (means[tgt] - means[src])[0]
            zs = z[0][None] + (ts * alpha[0]).reshape((-1,) + (1,) * (z.ndim - 1)) * step[None]
            frames, _ = model.inverse(zs)
            probs = jax.nn.softmax(model.head(model.forward(frames)), -1)  # re-encoded, as the report's p
            return dict(frames=frames, probs=probs, target=tgt[0], source=src[0], alpha=alpha[0], found=found[0])
        return run

    # -- requests -----------------------------------------------------------------------------------
    def info(self) -> dict:
        return {"resolution": self.resolution, "classes": [class_label(self.class_names, c)
                                                            for c in range(self.num_classes)],
                "methods": list(self.methods), "concepts": self._concepts is not None,
                "counterfactual_series": self._series is not None, "lambdas": list(self.lambdas)}

    def warm(self) -> None:
        """Compiles every function (a request then runs without compiling)."""
        self.explain(np.full((self.resolution, self.resolution, 3), 128, np.uint8))

    def explain(self, image: np.ndarray, methods: Sequence[str] | None = None) -> dict:
        """The JSON answer for one uint8 image [R, R, 3] (see `viscoin-jax serve`'s API text)."""
        image = np.asarray(image)
        if image.shape != (self.resolution, self.resolution, 3) or image.dtype != np.uint8:
            raise ValueError(f"image must be uint8 [{self.resolution}, {self.resolution}, 3], "
                             f"got {image.dtype} {list(image.shape)}")
        methods = self.methods if methods is None else tuple(methods)
        unknown = [m for m in methods if m not in self.methods]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; this server offers {list(self.methods)}")
        x = jnp.asarray(image[None].astype(np.float32) / 127.5 - 1.0)
        with self._lock:
            probs = np.asarray(self._probs(x))[0]
            pred = int(probs.argmax())
            out = {"input": data_uri(image),
                   "prediction": {"class": pred, "name": class_label(self.class_names, pred),
                                  "probability": float(probs[pred]),
                                  "probabilities": {class_label(self.class_names, c): float(p)
                                                    for c, p in enumerate(probs)}},
                   "attributions": {}, "concepts": None, "counterfactual": None}
            for m in methods:
                out["attributions"][m] = self._attribution(m, image, x, pred)
            if self._concepts is not None:
                out["concepts"] = self._concept_answer(image, self._concepts(x))
            if self._series is not None:
                out["counterfactual"] = self._series_answer(self._series(x))
        return out

    def _attribution(self, name: str, image: np.ndarray, x, pred: int) -> dict:
        m = np.asarray(self._maps[name](x, jnp.asarray([pred])))
        signed = name in SIGNED_METHODS
        cmap = DIVERGING_CMAP if signed else SEQUENTIAL_CMAP
        lo, hi = map_limits(m, signed=signed)
        overlay = heatmap_overlay(image[None], m, cmap=cmap, alpha=0.6, limits=(lo, hi))[0]
        return {"map": data_uri(overlay), "signed": signed, "colour_bar": colour_bar(cmap, lo, hi)}

    def _concept_answer(self, image, r) -> dict:
        r = {k: np.asarray(v) for k, v in r.items()}
        g = int(r["g_probs"][0].argmax())
        drawings = to_uint8(r["drawings"][0].reshape((-1,) + r["drawings"].shape[-3:])).reshape(
            r["drawings"].shape[1:3] + r["drawings"].shape[-3:])
        return {"g_class": g, "g_name": class_label(self.class_names, g), "g_probability": float(r["g_probs"][0, g]),
                "reconstruction": data_uri(to_uint8(r["reconstruction"])[0]),
                "relevance": [float(v) for v in r["relevance"][0]],
                "top": [{"concept": int(c), "relevance": float(rel),
                         "frames": [{"lambda": lam, "image": data_uri(drawings[j, li]),
                                     "f_probability": float(r["drawn_probs"][0, j, li, g])}
                                    for li, lam in enumerate(self.lambdas)]}
                        for j, (c, rel) in enumerate(zip(r["top_ids"][0], r["top_r"][0]))]}

    def _series_answer(self, r) -> dict:
        r = {k: np.asarray(v) for k, v in r.items()}
        tgt = int(r["target"])
        frames = to_uint8(r["frames"])
        ts = np.linspace(0.0, 1.0, SERIES_STEPS)
        return {"source": int(r["source"]), "target": tgt, "target_name": class_label(self.class_names, tgt),
                "alpha": float(r["alpha"]), "reached_confidence_in_z": bool(r["found"]),
                "frames": [{"t": float(t), "image": data_uri(frames[i]), "target_probability": float(r["probs"][i, tgt])}
                           for i, t in enumerate(ts)]}


__all__ = ["DEFAULT_METHODS", "LiveExplainer", "data_uri"]
