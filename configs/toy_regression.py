"""A tiny regression run (an MLP on random data) for testing the training framework.

    viscoin-jax train --config configs/toy_regression.py --workdir /tmp/toy
    viscoin-jax train --config configs/toy_regression.py:fsdp --workdir /tmp/toy_fsdp

Variants: "fsdp" shards the parameters over all devices (small `fsdp_min_size` so that this small
model is split at all); the default is data parallel.
"""

from viscoin_jax.training.config import base_config


def get_config(arg=None):
    config = base_config()
    config.trainer = "toy"
    config.seed = 0

    config.toy = dict(
        features=12,
        hidden=(48, 36),
        learning_rate=1e-2,
        input_noise=0.1,
        eval_batches=2,
    )

    config.train.num_steps = 200
    config.train.batch_size = 32
    config.train.log_every = 20
    config.train.eval_every = 100
    config.train.sample_every = 100
    config.train.progress_every = 50

    config.checkpoint.every = 100
    config.checkpoint.max_to_keep = 2
    config.checkpoint.best_metric = "eval/mse"
    config.checkpoint.best_mode = "min"

    if arg in (None, "", "dp"):
        config.mesh.data, config.mesh.fsdp = -1, 1
    elif arg == "fsdp":
        config.mesh.data, config.mesh.fsdp = 1, -1
        config.mesh.fsdp_min_size = 32
    else:
        raise ValueError(f"unknown variant {arg!r} of toy_regression (choose dp or fsdp)")
    return config
