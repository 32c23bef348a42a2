"""The trainers by name (`config.trainer`): the training framework, the command line and the
pipeline rebuild a run's task through this table and never import a trainer directly, so adding a
trainer is one entry here (a module under viscoin_jax.trainers with make_task(config) and
train(config, workdir)).
"""

from __future__ import annotations

import importlib

# config.trainer -> module with make_task(config) and train(config, workdir)
TRAINERS = {
    "toy": "viscoin_jax.trainers.toy",
    "classifier": "viscoin_jax.trainers.classifier",
    "stylegan2": "viscoin_jax.trainers.stylegan2",
    "viscoin": "viscoin_jax.trainers.viscoin",
    "autoencoder": "viscoin_jax.trainers.autoencoder",
}


def trainer_module(name: str):
    """Imports the trainer module registered for `config.trainer`."""
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r} (config.trainer); known: {sorted(TRAINERS)}")
    try:
        return importlib.import_module(TRAINERS[name])
    except ModuleNotFoundError as e:
        if e.name == TRAINERS[name]:
            raise ValueError(f"trainer {name!r}: module {TRAINERS[name]} is not available") from e
        raise


__all__ = ["TRAINERS", "trainer_module"]
