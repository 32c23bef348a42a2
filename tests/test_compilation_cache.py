"""The persistent compilation cache of `train` / `run` / `explain`: on by default, a resumed run
loads its programs from it and says so, one flag turns it off."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOY = str(REPO / "configs" / "toy_regression.py")


def _train(workdir, cache_dir, steps, *extra):
    env = dict(os.environ, VISCOIN_JAX_CACHE_DIR=str(cache_dir))
    cmd = [sys.executable, "-m", "viscoin_jax.cli", "train", "--config", TOY, "--workdir", str(workdir),
           f"--config.train.num_steps={steps}", "--config.train.eval_every=0",
           "--config.train.sample_every=0", "--config.checkpoint.every=2", *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def test_resumed_run_reports_the_cache_hit(tmp_path):
    cache = tmp_path / "cache"
    first = _train(tmp_path / "run", cache, 2)
    assert "compilation cache hit" not in first
    assert any(cache.iterdir()), "nothing was written to the cache"
    resumed = _train(tmp_path / "run", cache, 4)  # resumes at step 2: the same programs
    assert "compilation cache hit" in resumed
    assert str(cache) in resumed


def test_no_compilation_cache_writes_nothing(tmp_path):
    cache = tmp_path / "cache"
    log = _train(tmp_path / "run", cache, 2, "--no-compilation-cache")
    assert not cache.exists()
    assert "compilation cache hit" not in log
