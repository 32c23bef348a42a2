"""Test set-up: 8 fake CPU devices for the sharding tests, set before JAX is imported."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # two xdist workers share the cores
# The CLI's persistent compilation cache goes to a temporary directory, not the user's home, and
# is removed when this process (a pytest worker) exits: hundreds of runs left ~100 MB each behind.
if "VISCOIN_JAX_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="viscoin_jax_test_cache_")
    os.environ["VISCOIN_JAX_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def persistent_compilation_cache(tmp_path_factory):
    """A persistent compilation cache for one test module: its repeated and resumed runs compile
    their steps once. Modules opt in with `pytestmark = pytest.mark.usefixtures(...)`."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ["jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes"]
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update(names[0], str(tmp_path_factory.getbasetemp() / "jax_cache"))
    jax.config.update(names[1], 0)
    jax.config.update(names[2], 0)
    cc.reset_cache()
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    """A tuning directory of our own (kernels/tuning.py), read instead of the shipped tables; the
    table cache cleared around it."""
    from viscoin_jax.kernels import tuning

    monkeypatch.setenv(tuning.TUNING_DIR_ENV, str(tmp_path))
    tuning.load_table.cache_clear()
    yield tmp_path
    tuning.load_table.cache_clear()


@pytest.fixture
def write_tuning_table(table_dir):
    """write(winners {key: "pallas" | "xla" | "mosaic_gpu"}, device_kind): that kind's table in
    `table_dir`, read by the next lookup (the table cache is cleared)."""
    import json

    from viscoin_jax.kernels import tuning

    def write(winners: dict, device_kind: str) -> None:
        entries = [{"key": k, "winner": w} for k, w in winners.items()]
        (table_dir / tuning.table_file_name(device_kind)).write_text(json.dumps({"format": 1, "entries": entries}))
        tuning.load_table.cache_clear()

    return write
