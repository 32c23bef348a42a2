"""One table of every counterfactual method on the same held-out images (issue 19): the StyleGAN
latent direction, VisCoIN's concept removal, the i-ResNet and the autoencoder, side by side, with
the same numbers computed the same way from the pixels: validity (as judged by the classifier each
method explains), L1 to the input, L1 to the method's own rendering of the input (projection,
reconstruction; the part of the change that is the move, not the renderer), and on the synthetic
data the generative factors changed.

`counterfactual_sets(report_dirs)` reads the arrays the explain reports saved (`<method>.npz`), so the
table can be drawn from any number of `explain` runs (the pipeline's report/<stage>/ folders); the
images must be the same in every set, or the comparison says which differ.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.synthetic import measure_factors, measured_factor_roles, measurement_outcomes
from ..metrics.counterfactual_metrics import factor_change_analysis


@dataclasses.dataclass(frozen=True)
class CounterfactualSet:
    method: str
    judge: str  # the classifier whose decision defines validity
    images: np.ndarray  # [N, H, W, 3] in [-1, 1]: the held-out inputs
    counterfactuals: np.ndarray  # [N, H, W, 3]
    valid: np.ndarray  # [N] bool: the judge's decision flipped as requested
    rendering: np.ndarray | None = None  # [N, H, W, 3] the method's own version of the input, if it has one
    target: np.ndarray | None = None  # [N] the requested class, where the method names one


HEADER = ["method", "judged by", "images", "validity", "L1 to the input", "L1 to its own rendering"]
FACTOR_HEADER = ["changing a causal factor", "changing a nuisance factor", "changing only causal factors",
                 "not measurable (no blob, colour in between)"]


def comparison_rows(sets: Sequence[CounterfactualSet], variant: str | None = None) -> tuple[list[str], list[list]]:
    """(header, one row per set): validity, mean L1 to the input and to the method's rendering and,
    given the synthetic `variant`, the fractions changing causal / nuisance / only causal factors
    (measured on the pixels of input and counterfactual) and the unmeasurable fraction."""
    if not sets:
        raise ValueError("no counterfactual sets to compare")
    first = sets[0]
    for s in sets:
        n = len(s.images)
        if s.counterfactuals.shape != s.images.shape or np.shape(s.valid) != (n,):
            raise ValueError(f"{s.method}: counterfactuals {s.counterfactuals.shape}, images {s.images.shape} and "
                             f"valid {np.shape(s.valid)} do not match")
        if s.images.shape != first.images.shape or not np.allclose(s.images, first.images, atol=1e-3):
            raise ValueError(f"{s.method} was run on other images than {first.method}: the table compares methods on "
                             "the same held-out images")
    header = HEADER + (FACTOR_HEADER if variant is not None else [])
    roles = measured_factor_roles(variant) if variant is not None else None
    rows = []
    for s in sets:
        x = np.asarray(s.images, np.float64)
        cf = np.asarray(s.counterfactuals, np.float64)
        row = [s.method, s.judge, len(x), float(np.mean(s.valid)), float(np.mean(np.abs(cf - x))),
               float(np.mean(np.abs(cf - np.asarray(s.rendering, np.float64)))) if s.rendering is not None else "-"]
        if roles is not None:
            causal, nuisance, tolerance = roles
            ch = factor_change_analysis(measure_factors, s.images, s.counterfactuals, causal=causal, nuisance=nuisance,
                                        tolerance=tolerance, outcomes_fn=measurement_outcomes)
            row += [ch.any_causal, ch.any_nuisance, ch.causal_only, float(sum(ch.outcome_rate.values()))]
        rows.append(row)
    return header, rows


SAVED_BY = ("latent_direction", "concepts", "iresnet_counterfactual", "autoencoder_counterfactual")


def counterfactual_sets(report_dirs: Sequence[str | Path], methods: Sequence[str] = SAVED_BY
                        ) -> list[CounterfactualSet]:
    """The counterfactual sets the explain reports in `report_dirs` saved, in method order: latent
    direction, VisCoIN top-concept removal, i-ResNet, autoencoder (absent methods are skipped; only
    the arrays of `methods` are read, so older files in a reused folder stay out)."""
    sets = []
    for d in map(Path, report_dirs):
        name = d.name
        path = d / "latent_direction.npz"
        if "latent_direction" in methods and path.is_file():
            with np.load(path) as a:
                if "valid" in a:
                    sets.append(CounterfactualSet("StyleGAN latent direction", f"f ({name})", a["images"],
                                                  a["counterfactuals"], a["valid"], a["projections"], a["target"]))
        path = d / "concepts.npz"
        if "concepts" in methods and path.is_file():
            with np.load(path) as a:
                lambdas = list(a["lambdas"])
                if "images" in a and "top_concept_removed_f_predictions" in a and 0.0 in lambdas and 1.0 in lambdas:
                    removed = a["drawings"][:, 0, lambdas.index(0.0)]
                    sets.append(CounterfactualSet("VisCoIN top-concept removal", f"f ({name})", a["images"], removed,
                                                  a["top_concept_removed_f_predictions"] != a["f_predictions"],
                                                  a["drawings"][:, 0, lambdas.index(1.0)]))
        path = d / "iresnet_counterfactual.npz"
        if "iresnet_counterfactual" in methods and path.is_file():
            with np.load(path) as a:
                if "valid" in a:
                    sets.append(CounterfactualSet("i-ResNet (z between class means)", f"i-ResNet ({name})", a["images"],
                                                  a["counterfactuals"], a["valid"], target=a["target"]))
        path = d / "autoencoder_counterfactual.npz"
        if "autoencoder_counterfactual" in methods and path.is_file():
            with np.load(path) as a:
                sets.append(CounterfactualSet("autoencoder (code between class means)", f"f ({name})", a["images"],
                                              a["counterfactuals"], a["valid"], a["reconstructions"], a["target"]))
    order = ["StyleGAN", "VisCoIN", "i-ResNet", "autoencoder"]
    return sorted(sets, key=lambda s: next(i for i, o in enumerate(order) if s.method.startswith(o)))


def add_comparison(report, report_dirs: Sequence[str | Path], variant: str | None = None,
                   methods: Sequence[str] = SAVED_BY) -> dict:
    """Adds the comparison table of the sets found in `report_dirs` to `report`; returns summary rows
    ("<method>: <column>" -> value). Nothing is added when no directory holds a counterfactual set."""
    sets = counterfactual_sets(report_dirs, methods)
    if not sets:
        return {}
    header, rows = comparison_rows(sets, variant)
    report.add_table(rows, header, title=f"Counterfactual methods on the same {len(sets[0].images)} held-out images "
                                         "(validity as judged by the classifier each method explains)")
    return {f"{r[0]}: {h}": v for r in rows for h, v in zip(header[2:], r[2:]) if v != "-"}


__all__ = ["SAVED_BY", "CounterfactualSet", "comparison_rows", "counterfactual_sets", "add_comparison"]
