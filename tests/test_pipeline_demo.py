"""The main job end to end: `viscoin-jax run --config configs/demo.py:quick` in a new process (a few
steps per stage), then `explain` and `results` from its checkpoints in new processes, and a second
`run` that skips every finished stage."""

import base64
import html as html_lib
import html.parser
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from viscoin_jax.cli import run as pipeline
from viscoin_jax.training.config import load_config

STAGES = ("classifier", "iresnet", "autoencoder", "stylegan2", "viscoin")


def _cli(*args, timeout=1500):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-m", "viscoin_jax.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    proc = _cli("run", "--config", "configs/demo.py:quick", "--workdir", str(workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


class _Images(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links = 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.images += tag == "img" and attrs.get("src", "").startswith("data:image/png;base64,")
        if tag == "a":
            self.links.append(attrs.get("href"))


def test_every_stage_leaves_a_checkpoint_and_the_reports_exist(demo):
    workdir, proc = demo
    summary = json.loads((workdir / "summary.json").read_text())
    for stage in STAGES:
        steps = [p for p in (workdir / stage / "checkpoints").iterdir() if p.name.isdigit()]
        assert steps and (workdir / stage / pipeline.DONE).is_file(), stage
        assert summary[stage]["stage"] == stage
    # the numbers in the summary are the stages' own evaluation files
    clf_eval = json.loads((workdir / "classifier" / "eval_metrics.json").read_text())
    assert summary["classifier"]["metrics"]["accuracy"] == clf_eval["accuracy"]
    assert summary["stylegan2"]["metrics"]["fid"] == json.loads((workdir / "stylegan2" / "fid.json").read_text())["fid"]
    index = _Images()
    index.feed((workdir / "report" / "index.html").read_text())
    assert {link for link in index.links if not link.startswith("#")} == {
        f"{s}/report.html" for s in ("classifier", "iresnet", "viscoin")}
    assert index.images >= 3  # a thumbnail of each report's key figures
    for stage in ("classifier", "iresnet", "viscoin"):
        page = _Images()
        page.feed((workdir / "report" / stage / "report.html").read_text())
        assert page.images > 0, stage
    metrics = summary["explain"]["viscoin"]["metrics"]
    assert 0.0 <= metrics["latent counterfactual validity"] <= 1.0 and "FF median (tau 0.1)" in metrics
    assert "progress" in proc.stderr or "steps/s" in proc.stderr  # progress is shown
    # one table of every counterfactual method on the same images, its L1 recomputed from the saved arrays
    comparison = summary["counterfactual_comparison"]
    methods = [row[0].split(" ")[0] for row in comparison["rows"]]
    assert methods == ["StyleGAN", "VisCoIN", "i-ResNet", "autoencoder"]
    with np.load(workdir / "report" / "classifier" / "autoencoder_counterfactual.npz") as saved:
        l1 = np.mean(np.abs(saved["counterfactuals"].astype(np.float64) - saved["images"]))
        assert comparison["rows"][3][comparison["header"].index("L1 to the input")] == pytest.approx(l1, rel=1e-5)
        assert comparison["rows"][3][comparison["header"].index("validity")] == pytest.approx(np.mean(saved["valid"]))
    # every quantity of the demo's headline table is there, read from the explanations' metrics
    assert set(summary["headline"]) == set(pipeline.HEADLINE)
    for name, (stage, key) in pipeline.HEADLINE.items():
        value = summary["explain"][stage]["metrics"][key]
        assert isinstance(value, float) and (value == summary["headline"][name] or value != value), name


def test_the_log_names_stages_estimates_the_run_and_announces_long_phases(demo):
    _, proc = demo
    err = proc.stderr
    n = len(STAGES) + 1  # the explanations are the last stage
    for k, stage in enumerate(STAGES, 1):
        assert f"stage {k}/{n} {stage}: training 4 steps in " in err, stage
        assert re.search(rf"stage {k}/{n} {stage}: step 4/4: [0-9.e+]+ steps/s, \S+ left in this stage; run: ", err), stage
        assert f"stage {k}/{n} {stage}: done in " in err, stage
    assert f"stage 1/{n} classifier: training 4 steps in" in err and "run: ETA after the first stage + explain" in err
    assert re.search(rf"stage 2/{n} iresnet: training 4 steps in \S+; run: about \S+ left \+ explain", err)
    assert f"stage {n}/{n} explain: done in " in err
    # long phases: announced before, timed after
    for phase in ("compiling the train step", "FID of G_ema on 64 samples", "final evaluation on the",
                  "projecting 4 images into W+ (5 steps)"):
        assert re.search(re.escape(phase) + r"[^\n]* \.\.\.\n", err), phase
        # "4.2s" under a minute, "1m05s" over one (a loaded machine gets there)
        assert re.search(re.escape(phase) + r"[^\n]* took ([0-9.]+s|([0-9]+h)?[0-9]+m[0-9]{2}s)", err), phase
    assert "hparams" not in err  # at DEBUG; each stage's config.txt holds them
    # each warning once (Orbax's read-only notes, the FID and perceptual fallbacks, ...)
    warned = re.findall(r"^\S+ \S+ WARNING \S+: (?:\S+:\d+: \w+: )?(.*)$", err, re.MULTILINE)
    assert warned and len(warned) == len(set(warned)), warned


def test_explain_and_results_from_the_checkpoints_in_new_processes(demo, tmp_path):
    workdir, _ = demo
    out = tmp_path / "explain"
    proc = _cli("explain", "--checkpoint", str(workdir / "viscoin"), "--images", "synthetic/blob_binary:test:2",
                "--methods", "concepts", "gradient", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "concepts.npz").is_file() and (out / "gradient.npz").is_file()
    proc = _cli("results", "--workdir", str(workdir), "--out", str(tmp_path / "results.md"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "results.md").read_text()
    summary = json.loads((workdir / "summary.json").read_text())
    assert f"{summary['classifier']['metrics']['accuracy']:.3f}" in text
    assert f"{summary['stylegan2']['metrics']['fid']:.3f}" in text
    drawn = summary["explain"]["viscoin"]["metrics"]  # what G draws, from explain's random samples
    assert f"class 0 {drawn['G samples f assigns to class 0']:.3f}, class 1 {drawn['G samples f assigns to class 1']:.3f}" in text
    assert "## Comparison with the paper" in text
    assert "## Headline" in text and "random attribution deletion AUC" in text
    assert all(summary["explain"][s]["metrics"]["explained images"] == 4 for s in ("classifier", "iresnet", "viscoin"))
    assert f"on 4 held-out images (FF on {drawn['FF images']})" in text


def test_a_second_run_skips_finished_stages(demo, caplog):
    workdir, _ = demo
    config = load_config("configs/demo.py:quick", [])
    with config.unlocked():
        config.explain.enabled = False
    caplog.set_level("INFO", logger="viscoin_jax.run")
    pipeline.run_pipeline(config, workdir)
    skipped = [r.getMessage() for r in caplog.records if "complete, skipped" in r.getMessage()]
    assert len(skipped) == len(STAGES)


def test_index_leads_with_the_headline_numbers_readings_and_thumbnails(tmp_path):
    """write_index on made-up stage reports: HEADLINE's numbers with their direction, the notes, one
    thumbnail per key image (pixels as saved) linking to its stage's report, the full metrics below."""
    rng = np.random.default_rng(0)
    reports, keys = {}, {}
    for stage, metrics in (("classifier", {"best attribution deletion AUC": 0.31, "random attribution deletion AUC": 0.9,
                                           "accuracy on these images": 0.75}),
                           ("viscoin", {"FF median (tau 0.1)": 0.12, "unlisted number": 3.0})):
        folder = tmp_path / "report" / stage
        (folder / "key_images").mkdir(parents=True)
        keys[stage] = rng.integers(0, 256, (12, 30, 3), dtype=np.uint8)
        Image.fromarray(keys[stage]).save(folder / "key_images" / "maps.png")
        reports[stage] = {"report": str(folder / "report.html"), "metrics": metrics}
    path = pipeline.write_index(tmp_path / "report", reports, notes=["FF is near zero: G's \"colours\" < stains."])
    text = path.read_text()
    page = _Images()
    page.feed(text)
    assert page.images == 2 and {"classifier/report.html", "viscoin/report.html"} <= set(page.links)
    assert "FF is near zero: G's \"colours\" < stains." in html_lib.unescape(text)
    assert "VisCoIN FF median, tau 0.1" in text and "best attribution deletion AUC" in text
    row = text[text.index("best attribution deletion AUC"):]
    assert row.index("lower is better") < row.index("</tr>")  # its direction, in its own row
    assert "unlisted number" in text  # in the full metrics table
    srcs = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    decoded = [np.asarray(Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB")) for s in srcs]
    assert any(np.array_equal(d, keys["classifier"]) for d in decoded)
    assert any(np.array_equal(d, keys["viscoin"]) for d in decoded)
