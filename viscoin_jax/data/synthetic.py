"""A synthetic "stained cell" data set with known causal and nuisance factors, rendered by code.

Why: to test an explanation method one needs images whose class is decided by *known* visual
factors. Each image shows one stained blob (a cell nucleus) on a textured pale background, like a
tiny histology patch. The class is decided by the blob's stain colour and/or shape; everything else
(position, size, rotation, stain shade, background texture, brightness) varies as nuisance. Every
example carries its factor values, and `measure_factors` recovers the factors from pixels, so a
test or demo can check whether a counterfactual changed the causal factor and left the nuisance
ones alone.

Everything is deterministic from `(seed, split, index)` (one `numpy.random.Generator` per example),
so any example is random-access without files or downloads. Factors are resolution-free (fractions
of the image side), so the same example renders the same scene at 32 or 64 pixels.

Factors (one value per example; `factor_names()` lists them):
- colour: 0 pink (eosin-like), 1 purple (haematoxylin-like)            int32
- shape: 0 round, 1 elongated (ellipse with axis ratio ELONGATION)     int32
- center_y, center_x: blob centre, fraction of the image side (rows, columns)
- size: radius of the disc of equal area, fraction of the image side
- rotation: angle of the major axis in [0, pi), from the +x (column) axis towards +y (rows)
- brightness: global intensity multiplier
- stain_r, stain_g, stain_b: per-channel stain shade offset (0..255 units)
- texture_contrast: amplitude of the background texture
- texture_seed: which background texture (the texture is a pure function of it)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

# ---------------------------------------------------------------------------------------------
# Constants of the generative process.

BACKGROUND_RGB = np.array([226.0, 200.0, 216.0])  # pale eosin-stained background
# The two stains sit far apart in hue (log(R / B) +0.38 and -0.75), and the blob covers 7-15 % of the
# image: with closer stains (+0.29 / -0.41) and smaller blobs (3-6 %) a tiny StyleGAN2 painted every
# blob in the average of the two for its first ~20k images, longer than the demo can train
# (docs/performance.md, "When does the tiny G learn the two stain colours?").
STAIN_RGB = np.array([[220.0, 100.0, 150.0],  # colour 0: pink
                      [90.0, 60.0, 190.0]])  # colour 1: purple (blue-violet, haematoxylin-like)
COLOUR_NAMES = ("pink", "purple")
SHAPE_NAMES = ("round", "elongated")
ELONGATION = 2.5  # major / minor axis of the elongated blob (same area as the round one)

CENTER_RANGE = (0.38, 0.62)  # keeps the largest elongated blob inside the image
SIZE_RANGE = (0.15, 0.22)
BRIGHTNESS_RANGE = (0.8, 1.1)
STAIN_JITTER = 12.0  # each stain channel is offset by U(-12, 12)
TEXTURE_CONTRAST_RANGE = (0.02, 0.08)
_NOISE = 0.04  # per-pixel background grain, relative
_CHROMATIN = 0.12  # per-pixel darkening inside the blob, relative
_NUM_WAVES = 3  # the background texture is a sum of plane waves ...
_WAVE_FREQ = (1.5, 5.0)  # ... with this many cycles per image side

SPLITS = {"train": 0, "test": 1, "validation": 2}

FLOAT_FACTORS = ("center_y", "center_x", "size", "rotation", "brightness", "stain_r", "stain_g",
                 "stain_b", "texture_contrast")
INT_FACTORS = ("colour", "shape", "texture_seed")


def factor_names() -> tuple[str, ...]:
    return INT_FACTORS + FLOAT_FACTORS


@dataclasses.dataclass(frozen=True)
class Variant:
    """Which factors decide the class: label = mixed-radix number of the causal factors (binary)."""

    causal: tuple[str, ...]
    description: str

    @property
    def num_classes(self) -> int:
        return 2 ** len(self.causal)

    @property
    def nuisance(self) -> tuple[str, ...]:
        return tuple(n for n in factor_names() if n not in self.causal)

    @property
    def class_names(self) -> tuple[str, ...]:
        names = {"colour": COLOUR_NAMES, "shape": SHAPE_NAMES}
        out = [""]
        for f in self.causal:
            out = [f"{a}_{b}" if a else b for a in out for b in names[f]]
        return tuple(out)


VARIANTS: dict[str, Variant] = {
    "blob_binary": Variant(("colour",), "2 classes: stain colour (pink / purple); shape is nuisance"),
    "blob_shape": Variant(("shape",), "2 classes: blob shape (round / elongated); colour is nuisance"),
    "blob_4class": Variant(("colour", "shape"), "4 classes: colour x shape (label = 2 colour + shape)"),
}


def get_variant(variant: str) -> Variant:
    if variant not in VARIANTS:
        raise ValueError(f"unknown synthetic variant {variant!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[variant]


def label_from_factors(variant: str, factors: Mapping[str, np.ndarray]) -> np.ndarray:
    """The class of each example, recomputed from its causal factors (-1 where one is unknown,
    as `measure_factors` reports for images without a blob)."""
    causal = [np.asarray(factors[name], np.int32) for name in get_variant(variant).causal]
    label = np.zeros(np.shape(causal[0]), np.int32)
    for value in causal:
        label = label * 2 + value
    unknown = np.any([value < 0 for value in causal], axis=0)
    return np.where(unknown, np.int32(-1), label).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Sampling factors.


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLITS[split], int(index)])


def sample_factors(seed: int, index: int, split: str = "train") -> dict[str, np.ndarray]:
    """The factors of one example: a pure function of (seed, split, index)."""
    u = _rng(seed, split, index).random(12)
    lo, hi = CENTER_RANGE
    f = {
        "colour": u[0] < 0.5,
        "shape": u[1] < 0.5,
        "texture_seed": int(u[11] * (2**31 - 1)),
        "center_y": lo + (hi - lo) * u[2],
        "center_x": lo + (hi - lo) * u[3],
        "size": SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * u[4],
        "rotation": math.pi * u[5],
        "brightness": BRIGHTNESS_RANGE[0] + (BRIGHTNESS_RANGE[1] - BRIGHTNESS_RANGE[0]) * u[6],
        "stain_r": STAIN_JITTER * (2 * u[7] - 1),
        "stain_g": STAIN_JITTER * (2 * u[8] - 1),
        "stain_b": STAIN_JITTER * (2 * u[9] - 1),
        "texture_contrast": TEXTURE_CONTRAST_RANGE[0]
        + (TEXTURE_CONTRAST_RANGE[1] - TEXTURE_CONTRAST_RANGE[0]) * u[10],
    }
    return {k: (np.int32(v) if k in INT_FACTORS else np.float32(v)) for k, v in f.items()}


def stack_factors(items: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([np.asarray(it[k]) for it in items]) for k in factor_names()}


def flip_factors(factors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The factors of the horizontally flipped image (the texture seed then names a mirrored texture)."""
    out = dict(factors)
    out["center_x"] = (1 - np.asarray(factors["center_x"])).astype(np.float32)
    out["rotation"] = np.mod(math.pi - np.asarray(factors["rotation"], np.float64),
                             math.pi).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# Rendering (vectorised over examples and pixels).


def _hash_uniform(*keys: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) numbers from non-negative integer keys (broadcast), by a splitmix64 mix."""
    h = np.full((), 0x9E3779B97F4A7C15, np.uint64)
    for k in keys:
        h = h ^ (np.asarray(k, np.int64).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
        h = np.atleast_1d(h)  # array arithmetic wraps silently (scalar arithmetic would warn)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53)


_NOISE_FIELDS: dict[int, np.ndarray] = {}


def _noise_fields(resolution: int) -> np.ndarray:
    """Two fixed uniform [-0.5, 0.5) fields [2, R, R] (grain, chromatin), shifted per texture."""
    if resolution not in _NOISE_FIELDS:
        rng = np.random.default_rng([0x5EED, resolution])
        _NOISE_FIELDS[resolution] = (rng.random((2, resolution, resolution)) - 0.5).astype(np.float32)
    return _NOISE_FIELDS[resolution]


def render(factors: Mapping[str, np.ndarray], resolution: int) -> np.ndarray:
    """Images [N, R, R, 3] uint8 (or [R, R, 3] for scalar factors) drawn from their factors."""
    if int(resolution) < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    missing = [k for k in factor_names() if k not in factors]
    if missing:
        raise ValueError(f"render: missing factors {missing}")
    scalar = np.ndim(factors["colour"]) == 0
    f = {k: np.atleast_1d(np.asarray(factors[k])) for k in factor_names()}
    r = int(resolution)
    col = ((np.arange(r) + 0.5) / r).astype(np.float32)

    # Background: a few plane waves (separable: cos(A + B) = cos A cos B - sin A sin B) plus
    # per-pixel grain, both chosen by the texture seed.
    seed = f["texture_seed"].astype(np.int64)
    params = _hash_uniform(seed[:, None, None], np.arange(_NUM_WAVES)[None, :, None],
                           np.arange(5)[None, None, :])  # [N, W, 5]
    freq = _WAVE_FREQ[0] + (_WAVE_FREQ[1] - _WAVE_FREQ[0]) * params[..., 0]
    angle, phase = 2 * np.pi * params[..., 1], 2 * np.pi * params[..., 2]
    ax = (2 * np.pi * freq * np.cos(angle))[..., None] * col + phase[..., None]  # [N, W, R]
    by = (2 * np.pi * freq * np.sin(angle))[..., None] * col
    ax, by = ax.astype(np.float32), by.astype(np.float32)
    waves = (np.einsum("nwy,nwx->nyx", np.cos(by), np.cos(ax))
             - np.einsum("nwy,nwx->nyx", np.sin(by), np.sin(ax))) / _NUM_WAVES
    fields = _noise_fields(r)
    oy = (params[..., 0, 3] * r).astype(np.int64)[:, None, None]
    ox = (params[..., 0, 4] * r).astype(np.int64)[:, None, None]
    rows, cols = np.arange(r)[None, :, None], np.arange(r)[None, None, :]
    grain = fields[0][(rows + oy) % r, (cols + ox) % r]  # [N, R, R]
    chromatin = fields[1][(rows + oy) % r, (cols + ox) % r]
    contrast = f["texture_contrast"].astype(np.float32)[:, None, None]
    background = (1 + contrast * waves + _NOISE * grain)[..., None] * BACKGROUND_RGB.astype(np.float32)

    # Blob: an ellipse of area pi size^2, anti-aliased over one pixel by its signed distance.
    size = f["size"].astype(np.float32)
    e = np.where(f["shape"] > 0.5, ELONGATION, 1.0).astype(np.float32)
    a, b = (size * np.sqrt(e))[:, None, None], (size / np.sqrt(e))[:, None, None]
    th = f["rotation"].astype(np.float32)
    cos_t, sin_t = np.cos(th)[:, None, None], np.sin(th)[:, None, None]
    dx = col[None, None, :] - f["center_x"].astype(np.float32)[:, None, None]  # [N, 1, R]
    dy = col[None, :, None] - f["center_y"].astype(np.float32)[:, None, None]  # [N, R, 1]
    u = dx * cos_t + dy * sin_t
    v = dy * cos_t - dx * sin_t
    ua, vb = u / a, v / b
    d = np.sqrt(ua * ua + vb * vb)
    grad = np.sqrt((ua / a) ** 2 + (vb / b) ** 2)  # |grad d| * d
    signed_px = (d - 1) * d / np.maximum(grad, 1e-12) * r
    mask = np.clip(0.5 - signed_px, 0.0, 1.0)[..., None]
    stain = STAIN_RGB[f["colour"].astype(np.int64)] + np.stack(
        [f["stain_r"], f["stain_g"], f["stain_b"]], -1)  # [N, 3]
    blob = (1 - _CHROMATIN * (chromatin + 0.5))[..., None] * stain.astype(np.float32)[:, None, None]

    image = background + mask * (blob - background)
    image *= f["brightness"].astype(np.float32)[:, None, None, None]
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image[0] if scalar else image


# ---------------------------------------------------------------------------------------------
# The random-access source.


class SyntheticConcepts:
    """Random-access source of synthetic examples (usable by grain's `MapDataset.source`).

    `source[i]` -> {"image": uint8 [R, R, 3], "label": int32, "index": int32,
                    "factors": {name: scalar}}.
    Different `split`s draw from independent random streams of the same distribution.
    With `cache=True` examples are rendered (vectorised) in chunks of `CHUNK` on first access and
    kept: fast random access at a memory cost of size * R * R * 3 bytes.
    """

    CHUNK = 256

    def __init__(self, variant: str = "blob_binary", resolution: int = 32, size: int = 10_000,
                 seed: int = 0, split: str = "train", cache: bool = True):
        self.variant = get_variant(variant)
        self.variant_name = variant
        if int(resolution) < 8:
            raise ValueError(f"resolution must be >= 8, got {resolution}")
        if int(size) < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} for synthetic data; known: {sorted(SPLITS)}")
        self.resolution, self.size, self.seed, self.split = int(resolution), int(size), int(seed), split
        self.cache = bool(cache)
        self._chunks: dict[int, dict] = {}

    @property
    def num_classes(self) -> int:
        return self.variant.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.variant.class_names

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (f"SyntheticConcepts(variant={self.variant_name!r}, resolution={self.resolution}, "
                f"size={self.size}, seed={self.seed}, split={self.split!r})")

    def __getstate__(self):  # worker processes re-render what they need
        return {**self.__dict__, "_chunks": {}}

    def _check_index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} examples")
        return index

    def factors(self, index: int) -> dict[str, np.ndarray]:
        return sample_factors(self.seed, self._check_index(index), self.split)

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        if not self.cache:
            factors = sample_factors(self.seed, index, self.split)
            return {"image": render(factors, self.resolution),
                    "label": label_from_factors(self.variant_name, factors),
                    "index": np.int32(index),
                    "factors": factors}
        c, i = divmod(index, self.CHUNK)
        chunk = self._chunks.get(c)
        if chunk is None:
            chunk = self._render(range(c * self.CHUNK, min(self.size, (c + 1) * self.CHUNK)))
            self._chunks[c] = chunk
        return {"image": chunk["image"][i].copy(), "label": chunk["label"][i], "index": chunk["index"][i],
                "factors": {k: v[i] for k, v in chunk["factors"].items()}}

    def _render(self, indices: Sequence[int]) -> dict:
        factors = stack_factors([sample_factors(self.seed, i, self.split) for i in indices])
        return {"image": render(factors, self.resolution),
                "label": label_from_factors(self.variant_name, factors),
                "index": np.asarray(indices, np.int32),
                "factors": factors}

    def arrays(self, indices: Sequence[int] | None = None) -> dict:
        """Many examples at once as stacked arrays (rendered in one vectorised call)."""
        indices = range(self.size) if indices is None else indices
        return self._render([self._check_index(i) for i in indices])


def make_synthetic_arrays(variant: str = "blob_binary", resolution: int = 32, size: int = 1000,
                          seed: int = 0, split: str = "train", start: int = 0) -> dict:
    """Examples `start .. start + size - 1` as numpy arrays (image uint8 NHWC, label, factors)."""
    src = SyntheticConcepts(variant, resolution, start + size, seed, split)
    return src.arrays(range(start, start + size))


# ---------------------------------------------------------------------------------------------
# Measuring factors back from pixels.

COLOUR_THRESHOLD = 0.0  # log(R / B) of the blob: pink about +0.4, purple about -0.75
STAIN_COLOUR_SCORES = np.log(STAIN_RGB[:, 0] / STAIN_RGB[:, 2])  # log(R / B) of each stain: +0.38, -0.75
ELONGATION_THRESHOLD = math.sqrt(ELONGATION)  # geometric mean of 1 (round) and ELONGATION
_MASK_THRESHOLD = 0.22  # |pixel - background| / 255 (RGB distance) that counts as blob
_MIN_AREA_FRACTION = 0.002
_HALF_CONTRAST = 0.5  # the outline: half of ...
_CONTRAST_PERCENTILE = 75  # ... this percentile of the detected blob's distance from the background


def _to_unit(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"measure_factors expects [N, H, W, 3] or [H, W, 3] images, got "
                         f"{images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float64) / 255.0
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 in [0, 255] or float in [-1, 1], got {images.dtype}")
    return (np.clip(images.astype(np.float64), -1, 1) + 1) / 2


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest connected region of a boolean mask (all False where the mask is empty)."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros_like(mask)
    return labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)


def measure_factors(images: np.ndarray) -> dict[str, np.ndarray]:
    """Estimates the blob's factors from images (uint8 [0, 255] or float [-1, 1], NHWC).

    The background colour is the per-image median; the blob is found where pixels are far from it
    (largest connected region), and outlined at half its own contrast with the background, so the
    geometry does not depend on the stain. Colour: sign of log(R / B) of the blob's mean colour;
    shape: axis ratio from the second moments of the outlined blob; size: sqrt(area / pi); rotation: major-axis angle mod pi;
    brightness: background luminance over the nominal one. `found` is False where no blob was
    seen (then colour and shape are -1 and the others NaN).
    """
    x = _to_unit(images)
    n, h, w, _ = x.shape
    bg = np.median(x.reshape(n, h * w, 3), axis=1)  # [N, 3]
    dist = np.linalg.norm(x - bg[:, None, None, :], axis=-1)  # [N, H, W]
    out = {k: np.full(n, np.nan) for k in ("colour_score", "elongation", "center_y", "center_x",
                                            "size", "rotation")}
    found = np.zeros(n, bool)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        mask = _largest_region(dist[i] > _MASK_THRESHOLD)
        if mask.sum() < max(3, _MIN_AREA_FRACTION * h * w):
            continue
        found[i] = True
        core = mask & (dist[i] > 0.5 * dist[i][mask].max())  # drop anti-aliased edge pixels
        mean = x[i][core].mean(axis=0)
        out["colour_score"][i] = math.log(max(mean[0], 1e-4) / max(mean[2], 1e-4))
        # The blob's outline for geometry: where a pixel is at least half as far from the background as
        # the blob's own interior is. A fixed threshold would put the outline of a soft edge further out
        # on the purple stain (farther from the background) than on the pink one, so a pure colour edit
        # by a generator with blurred edges would read as a size change.
        # (+1e-7: a pixel tied with the level counts the same whether the image came as uint8 or float)
        half = dist[i] > _HALF_CONTRAST * np.percentile(dist[i][mask], _CONTRAST_PERCENTILE) + 1e-7
        half &= ndimage.binary_dilation(mask, iterations=3)  # a faint blob's outline never joins the texture
        half = _largest_region(half)
        if half.sum() >= 3:
            mask = half
        area = int(mask.sum())
        py, px = (yy[mask] + 0.5) / h, (xx[mask] + 0.5) / w
        cy, cx = py.mean(), px.mean()
        cov = np.cov(np.stack([px - cx, py - cy]), bias=True) + np.eye(2) / (12 * h * w)
        evals = np.linalg.eigvalsh(cov)
        out["elongation"][i] = math.sqrt(evals[1] / max(evals[0], 1e-12))
        out["center_y"][i], out["center_x"][i] = cy, cx
        out["size"][i] = math.sqrt(area / (h * w) / math.pi)
        out["rotation"][i] = (0.5 * math.atan2(2 * cov[0, 1], cov[0, 0] - cov[1, 1])) % math.pi
    luminance = bg @ np.array([0.299, 0.587, 0.114])
    out["brightness"] = luminance / (BACKGROUND_RGB / 255.0 @ np.array([0.299, 0.587, 0.114]))
    out["colour"] = np.where(found, (out["colour_score"] < COLOUR_THRESHOLD).astype(np.int32), -1)
    out["shape"] = np.where(found, (out["elongation"] > ELONGATION_THRESHOLD).astype(np.int32), -1)
    out = {k: (v.astype(np.int32) if k in ("colour", "shape") else v.astype(np.float32))
           for k, v in out.items()}
    out["found"] = found
    return out


def colour_in_between(colour_score: np.ndarray) -> np.ndarray:
    """True where a measured blob colour is neither stain: closer to the threshold than to both stains.

    Why: `measure_factors` reads every blob as pink or purple by the sign of its score, so a generator
    that draws the average of the two stains (what an undertrained one does) would still read as one
    class. Rendered blobs are never in between (their scores sit within stain jitter of a stain's);
    NaN (no blob) is not in between.
    """
    score = np.asarray(colour_score, np.float64)
    low = COLOUR_THRESHOLD + 0.5 * (STAIN_COLOUR_SCORES.min() - COLOUR_THRESHOLD)
    high = COLOUR_THRESHOLD + 0.5 * (STAIN_COLOUR_SCORES.max() - COLOUR_THRESHOLD)
    with np.errstate(invalid="ignore"):
        return (score > low) & (score < high)


# Factors that `measure_factors` estimates reliably, with the change below which a difference between
# an image and its edit (a counterfactual, a concept drawing) is measurement noise: discrete factors
# must match exactly; size is a radius and centres are fractions of the image side; brightness is
# relative. Rotation is left out (undefined for round blobs).
MEASURED_TOLERANCES = {"colour": 0.0, "shape": 0.0, "size": 0.02, "center_y": 0.08, "center_x": 0.08,
                       "brightness": 0.06}


def measurement_outcomes(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pairs of measurements (`measure_factors` of an image and of its edit) whose factors cannot be
    compared, as outcomes of their own, in order of precedence:
    - "no blob in the input": nothing to change (colour and shape read -1 before);
    - "blob removed": the edit erased the blob (its colour would read -1: not a colour change);
    - "colour ambiguous": a colour in between the stains before or after (its sign is no class).
    """
    found_before, found_after = np.asarray(before["found"], bool), np.asarray(after["found"], bool)
    ambiguous = colour_in_between(before["colour_score"]) | colour_in_between(after["colour_score"])
    return {"no blob in the input": ~found_before, "blob removed": found_before & ~found_after,
            "colour ambiguous": ambiguous}


def measured_factor_roles(variant: str) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, float]]:
    """(causal, nuisance, tolerance) of the measured factors of `variant`, for factor-change metrics."""
    causal = get_variant(variant).causal
    nuisance = tuple(n for n in MEASURED_TOLERANCES if n not in causal)
    return causal, nuisance, dict(MEASURED_TOLERANCES)


__all__ = [
    "VARIANTS", "Variant", "get_variant", "factor_names", "label_from_factors", "sample_factors",
    "stack_factors", "flip_factors", "render", "SyntheticConcepts", "make_synthetic_arrays",
    "measure_factors", "MEASURED_TOLERANCES", "measured_factor_roles", "measurement_outcomes", "colour_in_between",
    "COLOUR_NAMES", "SHAPE_NAMES", "SPLITS",
]
