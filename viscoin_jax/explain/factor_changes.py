"""Which generative factors an edit changed (a counterfactual, a removed concept), measured on the
pixels of the synthetic data: the summary rows every report writes the same way, and the per-factor
table. Outcomes that cannot be compared (no blob, blob removed, colour in between the stains) are
rows of their own, never counted as changes.
"""

from __future__ import annotations

import numpy as np

from ..data.synthetic import measure_factors, measured_factor_roles, measurement_outcomes
from ..metrics.counterfactual_metrics import FactorChanges, factor_change_analysis
from .report import Report, class_label


def measured_changes(before, after, variant: str, report: Report, subject: str, *, causal_key: str | None = None,
                     nuisance_key: str | None = None, only_key: str | None = None, outcome_prefix: str | None = None
                     ) -> tuple[dict, FactorChanges]:
    """(summary rows, the analysis) of `after` against `before` ([N, H, W, 3] each); adds the table.

    The rows are "<subject> changing a causal factor", "... a nuisance factor", "... only causal
    factors" and "<subject>: <outcome>", unless the keys are given."""
    causal_key = causal_key or f"{subject} changing a causal factor"
    nuisance_key = nuisance_key or f"{subject} changing a nuisance factor"
    only_key = only_key or f"{subject} changing only causal factors"
    outcome_prefix = outcome_prefix or f"{subject}: "
    causal, nuisance, tolerance = measured_factor_roles(variant)
    changes = factor_change_analysis(measure_factors, before, after, causal=causal, nuisance=nuisance,
                                     tolerance=tolerance, outcomes_fn=measurement_outcomes)
    summary = {causal_key: changes.any_causal, nuisance_key: changes.any_nuisance, only_key: changes.causal_only}
    summary.update({f"{outcome_prefix}{outcome}": rate for outcome, rate in changes.outcome_rate.items()})
    report.add_table([[k, v] for k, v in changes.change_rate.items()], ["factor", "fraction changed"],
                     title=f"Factors changed by the {subject} (causal: {', '.join(causal)})")
    return summary, changes


def only_causal_by_class(changes: FactorChanges, classes, class_names, key: str) -> dict[str, float]:
    """{"<key>, <class> images": share changing a causal factor and no nuisance factor} for each class present.

    Why: an edit can work for one class and not the other (removing a class's only concept draws the same
    class-free image for every input, so on a 2-class task at most one class can flip)."""
    classes = np.asarray(classes)
    if classes.shape != changes.causal_changed.shape:
        raise ValueError(f"classes must be [N] = {changes.causal_changed.shape}, got {classes.shape}")
    only = changes.causal_changed & ~changes.nuisance_changed
    return {f"{key}, {class_label(class_names, c)} images": float(np.mean(only[classes == c]))
            for c in np.unique(classes)}


__all__ = ["measured_changes", "only_causal_by_class"]
