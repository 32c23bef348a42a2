"""Per-class "only causal factors changed" rows, on rendered scenes whose edits are known by construction."""

import numpy as np
import pytest

from viscoin_jax.data import synthetic as S
from viscoin_jax.explain.factor_changes import measured_changes, only_causal_by_class
from viscoin_jax.explain.report import Report


def test_only_causal_by_class_against_the_edits_made():
    rng = np.random.default_rng()
    n = int(rng.integers(17, 40))
    f = S.stack_factors([S.sample_factors(int(rng.integers(1 << 30)), i, "test") for i in range(n)])
    edit = rng.integers(0, 3, n)  # 0: nothing, 1: flip the colour only, 2: flip it and grow the blob by 0.05
    after = dict(f)
    after["colour"] = np.where(edit > 0, 1 - f["colour"], f["colour"]).astype(np.int32)
    after["size"] = np.where(edit == 2, f["size"] + 0.05, f["size"]).astype(np.float32)
    before_img, after_img = (S.render(x, 32).astype(np.float32) / 127.5 - 1 for x in (f, after))
    classes = f["colour"]
    _, changes = measured_changes(before_img, after_img, "blob_binary", Report("t"), "edits")
    rows = only_causal_by_class(changes, classes, S.COLOUR_NAMES, "edits changing only causal factors")
    expected = {f"edits changing only causal factors, {S.COLOUR_NAMES[c]} images": float(np.mean(edit[classes == c] == 1))
                for c in np.unique(classes)}
    assert rows.keys() == expected.keys()
    for k in rows:
        assert rows[k] == pytest.approx(expected[k]), k
    # weighted by the class counts, the rows give the overall share
    counts = {c: int(np.sum(classes == c)) for c in np.unique(classes)}
    overall = sum(rows[f"edits changing only causal factors, {S.COLOUR_NAMES[c]} images"] * k for c, k in counts.items()) / n
    assert overall == pytest.approx(changes.causal_only)
    with pytest.raises(ValueError, match="classes must be"):
        only_causal_by_class(changes, classes[:-1], S.COLOUR_NAMES, "x")
    # unnamed classes fall back to "class c"
    assert all(k.startswith("x, class ") for k in only_causal_by_class(changes, classes, None, "x"))
