"""The training framework: the Task loop, checkpoints, the device mesh, monitoring, configs and the
trainer registry. It never imports a trainer (viscoin_jax.trainers)."""
