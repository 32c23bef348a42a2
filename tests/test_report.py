"""HTML report: parse the written page back, decode every embedded PNG, check sizes, pixels, escaping."""

import base64
import io
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from viscoin_jax.explain.report import Report, difference_maps, heatmap_overlay, map_limits, save_arrays, to_uint8

from browser import BROKEN_IMAGES, IMAGES_LOADED, Browser, chromium


class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.captions, self.cells, self.headings, self.paragraphs = [], [], [], [], []
        self.ids, self.hrefs, self.polylines = set(), [], []
        self._tag = None
        self.title = None

    def handle_starttag(self, tag, attrs):
        self._tag = tag
        a = dict(attrs)
        if tag == "img" and a.get("src"):  # a slider's view has no src until its script runs
            self.imgs.append(a)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a":
            self.hrefs.append(a["href"])
        if tag == "polyline":
            self.polylines.append(a)
        if tag == "rect":
            self.rect = a

    def handle_endtag(self, tag):
        self._tag = None

    def handle_data(self, data):
        target = {"figcaption": self.captions, "td": self.cells, "th": self.cells, "h2": self.headings,
                  "p": self.paragraphs}.get(self._tag)
        if target is not None:
            target.append(data)
        if self._tag == "title":
            self.title = data


def decode(img_attrs):
    src = img_attrs["src"]
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(src[len(prefix):])))


def parse(path):
    p = PageParser()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_report_roundtrip(tmp_path):
    r = np.random.default_rng(0)
    known = r.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    floats = r.uniform(-1, 1, (3, 6, 4, 3)).astype(np.float32)
    grey = r.integers(0, 256, (1, 3, 3), dtype=np.uint8)
    maps = r.normal(size=(3, 6, 4))
    rep = Report("Explain <model> & co")
    rep.add_section("Intro <b>", "first para with <script>alert(1)</script>\n\nsecond & last")
    rep.add_image_grid("uint8 grid", known, captions=["a<1>", "b\"q\""], cols=2)
    rep.add_image_grid("float grid", floats, cols=3)
    rep.add_series("series", grey, captions=["p=0.93"])
    rep.add_heatmaps(floats, maps, captions=["x", "y", "z"], title="heat", alpha=0.4)
    rep.add_table([["r1", 1.23456789, 3], ["<td>", np.float32(2.5), True]], header=["name", "v", "w"])
    rep.add_metrics({"auc<": 0.5, "vec": np.array([1, 2, 3]), "big": np.ones((4, 4))})
    assert rep.num_images == 2 + 3 + 1 + 2 * 3  # heat maps come with their originals
    path = rep.write(tmp_path / "out")
    assert path == tmp_path / "out" / "report.html"
    page = parse(path)

    # one <img> per image added, each a PNG of the expected size
    assert len(page.imgs) == rep.num_images
    pngs = [decode(a) for a in page.imgs]
    assert all(im.format == "PNG" for im in pngs)
    assert [im.size for im in pngs] == [(7, 5)] * 2 + [(4, 6)] * 3 + [(3, 3)] + [(4, 6)] * 6
    # exact pixel round trips
    np.testing.assert_array_equal(np.asarray(pngs[0]), known[0])
    np.testing.assert_array_equal(np.asarray(pngs[1]), known[1])
    np.testing.assert_array_equal(np.asarray(pngs[2]), np.round((floats[0] + 1) * 127.5).astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(pngs[5]), grey[0])
    np.testing.assert_array_equal(np.asarray(pngs[6]), np.asarray(pngs[2]))  # the original beside its map
    # one colour scale for all three maps (viridis between the maps' min and max), blended at alpha 0.4
    unit = (maps - maps.min()) / (maps.max() - maps.min())
    ref = 0.6 * np.round((floats + 1) * 127.5) + 0.4 * matplotlib.colormaps["viridis"](unit)[..., :3] * 255
    for i in range(3):
        np.testing.assert_allclose(np.asarray(pngs[7 + 2 * i]), np.round(ref[i]), atol=1)

    # text is escaped: the parser gets the literal strings back, no tag was injected
    assert page.title == "Explain <model> & co"
    assert "Intro <b>" in page.headings
    assert page.paragraphs == ["first para with <script>alert(1)</script>", "second & last"]
    assert page.captions == ["a<1>", 'b"q"', "p=0.93", "x", "y", "z"]
    assert page.imgs[1]["alt"] == 'b"q"'
    html = path.read_text(encoding="utf-8")
    assert html.count("<script>") == 1 and "&lt;script&gt;alert(1)" in html  # only the report's own script
    assert ["r1", "1.235", "3", "<td>", "2.5", "True"] == page.cells[3:9]
    assert "auc<" in page.cells and "[1, 2, 3]" in page.cells and "array(4, 4) mean=1" in page.cells
    # self-contained: nothing is fetched from elsewhere
    assert "http://" not in html and "https://" not in html
    assert rep._repr_html_() == html


def test_heatmap_overlay_values():
    img = np.zeros((1, 2, 3, 3), np.uint8)
    m = np.array([[[0.0, 1.0, 2.0], [3.0, 4.0, 4.0]]])
    out = heatmap_overlay(img, m, cmap="viridis", alpha=1.0)
    ref = np.round(matplotlib.colormaps["viridis"](m[0] / 4.0)[..., :3] * 255).astype(np.uint8)
    np.testing.assert_array_equal(out[0], ref)
    signed = heatmap_overlay(img, np.array([[[-2.0, 0.0, 1.0], [2.0, 0.0, 0.0]]]), cmap="bwr", alpha=1.0, signed=True)
    np.testing.assert_array_equal(signed[0, 0, 1], np.round(np.array(matplotlib.colormaps["bwr"](0.5)[:3]) * 255))
    np.testing.assert_array_equal(signed[0, 0, 0], np.round(np.array(matplotlib.colormaps["bwr"](0.0)[:3]) * 255))
    half = heatmap_overlay(np.full((1, 2, 3, 3), 200, np.uint8), m, cmap="gray", alpha=0.5)
    np.testing.assert_array_equal(half[0, 0, 0], [100, 100, 100])  # 0.5 * 200 + 0.5 * black
    with pytest.raises(ValueError, match="colormap"):
        heatmap_overlay(img, m, cmap="nope")
    with pytest.raises(ValueError, match="maps must be"):
        heatmap_overlay(img, m[:, :1])


def test_to_uint8_and_bad_input(tmp_path):
    np.testing.assert_array_equal(to_uint8(np.array([[[-1.0, 0.0], [1.0, 3.0]]])), [[[0, 128], [255, 255]]])
    with pytest.raises(ValueError, match="must be \\[N, H, W, 3\\]"):
        to_uint8(np.zeros((2, 4, 4, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        to_uint8(np.full((1, 2, 2, 3), np.nan))
    with pytest.raises(ValueError, match="uint8 or float"):
        to_uint8(np.zeros((1, 2, 2, 3), np.int64))
    rep = Report("x")
    with pytest.raises(ValueError, match="captions"):
        rep.add_image_grid("g", np.zeros((2, 2, 2, 3), np.uint8), captions=["only one"])
    with pytest.raises(ValueError, match="cols"):
        rep.add_image_grid("g", np.zeros((2, 2, 2, 3), np.uint8), cols=0)
    with pytest.raises(ValueError, match="row 1 has 1 cells"):
        rep.add_table([[1, 2], [3]], header=["a", "b"])
    with pytest.raises(ValueError, match="mapping"):
        rep.add_metrics([("a", 1)])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        rep.write(tmp_path / "file")
    assert rep.num_images == 0


def test_save_arrays_roundtrip(tmp_path):
    import jax.numpy as jnp

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = save_arrays(tmp_path / "arr", "maps", maps=jnp.asarray(a), labels=np.array([1, 2, 3]))
    assert path == tmp_path / "arr" / "maps.npz"
    with np.load(path) as z:
        np.testing.assert_array_equal(z["maps"], a)
        np.testing.assert_array_equal(z["labels"], [1, 2, 3])
    with pytest.raises(ValueError, match="plain file name"):
        save_arrays(tmp_path, "../escape", x=a)
    with pytest.raises(ValueError, match="no arrays"):
        save_arrays(tmp_path, "empty")


def _interactive_report(tmp_path):
    """A report with each interactive view: attribution maps of two methods (one signed), a series with
    a slider, a concept-style grid, counterfactuals and curves; fresh random inputs."""
    r = np.random.default_rng(3)
    images = r.uniform(-1, 1, (3, 9, 7, 3)).astype(np.float32)
    grad, ig = np.abs(r.normal(size=(3, 9, 7))), r.normal(size=(3, 9, 7))
    rep = Report("interactive")
    rep.set_summary("three random images", [{"name": "deletion AUC", "value": 0.25, "direction": "lower is better",
                                             "meaning": "p after removing the top pixels"}],
                    links=[("maps", "#b0")], thumbnails=[("maps", r.integers(0, 256, (9, 14, 3), dtype=np.uint8), "#b0")])
    rep.add_attribution_maps(images, {"gradient": grad, "integrated_gradients": ig}, ["cat (p 0.9)", "dog", "cat"],
                             signed=["integrated_gradients"])
    series = r.uniform(-1, 1, (5, 9, 7, 3)).astype(np.float32)
    rep.add_series("Path", series, [f"t={t}" for t in range(5)], slider="t")
    rep.add_frame_rows("Concepts", [{"label": "concept 3", "lead": (images[:2], ["input", "reconstruction"]),
                                     "frames": (series[:4], [f"lambda {v}" for v in (0, 1, 2, 4)])}], slider="lambda")
    rep.add_counterfactuals("Counterfactuals", images, images[::-1], ["-> dog p 0.97"] * 3)
    fractions = np.linspace(0, 1, 5)
    rep.add_curves("Curves", fractions, {"deletion": {"gradient": [1, .5, .3, .2, .1], "random": [1, .9, .8, .7, .6]}},
                   baseline="random")
    return rep, rep.write(tmp_path), dict(images=images, grad=grad, ig=ig, series=series, fractions=fractions)


def test_maps_colour_bars_counterfactuals_curves_and_contents(tmp_path):
    """Each method's maps share one scale (its colour bar's ends), IG sits on a diverging map with 0 at
    white; the difference map is |x' - x| on magma; the curve's SVG points are the values; the
    contents list links to every titled block."""
    rep, path, d = _interactive_report(tmp_path)
    page = parse(path)
    html = path.read_text()
    pngs = [np.asarray(decode(a).convert("RGB")).astype(np.float64) for a in page.imgs]
    # summary thumbnail, then per image: original, gradient, integrated_gradients
    x = np.round((d["images"] + 1) * 127.5)
    for i in range(3):
        np.testing.assert_array_equal(pngs[1 + 3 * i], x[i])
        g_unit = (d["grad"][i] - d["grad"].min()) / (d["grad"].max() - d["grad"].min())
        ref = 0.4 * x[i] + 0.6 * matplotlib.colormaps["viridis"](g_unit)[..., :3] * 255
        np.testing.assert_allclose(pngs[2 + 3 * i], np.round(ref), atol=1)
        top = np.abs(d["ig"]).max()
        ref = 0.4 * x[i] + 0.6 * matplotlib.colormaps["RdBu_r"](0.5 + 0.5 * d["ig"][i] / top)[..., :3] * 255
        np.testing.assert_allclose(pngs[3 + 3 * i], np.round(ref), atol=1)
    assert map_limits(d["ig"], signed=True) == (-np.abs(d["ig"]).max(), np.abs(d["ig"]).max())
    assert f">{d['grad'].min():.3g}<" in html and f">{d['grad'].max():.3g}<" in html  # colour bar ends
    assert f">{-np.abs(d['ig']).max():.3g}<" in html and f">{np.abs(d['ig']).max():.3g}<" in html
    # counterfactual rows: input, counterfactual, |difference| on magma scaled by the largest difference
    u8 = to_uint8(d["images"]).astype(np.float64) / 127.5 - 1
    diff = np.abs(u8[::-1] - u8).mean(-1)
    np.testing.assert_allclose(diff, difference_maps(u8, u8[::-1]))
    cf_start = 1 + 9 + 5 + 2 + 4
    for i in range(3):
        expected = np.round(matplotlib.colormaps["magma"](diff[i] / diff.max())[..., :3] * 255)
        np.testing.assert_array_equal(pngs[cf_start + 3 * i + 2], expected)
    # curves: the SVG's y pixel of each point maps back to the value
    assert len(page.polylines) == 2 and page.polylines[1].get("stroke-dasharray")  # the random baseline is dashed
    ys = np.array([[float(v.split(",")[1]) for v in p["points"].split()] for p in page.polylines])
    top, height = float(page.rect["y"]), float(page.rect["height"])  # the plot's frame: p 1 at top, 0 at bottom
    values = 1 - (ys - top) / height
    np.testing.assert_allclose(values, [[1, .5, .3, .2, .1], [1, .9, .8, .7, .6]], atol=0.01)
    # contents: every titled block has an entry whose target exists
    targets = [h[1:] for h in page.hrefs if h.startswith("#")]
    assert {"Contents", "Summary"} <= set(page.headings)
    assert all(t in page.ids for t in targets) and len(targets) >= 5
    assert "higher is better" not in html and "lower is better" in html


@pytest.mark.skipif(chromium() is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_report_in_headless_chromium(tmp_path):
    """In a real browser: every image loads, a slider shows the frame it points at, the method switch
    hides the other method's maps; screenshots go to /tmp/shots/ (or $VISCOIN_SHOTS)."""
    _, path, _ = _interactive_report(tmp_path)
    shots = Path(__import__("os").environ.get("VISCOIN_SHOTS", "/tmp/shots"))
    with Browser() as browser:
        page = browser.open(path.as_uri())
        assert page.eval(IMAGES_LOADED), page.eval(BROKEN_IMAGES)
        sliders = page.eval("document.querySelectorAll('.slider').length")
        assert sliders == 2  # the series and the concept row
        for k in range(sliders):
            frames = page.eval(f"Array.from(document.getElementById(document.querySelectorAll('.slider')[{k}]"
                               ".dataset.frames).querySelectorAll('img')).map(i => i.src)")
            for target in (len(frames) - 1, 1):
                shown = page.eval(f"""(() => {{
                    const s = document.querySelectorAll('.slider')[{k}], input = s.querySelector('input');
                    input.value = {target}; input.dispatchEvent(new Event('input'));
                    const v = s.querySelector('img.frame');
                    return [v.src, v.complete && v.naturalWidth > 0, s.querySelector('.value').textContent];
                }})()""")
                assert shown[0] == frames[target] and shown[1]
        page.screenshot(shots / "report_unit_slider.png")
        visible = ("Array.from(document.querySelectorAll('#b0-maps [data-method]'))"
                   ".filter(e => e.offsetParent !== null).map(e => e.dataset.method)")
        assert sorted(set(page.eval(visible))) == ["gradient", "integrated_gradients"]
        page.eval("(() => { const r = document.querySelector('.switch input[value=integrated_gradients]');"
                  " r.click(); })()")
        assert set(page.eval(visible)) == {"integrated_gradients"}
        page.screenshot(shots / "report_unit_method_switch.png")


def test_headline_rows_pick_known_metrics_with_their_direction():
    """The summary's rows: known metrics in the guide's order with their direction, NaN left out,
    unknown names left to the full table."""
    from viscoin_jax.explain.headline import GUIDE, describe, headline_rows

    metrics = {"unknown thing": 1.0, "CC mean": 0.8, "gradient deletion AUC": 0.3, "accuracy on these images": 0.9,
               "random attribution deletion AUC": 0.6, "FF median (tau 0.2)": float("nan"),
               "top concepts changing only causal factors": 0.25}
    rows = headline_rows(metrics)
    names = [r["name"] for r in rows]
    assert names == ["accuracy on these images", "gradient deletion AUC", "random attribution deletion AUC",
                     "CC mean", "top concepts changing only causal factors"]
    direction = {r["name"]: r["direction"] for r in rows}
    assert direction["gradient deletion AUC"] == "lower is better" and direction["CC mean"] == "higher is better"
    assert direction["random attribution deletion AUC"] == ""  # the chance level has no better side
    assert describe("unknown thing") is None and len(headline_rows(metrics, max_rows=2)) == 2
    assert all(r["meaning"] for r in rows) and len(GUIDE) >= 15
