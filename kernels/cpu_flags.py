"""XLA:CPU settings that the XLA path of the kernels needs to be fast, applied before XLA starts.

jaxlib 0.10 hands every convolution to its YNNPACK library by default, and YNNPACK runs the
stride-1 "valid" convolutions of the polyphase XLA path 2.5-3x slower than XLA:CPU's own
convolution (8x64x64x256 -> 256 3x3: 646 ms against 200 ms on the 2-core development machine;
docs/performance.md). jaxlib 0.12 no longer does by default. `apply()` turns that fusion off by
adding `--xla_cpu_experimental_ynn_fusion_type=` to XLA_FLAGS, which XLA reads once, when its first
backend starts; `import viscoin_jax` calls it.

It changes nothing when: XLA has already started (a user who ran JAX code before importing this
package keeps their settings), XLA_FLAGS already names the flag, VISCOIN_JAX_XLA_CPU_FLAGS=0 is set,
or the jaxlib release is outside the range where the flag is known to exist (XLA aborts on an
unknown flag, so it is never guessed).
"""

from __future__ import annotations

import os
import sys

FLAG = "--xla_cpu_experimental_ynn_fusion_type="
# jaxlib releases (major, minor) whose XLA has the flag: checked on 0.10.2 and 0.12.0.1.
KNOWN_JAXLIB = ((0, 10), (0, 12))
OPT_OUT = "VISCOIN_JAX_XLA_CPU_FLAGS"


def _jaxlib_release() -> tuple[int, int] | None:
    try:  # read before XLA starts, and without importing JAX
        from jaxlib import version
    except ImportError:
        return None
    parts = version.__version__.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def _xla_started() -> bool:
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # only when JAX is loaded: asking must not import it

    return xla_bridge.backends_are_initialized()


def apply() -> bool:
    """Add the flag to XLA_FLAGS when that is safe and still has an effect; True if it did."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return False
    release = _jaxlib_release()
    if release is None or not KNOWN_JAXLIB[0] <= release <= KNOWN_JAXLIB[1]:
        return False
    if _xla_started():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    return True


__all__ = ["apply", "FLAG", "OPT_OUT"]
