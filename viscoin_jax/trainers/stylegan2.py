"""StyleGAN2(-ADA) trainer on the shared training loop.

    viscoin-jax train --config configs/stylegan2_synthetic.py --workdir runs/sg2
    viscoin-jax train --config configs/stylegan2_cub.py --workdir gs://bucket/sg2_cub

One jitted step runs the reference's four phases in order, each with its own Adam update:
  Gmain  non-saturating loss of D(augment(G(z))) with style mixing (prob 0.9).
  Greg   lazy path-length regularisation, every `pl_interval` steps (`jax.lax.cond`: the second
         order pass is only paid on those steps).
  Dmain  logistic loss on augmented reals and (fresh, updated-G) fakes.
  Dreg   lazy R1 on augmented reals, every `r1_interval` steps (`jax.lax.cond`).
On CPU the lazy terms are chosen on the host instead (`step_variant`: one program per variant),
because XLA:CPU runs the convolutions inside a `lax.cond` branch ~100x slower.
Every generator call of the step (Gmain, Greg on its steps, the fakes for Dmain) updates w_avg, as
the reference's run_G does in training mode (the style-mixing second mapping does not);
then the EMA of G (half-life `ema_kimg` thousand images, optional ramp-up) and, every
`ada.interval` steps, the ADA probability p from the sign of D(real) (target `ada.target`).
Since the regularisers take separate optimiser steps, Adam's lr and betas are lazy-adjusted
(`stylegan2_losses.lazy_adam_hparams`), as in the reference.

Task state: {"step", "G", "G_ema", "G_vars", "D", ["D_vars"], "G_opt", "D_opt", "pl_mean",
"ada_p", "ada_sign_sum", "ada_sign_count"}; "G"/"G_ema"/"D" hold the `nnx.Param`s, "G_vars" the
generator's other variables (w_avg, constant noise) shared by G and G_ema (the reference copies
buffers into G_ema rather than averaging them).

Devices and processes: D's minibatch std groups rows within each device's part of the batch, as
the reference does within each GPU's, so a run depends on the device count (as the reference's on
the GPU count) but not on how the devices are spread over processes: the data pipeline gives the
same global batch in the same order for any process count, so one process with 8 devices and two
with 4 train the same run up to the order of sums. The FID gathers G_ema to every process
(`generator_on_host`); each process then generates and features its block of the samples and of
the real images, and the statistics are gathered (`metrics.fid`): every process gets the FID one
process computes from the same samples.

Precision: as the reference, the `num_fp16_res` highest resolutions of G and D compute in a reduced
dtype with `conv_clamp` on their activations, everything else in float32; parameters, optimiser
state and gradients stay float32 (master weights). The reduced dtype is `mixed_precision`: "auto"
is bfloat16 on GPU and TPU and float32 on CPU; float16 (the reference's) is trained with dynamic loss
scaling (`training.loss_scale`), G and D each with their own scale: every phase's loss is scaled before
its backward pass and its gradients unscaled in float32; a phase whose gradients are not finite skips
its update (parameters and Adam state unchanged) and halves that network's scale, which doubles after
`stylegan2.loss_scale_period` finite updates. The scales live in the task state ("G_loss_scale",
"D_loss_scale", checkpointed with it) and are logged as the metrics G_loss_scale / D_loss_scale
(with G_skipped / D_skipped, the updates skipped in the step). R1's and path length's inner
gradients (of D's logits w.r.t. the images, of G's images w.r.t. w) are not scaled.
Conditional training (`c_dim > 0`) is not implemented and is rejected.
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

from ..data import pipeline
from ..explain.bundles import LatentModels
from ..metrics import fid as fid_lib
from ..models.stylegan2 import Discriminator, Generator, style_mixing
from . import ada as ada_lib
from ..training import loss_scale
from ..training.batches import train_batches
from ..training.runs import load_run
from . import stylegan2_losses as losses
from ..training.loop import Task, run_training
from ..training.monitor import to_host
from ..phases import announce

log = logging.getLogger(__name__)


def _kwargs(section: Any) -> dict:
    return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def build_generator(model_cfg: Any, rngs: nnx.Rngs) -> Generator:
    return Generator(**_kwargs(model_cfg.generator), rngs=rngs)


def build_discriminator(model_cfg: Any, rngs: nnx.Rngs) -> Discriminator:
    return Discriminator(**_kwargs(model_cfg.discriminator), rngs=rngs)


def uses_float16(model_cfg: Any) -> bool:
    """Whether a network's reduced-precision blocks run in float16 (and so need loss scaling)."""
    return int(model_cfg.get("num_fp16_res", 0)) > 0 and model_cfg.get("mixed_precision", "auto") == "float16"


def _adam(optim: Any, interval: int) -> optax.GradientTransformation:
    """Adam with the reference's lazy-regularisation adjustment of lr and betas."""
    lr, b1, b2 = losses.lazy_adam_hparams(float(optim.learning_rate), float(optim.b1),
                                          float(optim.b2), int(interval) if interval > 0 else 1)
    return optax.adam(lr, b1=b1, b2=b2, eps=float(optim.get("eps", 1e-8)))


def _check_config(config: Any) -> None:
    g, d, s = config.model.generator, config.model.discriminator, config.stylegan2
    if int(g.get("c_dim", 0)) or int(d.get("c_dim", 0)):
        raise ValueError("conditional StyleGAN2 training (c_dim > 0) is not implemented")
    res = int(config.data.resolution)
    for name, m in (("generator", g), ("discriminator", d)):
        if int(m.img_resolution) != res:
            raise ValueError(f"config.model.{name}.img_resolution={m.img_resolution} differs from "
                             f"config.data.resolution={res}")
    for key in ("r1_interval", "pl_interval"):
        if int(s[key]) < 0:
            raise ValueError(f"config.stylegan2.{key} must be >= 0 (0 disables), got {s[key]}")
    if not 0.0 <= float(s.style_mixing_prob) <= 1.0:
        raise ValueError(f"config.stylegan2.style_mixing_prob must be in [0, 1], got {s.style_mixing_prob}")
    batch = int(config.train.batch_size)
    if s.pl_interval > 0 and batch // int(s.pl_batch_shrink) < 1:
        raise ValueError(f"pl_batch_shrink={s.pl_batch_shrink} leaves no latents of a batch of {batch}")
    if float(s.get("loss_scale_initial", loss_scale.INITIAL_SCALE)) < 1.0:
        raise ValueError(f"config.stylegan2.loss_scale_initial must be >= 1, got {s.loss_scale_initial}")
    if int(s.get("loss_scale_period", loss_scale.PERIOD)) < 1:
        raise ValueError(f"config.stylegan2.loss_scale_period must be >= 1, got {s.loss_scale_period}")
    if config.ada.enabled and not 0.0 <= float(config.ada.initial_p) <= 1.0:
        raise ValueError(f"config.ada.initial_p must be in [0, 1], got {config.ada.initial_p}")


class StyleGAN2Task(Task):
    def __init__(self, config: Any):
        super().__init__(config)
        _check_config(config)
        s = config.stylegan2
        self.batch_size = int(config.train.batch_size)
        self.r1_interval, self.pl_interval = int(s.r1_interval), int(s.pl_interval)
        self.tx_g = _adam(config.optim_g, self.pl_interval)
        self.tx_d = _adam(config.optim_d, self.r1_interval)
        # which networks train with a loss scale (those with float16 blocks)
        self.scaled = {"G": uses_float16(config.model.generator), "D": uses_float16(config.model.discriminator)}
        self.loss_scale_period = int(s.get("loss_scale_period", loss_scale.PERIOD))
        g = nnx.eval_shape(lambda: build_generator(config.model, nnx.Rngs(0)))
        d = nnx.eval_shape(lambda: build_discriminator(config.model, nnx.Rngs(0)))
        self.g_graphdef, _, _ = nnx.split(g, nnx.Param, ...)
        self.d_graphdef, _, d_rest = nnx.split(d, nnx.Param, ...)
        self.d_has_vars = bool(jax.tree.leaves(d_rest))
        self.z_dim, self.num_ws = int(g.z_dim), int(g.num_ws)
        self.resolution = int(g.img_resolution)
        self.augment_config = None
        if config.ada.enabled:
            overrides = _kwargs(config.ada.get("overrides", {}))
            self.augment_config = ada_lib.AugmentConfig.from_preset(str(config.ada.preset), **overrides)
        self._sample_fn = None
        self._fid_extractor = self._fid_real_stats = None  # built at the first evaluation

    # -- state ------------------------------------------------------------------------------------
    def init(self, rng):
        k_g, k_d = jax.random.split(rng)
        _, g_params, g_vars = nnx.split(build_generator(self.config.model, nnx.Rngs(k_g)), nnx.Param, ...)
        _, d_params, d_vars = nnx.split(build_discriminator(self.config.model, nnx.Rngs(k_d)), nnx.Param, ...)
        zero = jnp.zeros((), jnp.float32)
        state = {
            "step": jnp.zeros((), jnp.int32),
            "G": g_params, "G_ema": jax.tree.map(jnp.copy, g_params), "G_vars": g_vars,
            "D": d_params,
            "G_opt": self.tx_g.init(g_params), "D_opt": self.tx_d.init(d_params),
            "pl_mean": zero,
            "ada_p": jnp.asarray(float(self.config.ada.initial_p) if self.config.ada.enabled else 0.0,
                                 jnp.float32),
            "ada_sign_sum": zero, "ada_sign_count": zero,
        }
        if self.d_has_vars:
            state["D_vars"] = d_vars
        for net, scaled in self.scaled.items():
            if scaled:
                state[f"{net}_loss_scale"] = loss_scale.init(
                    float(self.config.stylegan2.get("loss_scale_initial", loss_scale.INITIAL_SCALE)))
        return state

    def _update(self, net: str, loss_fn, params, opt_state, scales: dict, *args):
        """One phase's optimiser step of `net` ("G"/"D"): ((loss, aux), grads, params, opt_state,
        grad norm, skipped), loss-scaled when `net` has float16 blocks (`scales[net]` is then replaced
        by the adjusted scale state)."""
        tx = self.tx_g if net == "G" else self.tx_d
        if not self.scaled[net]:
            value, grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *args)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (value, optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads),
                    jnp.zeros((), jnp.float32))
        value, grads, finite = loss_scale.value_and_grad(loss_fn, scales[net], has_aux=True)(params, *args)
        params, opt_state = loss_scale.apply_if_finite(tx, grads, opt_state, params, finite)
        scales[net] = loss_scale.adjust(scales[net], finite, period=self.loss_scale_period)
        return (value, params, opt_state, loss_scale.finite_norm(grads, finite),
                1.0 - finite.astype(jnp.float32))

    def generator(self, params, g_vars) -> Generator:
        return nnx.merge(self.g_graphdef, params, g_vars)

    def discriminator(self, state_or_params, d_vars=None) -> Discriminator:
        if d_vars is None:
            return nnx.merge(self.d_graphdef, state_or_params)
        return nnx.merge(self.d_graphdef, state_or_params, d_vars)

    def _d_fn(self, state, d_params, p, key):
        """images -> D logits [N] with ADA augmentation (p traced) and `d_params` closed over."""
        d = self.discriminator(d_params, state.get("D_vars"))
        cfg = self.augment_config

        def fn(images):
            if cfg is not None:
                images = ada_lib.augment(key, images, p, cfg)
            return d(images)[:, 0]
        return fn

    # -- the step ---------------------------------------------------------------------------------
    def step_variant(self, step: int):
        """On CPU, (run path length, run R1) for this step, chosen on the host: XLA:CPU runs the
        convolutions inside a `lax.cond` branch ~100x slower. Elsewhere None: one program whose
        lazy terms are `lax.cond`s (compiled once instead of once per variant)."""
        if jax.default_backend() != "cpu":
            return None
        return (self.pl_interval > 0 and step % self.pl_interval == 0,
                self.r1_interval > 0 and step % self.r1_interval == 0)

    def train_step(self, state, batch, rng, variant=None):
        """variant: None (lazy terms by `lax.cond` on the step) or static (do_pl, do_r1)."""
        s = self.config.stylegan2
        b = self.batch_size
        step = state["step"]
        p = state["ada_p"]
        keys = {name: jax.random.fold_in(rng, i) for i, name in enumerate(
            ("g_z", "g_mix", "g_noise", "g_aug", "pl_z", "pl_mix", "pl_noise", "pl_y",
             "d_z", "d_mix", "d_noise", "d_aug_fake", "d_aug_real", "r1_aug"))}
        real = batch["image"].astype(jnp.float32)
        metrics = {}

        # Gmain --------------------------------------------------------------------------------
        def g_main_loss(g_params, g_vars):
            g_vars = jax.tree.map(lambda x: x, g_vars)  # fresh Variables: w_avg updates in place
            G = self.generator(g_params, g_vars)
            z = jax.random.normal(keys["g_z"], (b, self.z_dim), jnp.float32)
            ws, _ = style_mixing(G, z, None, float(s.style_mixing_prob), keys["g_mix"], update_emas=True)
            fake = G.synthesis(ws, noise_mode="random", noise_rng=keys["g_noise"])
            logits = self._d_fn(state, jax.lax.stop_gradient(state["D"]), p, keys["g_aug"])(fake)
            _, _, new_vars = nnx.split(G, nnx.Param, ...)
            return losses.g_nonsaturating_loss(logits), (new_vars, logits)

        scales = {net: state[f"{net}_loss_scale"] for net, on in self.scaled.items() if on}
        (g_loss, (g_vars, g_logits)), g_params, g_opt, g_norm, g_skipped = self._update(
            "G", g_main_loss, state["G"], state["G_opt"], scales, state["G_vars"])
        metrics.update(G_loss=g_loss, G_fake_logits=jnp.mean(g_logits), G_grad_norm=g_norm)

        # Greg: lazy path length -----------------------------------------------------------------
        pl_mean = state["pl_mean"]
        pl_penalty = pl_len = jnp.zeros((), jnp.float32)
        if self.pl_interval > 0 and float(s.pl_weight) > 0:
            def greg(operands):
                g_params, g_opt, pl_mean, g_vars, g_scale = operands

                def pl_loss(g_params):
                    G = self.generator(g_params, jax.tree.map(lambda x: x, g_vars))
                    n = b // int(s.pl_batch_shrink)
                    z = jax.random.normal(keys["pl_z"], (n, self.z_dim), jnp.float32)
                    ws, _ = style_mixing(G, z, None, float(s.style_mixing_prob), keys["pl_mix"], update_emas=True)
                    synth = lambda w: G.synthesis(w, noise_mode="random", noise_rng=keys["pl_noise"])  # noqa: E731
                    loss, aux = losses.path_length_penalty(
                        synth, ws, keys["pl_y"], pl_mean, pl_weight=float(s.pl_weight),
                        pl_decay=float(s.pl_decay), interval=self.pl_interval)
                    return loss, (aux, nnx.split(G, nnx.Param, ...)[2])

                local = {"G": g_scale}
                (_, (aux, g_vars)), g_params, g_opt, _, skipped = self._update("G", pl_loss, g_params, g_opt, local)
                return (g_params, g_opt, aux["pl_mean"], g_vars, local["G"],
                        jnp.mean(aux["pl_penalty"]), jnp.mean(aux["pl_lengths"]), skipped)

            def skip(operands):
                zero = jnp.zeros((), jnp.float32)
                return (*operands, zero, zero, zero)

            operands = (g_params, g_opt, pl_mean, g_vars, scales.get("G"))
            if variant is None:
                g_params, g_opt, pl_mean, g_vars, g_scale, pl_penalty, pl_len, skipped = jax.lax.cond(
                    step % self.pl_interval == 0, greg, skip, operands)
            else:
                g_params, g_opt, pl_mean, g_vars, g_scale, pl_penalty, pl_len, skipped = (
                    greg if variant[0] else skip)(operands)
            if self.scaled["G"]:
                scales["G"] = g_scale
            g_skipped = g_skipped + skipped
        metrics.update(pl_penalty=pl_penalty, pl_lengths=pl_len, pl_mean=pl_mean)

        # Dmain ----------------------------------------------------------------------------------
        G = self.generator(g_params, jax.tree.map(lambda x: x, g_vars))
        z = jax.random.normal(keys["d_z"], (b, self.z_dim), jnp.float32)
        ws, _ = style_mixing(G, z, None, float(s.style_mixing_prob), keys["d_mix"], update_emas=True)
        fake = jax.lax.stop_gradient(G.synthesis(ws, noise_mode="random", noise_rng=keys["d_noise"]))
        g_vars = nnx.split(G, nnx.Param, ...)[2]

        def d_main_loss(d_params):
            fake_logits = self._d_fn(state, d_params, p, keys["d_aug_fake"])(fake)
            real_logits = self._d_fn(state, d_params, p, keys["d_aug_real"])(real)
            return losses.d_logistic_loss(real_logits, fake_logits), (real_logits, fake_logits)

        (d_loss, (real_logits, fake_logits)), d_params, d_opt, d_norm, d_skipped = self._update(
            "D", d_main_loss, state["D"], state["D_opt"], scales)
        metrics.update(D_loss=d_loss, D_real_logits=jnp.mean(real_logits),
                       D_fake_logits=jnp.mean(fake_logits), D_real_sign=jnp.mean(jnp.sign(real_logits)),
                       D_grad_norm=d_norm)

        # Dreg: lazy R1 --------------------------------------------------------------------------
        r1 = jnp.zeros((), jnp.float32)
        if self.r1_interval > 0 and float(s.r1_gamma) > 0:
            def dreg(operands):
                d_params, d_opt, d_scale = operands

                def r1_loss(d_params):
                    d_fn = self._d_fn(state, d_params, p, keys["r1_aug"])
                    return losses.r1_penalty(d_fn, real, gamma=float(s.r1_gamma), interval=self.r1_interval)

                local = {"D": d_scale}
                (_, aux), d_params, d_opt, _, skipped = self._update("D", r1_loss, d_params, d_opt, local)
                return d_params, d_opt, local["D"], jnp.mean(aux["r1_penalty"]), skipped

            def skip(operands):
                return (*operands, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))

            operands = (d_params, d_opt, scales.get("D"))
            if variant is None:
                d_params, d_opt, d_scale, r1, skipped = jax.lax.cond(
                    step % self.r1_interval == 0, dreg, skip, operands)
            else:
                d_params, d_opt, d_scale, r1, skipped = (dreg if variant[1] else skip)(operands)
            if self.scaled["D"]:
                scales["D"] = d_scale
            d_skipped = d_skipped + skipped
        metrics["r1_penalty"] = r1
        for net, scale_state in scales.items():  # the scale after this step, and the updates skipped in it
            metrics[f"{net}_loss_scale"] = scale_state["scale"]
        if self.scaled["G"]:
            metrics["G_skipped"] = g_skipped
        if self.scaled["D"]:
            metrics["D_skipped"] = d_skipped

        # EMA of G ---------------------------------------------------------------------------------
        rampup = float(s.ema_rampup) if float(s.ema_rampup) > 0 else None
        beta = losses.ema_beta(b, step.astype(jnp.float32) * b, ema_kimg=float(s.ema_kimg), rampup=rampup)
        g_ema = losses.ema_update(state["G_ema"], g_params, beta)
        metrics["ema_beta"] = beta

        # ADA --------------------------------------------------------------------------------------
        ada = ada_lib.AdaState(p=p, sign_sum=state["ada_sign_sum"], sign_count=state["ada_sign_count"])
        if self.config.ada.enabled and float(self.config.ada.target) > 0:
            interval = int(self.config.ada.interval)
            ada = ada_lib.ada_observe(ada, real_logits)
            adjusted = ada_lib.ada_adjust(ada, batch_size=b, target=float(self.config.ada.target),
                                          interval=interval, ada_kimg=float(self.config.ada.kimg))
            ada = jax.tree.map(lambda a, k: jnp.where((step + 1) % interval == 0, a, k), adjusted, ada)
        metrics["ada_p"] = p  # the p used in this step

        new_state = dict(state, step=step + 1, G=g_params, G_ema=g_ema, G_vars=g_vars, D=d_params,
                         G_opt=g_opt, D_opt=d_opt, pl_mean=pl_mean, ada_p=ada.p,
                         ada_sign_sum=ada.sign_sum, ada_sign_count=ada.sign_count,
                         **{f"{net}_loss_scale": scale_state for net, scale_state in scales.items()})
        return new_state, metrics

    # -- data, samples, metadata --------------------------------------------------------------------
    def make_train_iterator(self, data_state):
        return train_batches(self.config, data_state, keys=("image",))

    def sample_images(self, state):
        """G_ema images of fixed latents (seed config.seed + 1), constant noise, no truncation."""
        n = int(self.config.stylegan2.num_samples)
        if n <= 0:
            return None
        if self._sample_fn is None:
            z = jax.random.normal(jax.random.key(int(self.config.seed) + 1), (n, self.z_dim), jnp.float32)
            self._sample_fn = jax.jit(lambda params, g_vars: self.generator(params, g_vars)(z, noise_mode="const"))
        return {"G_ema": self._sample_fn(state["G_ema"], state["G_vars"])}

    def host_evaluate(self, state) -> dict[str, float]:
        """FID of G_ema at each evaluation (config.train.eval_every): the FID trend of a run."""
        if int(self.config.fid.num_samples) <= 0:
            return {}
        n = int(self.config.fid.num_samples)
        with announce(log, f"FID of G_ema on {n} samples" + (
                " (the real images' statistics first)" if self._fid_extractor is None else "")):
            if self._fid_extractor is None:
                self._fid_extractor = fid_extractor(self.config)
                self._fid_real_stats = fid_lib.feature_stats(real_images(self.config, n), self._fid_extractor,
                                                     batch_size=int(self.config.fid.batch_size), max_items=n)
            result = compute_fid(self, generator_on_host(state), self.config, self._fid_extractor,
                                 self._fid_real_stats)
        return {"fid": result.value}

    def model_metadata(self) -> dict:
        return {"kind": "stylegan2", "model": self.config.model.to_dict()}

    def abstract_batch(self):
        r = self.resolution
        return {"image": jax.ShapeDtypeStruct((self.batch_size, r, r, 3), jnp.float32)}


def make_task(config: Any) -> StyleGAN2Task:
    return StyleGAN2Task(config)


def generator_from_state(task: StyleGAN2Task, state, ema: bool = True) -> Generator:
    """The nnx Generator of a task state: the EMA weights (default) or the trained ones."""
    return task.generator(state["G_ema" if ema else "G"], state["G_vars"])


def generator_on_host(state, ema: bool = True) -> dict:
    """G_ema (or G) and G_vars of a task state as numpy on every process, gathered explicitly from
    wherever they live (FSDP shards on other processes included): what the host-side FID and
    samplers take. The FID then splits the samples over the processes (`metrics.fid`)."""
    return to_host({k: state[k] for k in ("G_ema" if ema else "G", "G_vars")})


def generator_sampler(task: StyleGAN2Task, state, ema: bool = True, truncation_psi: float = 1.0):
    """fn(key, batch_size) -> images, jitted per batch size (the FID module's generator_fn)."""
    params, g_vars = state["G_ema" if ema else "G"], state["G_vars"]

    @jax.jit
    def sample(params, g_vars, key, z):
        G = task.generator(params, g_vars)
        return G(z, truncation_psi=truncation_psi, noise_mode="random", rngs=key)

    def fn(key, batch_size):
        k_z, k_noise = jax.random.split(key)
        z = jax.random.normal(k_z, (batch_size, task.z_dim), jnp.float32)
        return sample(params, g_vars, k_noise, z)
    return fn


def real_images(config: Any, num_images: int):
    """Up to `num_images` training images, in the data set's order (no shuffling or augmentation)."""
    data = _kwargs(config.data)
    batch = int(config.fid.batch_size)
    data.update(split=str(config.fid.get("split", "train")), train=False, drop_remainder=False,
                batch_size=batch, num_epochs=1, shard_index=0, shard_count=1)
    seen = 0
    for item in pipeline.make_iterator(data):
        if seen >= num_images:
            return
        images = np.asarray(item["image"])[: num_images - seen]
        seen += len(images)
        yield images


def fid_extractor(config: Any):
    """The standard FID Inception from config.fid.inception_weights, or ('' ) the labelled fallback."""
    path = str(config.fid.get("inception_weights", ""))
    if path and not Path(path).exists():
        raise FileNotFoundError(f"config.fid.inception_weights={path!r} does not exist")
    return fid_lib.make_fid_extractor(path or None, seed=int(config.fid.get("fallback_seed", 0)),
                              fallback_input_size=int(config.fid.get("fallback_input_size", 299)))


def compute_fid(task: StyleGAN2Task, state, config: Any | None = None, extractor=None, real_stats=None):
    """FID of G_ema against the training images (config.fid.num_samples of each); a FIDResult.
    Collective under several processes (each computes its share; every one gets the result)."""
    config = config or task.config
    n, batch = int(config.fid.num_samples), int(config.fid.batch_size)
    extractor = extractor or fid_extractor(config)
    if real_stats is None:
        real_stats = fid_lib.feature_stats(real_images(config, n), extractor, batch_size=batch, max_items=n)
    return fid_lib.compute_fid(real_stats, generator_sampler(task, state), extractor, n_samples=n, batch_size=batch,
               seed=int(config.seed))


def train(config: Any, workdir: str):
    """run_training, then (config.fid.num_samples > 0) the FID of G_ema, written to fid.json."""
    task = make_task(config)
    result = run_training(task, config, workdir).raise_if_preempted()
    metrics = {}
    if int(config.fid.num_samples) > 0:
        state = generator_on_host(result.state["task"])
        n = int(config.fid.num_samples)
        with announce(log, f"FID of G_ema on {n} samples (final" + (
                "; the real images' statistics first)" if task._fid_real_stats is None else ")")):
            fid_result = compute_fid(task, state, config, task._fid_extractor, task._fid_real_stats)
        log.info("%s", fid_result)
        metrics = {"fid": fid_result.value, "extractor": fid_result.extractor_name,
                   "comparable_with_published": fid_result.comparable, "n_real": fid_result.n_real,
                   "n_fake": fid_result.n_fake, "step": result.step}
        if jax.process_index() == 0:
            Path(workdir, "fid.json").write_text(json.dumps(metrics, indent=1))
    return result, metrics


def load(workdir: str, step: int | None = None):
    """(task, state, config) of a trained StyleGAN2 run (see `generator_from_state`)."""
    return load_run(workdir, "stylegan2", step)


def latent_models(generator_workdir: str, classifier_fn) -> LatentModels:
    """LatentModels of a StyleGAN2 run (EMA weights, constant noise) and any classifier function."""
    task, state, _ = load(generator_workdir)
    G = generator_from_state(task, state, ema=True)
    graphdef, g_state = nnx.split(G)

    def synthesis_fn(ws):
        return nnx.merge(graphdef, g_state).synthesis(ws, noise_mode="const")

    def mapping_fn(z):
        return nnx.merge(graphdef, g_state).mapping(z)

    return LatentModels(synthesis_fn, mapping_fn, classifier_fn, int(G.z_dim), int(G.num_ws),
                        int(G.img_resolution))


__all__ = ["StyleGAN2Task", "latent_models", "make_task", "train", "load", "generator_from_state", "generator_on_host",
           "generator_sampler",
           "compute_fid", "fid_extractor", "real_images", "build_generator", "build_discriminator"]
