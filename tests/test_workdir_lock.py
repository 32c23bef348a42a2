"""Readers never write, one trainer per workdir, and a resumed run keeps the config it started with."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from viscoin_jax.training import runs
from viscoin_jax.training.checkpoint import Checkpointer
from viscoin_jax.training.config import load_config
from viscoin_jax.training.loop import load_trained, run_training
from viscoin_jax.trainers.toy import ToyTask
from viscoin_jax.training.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLockedError, read_lock
from toy_run import TOY, run_args

RUN = run_args(2)

pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")


def _train(workdir, *extra):
    config = load_config(TOY, RUN + list(extra))
    return run_training(ToyTask(config), config, workdir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    _train(workdir)
    return workdir


def test_readers_leave_a_running_save_alone(trained):
    # what a trainer's save in flight looks like on disk
    tmp = trained / "checkpoints" / "4.orbax-checkpoint-tmp-1234567"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "chunk").write_bytes(b"in progress")
    before = sorted(str(p.relative_to(trained)) for p in trained.rglob("*"))
    _, state, config, _ = runs.restore_task_state(trained)
    assert config.train.num_steps == 2 and state["params"]
    config2, _, restored = load_trained(trained)
    assert restored.step == 2
    Checkpointer(trained / "checkpoints", read_only=True).read_json()
    assert sorted(str(p.relative_to(trained)) for p in trained.rglob("*")) == before
    assert (tmp / "state" / "chunk").read_bytes() == b"in progress"


class LockSpy(ToyTask):
    seen = None

    def make_train_iterator(self, data_state):
        LockSpy.seen = read_lock(Path(self.workdir) / LOCK_NAME)
        return super().make_train_iterator(data_state)


def test_training_holds_the_workdir_lock(tmp_path):
    config = load_config(TOY, RUN)
    task = LockSpy(config)
    task.workdir = tmp_path
    run_training(task, config, tmp_path)
    assert LockSpy.seen["host"] == socket.gethostname() and LockSpy.seen["pid"] > 0
    assert LockSpy.seen["pid"] == __import__("os").getpid()
    assert not (tmp_path / LOCK_NAME).exists()  # released at the end


def test_a_live_owner_stops_a_second_trainer_before_it_writes(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps(
            {"pid": other.pid, "host": socket.gethostname(), "started": "then"}))
        with pytest.raises(WorkdirLockedError, match=f"in use by pid {other.pid} on host "):
            _train(tmp_path)
    finally:
        other.kill()
        other.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # nothing else written
    # a lock of another host cannot be checked from here: refused as well
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere-7", "started": "x"}))
    with pytest.raises(WorkdirLockedError, match="pid 1 on host elsewhere-7"):
        WorkdirLock(tmp_path).acquire()
    # within one process, a second lock of the same workdir is refused too
    (tmp_path / LOCK_NAME).unlink()
    with WorkdirLock(tmp_path):
        with pytest.raises(WorkdirLockedError, match="in use by this process"):
            WorkdirLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"pid": gone.pid, "host": socket.gethostname(), "started": "then"}))
    caplog.set_level("WARNING")
    assert _train(tmp_path).step == 2
    assert any(f"pid {gone.pid} on {socket.gethostname()} is not running" in r.getMessage()
               for r in caplog.records)
    assert not (tmp_path / LOCK_NAME).exists()


def test_resume_with_a_changed_config_keeps_config_json_and_logs_the_diff(trained, tmp_path, caplog):
    import shutil
    workdir = tmp_path / "copy"
    shutil.copytree(trained, workdir)
    saved = (workdir / "config.json").read_text()
    caplog.set_level("WARNING")
    result = _train(workdir, "--config.train.num_steps=4", "--config.toy.learning_rate=0.003")
    assert result.step == 4
    assert (workdir / "config.json").read_text() == saved
    message = " ".join(r.getMessage() for r in caplog.records if "changed config" in r.getMessage())
    assert "train.num_steps: 2 -> 4" in message and "toy.learning_rate: 0.01 -> 0.003" in message
    config, _ = Checkpointer(workdir / "checkpoints", read_only=True).read_json(4)
    assert config["train"]["num_steps"] == 4  # the new checkpoints carry the config they ran with
