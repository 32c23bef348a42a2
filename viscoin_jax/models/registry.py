"""The classifiers by name (`config.model.name`): how to build one from its config, and what the
rest of the project may assume about it. Every classifier follows one protocol: called on images
[N, H, W, 3] in [-1, 1] it returns logits [N, C], or (logits, {name: feature map}) when it has
named stages. Adding a classifier is one entry here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

from flax import nnx

from .iresnet import IResNet
from .resnet import FEATURE_KEYS, ResNet


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    build: Callable[..., nnx.Module]  # (**config.model fields but name, rngs) -> module
    invertible: bool  # has forward (x -> z), head (z -> logits) and inverse (z -> (x, info))
    feature_maps: tuple[str, ...]  # the named feature maps it returns beside the logits
    layer_order: Callable[[set[str]], list[str]]  # parameter groups -> its layers, input to output


def _resnet_layers(groups: set[str]) -> list[str]:
    stages = sorted({g.split("/")[0] for g in groups if g.startswith("layer")}, key=lambda g: int(g[len("layer"):]))
    return ["conv1", "bn1"] + stages + ["fc"]


def _iresnet_layers(groups: set[str]) -> list[str]:
    stages = sorted({g.split("/")[1] for g in groups if g.startswith("stages/")}, key=int)
    return [f"stages/{i}" for i in stages] + ["head_bn", "head_fc"]


def _build_iresnet(*, rngs, **kwargs):
    kwargs["in_shape"] = tuple(kwargs["in_shape"])
    return IResNet(**kwargs, rngs=rngs)


CLASSIFIERS: dict[str, ClassifierSpec] = {
    "resnet": ClassifierSpec(ResNet, False, FEATURE_KEYS, _resnet_layers),
    "iresnet": ClassifierSpec(_build_iresnet, True, (), _iresnet_layers),
}


def classifier_spec(name: str) -> ClassifierSpec:
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier config.model.name {name!r}; known: {tuple(CLASSIFIERS)}")
    return CLASSIFIERS[name]


def build_classifier(model_cfg: Any, rngs: nnx.Rngs) -> nnx.Module:
    """The classifier named by `config.model` (constructor arguments = the config's other fields)."""
    kwargs = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    return classifier_spec(kwargs.pop("name", "resnet")).build(**kwargs, rngs=rngs)


def layer_order(name: str, groups: Iterable[str]) -> list[str]:
    """The classifier's layers present in `groups` (parameter path prefixes), input to output."""
    groups = set(groups)
    order = classifier_spec(name).layer_order(groups)
    return [layer for layer in order if any(g == layer or g.startswith(layer + "/") for g in groups)]


__all__ = ["ClassifierSpec", "CLASSIFIERS", "classifier_spec", "build_classifier", "layer_order"]
