"""The results page's reading of a low FF names the cause the run's own numbers point to."""

import pytest

from viscoin_jax.cli import results


def _data(between, rarer, causal=0.0, ff=0.01, found=1.0):
    em = {"G samples whose blob colour is in between the stains": between,
          "G samples f assigns to the rarer class": rarer,
          "G samples with a measurable blob": found,
          "top concepts whose removal changes a causal factor": causal}
    return {"stages": {"stylegan2": {"steps": 1200, "metrics": {}},
                       "viscoin": {"steps": 300, "metrics": {"faithfulness": {"0.1": ff}, "step": 300}}},
            "explain": {"viscoin": em}, "headline": {}}


@pytest.mark.parametrize("between, rarer, expected, absent", [
    (0.14, 0.31, "G is not the limit here", "neither stain"),  # G draws both stains
    (0.20, 0.30, "G is not the limit here", "neither stain"),  # both goals at their boundaries
    (0.21, 0.45, "mostly one colour", "G is not the limit"),  # too many in-between blobs
    (0.10, 0.29, "mostly one colour", "G is not the limit"),  # one class too rare
    (0.90, 0.05, "neither stain but in between in 0.900", "G is not the limit"),
])
def test_low_ff_reading_follows_what_g_draws(between, rarer, expected, absent):
    text = results.render(_data(between, rarer, causal=0.0625), "runs/demo")
    assert "**Reading.** FF is near zero" in text
    assert expected in text and absent not in text
    if expected.startswith("G is not"):
        assert f"in between in {between:.3f}" in text and f"rarer class in {rarer:.3f}" in text
        assert "changed the colour in 0.062 of them" in text and "after 300 VisCoIN steps" in text


def test_no_low_ff_reading_when_ff_is_high():
    assert "FF is near zero" not in results.render(_data(0.1, 0.4, ff=0.2), "runs/demo")


def test_headline_says_how_many_images_its_fractions_are_over():
    data = _data(0.1, 0.4, ff=0.2)
    data["headline"] = {"latent-direction counterfactuals: only causal factors change": 0.4375}
    data["explain"]["viscoin"].update({"explained images": 32, "FF images": 128})
    data["explain"]["classifier"] = {"explained images": 32}
    text = results.render(data, "runs/demo")
    assert "The explanations' key numbers, on 32 held-out images (FF on 128) (" in text
    data["explain"]["iresnet"] = {"explained images": 7}
    assert ", on 7 / 32 held-out images" in results.render(data, "runs/demo")
    for m in data["explain"].values():
        m.pop("explained images")
    assert "The explanations' key numbers (" in results.render(data, "runs/demo")
