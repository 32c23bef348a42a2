"""VisCoIN trainer (Parekh et al., ICLR 2025) on the shared training loop.

    viscoin-jax train --config configs/viscoin_synthetic.py --workdir runs/viscoin \
        --config.classifier_workdir=runs/clf --config.generator_workdir=runs/sg2

The classifier f and the generator G are trained first (`classifier` and `stylegan2` trainers);
their run directories are named in the config. Both are loaded once when the task is built and
stay frozen: their weights are constants of the compiled step, never part of the trained state
nor of the optimiser. The trained state is `{"params": <Psi, Theta, Omega nnx.Params>,
"opt_state"}`; the head's dropout draws its mask from the step's rng.

One step: the real batch plus `viscoin.num_generated` images sampled from G (z ~ N(0, I) ->
mapping -> synthesis with constant noise, no truncation), so that Omega learns G's range (8 + 8
in the paper). For all of them: f(x) -> features -> Psi -> (phi, phi'); g = Theta(phi);
x~ = G.synthesis(Omega(phi, phi')); loss = `viscoin_losses.viscoin_loss` with the weights of
`config.loss`. The gamma term CE(f(x~), f(x)) back-propagates through G's synthesis and f into
Omega and Psi (not detached: it is what makes the concepts faithful).

Perceptual term: LPIPS-VGG when `config.loss.lpips_weights` names the weights, otherwise (only
where `config.loss.allow_perceptual_fallback` is true, with a warning, also in the log and in
viscoin_eval.json) the LPIPS recipe on f's own stage 1-4 features, which is NOT LPIPS. The paper
configs set the key to False: without weights they refuse to start (`check_perceptual`).

After training, `train` writes `viscoin_eval.json`: accuracy of g, fidelity to f, reconstruction
MSE and perceptual distance, and the faithfulness FF (median) at tau 0.1 / 0.2 / 0.4.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..explain.bundles import LatentModels, VisCoINBundle, VisCoINFunctions
from ..metrics.lpips import FeaturePerceptualLoss, load_lpips
from ..metrics.viscoin_metrics import DEFAULT_TAUS, faithfulness
from ..models.viscoin import FEATURE_KEYS, VisCoIN
from ..training.batches import all_processes, eval_batches, eval_extent, train_batches, training_images
from ..training.optimizers import make_optimizer
from ..training.runs import load_run
from ..training.loop import Task, run_training
from ..training.monitor import to_host
from ..phases import announce
from . import classifier as classifier_lib
from . import stylegan2 as stylegan2_lib
from .viscoin_losses import DEFAULT_WEIGHTS, viscoin_loss

log = logging.getLogger(__name__)

PERCEPTUAL_FEATURES = ("stage1", "stage2", "stage3", "stage4")
FALLBACK_WARNING = ("config.loss.lpips_weights is empty: the perceptual loss uses the LPIPS recipe on the "
                    "classifier's own features (stage1-4). This is NOT LPIPS; its values are not comparable "
                    "with published LPIPS numbers.")


def _kwargs(section: Any) -> dict:
    return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def _max_batches(n) -> int | None:
    """config.eval batch counts: <= 0 (or None) means the whole evaluation split."""
    return None if n is None or int(n) <= 0 else int(n)


def check_perceptual(config: Any) -> str:
    """The LPIPS weights path of a VisCoIN config ("" for the labelled fallback), or a clear error.

    Raises FileNotFoundError for a path that does not exist, and ValueError for an empty path unless
    `config.loss.allow_perceptual_fallback` is true (a config without the key, e.g. one saved
    before it existed, allows it). Cheap: the pipeline calls it before its first stage.
    """
    path = str(config.loss.get("lpips_weights", ""))
    if path:
        if not Path(path).exists():
            raise FileNotFoundError(f"config.loss.lpips_weights={path!r} does not exist")
        return path
    if not bool(config.loss.get("allow_perceptual_fallback", True)):
        raise ValueError("config.loss.lpips_weights is empty and config.loss.allow_perceptual_fallback is False: "
                         "give LPIPS weights (viscoin-jax convert lpips ...) or allow the labelled stand-in "
                         "(not LPIPS) with --config.loss.allow_perceptual_fallback=True")
    return path


def _loss_weights(loss_cfg: Any) -> dict[str, float]:
    """The viscoin_loss weights of `config.loss` (its other keys, e.g. lpips_weights, are not weights)."""
    return {k: float(v) for k, v in _kwargs(loss_cfg).items() if k in DEFAULT_WEIGHTS}


class VisCoINTask(Task):
    def __init__(self, config: Any):
        super().__init__(config)
        for key in ("classifier_workdir", "generator_workdir"):
            if not str(config.get(key, "")):
                raise ValueError(f"config.{key} must name a trained run directory")
        lpips_path = check_perceptual(config)  # before loading anything
        # --- frozen f -------------------------------------------------------------------------
        clf_task, clf_state, _ = classifier_lib.load(config.classifier_workdir)
        f = clf_task.model(clf_state)
        if not hasattr(f, "feature_channels"):
            raise ValueError(f"{config.classifier_workdir} holds a {type(f).__name__}; VisCoIN needs a ResNet "
                             "classifier (it reads the stage 2 / 3 / 4 feature maps)")
        self.f_graphdef, self.f_state = nnx.split(f)
        self.num_classes = int(clf_task.num_classes)
        # --- frozen G (EMA weights) -------------------------------------------------------------
        g_task, g_state, _ = stylegan2_lib.load(config.generator_workdir)
        G = stylegan2_lib.generator_from_state(g_task, g_state, ema=True)
        self.g_graphdef, self.g_state = nnx.split(G)
        if G.mapping.w_avg is None:
            raise ValueError("the generator tracks no w_avg (w_avg_beta=None); Omega needs it")
        self.w_avg = jnp.asarray(G.mapping.w_avg[...], jnp.float32)
        self.z_dim, self.w_dim, self.num_ws = int(G.z_dim), int(G.w_dim), int(G.num_ws)
        self.resolution = int(config.data.resolution)
        if int(G.img_resolution) != self.resolution:
            raise ValueError(f"the generator makes {G.img_resolution} px images, config.data.resolution is "
                             f"{self.resolution}")
        # --- shapes of f's feature maps at this resolution ----------------------------------------
        probe = jax.ShapeDtypeStruct((1, self.resolution, self.resolution, 3), jnp.float32)
        feats = jax.eval_shape(lambda x: self._f()(x, train=False)[1], probe)
        self.in_channels = tuple(int(feats[k].shape[-1]) for k in FEATURE_KEYS)
        self.feature_sizes = tuple(tuple(int(s) for s in feats[k].shape[1:3]) for k in FEATURE_KEYS)
        # --- the trained networks -----------------------------------------------------------------
        m = config.model
        if int(m.num_classes) != self.num_classes:
            raise ValueError(f"config.model.num_classes={m.num_classes} differs from the classifier's "
                             f"{self.num_classes} classes")
        self.batch_size = int(config.train.batch_size)
        self.num_generated = int(config.viscoin.num_generated)
        if self.num_generated < 0:
            raise ValueError(f"config.viscoin.num_generated must be >= 0, got {self.num_generated}")
        self.weights = _loss_weights(config.loss)
        abstract = nnx.eval_shape(lambda: self.build(nnx.Rngs(0)))
        self.graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
        # the non-Param variables (w_avg, the dropout's rng stream) are constants: built in a jit
        # whose Param outputs are dropped (XLA removes their initialisation)
        self.rest = jax.jit(lambda: nnx.split(self.build(nnx.Rngs(0)), nnx.Param, ...)[2])()
        self.tx = make_optimizer(config.optim, config.train.num_steps)
        # --- perceptual loss ----------------------------------------------------------------------
        if lpips_path:
            lp = load_lpips(lpips_path)
            self.lpips_graphdef, self.lpips_state = nnx.split(lp)
            self.perceptual_name, self.is_lpips = lp.name, True
        else:
            self.lpips_graphdef = self.lpips_state = None
            self.perceptual_name, self.is_lpips = "feature-perceptual[classifier stage1-4]", False
            log.warning(FALLBACK_WARNING)
            warnings.warn(FALLBACK_WARNING, UserWarning, stacklevel=2)

    # -- models -----------------------------------------------------------------------------------
    def build(self, rngs: nnx.Rngs) -> VisCoIN:
        m = self.config.model
        return VisCoIN(int(m.n_concepts), self.num_classes, self.num_ws, self.w_dim, self.w_avg,
                       in_channels=self.in_channels, feature_sizes=self.feature_sizes,
                       branch_channels=int(m.branch_channels), concept_grid=int(m.concept_grid),
                       dropout=float(m.dropout), init_scale=float(m.init_scale),
                       prime_split=tuple(int(v) for v in m.get("prime_split", ())) or None, rngs=rngs)

    def _f(self):
        return nnx.merge(self.f_graphdef, self.f_state)

    def _G(self):
        return nnx.merge(self.g_graphdef, self.g_state)

    def model(self, state_or_params) -> VisCoIN:
        params = state_or_params["params"] if "params" in state_or_params else state_or_params
        return nnx.merge(self.graphdef, params, self.rest)

    def classify(self, images):
        """(logits, features) of the frozen f in evaluation mode."""
        return self._f()(images, train=False)

    def synthesize(self, ws):
        """G.synthesis with the generator's constant noise (deterministic decoding)."""
        return self._G().synthesis(ws, noise_mode="const")

    def sample_generator(self, key, n: int):
        """n images of G: z ~ N(0, I) -> mapping (no truncation) -> synthesis, constant noise."""
        G = self._G()
        z = jax.random.normal(key, (n, self.z_dim), jnp.float32)
        return G.synthesis(G.mapping(z), noise_mode="const")

    def perceptual(self, x, y):
        """[N] perceptual distance: LPIPS, or the labelled fallback on f's features."""
        if self.lpips_graphdef is not None:
            return nnx.merge(self.lpips_graphdef, self.lpips_state)(x, y)
        f = self._f()
        fn = lambda im: [f(im, train=False)[1][k] for k in PERCEPTUAL_FEATURES]  # noqa: E731
        return FeaturePerceptualLoss(fn, self.perceptual_name)(x, y)

    # -- state ------------------------------------------------------------------------------------
    def init(self, rng):
        params = nnx.split(self.build(nnx.Rngs(params=rng, dropout=rng, default=rng)), nnx.Param, ...)[1]
        return {"params": params, "opt_state": self.tx.init(params)}

    # -- the loss ---------------------------------------------------------------------------------
    def forward(self, params, images, dropout_key=None):
        """VisCoIN on images: phi, phi_prime, g logits, ws, reconstruction, f logits.

        dropout_key: the head's dropout mask (training); None = evaluation mode.
        """
        model = self.model(params)
        f_logits, feats = self.classify(images)
        f_logits, feats = jax.lax.stop_gradient((f_logits, feats))
        phi, phi_prime = model.extractor(feats)
        if dropout_key is None:
            g_logits = model.head(phi, train=False)
        else:
            dropped = model.head.dropout(phi, deterministic=False, rngs=dropout_key)
            g_logits = model.head.linear(jnp.max(dropped, axis=(1, 2)))
        ws = model.translator(phi, phi_prime)
        return {"phi": phi, "phi_prime": phi_prime, "g_logits": g_logits, "ws": ws,
                "reconstruction": self.synthesize(ws), "f_logits": f_logits,
                "concept_weight": model.extractor.concept_kernel}

    def batch_images(self, real, key):
        """The step's images: the real batch followed by num_generated samples of G."""
        real = real.astype(jnp.float32)
        if self.num_generated == 0:
            return real
        fake = jax.lax.stop_gradient(self.sample_generator(key, self.num_generated))
        return jnp.concatenate([real, fake], axis=0)

    def loss(self, params, real_images, rng, weights=None):
        """(total, terms) of one step on real_images plus G samples drawn from rng."""
        k_gen, k_drop = jax.random.split(rng)
        images = self.batch_images(real_images, k_gen)
        out = self.forward(params, images, dropout_key=k_drop)
        targets = {"image": images, "f_logits": out["f_logits"], "w_avg": self.w_avg}
        total, terms = viscoin_loss(out, targets, self.weights if weights is None else weights,
                                    perceptual_fn=self.perceptual,
                                    classifier_fn=lambda x: self.classify(x)[0])
        terms = dict(terms)
        terms["accuracy_fidelity"] = jnp.mean(jnp.argmax(out["g_logits"], -1) == jnp.argmax(out["f_logits"], -1))
        return total, terms

    # -- steps ------------------------------------------------------------------------------------
    def train_step(self, state, batch, rng):
        (loss, terms), grads = jax.value_and_grad(self.loss, has_aux=True)(state["params"], batch["image"], rng)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {k: v for k, v in terms.items() if k != "total"}
        metrics.update(loss=loss, grad_norm=optax.tree.norm(grads))
        return {"params": params, "opt_state": opt_state}, metrics

    def eval_step(self, state, batch):
        out = self.forward(state["params"], batch["image"].astype(jnp.float32))
        g_pred, f_pred = jnp.argmax(out["g_logits"], -1), jnp.argmax(out["f_logits"], -1)
        return {"accuracy": jnp.mean(g_pred == batch["label"]),
                "classifier_accuracy": jnp.mean(f_pred == batch["label"]),
                "fidelity": jnp.mean(g_pred == f_pred),
                "mse": jnp.mean(jnp.square(out["reconstruction"] - batch["image"])),
                "perceptual": jnp.mean(self.perceptual(out["reconstruction"], batch["image"].astype(jnp.float32)))}

    def host_evaluate(self, state):
        """Faithfulness FF (median over the evaluation batches) at tau 0.1 / 0.2 / 0.4, at each evaluation."""
        batches = [all_processes(b)["image"] for b in self.make_eval_iterator()]
        if not batches:
            return {}
        fns = viscoin_apply(self, to_host({"params": state["params"]}))
        ff = faithfulness(batches, concepts_fn=fns.concepts_fn, head_fn=fns.head_fn, head_weight=fns.head_weight,
                          translator_fn=fns.translator_fn, synthesis_fn=fns.synthesis_fn, taus=DEFAULT_TAUS)
        return {f"ff_tau{float(t):g}": float(m) for t, m in zip(ff.taus, ff.median)}

    # -- data, samples, metadata ------------------------------------------------------------------
    def make_train_iterator(self, data_state):
        return train_batches(self.config, data_state, keys=("image",))

    def make_eval_iterator(self):
        return eval_batches(self.config, max_batches=_max_batches(self.config.eval.get("max_batches", 0)))

    def sample_images(self, state):
        """Reconstructions of fixed G samples (seed config.seed + 1), next to the samples."""
        n = int(self.config.viscoin.get("num_samples", 0))
        if n <= 0:
            return None
        key = jax.random.key(int(self.config.seed) + 1)

        @jax.jit
        def fn(params):
            x = self.sample_generator(key, n)
            return jnp.concatenate([x, self.forward(params, x)["reconstruction"]], axis=0)
        return {"samples_and_reconstructions": fn(state["params"])}

    def model_metadata(self) -> dict:
        return {"kind": "viscoin", "model": _kwargs(self.config.model),
                "classifier_workdir": str(self.config.classifier_workdir),
                "generator_workdir": str(self.config.generator_workdir)}

    def abstract_batch(self):
        r = self.resolution
        return {"image": jax.ShapeDtypeStruct((self.batch_size, r, r, 3), jnp.float32)}


# ----------------------------------------------------------------------------------------------
# Pure callables for explanations and metrics


def viscoin_apply(task: VisCoINTask, state) -> VisCoINFunctions:
    """The callables `explain.concepts` and `metrics.viscoin_metrics` take, for one task state."""
    params = state["params"] if "params" in state else state

    def concepts_fn(images):
        feats = task.classify(jnp.asarray(images, jnp.float32))[1]
        return task.model(params).extractor(feats)

    def head_fn(phi):
        return task.model(params).head(phi, train=False)

    def translator_fn(phi, phi_prime):
        return task.model(params).translator(phi, phi_prime)

    def synthesis_fn(ws):
        return task.synthesize(ws)

    def classifier_fn(images):
        return task.classify(jnp.asarray(images, jnp.float32))[0]

    def features_fn(images):
        return task.classify(jnp.asarray(images, jnp.float32))[1]["stage2"]

    head_weight = task.model(params).head.weight
    return VisCoINFunctions(concepts_fn, head_fn, head_weight, translator_fn, synthesis_fn, classifier_fn,
                            features_fn)


def explanation_bundle(task: VisCoINTask, state) -> VisCoINBundle:
    """What the concept methods take: the run's functions and its data."""
    return VisCoINBundle(viscoin_apply(task, state), lambda n, split: training_images(task.config, n, split))


def latent_models(task: VisCoINTask, state) -> LatentModels:
    """The latent methods' models of a VisCoIN run: its f and G, the translator as warm start."""
    fns = viscoin_apply(task, state)

    def mapping_fn(z):
        return task._G().mapping(z)

    def init_ws_fn(images):
        return jax.jit(lambda x: fns.translator_fn(*fns.concepts_fn(x)))(images)

    return LatentModels(fns.synthesis_fn, mapping_fn, fns.classifier_fn, task.z_dim, task.num_ws, task.resolution,
                        perceptual_fn=task.perceptual, perceptual_name=task.perceptual_name,
                        init_ws_fn=init_ws_fn)


# ----------------------------------------------------------------------------------------------
# Entry points


def make_task(config: Any) -> VisCoINTask:
    return VisCoINTask(config)


def final_evaluation(task: VisCoINTask, state, max_batches: int | None = None) -> dict[str, Any]:
    """g accuracy, fidelity to f, reconstruction MSE / perceptual distance and FF on eval batches."""
    cfg = task.config
    if max_batches is None:
        max_batches = int(cfg.eval.get("final_batches", 4))
    # every process's examples on every process: each computes the same numbers from all of them
    batches = [all_processes(b) for b in eval_batches(cfg, max_batches=_max_batches(max_batches))]
    if not batches:
        raise ValueError("the evaluation split yielded no batches")
    state = {"params": to_host(state["params"])}

    @jax.jit
    def metrics(params, images, labels):
        out = task.forward(params, images)
        g_pred, f_pred = jnp.argmax(out["g_logits"], -1), jnp.argmax(out["f_logits"], -1)
        rec = out["reconstruction"]
        return {"accuracy": g_pred == labels, "classifier_accuracy": f_pred == labels,
                "fidelity": g_pred == f_pred,
                "mse": jnp.mean(jnp.square(rec - images), axis=(1, 2, 3)),
                "perceptual": task.perceptual(rec, images)}

    per = [jax.device_get(metrics(state["params"], jnp.asarray(b["image"], jnp.float32), jnp.asarray(b["label"])))
           for b in batches]
    out: dict[str, Any] = {k: float(np.mean(np.concatenate([p[k] for p in per]))) for k in per[0]}
    out["perceptual_name"] = task.perceptual_name
    out["perceptual_is_lpips"] = task.is_lpips
    if not task.is_lpips:
        out["perceptual_note"] = FALLBACK_WARNING
    fns = viscoin_apply(task, state)
    ff = faithfulness([b["image"] for b in batches], concepts_fn=fns.concepts_fn, head_fn=fns.head_fn,
                      head_weight=fns.head_weight, translator_fn=fns.translator_fn,
                      synthesis_fn=fns.synthesis_fn, taus=DEFAULT_TAUS)
    out["faithfulness"] = {f"{float(t):g}": float(v) for t, v in zip(ff.taus, ff.median)}
    out["num_examples"] = int(sum(len(b["image"]) for b in batches))
    return out


def train(config: Any, workdir: str):
    """run_training, then `final_evaluation` written to workdir/viscoin_eval.json."""
    task = make_task(config)
    result = run_training(task, config, workdir).raise_if_preempted()
    extent = eval_extent(config, _max_batches(config.eval.get("final_batches", 4)))
    with announce(log, f"final evaluation on the {extent}"):
        metrics = final_evaluation(task, result.state["task"])
    metrics["step"] = result.step
    log.info("final evaluation: %s", metrics)
    if jax.process_index() == 0:
        Path(workdir, "viscoin_eval.json").write_text(json.dumps(metrics, indent=1))
    return result, metrics


def load(workdir: str, step: int | None = None):
    """(task, state, config) of a VisCoIN run (see `viscoin_apply`); f and G come from the
    classifier / generator run directories saved in the config."""
    return load_run(workdir, "viscoin", step)


__all__ = ["VisCoINTask", "VisCoINFunctions", "viscoin_apply", "explanation_bundle", "latent_models", "make_task",
           "final_evaluation", "train", "load"]
