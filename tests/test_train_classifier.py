"""Classifier trainer: learns the synthetic task, resumes exactly, shards, evaluates correctly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from viscoin_jax.trainers import classifier
from viscoin_jax.training.config import load_config
from viscoin_jax.training.loop import run_training


pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")


def _config(tmp_path, *overrides):
    base = ["--config.model.width=4", "--config.train.batch_size=16", "--config.train.num_steps=24",
            "--config.train.eval_every=0", "--config.train.log_every=4", "--config.checkpoint.every=12",
            "--config.checkpoint.async_save=False", "--config.data.synthetic_size=512",
            "--config.eval.batch_size=32", "--config.eval.max_batches=2", "--config.optim.learning_rate=3e-3",
            "--config.optim.warmup_steps=2",
            "--config.optim.schedule=constant"]  # the interrupted run must see the same schedule
    return load_config("configs/classifier_synthetic.py", base + list(overrides))


def _params(result):
    return jax.tree.map(np.asarray, result.state["task"]["params"])


def test_training_reduces_loss_and_resumes_exactly(tmp_path):
    config = _config(tmp_path)
    task = classifier.make_task(config)
    straight = run_training(task, config, tmp_path / "a")
    # The training loss (batch statistics) on fixed batches drops below the initial model's.
    batches = [next(task.make_train_iterator(None)) for _ in range(2)]
    initial = jax.jit(task.init)(jax.random.split(jax.random.key(config.seed))[0])
    loss_fn = jax.jit(lambda s, b: task._loss(s["params"], s["batch_stats"], b)[0])
    loss = lambda s: np.mean([float(loss_fn(s, b)) for b in batches])
    assert loss(straight.state["task"]) < 0.8 * loss(initial)

    half = _config(tmp_path, "--config.train.num_steps=12")
    run_training(classifier.make_task(half), half, tmp_path / "b")
    resumed = run_training(classifier.make_task(config), config, tmp_path / "b")  # new task objects
    assert resumed.step == 24
    for a, b in zip(jax.tree.leaves(_params(straight)), jax.tree.leaves(_params(resumed))):
        np.testing.assert_array_equal(a, b)

    # The checkpoint rebuilds the model on its own: predictions equal the in-memory state's.
    task, state, _ = classifier.load(tmp_path / "a")
    images = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(classifier.predict(task, state, images),
                               classifier.predict(task, straight.state["task"], images), rtol=1e-6)


def test_sharded_step_equals_single_device(tmp_path):
    from viscoin_jax.training import mesh as mesh_lib

    results = []
    for data, fsdp in ((1, 1), (2, 4)):
        config = _config(tmp_path, "--config.train.num_steps=2", f"--config.mesh.data={data}",
                         f"--config.mesh.fsdp={fsdp}", "--config.mesh.fsdp_min_size=64",
                         # SGD: the update is linear in the gradient (Adam's m/sqrt(v) turns
                         # reduction-order noise on ~0 gradients into lr-sized differences)
                         "--config.optim.name=sgd",
                         "--config.checkpoint.every=0")
        devices = jax.devices()[:data * fsdp]
        mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
        results.append(run_training(classifier.make_task(config), config, tmp_path / f"m{data}{fsdp}",
                                    mesh=mesh))
    sharded = [x for x in jax.tree.leaves(results[1].state["task"]["params"])
               if len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated]
    assert sharded, "FSDP sharded no parameter"
    # Each convolution agrees with a float64 loop to ~3e-7 under either partitioning, but two SGD
    # steps through batch norm on 4-channel layers amplify the different summation orders of the
    # batch-16 and batch-2 convolutions to ~1e-4 of the parameters (~10% of a ~1e-3 update); a
    # sharding error (a gradient averaged over the wrong count, statistics of one shard) moves them
    # by the size of the update itself.
    for a, b in zip(jax.tree.leaves(_params(results[0])), jax.tree.leaves(_params(results[1]))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-4)


def test_full_evaluation_matches_numpy(tmp_path, monkeypatch):
    config = _config(tmp_path)
    task = classifier.make_task(config)
    state = jax.jit(task.init)(jax.random.key(0))
    rng = np.random.default_rng(1)
    batches = [{"image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
                "label": rng.integers(0, 2, 8).astype(np.int32)} for _ in range(3)]
    monkeypatch.setattr(classifier, "eval_batches", lambda *a, **k: iter(batches))
    out = classifier.full_evaluation(task, state)
    logits = np.concatenate([classifier.predict(task, state, b["image"]) for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    pred = logits.argmax(-1)
    assert out["accuracy"] == pytest.approx(np.mean(pred == labels))
    for c in (0, 1):
        assert out["per_class_accuracy"][c] == pytest.approx(np.mean(pred[labels == c] == c))
    p = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1))[:, 1].astype(np.float64)  # as the op does
    pos, neg = p[labels == 1], p[labels == 0]
    z = 1 - 3 * (pos.std(ddof=1) + neg.std(ddof=1)) / abs(pos.mean() - neg.mean())
    assert out["z_prime"] == pytest.approx(z, rel=1e-4)


def test_unknown_model_name_is_rejected(tmp_path):
    config = _config(tmp_path, "--config.model.name=vit")
    with pytest.raises(ValueError, match="unknown classifier config.model.name 'vit'"):
        classifier.make_task(config)


def test_z_prime_is_undefined_when_a_class_is_missing(tmp_path, monkeypatch, caplog):
    config = _config(tmp_path)
    task = classifier.make_task(config)
    state = jax.jit(task.init)(jax.random.key(0))
    rng = np.random.default_rng(2)
    batches = [{"image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
                "label": np.zeros(8, np.int32)} for _ in range(2)]
    monkeypatch.setattr(classifier, "eval_batches", lambda *a, **k: iter(batches))
    caplog.set_level("WARNING")
    out = classifier.full_evaluation(task, state)  # raised ValueError before
    assert out["z_prime"] is None and out["num_examples"] == 16
    assert any("Z'-factor undefined" in r.getMessage() and "[1]" in r.getMessage()
               for r in caplog.records)
    pred = np.concatenate([classifier.predict(task, state, b["image"]) for b in batches]).argmax(-1)
    assert out["accuracy"] == pytest.approx(np.mean(pred == 0))


def test_capped_evaluation_of_a_class_sorted_folder_is_class_balanced(tmp_path):
    from PIL import Image

    from viscoin_jax.data.pipeline import data_config
    from viscoin_jax.training import batches as batch_lib

    rng = np.random.default_rng(3)
    for name in ("ADI", "TUM"):  # stored class by class, as image folders are
        (tmp_path / "test" / name).mkdir(parents=True)
        for i in range(24):
            Image.fromarray(rng.integers(0, 256, (5, 5, 3)).astype(np.uint8)).save(
                tmp_path / "test" / name / f"{i:02d}.png")
    from ml_collections import ConfigDict
    config = ConfigDict({"data": data_config(name="nct_crc_he", data_dir=str(tmp_path), resolution=4),
                         "eval": ConfigDict({"split": "test", "batch_size": 8})})
    labels = np.concatenate([b["label"] for b in batch_lib.eval_batches(config, max_batches=2)])
    np.testing.assert_array_equal(np.bincount(labels, minlength=2), [8, 8])  # was 16 x class 0
    full = np.concatenate([b["label"] for b in batch_lib.eval_batches(config)])
    np.testing.assert_array_equal(full, [0] * 24 + [1] * 24)  # the uncapped pass: in order, all
