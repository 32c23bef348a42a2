"""The project as a user installs it: a wheel, installed into a fresh virtual environment, used from
an empty directory far from the source tree.

Builds the wheel from a copy of the repository (`pip wheel --no-deps --no-build-isolation`, so no
network; the build leaves nothing in the checkout), checks what it holds (configs/ and kernels/
inside viscoin_jax, no tests/), installs it with `pip install --no-deps` into a new venv that
reuses this interpreter's installed dependencies through a .pth file, and then, from an empty
directory, checks that the wheel's own `viscoin_jax` is the one imported, that
(a) `viscoin_jax.configs` resolves every packaged config by name, with `demo:quick` and
`pipeline_cub:nct`; (b) `viscoin-jax run --help` and `viscoin-jax bench-stylegan2 --help` work and
an unknown config name fails in one line; (c) two cheap real commands: `viscoin-jax train --config
toy_regression` (2 steps) and `viscoin-jax run` of a two-stage toy pipeline file in that directory
whose stages load `toy_regression:fsdp` by name. It does not run the full `demo:quick` pipeline
(several minutes; tests/test_pipeline_demo.py runs it from the source tree).
"""

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG_NAMES = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "__init__")


def _ignore(folder: str, names: list[str]) -> set[str]:
    """Left out of the copy the wheel is built from: build outputs and local state, never sources
    (the top-level names as in .gitignore; `workdir_lock.py` is a source)."""
    skip = {n for n in names if n in ("__pycache__", ".pytest_cache") or n.endswith(".egg-info")}
    if Path(folder) == REPO:
        skip |= {n for n in names if n in (".git", ".venv", "build", "dist", "runs") or n.startswith("workdir")}
    return skip

CHECK_CONFIGS = """
import json, sys
import viscoin_jax
from viscoin_jax.training.config import config_names, load_config
loaded = {name: sorted(load_config(name).keys()) for name in config_names()}
print(json.dumps({
    "file": viscoin_jax.__file__,
    "names": config_names(),
    "loaded": sorted(loaded),
    "quick_steps": [s.train.num_steps for s in load_config("demo:quick").stages.values()],
    "demo_stages": list(load_config("demo").stage_order),
    "nct_classes": load_config("pipeline_cub:nct").stages.viscoin.model.num_classes,
}))
"""

PIPELINE = """
from ml_collections import ConfigDict
from viscoin_jax.training.config import load_config

def get_config(arg=None):
    steps = 2 if arg == "short" else 3
    stage = load_config("toy_regression:fsdp", [f"--config.train.num_steps={steps}",
                                                "--config.checkpoint.async_save=False"])
    return ConfigDict({"stage_order": ("toy", "toy2"), "stages": {"toy": stage, "toy2": stage},
                       "explain": {"enabled": False}})
"""


def _site_dirs() -> list[str]:
    """This interpreter's installed packages (the venv's, and any the venv itself adds by .pth)."""
    dirs = site.getsitepackages() + [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    return list(dict.fromkeys(d for d in dirs if Path(d).is_dir()))


def _install(root: Path) -> dict:
    """Builds the wheel, installs it into a new venv; returns where things are."""
    root.mkdir(parents=True)
    src = root / "src"
    shutil.copytree(REPO, src, ignore=_ignore)
    dist = root / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--no-index", "-q", "-w", str(dist), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("viscoin_jax-*.whl")

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "_reuse_dependencies.pth").write_text("\n".join(_site_dirs()) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]

    empty = root / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "VIRTUAL_ENV")}
    env.update(JAX_PLATFORMS="cpu", VISCOIN_DISTRIBUTED="0", PYTHONNOUSERSITE="1")
    return dict(wheel=wheel, venv=venv, python=python, empty=empty, env=env)


def _run(installed, *args, timeout=300):
    return subprocess.run([str(a) for a in args], cwd=installed["empty"], env=installed["env"],
                          capture_output=True, text=True, timeout=timeout)


def test_the_wheel_installs_and_works_from_an_empty_directory(tmp_path):
    """One test, not several: under pytest-xdist each would build and install its own wheel."""
    installed = _install(tmp_path / "wheel")
    _check_contents(installed)
    _check_configs(installed)
    _check_help_and_a_bad_name(installed)
    _check_train_and_run(installed, tmp_path)


def _check_contents(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    # every source file, at its installed place (a new sub-package missing from pyproject's list fails here)
    sources = {str(p.relative_to(REPO)) for p in (REPO / "viscoin_jax").rglob("*.py")}
    sources |= {f"viscoin_jax/{folder}/{p.relative_to(REPO / folder)}" for folder in ("kernels", "configs")
                for p in (REPO / folder).rglob("*.py")}
    assert sources - set(names) == set()
    # the report's and the web app's templates (package data: a report written from the wheel needs them)
    templates = {str(p.relative_to(REPO)) for p in (REPO / "viscoin_jax").rglob("templates/*") if p.is_file()}
    assert len(templates) >= 4 and templates - set(names) == set()
    assert {f"viscoin_jax/configs/{n}.py" for n in CONFIG_NAMES} <= set(names)
    top = {n.split("/")[0] for n in names}
    assert top == {"viscoin_jax", installed["wheel"].name.split("-py3")[0] + ".dist-info"}, top


def _check_configs(installed):
    proc = _run(installed, installed["python"], "-c", CHECK_CONFIGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).is_relative_to(installed["venv"]), out["file"]  # the wheel, not the checkout
    assert out["names"] == out["loaded"] == CONFIG_NAMES
    # the wheel's demo is the checkout's: the same stages (read here from the source tree), 4 steps each quick
    from viscoin_jax.training.config import load_config

    source_stages = list(load_config(str(REPO / "configs" / "demo.py")).stage_order)
    assert out["demo_stages"] == source_stages and {"classifier", "stylegan2", "viscoin"} <= set(source_stages)
    assert out["quick_steps"] == [4] * len(source_stages)
    assert out["nct_classes"] == 9


def _check_help_and_a_bad_name(installed):
    exe = installed["venv"] / "bin" / "viscoin-jax"
    run_help = _run(installed, exe, "run", "--help")
    assert run_help.returncode == 0, run_help.stderr[-3000:]
    assert "demo" in run_help.stdout and "pipeline_cub" in run_help.stdout
    bench_help = _run(installed, exe, "bench-stylegan2", "--help")
    assert bench_help.returncode == 0 and "--resolutions" in bench_help.stdout, bench_help.stderr[-3000:]
    bad = _run(installed, exe, "run", "--config", "demoo:quick", "--workdir", "w")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("viscoin-jax run: error: unknown config 'demoo'")
    assert not (installed["empty"] / "w").exists()


def _check_train_and_run(installed, tmp_path):
    exe = installed["venv"] / "bin" / "viscoin-jax"
    train = _run(installed, exe, "train", "--config", "toy_regression", "--workdir", tmp_path / "toy",
                 "--config.train.num_steps=2", "--config.checkpoint.async_save=False",
                 "--no-compilation-cache")
    assert train.returncode == 0, train.stderr[-3000:]
    assert json.loads((tmp_path / "toy" / "config.json").read_text())["train"]["num_steps"] == 2
    assert (tmp_path / "toy" / "checkpoints").is_dir()

    (installed["empty"] / "pipe.py").write_text(PIPELINE)
    run = _run(installed, exe, "run", "--config", "pipe.py:short", "--workdir", tmp_path / "pipe",
               "--no-compilation-cache")
    assert run.returncode == 0, run.stderr[-3000:]
    for stage in ("toy", "toy2"):
        assert (tmp_path / "pipe" / stage / "DONE").is_file()
        assert json.loads((tmp_path / "pipe" / stage / "config.json").read_text())["mesh"]["fsdp"] == -1
