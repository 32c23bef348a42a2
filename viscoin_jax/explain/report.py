"""A self-contained HTML report of explanations, rendered from jinja2 templates (templates/ beside
this module, shipped in the wheel): a summary, a contents list, image grids, maps beside their
originals with colour bars, concept and counterfactual grids with sliders, curves, tables.

    report = Report("Grad-CAM on NCT-CRC-HE")
    report.add_section("Setup", "ResNet50, stage4 ...")
    report.add_attribution_maps(images, {"grad_cam": cams}, captions=["tumour (p 0.93)", ...])
    report.add_metrics({"deletion AUC": 0.12})
    report.write("runs/explain")          # -> runs/explain/report.html
    save_arrays("runs/explain", "gradcam", images=images, maps=cams)

Images are embedded as base64 PNG (Pillow), so the single file opens anywhere (no server, no
external resources); the interactive parts (sliders, a method switch) are a few lines of inline
JavaScript that only show frames already in the page. All text is HTML-escaped by jinja2's
autoescaping. Maps are coloured with a matplotlib colormap (matplotlib.colormaps, no pyplot). In a
notebook, a Report displays itself (`_repr_html_`).

Images: [N, H, W, 3] or [N, H, W] (grey), float in [-1, 1] (the project's range; values outside
are clipped) or uint8 as is.
"""

from __future__ import annotations

import base64
import io
import numbers
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import matplotlib
import numpy as np
from PIL import Image

MIN_DISPLAY_WIDTH = 128  # small images are shown scaled up by an integer factor (pixelated)
SLIDER_WIDTH = 192  # the frame a slider shows, in CSS pixels
SEQUENTIAL_CMAP = "viridis"  # unsigned maps (importance, |difference|): dark = low, yellow = high
DIVERGING_CMAP = "RdBu_r"  # signed maps: blue = negative, white = 0, red = positive
CURVE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("viscoin_jax.explain", "templates"),
                          autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def to_uint8(images, name: str = "images") -> np.ndarray:
    """[N, H, W, 3] / [N, H, W] uint8 from uint8 or floats in [-1, 1] (clipped); ValueError otherwise."""
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3)):
        raise ValueError(f"{name} must be [N, H, W, 3] or [N, H, W], got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name} is empty: shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be uint8 or float in [-1, 1], got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has non-finite values")
    return np.round((np.clip(x.astype(np.float64), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """A PNG of one uint8 image [H, W, 3] or [H, W]."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def png_base64(image: np.ndarray) -> str:
    """Base64 text of a PNG of one uint8 image [H, W, 3] or [H, W]."""
    return base64.b64encode(png_bytes(image)).decode("ascii")


def _colormap(cmap: str):
    try:
        return matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown matplotlib colormap {cmap!r}") from None


def map_limits(maps, *, signed: bool = False) -> tuple[float, float]:
    """(lo, hi) shared by all maps [N, H, W]: min and max, or +-max |m| when signed (0 at the centre),
    so the colours of different images mean the same value and one colour bar labels them all."""
    m = np.asarray(maps, dtype=np.float64)
    if m.size == 0 or not np.all(np.isfinite(m)):
        raise ValueError("maps are empty or have non-finite values")
    if signed:
        top = float(np.abs(m).max())
        top = top if top > 0 else 1.0
        return -top, top
    lo, hi = float(m.min()), float(m.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def heatmap_overlay(images, maps, *, cmap: str = "jet", alpha: float = 0.5, signed: bool = False,
                    limits: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 [N, H, W, 3]: each map coloured with `cmap` and blended over its image.

    Maps [N, H, W] are rescaled to [0, 1] between `limits` (lo, hi) when given (one scale for all
    images, see `map_limits`); otherwise per image: min-max, or with signed=True by max |m| so
    that 0 sits at the colormap's centre (use a diverging cmap). Constant maps are shown as the
    colormap's low end (centre when signed).
    """
    imgs = to_uint8(images)
    if imgs.ndim == 3:
        imgs = np.repeat(imgs[..., None], 3, axis=-1)
    m = np.asarray(maps, dtype=np.float64)
    if m.shape != imgs.shape[:3]:
        raise ValueError(f"maps must be [N, H, W] = {imgs.shape[:3]} to match the images, got {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("maps have non-finite values")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colormap = _colormap(cmap)
    flat = m.reshape(m.shape[0], -1)
    if limits is not None:
        lo, hi = (float(v) for v in limits)
        if not hi > lo:
            raise ValueError(f"limits must be (lo, hi) with hi > lo, got {limits}")
        unit = (m - lo) / (hi - lo)
    elif signed:
        scale = np.abs(flat).max(axis=1)
        scale = np.where(scale > 0, scale, 1.0)
        unit = 0.5 + 0.5 * m / scale[:, None, None]
    else:
        lo, hi = flat.min(axis=1), flat.max(axis=1)
        span = np.where(hi > lo, hi - lo, 1.0)
        unit = (m - lo[:, None, None]) / span[:, None, None]
    colour = colormap(np.clip(unit, 0.0, 1.0))[..., :3] * 255.0
    out = (1.0 - alpha) * imgs.astype(np.float64) + alpha * colour
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def colour_bar(cmap: str, lo: float, hi: float, label: str = "") -> dict:
    """What the template draws as a colour bar: a CSS gradient sampled from `cmap`, the end values."""
    colormap = _colormap(cmap)
    stops = ", ".join(f"rgb({r:.0f},{g:.0f},{b:.0f}) {100 * t:.0f}%" for t in np.linspace(0, 1, 11)
                      for r, g, b in [np.asarray(colormap(t)[:3]) * 255])
    return {"gradient": f"linear-gradient(to right, {stops})", "lo": f"{lo:.3g}", "hi": f"{hi:.3g}",
            "label": str(label)}


def difference_maps(before, after) -> np.ndarray:
    """[N, H, W] mean |after - before| over the colour channels, in the images' [-1, 1] units."""
    a = np.asarray(before, np.float64)
    b = np.asarray(after, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"before {a.shape} and after {b.shape} must have the same shape")
    d = np.abs(b - a)
    return d.mean(axis=-1) if d.ndim == 4 else d


def class_label(class_names: Sequence[str] | None, c) -> str:
    """The name of class `c` where the data set names its classes, else "class c"."""
    c = int(c)
    if class_names is not None and 0 <= c < len(class_names) and class_names[c]:
        return str(class_names[c])
    return f"class {c}"


def _text(value) -> str:
    """Display text of a table cell or metric value (escaped by the template)."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return f"{float(value):.4g}"
    if isinstance(value, (np.ndarray, list, tuple)) or hasattr(value, "__array__"):
        a = np.asarray(value)
        if a.size == 1:
            return _text(a.reshape(()).item())
        if a.size <= 8 and a.ndim <= 1:
            return "[" + ", ".join(_text(v) for v in a.tolist()) + "]"
        return (f"array{tuple(a.shape)} mean={float(np.mean(a)):.4g}" if np.issubdtype(a.dtype, np.number)
                else f"array{tuple(a.shape)}")
    return str(value)


def _check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _captions(captions, n: int) -> list[str]:
    if captions is None:
        return [""] * n
    captions = [str(c) for c in captions]
    if len(captions) != n:
        raise ValueError(f"got {len(captions)} captions for {n} images")
    return captions


class Report:
    """Builder of a one-file HTML report; every add_* appends a block, `write` saves report.html."""

    def __init__(self, title: str):
        self.title = str(title)
        self._blocks: list[dict] = []
        self._summary: dict | None = None
        self.num_images = 0  # embedded images (a slider's view reuses them, it adds none)
        self.key_images: dict[str, np.ndarray] = {}  # uint8 [H, W, 3] figures for TensorBoard / thumbnails
        self.key_anchors: dict[str, str] = {}  # key image -> the id of the block it comes from

    # -- helpers ----------------------------------------------------------------------------------
    def _figure(self, image: np.ndarray, caption: str, width: int) -> dict:
        self.num_images += 1
        return {"src": png_base64(image), "caption": caption, "width": int(width)}

    @staticmethod
    def _width(w: int, display_width) -> int:
        if display_width is None:
            return w * max(1, -(-MIN_DISPLAY_WIDTH // w))
        return _check_int("display_width", display_width)

    def _block(self, kind: str, title, **fields) -> dict:
        block = {"kind": kind, "title": None if title is None else str(title), "id": f"b{len(self._blocks)}",
                 **fields}
        self._blocks.append(block)
        return block

    def add_key_image(self, name: str, image) -> "Report":
        """Remembers a figure worth logging to TensorBoard and showing as a thumbnail (uint8 [H, W, 3])."""
        self.key_images[str(name)] = to_uint8(np.asarray(image)[None], name=f"key image {name!r}")[0]
        self.key_anchors[str(name)] = self.last_block_id
        return self

    @property
    def last_block_id(self) -> str:
        """The id (page anchor) of the newest block, "contents" before any."""
        return self._blocks[-1]["id"] if self._blocks else "contents"

    # -- blocks ---------------------------------------------------------------------------------
    def set_summary(self, what: str, headline: Sequence[Mapping[str, Any]] = (), *, notes: Sequence[str] = (),
                    links: Sequence[tuple[str, str]] = (), thumbnails: Sequence[tuple[str, Any, str]] = ()
                    ) -> "Report":
        """The box at the top: what was explained, headline rows {name, value, direction, meaning},
        notes (paragraphs), links (text, href) and thumbnails (caption, uint8 image, href)."""
        rows = []
        for h in headline:
            missing = {"name", "value"} - set(h)
            if missing:
                raise ValueError(f"headline row {dict(h)} lacks {sorted(missing)}")
            rows.append({"name": str(h["name"]), "value": _text(h["value"]), "direction": str(h.get("direction", "")),
                         "meaning": str(h.get("meaning", ""))})
        thumbs = []
        for caption, image, href in thumbnails:
            img = to_uint8(np.asarray(image)[None], name=f"thumbnail {caption!r}")[0]
            width = min(240, max(120, img.shape[1]))
            thumbs.append({"figure": self._figure(img, str(caption), width), "href": str(href)})
        self._summary = {"what": str(what), "headline": rows, "notes": [str(n) for n in notes],
                         "links": [{"text": str(t), "href": str(h)} for t, h in links], "thumbnails": thumbs}
        return self

    def add_section(self, title: str, text: str = "") -> "Report":
        """A heading and paragraphs (blank lines separate paragraphs)."""
        text = str(text).strip()
        self._block("section", title, paragraphs=re.split(r"\n\s*\n", text) if text else [])
        return self

    def add_link(self, title: str, href: str, text: str | None = None) -> "Report":
        """A heading and a link (e.g. to another report beside this one)."""
        self._block("link", title, href=str(href), text=str(text or href))
        return self

    def add_image_grid(self, title: str | None, images, captions: Sequence[str] | None = None, cols: int = 4,
                       *, display_width: int | None = None) -> "Report":
        """Images in rows of at most `cols` that wrap on a narrow window, with optional captions."""
        imgs = to_uint8(images)
        self._add_figures(title, imgs, captions, cols, display_width, slider=None)
        return self

    def add_series(self, title: str | None, images, captions: Sequence[str] | None = None, *,
                   display_width: int | None = None, slider: str = "step") -> "Report":
        """One row of images along a path (interpolation, counterfactual steps), each with a caption such
        as the classifier's probability, and a slider (named `slider`) that steps through them."""
        imgs = to_uint8(images)
        self._add_figures(title, imgs, captions, None, display_width, slider=slider if len(imgs) > 1 else None)
        return self

    def add_heatmaps(self, images, maps, captions: Sequence[str] | None = None, *, title: str | None = None,
                     cols: int = 4, cmap: str | None = None, alpha: float = 0.6, signed: bool = False,
                     display_width: int | None = None, label: str = "attribution") -> "Report":
        """Each map [N, H, W] beside its image, overlaid on a copy of it, one colour scale for all (a
        colour bar labels it); signed maps on a diverging colormap with 0 at its centre."""
        cmap = cmap or (DIVERGING_CMAP if signed else SEQUENTIAL_CMAP)
        lo, hi = map_limits(maps, signed=signed)
        overlay = heatmap_overlay(images, maps, cmap=cmap, alpha=alpha, limits=(lo, hi))
        imgs = to_uint8(images)
        caps = _captions(captions, len(imgs))
        width = self._width(imgs.shape[2], display_width)
        pairs = [[self._figure(imgs[i], "", width), self._figure(overlay[i], caps[i], width)] for i in range(len(imgs))]
        _check_int("cols", cols)
        self._block("pairs", title, pairs=pairs, colourbar=colour_bar(cmap, lo, hi, label))
        return self

    def add_attribution_maps(self, images, maps: Mapping[str, Any], captions: Sequence[str] | None = None, *,
                             title: str | None = "Attribution maps", signed: Sequence[str] = (),
                             alpha: float = 0.6, display_width: int | None = None) -> "Report":
        """One row per image: the original, then each method's map over it (one colour scale per
        method, with its colour bar; `signed` methods on a diverging colormap); a switch shows one
        method or all."""
        if not isinstance(maps, Mapping) or not maps:
            raise ValueError("maps must be a non-empty mapping method -> [N, H, W] maps")
        imgs = to_uint8(images)
        caps = _captions(captions, len(imgs))
        width = self._width(imgs.shape[2], display_width)
        methods, overlays = [], {}
        for name, m in maps.items():
            is_signed = name in signed
            cmap = DIVERGING_CMAP if is_signed else SEQUENTIAL_CMAP
            lo, hi = map_limits(m, signed=is_signed)
            overlays[name] = heatmap_overlay(imgs, m, cmap=cmap, alpha=alpha, limits=(lo, hi))
            methods.append({"name": str(name), "colourbar": colour_bar(
                cmap, lo, hi, "signed: blue < 0 < red" if is_signed else "low to high")})
        rows = []
        for i in range(len(imgs)):
            rows.append({"label": caps[i], "original": self._figure(imgs[i], "original", width),
                         "maps": [{"method": str(n), "figure": self._figure(o[i], str(n), width)}
                                  for n, o in overlays.items()]})
        self._block("attributions", title, methods=methods, rows=rows)
        rgb = imgs if imgs.ndim == 4 else np.repeat(imgs[..., None], 3, axis=-1)
        self.add_key_image("attribution_maps", np.concatenate([rgb[0]] + [o[0] for o in overlays.values()], axis=1))
        return self

    def add_frame_rows(self, title: str | None, rows: Sequence[Mapping[str, Any]], *, text: str = "",
                       slider: str | None = None, display_width: int | None = None,
                       colourbar: dict | None = None) -> "Report":
        """Rows of {label, lead: (images, captions), frames: (images, captions)}: fixed images first (an
        input, its reconstruction), then frames along a parameter (lambda, t) that a slider named
        `slider` steps through. The VisCoIN concept grid and the counterfactual rows use this."""
        out = []
        for r in rows:
            lead_imgs, lead_caps = r.get("lead", (None, None))
            frame_imgs, frame_caps = r["frames"]
            frames = to_uint8(frame_imgs)
            width = self._width(frames.shape[2], display_width)
            lead = []
            if lead_imgs is not None:
                lead_u8 = to_uint8(lead_imgs)
                lead = [self._figure(im, c, width) for im, c in zip(lead_u8, _captions(lead_caps, len(lead_u8)))]
            out.append({"label": str(r.get("label", "")), "lead": lead,
                        "frames": [self._figure(im, c, width) for im, c in zip(frames, _captions(frame_caps, len(frames)))]})
        self._block("frame_rows", title, rows=out, text=str(text), slider=slider, slider_width=SLIDER_WIDTH,
                    colourbar=colourbar)
        return self

    def add_counterfactuals(self, title: str | None, images, counterfactuals, captions: Sequence[str],
                            *, display_width: int | None = None, row_labels: Sequence[str] | None = None) -> "Report":
        """Per image: the input, its counterfactual (captioned with the new class's probability) and
        the difference map |x' - x| on one colour scale for all rows (colour bar)."""
        x, cf = to_uint8(images), to_uint8(counterfactuals)
        if x.shape != cf.shape:
            raise ValueError(f"images {x.shape} and counterfactuals {cf.shape} must have the same shape")
        diff = difference_maps(x.astype(np.float64) / 127.5 - 1, cf.astype(np.float64) / 127.5 - 1)
        lo, hi = 0.0, max(float(diff.max()), 1e-6)
        cmap = _colormap("magma")
        diff_rgb = np.round(cmap(diff / hi)[..., :3] * 255).astype(np.uint8)
        caps = _captions(captions, len(x))
        labels = _captions(row_labels, len(x))
        rows = [{"label": labels[i], "frames": (np.stack([x[i], cf[i], diff_rgb[i]]),
                                                ["input", caps[i], "|difference|"])} for i in range(len(x))]
        self.add_frame_rows(title, rows, display_width=display_width,
                            colourbar=colour_bar("magma", lo, hi, "|x' - x|, mean over RGB ([-1, 1] units)"))
        self.add_key_image("counterfactual", np.concatenate([x[0], cf[0], diff_rgb[0]], axis=1))
        return self

    def add_curves(self, title: str | None, fractions, curves: Mapping[str, Mapping[str, Any]], *,
                   xlabel: str = "fraction of pixels", ylabel: str = "p", baseline: str | None = None,
                   text: str = "") -> "Report":
        """Line plots (inline SVG): curves {plot title: {line name: y [len(fractions)]}}; the line named
        `baseline` is dashed (the random map a method must beat)."""
        x = np.asarray(fractions, np.float64)
        plots = []
        for plot_title, lines in curves.items():
            w, h, left, top, right, bottom = 460, 260, 44, 24, 170, 34
            inner_w, inner_h = w - left - right, h - top - bottom
            ys = {k: np.asarray(v, np.float64) for k, v in lines.items()}
            for k, y in ys.items():
                if y.shape != x.shape or not np.all(np.isfinite(y)):
                    raise ValueError(f"curve {k!r} must be {x.shape[0]} finite values, got shape {y.shape}")
            x0, x1 = float(x.min()), float(x.max()) if x.max() > x.min() else float(x.min()) + 1.0
            px = left + (x - x0) / (x1 - x0) * inner_w
            rows = []
            for j, (k, y) in enumerate(ys.items()):
                py = top + (1.0 - np.clip(y, 0.0, 1.0)) * inner_h
                rows.append({"name": str(k), "colour": "#555" if k == baseline else CURVE_COLOURS[j % len(CURVE_COLOURS)],
                             "dashed": k == baseline,
                             "points": " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px, py))})
            plots.append({"title": f"{plot_title} ({ylabel})", "width": w, "height": h, "left": left, "top": top,
                          "inner_w": inner_w, "inner_h": inner_h, "legend_x": left + inner_w + 10, "xlabel": xlabel,
                          "lines": rows,
                          "yticks": [{"y": top + (1 - v) * inner_h, "label": f"{v:g}"} for v in (0, 0.5, 1)],
                          "xticks": [{"x": left + (v - x0) / (x1 - x0) * inner_w, "label": f"{v:g}"}
                                     for v in np.linspace(x0, x1, 5)]})
        self._block("curves", title, plots=plots, text=str(text))
        return self

    def add_table(self, rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None, *,
                  title: str | None = None) -> "Report":
        """A table; numbers are shown with 4 significant digits."""
        rows = [list(r) for r in rows]
        width = len(header) if header is not None else (len(rows[0]) if rows else 0)
        for i, r in enumerate(rows):
            if len(r) != width:
                raise ValueError(f"table row {i} has {len(r)} cells, expected {width}")
        self._block("table", title, header=[str(h) for h in header] if header is not None else None,
                    rows=[[_text(c) for c in r] for r in rows])
        return self

    def add_metrics(self, metrics: Mapping[str, Any], *, title: str = "Metrics") -> "Report":
        """A two-column table of named values (scalars, short vectors, array summaries)."""
        if not isinstance(metrics, Mapping):
            raise ValueError(f"metrics must be a mapping name -> value, got {type(metrics).__name__}")
        return self.add_table([[str(k), v] for k, v in metrics.items()], header=["metric", "value"], title=title)

    def _add_figures(self, title, imgs, captions, cols, display_width, slider):
        caps = _captions(captions, imgs.shape[0])
        if cols is not None:
            cols = _check_int("cols", cols)
        width = self._width(imgs.shape[2], display_width)
        figures = [self._figure(imgs[i], caps[i], width) for i in range(imgs.shape[0])]
        self._block("figures", title, figures=figures, colourbar=None, slider=slider, slider_width=SLIDER_WIDTH,
                    max_width=(cols * (width + 8)) if cols else None)

    # -- output ---------------------------------------------------------------------------------
    def to_html(self) -> str:
        """The complete page as a string."""
        contents = [b for b in self._blocks if b["title"]]
        return _ENV.get_template("report.html").render(title=self.title, summary=self._summary,
                                                        contents=contents, blocks=self._blocks)

    def _repr_html_(self) -> str:
        return self.to_html()

    def write(self, out_dir, name: str = "report.html") -> Path:
        """Writes out_dir/<name> (creating out_dir) and returns its path."""
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise ValueError(f"out_dir {out} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        path = out / name
        path.write_text(self.to_html(), encoding="utf-8")
        return path


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def save_arrays(out_dir, name: str, **arrays) -> Path:
    """Saves the named arrays (jax or numpy) to out_dir/name.npz (compressed) and returns the path."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"name must be a plain file name (letters, digits, '.', '_', '-'), got {name!r}")
    if not arrays:
        raise ValueError("no arrays to save")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    path = out / (name if name.endswith(".npz") else f"{name}.npz")
    np.savez_compressed(path, **{k: np.asarray(v) for k, v in arrays.items()})
    return path


__all__ = ["Report", "save_arrays", "class_label", "to_uint8", "png_base64", "png_bytes", "heatmap_overlay", "map_limits",
           "colour_bar", "difference_maps"]
