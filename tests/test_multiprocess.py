"""Two processes x 4 CPU devices, as a pod user runs them (`launch/local.sh --processes 2`, one
shared workdir), checked against this single process: the checkpoint restores here, the final
evaluation equals this process's evaluation of the same parameters on the same examples, and one
process resumes the run from the saved step (state resharded, data position redistributed).
The FID and explanation tests split that work over two processes; the VisCoIN run trains on
untrained frozen f and G (tests/viscoin_fixtures.py). The classifier and StyleGAN2 runs are what CI
checks (issue 20: about 1 and 3-4 minutes on two cores); the VisCoIN run is marked slow (3 minutes)."""

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
VISCOIN = [
    "--config.model.branch_channels=8", "--config.train.batch_size=8", "--config.viscoin.num_generated=4",
    "--config.viscoin.num_samples=0", "--config.train.eval_every=0", "--config.train.sample_every=0",
    "--config.train.log_every=1", "--config.train.progress_every=0", "--config.checkpoint.every=2",
    "--config.checkpoint.async_save=False", "--config.data.synthetic_size=64", "--config.eval.batch_size=8",
    "--config.eval.max_batches=1", "--config.eval.final_batches=2",
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


def run_processes(argv: list[str], processes: int = 2, devices: int = 4, timeout: int = 600,
                  returncode: int = 0) -> list[str]:
    """Runs `python ARGV...` as `processes` processes of one JAX run (the JAX variables, a free
    port, `devices` CPU devices each, tests/ importable); returns their logs (the test fails with
    their tails when one exits with another status than `returncode`)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES=str(processes),
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    env.pop("VISCOIN_DISTRIBUTED", None)
    procs = [subprocess.Popen([sys.executable] + argv, env=dict(env, JAX_PROCESS_ID=str(k)), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k in range(processes)]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert [p.returncode for p in procs] == [returncode] * processes, "\n".join(log[-3000:] for log in logs)
    return logs


def test_evaluation_helpers_gather_every_process(tmp_path):
    """`evaluate_batches` runs on global batches built from each process's block, with parameters
    sharded across the processes, and every process gets all rows back; `all_processes` gathers a
    batch. Checked against numpy on the whole data."""
    run_processes([str(REPO / "tests" / "gather_worker.py"), str(tmp_path)], timeout=300)
    for k in range(2):
        got = np.load(tmp_path / f"process_{k}.npz")
        x, y, w = got["x"], got["y"], got["w"]
        np.testing.assert_allclose(got["products"], np.einsum("bnk,kd->bnd", x.astype(np.float64), w),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got["labels"], y)
        np.testing.assert_array_equal(got["gathered_x"], x)


def test_fid_is_split_over_processes(tmp_path):
    """Each process generates and features its block of the samples and of the real images; the
    gathered float64 statistics give every process the one-process FID and KID (same sample seeds),
    and both equal numpy's on all features. Uneven blocks: 37 real rows, 19 samples of batches of
    4, and 3 rows (one chunk: process 0 features nothing)."""
    import fid_worker as w
    import scipy.linalg

    run_processes([str(REPO / "tests" / "fid_worker.py"), str(tmp_path)], timeout=300)
    one = w.run()  # this process alone, with the same seeds
    # numpy on every feature: pixels -> tanh(x W) in float64; sample batch i from fold_in(key(7), i)
    def feats(x):
        return np.tanh(np.asarray(x, np.float64).reshape(len(x), -1) @ w.projection().astype(np.float64))
    key = jax.random.key(7)
    fake_x = np.concatenate([np.asarray(w.generator_fn(jax.random.fold_in(key, i), w.BATCH)) for i in range(5)])
    real_f, fake_f = feats(w.real_images()), feats(fake_x[:w.N_FAKE])
    mu_r, mu_f, cov_r, cov_f = real_f.mean(0), fake_f.mean(0), np.cov(real_f.T), np.cov(fake_f.T)
    root = scipy.linalg.sqrtm(cov_r @ cov_f).real
    fid_np = float(np.sum((mu_r - mu_f) ** 2) + np.trace(cov_r + cov_f - 2 * root))
    assert one["fid"] == pytest.approx(fid_np, rel=1e-4) and fid_np > 0.1
    for k in range(2):
        got = np.load(tmp_path / f"process_{k}.npz")
        assert int(got["n_real"]) == w.N_REAL and int(got["n_fake"]) == w.N_FAKE
        assert float(got["fid"]) == pytest.approx(one["fid"], rel=1e-6)
        assert float(got["kid"]) == pytest.approx(one["kid"], rel=1e-6)
        assert int(got["rows"]) < 0.6 * one["rows"]  # its share of the images, not all of them
        np.testing.assert_allclose(got["real_features"], real_f, rtol=1e-5, atol=1e-6)  # in order
        for name in ("real_mean", "real_cov", "fake_mean", "fake_cov", "few_mean", "few_cov"):
            np.testing.assert_allclose(got[name], one[name], rtol=1e-9, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(got["fake_mean"], mu_f, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["fake_cov"], cov_f, rtol=1e-4, atol=1e-6)
        assert int(got["few_n"]) == 3
        np.testing.assert_allclose(got["few_cov"], np.cov(real_f[:3].T), rtol=1e-4, atol=1e-6)


EXPLAIN = ["--images", "synthetic/blob_binary:test:6", "--methods", "gradient", "occlusion", "deletion_insertion",
           "iresnet_counterfactual"]


def test_explain_runs_on_process_zero(tmp_path):
    """`viscoin-jax explain` launched as two processes: process 0 explains alone (restoring the
    checkpoint process-locally, reading whole batches of the training images for the class means),
    the other waits and writes nothing; both exit 0, and metrics.json and the arrays are those of
    a one-process run on the same checkpoint. A failure on process 0 ends both with its status."""
    from viscoin_fixtures import make_iresnet_run
    from viscoin_jax.cli.explain import explain

    run = make_iresnet_run(tmp_path / "ires")
    cli = ["-m", "viscoin_jax.cli", "explain", "--checkpoint", str(run)]
    logs = run_processes(cli + EXPLAIN + ["--out", str(tmp_path / "two")], timeout=600)
    assert "process 1 waits while process 0 runs the explanations" in logs[1]
    assert "attributions" in logs[0] and "attributions" not in logs[1]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # the key images: process 0's file alone
    explain(str(run), EXPLAIN[1], EXPLAIN[3:], str(tmp_path / "one"))
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert list(two) == list(one) and "i-ResNet counterfactual L1" in one
    for key, value in one.items():
        assert two[key] == (pytest.approx(value, rel=1e-5, abs=1e-6) if isinstance(value, float) else value), key
    for name in ("gradient", "occlusion", "iresnet_counterfactual"):
        a, b = np.load(tmp_path / "one" / f"{name}.npz"), np.load(tmp_path / "two" / f"{name}.npz")
        assert a.files == b.files
        for f in a.files:
            np.testing.assert_allclose(b[f], a[f], rtol=1e-4, atol=1e-5, err_msg=f"{name}/{f}")

    logs = run_processes(cli + ["--images", "synthetic/blob_binary:test:2", "--methods", "no_such_method",
                                "--out", str(tmp_path / "bad")], returncode=2, timeout=300)
    assert "no_such_method" in logs[0] and "process 0 failed while running the explanations" in logs[1]
    assert not (tmp_path / "bad").exists()


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


@pytest.mark.slow
def test_viscoin_fsdp_over_two_processes(tmp_path):
    """A tiny VisCoIN run (f and G restored process-locally by each process, Psi/Theta/Omega
    sharded over both processes' devices) trains 2 steps; the checkpoint restores in this one
    process, and the final evaluation both processes wrote is this process's evaluation of the
    restored parameters, and a direct pass over the same 16 test images. About 3 minutes on two
    cores (2 of them the two-process run)."""
    from viscoin_fixtures import make_frozen_runs
    from viscoin_jax.trainers import viscoin

    clf, sg2, _ = make_frozen_runs(tmp_path)
    workdir = tmp_path / "viscoin"
    links = [f"--config.classifier_workdir={clf}", f"--config.generator_workdir={sg2}"]
    launch("viscoin_synthetic", workdir, VISCOIN + FSDP + links + ["--config.train.num_steps=2"], 2, 4)
    assert Checkpointer(workdir / "checkpoints", read_only=True).all_steps() == [2]
    written = json.loads((workdir / "viscoin_eval.json").read_text())
    task, state, config = viscoin.load(workdir)
    here = viscoin.final_evaluation(task, state)
    assert written["step"] == 2 and written["num_examples"] == here["num_examples"] == 16
    for key in ("accuracy", "classifier_accuracy", "fidelity", "mse", "perceptual"):
        assert written[key] == pytest.approx(here[key], rel=1e-5, abs=1e-6), key
    for tau, value in here["faithfulness"].items():
        assert written["faithfulness"][tau] == pytest.approx(value, rel=1e-4, abs=1e-5), tau
    # the same images read plainly in this process, through the model directly
    batches = list(batch_lib.eval_batches(config, max_batches=2))
    images = np.concatenate([b["image"] for b in batches]).astype(np.float32)
    labels = np.concatenate([b["label"] for b in batches])
    out = jax.jit(task.forward)(state["params"], images)
    g = np.asarray(out["g_logits"]).argmax(-1)
    f = np.asarray(out["f_logits"]).argmax(-1)
    rec = np.asarray(out["reconstruction"], np.float64)
    assert written["accuracy"] == pytest.approx(float(np.mean(g == labels)))
    assert written["fidelity"] == pytest.approx(float(np.mean(g == f)))
    assert written["mse"] == pytest.approx(float(np.mean((rec - images) ** 2)), rel=1e-4)
