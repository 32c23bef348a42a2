"""Config files, overrides, the saved copy, `viscoin-jax train` dispatch, launch decisions."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from viscoin_jax.training import config as cfg_lib
from viscoin_jax.cli import train as train_cli
from viscoin_jax.training import distributed, registry

REPO = Path(__file__).resolve().parents[1]
TOY = str(REPO / "configs" / "toy_regression.py")


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(textwrap.dedent("""
        from ml_collections import config_dict
        from viscoin_jax.training.config import base_config

        def get_config(arg=None):
            c = base_config()
            c.trainer = "toy"
            c.model = dict(widths=(8, 16), name="mlp", dropout=0.1, scale=None,
                           tags=("a", "b"), ratios=(0.5, 1.5))
            c.model.maybe = config_dict.placeholder(int)
            if arg == "big":
                c.model.widths = (64, 128)
            elif arg is not None:
                raise ValueError(f"unknown variant {arg}")
            return c
        """))
    return path


def test_load_overrides_and_types(config_file):
    c = cfg_lib.load_config(str(config_file), [
        "--config.train.batch_size=128", "--config.train.num_steps", "7",
        "--config.model.dropout=1",  # an int for a float field is fine
        "--config.model.name=resnet", "--config.checkpoint.async_save=false",
        "--config.model.widths=(3, 5, 7)", "--config.model.tags=x,y,z",
        "--config.model.ratios=(1, 2.5)", "--config.model.scale=0.25", "--config.model.maybe=4",
        "--config.mesh.fsdp=-1", "--config.mesh.data=1"])
    assert c.train.batch_size == 128 and type(c.train.batch_size) is int
    assert c.train.num_steps == 7
    assert c.model.dropout == 1.0 and type(c.model.dropout) is float
    assert c.model.name == "resnet"
    assert c.checkpoint.async_save is False
    assert c.model.widths == (3, 5, 7)
    assert c.model.tags == ("x", "y", "z")
    assert c.model.ratios == (1.0, 2.5) and all(type(r) is float for r in c.model.ratios)
    assert c.model.scale == 0.25
    assert c.model.maybe == 4
    assert (c.mesh.data, c.mesh.fsdp) == (1, -1)
    # untouched defaults stay
    assert c.train.log_every == cfg_lib.base_config().train.log_every
    with pytest.raises(AttributeError):  # locked: no new keys after loading
        c.train.new_key = 1


def test_variant(config_file):
    assert cfg_lib.load_config(f"{config_file}:big").model.widths == (64, 128)
    assert cfg_lib.load_config(str(config_file)).model.widths == (8, 16)
    with pytest.raises(ValueError, match="unknown variant huge"):
        cfg_lib.load_config(f"{config_file}:huge")


@pytest.mark.parametrize("override, pattern", [
    ("--config.train.batch_sise=3", r"unknown config key 'train.batch_sise'.*batch_size"),
    ("--config.trian.batch_size=3", r"unknown config key 'trian.batch_size'"),
    ("--config.train.batch_size=3.5", r"'train.batch_size': expected an int"),
    ("--config.train.batch_size=abc", r"'train.batch_size': expected an int"),
    ("--config.model.dropout=high", r"'model.dropout': expected a float"),
    ("--config.checkpoint.async_save=maybe", r"'checkpoint.async_save': expected a bool"),
    ("--config.model.widths=(1, 'x')", r"'model.widths': elements must be int"),
    ("--config.model.widths=(1, 2.5)", r"'model.widths': elements must be int"),
    ("--config.model.maybe=2.5", r"'model.maybe'"),
    ("--config.train=3", r"'train' is a section"),
    ("--config.train.batch_size.x=3", r"train.batch_size is not a section"),
    ("--config.train.batch_size", r"has no value"),
    ("--batch_size=3", r"not a config override"),
])
def test_bad_overrides_name_the_key(config_file, override, pattern):
    with pytest.raises(ValueError, match=pattern):
        cfg_lib.load_config(str(config_file), [override])


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        cfg_lib.load_config(str(tmp_path / "nope.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="get_config"):
        cfg_lib.load_config(str(tmp_path / "empty.py"))
    (tmp_path / "wrong.py").write_text("def get_config(arg=None):\n    return {'a': 1}\n")
    with pytest.raises(ValueError, match="not a ConfigDict"):
        cfg_lib.load_config(str(tmp_path / "wrong.py"))


def test_save_and_load_saved_config(config_file, tmp_path):
    c = cfg_lib.load_config(f"{config_file}:big", ["--config.model.scale=2.0"])
    cfg_lib.save_config(c, tmp_path / "run")
    data = json.loads((tmp_path / "run" / "config.json").read_text())
    assert data["model"]["widths"] == [64, 128] and data["model"]["scale"] == 2.0
    assert "widths" in (tmp_path / "run" / "config.txt").read_text()
    back = cfg_lib.load_saved_config(tmp_path / "run")
    assert back.to_dict() == c.to_dict()  # tuples come back as tuples
    assert back.is_locked
    # the saved config accepts the same overrides, with the same type checks
    again = ConfigDict(back)
    cfg_lib.apply_overrides(again, ["--config.model.widths=(1,)"])
    assert again.model.widths == (1,)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none" / "config.json")):
        cfg_lib.load_saved_config(tmp_path / "none")
    (tmp_path / "run" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt config file .*config.json"):
        cfg_lib.load_saved_config(tmp_path / "run")


def test_toy_config_variants():
    dp = cfg_lib.load_config(TOY)
    fsdp = cfg_lib.load_config(TOY + ":fsdp")
    assert dp.trainer == fsdp.trainer == "toy"
    assert (dp.mesh.data, dp.mesh.fsdp) == (-1, 1)
    assert (fsdp.mesh.data, fsdp.mesh.fsdp) == (1, -1)
    with pytest.raises(ValueError, match="unknown variant"):
        cfg_lib.load_config(TOY + ":tp")


# ----------------------------------------------------------------------------------------------
# viscoin-jax train


def _cli(argv):
    import argparse
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    train_cli.add_parser(sub)
    args, unknown = parser.parse_known_args(argv)
    assert args.allow_unknown
    args.unknown = unknown
    return args.func(args)


def test_train_cli_dispatches_on_trainer(config_file, tmp_path, monkeypatch):
    calls = []
    fake = type(sys)("fake_trainer")
    fake.train = lambda config, workdir: calls.append((config, workdir))
    monkeypatch.setitem(sys.modules, "fake_trainer", fake)
    monkeypatch.setitem(registry.TRAINERS, "toy", "fake_trainer")
    monkeypatch.setenv("VISCOIN_DISTRIBUTED", "0")
    rc = _cli(["train", "--config", str(config_file), "--workdir", str(tmp_path / "w"),
               "--config.train.num_steps=3", "--config.model.name", "vit"])
    assert rc == 0 and len(calls) == 1
    config, workdir = calls[0]
    assert (config.train.num_steps, config.model.name, workdir) == (3, "vit", str(tmp_path / "w"))


def test_train_cli_errors(config_file, tmp_path, capsys):
    rc = _cli(["train", "--config", str(config_file), "--workdir", str(tmp_path),
               "--config.train.nope=1"])
    assert rc == 2 and "unknown config key 'train.nope'" in capsys.readouterr().err
    rc = _cli(["train", "--config", str(config_file), "--workdir", str(tmp_path), "--bogus"])
    assert rc == 2 and "not a config override: '--bogus'" in capsys.readouterr().err
    rc = _cli(["train", "--config", str(config_file), "--workdir", str(tmp_path),
               "--config.trainer=gan9000"])
    assert rc == 2 and "unknown trainer 'gan9000'" in capsys.readouterr().err
    rc = _cli(["train", "--config", str(config_file), "--workdir", str(tmp_path),
               "--print-config", "--config.train.batch_size=16"])
    assert rc == 0 and "batch_size: 16" in capsys.readouterr().out


def test_trainer_registry(monkeypatch):
    assert set(registry.TRAINERS) >= {"toy", "classifier", "stylegan2", "viscoin"}
    toy = registry.trainer_module("toy")
    assert callable(toy.train) and callable(toy.make_task)
    monkeypatch.setitem(registry.TRAINERS, "ghost", "viscoin_jax.trainers.no_such_trainer")
    with pytest.raises(ValueError, match="viscoin_jax.trainers.no_such_trainer is not available"):
        registry.trainer_module("ghost")
    with pytest.raises(ValueError, match="unknown trainer 'nope'"):
        registry.trainer_module("nope")


def test_local_launcher_runs_cli(tmp_path):
    """launch/local.sh passes config, workdir and overrides through to `viscoin-jax train`."""
    env = dict(os.environ, PYTHON=sys.executable)
    out = subprocess.run(["bash", str(REPO / "launch" / "local.sh"), TOY, str(tmp_path),
                          "--print-config", "--config.train.num_steps=9"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "num_steps: 9" in out.stdout


def test_local_launcher_starts_n_processes(tmp_path):
    """--processes N starts N processes of one run: the same coordinator (a local port), the count,
    ids 0..N-1, the arguments passed through; a failing process's status is the launcher's."""
    fake = tmp_path / "python"  # records what each process got; process 1 exits 75
    fake.write_text(f'#!/bin/bash\nif [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi\n'
                    f'echo "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID ${{VISCOIN_DISTRIBUTED:-unset}} $*"'
                    f' > {tmp_path}/p$JAX_PROCESS_ID.txt\n[ "$JAX_PROCESS_ID" = 1 ] && exit 75\nexit 0\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), VISCOIN_DISTRIBUTED="0")
    out = subprocess.run(["bash", str(REPO / "launch" / "local.sh"), "--processes", "3", TOY, "/w",
                          "--config.train.num_steps=9"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 75, out.stderr
    lines = [(tmp_path / f"p{k}.txt").read_text().split() for k in range(3)]
    assert [line[2] for line in lines] == ["0", "1", "2"] and {line[1] for line in lines} == {"3"}
    host, port = lines[0][0].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0 and {line[0] for line in lines} == {lines[0][0]}
    assert lines[0][3] == "unset"  # the single-process override is not inherited
    assert lines[0][4:] == ["-m", "viscoin_jax.cli", "train", "--config", TOY, "--workdir", "/w",
                            "--config.train.num_steps=9"]
    bad = subprocess.run(["bash", str(REPO / "launch" / "local.sh"), "--processes", "two", TOY, "/w"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "local.sh: --processes needs a whole number >= 1, got 'two'"


def test_tpu_pod_launcher_commands(tmp_path):
    """launch/tpu_pod.sh copies the code to all workers and starts training on all of them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud.log"
    (bin_dir / "gcloud").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" "--END--" >> {log}\n')
    (bin_dir / "gcloud").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TPU="pod1", ZONE="us-x1")
    out = subprocess.run(["bash", str(REPO / "launch" / "tpu_pod.sh"), "configs/x.py:big",
                          "/mnt/runs/a b", "--config.train.batch_size=256"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    calls = [c.strip("\n").split("\n") for c in log.read_text().split("--END--") if c.strip()]
    assert calls[0][:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in calls[0]
    assert calls[1][:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod1"]
    assert "--worker=all" in calls[1] and calls[1][calls[1].index("--zone") + 1] == "us-x1"
    remote = calls[1][calls[1].index("--command") + 1]
    assert "VISCOIN_DISTRIBUTED=1 python3 -m viscoin_jax.cli train" in remote
    assert "--config configs/x.py:big --workdir /mnt/runs/a\\ b --config.train.batch_size=256" \
        in remote


# ----------------------------------------------------------------------------------------------
# When to initialise jax.distributed


@pytest.mark.parametrize("env, expected, kwargs", [
    ({}, False, {}),
    ({"VISCOIN_DISTRIBUTED": "1"}, True, {}),
    ({"VISCOIN_DISTRIBUTED": "0", "SLURM_JOB_ID": "5", "SLURM_NTASKS": "16"}, False, {}),
    ({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "16", "SLURM_PROCID": "3"}, True, {}),
    ({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "1"}, False, {}),
    ({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "1"}, False, {}),
    ({"SLURM_NTASKS": "4"}, False, {}),  # no job id: a stale variable, not a SLURM job
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"},
     True, {"coordinator_address": "h:1234", "num_processes": 4, "process_id": 2}),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234"}, True, {"coordinator_address": "h:1234"}),
    ({"JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}, False,
     {"num_processes": 1, "process_id": 0}),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, True, {}),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, False, {}),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True, {}),
])
def test_launch_decision(env, expected, kwargs):
    d = distributed.launch_decision(env)
    assert d.initialize is expected, d.reason
    assert d.kwargs == kwargs


def test_launch_decision_bad_values():
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='four'"):
        distributed.launch_decision({"JAX_NUM_PROCESSES": "four"})
    with pytest.raises(ValueError, match="VISCOIN_DISTRIBUTED"):
        distributed.launch_decision({"VISCOIN_DISTRIBUTED": "sometimes"})


def test_maybe_initialize_calls_jax_only_for_multi_process(monkeypatch):
    import jax
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    assert distributed.maybe_initialize_distributed({}) is False
    assert calls == []
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed.maybe_initialize_distributed(env) is True
    assert calls == [{"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}]


@pytest.mark.parametrize("spec", ["configs/pipeline_cub.py", "configs/pipeline_cub.py:nct", "configs/demo.py",
                                  "configs/demo.py:quick"])
def test_pipeline_configs_load_and_leave_links_to_the_pipeline(spec):
    from viscoin_jax.training.config import load_config as load

    config = load(spec, [])
    extra = ["autoencoder"] if "demo" in spec else []  # the demo also trains the autoencoder of its counterfactuals
    assert list(config.stage_order) == ["classifier", "iresnet", *extra, "stylegan2", "viscoin"]
    vis = config.stages.viscoin
    assert vis.classifier_workdir == "" and vis.generator_workdir == ""  # filled with this run's stages
    assert config.stages.classifier.model.num_classes == vis.model.num_classes
    assert config.stages.stylegan2.data.resolution == vis.data.resolution == config.stages.classifier.data.resolution
    with pytest.raises(ValueError, match="unknown variant"):
        load(spec.split(":")[0] + ":nope", [])


def test_paper_configs_refuse_to_start_without_lpips_weights_unless_allowed(tmp_path):
    """pipeline_cub / viscoin_cub stop before any stage trains; the demo keeps the labelled fallback."""
    from viscoin_jax.cli import run as pipeline
    from viscoin_jax.training.config import load_config as load
    from viscoin_jax.trainers.viscoin import check_perceptual

    for spec in ("configs/pipeline_cub.py", "configs/pipeline_cub.py:nct"):
        config = load(spec, [])
        with pytest.raises(ValueError, match=r"stage 'viscoin': config.stages.viscoin.loss.lpips_weights is empty"):
            pipeline.run_pipeline(config, tmp_path / "run")
        assert not (tmp_path / "run").exists()  # nothing written, nothing trained
        allowed = load(spec, ["--config.stages.viscoin.loss.allow_perceptual_fallback=True"])
        pipeline.check_stages(allowed)
        weights = tmp_path / "lpips.npz"
        weights.write_bytes(b"")
        pipeline.check_stages(load(spec, [f"--config.stages.viscoin.loss.lpips_weights={weights}"]))
        with pytest.raises(FileNotFoundError, match="missing.npz"):
            pipeline.check_stages(load(spec, [f"--config.stages.viscoin.loss.lpips_weights={tmp_path / 'missing.npz'}"]))
    with pytest.raises(ValueError, match="allow_perceptual_fallback"):
        check_perceptual(load("configs/viscoin_cub.py", []))
    assert check_perceptual(load("configs/viscoin_cub.py", ["--config.loss.allow_perceptual_fallback=True"])) == ""
    for spec in ("configs/demo.py", "configs/demo.py:quick"):
        pipeline.check_stages(load(spec, []))
    assert check_perceptual(load("configs/viscoin_synthetic.py", [])) == ""


@pytest.mark.parametrize("value", ["1.0", "0", "-0.5"])
def test_pipeline_refuses_a_bad_latent_confidence_before_training(tmp_path, value):
    """The explanations run last; a confidence they cannot use must stop the pipeline before the first stage."""
    from viscoin_jax.cli import run as pipeline
    from viscoin_jax.training.config import load_config as load

    config = load("configs/demo.py:quick", [f"--config.explain.latent_confidence={value}"])
    with pytest.raises(ValueError, match=r"config.explain: the latent counterfactuals' confidence must lie in \(0, 1\)"):
        pipeline.run_pipeline(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    good = load("configs/demo.py:quick", ["--config.explain.latent_confidence=0.75"])
    latent, _ = pipeline.explanation_settings(good)
    assert latent.confidence == 0.75


def test_pipeline_refuses_explained_images_of_more_classes_before_training(tmp_path):
    """Images of a 4-class variant for 2-class stages would fail only after every stage trained: refused first."""
    from viscoin_jax.cli import run as pipeline
    from viscoin_jax.training.config import load_config as load

    config = load("configs/demo.py:quick", ["--config.explain.images=synthetic/blob_4class:test:8"])
    with pytest.raises(ValueError, match=r"holds 4 classes, but stage 'classifier' has 2 "
                                         r"\(config.stages.classifier.model.num_classes\)"):
        pipeline.run_pipeline(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"config.explain.images: unknown synthetic variant 'blob_nope'"):
        pipeline.check_stages(load("configs/demo.py:quick", ["--config.explain.images=synthetic/blob_nope:test:8"]))
    overrides = [f"--config.stages.{s}.model.num_classes=4" for s in ("classifier", "iresnet", "viscoin")]
    pipeline.check_stages(load("configs/demo.py:quick", overrides + ["--config.explain.images=synthetic/blob_4class:test:8"]))
    pipeline.check_stages(load("configs/demo.py:quick", ["--config.explain.images=synthetic/blob_shape:test:8"]))
