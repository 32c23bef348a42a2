"""VisCoIN on CUB-200-2011 at 256 px with the paper's settings (Parekh et al., ICLR 2025).

    viscoin-jax train --config configs/viscoin_cub.py --workdir gs://bucket/viscoin_cub \
        --config.classifier_workdir=gs://bucket/resnet50_cub \
        --config.generator_workdir=gs://bucket/sg2_cub \
        --config.loss.lpips_weights=/path/lpips_vgg.npz --config.data.data_dir=gs://bucket/tfds

f: a ResNet-50 fine-tuned on CUB (`classifier` trainer); G: StyleGAN2-ADA at 256 px (`stylegan2`
trainer, configs/stylegan2_cub.py). K = 256 concepts on a 3x3 grid, 512-channel branches; each
step sees 8 real images (random crop + flip) and 8 samples of G; Adam lr 1e-4 for 100k
iterations; loss weights alpha .5, beta 3 (LPIPS), gamma .1, delta .2, orthogonality 1 (the official
code's form (sum |W_n W_n^T| - K) / K^2 on the row-normalised conv1x1 weights, see viscoin_losses),
||w - w_avg||^2 1. Give LPIPS weights: without them the run refuses to start, unless
`--config.loss.allow_perceptual_fallback=True` accepts the labelled stand-in (then the run does not
reproduce the paper).
"""

from ml_collections import ConfigDict

from viscoin_jax.data.pipeline import data_config
from viscoin_jax.training.config import base_config


def get_config(arg=None):
    if arg is not None:
        raise ValueError(f"viscoin_cub has no variants, got {arg!r}")
    c = base_config()
    c.trainer = "viscoin"
    c.seed = 0
    c.classifier_workdir = ""  # required: the ResNet-50 run
    c.generator_workdir = ""  # required: the StyleGAN2 run at 256 px
    c.data = data_config(name="cub200", split="train", resolution=256, augment="crop_flip", bbox_crop=True,
                         read_threads=16, prefetch_buffer=256)
    # batch counts <= 0: the whole test split
    c.eval = ConfigDict(dict(split="test", batch_size=64, max_batches=0, final_batches=0))
    c.model = ConfigDict(dict(n_concepts=256, num_classes=200, branch_channels=512, concept_grid=3,
                              dropout=0.01, init_scale=0.1,
                              # W+ vectors (first, last) fed by phi_prime; () = by resolution, as the paper
                              prime_split=()))
    c.viscoin = ConfigDict(dict(num_generated=8, num_samples=16))
    c.loss = ConfigDict(dict(alpha=0.5, mse=1.0, l1=1.0, beta=3.0, gamma=0.1, delta=0.2, ortho=1.0, w_reg=1.0,
                             # without LPIPS weights the run refuses to start (the paper's beta term is
                             # LPIPS); set allow_perceptual_fallback=True to train with the labelled stand-in
                             lpips_weights="", allow_perceptual_fallback=False))
    c.optim = ConfigDict(dict(name="adam", learning_rate=1e-4, warmup_steps=0, schedule="constant",
                              b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=0.0))
    c.train.num_steps = 100_000
    c.train.batch_size = 8
    c.train.log_every = 100
    c.train.eval_every = 5000
    c.train.sample_every = 5000
    c.train.progress_every = 500
    c.checkpoint.every = 5000
    c.checkpoint.max_to_keep = 3
    c.checkpoint.best_metric = "eval/accuracy"
    return c
