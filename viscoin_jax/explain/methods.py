"""The explanation methods by name: which report runs each one, which checkpoints it applies to, the
function that computes it and its default settings. The command line's choices, its help text, its
`--setting METHOD.KEY=VALUE` overrides and the checks on a request all come from this table, so
adding a method is one entry here plus its code.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Sequence

# what a checkpoint offers: its classifier's architecture or a VisCoIN run, and a generator when
# `--generator` names a StyleGAN2 run for a classifier checkpoint
# `--generator` names a StyleGAN2 run for a classifier checkpoint; `--autoencoder` an autoencoder run
RESNET, IRESNET, VISCOIN, WITH_GENERATOR, WITH_AUTOENCODER = "resnet", "iresnet", "viscoin", "generator", "autoencoder"
KINDS = (RESNET, IRESNET, VISCOIN, WITH_GENERATOR, WITH_AUTOENCODER)
LABELS = {RESNET: "a ResNet classifier", IRESNET: "an i-ResNet classifier", VISCOIN: "a VisCoIN run",
          WITH_GENERATOR: "a classifier with --generator <a stylegan2 run>",
          WITH_AUTOENCODER: "a classifier or VisCoIN run with --autoencoder <an autoencoder run>"}
# method groups: the report module that runs them
CLASSIFIER, CONCEPTS, LATENT = "classifier", "concepts", "latent"
COMPARISON = "comparison"  # runs after the others, on what they saved (explain.counterfactual_comparison)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    group: str  # CLASSIFIER (explain.classifier_report), CONCEPTS (viscoin_report), LATENT (latent_report), COMPARISON
    kinds: tuple[str, ...]  # checkpoints it explains (on a VisCoIN run, the classifier methods explain its f)
    summary: str
    attribution: bool = False  # produces a pixel map that sanity_check and deletion_insertion judge
    # "module:name" in viscoin_jax.explain: the function an attribution method's map comes from, called
    # as fn(classifier_fn, feats_fn, images, targets, key=..., **settings)
    function: str | None = None
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # defaults; --setting overrides
    # setting -> fn(value) raising a ValueError on a value the method cannot use (run on overrides)
    checks: Mapping[str, Callable[[Any], Any]] = dataclasses.field(default_factory=dict)


_ALL_CLASSIFIERS = (RESNET, IRESNET, VISCOIN)


def class_pair(text: str) -> tuple[int, int] | None:
    """The decision boundary's `classes` setting: "auto" -> None (the view picks), "a,b" -> (a, b)."""
    if str(text).strip().lower() == "auto":
        return None
    parts = str(text).split(",")
    try:
        a, b = (int(p) for p in parts)
    except ValueError:
        a = b = -1
    if len(parts) != 2 or a < 0 or b < 0 or a == b:
        raise ValueError(f"must be 'auto' or two different class numbers 'a,b', got {text!r}")
    return a, b


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("gradient", CLASSIFIER, _ALL_CLASSIFIERS, "vanilla gradient, max |.| over channels", True,
           "attributions:gradient_map"),
    Method("smoothgrad", CLASSIFIER, _ALL_CLASSIFIERS, "SmoothGrad: gradients of noisy copies, max |.|", True,
           "attributions:smoothgrad_map", {"num_samples": 16, "noise_level": 0.15}),
    Method("integrated_gradients", CLASSIFIER, _ALL_CLASSIFIERS,
           "Integrated Gradients from the zero (mid-grey) image, signed channel sum", True,
           "attributions:integrated_gradients_map", {"num_steps": 64}),
    Method("grad_cam", CLASSIFIER, (RESNET, VISCOIN), "Grad-CAM on a named feature map (ResNets)", True,
           "attributions:grad_cam_map", {"layer": "stage4"}),
    Method("occlusion", CLASSIFIER, _ALL_CLASSIFIERS, "occlusion sensitivity, square patches", True,
           "attributions:occlusion_map", {"patches_per_side": 8}),
    Method("sanity_check", CLASSIFIER, _ALL_CLASSIFIERS,
           "model randomisation (Adebayo et al.) of the attribution methods asked for", settings={"images": 8}),
    Method("deletion_insertion", CLASSIFIER, _ALL_CLASSIFIERS,
           "RISE deletion / insertion AUC of the attribution methods asked for, and of a random map"),
    Method("iresnet_counterfactual", CLASSIFIER, (IRESNET,), "counterfactuals by moving z between class means"),
    Method("decision_boundary", CLASSIFIER, _ALL_CLASSIFIERS,
           "held-out points and counterfactuals on the plane of the class-mean difference and the top "
           "principal direction of f's penultimate features (and the i-ResNet's z); classes: the pair it "
           "separates, 'a,b', or auto (the only two, else the two most frequent among the explained images)",
           settings={"classes": "auto"}, checks={"classes": class_pair}),
    Method("autoencoder_counterfactual", CLASSIFIER, (WITH_AUTOENCODER,),
           "counterfactuals by moving an autoencoder's code between class means until f decides the other class"),
    Method("activations", CLASSIFIER, _ALL_CLASSIFIERS,
           "each stage's most active channels, and each channel's top-activating training images"),
    Method("concepts", CONCEPTS, (VISCOIN,), "relevant concepts, their drawings and top-activating images"),
    Method("faithfulness", CONCEPTS, (VISCOIN,), "FF: the prediction drop when relevant concepts are removed"),
    Method("consistency", CONCEPTS, (VISCOIN,), "CC: a linear probe separating concept-amplified drawings"),
    Method("concept_activations", CONCEPTS, (VISCOIN,),
           "the most active concept maps phi of each image (grid, colour bar) and their top training images"),
    Method("latent_direction", LATENT, (VISCOIN, WITH_GENERATOR),
           "W+ projection, logistic-regression direction to the other class, counterfactual series"),
    Method("latent_interpolation", LATENT, (VISCOIN, WITH_GENERATOR),
           "integrated gradients along the latent path from the projection to the counterfactual"),
    Method("counterfactual_comparison", COMPARISON, _ALL_CLASSIFIERS,
           "one table of the counterfactual methods run here (latent direction, concept removal, i-ResNet, "
           "autoencoder) on the same images: validity, L1, factors changed"),
)}


def names(group: str | None = None, *, attribution: bool | None = None) -> tuple[str, ...]:
    """Method names in table order, optionally of one group / only the attribution maps."""
    return tuple(m.name for m in METHODS.values() if (group is None or m.group == group)
                 and (attribution is None or m.attribution == attribution))


def check_request(methods, offers) -> dict[str, list[str]]:
    """The requested methods grouped for their reports, or a one-line ValueError naming the first
    unknown method or the first that none of the checkpoint's kinds (`offers`, from KINDS) allows."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    offers = set(offers)
    for m in methods:
        if not offers & set(METHODS[m].kinds):
            have = " ".join([LABELS[k] for k in (RESNET, IRESNET, VISCOIN) if k in offers]
                            + (["with --generator"] if WITH_GENERATOR in offers else [])
                            + (["with --autoencoder"] if WITH_AUTOENCODER in offers else []))
            need = " or ".join(LABELS[k] for k in METHODS[m].kinds)
            raise ValueError(f"{m} does not apply to {have}; it needs {need}")
    groups: dict[str, list[str]] = {}
    for m in methods:
        groups.setdefault(METHODS[m].group, []).append(m)
    return groups


def map_function(name: str):
    """The function of attribution method `name` (its registry entry's "module:name" in explain)."""
    method = METHODS[name]
    if method.function is None:
        raise ValueError(f"{name} has no map function (it is run by the {method.group} report)")
    module, _, attr = method.function.partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), attr)


def _parse_value(text: str, default: Any, where: str) -> Any:
    """`text` as the type of the setting's default (bool, int, float or str)."""
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{where} must be true or false, got {text!r}")
        return text.lower() in ("true", "1")
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                return kind(text)
            except ValueError:
                raise ValueError(f"{where} must be {'an integer' if kind is int else 'a number'}, "
                                 f"got {text!r}") from None
    return text


def resolve_settings(overrides: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Every method's settings: the registry's defaults with `METHOD.KEY=VALUE` overrides applied, or a
    one-line ValueError naming the first malformed override, unknown method or unknown setting."""
    settings = {name: dict(m.settings) for name, m in METHODS.items()}
    for item in overrides:
        target, eq, text = item.partition("=")
        method, dot, key = target.partition(".")
        if not eq or not dot or not key:
            raise ValueError(f"--setting {item!r}: expected METHOD.KEY=VALUE")
        if method not in METHODS:
            raise ValueError(f"--setting {item!r}: unknown method {method!r}; known: {', '.join(METHODS)}")
        if key not in settings[method]:
            known = ", ".join(settings[method]) or "none"
            raise ValueError(f"--setting {item!r}: {method} has no setting {key!r}; its settings: {known}")
        settings[method][key] = _parse_value(text, METHODS[method].settings[key], f"--setting {target}")
        check = METHODS[method].checks.get(key)
        if check is not None:
            try:
                check(settings[method][key])
            except ValueError as e:
                raise ValueError(f"--setting {target} {e}") from None
    return settings


def help_text() -> str:
    """One line per checkpoint kind with the methods that apply, then one line per method with its
    default settings."""
    lines = ["methods per checkpoint:"]
    lines += [f"  {LABELS[kind]}: {', '.join(m.name for m in METHODS.values() if kind in m.kinds)}" for kind in KINDS]
    lines.append("methods (default settings; change one with --setting METHOD.KEY=VALUE):")
    for m in METHODS.values():
        defaults = ", ".join(f"{k}={v}" for k, v in m.settings.items())
        lines.append(f"  {m.name}: {m.summary}" + (f" ({defaults})" if defaults else ""))
    return "\n".join(lines)


__all__ = ["Method", "METHODS", "KINDS", "LABELS", "RESNET", "IRESNET", "VISCOIN", "WITH_GENERATOR", "WITH_AUTOENCODER",
           "CLASSIFIER", "CONCEPTS", "COMPARISON", "LATENT", "names", "check_request", "help_text", "map_function",
           "resolve_settings", "class_pair"]
