"""Input pipelines: a data set name + options -> a deterministic, sharded, resumable batch iterator.

    ds = make_dataset(name="synthetic/blob_binary", split="train", resolution=32, batch_size=64,
                      train=True, seed=0)
    it = iter(ds)                       # a grain DatasetIterator
    batch = next(it)                    # {"image": f32 [B, H, W, 3] in [-1, 1], "label": i32 [B],
                                        #  "index": i32 [B], "factors": {...} (synthetic only)}
    state = iterator_state(it)          # JSON-able; save it with the model checkpoint
    it = make_iterator(config, state=state)   # continues with exactly the batches that followed

Order of the grain `MapDataset` (every step is lazy and index-based, hence random-access and
resumable): source -> [train: shuffle(seed), reshuffled every epoch] -> repeat(num_epochs) ->
per-example transform (augmentation seeded by (seed, stream position)) -> batch(batch_size) ->
this host's batches: global batch k is stream positions [k*B, (k+1)*B), B = batch_size *
shard_count, and host h reads its h-th contiguous block -> to_iter_dataset (optional reader
threads) -> [optional worker processes].
Each host therefore reads a disjoint part of one global stream, within an epoch the hosts together
see every example once, and the global batch (the hosts' blocks in host order) holds the same rows
in the same order whatever the host count; the iterator position counts global batches, the same
on every host. A finite pass (eval) is first cut to a multiple of `shard_count` so that every host
yields the same number of batches (up to shard_count - 1 examples are dropped); `drop_remainder`
(default: `train`) drops the last partial batch.

`batch_size` is per host (the trainer's global batch divided by `jax.process_count()`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from ml_collections import ConfigDict

from viscoin_jax.data import sources, synthetic, transforms

log = logging.getLogger(__name__)

AUGMENTATIONS = ("none", "flip", "crop", "crop_flip")


# ---------------------------------------------------------------------------------------------
# Options


def data_config(**overrides) -> Any:
    """The data options as an `ml_collections.ConfigDict` (for config files), with overrides."""
    c = ConfigDict(dataclasses.asdict(DataOptions()))
    for k, v in overrides.items():
        if k not in c:
            raise ValueError(f"unknown data option {k!r}; known: {sorted(c.keys())}")
        c[k] = v
    return c


@dataclasses.dataclass
class DataOptions:
    """All options of `make_dataset` (see the module docstring for their roles)."""

    name: str = "synthetic/blob_binary"  # one of known_datasets()
    split: str = "train"
    data_dir: str | None = None  # TFDS data_dir, or the root of nct_crc_he (<data_dir>/<split>/<class>/)
    resolution: int = 32
    batch_size: int = 32  # per host
    train: bool = True  # shuffle + augment + drop the last partial batch
    seed: int = 0  # shuffle and augmentation
    num_epochs: int | None = None  # None: forever when train, one pass otherwise
    shard_index: int | None = None  # None: jax.process_index()
    shard_count: int | None = None  # None: jax.process_count()
    augment: str | None = None  # None: the data set's default; else one of AUGMENTATIONS
    crop_scale: tuple = (0.35, 1.0)  # random-resized crop: area fraction ...
    crop_ratio: tuple = (3 / 4, 4 / 3)  # ... and aspect ratio range
    eval_crop_fraction: float = 1.0  # centre crop: this fraction of the shorter side
    bbox_crop: bool = True  # cub200: crop each image to its bird box first
    bad_images: str = "fail"  # image folders: "fail" listing unreadable files at the start, or "skip" them
    data_seed: int = 0  # synthetic: which examples (independent of the shuffle seed)
    synthetic_size: int | None = None  # synthetic: examples in the split (None: 10000 train, 2000 else)
    drop_remainder: bool | None = None  # None: = train
    read_threads: int = 0  # reader threads (in-process; order stays deterministic)
    prefetch_buffer: int = 64  # examples buffered by the reader threads (in whole batches)
    worker_count: int = 0  # worker processes (0: in-process)


def resolve_options(config: Any = None, **overrides) -> DataOptions:
    """Merges a config (ConfigDict, mapping or DataOptions) with keyword overrides; checks values."""
    if config is None:
        given: dict = {}
    elif isinstance(config, DataOptions):
        given = dataclasses.asdict(config)
    elif hasattr(config, "to_dict"):
        given = config.to_dict()
    elif isinstance(config, Mapping):
        given = dict(config)
    else:
        raise TypeError(f"config must be a ConfigDict, a mapping or DataOptions, got {type(config)}")
    given.update(overrides)
    known = {f.name for f in dataclasses.fields(DataOptions)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown data options {unknown}; known: {sorted(known)}")
    o = DataOptions(**given)
    if o.name not in DATASETS:
        raise ValueError(f"unknown data set {o.name!r}; known: {known_datasets()}")
    for field in ("resolution", "batch_size"):
        if int(getattr(o, field)) < 1:
            raise ValueError(f"{field} must be >= 1, got {getattr(o, field)}")
    if o.num_epochs is not None and int(o.num_epochs) < 1:
        raise ValueError(f"num_epochs must be >= 1 or None (forever when train), got {o.num_epochs}")
    if o.augment is not None and o.augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {o.augment!r}; known: {AUGMENTATIONS}")
    if o.bad_images not in sources.BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images must be one of {sources.BAD_IMAGE_POLICIES}, got {o.bad_images!r}")
    if not 0 <= int(o.seed) < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {o.seed}")
    if (o.shard_index is None) != (o.shard_count is None):
        raise ValueError("give both shard_index and shard_count, or neither (then the JAX process "
                         "index and count are used)")
    if o.shard_count is not None and not 0 <= int(o.shard_index) < int(o.shard_count):
        raise ValueError(f"need 0 <= shard_index < shard_count, got {o.shard_index}, {o.shard_count}")
    o.crop_scale, o.crop_ratio = tuple(o.crop_scale), tuple(o.crop_ratio)
    return o


# ---------------------------------------------------------------------------------------------
# The registry of data sets


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    description: str
    num_classes: int | None  # None: from the data (image folders)
    default_augment: str
    allow_crop: bool = True


DATASETS: dict[str, DatasetSpec] = {
    **{f"synthetic/{k}": DatasetSpec(f"synthetic stained blobs, {v.description}", v.num_classes,
                                     "flip", allow_crop=False)
       for k, v in synthetic.VARIANTS.items()},
    "cub200": DatasetSpec("TFDS caltech_birds2011 (CUB-200-2011), splits train/test", 200,
                          "crop_flip"),
    "colorectal_histology": DatasetSpec(
        "TFDS colorectal_histology (Kather 2016, 5000 images 150 px, 8 classes); it has only a "
        "'train' split: 'train' means train[:80%], 'test' train[80%:], other TFDS split strings "
        "pass through", 8, "crop_flip"),
    "nct_crc_he": DatasetSpec(
        "NCT-CRC-HE-100K style image folders: <data_dir>/<split>/<class>/<image> (e.g. "
        "NCT-CRC-HE-100K as train, CRC-VAL-HE-7K as test)", None, "crop_flip"),
}

_COLORECTAL_SPLITS = {"train": "train[:80%]", "test": "train[80%:]"}


def known_datasets() -> list[str]:
    return sorted(DATASETS)


def make_source(config: Any = None, **overrides):
    """The random-access source (before transforms) named by the options."""
    o = resolve_options(config, **overrides)
    if o.name.startswith("synthetic/"):
        size = o.synthetic_size or (10_000 if o.split == "train" else 2_000)
        return synthetic.SyntheticConcepts(o.name.split("/", 1)[1], o.resolution, size,
                                           seed=o.data_seed, split=o.split)
    if o.name == "cub200":
        return sources.TfdsSource("caltech_birds2011", o.split, o.data_dir, bbox_crop=o.bbox_crop)
    if o.name == "colorectal_histology":
        return sources.TfdsSource("colorectal_histology", _COLORECTAL_SPLITS.get(o.split, o.split),
                                  o.data_dir)
    if o.name == "nct_crc_he":
        if not o.data_dir:
            raise ValueError("nct_crc_he needs data_dir: the folder holding <split>/<class>/<image>")
        return sources.ImageFolderSource(Path(o.data_dir) / o.split, bad_images=o.bad_images)
    raise AssertionError(o.name)  # resolve_options checked the name


def _transform(o: DataOptions):
    spec = DATASETS[o.name]
    augment = (o.augment or spec.default_augment) if o.train else "none"
    if "crop" in augment and not spec.allow_crop:
        raise ValueError(f"augment={augment!r} is not allowed for {o.name}: random crops would move "
                         f"or cut the blob and invalidate its factors and label; use 'flip' or 'none'")
    if augment == "none":
        return transforms.EvalTransform(o.resolution, o.eval_crop_fraction)
    return transforms.TrainTransform(
        o.resolution, random_crop="crop" in augment, scale=o.crop_scale, ratio=o.crop_ratio,
        flip="flip" in augment, crop_fraction=o.eval_crop_fraction,
        flip_factors=synthetic.flip_factors if o.name.startswith("synthetic/") else None)


def _shard(o: DataOptions) -> tuple[int, int]:
    if o.shard_count is not None:
        return int(o.shard_index), int(o.shard_count)
    return jax.process_index(), jax.process_count()


def make_dataset(config: Any = None, *, source=None, **overrides) -> grain.IterDataset:
    """The batched grain data set of this host (`iter()` it for a fresh iterator).

    `config`: a ConfigDict / mapping / DataOptions of the fields of `DataOptions`; keyword
    overrides win. `source`: use this random-access source instead of the named one (tests).
    """
    o = resolve_options(config, **overrides)
    src = make_source(o) if source is None else source
    if len(src) == 0:
        raise ValueError(f"data set {o.name!r} split {o.split!r} is empty")
    shard_index, shard_count = _shard(o)
    num_epochs = o.num_epochs if (o.num_epochs is not None or o.train) else 1

    ds = grain.MapDataset.source(src)
    if o.train:
        ds = ds.shuffle(seed=int(o.seed))  # a different permutation each epoch
    ds = ds.repeat(num_epochs)
    if num_epochs is not None:
        usable = len(ds) - len(ds) % shard_count
        if usable == 0:
            raise ValueError(f"{len(ds)} examples cannot be split over {shard_count} hosts")
        if usable < len(ds):
            log.info("dropping the last %d examples so that %d hosts get equal shares",
                     len(ds) - usable, shard_count)
            ds = ds[:usable]
    transform = _transform(o)
    if isinstance(transform, grain.transforms.RandomMap):
        ds = ds.random_map(transform, seed=int(o.seed))
    else:
        ds = ds.map(transform)
    drop = o.train if o.drop_remainder is None else bool(o.drop_remainder)
    ds = _host_batches(ds, int(o.batch_size), shard_index, shard_count, drop,
                       finite=num_epochs is not None)
    # the reader threads read whole batches: the buffer holds about `prefetch_buffer` examples
    buffered = max(1, -(-int(o.prefetch_buffer) // int(o.batch_size)))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(o.read_threads),
                                              prefetch_buffer_size=buffered))
    if o.worker_count > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults are fine)
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(o.worker_count)))
    return it


def _host_batches(ds: grain.MapDataset, batch_size: int, shard_index: int, shard_count: int,
                  drop_remainder: bool, finite: bool) -> grain.MapDataset:
    """This host's batches: global batch k is the stream's positions [k * B, (k + 1) * B) with
    B = batch_size * shard_count, and host h reads its h-th contiguous block of batch_size rows. So
    the global batch (the hosts' blocks in host order) is the same rows in the same order whatever
    the number of hosts, and a host's position is the global batch count, the same on every host.
    A finite stream's last partial global batch (kept without `drop_remainder`; its length is a
    multiple of shard_count) is split into equal blocks too."""
    step = batch_size * shard_count
    if not finite:
        return ds.batch(batch_size)[shard_index::shard_count]
    full = len(ds) // step
    out = ds[: full * step].batch(batch_size)[shard_index::shard_count]
    rest = len(ds) - full * step
    if rest and not drop_remainder:
        share = rest // shard_count  # > 0: the stream was cut to a multiple of shard_count
        start = full * step + shard_index * share
        out = grain.MapDataset.concatenate([out, ds[start:start + share].batch(share)])
    return out


def make_iterator(config: Any = None, *, state: Any = None, source=None,
                  **overrides) -> grain.DatasetIterator:
    """A fresh iterator of `make_dataset(...)`, moved to `state` (from `iterator_state`) if given."""
    it = iter(make_dataset(config, source=source, **overrides))
    if state is not None:
        restore_iterator(it, state, batch_size=resolve_options(config, **overrides).batch_size)
    return it


def _plain(x):
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (bytes, bytearray)):
        return {"__bytes__": bytes(x).hex()}
    return x


def _unplain(x):
    if isinstance(x, Mapping):
        if set(x) == {"__bytes__"}:
            return bytes.fromhex(x["__bytes__"])
        return {k: _unplain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unplain(v) for v in x]
    return x


STATE_LAYOUT = "global-batches"  # tags a position counted in global batches (see _host_batches)


def iterator_state(it: grain.DatasetIterator) -> dict:
    """The iterator's position as a JSON-able dict (save it per host with the checkpoint). It counts
    global batches, so it is the same on every host and fits any host count with the same global
    batch."""
    state = {"layout": STATE_LAYOUT, "grain": _plain(it.get_state())}
    json.dumps(state)  # fails loudly here, not at checkpoint time
    return state


def restore_iterator(it: grain.DatasetIterator, state: Any, batch_size: int | None = None
                     ) -> grain.DatasetIterator:
    """Moves a fresh iterator of the same pipeline to `state`; returns it. A state saved before
    positions counted global batches (a bare grain state counting this host's examples) needs the
    per-host `batch_size` it was saved with, to be converted."""
    if isinstance(state, (str, bytes)):
        state = json.loads(state)
    if isinstance(state, Mapping) and state.get("layout") == STATE_LAYOUT:
        state = state["grain"]
    elif isinstance(state, Mapping) and set(state) == {"next_index"} and batch_size:
        log.info("data position saved as %d examples of this host: converted to %d batches",
                 state["next_index"], int(state["next_index"]) // batch_size)
        state = {"next_index": int(state["next_index"]) // batch_size}
    try:
        it.set_state(_unplain(state))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"data-iterator state does not fit this pipeline: {e}") from e
    return it


def steps_per_epoch(num_examples: int, batch_size: int, shard_count: int = 1) -> int:
    """Full per-host batches in one epoch of `num_examples` shared by `shard_count` hosts."""
    return (num_examples // shard_count) // batch_size


__all__ = [
    "DataOptions", "data_config", "resolve_options", "DATASETS", "DatasetSpec", "known_datasets",
    "AUGMENTATIONS", "make_source", "make_dataset", "make_iterator", "iterator_state",
    "restore_iterator", "steps_per_epoch", "STATE_LAYOUT",
]
