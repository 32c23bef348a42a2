"""A self-contained HTML report of explanations: text, image grids, heatmap overlays, tables, metrics.

    report = Report("Grad-CAM on NCT-CRC-HE")
    report.add_section("Setup", "ResNet50, stage4 ...")
    report.add_heatmaps(images, cams, captions=[f"p={p:.2f}" for p in probs])
    report.add_metrics({"deletion AUC": 0.12})
    report.write("runs/explain")          # -> runs/explain/report.html
    save_arrays("runs/explain", "gradcam", images=images, maps=cams)

Images are embedded as base64 PNG (Pillow), so the single file opens anywhere (no server, no
external resources); all text is HTML-escaped. Heatmaps are coloured with a matplotlib colormap
(matplotlib.colormaps, no pyplot, no GUI backend). In a notebook, a Report displays itself
(`_repr_html_`).

Images: [N, H, W, 3] or [N, H, W] (grey), float in [-1, 1] (the project's range; values outside
are clipped) or uint8 as is.
"""

from __future__ import annotations

import base64
import html
import io
import numbers
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
from PIL import Image

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #bbb; }
.grid { display: grid; gap: 8px; align-items: start; }
.series { display: flex; gap: 8px; overflow-x: auto; align-items: start; }
figure { margin: 0; text-align: center; }
figcaption { font-size: 0.85em; color: #444; word-break: break-word; }
img { image-rendering: pixelated; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #bbb; padding: 3px 10px; text-align: left; font-variant-numeric: tabular-nums; }
th { background: #eee; }
"""

MIN_DISPLAY_WIDTH = 128  # small images are shown scaled up by an integer factor (pixelated)


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


def png_base64(image: np.ndarray) -> str:
    """Base64 text of a PNG of one uint8 image [H, W, 3] or [H, W]."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def heatmap_overlay(images, maps, *, cmap: str = "jet", alpha: float = 0.5, signed: bool = False) -> np.ndarray:
    """uint8 [N, H, W, 3]: each map coloured with `cmap` and blended over its image.

    Maps [N, H, W] are rescaled per image to [0, 1]: min-max, or with signed=True by max |m| so that
    0 sits at the colormap's centre (use a diverging cmap such as "bwr"). Constant maps are shown
    as the colormap's low end (centre when signed).
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
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown matplotlib colormap {cmap!r}") from None
    flat = m.reshape(m.shape[0], -1)
    if signed:
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


def _text(value) -> str:
    """Escaped display text of a table cell or metric value."""
    if isinstance(value, (bool, np.bool_)):
        s = str(bool(value))
    elif isinstance(value, numbers.Integral):
        s = str(int(value))
    elif isinstance(value, numbers.Real):
        s = f"{float(value):.4g}"
    elif isinstance(value, (np.ndarray, list, tuple)) or hasattr(value, "__array__"):
        a = np.asarray(value)
        if a.size == 1:
            return _text(a.reshape(()).item())
        if a.size <= 8 and a.ndim <= 1:
            s = "[" + ", ".join(_text(v) for v in a.tolist()) + "]"
            return s  # items already escaped
        s = f"array{tuple(a.shape)} mean={float(np.mean(a)):.4g}" if np.issubdtype(a.dtype, np.number) \
            else f"array{tuple(a.shape)}"
    else:
        s = str(value)
    return html.escape(s)


class Report:
    """Builder of a one-file HTML report; every add_* appends a block, `write` saves report.html."""

    def __init__(self, title: str):
        self.title = str(title)
        self._blocks: list[str] = []
        self.num_images = 0

    # -- blocks ---------------------------------------------------------------------------------
    def add_section(self, title: str, text: str = "") -> "Report":
        """A heading and paragraphs (blank lines separate paragraphs)."""
        parts = [f"<h2>{html.escape(str(title))}</h2>"]
        for para in re.split(r"\n\s*\n", str(text).strip()) if str(text).strip() else []:
            parts.append(f"<p>{html.escape(para)}</p>")
        self._blocks.append("\n".join(parts))
        return self

    def add_link(self, title: str, href: str, text: str | None = None) -> "Report":
        """A heading and a link (e.g. to another report beside this one)."""
        self._blocks.append(f"<h2>{html.escape(str(title))}</h2>\n<p><a href=\"{html.escape(str(href), quote=True)}\">"
                            f"{html.escape(str(text or href))}</a></p>")
        return self

    def add_image_grid(self, title: str | None, images, captions: Sequence[str] | None = None, cols: int = 4,
                       *, display_width: int | None = None) -> "Report":
        """Images in a grid of `cols` columns with optional captions."""
        imgs = to_uint8(images)
        self._add_figures(title, imgs, captions, "grid", cols, display_width)
        return self

    def add_heatmaps(self, images, maps, captions: Sequence[str] | None = None, *, title: str | None = None,
                     cols: int = 4, cmap: str = "jet", alpha: float = 0.5, signed: bool = False,
                     display_width: int | None = None) -> "Report":
        """Attribution maps [N, H, W] overlaid on their images (see `heatmap_overlay`)."""
        overlay = heatmap_overlay(images, maps, cmap=cmap, alpha=alpha, signed=signed)
        self._add_figures(title, overlay, captions, "grid", cols, display_width)
        return self

    def add_series(self, title: str | None, images, captions: Sequence[str] | None = None, *,
                   display_width: int | None = None) -> "Report":
        """One row of images along a path (interpolation, counterfactual steps), each with a caption
        such as the classifier's probability."""
        imgs = to_uint8(images)
        self._add_figures(title, imgs, captions, "series", None, display_width)
        return self

    def add_table(self, rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None, *,
                  title: str | None = None) -> "Report":
        """A table; numbers are shown with 4 significant digits."""
        rows = [list(r) for r in rows]
        width = len(header) if header is not None else (len(rows[0]) if rows else 0)
        for i, r in enumerate(rows):
            if len(r) != width:
                raise ValueError(f"table row {i} has {len(r)} cells, expected {width}")
        parts = [f"<h2>{html.escape(str(title))}</h2>"] if title is not None else []
        parts.append("<table>")
        if header is not None:
            parts.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
        for r in rows:
            parts.append("<tr>" + "".join(f"<td>{_text(c)}</td>" for c in r) + "</tr>")
        parts.append("</table>")
        self._blocks.append("\n".join(parts))
        return self

    def add_metrics(self, metrics: Mapping[str, Any], *, title: str = "Metrics") -> "Report":
        """A two-column table of named values (scalars, short vectors, array summaries)."""
        if not isinstance(metrics, Mapping):
            raise ValueError(f"metrics must be a mapping name -> value, got {type(metrics).__name__}")
        return self.add_table([[str(k), v] for k, v in metrics.items()], header=["metric", "value"], title=title)

    def _add_figures(self, title, imgs, captions, layout, cols, display_width):
        n = imgs.shape[0]
        if captions is not None:
            captions = [str(c) for c in captions]
            if len(captions) != n:
                raise ValueError(f"got {len(captions)} captions for {n} images")
        if cols is not None and (isinstance(cols, bool) or not isinstance(cols, (int, np.integer)) or cols < 1):
            raise ValueError(f"cols must be an integer >= 1, got {cols!r}")
        w = imgs.shape[2]
        if display_width is None:
            display_width = w * max(1, -(-MIN_DISPLAY_WIDTH // w))
        elif isinstance(display_width, bool) or not isinstance(display_width, (int, np.integer)) or display_width < 1:
            raise ValueError(f"display_width must be a positive integer, got {display_width!r}")
        parts = [f"<h2>{html.escape(str(title))}</h2>"] if title is not None else []
        style = f' style="grid-template-columns: repeat({int(cols)}, max-content)"' if layout == "grid" else ""
        parts.append(f'<div class="{layout}"{style}>')
        for i in range(n):
            cap = captions[i] if captions is not None else ""
            parts.append(
                f'<figure><img src="data:image/png;base64,{png_base64(imgs[i])}" width="{int(display_width)}" '
                f'alt="{html.escape(cap, quote=True)}">'
                + (f"<figcaption>{html.escape(cap)}</figcaption>" if cap else "") + "</figure>")
        parts.append("</div>")
        self._blocks.append("\n".join(parts))
        self.num_images += n

    # -- output ---------------------------------------------------------------------------------
    def to_html(self) -> str:
        """The complete page as a string."""
        title = html.escape(self.title)
        body = "\n".join(self._blocks)
        return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{title}</title>\n"
                f"<style>{_CSS}</style>\n</head>\n<body>\n<h1>{title}</h1>\n{body}\n</body>\n</html>\n")

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


__all__ = ["Report", "save_arrays", "to_uint8", "png_base64", "heatmap_overlay"]
