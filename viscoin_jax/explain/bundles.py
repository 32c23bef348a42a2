"""What an explanation needs from a trained model, as plain callables: the trainers build these
from a restored checkpoint (`explanation_bundle` / `latent_models` in viscoin_jax.training.*), so
the explanation code never reaches into a trainer or a task's private members, and a notebook can
build one from any model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

ClassifierFn = Callable[[jax.Array], jax.Array]  # images [N, H, W, C] in [-1, 1] -> logits [N, C]
FeaturesAndLogitsFn = Callable[[jax.Array], tuple[dict, jax.Array]]  # images -> (named feature maps, logits)
# (number of images, split) -> (images [M, R, R, 3] in [-1, 1], labels [M]): the run's data, in order
TrainingImagesFn = Callable[[int, str], tuple[np.ndarray, np.ndarray]]


class InvertibleFunctions(NamedTuple):
    """An invertible classifier (i-ResNet): x -> z, z -> logits, z -> x."""

    forward: Callable
    head: Callable
    inverse: Callable


class BoundaryView(NamedTuple):
    """Features a decision-boundary plane is drawn in, and the part of f that decides from them."""

    name: str  # "penultimate" or "z"
    features_fn: Callable  # images -> features [N, ...]
    head_fn: Callable  # features -> logits [N, C]
    decode_fn: Callable | None = None  # features -> images, where invertible (the i-ResNet's z)


@dataclasses.dataclass(frozen=True)
class ClassifierBundle:
    """A trained classifier f for the attribution methods, the sanity check and the i-ResNet counterfactuals."""

    architecture: str  # "resnet" or "iresnet": Grad-CAM needs named stages, the sanity check the layer order
    params: Any  # f's parameters; the sanity check randomises them
    functions_of: Callable[[Any], tuple[ClassifierFn, FeaturesAndLogitsFn]]  # params -> (logits fn, features fn)
    training_images: TrainingImagesFn
    invertible: InvertibleFunctions | None = None  # i-ResNets only
    boundary_views: tuple[BoundaryView, ...] = ()  # the decision-boundary view's feature spaces

    @property
    def classifier_fn(self) -> ClassifierFn:
        return self.functions_of(self.params)[0]

    @property
    def features_and_logits_fn(self) -> FeaturesAndLogitsFn:
        return self.functions_of(self.params)[1]


class AutoencoderFunctions(NamedTuple):
    """A trained autoencoder (weights closed over): the counterfactuals move its code."""

    encode_fn: Callable  # images [N, R, R, 3] in [-1, 1] -> codes [N, code_dim]
    decode_fn: Callable  # codes -> images
    code_dim: int
    training_images: TrainingImagesFn  # its run's data: the class means in code space come from it


class VisCoINFunctions(NamedTuple):
    """Pure functions of a trained VisCoIN (weights closed over; jit them as you like)."""

    concepts_fn: Callable  # images -> (phi [N, g, g, K], phi_prime [N, g g K])
    head_fn: Callable  # phi -> logits [N, C]
    head_weight: jax.Array  # [K, C]
    translator_fn: Callable  # (phi, phi_prime) -> ws [N, num_ws, w_dim]
    synthesis_fn: Callable  # ws -> images [N, R, R, 3] in [-1, 1]
    classifier_fn: Callable  # images -> f logits [N, C]
    features_fn: Callable  # images -> f's stage-2 feature map


@dataclasses.dataclass(frozen=True)
class VisCoINBundle:
    """A trained VisCoIN for the concept methods: its functions and its run's data."""

    functions: VisCoINFunctions
    training_images: TrainingImagesFn


@dataclasses.dataclass(frozen=True)
class LatentModels:
    """The frozen models a latent method needs (pure callables; weights closed over)."""

    synthesis_fn: Callable  # ws [N, num_ws, w_dim] -> images [N, R, R, 3] in [-1, 1]
    mapping_fn: Callable  # z [N, z_dim] -> ws [N, num_ws, w_dim]
    classifier_fn: Callable  # images -> f's logits [N, C]
    z_dim: int
    num_ws: int
    resolution: int
    perceptual_fn: Callable | None = None  # (images, target) -> [N] distances, for the projection
    perceptual_name: str = "none (pixel loss only)"
    init_ws_fn: Callable | None = None  # images -> ws: a warm start (VisCoIN's translator)


__all__ = ["ClassifierFn", "FeaturesAndLogitsFn", "TrainingImagesFn", "InvertibleFunctions", "BoundaryView",
           "ClassifierBundle",
           "AutoencoderFunctions", "VisCoINFunctions", "VisCoINBundle", "LatentModels"]
