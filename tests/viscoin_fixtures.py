"""Runs the VisCoIN tests build on: an untrained classifier, generator and VisCoIN, saved as the
training loop saves runs (training them would only cost compile time in the tests)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from viscoin_jax.trainers import classifier, stylegan2, viscoin
from viscoin_jax.training import mesh as mesh_lib
from viscoin_jax.training.checkpoint import Checkpointer
from viscoin_jax.training.config import config_to_dict, load_config
from viscoin_jax.training.loop import compile_task


def _one_device_mesh():
    return mesh_lib.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])


def _save(config, task, state, workdir: Path) -> None:
    ckpt = Checkpointer.from_config(config, workdir)
    ckpt.save(1, state, config=config_to_dict(config), metadata=task.model_metadata())
    ckpt.close()


def make_frozen_runs(root: Path):
    """(classifier run, generator run with a non-zero w_avg, that w_avg) under `root`."""
    mesh = _one_device_mesh()
    clf_cfg = load_config("configs/classifier_synthetic.py", [
        "--config.model.width=4", "--config.checkpoint.async_save=False"])
    clf_task = classifier.make_task(clf_cfg)
    _save(clf_cfg, clf_task, compile_task(clf_task, mesh).init(jax.random.key_data(jax.random.key(0))),
          root / "clf")

    g_cfg = load_config("configs/stylegan2_synthetic.py", [
        "--config.model.generator.z_dim=8", "--config.model.generator.w_dim=8",
        "--config.model.generator.mapping_layers=1", "--config.model.generator.channel_max=8",
        "--config.model.discriminator.channel_max=8", "--config.fid.num_samples=0",
        "--config.checkpoint.async_save=False"])
    task = stylegan2.make_task(g_cfg)
    state = compile_task(task, mesh).init(jax.random.key_data(jax.random.key(0)))
    G = stylegan2.generator_from_state(task, state["task"])
    w_avg = np.random.default_rng(0).normal(size=(G.w_dim,)).astype(np.float32)
    G.mapping.w_avg[...] = jnp.asarray(w_avg)
    state["task"]["G_vars"] = nnx.split(G, nnx.Param, ...)[2]
    _save(g_cfg, task, state, root / "sg2")
    return root / "clf", root / "sg2", w_avg


def viscoin_config(clf: Path, sg2: Path, *overrides):
    """The tiny VisCoIN config on top of the frozen runs, sized for tests."""
    base = [f"--config.classifier_workdir={clf}", f"--config.generator_workdir={sg2}",
            "--config.model.branch_channels=8", "--config.train.batch_size=4", "--config.viscoin.num_generated=4",
            "--config.viscoin.num_samples=0", "--config.train.num_steps=3", "--config.train.eval_every=0",
            "--config.train.sample_every=0", "--config.train.log_every=1", "--config.checkpoint.every=3",
            "--config.checkpoint.async_save=False", "--config.data.synthetic_size=64",
            "--config.eval.batch_size=8", "--config.eval.max_batches=1", "--config.eval.final_batches=1"]
    return load_config("configs/viscoin_synthetic.py", base + list(overrides))


def make_viscoin_run(root: Path, clf: Path, sg2: Path, seed: int = 0) -> Path:
    """An initial (untrained) VisCoIN run on the frozen runs, at `root / 'viscoin'`."""
    config = viscoin_config(clf, sg2)
    task = viscoin.make_task(config)
    state = compile_task(task, _one_device_mesh()).init(jax.random.key_data(jax.random.key(seed)))
    _save(config, task, state, root / "viscoin")
    return root / "viscoin"


def make_iresnet_run(workdir: Path, seed: int = 1) -> Path:
    """An untrained small i-ResNet classifier run (12 channels, one block per stage) at `workdir`."""
    config = load_config("configs/classifier_synthetic.py:iresnet", [
        "--config.model.channels=12", "--config.model.blocks_per_stage=(1, 1)",
        "--config.checkpoint.async_save=False", "--config.data.synthetic_size=64"])
    task = classifier.make_task(config)
    _save(config, task, compile_task(task, _one_device_mesh()).init(jax.random.key_data(jax.random.key(seed))),
          workdir)
    return workdir
