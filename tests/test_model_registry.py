"""The classifier registry: every entry builds from its config and keeps the protocol the rest of the
project relies on (logits [N, C], the named feature maps it declares, the inverse it claims, a layer
order that covers its parameters)."""

import jax
import numpy as np
import pytest
from flax import nnx

from viscoin_jax.metrics.attribution_metrics import param_groups
from viscoin_jax.models import registry
from viscoin_jax.training.config import load_config


@pytest.mark.parametrize("variant", ["resnet", "iresnet"])
def test_each_classifier_keeps_the_protocol(variant):
    model_cfg = load_config(f"classifier_synthetic:{variant}").model
    spec = registry.classifier_spec(model_cfg.name)
    model = registry.build_classifier(model_cfg, nnx.Rngs(0))
    x = np.random.default_rng(3).uniform(-1, 1, size=(3, 32, 32, 3)).astype(np.float32)
    out = model(x, train=False)
    logits, feats = out if isinstance(out, tuple) else (out, {})
    assert logits.shape == (3, int(model_cfg.num_classes)) and np.all(np.isfinite(np.asarray(logits)))
    assert set(spec.feature_maps) <= set(feats) and all(feats[k].shape[0] == 3 for k in spec.feature_maps)
    if spec.invertible:  # the head on z = forward(x) gives the logits; inverse maps z back to an image
        z = model.forward(x)   # (how exactly it inverts is tests/test_iresnet.py's subject)
        np.testing.assert_allclose(np.asarray(model.head(z)), np.asarray(logits), rtol=1e-4, atol=1e-4)
        x_back, info = model.inverse(z)
        assert x_back.shape == x.shape and "converged" in info
    params = nnx.state(model, nnx.Param)
    groups = param_groups(jax.tree.map(np.asarray, nnx.to_pure_dict(params)))
    layers = registry.layer_order(model_cfg.name, groups)
    # every parameter group lies in exactly one listed layer, and the list has no repeats
    assert len(layers) == len(set(layers)) >= 3
    for g in groups:
        assert sum(g == layer or g.startswith(layer + "/") for layer in layers) == 1, g


def test_unknown_classifier_fails_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown classifier config.model.name 'vit'; known: \('resnet', 'iresnet'\)"):
        registry.build_classifier({"name": "vit"}, nnx.Rngs(0))
