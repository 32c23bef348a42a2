"""Config specs by name (`demo`, `demo:quick`): the repository's configs/ installs as
`viscoin_jax.configs`, so a name loads the same config as the path, from any directory."""

import importlib.util
import re
from pathlib import Path

import pytest

from viscoin_jax import cli
from viscoin_jax.benchmarks import bench_step
from viscoin_jax.training import config as cfg_lib

REPO = Path(__file__).resolve().parents[1]
FILES = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "__init__")


def test_every_config_file_is_a_packaged_name():
    assert cfg_lib.config_names() == FILES
    assert "demo" in FILES and "pipeline_cub" in FILES


@pytest.mark.parametrize("name", FILES)
def test_a_name_loads_the_same_config_as_its_path_from_another_directory(name, tmp_path, monkeypatch):
    by_path = cfg_lib.config_to_dict(cfg_lib.load_config(str(REPO / "configs" / f"{name}.py")))
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert cfg_lib.config_to_dict(cfg_lib.load_config(name)) == by_path


@pytest.mark.parametrize("name, variant", [("demo", "quick"), ("pipeline_cub", "nct"),
                                           ("classifier_synthetic", "iresnet"), ("toy_regression", "fsdp")])
def test_variants_by_name(name, variant, tmp_path, monkeypatch):
    by_path = cfg_lib.load_config(f"{REPO / 'configs' / name}.py:{variant}")
    monkeypatch.chdir(tmp_path)
    by_name = cfg_lib.load_config(f"{name}:{variant}")
    assert cfg_lib.config_to_dict(by_name) == cfg_lib.config_to_dict(by_path)
    assert cfg_lib.config_to_dict(by_name) != cfg_lib.config_to_dict(cfg_lib.load_config(name))


def test_quick_demo_by_name_is_the_quick_one():
    quick, full = cfg_lib.load_config("demo:quick"), cfg_lib.load_config("demo")
    assert all(quick.stages[s].train.num_steps == 4 for s in quick.stage_order)
    spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert {s: full.stages[s].train.num_steps for s in full.stage_order} == demo.DEMO_STEPS


@pytest.mark.parametrize("spec, expected", [
    ("demo", ("demo", None)), ("demo:quick", ("demo", "quick")),
    ("configs/demo.py", ("configs/demo.py", None)), ("configs/demo.py:quick", ("configs/demo.py", "quick")),
    ("C:/x.py", ("C:/x.py", None)), ("a/b:c", ("a/b:c", None)),
])
def test_split_variant(spec, expected):
    assert cfg_lib._split_variant(spec) == expected


def test_an_unknown_name_lists_the_packaged_configs_in_one_line():
    with pytest.raises(ValueError) as err:
        cfg_lib.load_config("demoo:quick")
    text = str(err.value)
    assert "\n" not in text and "unknown config 'demoo'" in text
    assert all(name in text for name in FILES)


def test_a_missing_configs_path_points_at_the_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"configs/demo.py .*--config demo\b"):
        cfg_lib.load_config("configs/demo.py:quick")
    with pytest.raises(FileNotFoundError, match=r"^config file not found: elsewhere/mine.py$"):
        cfg_lib.load_config("elsewhere/mine.py")


def test_a_copy_of_the_demo_elsewhere_finds_its_stages_by_name(tmp_path, monkeypatch):
    copy = tmp_path / "my_demo.py"
    copy.write_text((REPO / "configs" / "demo.py").read_text())
    monkeypatch.chdir(tmp_path)
    config = cfg_lib.load_config(f"{copy}:quick")
    # the copy loads the same pipeline as the package's own demo, its stages found by name
    assert list(config.stage_order) == list(cfg_lib.load_config("demo:quick").stage_order)
    assert {"classifier", "stylegan2", "viscoin"} <= set(config.stage_order)
    assert config.stages.viscoin.train.num_steps == 4


def test_bench_stylegan2_finds_its_config_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = bench_step.stylegan2_config(64, 4, "narrow", "xla")
    assert config.trainer == "stylegan2" and config.data.resolution == 64


@pytest.mark.parametrize("command", ["train", "run"])
def test_the_cli_reports_an_unknown_name_in_one_line(command, tmp_path, capsys):
    assert cli.main([command, "--config", "nope", "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"viscoin-jax {command}: error: unknown config 'nope'") and "demo" in err
    assert not (tmp_path / "w").exists()


def test_no_installed_code_finds_files_through_its_own_location():
    """`__file__`-relative paths break in a wheel (configs/ is not next to viscoin_jax/ there)."""
    offenders = [str(p.relative_to(REPO)) for folder in ("viscoin_jax", "kernels", "configs")
                 for p in (REPO / folder).rglob("*.py") if re.search(r"\b__file__\b", p.read_text())]
    assert offenders == []
