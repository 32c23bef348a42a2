"""StyleGAN2 trainer: lazy regularisers on their intervals, EMA, ADA, resume, sharding, loading.

One tiny model (16 px, 16 channels) stepped by hand on one device is the reference the other
tests compare against: the loop's own run (straight and resumed) and a sharded step on 8 devices.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from viscoin_jax.kernels import lowering_for
from viscoin_jax.training import mesh as mesh_lib
from viscoin_jax.trainers import stylegan2 as sg
from viscoin_jax.training.config import load_config
from viscoin_jax.training.loop import compile_task, run_training

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "stylegan2_synthetic.py")
STEPS = 4
BATCH = 8
TINY = [
    "--config.data.resolution=16", "--config.data.synthetic_size=64",
    "--config.model.generator.img_resolution=16", "--config.model.generator.channel_max=16",
    "--config.model.generator.z_dim=16", "--config.model.generator.w_dim=16",
    "--config.model.discriminator.img_resolution=16", "--config.model.discriminator.channel_max=16",
    f"--config.train.batch_size={BATCH}", f"--config.train.num_steps={STEPS}",
    "--config.train.log_every=1", "--config.train.sample_every=0", "--config.train.progress_every=0",
    "--config.checkpoint.every=2", "--config.checkpoint.max_to_keep=3",
    # both regularisers inside 4 steps: PL on steps 0, 2; R1 on steps 0, 3
    "--config.stylegan2.pl_interval=2", "--config.stylegan2.r1_interval=3",
    "--config.stylegan2.r1_gamma=1.0",
    # a visible EMA (beta = 0.5 ** (8 / 10)) and p that moves 0.1 per adjustment
    "--config.stylegan2.ema_kimg=0.01", "--config.stylegan2.ema_rampup=0.0",
    "--config.stylegan2.num_samples=4",
    "--config.ada.initial_p=0.5", "--config.ada.interval=2", "--config.ada.kimg=0.16",
    "--config.fid.num_samples=16", "--config.fid.batch_size=8",
]
ONE_DEVICE = ["--config.mesh.data=1", "--config.mesh.fsdp=1"]


pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")


def _config(*extra):
    return load_config(CONFIG, TINY + list(extra))


def _one_mesh():
    return mesh_lib.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _adam_count(opt_state):
    counts = [np.asarray(x) for x in jax.tree.leaves(opt_state) if np.asarray(x).dtype == np.int32]
    assert counts, "no Adam step counter in the optimiser state"
    return int(counts[0])


@pytest.fixture(scope="module")
def stepped():
    """STEPS hand-driven steps on one device: the states before/after each step and the metrics."""
    config = _config(*ONE_DEVICE)
    task = sg.make_task(config)
    compiled = compile_task(task, _one_mesh())
    state = compiled.init(jax.random.key_data(jax.random.key(config.seed)))
    iterator = task.make_train_iterator(None)
    states, metrics, batches = [jax.device_get(state)], [], []
    for step in range(STEPS):
        local = next(iterator)
        batches.append(local)
        state, m = compiled.train_step(state, mesh_lib.make_global_batch(local, compiled.mesh),
                                       task.step_variant(step))
        states.append(jax.device_get(state))
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    return {"task": task, "config": config, "states": states, "metrics": metrics, "batches": batches}


def test_lazy_regularisers_run_only_on_their_steps(stepped):
    metrics, states = stepped["metrics"], stepped["states"]
    for step, m in enumerate(metrics):
        assert np.isfinite(list(m.values())).all()
        pl_step, r1_step = step % 2 == 0, step % 3 == 0
        assert (m["pl_penalty"] > 0) == pl_step and (m["pl_lengths"] > 0) == pl_step, (step, m)
        assert (m["r1_penalty"] > 0) == r1_step, (step, m)
        before, after = states[step]["task"], states[step + 1]["task"]
        # the regularisers take their own Adam step: two updates on their steps, one otherwise
        assert _adam_count(after["G_opt"]) - _adam_count(before["G_opt"]) == 1 + pl_step
        assert _adam_count(after["D_opt"]) - _adam_count(before["D_opt"]) == 1 + r1_step
        # pl_mean moves by pl_decay toward the batch's mean length only on PL steps
        expected = (float(before["pl_mean"]) + 0.01 * (m["pl_lengths"] - float(before["pl_mean"]))
                    if pl_step else float(before["pl_mean"]))
        np.testing.assert_allclose(float(after["pl_mean"]), expected, rtol=1e-5, atol=1e-7)
        assert int(after["step"]) == step + 1
    assert metrics[0]["G_loss"] > 0 and metrics[0]["D_loss"] > 0


def test_ema_follows_the_generator(stepped):
    states = stepped["states"]
    beta = 0.5 ** (BATCH / (0.01 * 1000.0))  # no ramp-up: the same beta from step 0 on
    for step in range(STEPS):
        assert stepped["metrics"][step]["ema_beta"] == pytest.approx(beta, rel=1e-5)
        old = _leaves(states[step]["task"]["G_ema"])
        new_g = _leaves(states[step + 1]["task"]["G"])
        new_ema = _leaves(states[step + 1]["task"]["G_ema"])
        differs = 0
        for o, g, e in zip(old, new_g, new_ema):
            ref = beta * o.astype(np.float64) + (1 - beta) * g.astype(np.float64)
            np.testing.assert_allclose(e, ref, rtol=1e-5, atol=1e-6)
            differs += not np.allclose(e, g)
        assert differs > 0  # the average lags behind G
    # w_avg is tracked (moves off zero) and is shared by G and G_ema
    w_avg = states[-1]["task"]["G_vars"]["mapping"]["w_avg"][...]
    assert np.abs(w_avg).max() > 0


def test_ada_p_moves_with_the_sign_of_d_real(stepped):
    """p changes every 2 steps by +-B * 2 / (kimg * 1000) = 0.1, by the sign of mean(sign D(real)) - 0.6."""
    metrics, states = stepped["metrics"], stepped["states"]
    p = 0.5
    for step in range(STEPS):
        assert metrics[step]["ada_p"] == pytest.approx(p, abs=1e-6)  # the p this step used
        if (step + 1) % 2 == 0:
            rt = np.mean([metrics[s]["D_real_sign"] for s in (step - 1, step)])
            p = float(np.clip(p + np.sign(rt - 0.6) * BATCH * 2 / 160.0, 0, 1))
        assert float(states[step + 1]["task"]["ada_p"]) == pytest.approx(p, abs=1e-6)
    assert p != 0.5


def test_lax_cond_step_equals_the_host_chosen_variants(stepped):
    # On CPU the loop picks the lazy terms on the host (one program per variant); on accelerators
    # the single program's lax.cond does. Both must train the same model.
    config = _config(*ONE_DEVICE)
    task = sg.make_task(config)
    assert task.step_variant(0) == (True, True) and task.step_variant(1) == (False, False)
    compiled = compile_task(task, _one_mesh())
    state = compiled.init(jax.random.key_data(jax.random.key(config.seed)))
    for step in range(3):
        batch = mesh_lib.make_global_batch(stepped["batches"][step], compiled.mesh)
        state, _ = compiled.train_step(state, batch)  # no variant: lax.cond on the step
    for a, b in zip(_leaves(state), _leaves(stepped["states"][3])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_run_training_straight_and_resumed_equal_the_hand_run(stepped, tmp_path):
    config = _config(*ONE_DEVICE)
    straight = run_training(sg.make_task(config), config, tmp_path / "a", mesh=_one_mesh())
    assert straight.step == STEPS
    for a, b in zip(_leaves(straight.state), _leaves(stepped["states"][-1])):
        np.testing.assert_array_equal(a, b)

    half = _config(*ONE_DEVICE, f"--config.train.num_steps={STEPS // 2}")
    run_training(sg.make_task(half), half, tmp_path / "b", mesh=_one_mesh())
    resumed = run_training(sg.make_task(config), config, tmp_path / "b", mesh=_one_mesh())
    assert resumed.step == STEPS
    for a, b in zip(_leaves(resumed.state), _leaves(straight.state)):
        np.testing.assert_array_equal(a, b)

    # load(): the task and state rebuilt from the workdir alone; G_ema samples equal the state's
    task, state, loaded_config = sg.load(tmp_path / "b")
    assert loaded_config.trainer == "stylegan2" and int(state["step"]) == STEPS
    assert task.model_metadata() == {"kind": "stylegan2", "model": config.model.to_dict()}
    G = sg.generator_from_state(task, state)
    z = jax.random.normal(jax.random.key(3), (2, 16))
    expected = sg.generator_from_state(stepped["task"], stepped["states"][-1]["task"])(z)
    np.testing.assert_allclose(np.asarray(G(z)), np.asarray(expected), rtol=1e-5, atol=1e-5)
    not_ema = sg.generator_from_state(task, state, ema=False)(z)
    assert not np.allclose(np.asarray(not_ema), np.asarray(expected))
    samples = task.sample_images(state)["G_ema"]
    assert samples.shape == (4, 16, 16, 3) and np.isfinite(np.asarray(samples)).all()
    with pytest.raises(ValueError, match="stylegan2"):
        from viscoin_jax.trainers import classifier
        classifier.load(tmp_path / "b")


@pytest.mark.slow  # a second full compile of the second-order step (~6 CPU-minutes)
def test_sharded_step_matches_one_device(stepped, monkeypatch):
    """Data parallel x FSDP over 8 devices (parameters sharded): 2 steps equal the one-device run.

    Minibatch std groups within each device's rows (one of 8 here), as the reference does per GPU,
    so 8 devices differ from one by design; grouping over the whole batch, as on one device,
    isolates what this test checks: sharding changes nothing else."""
    import functools
    from viscoin_jax.models import stylegan2 as models_sg
    monkeypatch.setattr(models_sg, "minibatch_std", functools.partial(models_sg.minibatch_std, num_shards=1))
    assert jax.device_count() == 8
    config = _config("--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.mesh.fsdp_min_size=64")
    task = sg.make_task(config)
    compiled = compile_task(task, mesh_lib.make_mesh(config.mesh))
    state = compiled.init(jax.random.key_data(jax.random.key(config.seed)))
    sharded = [x for x in jax.tree.leaves(state) if not x.sharding.is_fully_replicated]
    assert sharded, "FSDP sharded no parameter"
    for step in range(2):
        batch = mesh_lib.make_global_batch(stepped["batches"][step], compiled.mesh)
        state, metrics = compiled.train_step(state, batch, task.step_variant(step))
        for key, value in jax.device_get(metrics).items():
            np.testing.assert_allclose(float(value), stepped["metrics"][step][key], rtol=2e-3, atol=2e-4,
                                       err_msg=key)
    for a, b in zip(_leaves(state), _leaves(stepped["states"][2])):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4)
    host = sg.generator_on_host(state["task"])  # what the FID takes: numpy, gathered from the shards
    assert sorted(host) == ["G_ema", "G_vars"]
    for a, b in zip(jax.tree.leaves(host), _leaves({k: state["task"][k] for k in ("G_ema", "G_vars")})):
        assert isinstance(a, np.ndarray)
        np.testing.assert_array_equal(a, b)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="img_resolution"):
        sg.make_task(_config("--config.model.generator.img_resolution=32"))
    with pytest.raises(ValueError, match="conditional"):
        sg.make_task(_config("--config.model.generator.c_dim=3"))
    with pytest.raises(ValueError, match="style_mixing_prob"):
        sg.make_task(_config("--config.stylegan2.style_mixing_prob=1.5"))
    with pytest.raises(ValueError, match="preset"):
        sg.make_task(_config("--config.ada.preset=bgc"))
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        sg.fid_extractor(_config("--config.fid.inception_weights=/nonexistent/fid.npz"))


@pytest.mark.slow  # tracing the second-order step with every Pallas branch takes minutes on CPU
def test_sharded_pallas_step_lowers_for_tpu_and_gpu():
    """The whole training step (R1, path length, ADA) with the Pallas kernels, data parallel x FSDP
    over 8 devices, lowers for TPU (Mosaic calls inside shard_map, never partitioned by XLA) and GPU."""
    from viscoin_jax.training.loop import abstract_global_batch

    config = _config("--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.model.generator.impl=pallas",
                     "--config.model.discriminator.impl=pallas")
    task = sg.make_task(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    compiled = compile_task(task, mesh)
    with lowering_for("any"):  # one trace, lowered below for both platforms
        traced = compiled.train_step.trace(compiled.abstract_state, abstract_global_batch(task, config, mesh))
    with jax.set_mesh(mesh):
        tpu = traced.lower(lowering_platforms=("tpu",)).as_text()
        gpu = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert tpu.count("tpu_custom_call") >= 50 and gpu.count("__gpu$xla.gpu.triton") >= 50


def test_w_avg_is_updated_by_every_generator_call_of_a_step():
    """As the reference's run_G in training mode: Gmain, the path-length pass and the fakes for D each
    move w_avg toward their batch's mean w (beta 0.995). With lr 0 the mapping stays fixed, so the
    expected w_avg is three lerps computed by hand from the step's own latents."""
    config = _config(*ONE_DEVICE, "--config.optim_g.learning_rate=0.0", "--config.ada.enabled=False",
                     "--config.stylegan2.r1_gamma=0.0", "--config.data.resolution=8",  # the cheapest step to compile
                     "--config.model.generator.img_resolution=8", "--config.model.discriminator.img_resolution=8")
    task = sg.make_task(config)
    state = jax.jit(task.init)(jax.random.key(3))
    rng = jax.random.key(11)
    batch = {"image": jax.random.uniform(jax.random.key(5), (BATCH, 8, 8, 3), minval=-1.0, maxval=1.0)}
    new_state, metrics = jax.jit(task.train_step)(state, batch, rng)
    assert float(metrics["pl_lengths"]) > 0  # step 0 is a path-length step
    G = task.generator(state["G"], jax.tree.map(lambda x: x, state["G_vars"]))
    beta = float(G.mapping.w_avg_beta)
    w_avg = np.asarray(state["G_vars"]["mapping"]["w_avg"][...], np.float64)
    z_dim = task.z_dim
    # the latents of Gmain, Greg (pl_batch_shrink 2) and Dmain: keys 0, 4 and 8 of the step
    for index, n in ((0, BATCH), (4, BATCH // 2), (8, BATCH)):
        z = jax.random.normal(jax.random.fold_in(rng, index), (n, z_dim), jnp.float32)
        mean = np.asarray(G.mapping(z)[:, 0], np.float64).mean(axis=0)
        w_avg = mean + beta * (w_avg - mean)
    np.testing.assert_allclose(np.asarray(new_state["G_vars"]["mapping"]["w_avg"][...]), w_avg, rtol=1e-4, atol=1e-6)
