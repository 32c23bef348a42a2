"""Autoencoder trainer: a convolutional autoencoder on a run's images, for the autoencoder
counterfactuals (seed 001) that the explanations compare with the i-ResNet's and the generator's.

    viscoin-jax train --config autoencoder_synthetic --workdir runs/ae

Loss: mean squared error + mean absolute error between the image and its reconstruction (the L1 term
keeps the small coloured blob sharp where MSE alone blurs it into the background). The state is
`{"params", "opt_state"}`; evaluation reports both errors and, at the end, an exact pass over the
evaluation split.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..explain.bundles import AutoencoderFunctions
from ..models.autoencoder import ConvAutoencoder
from ..phases import announce
from ..training.batches import eval_batches, eval_extent, train_batches, training_images
from ..training.optimizers import make_optimizer
from ..training.runs import load_run
from ..training.loop import Task, run_training

log = logging.getLogger(__name__)


def build_autoencoder(config: Any, rngs: nnx.Rngs) -> ConvAutoencoder:
    m = config.model
    return ConvAutoencoder(int(config.data.resolution), channels=tuple(m.channels), code_dim=int(m.code_dim),
                           rngs=rngs)


def reconstruction_errors(model: ConvAutoencoder, images: jax.Array) -> dict[str, jax.Array]:
    out = model(images)
    return {"mse": jnp.mean((out - images) ** 2), "l1": jnp.mean(jnp.abs(out - images))}


class AutoencoderTask(Task):
    def __init__(self, config: Any):
        super().__init__(config)
        self.tx = make_optimizer(config.optim, config.train.num_steps)
        abstract = nnx.eval_shape(lambda: build_autoencoder(config, nnx.Rngs(0)))
        self.graphdef, _ = nnx.split(abstract, nnx.Param)

    def init(self, rng):
        params = nnx.state(build_autoencoder(self.config, nnx.Rngs(params=rng)), nnx.Param)
        return {"params": params, "opt_state": self.tx.init(params)}

    def model(self, state) -> ConvAutoencoder:
        return nnx.merge(self.graphdef, state["params"])

    def _loss(self, params, batch):
        errors = reconstruction_errors(nnx.merge(self.graphdef, params), batch["image"])
        return errors["mse"] + errors["l1"], errors

    def train_step(self, state, batch, rng):
        (loss, errors), grads = jax.value_and_grad(self._loss, has_aux=True)(state["params"], batch)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state}, {"loss": loss, **errors, "grad_norm": optax.tree.norm(grads)}

    def eval_step(self, state, batch):
        return reconstruction_errors(self.model(state), batch["image"])

    def make_train_iterator(self, data_state):
        return train_batches(self.config, data_state, keys=("image",))

    def make_eval_iterator(self):
        return eval_batches(self.config, keys=("image",), max_batches=self.config.eval.get("max_batches", None))

    def model_metadata(self) -> dict:
        return {"kind": "autoencoder", "model": self.config.model.to_dict()}

    def abstract_batch(self):
        b, r = self.config.train.batch_size, self.config.data.resolution
        return {"image": jax.ShapeDtypeStruct((b, r, r, 3), jnp.float32)}


def make_task(config: Any) -> AutoencoderTask:
    return AutoencoderTask(config)


def autoencoder_functions(task: AutoencoderTask, state) -> AutoencoderFunctions:
    """The trained autoencoder's encode / decode (frozen weights) for the explanations."""
    model = task.model(state)
    return AutoencoderFunctions(model.encode, model.decode, int(task.config.model.code_dim),
                                lambda n, split: training_images(task.config, n, split))


def full_evaluation(task: AutoencoderTask, state) -> dict[str, float]:
    """Reconstruction MSE and L1 over the whole evaluation split (the capped pass of config.eval)."""
    fn = jax.jit(lambda s, x: reconstruction_errors(task.model(s), x))
    sums, count = {"mse": 0.0, "l1": 0.0}, 0
    for batch in eval_batches(task.config, keys=("image",),
                                     max_batches=task.config.eval.get("max_batches", None)):
        errors = fn(state, jnp.asarray(batch["image"]))
        n = len(batch["image"])
        sums = {k: v + float(errors[k]) * n for k, v in sums.items()}
        count += n
    if not count:
        raise ValueError("the evaluation split yielded no batches")
    return {f"reconstruction {k}": v / count for k, v in sums.items()} | {"num_examples": count}


def train(config: Any, workdir: str):
    result = run_training(make_task(config), config, workdir).raise_if_preempted()
    with announce(log, f"final evaluation on the {eval_extent(config)}"):
        metrics = full_evaluation(make_task(config), result.state["task"])
    log.info("final evaluation: %s", metrics)
    if jax.process_index() == 0:
        Path(workdir, "eval_metrics.json").write_text(json.dumps(metrics, indent=1))
    return result, metrics


def load(workdir: str, step: int | None = None):
    """(task, state, config) of a trained autoencoder."""
    return load_run(workdir, "autoencoder", step)


__all__ = ["AutoencoderTask", "build_autoencoder", "make_task", "train", "load", "autoencoder_functions",
           "full_evaluation", "reconstruction_errors"]
