"""Two processes x 4 CPU devices, as a pod user runs them (`launch/local.sh --processes 2`, one
shared workdir), checked against this single process: the checkpoint restores here, the final
evaluation equals this process's evaluation of the same parameters on the same examples, and one
process resumes the run from the saved step (state resharded, data position redistributed).
The StyleGAN2 run takes minutes on two cores: marked slow (the classifier tests, about 1 minute
each)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from viscoin_jax.trainers import classifier, stylegan2 as sg
from viscoin_jax.training import batches as batch_lib
from viscoin_jax.training.checkpoint import Checkpointer

REPO = Path(__file__).resolve().parents[1]
LAUNCH = str(REPO / "launch" / "local.sh")

CLASSIFIER_CONFIG = "classifier_synthetic:iresnet"  # a one-block-per-stage i-ResNet: the cheapest to compile
CLASSIFIER = [
    "--config.model.in_shape=(16,16,3)", "--config.model.blocks_per_stage=(1,1)", "--config.model.channels=16",
    "--config.model.n_power_iter=1", "--config.data.resolution=16", "--config.data.synthetic_size=256",
    "--config.train.batch_size=16", "--config.train.eval_every=0", "--config.train.log_every=2",
    "--config.train.progress_every=0", "--config.checkpoint.every=2", "--config.checkpoint.max_to_keep=3",
    "--config.checkpoint.best_metric=", "--config.checkpoint.async_save=False",
    "--config.eval.batch_size=32", "--config.eval.max_batches=2",
]
STYLEGAN2 = [
    "--config.data.resolution=8", "--config.data.synthetic_size=64",
    "--config.model.generator.img_resolution=8", "--config.model.generator.channel_max=8",
    "--config.model.generator.z_dim=8", "--config.model.generator.w_dim=8",
    "--config.model.generator.mapping_layers=1",
    "--config.model.discriminator.img_resolution=8", "--config.model.discriminator.channel_max=8",
    "--config.train.batch_size=16", "--config.train.log_every=1", "--config.train.sample_every=0",
    "--config.train.eval_every=0", "--config.train.progress_every=0",
    "--config.checkpoint.every=2", "--config.checkpoint.async_save=False",
    "--config.stylegan2.pl_interval=0", "--config.stylegan2.r1_interval=0",
    "--config.stylegan2.num_samples=0", "--config.ada.enabled=False",
    "--config.fid.num_samples=16", "--config.fid.batch_size=16", "--config.fid.fallback_input_size=75",
]
FSDP = ["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.fsdp_min_size=64"]
DATA_PARALLEL = ["--config.mesh.data=-1", "--config.mesh.fsdp=1"]


def launch(config: str, workdir: Path, args: list[str], processes: int, devices: int) -> str:
    """Runs `launch/local.sh [--processes N]` with `devices` CPU devices per process; returns the
    log (the test fails with its tail when a process fails)."""
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "VISCOIN_DISTRIBUTED"):
        env.pop(name, None)
    cmd = [LAUNCH] + (["--processes", str(processes)] if processes > 1 else []) + [config, str(workdir)] + args
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd[:3])} exited {proc.returncode}:\n{log[-4000:]}"
    return log


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_evaluation_helpers_gather_every_process(tmp_path):
    """`evaluate_batches` runs on global batches built from each process's block, with parameters
    sharded across the processes, and every process gets all rows back; `all_processes` gathers a
    batch. Checked against numpy on the whole data."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    env.pop("VISCOIN_DISTRIBUTED", None)
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "gather_worker.py"), str(tmp_path)],
                              env=dict(env, JAX_PROCESS_ID=str(k)), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for k in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    for k in range(2):
        got = np.load(tmp_path / f"process_{k}.npz")
        x, y, w = got["x"], got["y"], got["w"]
        np.testing.assert_allclose(got["products"], np.einsum("bnk,kd->bnd", x.astype(np.float64), w),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got["labels"], y)
        np.testing.assert_array_equal(got["gathered_x"], x)


def _data_positions(workdir: Path, step: int) -> list[dict]:
    files = sorted((workdir / "checkpoints" / str(step) / "data").glob("process_*.json"))
    return [json.loads(p.read_text())["state"] for p in files]


def test_classifier_fsdp_over_two_processes(tmp_path):
    workdir = tmp_path / "clf"
    log = launch(CLASSIFIER_CONFIG, workdir, CLASSIFIER + FSDP + ["--config.train.num_steps=4"], 2, 4)
    assert "process 1 of 2, 4 local / 8 global devices" in log
    assert Checkpointer(workdir / "checkpoints", read_only=True).all_steps() == [2, 4]
    positions = _data_positions(workdir, 4)
    assert len(positions) == 2 and positions[0] == positions[1]  # the global batch count, on both

    # the checkpoint restores in this one process; its evaluation is what the two processes wrote
    written = json.loads((workdir / "eval_metrics.json").read_text())
    task, state, config = classifier.load(workdir)
    here = classifier.full_evaluation(task, state)
    assert written["num_examples"] == here["num_examples"] == 64  # both processes' examples
    assert written["accuracy"] == pytest.approx(here["accuracy"])
    assert written["per_class_accuracy"] == {str(k): v for k, v in here["per_class_accuracy"].items()}
    # ... and an independent pass: plain batches of this process's pipeline, logits by `predict`
    batches = list(batch_lib.eval_batches(config, max_batches=2))
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    logits = classifier.predict(task, state, images, batch_size=17)
    assert written["accuracy"] == pytest.approx(float(np.mean(logits.argmax(-1) == labels)))
    if written["z_prime"] is not None:
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p = (p / p.sum(-1, keepdims=True))[:, 1].astype(np.float64)
        pos, neg = p[labels == 1], p[labels == 0]
        z = 1 - 3 * (pos.std(ddof=1) + neg.std(ddof=1)) / abs(pos.mean() - neg.mean())
        assert written["z_prime"] == pytest.approx(z, rel=1e-3, abs=1e-3)

    # one process with 8 devices, data parallel, resumes from step 4: the FSDP state restored
    # replicated, the data position taken over
    log = launch(CLASSIFIER_CONFIG, workdir, CLASSIFIER + DATA_PARALLEL + ["--config.train.num_steps=6"], 1, 8)
    assert "resumed from" in log and str(workdir / "checkpoints" / "4") in log
    assert "checkpoint saved by 2 processes (8 devices), resumed by 1 (8 devices)" in log
    assert Checkpointer(workdir / "checkpoints", read_only=True).all_steps() == [2, 4, 6]
    assert _data_positions(workdir, 6) == [{**positions[0], "grain": {"next_index": 6}}]


@pytest.mark.slow
def test_stylegan2_fsdp_over_two_processes(tmp_path):
    """FSDP across processes to the end: the final FID gathers G_ema explicitly (no process fetches
    another's shards); both processes' FID is this process's FID of the restored generator."""
    workdir = tmp_path / "sg2"
    launch("stylegan2_synthetic", workdir, STYLEGAN2 + FSDP + ["--config.train.num_steps=2"], 2, 4)
    written = json.loads((workdir / "fid.json").read_text())
    task, state, config = sg.load(workdir)
    here = sg.compute_fid(task, jax.device_get(state), config)
    assert written["step"] == 2 and written["fid"] == pytest.approx(here.value, rel=1e-4)
    log = launch("stylegan2_synthetic", workdir, STYLEGAN2 + FSDP + ["--config.train.num_steps=3"], 1, 8)
    assert "checkpoint saved by 2 processes (8 devices), resumed by 1 (8 devices)" in log
    assert json.loads((workdir / "fid.json").read_text())["step"] == 3


def test_classifier_data_parallel_over_two_processes(tmp_path):
    """Data parallel across processes: the parameters replicated on both, the final evaluation
    over both processes' examples, as this process evaluates the restored parameters."""
    workdir = tmp_path / "clf_dp"
    launch(CLASSIFIER_CONFIG, workdir, CLASSIFIER + DATA_PARALLEL + ["--config.train.num_steps=2"], 2, 4)
    written = json.loads((workdir / "eval_metrics.json").read_text())
    task, state, _ = classifier.load(workdir)
    here = classifier.full_evaluation(task, state)
    assert written["num_examples"] == here["num_examples"] == 64
    assert written["accuracy"] == pytest.approx(here["accuracy"])
