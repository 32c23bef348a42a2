"""A tiny regression task (an nnx MLP fitting a fixed random teacher) that exercises the loop.

It is the reference `Task` implementation: an nnx model kept as (graphdef, params) with an optax
optimiser, random data from a resumable iterator, an evaluation pass, image samples and model
metadata. Tests and the AOT tool use it; `viscoin-jax train --config configs/toy_regression.py`
runs it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..training import mesh as mesh_lib
from ..training.loop import Task, run_training


class MLP(nnx.Module):
    """Dense layers with tanh in between."""

    def __init__(self, features: int, hidden: tuple[int, ...], *, rngs: nnx.Rngs):
        sizes = (features, *hidden, 1)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)


class ToyIterator:
    """Deterministic random batches: batch i depends only on (seed, i), so the position is one int.

    Each process yields its own rows of the global batch (`process_index` of `process_count`).
    """

    def __init__(self, *, seed: int, global_batch: int, features: int, stream: int = 0,
                 process_index: int = 0, process_count: int = 1, num_batches: int | None = None):
        if global_batch % process_count:
            raise ValueError(f"batch {global_batch} does not split over {process_count} processes")
        self.seed, self.stream, self.features = seed, stream, features
        self.global_batch, self.num_batches = global_batch, num_batches
        self.rows = slice(process_index * global_batch // process_count,
                          (process_index + 1) * global_batch // process_count)
        teacher = np.random.default_rng([seed, 7])
        self.w1 = teacher.standard_normal((features, 8)).astype(np.float32) / np.sqrt(features)
        self.w2 = teacher.standard_normal((8, 1)).astype(np.float32)
        self.index = 0

    def __iter__(self) -> "ToyIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self.index >= self.num_batches:
            raise StopIteration
        rng = np.random.default_rng([self.seed, self.stream, self.index])
        x = rng.standard_normal((self.global_batch, self.features)).astype(np.float32)
        y = np.sin(x @ self.w1) @ self.w2
        self.index += 1
        return {"x": x[self.rows], "y": y[self.rows]}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("index"), int):
            raise ValueError(f"bad ToyIterator state {state!r}")
        self.index = state["index"]


class ToyTask(Task):
    """Regression of `y = sin(x W1) W2` with an MLP; state = {"params", "opt_state"}."""

    def __init__(self, config: Any):
        super().__init__(config)
        c = config.toy
        self.features, self.hidden = int(c.features), tuple(int(h) for h in c.hidden)
        self.tx = optax.adam(c.learning_rate)
        abstract = nnx.eval_shape(lambda: MLP(self.features, self.hidden, rngs=nnx.Rngs(0)))
        self.graphdef, _ = nnx.split(abstract, nnx.Param)

    def init(self, rng: jax.Array):
        params = nnx.state(MLP(self.features, self.hidden, rngs=nnx.Rngs(params=rng)), nnx.Param)
        return {"params": params, "opt_state": self.tx.init(params)}

    def _loss(self, params, batch, rng=None):
        x = batch["x"]
        if rng is not None and self.config.toy.input_noise > 0:
            x = x + self.config.toy.input_noise * jax.random.normal(rng, x.shape, x.dtype)
        pred = nnx.merge(self.graphdef, params)(x)
        return jnp.mean((pred - batch["y"]) ** 2)

    def train_step(self, state, batch, rng):
        loss, grads = jax.value_and_grad(self._loss)(state["params"], batch, rng)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        return {"params": params, "opt_state": opt_state}, {"loss": loss, "grad_norm": grad_norm}

    def eval_step(self, state, batch):
        return {"mse": self._loss(state["params"], batch)}

    def _iterator(self, stream: int, num_batches: int | None) -> ToyIterator:
        return ToyIterator(seed=self.config.seed, global_batch=self.config.train.batch_size,
                           features=self.features, stream=stream,
                           process_index=jax.process_index(), process_count=jax.process_count(),
                           num_batches=num_batches)

    def make_train_iterator(self, data_state):
        mesh_lib.local_batch_size(self.config.train.batch_size)
        it = self._iterator(stream=0, num_batches=None)
        if data_state is not None:
            it.set_state(data_state)
        return it

    def make_eval_iterator(self):
        return self._iterator(stream=1, num_batches=self.config.toy.eval_batches)

    def sample_images(self, state):
        """The first layer's weights as a grayscale image, scaled to [-1, 1]."""
        kernel = state["params"]["layers"][0]["kernel"][...]
        image = kernel / jnp.maximum(jnp.max(jnp.abs(kernel)), 1e-12)
        return {"first_layer": image[None, :, :, None]}

    def model_metadata(self) -> dict:
        return {"model": "toy_mlp", "features": self.features, "hidden": list(self.hidden)}

    def abstract_batch(self):
        b = self.config.train.batch_size
        return {"x": jax.ShapeDtypeStruct((b, self.features), jnp.float32),
                "y": jax.ShapeDtypeStruct((b, 1), jnp.float32)}


def make_task(config: Any) -> ToyTask:
    return ToyTask(config)


def train(config: Any, workdir: str):
    return run_training(make_task(config), config, workdir).raise_if_preempted()
