"""Rebuilding a saved run for what builds on it (explanations, later stages, the web app): the task
from the checkpoint's own config and its state on this process's first device, whatever mesh saved
it (`loop.restore_run` does the work). A trainer's `load(workdir)` is `load_run(workdir, <its name>)`.
"""

from __future__ import annotations

from pathlib import Path

import jax

from . import mesh as mesh_lib
from .loop import restore_run


def restore_task_state(path: str | Path, step: int | None = None, expected_trainer: str | None = None):
    """(task, task_state, config, metadata) of a run, replicated on this process's first device
    whatever mesh saved it (`loop.restore_run` does the work); under several processes each
    process restores alone (any one of them may, e.g. process 0 for the explanations)."""
    one_device = mesh_lib.make_mesh({"data": 1, "fsdp": 1}, devices=jax.local_devices()[:1])
    config, task, restored, metadata = restore_run(path, step, mesh=one_device, expected_trainer=expected_trainer)
    return task, restored.state["task"], config, metadata


def load_run(workdir: str | Path, trainer: str, step: int | None = None):
    """(task, state, config) of a `trainer` run, for explanations and the stages that build on it."""
    task, state, config, _ = restore_task_state(workdir, step, expected_trainer=trainer)
    return task, state, config
