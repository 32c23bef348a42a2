"""The whole pipeline on the embedded synthetic data, sized for a 2-core CPU.

    viscoin-jax run --config demo --workdir runs/demo
    viscoin-jax run --config demo:quick --workdir /tmp/demo   # the CI-sized version

Each stage is the packaged config of its trainer (configs/<trainer>_synthetic.py, loaded by name,
so a copy of this file elsewhere still finds them) with the overrides below;
`viscoin-jax train --config <trainer>_synthetic` runs any one of them alone.
"""

from ml_collections import ConfigDict

from viscoin_jax.training.config import load_config

# training steps of each stage in the demo (the stage configs' own defaults train longer)
DEMO_STEPS = {"classifier": 150, "iresnet": 40, "autoencoder": 600, "stylegan2": 1500, "viscoin": 300}

# stage -> packaged config name[:variant]
STAGES = {
    "classifier": "classifier_synthetic:resnet",
    "iresnet": "classifier_synthetic:iresnet",
    "autoencoder": "autoencoder_synthetic",  # about 45 s: the autoencoder counterfactuals of f
    "stylegan2": "stylegan2_synthetic",
    "viscoin": "viscoin_synthetic",
}


def get_config(arg=None):
    c = ConfigDict()
    c.stage_order = list(STAGES)
    c.stages = ConfigDict()
    for name in STAGES:
        stage = load_config(STAGES[name], [])
        with stage.unlocked():
            for link in ("classifier_workdir", "generator_workdir"):
                if link in stage:
                    stage[link] = ""  # filled by the pipeline with this run's stage directories
            if arg != "quick":  # sized so the whole demo takes about 15 minutes on a 2-core CPU
                stage.train.num_steps = DEMO_STEPS[name]
                stage.checkpoint.every = DEMO_STEPS[name]
                if name == "viscoin":
                    stage.train.eval_every = DEMO_STEPS[name] // 2
                if name == "stylegan2":
                    stage.train.eval_every = DEMO_STEPS[name]  # FID of G_ema at the end (about 35 s)
                    stage.train.sample_every = DEMO_STEPS[name] // 4
                    stage.fid.num_samples = 128
                    # 1500 steps x 32 images see each of 16384 rendered images about three times:
                    # too few for D to overfit, so ADA has nothing to prevent; with it on, D's early
                    # lead (a weak G) drove p to 0.9 and slowed G down. 1500 rather than 1200 steps
                    # (about 100 s more): G's blobs in between the stains 0.17 -> 0.10, its rarer
                    # class 0.34 -> 0.46, latent counterfactuals changing only the colour 0.00 -> 0.25
                    # (docs/performance.md, "What the demo's explanations are limited by").
                    stage.data.synthetic_size = 16384
                    stage.ada.enabled = False
                    # the path-length term costs about 30% of the step time on CPU; the demo spends
                    # that on more G/D steps instead (R1 stays)
                    stage.stylegan2.pl_weight = 0.0
            if arg == "quick":  # a few steps per stage: checks the plumbing, not the quality
                stage.train.num_steps = 4
                stage.train.eval_every = 0
                stage.train.sample_every = 0
                stage.train.log_every = 2
                stage.checkpoint.every = 4
                if "eval" in stage and "max_batches" in stage.eval:
                    stage.eval.max_batches = 1
                if "eval" in stage and "final_batches" in stage.eval:
                    stage.eval.final_batches = 1
                if "fid" in stage:
                    stage.fid.num_samples = 64
                if "data" in stage:
                    stage.data.synthetic_size = 256
        c.stages[name] = stage
    quick = arg == "quick"
    c.explain = ConfigDict(dict(
        enabled=True,
        # held-out images (the test split). 32, not 16: a fraction over 16 images moves by 1/16 per image, and
        # the latent counterfactuals' "only the colour changed" read 0.56 on the first 16 where the first 32
        # gave 0.44 and 64 gave 0.41 (about 60 s more for the explanations)
        images="synthetic/blob_binary:test:32",
        count=4 if quick else 32,
        classifier_methods=["gradient", "grad_cam", "deletion_insertion", "autoencoder_counterfactual",
                            "decision_boundary"] if quick else
        ["gradient", "smoothgrad", "integrated_gradients", "grad_cam", "occlusion", "sanity_check",
         "deletion_insertion", "activations", "autoencoder_counterfactual", "decision_boundary"],
        iresnet_methods=["iresnet_counterfactual"] if quick else
        ["gradient", "integrated_gradients", "iresnet_counterfactual", "decision_boundary"],
        viscoin_methods=["concepts", "faithfulness", "latent_direction"] if quick else
        ["concepts", "faithfulness", "consistency", "latent_direction", "latent_interpolation",
         "concept_activations"],
        projection_steps=5 if quick else 40,  # W+ projection (warm-started by VisCoIN's translator)
        direction_samples=64 if quick else 512,  # generated samples for the logistic-regression direction
        latent_confidence=0.99,  # a latent counterfactual is the first image f gives the target this probability
        num_training_images=16 if quick else 256,  # class relevance, top-activating images, CC pairs
    ))
    if arg not in (None, "", "quick"):
        raise ValueError(f"unknown variant {arg!r} of demo (choose quick or nothing)")
    return c
