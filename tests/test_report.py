"""HTML report: parse the written page back, decode every embedded PNG, check sizes, pixels, escaping."""

import base64
import io
import shutil
import subprocess
from html.parser import HTMLParser

import matplotlib
import numpy as np
import pytest
from PIL import Image

from viscoin_jax.explain.report import Report, heatmap_overlay, save_arrays, to_uint8


class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.captions, self.cells, self.headings, self.paragraphs = [], [], [], [], []
        self._tag = None
        self.title = None

    def handle_starttag(self, tag, attrs):
        self._tag = tag
        if tag == "img":
            self.imgs.append(dict(attrs))

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
    assert rep.num_images == 2 + 3 + 1 + 3
    path = rep.write(tmp_path / "out")
    assert path == tmp_path / "out" / "report.html"
    page = parse(path)

    # one <img> per image added, each a PNG of the expected size
    assert len(page.imgs) == rep.num_images
    pngs = [decode(a) for a in page.imgs]
    assert all(im.format == "PNG" for im in pngs)
    assert [im.size for im in pngs] == [(7, 5)] * 2 + [(4, 6)] * 3 + [(3, 3)] + [(4, 6)] * 3
    # exact pixel round trips
    np.testing.assert_array_equal(np.asarray(pngs[0]), known[0])
    np.testing.assert_array_equal(np.asarray(pngs[1]), known[1])
    np.testing.assert_array_equal(np.asarray(pngs[2]), np.round((floats[0] + 1) * 127.5).astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(pngs[5]), grey[0])
    np.testing.assert_array_equal(np.asarray(pngs[6]), heatmap_overlay(floats, maps, alpha=0.4)[0])

    # text is escaped: the parser gets the literal strings back, no tag was injected
    assert page.title == "Explain <model> & co"
    assert "Intro <b>" in page.headings
    assert page.paragraphs == ["first para with <script>alert(1)</script>", "second & last"]
    assert page.captions == ["a<1>", 'b"q"', "p=0.93", "x", "y", "z"]
    assert page.imgs[1]["alt"] == 'b"q"'
    html = path.read_text(encoding="utf-8")
    assert "<script>" not in html and "&lt;script&gt;" in html
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


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


@pytest.mark.skipif(_chromium() is None, reason="no chromium / chrome installed")
def test_headless_browser_opens_report(tmp_path):
    red = np.zeros((1, 64, 64, 3), np.uint8)
    red[..., 0] = 255
    rep = Report("browser check").add_image_grid(None, red).add_image_grid("two", np.zeros((2, 8, 8, 3), np.uint8))
    path = rep.write(tmp_path)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr
    assert dom.stdout.count("<img") == 3
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), *flags, f"--screenshot={shot}", "--window-size=800,600", path.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    assert np.any(np.all(pixels == [255, 0, 0], axis=1)), "the red image is not on screen"
