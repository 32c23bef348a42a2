"""A tiny StyleGAN2-ADA on the embedded synthetic blobs at 32 px (CPU, a few minutes).

    viscoin-jax train --config configs/stylegan2_synthetic.py --workdir runs/sg2_tiny

Narrow networks (32 channels at every resolution, 2 mapping layers, z/w 64) and the paper's
losses, lazy intervals and Adam settings, with what NVlabs' 32 px (CIFAR) recipe does for mode
coverage: batch 32 and a minibatch-std group of 32; and a stronger R1 than the ADA heuristic, which
on this data decides whether G draws both stains (docs/performance.md, "When does the tiny G
learn the two stain colours?"). ADA's `kimg` is small so that p visibly moves in a few hundred
steps. FID uses the labelled random-Inception fallback (NOT comparable with
published numbers) unless `--config.fid.inception_weights=PATH` is given.
"""

from ml_collections import ConfigDict

from viscoin_jax.data.pipeline import data_config
from viscoin_jax.training.config import base_config

RESOLUTION = 32
# The kernels' "auto" traces the Pallas (GPU/TPU) branches as well as the XLA one, which makes
# the first- and second-order step slow to compile on CPU; this CPU config uses plain XLA.
# On an accelerator: --config.model.generator.impl=auto --config.model.discriminator.impl=auto
IMPL = "xla"
R1_GAMMA = 2.0


def get_config(arg=None):
    if arg is not None:
        raise ValueError(f"stylegan2_synthetic has no variants, got {arg!r}")
    c = base_config()
    c.trainer = "stylegan2"
    c.seed = 0
    c.data = data_config(name="synthetic/blob_binary", resolution=RESOLUTION, synthetic_size=4096,
                         augment="flip")
    c.model = ConfigDict(dict(
        generator=dict(z_dim=64, c_dim=0, w_dim=64, img_resolution=RESOLUTION, img_channels=3,
                       mapping_layers=2, channel_base=1024, channel_max=32, conv_clamp=256.0,
                       num_fp16_res=0, mixed_precision="auto", impl=IMPL),
        discriminator=dict(c_dim=0, img_resolution=RESOLUTION, img_channels=3, channel_base=1024,
                           channel_max=32, mbstd_group_size=32, conv_clamp=256.0, num_fp16_res=0,
                           mixed_precision="auto", impl=IMPL),
    ))
    c.stylegan2 = ConfigDict(dict(
        style_mixing_prob=0.9,
        # the ADA heuristic 0.0002 * res^2 / batch gives ~0.01 here; with it (or 0.05) G covers the pink
        # stain long before the purple one (R1 gamma 0.01 / 0.2 / 0.5 / 2.0: docs/performance.md)
        r1_gamma=R1_GAMMA,
        r1_interval=16,
        pl_weight=2.0,
        pl_interval=4,
        pl_decay=0.01,
        pl_batch_shrink=2,
        ema_kimg=2.0,  # half-life of the G_ema average in thousands of images
        ema_rampup=0.05,  # <= 0: no ramp-up
        num_samples=16,  # G_ema sample grid from fixed latents
        # dynamic loss scaling, used by a network whose blocks run in float16 (mixed_precision=float16):
        # the starting scale and the finite updates after which it doubles (it halves on an overflow)
        loss_scale_initial=2.0 ** 15,
        loss_scale_period=2000,
    ))
    adam = dict(learning_rate=0.0025, b1=0.0, b2=0.99, eps=1e-8)
    c.optim_g = ConfigDict(adam)
    c.optim_d = ConfigDict(adam)
    # geometric ADA only: the stain colour is the class, and colour augmentation at high p leaks
    # into G's colours (the "bc" preset adds brightness, contrast, luma flip, hue and saturation)
    c.ada = ConfigDict(dict(enabled=True, preset="blit", initial_p=0.0, target=0.6, interval=4,
                            kimg=2.0))
    # without weights: a random Inception on 96 px inputs (cheap on CPU; labelled not comparable)
    c.fid = ConfigDict(dict(inception_weights="", num_samples=256, batch_size=64, split="train",
                            fallback_seed=0, fallback_input_size=96))
    c.train.num_steps = 400
    c.train.batch_size = 32
    c.train.log_every = 50
    c.train.sample_every = 100
    c.train.eval_every = 100  # FID of G_ema (the trend in the metrics)
    c.train.progress_every = 50
    c.checkpoint.every = 200
    c.checkpoint.max_to_keep = 1
    return c
