"""Classifier trainer: ResNet (from scratch or fine-tuned from torchvision weights) and i-ResNet.

    viscoin-jax train --config configs/classifier_synthetic.py --workdir runs/clf

Cross-entropy with optional label smoothing, an optax schedule, evaluation every N steps, and at the
end an exact pass over the evaluation split: accuracy, per-class accuracy and, for binary tasks,
the Z'-factor of the predicted positive-class probability (seed 001's separability score; None,
"undefined", when the evaluation examples lack a class). The
state is `{"params", "batch_stats", "opt_state"}`; batch statistics (BatchNorm running averages,
ActNorm / spectral-norm buffers) are updated in training and used as-is in evaluation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..convert.torchvision_resnet import load_resnet_checkpoint
from ..explain.bundles import BoundaryView, ClassifierBundle, InvertibleFunctions
from ..metrics.separability import z_prime_from_labels
from ..models.registry import build_classifier, classifier_spec
from ..training.batches import eval_batches, eval_extent, evaluate_batches, train_batches, training_images
from ..training.optimizers import make_optimizer
from ..training.runs import load_run
from ..training.loop import Task, run_training
from ..phases import announce

log = logging.getLogger(__name__)

def classifier_logits(model: nnx.Module, images: jax.Array, train: bool = False) -> jax.Array:
    """Logits of either classifier kind (ResNet returns (logits, features))."""
    out = model(images, train=train)
    return out[0] if isinstance(out, tuple) else out


class ClassifierTask(Task):
    def __init__(self, config: Any):
        super().__init__(config)
        self.tx = make_optimizer(config.optim, config.train.num_steps)
        abstract = nnx.eval_shape(lambda: build_classifier(config.model, nnx.Rngs(0)))
        self.graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
        self.num_classes = int(config.model.num_classes)

    # -- state ------------------------------------------------------------------------------------
    def _split(self, model):
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return params, rest

    def init(self, rng):
        model = build_classifier(self.config.model, nnx.Rngs(params=rng, default=rng))
        params, rest = self._split(model)
        init_from = self.config.get("init_from", "")
        if init_from:
            params = _load_pretrained(init_from, params)
        return {"params": params, "batch_stats": rest, "opt_state": self.tx.init(params)}

    def model(self, state) -> nnx.Module:
        return nnx.merge(self.graphdef, state["params"], state["batch_stats"])

    # -- steps ------------------------------------------------------------------------------------
    def _loss(self, params, batch_stats, batch):
        # fresh Variables at this trace level: BatchNorm updates its statistics in place
        batch_stats = jax.tree.map(lambda x: x, batch_stats)
        model = nnx.merge(self.graphdef, params, batch_stats)
        logits = classifier_logits(model, batch["image"], train=True)
        labels = jax.nn.one_hot(batch["label"], self.num_classes)
        smoothing = float(self.config.loss.label_smoothing)
        if smoothing:
            labels = optax.smooth_labels(labels, smoothing)
        loss = jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), labels))
        _, new_stats = self._split(model)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, (new_stats, accuracy)

    def train_step(self, state, batch, rng):
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        (loss, (stats, accuracy)), grads = grad_fn(state["params"], state["batch_stats"], batch)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads)}
        return {"params": params, "batch_stats": stats, "opt_state": opt_state}, metrics

    def eval_step(self, state, batch):
        logits = classifier_logits(self.model(state), batch["image"], train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["label"])
        return {"loss": jnp.mean(loss), "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

    # -- data -------------------------------------------------------------------------------------
    def make_train_iterator(self, data_state):
        return train_batches(self.config, data_state)

    def make_eval_iterator(self):
        return eval_batches(self.config, max_batches=self.config.eval.get("max_batches", None))

    def model_metadata(self) -> dict:
        return {"kind": "classifier", "model": self.config.model.to_dict()}

    def abstract_batch(self):
        b, r = self.config.train.batch_size, self.config.data.resolution
        return {"image": jax.ShapeDtypeStruct((b, r, r, 3), jnp.float32),
                "label": jax.ShapeDtypeStruct((b,), jnp.int32)}


def _load_pretrained(path: str, params):
    """Parameters from a converted torchvision checkpoint (`viscoin-jax convert resnet`).

    Every parameter whose shape matches is taken; the classification head is kept from the fresh
    initialisation when the number of classes differs (fine-tuning to a new label set).
    """
    pretrained = nnx.state(load_resnet_checkpoint(path), nnx.Param)
    flat_new = dict(nnx.to_flat_state(params))
    flat_old = dict(nnx.to_flat_state(pretrained))
    kept, replaced = [], 0
    for key, var in flat_new.items():
        old = flat_old.get(key)
        if old is not None and old.value.shape == var.value.shape:
            var.value = jnp.asarray(old.value, var.value.dtype)
            replaced += 1
        else:
            kept.append("/".join(map(str, key)))
    if replaced == 0:
        raise ValueError(f"no parameter of {path} matches the configured model")
    log.info("init_from %s: %d arrays loaded, %d kept from initialisation (%s)", path, replaced,
             len(kept), ", ".join(kept[:4]))
    return nnx.from_flat_state(flat_new)


def make_task(config: Any) -> ClassifierTask:
    return ClassifierTask(config)


def predict(task: ClassifierTask, state, images, batch_size: int = 256) -> np.ndarray:
    """Logits of `images` (numpy, any count), jit-compiled in batches."""
    fn = jax.jit(lambda s, x: classifier_logits(task.model(s), x, train=False))
    out = [np.asarray(fn(state, jnp.asarray(images[i:i + batch_size])))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, task.num_classes), np.float32)


def full_evaluation(task: ClassifierTask, state) -> dict[str, Any]:
    """Exact accuracy, per-class accuracy and (binary) Z'-factor over the whole evaluation split:
    every process's examples, evaluated on the devices that hold them and gathered once (the same
    numbers on every process)."""
    def fn(s, batch):
        return classifier_logits(task.model(s), batch["image"], train=False), batch["label"]

    batches = eval_batches(task.config, max_batches=task.config.eval.get("max_batches", None))
    logits, labels = [], []
    for batch_logits, batch_labels in evaluate_batches(fn, state, batches):
        logits.append(batch_logits)
        labels.append(batch_labels)
    if not logits:
        raise ValueError("the evaluation split yielded no batches")
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    pred = logits.argmax(-1)
    per_class = {int(c): float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)}
    out = {"accuracy": float(np.mean(pred == labels)), "per_class_accuracy": per_class,
           "balanced_accuracy": float(np.mean(list(per_class.values()))), "num_examples": int(len(labels))}
    if task.num_classes == 2:
        missing = sorted({0, 1} - {int(c) for c in np.unique(labels)})
        if missing:  # Z' compares the two classes' scores: undefined without one of them
            log.warning("Z'-factor undefined: the evaluation examples hold no class %s", missing)
            out["z_prime"] = None
        else:
            prob = jax.nn.softmax(logits, -1)[:, 1]
            out["z_prime"] = float(z_prime_from_labels(np.asarray(prob), labels, positive_label=1))
    return out


def explanation_bundle(task: ClassifierTask, state) -> ClassifierBundle:
    """The callables the classifier explanations take (frozen weights, inference mode)."""

    invertible_model = classifier_spec(task.config.model.name).invertible

    def functions_of(params):
        model = task.model(dict(state, params=params))

        def classifier_fn(images):
            return classifier_logits(model, images, train=False)

        def features_and_logits_fn(images):
            if invertible_model:  # i-ResNet: its stage outputs (the last is z) for the activation maps
                stages = model.stage_outputs(images)
                return stages, model.head(stages[list(stages)[-1]])
            out = model(images, train=False)
            return (out[1], out[0]) if isinstance(out, tuple) else ({}, out)

        return classifier_fn, features_and_logits_fn

    invertible = None
    model = task.model(state)
    if invertible_model:
        invertible = InvertibleFunctions(model.forward, model.head, lambda z: model.inverse(z))
        views = (BoundaryView("penultimate", lambda x: model.pool(model.forward(x)), model.head_fc),
                 BoundaryView("z", model.forward, model.head, lambda z: model.inverse(z)[0]))
    elif "pooled" in classifier_spec(task.config.model.name).feature_maps:  # the ResNet
        views = (BoundaryView("penultimate", lambda x: model(x, train=False)[1]["pooled"], model.fc),)
    else:
        views = ()
    return ClassifierBundle(str(task.config.model.name), state["params"], functions_of,
                            lambda n, split: training_images(task.config, n, split), invertible, views)


def train(config: Any, workdir: str):
    result = run_training(make_task(config), config, workdir).raise_if_preempted()
    task = make_task(config)
    with announce(log, f"final evaluation on the {eval_extent(config)}"):
        metrics = full_evaluation(task, result.state["task"])
    log.info("final evaluation: %s", metrics)
    if jax.process_index() == 0:
        Path(workdir, "eval_metrics.json").write_text(json.dumps(metrics, indent=1))
    return result, metrics


def load(workdir: str, step: int | None = None):
    """(task, state, config) of a trained classifier, for explanations and VisCoIN training."""
    return load_run(workdir, "classifier", step)
