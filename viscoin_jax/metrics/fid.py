"""FID and KID: feature extractors, streaming feature statistics (float64) and the distances.

FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to Inception pool3
features of real and generated images; KID (Binkowski et al. 2018) is an unbiased MMD^2 estimate
with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets.

A value is only comparable with published numbers when the features come from the standard FID
Inception weights on uint8-quantised images resized to 299 (see docs/fid.md). Every extractor
carries that fact (`comparable_with_published`), and `FIDResult` carries it on to the report, so a
number computed with a fallback network can never pass for a standard FID.

Features are computed on device in float32; everything statistical is float64 numpy / scipy.

Several processes (a pod) share the work: each generates and features its contiguous block of the
samples (and of the real images), and the float64 statistics (count, mean, sum of squared
deviations; the rows themselves when KID needs them) are gathered once, so every process gets the
same FID. Sample batch i always draws from `fold_in(key(seed), i)`, whoever computes it: the FID
of N processes is the one-process FID up to the order of float64 sums. The functions that share
work are collective then: every process calls them, with the same arguments.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax import nnx
from jax.experimental import multihost_utils

from viscoin_jax.convert.inception_weights import (build_with_params, load_fid_inception, param_shapes,
                                                   unflatten_params)
from viscoin_jax.models.inception import FIDInceptionV3, fid_preprocess

STANDARD_EXTRACTOR_NAME = "fid-inception-v3"


# ----------------------------------------------------------------------------- feature extractors

class FeatureExtractor:
    """images [N, H, W, 3] in [-1, 1] (or uint8) -> features [N, D] float32, with a provenance label.

    `fn` does the work (jit it: it is called once per batch); `name` identifies the network so
    statistics from different extractors are never mixed; `comparable_with_published` is True only
    for the standard FID Inception.
    """

    def __init__(self, fn: Callable[[jax.Array], jax.Array], *, name: str, comparable_with_published: bool):
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name
        self.comparable_with_published = bool(comparable_with_published)

    def __call__(self, images: jax.Array) -> jax.Array:
        if not hasattr(images, "ndim"):
            images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [N, H, W, 3] (NHWC RGB, [-1, 1]), got shape {images.shape}")
        if images.dtype != jnp.uint8 and not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"images must be float in [-1, 1] or uint8, got dtype {images.dtype}")
        feats = self.fn(images)
        if feats.ndim == 4:  # feature maps: global average pool
            feats = jnp.mean(feats, axis=(1, 2))
        if feats.ndim != 2 or feats.shape[0] != images.shape[0]:
            raise ValueError(f"extractor {self.name!r} returned shape {feats.shape} for {images.shape[0]} images; "
                             "expected [N, D]")
        return feats.astype(jnp.float32)

    def __repr__(self) -> str:
        return f"FeatureExtractor(name={self.name!r}, comparable_with_published={self.comparable_with_published})"


def inception_extractor(model: FIDInceptionV3, *, name: str, comparable_with_published: bool,
                        input_size: int = 299) -> FeatureExtractor:
    """Jitted extractor: FID preprocessing (uint8 levels, bilinear resize to `input_size`, 299 for the
    standard) + the Inception's pool3."""
    if input_size < 75:
        raise ValueError(f"the Inception needs inputs of at least 75 px, got input_size={input_size}")
    graphdef, state = nnx.split(model)

    @jax.jit
    def features(state, images):
        return nnx.merge(graphdef, state)(fid_preprocess(images, input_size))

    return FeatureExtractor(lambda images: features(state, images), name=name,
                            comparable_with_published=comparable_with_published)


def random_fid_inception(seed: int, *, precision="highest") -> FIDInceptionV3:
    """The FID Inception with seeded He-normal kernels and zero biases (numpy RNG: fast, no compiles)."""
    def factory():
        return FIDInceptionV3(precision=precision, rngs=None)

    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(factory()).items():
        if name.endswith("kernel"):
            std = math.sqrt(2.0 / math.prod(shape[:-1]))
            params[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        else:
            params[name] = np.zeros(shape, np.float32)
    return build_with_params(factory, unflatten_params(params), "random FID Inception")


def make_fid_extractor(weights_path: str | os.PathLike | None = None, *,
                       fallback: str | Callable[[jax.Array], jax.Array] | None = "random-inception",
                       fallback_name: str | None = None, seed: int = 0, precision="highest",
                       fallback_input_size: int = 299) -> FeatureExtractor:
    """The standard FID extractor from `weights_path`, or -- with a warning -- a labelled fallback.

    weights_path: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (needs torch) or its
      conversion (`.npz` or Orbax dir, see `convert_fid_inception`). A path that does not exist is
      an error; only `None` selects the fallback.
    fallback (used when weights_path is None): "random-inception" (the FID Inception randomly
      initialised with `seed`), a callable images -> [N, D] features (or [N, h, w, C] maps, which
      are average-pooled; e.g. the classifier's pooled features), or None to refuse (ValueError).
    fallback_input_size: the random Inception's input size (>= 75). Smaller than 299 makes the
      fallback much cheaper on CPU; its values are not comparable with published FIDs either way.
    """
    if weights_path is not None:
        model = load_fid_inception(weights_path, precision=precision)
        return inception_extractor(model, name=STANDARD_EXTRACTOR_NAME, comparable_with_published=True)
    if fallback is None:
        raise ValueError("no FID Inception weights given (weights_path=None) and fallback=None; "
                         "see docs/fid.md for the weight file")
    if isinstance(fallback, str):
        if fallback != "random-inception":
            raise ValueError(f"unknown fallback {fallback!r}: use 'random-inception' or a feature callable")
        name = fallback_name or f"random-inception-seed{seed}" + (
            f"-{fallback_input_size}px" if fallback_input_size != 299 else "")
        extractor = inception_extractor(random_fid_inception(seed, precision=precision), name=name,
                                        comparable_with_published=False, input_size=fallback_input_size)
    elif callable(fallback):
        name = fallback_name or getattr(fallback, "__name__", None) or type(fallback).__name__
        extractor = FeatureExtractor(fallback, name=name, comparable_with_published=False)
    else:
        raise ValueError(f"fallback must be 'random-inception', a callable or None, got {type(fallback).__name__}")
    warnings.warn(f"No FID Inception weights given: features come from {extractor.name!r}. FID/KID values are "
                  "NOT comparable with published numbers (see docs/fid.md for the standard weights).",
                  UserWarning, stacklevel=2)
    return extractor


# ----------------------------------------------------------------------------- statistics

class FeatureStats:
    """Streaming mean and covariance of features in float64 (Chan et al.'s pairwise update).

    `update` may be called with batches of any size; `mean` and `cov` (unbiased, like np.cov) equal
    the statistics of all rows seen. `keep_features=True` also keeps the rows (needed for KID).
    `extractor_name` records which network produced the features.
    """

    def __init__(self, *, keep_features: bool = False, extractor_name: str | None = None):
        self.keep_features = keep_features
        self.extractor_name = extractor_name
        self.n = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None  # sum of outer products of deviations from the mean
        self._rows: list[np.ndarray] = []

    @property
    def dim(self) -> int | None:
        return None if self._mean is None else self._mean.shape[0]

    def update(self, features: Any) -> None:
        if isinstance(features, jax.Array) and not features.is_fully_addressable:
            features = multihost_utils.process_allgather(features, tiled=True)
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {x.shape}")
        if self.dim is not None and x.shape[1] != self.dim:
            raise ValueError(f"feature dimension changed from {self.dim} to {x.shape[1]}")
        if not np.all(np.isfinite(x)):
            raise ValueError("features contain NaN or inf")
        nb = x.shape[0]
        if nb == 0:
            return
        mean_b = x.mean(axis=0)
        dev = x - mean_b
        m2_b = dev.T @ dev
        if self.n == 0:
            self._mean, self._m2 = mean_b, m2_b
        else:
            n = self.n + nb
            delta = mean_b - self._mean
            self._mean = self._mean + delta * (nb / n)
            self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.n * nb / n)
        self.n += nb
        if self.keep_features:
            self._rows.append(x)

    def merge(self, other: "FeatureStats") -> None:
        """Adds the rows `other` saw (after this one's: kept rows stay in that order)."""
        if other.n == 0:
            return
        if self.dim is not None and other.dim != self.dim:
            raise ValueError(f"feature dimension {other.dim} differs from {self.dim}")
        if self.keep_features and not other.keep_features:
            raise ValueError("cannot merge statistics without their rows into ones that keep them")
        if self.n == 0:
            self._mean, self._m2 = other._mean.copy(), other._m2.copy()
        else:
            n = self.n + other.n
            delta = other._mean - self._mean
            self._mean = self._mean + delta * (other.n / n)
            self._m2 = self._m2 + other._m2 + np.outer(delta, delta) * (self.n * other.n / n)
        self.n += other.n
        if self.keep_features:
            self._rows.append(other.features)

    @property
    def mean(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("no features accumulated")
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature rows, have {self.n}")
        return self._m2 / (self.n - 1)

    @property
    def features(self) -> np.ndarray:
        if not self.keep_features:
            raise ValueError("features were not kept (create FeatureStats(keep_features=True))")
        return np.concatenate(self._rows, axis=0) if self._rows else np.zeros((0, self.dim or 0))

    def save(self, path: str | os.PathLike) -> None:
        """Save to `.npz` (e.g. to reuse the real-image statistics across evaluations)."""
        if self.n == 0:
            raise ValueError("no features accumulated")
        arrays = dict(n=np.int64(self.n), mean=self._mean, m2=self._m2,
                      extractor_name=np.str_(self.extractor_name or ""))
        if self.keep_features:
            arrays["features"] = self.features
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such statistics file: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = {"n", "mean", "m2", "extractor_name"} - set(data.files)
                if missing:
                    raise ValueError(f"missing arrays {sorted(missing)}")
                stats = cls(keep_features="features" in data.files, extractor_name=str(data["extractor_name"]) or None)
                stats.n = int(data["n"])
                stats._mean = np.asarray(data["mean"], np.float64)
                stats._m2 = np.asarray(data["m2"], np.float64)
                if stats.keep_features:
                    stats._rows = [np.asarray(data["features"], np.float64)]
        except Exception as e:  # corrupt archive, wrong arrays, ...
            raise ValueError(f"{path} is not a FeatureStats file: {e}") from e
        d = stats._mean.shape[0] if stats._mean.ndim == 1 else -1
        if d < 1 or stats._m2.shape != (d, d) or stats.n < 1:
            raise ValueError(f"{path} is not a FeatureStats file: inconsistent shapes")
        return stats


# ----------------------------------------------------------------------------- several processes

def process_block(num_items: int, batch_size: int) -> tuple[int, int]:
    """(start, stop): this process's contiguous block of rows of `num_items`, whole batches of
    `batch_size` (batch i is rows [i * batch_size, (i + 1) * batch_size)) divided as evenly as the
    batch count allows; (0, num_items) when one process runs. The blocks follow the process order,
    so concatenating them gives the rows in order."""
    batches = math.ceil(num_items / batch_size)
    p, count = jax.process_index(), jax.process_count()
    first, last = p * batches // count, (p + 1) * batches // count
    return min(first * batch_size, num_items), min(last * batch_size, num_items)


def _allgather_exact(x: np.ndarray) -> np.ndarray:
    """[P, *x.shape]: x from every process, bit for bit (float64 travels as uint32 pairs: JAX
    would otherwise round it to float32)."""
    x = np.ascontiguousarray(x)
    words = x.reshape(-1).view(np.uint32) if x.dtype == np.float64 else x.reshape(-1)
    out = np.asarray(multihost_utils.process_allgather(words))
    out = np.ascontiguousarray(out).view(np.float64) if x.dtype == np.float64 else out
    return out.reshape((-1,) + x.shape)


def all_processes(stats: FeatureStats) -> FeatureStats:
    """The statistics of every process's rows (in process order), on every process; `stats`
    itself when one process runs. Collective: every process calls it. Gathers (n, mean, sum of
    squared deviations) in float64, and the kept rows (padded to the longest) when there are any."""
    if jax.process_count() == 1:
        return stats
    sizes = _allgather_exact(np.asarray([stats.n, stats.dim or 0], np.int32))
    dim = int(sizes[:, 1].max())
    if dim == 0:
        return FeatureStats(keep_features=stats.keep_features, extractor_name=stats.extractor_name)
    if any(d not in (0, dim) for d in sizes[:, 1]):
        raise ValueError(f"the processes' features have different dimensions: {sorted(set(sizes[:, 1]))}")
    mean = stats._mean if stats.n else np.zeros(dim)
    m2 = stats._m2 if stats.n else np.zeros((dim, dim))
    means, m2s = _allgather_exact(np.asarray(mean, np.float64)), _allgather_exact(np.asarray(m2, np.float64))
    rows = None
    if stats.keep_features:
        longest = int(sizes[:, 0].max())
        mine = np.zeros((longest, dim))
        if stats.n:
            mine[:stats.n] = stats.features
        rows = _allgather_exact(mine)
    out = FeatureStats(keep_features=stats.keep_features, extractor_name=stats.extractor_name)
    for k, (n, _) in enumerate(sizes):
        part = FeatureStats(keep_features=stats.keep_features)
        if n:
            part.n, part._mean, part._m2 = int(n), means[k], m2s[k]
            if rows is not None:
                part._rows = [rows[k, :n]]
        out.merge(part)
    return out


# ----------------------------------------------------------------------------- distances

def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64 (the standard FID formula).

    If scipy's sqrtm of S1 S2 is not finite (singular product), `eps` is added to both diagonals
    and it is retried. A complex result whose diagonal has an imaginary part above 1e-3 is an error
    (the covariances are not valid); smaller imaginary parts are numerical noise and dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,):
        raise ValueError(f"means must be vectors of the same length, got {mu1.shape} and {mu2.shape}")
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"covariances must be [{d}, {d}], got {s1.shape} and {s2.shape}")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or inf")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.all(np.isfinite(covmean)):
        warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonals", RuntimeWarning,
                      stacklevel=2)
        offset = np.eye(d) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:
            raise ValueError(f"FID: sqrtm(S1 S2) has an imaginary diagonal component of {imag:.3g}; "
                             "are the covariances symmetric positive semi-definite?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def kernel_inception_distance(real_features: np.ndarray, fake_features: np.ndarray, *, num_subsets: int = 100,
                              max_subset_size: int = 1000, seed: int = 0) -> float:
    """Unbiased MMD^2 with kernel (x.y / d + 1)^3, averaged over random subsets (as StyleGAN2-ADA).

    m = min(n_real, n_fake, max_subset_size). For each subset, with rng = np.random.default_rng(seed),
    fake rows rng.choice(n_fake, m, replace=False) are drawn first, then real rows likewise; the
    estimate is mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j).
    """
    x_all = np.asarray(fake_features, np.float64)
    y_all = np.asarray(real_features, np.float64)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got {y_all.shape} (real), {x_all.shape} (fake)")
    if num_subsets < 1 or max_subset_size < 2:
        raise ValueError(f"need num_subsets >= 1 and max_subset_size >= 2, got {num_subsets}, {max_subset_size}")
    d = x_all.shape[1]
    m = min(x_all.shape[0], y_all.shape[0], max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 real and 2 fake feature rows, "
                         f"got {y_all.shape[0]} and {x_all.shape[0]}")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = x_all[rng.choice(x_all.shape[0], m, replace=False)]
        y = y_all[rng.choice(y_all.shape[0], m, replace=False)]
        kxx = (x @ x.T / d + 1.0) ** 3
        kyy = (y @ y.T / d + 1.0) ** 3
        kxy = (x @ y.T / d + 1.0) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        total += within - 2.0 * kxy.sum() / (m * m)
    return float(total / num_subsets)


# ----------------------------------------------------------------------------- end to end

@dataclasses.dataclass(frozen=True)
class FIDResult:
    """A FID value with its provenance: which extractor, whether comparable with published FIDs."""

    value: float
    extractor_name: str
    comparable: bool
    n_real: int
    n_fake: int
    kid: float | None = None

    def __str__(self) -> str:
        note = "" if self.comparable else " (NOT comparable with published FIDs)"
        kid = "" if self.kid is None else f", KID {self.kid:.5f}"
        return (f"FID {self.value:.3f}{kid} [{self.extractor_name}; {self.n_real} real / {self.n_fake} fake]{note}")


ImageSource = Any  # array [N, H, W, 3], or an iterable of such arrays or of batch dicts with "image"


def _batches(source: ImageSource, what: str) -> Iterable[Any]:
    if isinstance(source, (np.ndarray, jax.Array)):
        yield source
        return
    if isinstance(source, (str, bytes, dict)) or not isinstance(source, Iterable):
        raise ValueError(f"{what} images must be an array, an iterable of arrays or of batch dicts, "
                         f"or FeatureStats; got {type(source).__name__}")
    for batch in source:
        if isinstance(batch, dict):
            if "image" not in batch:
                raise ValueError(f"{what} batch dict has no 'image' key (keys: {sorted(batch)})")
            batch = batch["image"]
        yield batch


def _accumulate(stats: FeatureStats, extractor: FeatureExtractor, images: Any, batch_size: int,
                limit: int | None) -> None:
    """Run the extractor in fixed-size chunks (the last zero-padded, so nothing recompiles)."""
    images = images if isinstance(images, jax.Array) else np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"image batches must be [N, H, W, 3], got shape {images.shape}")
    for start in range(0, images.shape[0], batch_size):
        if limit is not None and stats.n >= limit:
            return
        chunk = images[start:start + batch_size]
        keep = chunk.shape[0] if limit is None else min(chunk.shape[0], limit - stats.n)
        if chunk.shape[0] < batch_size:
            pad = [(0, batch_size - chunk.shape[0])] + [(0, 0)] * 3
            chunk = jnp.pad(chunk, pad) if isinstance(chunk, jax.Array) else np.pad(chunk, pad)
        stats.update(np.asarray(extractor(chunk))[:keep])


def _rows(images: ImageSource, start: int, stop: int) -> Iterable[Any]:
    """The parts of the source's batches that hold its rows [start, stop), in order (no batch
    after `stop` is read)."""
    seen = 0
    for batch in _batches(images, "real"):
        if seen >= stop:
            return
        n = batch.shape[0]
        if seen + n > start:
            yield batch[max(start - seen, 0):min(stop - seen, n)]
        seen += n


def feature_stats(images: ImageSource, extractor: FeatureExtractor, *, batch_size: int = 64,
                  max_items: int | None = None, keep_features: bool = False,
                  split_processes: bool = True) -> FeatureStats:
    """Feature statistics of an image array or an iterable of image batches (at most max_items).

    Under several processes, when the row count is known (`max_items`, or an array), each process
    features its block of rows (`process_block`) and the statistics are gathered
    (`all_processes`): collective, the same statistics on every process. Otherwise (or with
    `split_processes=False`) every process features every row."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stats = FeatureStats(keep_features=keep_features, extractor_name=extractor.name)
    total = max_items
    if isinstance(images, (np.ndarray, jax.Array)):
        total = images.shape[0] if total is None else min(total, images.shape[0])
        # a global array is sliced by every process alike (`update` gathers its features)
        split_processes = split_processes and getattr(images, "is_fully_addressable", True)
    if split_processes and jax.process_count() > 1 and total is not None:
        start, stop = process_block(total, batch_size)
        for part in _rows(images, start, stop):
            _accumulate(stats, extractor, part, batch_size, None)
        return all_processes(stats)
    for batch in _batches(images, "real"):
        if max_items is not None and stats.n >= max_items:
            break
        _accumulate(stats, extractor, batch, batch_size, max_items)
    return stats


def generated_feature_stats(generator_fn: Callable[[jax.Array, int], jax.Array], extractor: FeatureExtractor,
                            n_samples: int, *, batch_size: int = 64, seed: int = 0,
                            keep_features: bool = False, split_processes: bool = True) -> FeatureStats:
    """Feature statistics of n_samples images from generator_fn(key, batch_size) -> [B, H, W, 3].

    Batch i uses jax.random.fold_in(jax.random.key(seed), i); every call asks for a full batch (one
    compiled shape) and surplus images of the last batch are dropped. Under several processes each
    generates its block of batches (`process_block`) and the statistics are gathered: collective,
    the same samples and statistics as one process computes (unless `split_processes=False`).
    """
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"n_samples and batch_size must be >= 1, got {n_samples}, {batch_size}")
    stats = FeatureStats(keep_features=keep_features, extractor_name=extractor.name)
    key = jax.random.key(seed)
    split = split_processes and jax.process_count() > 1
    start, stop = process_block(n_samples, batch_size) if split else (0, n_samples)
    for i in range(start // batch_size, math.ceil(stop / batch_size)):
        images = generator_fn(jax.random.fold_in(key, i), batch_size)
        if images.shape[0] != batch_size:
            raise ValueError(f"generator_fn returned {images.shape[0]} images, asked for {batch_size}")
        stats.update(np.asarray(extractor(images))[:min(batch_size, n_samples - i * batch_size)])
    return all_processes(stats) if split else stats


def compute_fid(real: ImageSource | FeatureStats, generator_fn: Callable[[jax.Array, int], jax.Array] | ImageSource,
                extractor: FeatureExtractor, n_samples: int | None = None, batch_size: int = 64, *,
                seed: int = 0, n_real: int | None = None, kid: bool = False,
                kid_subsets: int = 100, kid_subset_size: int = 1000) -> FIDResult:
    """FID (and optionally KID) between real images and a generator's (or given) fake images.

    real: [N, H, W, 3] array, iterable of arrays / batch dicts ({"image": ...}), or precomputed
      FeatureStats (from `feature_stats` with the same extractor). At most `n_real` images are used.
    generator_fn: callable(key, batch_size) -> images (then n_samples is required), or fake images
      given like `real` (then n_samples, if given, caps how many are used).
    Images are [-1, 1] float (quantised to uint8 levels by the standard extractor) or uint8.
    Under several processes it is collective and splits the work (`feature_stats`,
    `generated_feature_stats`); every process gets the same result.
    """
    if isinstance(real, FeatureStats):
        real_stats = real
        if real_stats.extractor_name is not None and real_stats.extractor_name != extractor.name:
            raise ValueError(f"real statistics were computed with {real_stats.extractor_name!r}, "
                             f"not with the extractor {extractor.name!r}")
        if kid and not real_stats.keep_features:
            raise ValueError("KID needs the real features: build the real FeatureStats with keep_features=True")
    else:
        real_stats = feature_stats(real, extractor, batch_size=batch_size, max_items=n_real, keep_features=kid)
    if callable(generator_fn):
        if n_samples is None:
            raise ValueError("n_samples is required when generator_fn is a function")
        fake_stats = generated_feature_stats(generator_fn, extractor, n_samples, batch_size=batch_size, seed=seed,
                                             keep_features=kid)
    else:
        fake_stats = feature_stats(generator_fn, extractor, batch_size=batch_size, max_items=n_samples,
                                   keep_features=kid)
    for what, stats in (("real", real_stats), ("fake", fake_stats)):
        if stats.n < 2:
            raise ValueError(f"FID needs at least 2 {what} images, got {stats.n}")
    value = frechet_distance(real_stats.mean, real_stats.cov, fake_stats.mean, fake_stats.cov)
    kid_value = None
    if kid:
        kid_value = kernel_inception_distance(real_stats.features, fake_stats.features, num_subsets=kid_subsets,
                                              max_subset_size=kid_subset_size, seed=seed)
    return FIDResult(value=value, extractor_name=extractor.name, comparable=extractor.comparable_with_published,
                     n_real=real_stats.n, n_fake=fake_stats.n, kid=kid_value)
