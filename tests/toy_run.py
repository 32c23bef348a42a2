"""The toy-regression run the framework tests share (checkpoint, monitor, preemption, workdir lock,
progress): the same settings everywhere, so their compiled steps come from one compilation cache."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOY = str(REPO / "configs" / "toy_regression.py")


def run_args(num_steps: int = 6) -> list[str]:
    """`--config.KEY=VALUE` overrides: an 8-device (2 data x 4 fsdp) mesh, `num_steps` steps, a
    checkpoint every 2, no evaluation or samples."""
    return ["--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.mesh.fsdp_min_size=32",
            "--config.train.batch_size=16", f"--config.train.num_steps={num_steps}", "--config.train.log_every=2",
            "--config.train.eval_every=0", "--config.train.sample_every=0",
            "--config.checkpoint.every=2", "--config.checkpoint.max_to_keep=3",
            "--config.checkpoint.best_metric="]
