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


def _session_cache_dir(tmp_path, **env_extra):
    """Runs a one-test pytest session under tests/conftest.py; returns the cache directory that session's
    test saw (and checked it exists) and that session's environment."""
    probe = tmp_path / "session"
    probe.mkdir()
    (probe / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (probe / "test_probe.py").write_text(
        "import os\n\ndef test_probe():\n"
        "    cache = os.environ['VISCOIN_JAX_CACHE_DIR']\n    assert os.path.isdir(cache)\n"
        f"    open({str(tmp_path / 'seen')!r}, 'w').write(cache)\n")
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "VISCOIN_JAX_CACHE_DIR"}
    env.update(TMPDIR=str(tmp_path / "tmp"), **env_extra)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                          str(probe / "test_probe.py")], cwd=probe, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return Path((tmp_path / "seen").read_text())


def test_the_test_session_removes_the_cache_directory_it_made(tmp_path):
    """Every test session made a ~100 MB cache directory under TMPDIR and left it there (643 of them filled
    the disk); the session now removes the one it made, and keeps one the user named."""
    made = _session_cache_dir(tmp_path)
    assert made.parent == tmp_path / "tmp" and made.name.startswith("viscoin_jax_test_cache_")
    assert not made.exists() and not list((tmp_path / "tmp").glob("viscoin_jax_test_cache_*"))


def test_the_test_session_keeps_a_cache_directory_the_user_named(tmp_path):
    named = tmp_path / "mine"
    named.mkdir()
    assert _session_cache_dir(tmp_path, VISCOIN_JAX_CACHE_DIR=str(named)) == named
    assert named.is_dir()
