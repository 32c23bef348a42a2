"""Classifier on the embedded synthetic blobs (CPU, minutes).

    viscoin-jax train --config configs/classifier_synthetic.py --workdir runs/clf
    viscoin-jax train --config configs/classifier_synthetic.py:iresnet --workdir runs/iresnet

Variants: "resnet" (default; a narrow ResNet-18 with a 3x3 stem) and "iresnet".
"""

from ml_collections import ConfigDict

from viscoin_jax.data.pipeline import data_config
from viscoin_jax.training.config import base_config


def get_config(arg=None):
    c = base_config()
    c.trainer = "classifier"
    c.seed = 0
    c.data = data_config(name="synthetic/blob_binary", resolution=32, synthetic_size=4096)
    c.eval = ConfigDict(dict(split="test", batch_size=64, max_batches=8))
    c.loss = ConfigDict(dict(label_smoothing=0.0))
    c.init_from = ""
    c.optim = ConfigDict(dict(name="adam", learning_rate=2e-3, warmup_steps=20, schedule="cosine",
                              b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=0.0))
    variant = arg or "resnet"
    if variant == "resnet":
        c.model = ConfigDict(dict(name="resnet", depth=18, num_classes=2, width=8, small_input=True))
    elif variant == "iresnet":
        c.model = ConfigDict(dict(name="iresnet", in_shape=(32, 32, 3), num_classes=2,
                                  blocks_per_stage=(2, 2), channels=16, n_power_iter=2))
    else:
        raise ValueError(f"unknown variant {variant!r} of classifier_synthetic (resnet, iresnet)")
    c.train.num_steps = 150
    c.train.batch_size = 32
    c.train.log_every = 25
    c.train.eval_every = 75
    c.train.progress_every = 25
    c.checkpoint.every = 75
    c.checkpoint.max_to_keep = 1
    c.checkpoint.best_metric = "eval/accuracy"
    return c
