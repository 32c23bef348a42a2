"""`viscoin-jax results`: the numbers of a pipeline run as a Markdown page (docs/results.md).

    viscoin-jax run --config configs/demo.py --workdir runs/demo
    viscoin-jax results --workdir runs/demo --out docs/results.md

Reads what the pipeline wrote (summary.json, each stage's evaluation files, metrics.jsonl, the
explanation reports' metrics.json) and nothing else, so anyone can re-run the demo and regenerate
the page. The VisCoIN paper's CUB-200 numbers are shown beside the demo's where the quantity is the
same; the data, resolution and model sizes are not, which the page says.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

from ..training.monitor import read_scalars

# Parekh et al. (ICLR 2025), VisCoIN on CUB-200 at 256 px (DESIGN.md section 2)
PAPER_CUB = {"g accuracy": 0.7944, "f accuracy": 0.8056, "FF 0.1": 0.251, "FF 0.2": 0.146, "FF 0.4": 0.044,
             "CC mean": 0.850, "CC std": 0.084, "reconstruction MSE": 0.161, "G FID": 9.4}


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def collect(workdir: str | Path) -> dict[str, Any]:
    """Everything the page shows, as plain data (also usable from a notebook)."""
    w = Path(workdir)
    summary = _load(w / "summary.json")
    if not summary:
        raise FileNotFoundError(f"{w / 'summary.json'} does not exist: run `viscoin-jax run` on {w} first")
    out: dict[str, Any] = {"stages": {}, "explain": {}}
    for stage in ("classifier", "iresnet", "autoencoder", "stylegan2", "viscoin"):
        if stage in summary:
            config = _load(w / stage / "config.json")
            out["stages"][stage] = {"seconds": summary[stage].get("seconds"), "metrics": summary[stage].get("metrics", {}),
                                    "steps": config.get("train", {}).get("num_steps")}
    if (w / "stylegan2" / "metrics.jsonl").is_file():
        out["fid_trend"] = read_scalars(w / "stylegan2").get("eval/fid", [])
        grids = sorted((w / "stylegan2" / "images").glob("*.png"))
        out["sample_grid"] = str(grids[-1].relative_to(w)) if grids else None
    for stage, item in summary.get("explain", {}).items():
        out["explain"][stage] = item.get("metrics", {})
    out["headline"] = summary.get("headline", {})
    out["counterfactual_comparison"] = summary.get("counterfactual_comparison")
    return out


def _explained_text(data: dict[str, Any]) -> str:
    """", on N held-out images (FF on M)": how many images the fractions are over, where the run says."""
    counts = sorted({int(m["explained images"]) for m in data["explain"].values() if "explained images" in m})
    if not counts:
        return ""
    text = f", on {' / '.join(map(str, counts))} held-out images"
    ff = data["explain"].get("viscoin", {}).get("FF images")
    return text + (f" (FF on {int(ff)})" if ff else "")


def _what_g_draws(em: dict[str, Any]) -> str:
    """One sentence on G's random samples as f and the blob measurement read them (explain's metrics)."""
    classes = sorted(k for k in em if k.startswith("G samples f assigns to class "))
    if not classes:
        return ""
    text = ("What G draws (random samples, read by f): " +
            ", ".join(f"class {k.rsplit(' ', 1)[1]} {_fmt(em[k])}" for k in classes))
    if "G samples with a measurable blob" in em:
        text += f"; a blob is measurable in {_fmt(em['G samples with a measurable blob'])}"
    if "G samples whose blob colour is in between the stains" in em:
        text += (f", and its colour is in between the two stains (neither pink nor purple) in "
                 f"{_fmt(em['G samples whose blob colour is in between the stains'])} of those")
    return text + "."


def readings(data: dict[str, Any]) -> list[str]:
    """The "Reading" paragraphs: what the run's numbers say about the run (why FF is low, what G draws,
    what the counterfactuals change), as plain text; results.md and the report index show them."""
    st, ex = data["stages"], data["explain"]
    sg2, vm, em = st.get("stylegan2", {}), st.get("viscoin", {}).get("metrics", {}), ex.get("viscoin", {})
    notes: list[str] = []
    found = em.get("reconstructions with a measurable blob")
    if found is not None and found < 0.5:
        notes += ["In this run G rarely draws a measurable blob (see the sample grid), so VisCoIN's "
                  "reconstructions, which go through G, do not carry the stain colour: concept removal cannot "
                  "change it, and FF stays near zero. The classifier side (f, g's fidelity, the i-ResNet) does "
                  f"not depend on G. This run trained G for {sg2.get('steps')} steps; the VisCoIN numbers should be "
                  "read from a pipeline whose G draws blobs (train the StyleGAN2 stage longer)."]
    ff_low = vm.get("faithfulness", {}).get("0.1", 1.0) < 0.05
    if ff_low and not (found is not None and found < 0.5):
        between = em.get("G samples whose blob colour is in between the stains")
        rarer = em.get("G samples f assigns to the rarer class")
        causal = em.get("top concepts whose removal changes a causal factor")
        if between is not None and between <= 0.2 and rarer is not None and rarer >= 0.3:
            why = (f"G is not the limit here: it draws both stains (in between in {_fmt(between)} of its samples, "
                   f"the rarer class in {_fmt(rarer)}), yet removing each image's most relevant concept changed "
                   f"the colour in {_fmt(causal)} of them: the translator also reads the colour from the other "
                   "concepts, so taking one away leaves it (the concepts are not yet disentangled after "
                   f"{vm.get('step')} VisCoIN steps).")
        elif between is not None and between > 0.5:
            why = (f"G draws a blob whose colour is neither stain but in between in {_fmt(between)} of its random "
                   "samples (never so in the training images): it has learnt where and how large blobs are, not "
                   "yet the two stain colours, so no edit of its latents can show the colour change "
                   "(docs/performance.md: \"When does the tiny G learn the two stain colours?\").")
        else:
            why = "Look at the sample grid: a G that draws blobs of mostly one colour cannot show the colour change."
        notes += ["FF is near zero: removing concepts barely moves f's prediction on the "
                  "reconstructions, so the class evidence (the stain colour) does not pass through the concepts "
                  f"into G's images. g's fidelity does not need G; FF does. {why} This run trained G for "
                  f"{sg2.get('steps')} steps."]
    top_only = em.get("top concepts changing only causal factors")
    if not ff_low and top_only is not None and top_only < 0.5:
        notes += [f"FF is {_fmt(vm.get('faithfulness', {}).get('0.1'))} at tau 0.1: removing the relevant "
                  "concepts moves f's prediction on the reconstructions, so the stain colour passes through the "
                  "concepts into G's images. Removing only the top concept changed the colour in "
                  f"{_fmt(em.get('top concepts whose removal changes a causal factor'))} of the images, left it "
                  f"between the stains in {_fmt(em.get('top concepts removed: colour ambiguous'))} and changed a "
                  f"nuisance factor in {_fmt(em.get('top concepts whose removal changes a nuisance factor'))}: a "
                  "concept is a 3 x 3 map of where its stain is and how much of it, so zeroing the one concept that "
                  "carries a class draws nearly the same small, centred blob whatever the input. That blob has one "
                  "colour (or one in between), so on a 2-class task removal can flip at most one class "
                  "(docs/performance.md, \"What the demo's explanations are limited by\")."]
    latent_only = em.get("latent counterfactuals changing only causal factors")
    if latent_only is not None and latent_only < 0.5:
        notes += ["The latent counterfactuals reach f's confidence, yet change only the colour in "
                  f"{_fmt(latent_only)} of the images: f is sure of the new class while the blob's colour is still "
                  f"between the stains in {_fmt(em.get('latent counterfactuals: colour ambiguous'))} of them (its "
                  "boundary lies in a colour range no training image shows), and the direction, fitted on G's samples, "
                  f"also moves a nuisance factor (mostly the blob's size) in "
                  f"{_fmt(em.get('latent counterfactuals changing a nuisance factor'))}: this G ties size to colour "
                  "(it decides both in the same W+ vectors: docs/performance.md, \"What the demo's explanations are "
                  "limited by\")."]
    return notes


def render(data: dict[str, Any], workdir: str) -> str:
    st, ex = data["stages"], data["explain"]
    clf, ires, sg2, vis = (st.get(k, {}) for k in ("classifier", "iresnet", "stylegan2", "viscoin"))
    vm, em, im, cm = vis.get("metrics", {}), ex.get("viscoin", {}), ex.get("iresnet", {}), ex.get("classifier", {})
    parts = [
        "# Results of the demo pipeline",
        "",
        f"Generated by `viscoin-jax results --workdir {workdir}` from a run of "
        f"`viscoin-jax run --config configs/demo.py --workdir {workdir}` "
        f"(host: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}). "
        "Data: the embedded synthetic `blob_binary` set at 32 px (class = stain colour, pink or purple; "
        "shape, size, position, brightness, texture and stain jitter are nuisance factors).",
        "",
        *(["## Headline", "",
           "The explanations' key numbers" + _explained_text(data) + " (the counterfactual and top-concept "
           "fractions count blob-removed, colour-ambiguous and blob-less cases as outcomes of their own, never as "
           "changes; the attribution AUCs fill deleted pixels with each image's background, and the random row "
           "is the chance level).",
           "", _table(["quantity", "value"], [[k, v] for k, v in data["headline"].items()]), ""]
          if data.get("headline") else []),
        "## Stages",
        "",
        _table(["stage", "steps", "wall time (s)"], [[k, v.get("steps"), v.get("seconds")] for k, v in st.items()]),
        "",
        "## Classifiers (test split)",
        "",
        _table(["model", "accuracy", "Z'-factor of the score"],
               [[name, s.get("metrics", {}).get("accuracy"), s.get("metrics", {}).get("z_prime")]
                for name, s in (("ResNet (f)", clf), ("i-ResNet", ires)) if s]),
        "",
    ]
    if sg2:
        m = sg2.get("metrics", {})
        parts += ["## StyleGAN2", "",
                  f"Final FID of G_ema: **{_fmt(m.get('fid'))}** ({m.get('n_fake')} generated vs {m.get('n_real')} "
                  f"training images, features: `{m.get('extractor')}`, comparable with published FIDs: "
                  f"{m.get('comparable_with_published')}).", ""]
        if data.get("fid_trend"):
            parts += [_table(["step", "FID"], [[s, v] for s, v in data["fid_trend"]]), ""]
        if data.get("sample_grid"):
            grid = data.get("sample_grid_copy") or f"{workdir}/{data['sample_grid']}"
            parts += [f"Last sample grid (fixed latents): ![G_ema samples]({grid})", ""]
        drawn = _what_g_draws(ex.get("viscoin", {}))
        if drawn:
            parts += [drawn, ""]
    if vis:
        ff = vm.get("faithfulness", {})
        parts += ["## VisCoIN", "",
                  _table(["quantity", "demo", "paper (CUB-200, 256 px)"], [
                      ["g accuracy", vm.get("accuracy"), PAPER_CUB["g accuracy"]],
                      ["f accuracy (same images)", vm.get("classifier_accuracy"), PAPER_CUB["f accuracy"]],
                      ["g fidelity to f", vm.get("fidelity"), None],
                      ["reconstruction MSE", vm.get("mse"), PAPER_CUB["reconstruction MSE"]],
                      [f"perceptual distance ({vm.get('perceptual_name')})", vm.get("perceptual"), None],
                      ["FF median, tau 0.1", ff.get("0.1"), PAPER_CUB["FF 0.1"]],
                      ["FF median, tau 0.2", ff.get("0.2"), PAPER_CUB["FF 0.2"]],
                      ["FF median, tau 0.4", ff.get("0.4"), PAPER_CUB["FF 0.4"]],
                      ["CC mean (held-out pairs)", em.get("CC mean"), PAPER_CUB["CC mean"]],
                      ["CC std", em.get("CC std"), PAPER_CUB["CC std"]],
                  ]), "",
                  "Top concepts: removing each held-out image's most relevant concept (lambda 1 -> 0) changed "
                  f"a causal factor in {_fmt(em.get('top concepts whose removal changes a causal factor'))} of "
                  f"the images, a nuisance factor in {_fmt(em.get('top concepts whose removal changes a nuisance factor'))}, "
                  f"and only causal factors in {_fmt(em.get('top concepts changing only causal factors'))}; "
                  f"the removal erased the blob in {_fmt(em.get('top concepts removed: blob removed'))}, left a "
                  f"colour in between the stains in {_fmt(em.get('top concepts removed: colour ambiguous'))} and "
                  f"had no blob to start from in {_fmt(em.get('top concepts removed: no blob in the input'))} "
                  "(outcomes of their own, not changes). CC is tested on held-out images, with pairs only "
                  "where the concept is active.", ""]
    parts += ["## Counterfactuals (held-out images)", "",
              _table(["method", "validity", "L1 to input / projection", "changed a causal factor",
                      "changed a nuisance factor", "causal only", "blob removed", "colour ambiguous"], [
                  [f"i-ResNet (class means, aimed at p >= {_fmt(im.get('i-ResNet counterfactual target confidence'))}"
                   ", validity re-encoded)",
                   im.get("i-ResNet counterfactual validity"),
                   im.get("i-ResNet counterfactual L1"), im.get("i-ResNet counterfactuals changing a causal factor"),
                   im.get("i-ResNet counterfactuals changing a nuisance factor"),
                   im.get("i-ResNet counterfactuals changing only causal factors"),
                   im.get("i-ResNet counterfactuals: blob removed"),
                   im.get("i-ResNet counterfactuals: colour ambiguous")],
                  ["StyleGAN latent direction (VisCoIN's G and f)", em.get("latent counterfactual validity"),
                   em.get("latent counterfactual L1 to the projection"),
                   em.get("latent counterfactuals changing a causal factor"),
                   em.get("latent counterfactuals changing a nuisance factor"),
                   em.get("latent counterfactuals changing only causal factors"),
                   em.get("latent counterfactuals: blob removed"), em.get("latent counterfactuals: colour ambiguous")],
              ]), ""]
    if data.get("counterfactual_comparison"):
        comparison = data["counterfactual_comparison"]
        parts += ["## Every counterfactual method on the same held-out images", "",
                  "The same numbers computed the same way for each method (`explain.counterfactual_comparison`): "
                  "validity as judged by the classifier the method explains, mean L1 to the input and to the "
                  "method's own rendering of it (W+ projection, lambda-1 drawing, autoencoder reconstruction), and "
                  "the factors changed, measured on the pixels against the input.", "",
                  _table(comparison["header"], comparison["rows"]), ""]
    parts += [p for note in readings(data) for p in (f"**Reading.** {note}", "")]
    if em.get("projections with a measurable blob") is not None:
        parts += [f"A blob was measurable in {_fmt(em['projections with a measurable blob'])} of the W+ projections "
                  "the latent counterfactuals start from.", ""]
    if cm:
        parts += ["## Attributions of f (held-out images)", "",
                  _table(["metric", "value"], [[k, v] for k, v in cm.items()]), ""]
    parts += [
        "## Comparison with the paper",
        "",
        "Not comparable in absolute terms: the paper trains ResNet50 / StyleGAN2 (512-d W, 14 W+ vectors) / "
        "VisCoIN (K = 256) on CUB-200 at 256 px for 100k iterations; the demo trains narrow networks on 32 px "
        "synthetic images for a few hundred steps on a CPU, with K = 8 concepts and 2 classes. FID here uses a "
        "randomly initialised Inception (no standard weights are downloaded), so it is only a trend within this run. "
        "The perceptual term is LPIPS in the paper and the labelled fallback on f's features here unless LPIPS "
        "weights are supplied. What is comparable is the direction: g should track f (fidelity near 1), FF should "
        "be positive and fall as tau grows, and on this data counterfactuals and top concepts should change the "
        "stain colour (the causal factor) more often than the nuisance factors.",
        "",
    ]
    return "\n".join(parts)


def main(args: argparse.Namespace) -> int:
    try:
        data = collect(args.workdir)
    except FileNotFoundError as e:
        print(f"viscoin-jax results: error: {e}", file=sys.stderr)
        return 2
    if args.out and data.get("sample_grid"):  # keep the sample grid beside the page
        copy = Path(args.out).with_name(Path(args.out).stem + "_samples.png")
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(args.workdir) / data["sample_grid"], copy)
        data["sample_grid_copy"] = copy.name
    text = render(data, args.workdir)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("results", help="write a pipeline run's numbers as Markdown (docs/results.md)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="the workdir of a `viscoin-jax run`")
    p.add_argument("--out", default=None, help="Markdown file to write (default: print)")
    p.set_defaults(func=main)
