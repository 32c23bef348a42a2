"""The package's layers point one way: kernels <- models <- data/convert <- metrics <- explain <-
training <- reports/CLI. Read from the source with `ast` (every import, including ones inside
functions), so a forbidden import fails here before it turns into an import cycle."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "viscoin_jax"

ABOVE_MODELS = {"data", "convert", "metrics", "explain", "training", "trainers", "benchmarks", "cli"}
# package -> packages (top-level modules of viscoin_jax) it must never import
FORBIDDEN = {
    "checks": ABOVE_MODELS | {"models"},
    "scores": ABOVE_MODELS | {"models"},
    "phases": ABOVE_MODELS | {"models"},
    "kernels": ABOVE_MODELS | {"models"},
    "models": ABOVE_MODELS,
    "data": {"metrics", "explain", "training", "trainers", "benchmarks", "cli"},
    "convert": {"metrics", "explain", "training", "trainers", "benchmarks", "cli"},
    "metrics": {"explain", "training", "trainers", "benchmarks", "cli"},
    "explain": {"training", "trainers", "benchmarks", "cli"},
    "training": {"trainers", "benchmarks", "cli"},
    "trainers": {"benchmarks", "cli"},
}


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_packages(path: Path, root: Path = ROOT) -> set[str]:
    """Second-level names under viscoin_jax that `path` (below `root`) imports (absolute or relative)."""
    module = _module_name(path, root)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "viscoin_jax" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_the_import_reader_resolves_relative_and_absolute_imports(tmp_path):
    pkg = tmp_path / "viscoin_jax" / "metrics"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("from ..explain import run\nfrom . import maps\nimport viscoin_jax.training.loop\n"
                 "def g():\n    from ..models.concepts import scale_concepts\n")
    assert imported_packages(f, tmp_path) == {"explain", "metrics", "training", "models"}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_never_imports_the_layers_above_it(layer):
    where = ROOT / "kernels" if layer == "kernels" else PACKAGE / layer  # kernels/ installs as viscoin_jax.kernels
    files = [PACKAGE / f"{layer}.py"] if (PACKAGE / f"{layer}.py").exists() else sorted(where.rglob("*.py"))
    assert files
    bad = {str(f.relative_to(ROOT)): sorted(imported_packages(f) & FORBIDDEN[layer]) for f in files}
    assert not {k: v for k, v in bad.items() if v}


def _every_module() -> list[str]:
    """Every module of the installed package, found by walking it (kernels and configs included)."""
    import pkgutil

    import importlib

    names = set()
    # kernels/ and configs/ live beside viscoin_jax/ in the source tree: walked from their own paths
    for package in ("viscoin_jax", "viscoin_jax.kernels", "viscoin_jax.configs"):
        names.add(package)
        path = importlib.import_module(package).__path__
        names.update(info.name for info in pkgutil.walk_packages(path, package + "."))
    return sorted(n for n in names if not n.endswith(".__main__"))  # __main__ runs the command line


def test_every_module_imports_in_a_fresh_interpreter():
    # One fresh process (nothing imported before): a module that only imports after another one has
    # (a hidden cycle) or on one JAX version (the newest-JAX job of .ci/run runs this too) fails here.
    import subprocess
    import sys

    names = _every_module()
    assert {"viscoin_jax.kernels.tuning", "viscoin_jax.cli.explain", "viscoin_jax.configs.demo"} <= set(names)
    code = ("import importlib, sys\nfailed = []\nfor name in sys.argv[1:]:\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception as e:\n        failed.append(f'{name}: {type(e).__name__}: {e}')\n"
            "print('\\n'.join(failed))\nsys.exit(1 if failed else 0)\n")
    done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
