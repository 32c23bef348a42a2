"""User errors fail before the first step, in one line with exit status 2, and write nothing."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from viscoin_jax import cli
from viscoin_jax.training.workdir_lock import LOCK_NAME

REPO = Path(__file__).resolve().parents[1]
TOY = str(REPO / "configs" / "toy_regression.py")
CLASSIFIER = str(REPO / "configs" / "classifier_synthetic.py")


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.setenv("VISCOIN_DISTRIBUTED", "0")


def _train(capsys, config, workdir, *overrides):
    rc = cli.main(["train", "--config", config, "--workdir", str(workdir), *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


@pytest.mark.parametrize("config, overrides, message", [
    (TOY, ["--config.train.num_steps=0"], "config.train.num_steps must be an int >= 1, got 0"),
    (TOY, ["--config.train.num_steps=-5"], "config.train.num_steps must be an int >= 1, got -5"),
    (TOY, ["--config.mesh.data=3", "--config.mesh.fsdp=1"], "3 devices, but 8 are available"),
    (TOY, ["--config.train.batch_size=12"], "global batch size 12 is not divisible by the 8"),
    # the evaluation batch used to fail only at the first evaluation, after training
    (CLASSIFIER, ["--config.eval.batch_size=12"],
     "config.eval.batch_size: global batch size 12 is not divisible by the 8 batch shards"),
    (CLASSIFIER, ["--config.data.name=nct_crc_he", "--config.data.data_dir=/nonexistent/nct"],
     "image folder /nonexistent/nct/test does not exist"),
])
def test_user_errors_end_in_one_line_with_rc_2_before_anything_is_written(
        tmp_path, capsys, config, overrides, message):
    workdir = tmp_path / "run"
    rc, err = _train(capsys, config, workdir, *overrides)
    assert rc == 2 and len(err) == 1, err[-20:]
    assert err[0].startswith("viscoin-jax train: error: ") and message in err[0], err[0]
    assert not workdir.exists() or not any(workdir.iterdir())


def test_a_workdir_in_use_is_a_user_error(tmp_path, capsys):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps(
            {"pid": other.pid, "host": socket.gethostname(), "started": "then"}))
        rc, err = _train(capsys, TOY, tmp_path, "--config.train.num_steps=2",
                         "--config.train.batch_size=16")
    finally:
        other.kill()
        other.wait()
    assert rc == 2 and len(err) == 1 and f"in use by pid {other.pid}" in err[0]
    assert sorted(os.listdir(tmp_path)) == [LOCK_NAME]
