"""The numbers a report's summary leads with, each with its direction ("higher is better") and one
sentence on what it measures, so a reader need not know the metric to judge the value. Rows are
picked from a report's metrics by name; names it does not know stay in the full metrics table.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

HIGHER, LOWER = "higher is better", "lower is better"
NEAR_ZERO = "closer to 0 is better"

# (regular expression on the metric's name, direction, meaning), in the order the summary shows them
GUIDE: tuple[tuple[str, str, str], ...] = (
    (r"^accuracy on these images$", HIGHER, "share of the explained images f classifies correctly"),
    (r"^best attribution \(deletion\)$", "", "the attribution method whose maps f depends on most (lowest deletion AUC)"),
    (r"^best attribution deletion AUC minus random$", LOWER,
     "deletion AUC of the best method minus a random map's: below 0 means the maps beat chance"),
    (r"^(?!random)(.+) deletion AUC$", LOWER,
     "mean p of the predicted class as the map's most important pixels are removed (fast fall = faithful map)"),
    (r"^random attribution deletion AUC$", "", "the chance level for deletion AUC (a random map)"),
    (r"^sanity check (.+): Spearman, all layers randomised$", NEAR_ZERO,
     "similarity of the map before and after f's weights are randomised: near 1 = the map ignores the model"),
    (r"^integrated_gradients completeness gap \(max \|\.\|\)$", NEAR_ZERO,
     "IG's attributions should sum to f(x) - f(baseline); the gap is the error of that sum"),
    (r"^i-ResNet counterfactual validity$", HIGHER, "share of i-ResNet counterfactuals f assigns to the target class"),
    (r"^i-ResNet counterfactual L1$", LOWER, "mean |x' - x| of the i-ResNet counterfactuals (smaller = sparser edit)"),
    (r"^g fidelity to f \(these images\)$", HIGHER, "share of images where VisCoIN's concept head g agrees with f"),
    (r"^reconstruction MSE$", LOWER, "mean squared error of G's reconstruction of the image from its concepts"),
    (r"^FF median \(tau [0-9.]+\)$", HIGHER,
     "faithfulness: g's class probability lost when the relevant concepts are removed"),
    (r"^CC mean$", HIGHER, "consistency: a linear probe on f's features tells a concept's presence (0.5 = chance)"),
    (r"^top concepts whose removal changes a causal factor$", HIGHER,
     "share of top concepts whose removal changes a factor that decides the class (synthetic data)"),
    (r"changing only causal factors$", HIGHER,
     "share of edits that change only factors deciding the class (synthetic data; the ideal explanation)"),
    (r"^G samples f assigns to the rarer class$", HIGHER,
     "share of G's random samples f puts in its rarer class: 0 means G never draws that class"),
    (r"^G samples whose blob colour is in between the stains$", LOWER,
     "share of G's blobs whose colour is neither stain: G has not learnt the classes' colours"),
    (r"^latent counterfactual validity$", HIGHER, "share of StyleGAN2 latent counterfactuals f assigns to the target"),
    (r"^latent counterfactual L1 to the projection$", LOWER, "size of the latent counterfactual's edit"),
    (r"^latent counterfactuals changing a causal factor$", HIGHER,
     "share of latent counterfactuals that change a factor deciding the class (synthetic data)"),
    (r"^i-ResNet counterfactuals changing a causal factor$", HIGHER,
     "share of i-ResNet counterfactuals that change a factor deciding the class (synthetic data)"),
)
MAX_ROWS = 12


def describe(name: str) -> tuple[str, str] | None:
    """(direction, meaning) of a metric the guide knows, else None."""
    for pattern, direction, meaning in GUIDE:
        if re.search(pattern, name):
            return direction, meaning
    return None


def headline_rows(metrics: Mapping[str, Any], max_rows: int = MAX_ROWS) -> list[dict]:
    """The known metrics among `metrics` as summary rows {name, value, direction, meaning}, in the
    guide's order; NaN values are left out (nothing was measured)."""
    rows = []
    for pattern, direction, meaning in GUIDE:
        for name, value in metrics.items():
            if not re.search(pattern, name):
                continue
            if isinstance(value, float) and math.isnan(value):
                continue
            rows.append({"name": name, "value": value, "direction": direction, "meaning": meaning})
    seen, out = set(), []
    for r in rows:
        if r["name"] not in seen:
            seen.add(r["name"])
            out.append(r)
    return out[:max_rows]


__all__ = ["GUIDE", "describe", "headline_rows"]
