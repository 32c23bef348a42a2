"""Pieces every trainer shares: data batches for the loop, optimisers, and restoring a run's models.

A trainer module (`classifier`, `stylegan2`, `viscoin`) defines a `Task` and exposes
`make_task(config)`, `train(config, workdir)` and `load(workdir)`; `load` goes through
`restore_task_state`, which rebuilds the task from the config saved in the checkpoint and restores
its state onto the devices of the current process, whatever mesh saved it.
"""

from __future__ import annotations

import importlib
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import numpy as np
import optax

from ..data import pipeline, sources
from . import mesh as mesh_lib
from .loop import restore_run
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
                 split: str | None = None):
    """One pass, in order and without augmentation, over `split` (default `config.eval.split`);
    the same batch count on every host. With `max_batches`, a source that knows its labels (image
    folders, stored class by class) is read class by class in turn, so the capped pass is
    class-balanced."""
    data = config.data.to_dict() if hasattr(config.data, "to_dict") else dict(config.data)
    data.update(split=split or config.eval.split, train=False, drop_remainder=True,
                batch_size=mesh_lib.local_batch_size(config.eval.batch_size))
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
    set (default the training split), in order and without augmentation."""
    batch = int(config.eval.batch_size)
    parts = list(eval_batches(config, max_batches=max(1, math.ceil(num_images / batch)), split=split))
    if not parts:
        raise ValueError(f"the {split!r} split of {config.data.name} yielded no batches")
    images = np.concatenate([np.asarray(p["image"]) for p in parts])[:num_images]
    labels = np.concatenate([np.asarray(p["label"]) for p in parts])[:num_images]
    return images.astype(np.float32), labels


def make_optimizer(optim: Any, num_steps: int) -> optax.GradientTransformation:
    """Adam/AdamW/SGD with an optional linear warm-up and cosine decay, from `config.optim`."""
    lr = float(optim.learning_rate)
    warmup = int(optim.get("warmup_steps", 0))
    schedule_name = optim.get("schedule", "constant")
    if schedule_name == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(num_steps, warmup + 1))
    elif schedule_name == "constant":
        schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)),
                                         optax.constant_schedule(lr)], [max(warmup, 1)]) if warmup else lr
    else:
        raise ValueError(f"unknown optim.schedule {schedule_name!r}; known: constant, cosine")
    name = optim.get("name", "adam")
    b1, b2 = float(optim.get("b1", 0.9)), float(optim.get("b2", 0.999))
    if name == "adam":
        tx = optax.adam(schedule, b1=b1, b2=b2, eps=float(optim.get("eps", 1e-8)))
    elif name == "adamw":
        tx = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=float(optim.get("weight_decay", 0.0)))
    elif name == "sgd":
        tx = optax.sgd(schedule, momentum=float(optim.get("momentum", 0.9)), nesterov=True)
        if float(optim.get("weight_decay", 0.0)):
            tx = optax.chain(optax.add_decayed_weights(float(optim.weight_decay)), tx)
    else:
        raise ValueError(f"unknown optim.name {name!r}; known: adam, adamw, sgd")
    clip = float(optim.get("grad_clip", 0.0))
    return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx


def restore_task_state(path: str | Path, step: int | None = None, expected_trainer: str | None = None):
    """(task, task_state, config, metadata) of a run, replicated on this process's first device
    whatever mesh saved it (`loop.restore_run` does the work)."""
    one_device = mesh_lib.make_mesh({"data": 1, "fsdp": 1}, devices=jax.local_devices()[:1])
    config, task, restored, metadata = restore_run(path, step, mesh=one_device, expected_trainer=expected_trainer)
    return task, restored.state["task"], config, metadata


def load_run(workdir: str | Path, trainer: str, step: int | None = None):
    """(task, state, config) of a `trainer` run, for explanations and the stages that build on it."""
    task, state, config, _ = restore_task_state(workdir, step, expected_trainer=trainer)
    return task, state, config


def import_attr(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)
