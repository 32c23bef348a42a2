"""Metrics for counterfactual explanations: validity, proximity and which factors changed.

- validity: does the classifier's decision on the counterfactual flip as requested, to a target
  class or away from the source class?
- proximity: how far the counterfactual is from the input (mean absolute pixel difference, and an
  optional perceptual distance such as LPIPS).
- factor changes: with a data set whose generative factors can be measured on any image (the
  synthetic data set provides `measure_factors(images) -> {name: [N, ...]}`), the fraction of
  counterfactuals in which each factor changed. A good counterfactual changes the causal factors
  (those the label depends on) and leaves the nuisance factors alone. Samples whose factors cannot
  be compared (the object was erased, a colour reads as neither class) are outcomes of their own,
  never counted as changes: an erased blob would otherwise read as a new colour, and an in-between
  colour as a flip by its sign.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..checks import check_rgb_images

PerceptualFn = Callable[[jax.Array, jax.Array], jax.Array]
MeasureFn = Callable[[jax.Array], Mapping[str, jax.Array]]
OutcomesFn = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def _decisions(logits_or_classes) -> np.ndarray:
    a = np.asarray(logits_or_classes)
    if a.ndim == 2 and np.issubdtype(a.dtype, np.floating):
        return np.argmax(a, axis=-1)
    if a.ndim == 1 and np.issubdtype(a.dtype, np.integer):
        return a
    raise ValueError(f"expected logits [N, C] (float) or predicted classes [N] (int), got {a.dtype} {a.shape}")


@dataclasses.dataclass(frozen=True)
class Validity:
    valid: np.ndarray  # [N] bool
    rate: float  # fraction valid


def validity(counterfactual_logits, *, target=None, source=None) -> Validity:
    """Fraction of counterfactuals whose decision flips as requested.

    `counterfactual_logits` are f's logits [N, C] on the counterfactuals (or predicted classes [N]).
    Give exactly one of `target` (flip *to* this class: prediction == target) or `source` (flip
    *away* from it: prediction != source); each is a class index or an [N] array.
    """
    pred = _decisions(counterfactual_logits)
    if (target is None) == (source is None):
        raise ValueError("give exactly one of target (flip to) or source (flip away from)")
    ref = np.asarray(target if target is not None else source)
    if not np.issubdtype(ref.dtype, np.integer) or ref.shape not in ((), pred.shape):
        raise ValueError(
            f"target/source must be an int or an int array of shape {pred.shape}, got {ref.dtype} {ref.shape}"
        )
    valid = pred == ref if target is not None else pred != ref
    valid = np.broadcast_to(valid, pred.shape)
    return Validity(valid, float(np.mean(valid)) if valid.size else float("nan"))


@jax.jit
def _l1(images, counterfactuals):
    return jnp.mean(jnp.abs(images - counterfactuals), axis=(1, 2, 3))


def proximity(images, counterfactuals, *, perceptual_fn: PerceptualFn | None = None) -> dict[str, np.ndarray]:
    """Per-image distances to the input: {"l1": mean |x - x'| over pixels and channels, "perceptual": ...}.

    "perceptual" (perceptual_fn(x, x') -> [N]) is present only when perceptual_fn is given. Images
    are in [-1, 1], so "l1" lies in [0, 2].
    """
    images = check_rgb_images(images)
    counterfactuals = check_rgb_images(counterfactuals, "counterfactuals")
    if images.shape != counterfactuals.shape:
        raise ValueError(f"images {images.shape} and counterfactuals {counterfactuals.shape} differ in shape")
    out = {"l1": np.asarray(_l1(images, counterfactuals))}
    if perceptual_fn is not None:
        d = np.asarray(perceptual_fn(images, counterfactuals))
        if d.shape != (images.shape[0],):
            raise ValueError(f"perceptual_fn must return [N] distances, got shape {d.shape}")
        out["perceptual"] = d
    return out


@dataclasses.dataclass(frozen=True)
class FactorChanges:
    changed: dict[str, np.ndarray]  # factor -> [N] bool (False where an outcome applies)
    change_rate: dict[str, float]  # factor -> fraction of counterfactuals where it changed
    causal: tuple[str, ...]
    nuisance: tuple[str, ...]
    causal_rate: float  # mean change rate over causal factors
    nuisance_rate: float  # mean change rate over nuisance factors
    any_causal: float  # fraction of counterfactuals changing at least one causal factor
    any_nuisance: float  # fraction changing at least one nuisance factor
    causal_only: float  # fraction changing a causal factor and no nuisance factor
    causal_changed: np.ndarray  # [N] bool: at least one causal factor changed (per sample: any_causal)
    nuisance_changed: np.ndarray  # [N] bool: at least one nuisance factor changed
    outcomes: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # name -> [N] bool, disjoint
    outcome_rate: dict[str, float] = dataclasses.field(default_factory=dict)  # name -> fraction


def _tolerance(tolerance, name):
    if isinstance(tolerance, Mapping):
        return float(tolerance.get(name, 0.0))
    return float(tolerance)


def factor_changes(
    before: Mapping[str, object],
    after: Mapping[str, object],
    *,
    causal: Sequence[str],
    nuisance: Sequence[str] | None = None,
    tolerance: float | Mapping[str, float] = 0.0,
    outcomes: Mapping[str, object] | None = None,
) -> FactorChanges:
    """Which measured factors differ between inputs (`before`) and counterfactuals (`after`).

    Each factor is an array [N] or [N, ...] (e.g. an RGB colour); it changed for sample n when any
    entry differs by more than `tolerance` (a float for all factors, or per factor name; 0 for
    discrete factors). `nuisance` defaults to every factor not in `causal`; factors in neither are
    reported per factor but not in the causal/nuisance summaries.
    `outcomes` ({name: [N] bool}, in order of precedence) names samples whose factors cannot be
    compared: each such sample counts under the first outcome that holds for it and changes no
    factor. Every rate is a fraction of all N samples, so the outcome rates, the causal-only rate
    and the rest add up to at most 1.
    """
    if set(before) != set(after):
        raise ValueError(f"before and after measure different factors: {sorted(before)} vs {sorted(after)}")
    names = list(before)
    causal = tuple(causal)
    nuisance = tuple(n for n in names if n not in causal) if nuisance is None else tuple(nuisance)
    unknown = [n for n in causal + nuisance if n not in before]
    if unknown:
        raise ValueError(f"unknown factor names {unknown}; measured factors are {names}")
    overlap = set(causal) & set(nuisance)
    if overlap:
        raise ValueError(f"factors {sorted(overlap)} are listed as both causal and nuisance")
    if not causal:
        raise ValueError("causal must name at least one factor")

    changed, rates = {}, {}
    first = np.asarray(before[names[0]]) if names else np.zeros(0)
    taken = np.zeros(first.shape[0] if first.ndim else 0, bool)
    out_masks, out_rates = {}, {}
    for name, mask in (outcomes or {}).items():
        mask = np.asarray(mask, bool)
        if mask.shape != taken.shape:
            raise ValueError(f"outcome {name!r} must be a [N] = [{taken.shape[0]}] bool array, got shape {mask.shape}")
        out_masks[name] = mask & ~taken
        taken |= mask
        out_rates[name] = float(np.mean(out_masks[name])) if taken.size else float("nan")
    n = None
    for name in names:
        a, b = np.asarray(before[name]), np.asarray(after[name])
        if a.shape != b.shape or a.ndim == 0:
            raise ValueError(f"factor {name!r}: before {a.shape} and after {b.shape} must be equal [N, ...] shapes")
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            raise ValueError(f"factor {name!r} has {a.shape[0]} samples, expected {n}")
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64)).reshape(n, -1)
        changed[name] = np.any(diff > _tolerance(tolerance, name), axis=1) & ~taken
        rates[name] = float(np.mean(changed[name])) if n else float("nan")

    def any_of(group):
        return np.any(np.stack([changed[g] for g in group]), axis=0) if group else np.zeros(n, bool)

    any_c, any_n = any_of(causal), any_of(nuisance)
    return FactorChanges(
        changed=changed,
        change_rate=rates,
        causal=causal,
        nuisance=nuisance,
        causal_rate=float(np.mean([rates[g] for g in causal])),
        nuisance_rate=float(np.mean([rates[g] for g in nuisance])) if nuisance else float("nan"),
        any_causal=float(np.mean(any_c)),
        any_nuisance=float(np.mean(any_n)),
        causal_only=float(np.mean(any_c & ~any_n)),
        causal_changed=any_c,
        nuisance_changed=any_n,
        outcomes=out_masks,
        outcome_rate=out_rates,
    )


def factor_change_analysis(
    measure_factors: MeasureFn,
    images,
    counterfactuals,
    *,
    causal: Sequence[str],
    nuisance: Sequence[str] | None = None,
    tolerance: float | Mapping[str, float] = 0.0,
    outcomes_fn: OutcomesFn | None = None,
) -> FactorChanges:
    """`factor_changes` of measure_factors(images) vs measure_factors(counterfactuals).

    `outcomes_fn(measured_before, measured_after) -> {name: [N] bool}` gives the `outcomes`
    (e.g. `data.synthetic.measurement_outcomes`: blob removed, colour ambiguous).
    """
    images = check_rgb_images(images)
    counterfactuals = check_rgb_images(counterfactuals, "counterfactuals")
    if images.shape != counterfactuals.shape:
        raise ValueError(f"images {images.shape} and counterfactuals {counterfactuals.shape} differ in shape")
    before, after = measure_factors(images), measure_factors(counterfactuals)
    outcomes = outcomes_fn(before, after) if outcomes_fn is not None else None
    return factor_changes(before, after, causal=causal, nuisance=nuisance, tolerance=tolerance, outcomes=outcomes)
