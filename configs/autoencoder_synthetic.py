"""Convolutional autoencoder on the embedded synthetic blobs (CPU, well under a minute), for the
autoencoder counterfactuals.

    viscoin-jax train --config autoencoder_synthetic --workdir runs/ae
"""

from ml_collections import ConfigDict

from viscoin_jax.data.pipeline import data_config
from viscoin_jax.training.config import base_config


def get_config(arg=None):
    if arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} of autoencoder_synthetic (it has none)")
    c = base_config()
    c.trainer = "autoencoder"
    c.seed = 0
    c.data = data_config(name="synthetic/blob_binary", resolution=32, synthetic_size=4096)
    c.eval = ConfigDict(dict(split="test", batch_size=64, max_batches=4))
    c.model = ConfigDict(dict(channels=(16, 32), code_dim=32))
    c.optim = ConfigDict(dict(name="adam", learning_rate=2e-3, warmup_steps=20, schedule="cosine",
                              b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=0.0))
    c.train.num_steps = 600
    c.train.batch_size = 32
    c.train.log_every = 50
    c.train.eval_every = 300
    c.train.progress_every = 50
    c.checkpoint.every = 300
    c.checkpoint.max_to_keep = 1
    c.checkpoint.best_metric = "eval/mse"
    c.checkpoint.best_mode = "min"
    return c
