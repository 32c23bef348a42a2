"""VisCoIN trainer: learns on a fixed batch, the gamma term reaches Omega, f and G stay frozen,
zero concepts decode to w_avg, and a run trains, evaluates, saves and reloads through the platform."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from viscoin_jax.trainers import classifier, stylegan2, viscoin
from viscoin_jax.trainers.viscoin_losses import soft_cross_entropy

from viscoin_fixtures import make_frozen_runs, viscoin_config

pytestmark = pytest.mark.filterwarnings("ignore:config.loss.lpips_weights is empty")


@pytest.fixture(scope="module")
def frozen_runs(tmp_path_factory):
    return make_frozen_runs(tmp_path_factory.mktemp("frozen"))


def _config(frozen_runs, *overrides):
    clf, sg2, _ = frozen_runs
    return viscoin_config(clf, sg2, *overrides)


@pytest.fixture(scope="module")
def task_and_state(frozen_runs):
    """One task (f, G loaded once) and its initial state, shared by the step-level tests."""
    task = viscoin.make_task(_config(frozen_runs))
    return task, jax.jit(task.init)(jax.random.key(0))


def _images(n, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32)


def _flat(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_loss_decreases_on_a_fixed_batch(task_and_state):
    task, state = task_and_state
    batch = {"image": jnp.asarray(_images(4))}
    rng = jax.random.key(3)
    step = jax.jit(lambda s: task.train_step(s, batch, rng))
    loss = jax.jit(lambda p: task.loss(p, batch["image"], rng)[0])
    before = float(loss(state["params"]))
    for _ in range(4):
        state, metrics = step(state)
        assert np.isfinite(float(metrics["loss"]))
    assert float(loss(state["params"])) < 0.95 * before


def test_gamma_term_gradient_reaches_omega(task_and_state):
    task, state = task_and_state
    params = state["params"]
    x = jnp.asarray(_images(4, seed=1))
    rng = jax.random.key(5)
    w_on = dict(task.weights, gamma=0.1)
    w_off = dict(task.weights, gamma=0.0)

    # independent: the same images / dropout, CE(f(G(Omega(Psi(f(x))))), f(x)) written out directly
    def gamma_term(q):
        k_gen, k_drop = jax.random.split(rng)
        images = task.batch_images(x, k_gen)
        model = task.model(q)
        f_logits, feats = task._f()(images, train=False)
        phi, phi_prime = model.extractor(jax.lax.stop_gradient(feats))
        rec = task._G().synthesis(model.translator(phi, phi_prime), noise_mode="const")
        p = jax.nn.softmax(jax.lax.stop_gradient(f_logits), -1)
        return jnp.mean(-jnp.sum(p * jax.nn.log_softmax(task._f()(rec, train=False)[0], -1), -1))

    @jax.jit
    def grads(q):
        return (jax.grad(lambda r: task.loss(r, x, rng, w_on)[0])(q),
                jax.grad(lambda r: task.loss(r, x, rng, w_off)[0])(q),
                jax.grad(gamma_term)(q), gamma_term(q), task.loss(q, x, rng)[1]["reconstruction_ce"])

    g_on, g_off, g_term, term, logged = grads(params)
    for name in ("phi_kernel", "prime_kernel", "phi_bias"):
        diff = np.asarray(g_on["translator"][name][...]) - np.asarray(g_off["translator"][name][...])
        expected = 0.1 * np.asarray(g_term["translator"][name][...])
        assert np.abs(expected).max() > 1e-8, name
        # diff is a difference of two whole gradients: its rounding scales with their size
        scale = np.abs(np.asarray(g_on["translator"][name][...])).max()
        np.testing.assert_allclose(diff, expected, rtol=2e-3,
                                   atol=1e-6 * np.abs(expected).max() + 1e-6 * scale + 1e-9)
    # the term itself matches soft_cross_entropy's definition
    assert float(term) == pytest.approx(float(logged), rel=1e-5)
    assert float(soft_cross_entropy(jnp.zeros((1, 2)), jnp.zeros((1, 2)))) == pytest.approx(np.log(2))


def test_zero_concepts_decode_to_w_avg_and_functions_agree(frozen_runs, task_and_state):
    _, _, w_avg = frozen_runs
    task, state = task_and_state
    fns = viscoin.viscoin_apply(task, state)
    x = jnp.asarray(_images(3, seed=2))
    phi, phi_prime = fns.concepts_fn(x)
    ws = fns.translator_fn(jnp.zeros_like(phi), jnp.zeros_like(phi_prime))
    np.testing.assert_allclose(np.asarray(ws), np.broadcast_to(w_avg, ws.shape), rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(task.w_avg), w_avg)
    # the callables compose to the training forward pass (evaluation mode)
    out = task.forward(state["params"], x)
    np.testing.assert_allclose(np.asarray(fns.head_fn(phi)), np.asarray(out["g_logits"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(fns.synthesis_fn(fns.translator_fn(phi, phi_prime))),
                               np.asarray(out["reconstruction"]), rtol=1e-5, atol=1e-6)
    clf_task, clf_state, _ = classifier.load(frozen_runs[0])
    np.testing.assert_allclose(np.asarray(fns.classifier_fn(x)),
                               classifier.predict(clf_task, clf_state, np.asarray(x)), rtol=1e-5, atol=1e-6)
    assert fns.head_weight.shape == (8, 2)
    # eval_step's numbers against numpy on the same outputs
    labels = jnp.asarray([0, 1, 1], jnp.int32)
    ev = task.eval_step(state, {"image": x, "label": labels})
    g = np.argmax(np.asarray(out["g_logits"]), -1)
    f = np.argmax(np.asarray(out["f_logits"]), -1)
    assert float(ev["accuracy"]) == pytest.approx(np.mean(g == np.asarray(labels)))
    assert float(ev["fidelity"]) == pytest.approx(np.mean(g == f))
    assert float(ev["mse"]) == pytest.approx(np.mean((np.asarray(out["reconstruction"]) - np.asarray(x)) ** 2),
                                             rel=1e-5)


@pytest.mark.slow  # the full train() + final evaluation compiles three more programs
def test_train_freezes_f_and_g_writes_eval_and_reloads(frozen_runs, tmp_path):
    config = _config(frozen_runs, "--config.train.num_steps=2", "--config.checkpoint.every=2",
                     "--config.train.batch_size=8")  # divisible by the 8 fake devices
    clf_before = _flat(nnx.state(classifier.load(frozen_runs[0])[0].model(classifier.load(frozen_runs[0])[1])))
    result, metrics = viscoin.train(config, str(tmp_path / "v"))  # 2 steps
    assert result.step == 2
    # only the VisCoIN networks are trained: the state holds their params and Adam's moments
    task = viscoin.make_task(config)
    state = result.state["task"]
    assert set(state) == {"params", "opt_state"}
    n_model = sum(x.size for x in jax.tree.leaves(nnx.state(task.build(nnx.Rngs(0)), nnx.Param)))
    assert sum(x.size for x in jax.tree.leaves(state["params"])) == n_model
    # f and G on disk and in the task are unchanged
    clf_task, clf_state, _ = classifier.load(frozen_runs[0])
    for a, b in zip(clf_before, _flat(nnx.state(clf_task.model(clf_state)))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_flat(task.f_state), clf_before):
        np.testing.assert_array_equal(a, b)
    g_task, g_state, _ = stylegan2.load(frozen_runs[1])
    for a, b in zip(_flat(task.g_state), _flat(nnx.state(stylegan2.generator_from_state(g_task, g_state)))):
        np.testing.assert_array_equal(a, b)
    # the evaluation file
    saved = json.loads((tmp_path / "v" / "viscoin_eval.json").read_text())
    assert set(saved["faithfulness"]) == {"0.1", "0.2", "0.4"}
    assert saved["perceptual_is_lpips"] is False and "NOT LPIPS" in saved["perceptual_note"]
    assert 0.0 <= saved["accuracy"] <= 1.0 and saved["mse"] > 0 and saved["num_examples"] == 8
    # load() rebuilds the run: same parameters, metadata names the frozen runs
    loaded_task, loaded_state, loaded_cfg = viscoin.load(tmp_path / "v")
    for a, b in zip(_flat(loaded_state["params"]), _flat(state["params"])):
        np.testing.assert_array_equal(a, b)
    meta = loaded_task.model_metadata()
    assert meta["kind"] == "viscoin" and meta["generator_workdir"] == str(frozen_runs[1])
    # asked for one more step, the run resumes from its step-2 checkpoint (8 devices, sharded batch)
    more = _config(frozen_runs, "--config.train.num_steps=3", "--config.checkpoint.every=3",
                   "--config.train.batch_size=8")
    resumed, _ = viscoin.train(more, str(tmp_path / "v"))
    assert resumed.step == 3
    changed = [not np.array_equal(a, b) for a, b in zip(_flat(resumed.state["task"]["params"]), _flat(state["params"]))]
    assert any(changed)


def test_bad_configs_are_rejected(frozen_runs, tmp_path):
    with pytest.raises(ValueError, match="classifier_workdir"):
        viscoin.make_task(_config(frozen_runs, "--config.classifier_workdir="))
    with pytest.raises(ValueError, match="num_classes"):
        viscoin.make_task(_config(frozen_runs, "--config.model.num_classes=3"))
    with pytest.raises(FileNotFoundError):
        viscoin.make_task(_config(frozen_runs, f"--config.loss.lpips_weights={tmp_path / 'missing.npz'}"))


def test_evaluation_reports_faithfulness_of_the_eval_batches(task_and_state):
    """FF during training: the medians over the evaluation split, per tau, as the metric defines them."""
    from viscoin_jax.metrics.viscoin_metrics import faithfulness

    task, state = task_and_state
    got = task.host_evaluate(state)
    images = [b["image"] for b in task.make_eval_iterator()]
    fns = viscoin.viscoin_apply(task, state)
    ff = faithfulness(images, concepts_fn=fns.concepts_fn, head_fn=fns.head_fn, head_weight=fns.head_weight,
                      translator_fn=fns.translator_fn, synthesis_fn=fns.synthesis_fn, taus=(0.1, 0.2, 0.4))
    assert set(got) == {"ff_tau0.1", "ff_tau0.2", "ff_tau0.4"}
    np.testing.assert_allclose([got["ff_tau0.1"], got["ff_tau0.2"], got["ff_tau0.4"]],
                               np.median(ff.per_image, axis=1), rtol=1e-5, atol=1e-7)
    assert ff.per_image.shape[1] == sum(len(b) for b in images)
