"""The data a trainer reads: this process's rows of each global training batch (resumable), one
ordered pass over an evaluation split, and evaluations run on global batches assembled from every
process's rows, so every process gets the same numbers whatever the process count.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from ..data import pipeline, sources
from . import mesh as mesh_lib
from .monitor import to_host

log = logging.getLogger(__name__)


class DataBatches:
    """A grain iterator seen by the loop: numpy batches restricted to `keys`, resumable as JSON."""

    def __init__(self, iterator, keys: Sequence[str]):
        self.iterator, self.keys = iterator, tuple(keys)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.iterator)
        missing = [k for k in self.keys if k not in batch]
        if missing:
            raise KeyError(f"data batches lack {missing}; they have {sorted(batch)}")
        return {k: np.asarray(batch[k]) for k in self.keys}

    def get_state(self) -> dict:
        return pipeline.iterator_state(self.iterator)

    def set_state(self, state: dict) -> None:
        pipeline.restore_iterator(self.iterator, state)


def train_batches(config: Any, data_state: Any, keys=("image", "label"), seed_offset: int = 0
                  ) -> DataBatches:
    """The training stream of `config.data` (this process's rows of each global batch)."""
    local = mesh_lib.local_batch_size(config.train.batch_size)
    data = config.data.to_dict() if hasattr(config.data, "to_dict") else dict(config.data)
    data.update(batch_size=local, train=True, seed=int(data.get("seed", 0)) + seed_offset)
    it = pipeline.make_iterator(data, state=data_state)
    return DataBatches(it, keys)


def eval_extent(config: Any, max_batches: int | None = -1) -> str:
    """What an evaluation pass covers, for a log line: `test split (at most 4 batches of 64)` or
    `whole test split`. `max_batches` -1 reads `config.eval.max_batches` (<= 0 / None: all)."""
    if max_batches == -1:
        max_batches = config.eval.get("max_batches", None)
    split = config.eval.get("split", "test")
    if max_batches is None or int(max_batches) <= 0:
        return f"whole {split} split"
    return f"{split} split (at most {int(max_batches)} batches of {int(config.eval.batch_size)})"


def eval_batches(config: Any, keys=("image", "label"), max_batches: int | None = None,
                 split: str | None = None, this_process_only: bool = False):
    """One pass, in order and without augmentation, over `split` (default `config.eval.split`);
    the same batch count on every host. With `max_batches`, a source that knows its labels (image
    folders, stored class by class) is read class by class in turn, so the capped pass is
    class-balanced. `this_process_only`: whole global batches, read by this process alone (what
    one process reads, whatever the process count), for host-side work that one process does."""
    data = config.data.to_dict() if hasattr(config.data, "to_dict") else dict(config.data)
    data.update(split=split or config.eval.split, train=False, drop_remainder=True,
                batch_size=(int(config.eval.batch_size) if this_process_only
                            else mesh_lib.local_batch_size(config.eval.batch_size)))
    if this_process_only:
        data.update(shard_index=0, shard_count=1)
    source = None
    if max_batches is not None:  # a capped pass: take the classes in turn where labels are known
        source = pipeline.make_source(data)
        if hasattr(source, "labels") and max_batches * int(config.eval.batch_size) < len(source):
            source = sources.Subset(source, sources.class_balanced_order(source.labels))
    it = DataBatches(pipeline.make_iterator(data, source=source), keys)
    for i, batch in enumerate(it):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def state_mesh(state: Any):
    """The mesh an evaluation of `state` runs on: the mesh of its first `NamedSharding` leaf (the
    training mesh of a just-trained state); for a host or one-device state, this process's first
    device when one process runs, else every device of every process (data parallel)."""
    for leaf in jax.tree.leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return sharding.mesh
    if jax.process_count() == 1:
        return mesh_lib.make_mesh({"data": 1, "fsdp": 1}, devices=jax.local_devices()[:1])
    return mesh_lib.make_mesh({"data": -1, "fsdp": 1})


def evaluate_batches(fn, state: Any, batches) -> Iterator[Any]:
    """Runs the jittable `fn(state, batch)` on global batches assembled from every process's local
    batches (`batches`: this process's part of each, as from `eval_batches`); yields its outputs as
    numpy on every process, all processes' rows in global order (have `fn` return the labels too
    when they are needed).

    The state stays where it is when it lives on a mesh (sharded or replicated, across processes
    too); a host state is replicated over `state_mesh(state)`. Each evaluation example is thus
    computed once, on the device that holds it, and gathered once."""
    mesh = state_mesh(state)
    if not any(isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)
               for x in jax.tree.leaves(state)):
        state = jax.device_put(to_host(state), mesh_lib.replicated(mesh))
    jitted = jax.jit(fn)
    for local in batches:
        batch = mesh_lib.make_global_batch(local, mesh)
        with jax.set_mesh(mesh):
            out = jitted(state, batch)
        yield to_host(out)


def all_processes(batch: Any) -> Any:
    """Every process's rows of a batch (numpy, global order) on every process; the batch itself
    when one process runs. For evaluations that need all examples on the host."""
    if jax.process_count() == 1:
        return batch
    return to_host(mesh_lib.make_global_batch(batch, mesh_lib.make_mesh({"data": -1, "fsdp": 1})))


def training_images(config, num_images: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images [M, R, R, 3] in [-1, 1], labels [M]): the first `num_images` of a split of the run's data
    set (default the training split), in order and without augmentation; read by this process
    alone (the same images whatever the process count)."""
    batch = int(config.eval.batch_size)
    parts = list(eval_batches(config, max_batches=max(1, math.ceil(num_images / batch)), split=split,
                              this_process_only=True))
    if not parts:
        raise ValueError(f"the {split!r} split of {config.data.name} yielded no batches")
    images = np.concatenate([np.asarray(p["image"]) for p in parts])[:num_images]
    labels = np.concatenate([np.asarray(p["label"]) for p in parts])[:num_images]
    return images.astype(np.float32), labels
