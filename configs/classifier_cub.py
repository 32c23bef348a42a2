"""ResNet-50 classifier f on CUB-200-2011 at 256 px (the network VisCoIN explains), and an i-ResNet.

    viscoin-jax convert resnet resnet50-0676ba61.pth gs://bucket/resnet50_imagenet   # torchvision weights
    viscoin-jax train --config configs/classifier_cub.py --workdir gs://bucket/resnet50_cub \
        --config.init_from=gs://bucket/resnet50_imagenet --config.data.data_dir=gs://bucket/tfds

Variants: "resnet50" (default; fine-tuned from ImageNet weights when `init_from` is given: SGD with
Nesterov momentum, lr 0.01 with a cosine decay, weight decay 1e-4, label smoothing 0.1, random
crop + flip, batch 64; the paper's f reaches 80.56% test accuracy) and "iresnet" (from scratch, for
i-ResNet counterfactuals). `:nct` selects NCT-CRC-HE-100K (9 tissue classes; image folders under
data_dir, see viscoin_jax/data/pipeline.py) instead of CUB: e.g. `configs/classifier_cub.py:resnet50-nct`.
"""

from ml_collections import ConfigDict

from viscoin_jax.data.pipeline import data_config
from viscoin_jax.training.config import base_config

RESOLUTION = 256
DATASETS = {"cub": ("cub200", 200, True), "nct": ("nct_crc_he", 9, False)}


def get_config(arg=None):
    model, _, dataset = (arg or "resnet50").partition("-")
    dataset = dataset or "cub"
    if model not in ("resnet50", "iresnet") or dataset not in DATASETS:
        raise ValueError(f"unknown variant {arg!r} of classifier_cub: resnet50 | iresnet, optionally -cub | -nct")
    name, num_classes, bbox = DATASETS[dataset]
    c = base_config()
    c.trainer = "classifier"
    c.seed = 0
    c.data = data_config(name=name, split="train", resolution=RESOLUTION, augment="crop_flip", bbox_crop=bbox,
                         read_threads=16, prefetch_buffer=256)
    c.eval = ConfigDict(dict(split="test", batch_size=128, max_batches=0))
    c.loss = ConfigDict(dict(label_smoothing=0.1))
    c.init_from = ""  # a converted torchvision ResNet-50 (`viscoin-jax convert resnet ...`)
    if model == "resnet50":
        c.model = ConfigDict(dict(name="resnet", depth=50, num_classes=num_classes, width=64, small_input=False))
        c.optim = ConfigDict(dict(name="sgd", learning_rate=0.01, momentum=0.9, warmup_steps=500, schedule="cosine",
                                  weight_decay=1e-4, grad_clip=0.0))
        c.train.num_steps = 20_000
    else:
        c.model = ConfigDict(dict(name="iresnet", in_shape=(RESOLUTION, RESOLUTION, 3), num_classes=num_classes,
                                  blocks_per_stage=(4, 4, 4), channels=32, n_power_iter=1))
        c.optim = ConfigDict(dict(name="adam", learning_rate=1e-3, warmup_steps=500, schedule="cosine",
                                  b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=1.0))
        c.train.num_steps = 50_000
    c.train.batch_size = 64
    c.train.log_every = 100
    c.train.eval_every = 2000
    c.train.progress_every = 500
    c.checkpoint.every = 2000
    c.checkpoint.max_to_keep = 3
    c.checkpoint.best_metric = "eval/accuracy"
    return c
