"""Random-access sources of real images for grain: TFDS (ArrayRecord) data sets and image folders.

Every source returns examples {"image": uint8 [H, W, 3], "label": int32, "index": int32}; images
may differ in size (the transforms bring them to a fixed resolution).

- `TfdsSource` reads a prepared TFDS data set through `tfds.data_source` (ArrayRecord; no
  TensorFlow needed), e.g. `caltech_birds2011` (CUB-200, optionally cropped to its bird box) and
  `colorectal_histology`. It never downloads: a data set that is not prepared is an error that says
  how to prepare it.
- `ImageFolderSource` reads a tree with one folder per class (e.g. NCT-CRC-HE-100K) with Pillow;
  class indices follow the sorted folder names. Every file is checked when the source is opened,
  so that an unreadable one fails the run at its start (listing the bad files) instead of killing
  it mid-way, or, with `bad_images="skip"`, is left out with a warning that counts them.

16-bit images (PNG/TIFF grayscale, Pillow modes I;16 and I) are scaled to 8 bits, not clipped.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
BAD_IMAGE_POLICIES = ("fail", "skip")


# ---------------------------------------------------------------------------------------------
# TFDS


def crop_to_bbox(image: np.ndarray, bbox: Sequence[float]) -> np.ndarray:
    """Crops to a TFDS box [ymin, xmin, ymax, xmax] in [0, 1] (outward to whole pixels).

    Each coordinate pair is ordered before use, and the crop keeps at least one pixel.
    """
    bbox = np.asarray(bbox, np.float64)
    if bbox.shape != (4,) or not np.all(np.isfinite(bbox)):
        raise ValueError(f"bbox must be 4 finite numbers [ymin, xmin, ymax, xmax], got {bbox}")
    h, w = image.shape[:2]
    y_lo, y_hi = sorted(np.clip(bbox[[0, 2]], 0.0, 1.0))
    x_lo, x_hi = sorted(np.clip(bbox[[1, 3]], 0.0, 1.0))
    y0, x0 = min(int(math.floor(y_lo * h)), h - 1), min(int(math.floor(x_lo * w)), w - 1)
    y1, x1 = max(int(math.ceil(y_hi * h)), y0 + 1), max(int(math.ceil(x_hi * w)), x0 + 1)
    return image[y0:y1, x0:x1]


def _prepare_hint(name: str, data_dir) -> str:
    where = f"--data_dir={data_dir}" if data_dir else "--data_dir=DIR (then pass data_dir=DIR)"
    return (f"prepare it once on a machine with TensorFlow and internet access: `tfds build {name} "
            f"--file_format=array_record {where}` (or copy a prepared ArrayRecord copy there); "
            f"the data loader reads it without TensorFlow and never downloads")


def open_tfds(name: str, split: str, data_dir: str | os.PathLike | None = None):
    """`tfds.data_source(name, split)` of an already prepared data set; clear errors otherwise."""
    import tensorflow_datasets as tfds  # slow import: only when a TFDS data set is used

    if data_dir is not None and not Path(data_dir).is_dir():
        raise FileNotFoundError(f"TFDS data_dir {data_dir} does not exist; "
                                f"{_prepare_hint(name, data_dir)}")
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"TFDS has no data set named {name!r}") from e
    except (NotImplementedError, KeyError, FileNotFoundError, AssertionError) as e:
        raise FileNotFoundError(
            f"TFDS data set {name!r} (split {split!r}) is not prepared in ArrayRecord format under "
            f"{data_dir or 'the default TFDS data dir'}: {_prepare_hint(name, data_dir)}. "
            f"(TFDS said: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    except ValueError as e:  # e.g. a bad split string
        raise ValueError(f"cannot open TFDS data set {name!r} split {split!r}: {e}") from e


class TfdsSource:
    """A prepared TFDS data set as {"image", "label", "index"} examples.

    `bbox_crop=True` crops each image to its `bbox` feature (CUB-200's bird box).
    """

    def __init__(self, name: str, split: str, data_dir: str | os.PathLike | None = None, *,
                 bbox_crop: bool = False, image_key: str = "image", label_key: str = "label"):
        self.name, self.split, self.bbox_crop = name, split, bool(bbox_crop)
        self.image_key, self.label_key = image_key, label_key
        self._source = open_tfds(name, split, data_dir)
        features = self._source.dataset_info.features
        for key in (image_key, label_key) + (("bbox",) if bbox_crop else ()):
            if key not in features:
                raise ValueError(f"TFDS data set {name!r} has no feature {key!r} "
                                 f"(features: {sorted(features.keys())})")
        self.class_names = tuple(features[label_key].names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, bbox_crop={self.bbox_crop})"

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        record = self._source[index]
        image = np.asarray(record[self.image_key])
        if image.ndim == 3 and image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        if self.bbox_crop:
            image = crop_to_bbox(image, record["bbox"])
        return {"image": image, "label": np.int32(record[self.label_key]), "index": np.int32(index)}


# ---------------------------------------------------------------------------------------------
# Image folders


def _to_rgb8(im: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3]; 16-bit grayscale (I;16*, I) is scaled by 255/65535 instead of clipped."""
    if im.mode.startswith("I;16") or im.mode == "I":
        gray = np.asarray(im).astype(np.float64)
        gray = np.rint(np.clip(gray, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"), np.uint8)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 [H, W, 3] RGB; ValueError naming the file if Pillow cannot read it."""
    try:
        with Image.open(path) as im:
            return _to_rgb8(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def check_image(path: str | os.PathLike) -> str | None:
    """None when Pillow can identify and verify the file (header and, for PNG, chunk checksums,
    without decoding it), else the reason it cannot."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


_CHECKED: dict[tuple, dict[str, str]] = {}  # file list with sizes and mtimes -> bad files


def find_bad_images(paths: Sequence[str | os.PathLike], threads: int = 8) -> dict[str, str]:
    """{path: reason} of the files Pillow cannot read (checked in parallel threads; a folder
    opened again unchanged, e.g. for each evaluation, is not checked again)."""
    def stat(p):
        try:
            st = os.stat(p)
            return str(p), st.st_size, st.st_mtime_ns
        except OSError:
            return str(p), -1, -1
    key = tuple(stat(p) for p in paths)
    if key not in _CHECKED:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            reasons = list(pool.map(check_image, paths))
        _CHECKED[key] = {str(p): r for p, r in zip(paths, reasons) if r is not None}
    return dict(_CHECKED[key])


class ImageFolderSource:
    """Images under `root/<class name>/*.{png,jpg,tif,...}`; label = index of the sorted class name.

    The file list is built once (sorted, so indices are the same on every host) and every file
    is checked (`check_image`): unreadable ones raise a ValueError listing them
    (`bad_images="fail"`), or are left out with a warning that counts them (`"skip"`).
    """

    def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 bad_images: str = "fail"):
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist (expected one "
                                    f"sub-folder per class)")
        exts = tuple(e.lower() for e in extensions)
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            stray = [p.name for p in root.iterdir() if p.suffix.lower() in exts]
            raise ValueError(f"no class folders in {root}: expected {root}/<class>/<image> "
                             + (f"(found {len(stray)} images directly in it)" if stray else ""))
        files, labels = [], []
        for label, name in enumerate(classes):
            found = sorted(p.name for p in (root / name).iterdir()
                           if p.is_file() and p.suffix.lower() in exts)
            if not found:
                raise ValueError(f"class folder {root / name} has no images with extensions {exts}")
            files += [os.path.join(name, f) for f in found]
            labels += [label] * len(found)
        bad = find_bad_images([root / f for f in files])
        if bad and bad_images == "fail":
            listed = "; ".join(f"{p} ({r})" for p, r in list(bad.items())[:10])
            more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise ValueError(f"{len(bad)} of {len(files)} images in {root} cannot be read: "
                             f"{listed}{more} (remove them, or set the data option "
                             "bad_images='skip' to leave them out)")
        if bad:
            keep = [i for i, f in enumerate(files) if str(root / f) not in bad]
            log.warning("skipping %d unreadable images of %d in %s (bad_images='skip'), e.g. %s",
                        len(bad), len(files), root, next(iter(bad)))
            files, labels = [files[i] for i in keep], [labels[i] for i in keep]
            empty = [c for i, c in enumerate(classes) if i not in set(labels)]
            if empty:
                raise ValueError(f"class folders {empty} of {root} have no readable images")
        self.skipped = len(bad)
        self.root, self.class_names = root, tuple(classes)
        self.files, self.labels = files, np.asarray(labels, np.int32)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"ImageFolderSource({str(self.root)!r}, {len(self)} images, {self.num_classes} classes)"

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        return {"image": load_image(self.root / self.files[index]), "label": self.labels[index],
                "index": np.int32(index)}


class Subset:
    """Examples `indices` of a random-access source, in that order (their "index" unchanged)."""

    def __init__(self, source, indices: Sequence[int]):
        self.source, self.indices = source, [int(i) for i in indices]
        self.class_names = getattr(source, "class_names", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.source[self.indices[int(index)]]

    def __repr__(self) -> str:
        return f"Subset({self.source!r}, {len(self)} examples)"


def class_balanced_order(labels: Sequence[int]) -> list[int]:
    """Indices that take the classes in turn (each in its own order), so that any prefix holds
    every class about equally, e.g. for an evaluation capped at a few batches of a split stored
    class by class."""
    labels = np.asarray(labels)
    per_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = []
    for rank in range(max((len(p) for p in per_class), default=0)):
        order += [int(p[rank]) for p in per_class if rank < len(p)]
    return order


__all__ = ["IMAGE_EXTENSIONS", "BAD_IMAGE_POLICIES", "crop_to_bbox", "open_tfds", "TfdsSource",
           "load_image", "check_image", "find_bad_images", "ImageFolderSource", "Subset",
           "class_balanced_order"]
