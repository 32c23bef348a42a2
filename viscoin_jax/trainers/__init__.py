"""The trainers: one module per model family (task, losses, entry points train / make_task / load),
built on the framework in viscoin_jax.training and registered by name in training.registry."""
