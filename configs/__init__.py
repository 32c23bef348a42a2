"""The run configs, one `get_config(arg=None)` file each; installed as `viscoin_jax.configs`.

`--config demo` (or `demo:quick`) loads `demo.py` from here, from any directory and from a wheel;
`--config configs/demo.py` loads the same file by path from the repository's root. See
viscoin_jax.training.config.
"""
