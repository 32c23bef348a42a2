"""`import viscoin_jax` turns XLA:CPU's YNNPACK convolution fusion off, only when that is safe.

Each case runs in a fresh interpreter: XLA reads its flags once, when its first backend starts.
"""

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, os, sys
if sys.argv[1] == "jax_first":
    import jax, jax.numpy as jnp
    jnp.ones(1).block_until_ready()  # XLA starts before viscoin_jax is imported
import viscoin_jax
import jax, jax.numpy as jnp
from jax import lax
from jaxlib import version
conv = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")))
hlo = conv.lower(jnp.ones((1, 18, 18, 64)), jnp.ones((3, 3, 64, 64))).compile().as_text()
print(json.dumps({"flags": os.environ.get("XLA_FLAGS", ""), "ynn": "ynn_fusion" in hlo,
                  "jaxlib": version.__version__}))
"""


def _probe(mode="plain", **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "VISCOIN_JAX_XLA_CPU_FLAGS")}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def test_import_sets_the_flag_and_convolutions_leave_ynnpack():
    result = _probe()
    major, minor = (int(v) for v in result["jaxlib"].split(".")[:2])
    if not (0, 10) <= (major, minor) <= (0, 12):
        pytest.skip(f"jaxlib {result['jaxlib']} is outside the range where the flag is known")
    assert FLAG in result["flags"].split()
    assert not result["ynn"]


def test_opt_out_keeps_xla_defaults():
    result = _probe(VISCOIN_JAX_XLA_CPU_FLAGS="0")
    assert FLAG not in result["flags"]
    # Which library XLA picks by default depends on the jaxlib release; on 0.10 it is YNNPACK.
    if result["jaxlib"].startswith("0.10."):
        assert result["ynn"]


def test_user_flags_and_a_started_xla_are_left_alone():
    mine = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
    assert _probe(XLA_FLAGS=mine)["flags"] == mine
    assert FLAG not in _probe("jax_first")["flags"]
