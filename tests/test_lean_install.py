"""The default install is lean: torch only in the `convert` and `test` extras, no clu, and nothing on
the path of `viscoin-jax run` imports torch or TensorFlow; README's commands and CI agree."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# every module `viscoin-jax run` and `train` import before data or weights ask for more
RUN_PATH = """
import importlib, sys
from viscoin_jax import cli
from viscoin_jax.training.config import load_config
from viscoin_jax.training.registry import TRAINERS
cli.build_parser()
for module in TRAINERS.values():
    importlib.import_module(module)
for module in ("viscoin_jax.cli.run", "viscoin_jax.cli.explain", "viscoin_jax.data.synthetic",
               "viscoin_jax.data.pipeline", "viscoin_jax.training.loop"):
    importlib.import_module(module)
load_config("demo")
print(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "tensorflow", "tensorflow_datasets", "clu"}))
"""


def _requirement_names(requirements):
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_torch_only_in_the_extras_and_no_clu():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    default = _requirement_names(project["dependencies"])
    assert "torch" not in default and "clu" not in default and "tensorflow" not in default
    assert {"jax", "flax", "orbax-checkpoint", "ml-collections"} <= default
    extras = project["optional-dependencies"]
    assert "torch" in _requirement_names(extras["convert"]) and "torch" in _requirement_names(extras["test"])


def test_the_run_path_imports_neither_torch_nor_tensorflow():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", RUN_PATH], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_readme_installs_lean_first_and_ci_runs_its_test_command():
    readme = (REPO / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    first, second = block[0], block[1]
    assert "pip install -e . &&" in first and "[test]" not in first
    assert "viscoin-jax run --config demo " in first
    assert second.startswith("pip install -e '.[test]' && python -m pytest ") and '-m "not slow"' in second
    proc = subprocess.run(["bash", str(REPO / ".ci" / "run"), "--print-test-command"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == second


def test_parsing_the_command_line_loads_no_trainer_or_checkpoint_library():
    """`viscoin-jax --help` stays fast, and no library installs its log handler before a command
    sets up logging (an early Orbax/absl import once silenced every INFO line of `train`)."""
    code = ("import sys, viscoin_jax.cli as c; c.build_parser(); "
            "print([m for m in ('orbax.checkpoint', 'tensorflow_datasets', 'torch', 'flax', 'viscoin_jax.trainers', "
            "'viscoin_jax.training.loop') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
