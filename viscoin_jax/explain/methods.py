"""The explanation methods by name: which report runs each one and which checkpoints it applies to.
The command line's choices, its help text and the checks on a request all come from this table, so
adding a method is one entry here plus its code in the report module of its group.
"""

from __future__ import annotations

import dataclasses

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


_ALL_CLASSIFIERS = (RESNET, IRESNET, VISCOIN)
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("gradient", CLASSIFIER, _ALL_CLASSIFIERS, "vanilla gradient, max |.| over channels", True),
    Method("smoothgrad", CLASSIFIER, _ALL_CLASSIFIERS, "SmoothGrad, 16 noisy copies", True),
    Method("integrated_gradients", CLASSIFIER, _ALL_CLASSIFIERS, "Integrated Gradients, 64 steps from the zero (mid-grey) image", True),
    Method("grad_cam", CLASSIFIER, (RESNET, VISCOIN), "Grad-CAM at stage 4 (ResNets)", True),
    Method("occlusion", CLASSIFIER, _ALL_CLASSIFIERS, "occlusion sensitivity, patches of 1/8 of the side", True),
    Method("sanity_check", CLASSIFIER, _ALL_CLASSIFIERS,
           "model randomisation (Adebayo et al.) of the attribution methods asked for"),
    Method("deletion_insertion", CLASSIFIER, _ALL_CLASSIFIERS,
           "RISE deletion / insertion AUC of the attribution methods asked for, and of a random map"),
    Method("iresnet_counterfactual", CLASSIFIER, (IRESNET,), "counterfactuals by moving z between class means"),
    Method("decision_boundary", CLASSIFIER, _ALL_CLASSIFIERS,
           "held-out points and counterfactuals on the plane of the class-mean difference and the top "
           "principal direction of f's penultimate features (and the i-ResNet's z)"),
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


def help_text() -> str:
    """One line per checkpoint kind with the methods that apply, then one line per method."""
    lines = ["methods per checkpoint:"]
    lines += [f"  {LABELS[kind]}: {', '.join(m.name for m in METHODS.values() if kind in m.kinds)}" for kind in KINDS]
    lines.append("methods:")
    lines += [f"  {m.name}: {m.summary}" for m in METHODS.values()]
    return "\n".join(lines)


__all__ = ["Method", "METHODS", "KINDS", "LABELS", "RESNET", "IRESNET", "VISCOIN", "WITH_GENERATOR", "WITH_AUTOENCODER",
           "CLASSIFIER", "CONCEPTS", "COMPARISON",
           "LATENT", "names", "check_request", "help_text"]
