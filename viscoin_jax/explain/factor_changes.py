"""Which generative factors an edit changed (a counterfactual, a removed concept), measured on the
pixels of the synthetic data: the summary rows every report writes the same way, and the per-factor
table. Outcomes that cannot be compared (no blob, blob removed, colour in between the stains) are
rows of their own, never counted as changes.
"""

from __future__ import annotations

from ..data.synthetic import measure_factors, measured_factor_roles, measurement_outcomes
from ..metrics.counterfactual_metrics import FactorChanges, factor_change_analysis
from .report import Report


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


__all__ = ["measured_changes"]
