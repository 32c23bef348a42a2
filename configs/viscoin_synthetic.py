"""VisCoIN on the embedded synthetic blobs at 32 px (CPU, a few minutes).

    viscoin-jax train --config configs/classifier_synthetic.py --workdir runs/clf
    viscoin-jax train --config configs/stylegan2_synthetic.py --workdir runs/sg2_tiny
    viscoin-jax train --config configs/viscoin_synthetic.py --workdir runs/viscoin_tiny \
        --config.classifier_workdir=runs/clf --config.generator_workdir=runs/sg2_tiny

K = 8 concepts on a 3x3 grid, narrow extractor branches (16 channels), the paper's loss weights
(CUB's, with sparsity 0.5 and gamma 0.2: see below) and Adam; each step sees 8 real images and 8 images sampled from G. Without
`--config.loss.lpips_weights=PATH` the perceptual term is the labelled fallback on the
classifier's features (not LPIPS).
"""

from ml_collections import ConfigDict

from viscoin_jax.data.pipeline import data_config
from viscoin_jax.training.config import base_config


def get_config(arg=None):
    if arg is not None:
        raise ValueError(f"viscoin_synthetic has no variants, got {arg!r}")
    c = base_config()
    c.trainer = "viscoin"
    c.seed = 0
    c.classifier_workdir = "runs/clf"  # a `classifier` run (ResNet) on the same data
    c.generator_workdir = "runs/sg2_tiny"  # a `stylegan2` run at the same resolution
    c.data = data_config(name="synthetic/blob_binary", resolution=32, synthetic_size=4096, augment="flip")
    c.eval = ConfigDict(dict(split="test", batch_size=32, max_batches=4, final_batches=4))
    c.model = ConfigDict(dict(n_concepts=8, num_classes=2, branch_channels=16, concept_grid=3, dropout=0.01,
                              init_scale=0.1,
                              # W+ vectors (first, last) fed by phi_prime; () = by resolution, as the paper
                              prime_split=()))
    c.viscoin = ConfigDict(dict(num_generated=8, num_samples=8))
    # sparsity delta = 0.5 (the paper: 0.2 for CUB, 2 for CelebA-HQ) and the faithfulness weight gamma = 0.2
    # (CelebA-HQ's; 0.1 for CUB). Measured on the demo's f and G (1500 steps), 300 steps, FF median on 128
    # held-out images at tau 0.1 / 0.2 / 0.4: delta 0.5, gamma 0.2: 0.133 / 0.131 / 0.127 (positive and
    # falling); delta 2, gamma 0.1: 0.291 at every tau (one relevant concept per class, so every tau
    # removes the same one); delta 0.2, gamma 0.1: 0.047 / 0.060 / 0.139 (docs/performance.md has the sweep).
    c.loss = ConfigDict(dict(alpha=0.5, mse=1.0, l1=1.0, beta=3.0, gamma=0.2, delta=0.5, ortho=1.0, w_reg=1.0,
                             lpips_weights="", allow_perceptual_fallback=True))  # no weights offline
    c.optim = ConfigDict(dict(name="adam", learning_rate=1e-3, warmup_steps=0, schedule="constant",
                              b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=0.0))
    c.train.num_steps = 300
    c.train.batch_size = 8  # real images; plus viscoin.num_generated G samples
    c.train.log_every = 25
    c.train.eval_every = 100
    c.train.sample_every = 100
    c.train.progress_every = 25
    c.checkpoint.every = 100
    c.checkpoint.max_to_keep = 1
    return c
