"""Z'-factor: how well a score separates two groups (Zhang, Chung & Oldenburg 1999).

Z' = 1 - 3 (sd_pos + sd_neg) / |mean_pos - mean_neg|

Seed 001 uses it to score a classifier's separation of two cell lines (Z' = 0.924): 1 is a perfect
assay, > 0.5 an excellent one, 0..0.5 a usable one, < 0 means the 3-sigma bands overlap. It is
-inf when the means coincide (no separation at all).

Standard deviations use ddof=1 (the sample standard deviation, the usual estimate from control
wells; it needs at least 2 values per group); pass ddof=0 for the population formula. Computed in
float64 with numpy: this is a summary statistic, not part of a compiled step.
"""

from __future__ import annotations

import numpy as np


def _group(values, name: str, ddof: int) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of scores, got shape {x.shape}")
    if x.size <= ddof:
        raise ValueError(f"{name} needs more than ddof={ddof} values, got {x.size}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has non-finite values")
    return x


def z_prime_factor(positive, negative, *, ddof: int = 1) -> float:
    """Z'-factor of the scores of the positive and negative groups (1-D arrays)."""
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof}")
    pos = _group(positive, "positive", ddof)
    neg = _group(negative, "negative", ddof)
    spread = 3.0 * (np.std(pos, ddof=ddof) + np.std(neg, ddof=ddof))
    gap = abs(np.mean(pos) - np.mean(neg))
    if gap == 0.0:
        return float("-inf") if spread > 0 else float("nan")
    return float(1.0 - spread / gap)


def z_prime_from_labels(scores, labels, positive_label=1, *, ddof: int = 1) -> float:
    """Z'-factor of `scores` [N] split by `labels` [N] into positive_label vs every other label
    (e.g. a classifier's probability of class 1 on a labelled test set)."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must be 1-D of the same length, got {scores.shape} and {labels.shape}")
    is_pos = labels == positive_label
    if is_pos.all() or not is_pos.any():
        raise ValueError(f"labels must contain both positive_label={positive_label!r} and other labels")
    return z_prime_factor(scores[is_pos], scores[~is_pos], ddof=ddof)


__all__ = ["z_prime_factor", "z_prime_from_labels"]
