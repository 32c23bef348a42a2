"""Per-example image transforms: uint8 HWC images of any size -> float32 [-1, 1] at a fixed size.

Train: random-resized crop (area fraction `scale`, aspect ratio `ratio`) and/or horizontal flip.
Eval: square centre crop (a `crop_fraction` of the shorter side) resized to the output size.
The transforms are grain `Map` / `RandomMap` transforms: grain hands `RandomMap` a generator
seeded from (pipeline seed, element position), so the augmentation is deterministic and resumable.
Crops are integer pixel boxes taken by numpy slicing; resizing (only when the crop's size differs
from the output size) is Pillow's antialiased bilinear filter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np
from PIL import Image


def check_image(image: Any) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    return image


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return (np.asarray(image, np.float32) / np.float32(127.5) - 1).astype(np.float32)


def resize(image: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """Antialiased bilinear resize of a uint8 [H, W, 3] image (a no-op at the same size)."""
    width = height if width is None else width
    if image.shape[:2] == (height, width):
        return image
    out = Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(out, np.uint8)


def center_crop_box(height: int, width: int, crop_fraction: float = 1.0) -> tuple[int, int, int, int]:
    """(y0, x0, h, w) of the centred square covering `crop_fraction` of the shorter side."""
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    side = max(1, int(round(crop_fraction * min(height, width))))
    return (height - side) // 2, (width - side) // 2, side, side


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.35, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3),
                            attempts: int = 10) -> tuple[int, int, int, int]:
    """(y0, x0, h, w) of a random box with area fraction in `scale` and w/h in `ratio`.

    Tries `attempts` random boxes; if none fits (very elongated images), falls back to the largest
    centred box whose aspect ratio is clamped into `ratio`.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(rng.integers(0, height - h + 1))
            x0 = int(rng.integers(0, width - w + 1))
            return y0, x0, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, min(height, max(1, int(round(width / ratio[0]))))
    elif aspect > ratio[1]:
        h, w = height, min(width, max(1, int(round(height * ratio[1]))))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def crop(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    y0, x0, h, w = box
    return image[y0:y0 + h, x0:x0 + w]


def _check_range(name: str, value, lo_min: float, hi_max: float | None):
    lo, hi = (float(v) for v in value)
    if not (lo_min < lo <= hi and (hi_max is None or hi <= hi_max)):
        raise ValueError(f"{name} must satisfy {lo_min} < low <= high"
                         f"{'' if hi_max is None else f' <= {hi_max}'}, got {tuple(value)}")
    return lo, hi


def _finish(element: Mapping[str, Any], image: np.ndarray) -> dict:
    out = dict(element)
    out["image"] = to_float(image)
    if "label" in out:
        out["label"] = np.int32(out["label"])
    return out


class EvalTransform(grain.transforms.Map):
    """Centre crop (`crop_fraction` of the shorter side) -> resize -> float32 [-1, 1]."""

    def __init__(self, resolution: int, crop_fraction: float = 1.0):
        if int(resolution) < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        center_crop_box(1, 1, crop_fraction)  # validates
        self.resolution, self.crop_fraction = int(resolution), float(crop_fraction)

    def map(self, element: Mapping[str, Any]) -> dict:
        image = check_image(element["image"])
        image = crop(image, center_crop_box(*image.shape[:2], self.crop_fraction))
        return _finish(element, resize(image, self.resolution))


class TrainTransform(grain.transforms.RandomMap):
    """Random-resized crop (or the eval centre crop) + random horizontal flip -> float32 [-1, 1].

    `flip_factors`: applied to `element["factors"]` when the image is flipped, for data sets whose
    factors carry geometry (the synthetic concepts: centre x and rotation mirror).
    """

    def __init__(self, resolution: int, *, random_crop: bool = True,
                 scale: tuple[float, float] = (0.35, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                 crop_fraction: float = 1.0,
                 flip_factors: Callable[[Mapping], Mapping] | None = None):
        if int(resolution) < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        self.resolution = int(resolution)
        self.random_crop, self.flip = bool(random_crop), bool(flip)
        self.scale = _check_range("scale", scale, 0.0, 1.0)
        self.ratio = _check_range("ratio", ratio, 0.0, None)
        center_crop_box(1, 1, crop_fraction)
        self.crop_fraction = float(crop_fraction)
        self.flip_factors = flip_factors

    def random_map(self, element: Mapping[str, Any], rng: np.random.Generator) -> dict:
        image = check_image(element["image"])
        h, w = image.shape[:2]
        if self.random_crop:
            box = random_resized_crop_box(h, w, rng, self.scale, self.ratio)
        else:
            box = center_crop_box(h, w, self.crop_fraction)
        image = resize(crop(image, box), self.resolution)
        flipped = self.flip and rng.random() < 0.5
        if flipped:
            image = image[:, ::-1]
        out = _finish(element, image)
        if flipped and self.flip_factors is not None and "factors" in out:
            out["factors"] = self.flip_factors(out["factors"])
        return out


__all__ = [
    "check_image", "to_float", "resize", "center_crop_box", "random_resized_crop_box", "crop",
    "EvalTransform", "TrainTransform",
]
