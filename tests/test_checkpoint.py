"""Checkpoints: exact resume after SIGTERM, restore onto other meshes, retention, damaged files."""

import glob
import json
import os
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from viscoin_jax.data.pipeline import STATE_LAYOUT
from viscoin_jax.training import mesh as mesh_lib
from viscoin_jax.training.checkpoint import Checkpointer, CheckpointError
from viscoin_jax.training.config import load_config, load_saved_config
from viscoin_jax.training.loop import load_trained, run_training
from viscoin_jax.trainers.toy import ToyTask
from toy_run import TOY, run_args

RUN = run_args()  # a small sharded run (tests/toy_run.py)


pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")


class SigtermTask(ToyTask):
    """The toy task whose data iterator sends this process SIGTERM after yielding batch `at`."""

    def __init__(self, config, at):
        super().__init__(config)
        self.at = at

    def make_train_iterator(self, data_state):
        inner = super().make_train_iterator(data_state)
        at = self.at

        class Iterator:
            def __next__(self):
                batch = next(inner)
                if inner.index == at:
                    os.kill(os.getpid(), signal.SIGTERM)
                return batch

            def get_state(self):
                return inner.get_state()
        return Iterator()


def _host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_sigterm_then_resume_equals_straight_run(tmp_path):
    handler_before = signal.getsignal(signal.SIGTERM)
    straight = run_training(ToyTask(load_config(TOY, RUN)), load_config(TOY, RUN), tmp_path / "a")
    assert straight.step == 6 and not straight.preempted

    # A run stopped by SIGTERM during step 3 saves step 3 and returns ...
    cut = run_training(SigtermTask(load_config(TOY, RUN), at=3), load_config(TOY, RUN),
                       tmp_path / "b")
    assert cut.step == 3 and cut.preempted
    ckpt = Checkpointer(tmp_path / "b" / "checkpoints", read_only=True)
    assert ckpt.all_steps() == [2, 3]
    restored_data = ckpt.restore(None, 3).data_state
    assert restored_data == {"index": 3}
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the handler was removed

    # ... and a fresh task/config (as in a new process) continues it to the same end point.
    resumed = run_training(ToyTask(load_config(TOY, RUN)), load_config(TOY, RUN), tmp_path / "b")
    assert resumed.step == 6 and not resumed.preempted
    for a, b in zip(_host(straight.state), _host(resumed.state)):
        np.testing.assert_array_equal(a, b)  # params, Adam moments, step and rng: bit-equal
    # the resumed run used batches 3..5 (not 0..2 again): its final data position is 6
    final = Checkpointer(tmp_path / "b" / "checkpoints", read_only=True).restore(None)
    assert final.step == 6 and final.data_state == {"index": 6}
    assert final.metadata == {"model": "toy_mlp", "features": 12, "hidden": [48, 36]}
    assert final.config["mesh"]["fsdp"] == 4 and final.config["trainer"] == "toy"
    assert load_saved_config(tmp_path / "b").train.num_steps == 6
    # the training state was saved sharded as the FSDP rule says and restores that way
    kernel = resumed.state["task"]["params"]["layers"][0]["kernel"][...]
    assert kernel.sharding.spec == P(None, "fsdp")
    # asynchronous saves were not disturbed by the next steps reusing (donating) the buffers:
    # step 4 written by the straight run equals step 4 written after the restart
    a4 = Checkpointer(tmp_path / "a" / "checkpoints", read_only=True).restore(None, 4)
    b4 = Checkpointer(tmp_path / "b" / "checkpoints", read_only=True).restore(None, 4)
    assert a4.data_state == b4.data_state == {"index": 4}
    for a, b in zip(_host(a4.state), _host(b4.state)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(_host(a4.state)[-1], _host(straight.state)[-1])

    # what `viscoin-jax explain` does: rebuild the task from the workdir alone, onto one device
    one = mesh_lib.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    config, task, restored = load_trained(tmp_path / "b", mesh=one)
    assert config.trainer == "toy" and isinstance(task, ToyTask) and restored.step == 6
    for a, b in zip(_host(restored.state), _host(resumed.state)):
        np.testing.assert_array_equal(a, b)

    # Running a finished run again trains no further.
    again = run_training(ToyTask(load_config(TOY, RUN)), load_config(TOY, RUN), tmp_path / "b")
    assert again.step == 6
    for a, b in zip(_host(straight.state), _host(again.state)):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# The Checkpointer on its own


def _sharded_state(mesh, seed=0):
    rng = np.random.default_rng(seed)
    host = {"w": rng.standard_normal((64, 40)).astype(np.float32),
            "b": rng.standard_normal((40,)).astype(np.float32),
            "step": np.int32(17), "rng": np.array([3, 4], np.uint32)}
    return host, jax.device_put(host, mesh_lib.fsdp_sharding(host, mesh, min_size=16))


@pytest.mark.parametrize("target", [(1, 4), (2, 2), (1, 1)])
def test_restore_onto_another_mesh(tmp_path, target):
    """Saved sharded over 8 devices, restored onto 4 or 1 device(s) through target shardings."""
    mesh8 = mesh_lib.make_mesh({"data": 1, "fsdp": 8})
    host, state = _sharded_state(mesh8)
    assert state["w"].sharding.spec == P("fsdp") and state["b"].sharding.spec == P("fsdp")
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, state, data_state={"i": 1})

    n = target[0] * target[1]
    mesh = mesh_lib.make_mesh({"data": target[0], "fsdp": target[1]},
                              devices=jax.devices()[8 - n:])
    shardings = mesh_lib.fsdp_sharding(host, mesh, min_size=16)
    restored = Checkpointer(tmp_path, read_only=True).restore(
        mesh_lib.abstract_with_sharding(host, shardings))
    assert restored.step == 5 and restored.data_state == {"i": 1}
    for key, value in host.items():
        arr = restored.state[key]
        np.testing.assert_array_equal(np.asarray(arr), value)
        assert arr.sharding == shardings[key]
        assert {s.device for s in arr.addressable_shards} == set(mesh.devices.flat)
    if target[1] > 1:
        assert restored.state["w"].addressable_shards[0].data.shape == (64 // target[1], 40)


def test_keep_last_n_plus_best(tmp_path):
    mesh = mesh_lib.make_mesh({"data": 8, "fsdp": 1})
    _, state = _sharded_state(mesh)
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 6.0}
    with Checkpointer(tmp_path / "min", max_to_keep=1, best_metric="eval/loss",
                      best_mode="min") as ckpt:
        for step, loss in losses.items():
            ckpt.save(step, state, metrics={"eval/loss": loss, "eval/acc": -loss})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4]  # the best (loss 1.0) and the last
        ckpt.save(5, state)  # no metrics (e.g. a preemption save): kept only while recent
        ckpt.save(6, state, metrics={"eval/acc": 0.0})  # lacks the best metric
        ckpt.wait()
        assert ckpt.all_steps() == [2, 6]
    # a restarted run still knows which checkpoint is the best (metrics are kept on disk)
    with Checkpointer(tmp_path / "min", max_to_keep=1, best_metric="eval/loss",
                      best_mode="min") as ckpt:
        ckpt.save(7, state, metrics={"eval/loss": 2.0})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 7]
    with Checkpointer(tmp_path / "max", max_to_keep=2, best_metric="eval/acc",
                      best_mode="max") as ckpt:
        for step, loss in losses.items():
            ckpt.save(step, state, metrics={"eval/acc": -loss})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3, 4]  # the best (acc -1.0) and the last two
    with pytest.raises(ValueError, match="best_mode"):
        Checkpointer(tmp_path / "x", best_mode="lowest")


def test_json_items_and_bytes_iterator_state(tmp_path):
    mesh = mesh_lib.make_mesh({"data": 8, "fsdp": 1})
    host, state = _sharded_state(mesh)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, data_state=b"\x00grain\xffstate", config={"a": (1, 2), "b": None},
                  metadata={"model": "resnet50", "num_classes": np.int64(200)})
    ckpt = Checkpointer(tmp_path, read_only=True)
    restored = ckpt.restore(None)
    assert restored.data_state == b"\x00grain\xffstate"
    assert restored.config == {"a": [1, 2], "b": None}
    assert restored.metadata == {"model": "resnet50", "num_classes": 200}
    assert ckpt.read_json() == (restored.config, restored.metadata)
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), host["w"])
    # a restore that skips the data item
    assert ckpt.restore(None, restore_data=False).data_state is None


# ----------------------------------------------------------------------------------------------
# Missing, incomplete and damaged checkpoints


@pytest.fixture
def two_steps(tmp_path):
    mesh = mesh_lib.make_mesh({"data": 8, "fsdp": 1})
    host, state = _sharded_state(mesh)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, data_state={"i": 1})
        ckpt.save(2, jax.tree.map(lambda x: x + 1, state), data_state={"i": 2})
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), host)
    return tmp_path, host, target


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist"):
        Checkpointer(tmp_path / "nope", read_only=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no checkpoint in {tmp_path / 'empty'}"):
        Checkpointer(tmp_path / "empty", read_only=True).restore(None)


def test_unknown_step(two_steps):
    path, _, target = two_steps
    with pytest.raises(FileNotFoundError,
                       match=r"no checkpoint for step 7 .*available steps: \[1, 2\]"):
        Checkpointer(path, read_only=True).restore(target, step=7)


def test_step_without_commit_marker(two_steps):
    path, host, target = two_steps
    os.remove(path / "2" / "commit_success.txt")
    ckpt = Checkpointer(path, read_only=True)
    with pytest.raises(CheckpointError, match=f"checkpoint {path / '2'} is incomplete"):
        ckpt.restore(target)
    np.testing.assert_array_equal(np.asarray(ckpt.restore(target, step=1).state["w"]), host["w"])


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_damaged_array_files(two_steps, damage):
    path, host, target = two_steps
    files = [f for f in glob.glob(str(path / "2" / "state" / "**" / "d" / "*"), recursive=True)
             if os.path.isfile(f)]
    assert files, "expected OCDBT data files in the checkpoint"
    for f in files:
        if damage == "delete":
            os.remove(f)
        else:
            with open(f, "r+b") as fh:
                fh.truncate(7)
    ckpt = Checkpointer(path, read_only=True)
    with pytest.raises(CheckpointError, match=f"checkpoint {path / '2'} is damaged"):
        ckpt.restore(target)
    os.remove(path / "2" / "checksums.json")  # unverified: Orbax's own error, naming the path
    with pytest.raises(CheckpointError, match=f"cannot restore checkpoint {path / '2'}"):
        ckpt.restore(target)
    # the earlier checkpoint is untouched
    np.testing.assert_array_equal(np.asarray(ckpt.restore(target, step=1).state["w"]), host["w"])


def _flip_bytes(path, seed=0):
    """Flips a few bytes in the middle of the largest array file of a step (size unchanged)."""
    files = [Path(f) for f in glob.glob(str(path / "state" / "**" / "d" / "*"), recursive=True)
             if os.path.isfile(f)]
    target = max(files, key=lambda f: f.stat().st_size)
    data = bytearray(target.read_bytes())
    rng = np.random.default_rng(seed)
    for i in rng.choice(np.arange(len(data) // 4, 3 * len(data) // 4), size=4, replace=False):
        data[i] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def test_flipped_bytes_fail_verification_and_the_previous_step_is_used(two_steps, caplog):
    path, host, target = two_steps
    assert json.loads((path / "2" / "checksums.json").read_text())["algorithm"] == "sha256"
    damaged = _flip_bytes(path / "2")
    ckpt = Checkpointer(path, read_only=True)
    with pytest.raises(CheckpointError, match=f"checkpoint {path / '2'} is damaged: 1 file.*"
                                              f"differ from checksums.json: .*{damaged.name}"):
        ckpt.restore(target)
    caplog.set_level("WARNING")
    restored = ckpt.restore_latest_valid(target)
    assert restored.step == 1 and restored.data_state == {"i": 1}
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), host["w"])
    assert any("checkpoint step 2 cannot be used" in r.getMessage() for r in caplog.records)
    assert ckpt.latest_verified_step() == 1
    assert damaged.is_file() and ckpt.all_steps() == [1, 2]  # a reader keeps it where it was


def test_a_target_no_step_fits_moves_nothing(two_steps):
    path, _, target = two_steps
    wrong = dict(target, w=jax.ShapeDtypeStruct((3, 3), np.float32, sharding=target["w"].sharding))
    with Checkpointer(path) as writer:  # e.g. a run resumed with another model config
        with pytest.raises(CheckpointError, match=f"cannot restore checkpoint {path / '2'}"):
            writer.restore_latest_valid(wrong)
        assert writer.all_steps() == [1, 2]
    assert not (path.parent / "checkpoints.damaged").exists()


def test_a_resumed_run_falls_back_over_a_damaged_checkpoint(tmp_path, caplog):
    config = load_config(TOY, RUN)
    run_training(ToyTask(config), config, tmp_path)
    damaged = _flip_bytes(tmp_path / "checkpoints" / "6")
    caplog.set_level("WARNING")
    longer = load_config(TOY, RUN + ["--config.train.num_steps=8"])
    result = run_training(ToyTask(longer), longer, tmp_path)
    assert result.step == 8
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "checkpoint step 6 cannot be used" in messages and "step 6 is kept at" in messages
    kept = tmp_path / "checkpoints.damaged" / "6"
    assert (kept / damaged.relative_to(tmp_path / "checkpoints" / "6")).is_file()  # not deleted
    ckpt = Checkpointer(tmp_path / "checkpoints", read_only=True)
    assert ckpt.all_steps() == [4, 6, 8]  # step 6 was trained again from step 4
    assert ckpt.restore(None, 6).data_state == {"index": 6}


def test_corrupt_data_state_and_wrong_target(two_steps):
    path, host, target = two_steps
    data_file = path / "2" / "data" / "process_0-of-1.json"
    data_file.write_text("{truncated")
    ckpt = Checkpointer(path, read_only=True)
    with pytest.raises(CheckpointError, match="differ from checksums.json: data/process_0-of-1"):
        ckpt.restore(target)
    os.remove(path / "2" / "checksums.json")
    with pytest.raises(CheckpointError, match=f"corrupt data-iterator state {data_file}"):
        ckpt.restore(target)
    wrong = dict(target, w=jax.ShapeDtypeStruct((3, 3), np.float32, sharding=target["w"].sharding))
    with pytest.raises(CheckpointError, match=f"cannot restore checkpoint {path / '1'}"):
        ckpt.restore(wrong, step=1)


def test_interrupted_save_keeps_previous_checkpoint(two_steps):
    """A save that died half-way leaves only an Orbax temporary directory: the latest complete
    checkpoint still restores, and the next writer removes the leftover and saves normally."""
    path, host, target = two_steps
    tmp = path / "3.orbax-checkpoint-tmp-1234567890"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "manifest.ocdbt").write_bytes(b"\x00partial")
    ckpt = Checkpointer(path, read_only=True)
    assert ckpt.latest_step() == 2
    restored = ckpt.restore(target)
    assert restored.step == 2 and restored.data_state == {"i": 2}
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), host["w"] + 1)
    assert tmp.exists()  # a reader does not delete anything

    mesh = mesh_lib.make_mesh({"data": 8, "fsdp": 1})
    with Checkpointer(path) as writer:
        writer.save(3, jax.device_put(host, NamedSharding(mesh, P())), data_state={"i": 3})
    assert not tmp.exists()
    assert Checkpointer(path, read_only=True).restore(target).data_state == {"i": 3}
    assert json.loads((path / "3" / "data" / "process_0-of-1.json").read_text())["state"] == {
        "i": 3}


def _restore(path, target):
    with Checkpointer(path, read_only=True) as ckpt:
        return ckpt.restore(target)


def test_data_state_of_another_process_count(two_steps):
    """A step saved by two processes (one data file each) resumes in one: the position they agree
    on, in global batches, is taken; positions that differ, or that count something else (this
    test's {"i": 2}, or a host's examples as saved before), cannot be redistributed and are named."""
    path, host, target = two_steps
    data = path / "2" / "data"
    saved = json.loads((data / "process_0-of-1.json").read_text())
    assert saved["device_count"] == jax.device_count() == 8
    os.remove(data / "process_0-of-1.json")
    os.remove(path / "2" / "checksums.json")
    position = {"layout": STATE_LAYOUT, "grain": {"next_index": 2}}
    for k in range(2):
        (data / f"process_{k}-of-2.json").write_text(json.dumps(dict(saved, state=position)))
    assert _restore(path, target).data_state == position
    (data / "process_1-of-2.json").write_text(json.dumps(dict(saved, state={**position, "grain": {"next_index": 3}})))
    with pytest.raises(CheckpointError, match="differ between the 2 processes"):
        _restore(path, target)
    for k in range(2):
        (data / f"process_{k}-of-2.json").write_text(json.dumps(saved))  # {"i": 2}
    with pytest.raises(CheckpointError, match="do not count global batches.*resume with 2"):
        _restore(path, target)
    os.remove(data / "process_1-of-2.json")  # an incomplete set
    with pytest.raises(CheckpointError, match="no complete set"):
        _restore(path, target)


def test_a_resume_on_another_device_count_is_logged(two_steps, caplog):
    path, host, target = two_steps
    data_file = path / "2" / "data" / "process_0-of-1.json"
    data_file.write_text(json.dumps(dict(json.loads(data_file.read_text()), device_count=4)))
    os.remove(path / "2" / "checksums.json")
    caplog.set_level("WARNING")
    assert _restore(path, target).data_state == {"i": 2}
    assert "checkpoint saved on 4 devices, resumed on 8" in caplog.text
