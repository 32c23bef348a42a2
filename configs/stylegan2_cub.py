"""StyleGAN2-ADA on CUB-200-2011 at 256 px, after the reference's "paper256" settings.

    viscoin-jax train --config configs/stylegan2_cub.py --workdir gs://bucket/sg2_cub \
        --config.data.data_dir=gs://bucket/tfds --config.fid.inception_weights=/path/fid_inception.npz

For a TPU pod slice or a multi-GPU node (data parallel over every device; set
`--config.mesh.fsdp=N` to shard the parameters). paper256: channel_base 16384 (half width),
channel_max 512, minibatch-std group 8, lr 0.0025, betas (0, 0.99), R1 gamma 1, EMA 20 kimg
without ramp-up, ADA target 0.6 with ada_kimg 500, 25,000 kimg at batch 64. The mapping network
has 2 layers, as the VisCoIN generator at 256 px (paper256 uses 8; `--config.model.generator.
mapping_layers=8`). Runs in float32 (see the trainer's docstring on mixed precision).
"""

from ml_collections import ConfigDict

from viscoin_jax.data.pipeline import data_config
from viscoin_jax.training.config import base_config

RESOLUTION = 256
BATCH = 64
TOTAL_KIMG = 25_000


def get_config(arg=None):
    if arg is not None:
        raise ValueError(f"stylegan2_cub has no variants, got {arg!r}")
    c = base_config()
    c.trainer = "stylegan2"
    c.seed = 0
    c.data = data_config(name="cub200", split="train", resolution=RESOLUTION, augment="flip",
                         bbox_crop=True, read_threads=16, prefetch_buffer=256)
    c.model = ConfigDict(dict(
        generator=dict(z_dim=512, c_dim=0, w_dim=512, img_resolution=RESOLUTION, img_channels=3,
                       mapping_layers=2, channel_base=16384, channel_max=512, num_fp16_res=4,
                       conv_clamp=256.0, mixed_precision="auto"),  # bf16 top 4 resolutions on GPU/TPU
        discriminator=dict(c_dim=0, img_resolution=RESOLUTION, img_channels=3, channel_base=16384,
                           channel_max=512, num_fp16_res=4, conv_clamp=256.0, mbstd_group_size=8,
                           mixed_precision="auto"),
    ))
    c.stylegan2 = ConfigDict(dict(
        style_mixing_prob=0.9,
        r1_gamma=1.0,
        r1_interval=16,
        pl_weight=2.0,
        pl_interval=4,
        pl_decay=0.01,
        pl_batch_shrink=2,
        ema_kimg=20.0,
        ema_rampup=0.0,  # none
        num_samples=64,
        # dynamic loss scaling, used by a network whose blocks run in float16 (mixed_precision=float16):
        # the starting scale and the finite updates after which it doubles (it halves on an overflow)
        loss_scale_initial=2.0 ** 15,
        loss_scale_period=2000,
    ))
    adam = dict(learning_rate=0.0025, b1=0.0, b2=0.99, eps=1e-8)
    c.optim_g = ConfigDict(adam)
    c.optim_d = ConfigDict(adam)
    c.ada = ConfigDict(dict(enabled=True, preset="bc", initial_p=0.0, target=0.6, interval=4,
                            kimg=500.0))
    c.fid = ConfigDict(dict(inception_weights="", num_samples=50_000, batch_size=250, split="train",
                            fallback_seed=0, fallback_input_size=299))
    c.train.num_steps = TOTAL_KIMG * 1000 // BATCH
    c.train.batch_size = BATCH
    c.train.log_every = 100
    c.train.sample_every = 5000
    c.train.progress_every = 1000
    c.checkpoint.every = 5000
    c.checkpoint.max_to_keep = 3
    return c
