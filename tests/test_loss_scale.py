"""Dynamic loss scaling (training/loss_scale.py) and float16 StyleGAN2 training with it: the scale
halves on an overflow and the update is skipped bit-exactly, it doubles after `period` finite
updates, scaled gradients equal float64 ones where unscaled float16 underflows, and the trainer's
scales adapt, stay finite, and round-trip a checkpoint."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from viscoin_jax.models import stylegan2 as sg_models
from viscoin_jax.training import loss_scale as ls

REPO = Path(__file__).resolve().parents[1]


def _reference_schedule(flags, initial, period, factor=2.0):
    """The scale rule by a direct loop in float64: halve (>= 1) on overflow, double after `period`
    finite updates in a row."""
    scale, good, out = float(initial), 0, []
    for finite in flags:
        if not finite:
            scale, good = max(scale / factor, 1.0), 0
        elif good + 1 >= period:
            scale, good = min(scale * factor, 2.0 ** 24), 0
        else:
            good += 1
        out.append((scale, good))
    return out


@pytest.mark.parametrize("period", [1, 3, 5])
def test_the_scale_follows_the_reference_rule_on_random_overflows(period):
    rng = np.random.default_rng(period)
    flags = rng.random(40) > 0.3
    flags[:3] = False  # early overflows, down to the floor from a small start
    state = ls.init(4.0)
    adjust = jax.jit(lambda st, f: ls.adjust(st, f, period=period))
    for (want_scale, want_good), finite in zip(_reference_schedule(flags, 4.0, period), flags):
        state = adjust(state, jnp.asarray(finite))
        assert float(state["scale"]) == want_scale and int(state["good_steps"]) == want_good
    assert state["scale"].dtype == jnp.float32 and state["good_steps"].dtype == jnp.int32
    with pytest.raises(ValueError, match="initial loss scale must be >= 1"):
        ls.init(0.5)


def _problem(seed):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(7,)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    return params, x


def test_an_injected_inf_skips_the_update_bit_exactly_and_halves_the_scale():
    params, x = _problem(0)
    tx = optax.adam(1e-2, b1=0.0, b2=0.99)
    opt = tx.init(params)
    for _ in range(2):  # a non-trivial optimiser state first
        grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
        upd, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, upd)
    grads = jax.tree.map(lambda p: jnp.sin(p) + 0.1, params)
    bad = dict(grads, w=grads["w"].at[2, 3].set(jnp.inf))
    state = ls.init(1024.0)
    finite = ls.all_finite(bad)
    assert not bool(finite) and bool(ls.all_finite(grads))
    new_params, new_opt = ls.apply_if_finite(tx, bad, opt, params, finite)
    for a, b in zip(jax.tree.leaves((new_params, new_opt)), jax.tree.leaves((params, opt))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-unchanged
    assert float(ls.adjust(state, finite)["scale"]) == 512.0
    assert float(ls.finite_norm(bad, finite)) == 0.0
    # a NaN anywhere counts too
    assert not bool(ls.all_finite(dict(grads, b=grads["b"].at[0].set(jnp.nan))))
    # finite gradients: exactly optax's own update
    ok_params, ok_opt = ls.apply_if_finite(tx, grads, opt, params, ls.all_finite(grads))
    upd, want_opt = tx.update(grads, opt, params)
    want_params = optax.apply_updates(params, upd)
    for a, b in zip(jax.tree.leaves((ok_params, ok_opt)), jax.tree.leaves((want_params, want_opt))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(float(ls.finite_norm(grads, True)),
                               np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads))),
                               rtol=1e-6)


def test_scaled_float16_gradients_match_float64_where_unscaled_ones_underflow():
    """loss = 1e-8 * sum(tanh(x @ w + b)), the tanh layer in float16: its gradients (~1e-8) underflow
    float16 unscaled; scaled by 2**14 they come back equal to numpy's float64 gradients."""
    params, x = _problem(1)

    def loss_fn(p):
        h = jnp.tanh(x.astype(jnp.float16) @ p["w"].astype(jnp.float16) + p["b"].astype(jnp.float16))
        return jnp.sum(h.astype(jnp.float32)) * 1e-8, h

    xw = np.asarray(x, np.float64) @ np.asarray(params["w"], np.float64) + np.asarray(params["b"], np.float64)
    dh = 1e-8 * (1.0 - np.tanh(xw) ** 2)
    want = {"w": np.asarray(x, np.float64).T @ dh, "b": dh.sum(0)}

    (loss, _), grads, finite = ls.value_and_grad(loss_fn, ls.init(2.0 ** 14), has_aux=True)(params)
    assert bool(finite)
    np.testing.assert_allclose(float(loss), 1e-8 * np.tanh(xw).sum(), rtol=2e-2, atol=1e-10)
    for k in want:
        assert grads[k].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(grads[k]), want[k], rtol=2e-2, atol=2e-3 * np.abs(want[k]).max())
    plain = jax.grad(lambda p: loss_fn(p)[0])(params)
    assert np.all(np.asarray(plain["w"]) == 0) and np.all(np.asarray(plain["b"]) == 0)  # unscaled: all lost
    # a scale far too large overflows float16 instead: reported, not hidden
    _, _, finite = ls.value_and_grad(lambda p: loss_fn(p)[0] * 1e8, ls.init(2.0 ** 24))(params)
    assert not bool(finite)


def test_a_float16_generator_fit_with_loss_scaling_lowers_its_loss():
    """float16 blocks, float32 master weights, a scale starting far too high: the first steps overflow
    and are skipped (loss unchanged) while the scale halves, then the loss falls and the scale grows."""
    g = sg_models.Generator(z_dim=16, w_dim=16, img_resolution=16, mapping_layers=2, num_fp16_res=2,
                            mixed_precision="float16", conv_clamp=256.0, impl="xla", rngs=nnx.Rngs(3),
                            channel_base=256, channel_max=32)
    assert g.synthesis.b16.dtype == jnp.float16
    z = jax.random.normal(jax.random.key(5), (4, 16))
    target = jax.random.uniform(jax.random.key(6), (4, 16, 16, 3), minval=-0.5, maxval=0.5)
    graphdef, params, rest = nnx.split(g, nnx.Param, ...)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    def loss_fn(params):
        return jnp.mean(jnp.square(nnx.merge(graphdef, params, rest)(z) - target))

    @jax.jit
    def step(params, opt, st):
        loss, grads, finite = ls.value_and_grad(loss_fn, st)(params)
        params, opt = ls.apply_if_finite(tx, grads, opt, params, finite)
        return params, opt, ls.adjust(st, finite, period=3), loss, finite

    st = ls.init(2.0 ** 24)
    rows = []
    for _ in range(14):
        params, opt, st, loss, finite = step(params, opt, st)
        rows.append((float(loss), bool(finite), float(st["scale"])))
    losses, flags, scales = map(np.asarray, zip(*rows))
    assert np.isfinite(losses).all() and not flags[0] and flags[-1], rows
    first_ok = int(np.argmax(flags))
    assert np.all(losses[:first_ok + 1] == losses[0])  # skipped steps changed nothing
    assert scales[first_ok - 1] == 2.0 ** 24 / 2 ** first_ok  # halved once per overflow
    assert scales[-1] > scales[first_ok]  # grew after 3 finite steps
    assert losses[-1] < 0.8 * losses[first_ok], rows
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


# -- the StyleGAN2 trainer in float16 ------------------------------------------------------------

FP16 = ["--config.model.generator.num_fp16_res=2", "--config.model.generator.mixed_precision=float16",
        "--config.model.discriminator.num_fp16_res=2", "--config.model.discriminator.mixed_precision=float16",
        "--config.stylegan2.loss_scale_initial=16777216.0", "--config.stylegan2.loss_scale_period=2"]


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    from test_train_stylegan2 import ONE_DEVICE, _config, _one_mesh
    from viscoin_jax.trainers import stylegan2 as sg
    from viscoin_jax.training.loop import run_training

    # both regularisers on every step: one compiled step variant covers all four scaled phases
    config = _config(*ONE_DEVICE, *FP16, "--config.train.num_steps=4", "--config.checkpoint.every=2",
                     "--config.stylegan2.pl_interval=1", "--config.stylegan2.r1_interval=1",
                     "--config.fid.num_samples=0")
    workdir = tmp_path_factory.mktemp("fp16")
    result = run_training(sg.make_task(config), config, workdir, mesh=_one_mesh())
    return config, workdir, result


@pytest.mark.usefixtures("persistent_compilation_cache")
def test_float16_stylegan2_trains_with_adapting_scales_and_checkpoints_them(fp16_run):
    from test_monitor import read_events, scalars_of
    from viscoin_jax.trainers import stylegan2 as sg

    config, workdir, result = fp16_run
    task_state = result.state["task"]
    assert result.step == 4
    assert result.train_metrics["pl_penalty"] > 0 and result.train_metrics["r1_penalty"] > 0
    assert np.isfinite(list(result.train_metrics.values())).all(), result.train_metrics
    events = {}
    for path in Path(workdir).rglob("events.out.tfevents.*"):
        events.update(scalars_of(read_events(path)))
    for net in ("G", "D"):
        scale = float(task_state[f"{net}_loss_scale"]["scale"])
        # started at 2**24, where float16 backward passes overflow: it must have come down
        assert 1.0 <= scale < 2.0 ** 24, (net, scale)
        logged = events[f"train/{net}_loss_scale"]  # one value a step (log_every=1)
        assert [s for s, _ in logged] == list(range(1, 5))
        assert logged[-1][1] == scale and logged[0][1] < 2.0 ** 24
    # the checkpoint holds the scales: the state loaded from the workdir has the final ones
    task, state, _ = sg.load(workdir)
    assert task.scaled == {"G": True, "D": True}
    for net in ("G", "D"):
        for key in ("scale", "good_steps"):
            np.testing.assert_array_equal(np.asarray(state[f"{net}_loss_scale"][key]),
                                          np.asarray(task_state[f"{net}_loss_scale"][key]))


@pytest.mark.usefixtures("persistent_compilation_cache")
def test_an_overflowing_float16_step_leaves_g_and_d_unchanged():
    """At scale 2**24 the first step's float16 backward passes overflow: every update of the step is
    skipped (parameters and Adam state bit-identical), each scale halves once per skipped update."""
    from test_train_stylegan2 import ONE_DEVICE, _config, _one_mesh
    from viscoin_jax.trainers import stylegan2 as sg
    from viscoin_jax.training import mesh as mesh_lib
    from viscoin_jax.training.loop import compile_task

    config = _config(*ONE_DEVICE, *FP16, "--config.stylegan2.pl_interval=0", "--config.stylegan2.r1_interval=0")
    task = sg.make_task(config)
    compiled = compile_task(task, _one_mesh())
    state = compiled.init(jax.random.key_data(jax.random.key(config.seed)))
    before = jax.device_get(state)["task"]
    batch = mesh_lib.make_global_batch(next(task.make_train_iterator(None)), compiled.mesh)
    state, metrics = compiled.train_step(state, batch, task.step_variant(0))
    after, m = jax.device_get(state)["task"], jax.device_get(metrics)
    assert np.isfinite([float(v) for v in m.values()]).all(), m
    for net in ("G", "D"):
        assert float(m[f"{net}_skipped"]) == 1.0, m
        assert float(after[f"{net}_loss_scale"]["scale"]) == 2.0 ** 23
        for a, b in zip(jax.tree.leaves((after[net], after[f"{net}_opt"])),
                        jax.tree.leaves((before[net], before[f"{net}_opt"]))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
