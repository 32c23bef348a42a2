"""The whole pipeline at the paper's settings: CUB-200-2011 (default) or NCT-CRC-HE-100K (`:nct`).

    viscoin-jax run --config pipeline_cub --workdir gs://bucket/viscoin_cub \
        --config.stages.classifier.init_from=gs://bucket/resnet50_imagenet \
        --config.stages.viscoin.loss.lpips_weights=/path/lpips_vgg.npz \
        --config.stages.stylegan2.fid.inception_weights=/path/fid_inception.npz
    launch/tpu_pod.sh ... run --config configs/pipeline_cub.py --workdir gs://...   # a TPU pod slice
    sbatch launch/slurm.sbatch run --config configs/pipeline_cub.py:nct --workdir /scratch/...

Stages as in configs/demo.py (each loaded by name), each the full config of its trainer:
classifier_cub.py (ResNet-50 fine-tuned; i-ResNet from scratch), stylegan2_cub.py (paper256,
25,000 kimg) and viscoin_cub.py (K = 256 for CUB, 64 for NCT-CRC-HE, 100k iterations), then explanations of 64 test images.
Set the data location for every stage with `--config.stages.<stage>.data.data_dir=...`. Without
LPIPS weights the pipeline refuses to start (before the first stage) unless
`--config.stages.viscoin.loss.allow_perceptual_fallback=True` accepts the labelled stand-in.
"""

from ml_collections import ConfigDict

from viscoin_jax.training.config import load_config


def get_config(arg=None):
    dataset = arg or "cub"
    if dataset not in ("cub", "nct"):
        raise ValueError(f"unknown variant {arg!r} of pipeline_cub (cub or nct)")
    # stage -> packaged config name[:variant]
    stages = {"classifier": f"classifier_cub:resnet50-{dataset}", "iresnet": f"classifier_cub:iresnet-{dataset}",
              "stylegan2": "stylegan2_cub", "viscoin": "viscoin_cub"}
    c = ConfigDict()
    c.stage_order = list(stages)
    c.stages = ConfigDict()
    for name, spec in stages.items():
        stage = load_config(spec, [])
        with stage.unlocked():
            for link in ("classifier_workdir", "generator_workdir"):
                if link in stage:
                    stage[link] = ""  # filled by the pipeline with this run's stage directories
            if dataset == "nct" and name in ("stylegan2", "viscoin"):
                stage.data.name, stage.data.bbox_crop = "nct_crc_he", False
                if name == "viscoin":
                    stage.model.n_concepts, stage.model.num_classes = 64, 9
        c.stages[name] = stage
    c.explain = ConfigDict(dict(
        enabled=True,
        images="dataset:test:64",  # the first 64 test images of each stage's own data set
        count=64,
        classifier_methods=["gradient", "smoothgrad", "integrated_gradients", "grad_cam", "occlusion",
                            "sanity_check", "deletion_insertion"],
        iresnet_methods=["iresnet_counterfactual"],
        viscoin_methods=["concepts", "faithfulness", "consistency", "latent_direction", "latent_interpolation"],
        projection_steps=1000,
        direction_samples=10_000,
        num_training_images=2048,
    ))
    return c
