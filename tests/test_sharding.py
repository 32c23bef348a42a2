"""Mesh construction, FSDP / batch sharding rules, and sharded training steps on 8 CPU devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from viscoin_jax.training import loop
from viscoin_jax.training import mesh as mesh_lib
from viscoin_jax.training.config import load_config
from viscoin_jax.trainers.toy import ToyIterator, ToyTask

REPO = Path(__file__).resolve().parents[1]
TOY = str(REPO / "configs" / "toy_regression.py")


def test_eight_devices():
    assert jax.device_count() == 8, "tests/conftest.py should force 8 CPU devices"


@pytest.mark.parametrize("data, fsdp, n, expected", [
    (-1, 1, 8, (8, 1)), (1, -1, 8, (1, 8)), (2, -1, 8, (2, 4)), (-1, 2, 8, (4, 2)),
    (2, 4, 8, (2, 4)), (-1, 1, 1, (1, 1)), (3, -1, 6, (3, 2)),
])
def test_mesh_shape(data, fsdp, n, expected):
    assert mesh_lib.mesh_shape({"data": data, "fsdp": fsdp}, n) == expected


@pytest.mark.parametrize("data, fsdp, pattern", [
    (2, 2, "= 4 devices, but 8 are available"),
    (-1, -1, "at most one mesh axis may be -1"),
    (3, -1, "8 devices are not divisible by 3"),
    (0, 8, "mesh.data must be a positive int or -1"),
    (1, 2.0, "mesh.fsdp must be a positive int"),
])
def test_mesh_shape_errors(data, fsdp, pattern):
    with pytest.raises(ValueError, match=pattern):
        mesh_lib.mesh_shape({"data": data, "fsdp": fsdp}, 8)


def test_make_mesh_uses_given_devices():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": -1})
    assert mesh.axis_names == ("data", "fsdp") and dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    sub = mesh_lib.make_mesh({"data": 1, "fsdp": -1}, devices=jax.devices()[4:])
    assert dict(sub.shape) == {"data": 1, "fsdp": 4}
    assert sorted(d.id for d in sub.devices.flat) == [4, 5, 6, 7]


@pytest.mark.parametrize("shape, fsdp, min_size, expected", [
    ((64, 128), 8, 1, P(None, "fsdp")),        # the largest divisible dimension
    ((128, 64), 8, 1, P("fsdp")),
    ((3, 3, 64, 128), 4, 1, P(None, None, None, "fsdp")),
    ((3, 3, 256, 256), 4, 1, P(None, None, "fsdp")),  # ties: the earliest
    ((24, 20), 8, 1, P("fsdp")),
    ((20, 24), 8, 1, P(None, "fsdp")),
    ((24, 20), 4, 1, P("fsdp")),
    ((40, 12), 8, 1, P("fsdp")),               # 40 divisible by 8, 12 not
    ((10, 12), 8, 1, P()),                     # nothing divisible: replicated
    ((9, 7, 5), 2, 1, P()),
    ((64, 128), 8, 64 * 128 + 1, P()),         # below min_size: replicated
    ((64, 128), 8, 64 * 128, P(None, "fsdp")),  # at min_size: sharded
    ((64, 128), 1, 1, P()),                    # no fsdp axis: replicated
    ((), 8, 0, P()),                           # scalars
    ((16,), 8, 1, P("fsdp")),
])
def test_fsdp_spec(shape, fsdp, min_size, expected):
    assert mesh_lib.fsdp_spec(shape, fsdp, min_size) == expected


def test_fsdp_sharding_follows_shapes_for_optimizer_state():
    """Adam's mu/nu get the sharding of their parameter, the step count is replicated."""
    import optax
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
    params = {"w": jax.ShapeDtypeStruct((16, 40), np.float32),
              "b": jax.ShapeDtypeStruct((40,), np.float32)}
    opt = jax.eval_shape(optax.adam(1e-3).init, params)
    sh = mesh_lib.fsdp_sharding({"params": params, "opt": opt}, mesh, min_size=32)
    assert sh["params"]["w"].spec == P(None, "fsdp") and sh["params"]["b"].spec == P("fsdp")
    adam = sh["opt"][0]
    assert adam.mu["w"].spec == adam.nu["w"].spec == P(None, "fsdp")
    assert adam.mu["b"].spec == P("fsdp") and adam.count.spec == P()
    dp = mesh_lib.make_mesh({"data": 8, "fsdp": 1})
    assert all(s.spec == P() for s in jax.tree.leaves(mesh_lib.fsdp_sharding(params, dp, 1)))


@pytest.mark.parametrize("shape", [(2, 4), (8, 1), (1, 8)])
def test_make_global_batch(shape):
    mesh = mesh_lib.make_mesh({"data": shape[0], "fsdp": shape[1]})
    rng = np.random.default_rng(0)
    local = {"image": rng.standard_normal((16, 5, 3, 3)).astype(np.float32),
             "label": rng.integers(0, 10, 16).astype(np.int32)}
    batch = mesh_lib.make_global_batch(local, mesh)
    for key in local:
        arr = batch[key]
        assert arr.sharding.spec == P(("data", "fsdp")) and arr.shape == local[key].shape
        np.testing.assert_array_equal(np.asarray(arr), local[key])
        rows = set()
        for shard in arr.addressable_shards:  # every device holds 2 distinct rows
            assert shard.data.shape[0] == 2
            np.testing.assert_array_equal(np.asarray(shard.data), local[key][shard.index])
            rows.add(shard.index[0].start)
        assert len(rows) == 8
    with pytest.raises(ValueError, match="does not split over 8 devices"):
        mesh_lib.make_global_batch({"x": np.zeros((12, 2))}, mesh)
    with pytest.raises(ValueError, match="scalar"):
        mesh_lib.make_global_batch({"x": np.float32(1)}, mesh)
    with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
        mesh_lib.local_batch_size(20, mesh)


# ----------------------------------------------------------------------------------------------
# Training steps: every mesh gives the single-device result, with the parameters sharded as the
# rule says.

# toy shapes (features 12, hidden 48, 36) and their specs with fsdp_min_size = 32
EXPECTED_SPECS = {
    8: {(12, 48): P(None, "fsdp"), (48,): P("fsdp"), (48, 36): P("fsdp"), (36,): P(),
        (36, 1): P(), (1,): P()},
    4: {(12, 48): P(None, "fsdp"), (48,): P("fsdp"), (48, 36): P("fsdp"), (36,): P("fsdp"),
        (36, 1): P("fsdp"), (1,): P()},
}


def _toy_config(data, fsdp):
    return load_config(TOY, [f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
                             "--config.mesh.fsdp_min_size=32", "--config.train.batch_size=32",
                             "--config.toy.input_noise=0", "--config.toy.learning_rate=0.01"])


def _check_sharded(tree, mesh):
    fsdp = mesh.shape["fsdp"]
    for leaf in jax.tree.leaves(tree):
        expected = P() if fsdp == 1 else EXPECTED_SPECS[fsdp][leaf.shape]
        assert leaf.sharding.spec == expected, (leaf.shape, leaf.sharding.spec)
        full = np.asarray(leaf)
        devices = set()
        for shard in leaf.addressable_shards:
            local = tuple(d // fsdp if (i < len(expected) and expected[i] == "fsdp") else d
                          for i, d in enumerate(leaf.shape))
            assert shard.data.shape == local
            np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
            devices.add(shard.device)
        assert len(devices) == mesh.size


def _numpy_state(abstract, seed=0):
    """A host train state with random parameters and zero optimiser moments."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if keys[:2] == ["task", "params"]:
            return (0.3 * rng.standard_normal(x.shape)).astype(x.dtype)
        return np.zeros(x.shape, x.dtype)
    return jax.tree_util.tree_map_with_path(leaf, abstract)


def _numpy_reference(params, batches, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Adam on the tanh MLP with hand-written backprop, in float64."""
    ws = [np.asarray(p, np.float64) for p in params]  # [W0, b0, W1, b1, W2, b2]
    m = [np.zeros_like(w) for w in ws]
    v = [np.zeros_like(w) for w in ws]
    losses = []
    for t, batch in enumerate(batches, start=1):
        x, y = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
        acts, h = [x], x
        for i in range(2):
            h = np.tanh(h @ ws[2 * i] + ws[2 * i + 1])
            acts.append(h)
        pred = h @ ws[4] + ws[5]
        losses.append(np.mean((pred - y) ** 2))
        g_out = 2 * (pred - y) / pred.size
        grads = [None] * 6
        grads[4], grads[5] = acts[2].T @ g_out, g_out.sum(0)
        g = g_out @ ws[4].T
        for i in (1, 0):
            g = g * (1 - acts[i + 1] ** 2)
            grads[2 * i], grads[2 * i + 1] = acts[i].T @ g, g.sum(0)
            g = g @ ws[2 * i].T
        for i in range(6):
            m[i] = b1 * m[i] + (1 - b1) * grads[i]
            v[i] = b2 * v[i] + (1 - b2) * grads[i] ** 2
            ws[i] = ws[i] - lr * (m[i] / (1 - b1**t)) / (np.sqrt(v[i] / (1 - b2**t)) + eps)
    return ws, losses


def _ordered(params):
    layers = params["layers"]
    return [np.asarray(layers[i][name][...]) for i in range(3) for name in ("kernel", "bias")]


def test_train_step_same_on_every_mesh():
    """Two steps on one device, data parallel (8,1), FSDP (1,8) and mixed (2,4) meshes agree
    with each other to 1e-6 and with a float64 numpy Adam / backprop reference."""
    it = ToyIterator(seed=3, global_batch=32, features=12)
    batches = [next(it) for _ in range(2)]
    init_state = None
    results = {}
    for data, fsdp, devices in [(1, 1, jax.devices()[:1]), (8, 1, None), (1, 8, None),
                                (2, 4, None)]:
        task = ToyTask(_toy_config(data, fsdp))
        mesh = mesh_lib.make_mesh(task.config.mesh, devices)
        compiled = loop.compile_task(task, mesh)
        if init_state is None:
            init_state = _numpy_state(compiled.abstract_state)
        state = jax.device_put(init_state, compiled.state_shardings)
        losses = []
        for b in batches:
            state, metrics = compiled.train_step(state, mesh_lib.make_global_batch(b, mesh))
            losses.append(float(metrics["loss"]))
        assert int(state["step"]) == len(batches)
        _check_sharded(state["task"]["params"], mesh)
        _check_sharded(state["task"]["opt_state"][0].mu, mesh)
        _check_sharded(state["task"]["opt_state"][0].nu, mesh)
        results[(data, fsdp)] = (_ordered(jax.device_get(state["task"]["params"])), losses)

    ref_params, ref_losses = results[(1, 1)]
    for key, (params, losses) in results.items():
        for a, b in zip(params, ref_params):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=f"mesh {key}")
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)

    init = _ordered(init_state["task"]["params"])
    want, want_losses = _numpy_reference(init, batches, lr=0.01)
    np.testing.assert_allclose(ref_losses, want_losses, rtol=1e-5)
    for a, b, w0 in zip(ref_params, want, init):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert np.abs(b - w0).max() > 1e-3  # the steps really moved every parameter


def test_aot_compile_cpu_topology(tmp_path):
    """launch/aot_compile.py re-executes itself with 4 CPU devices and reports memory and the
    collectives of the FSDP step: parameters are all-gathered, gradients reduced."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out_json = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "aot_compile.py"), "--config", TOY + ":fsdp",
         "--topology", "cpu:4", "--json", str(out_json), "--config.train.batch_size=16"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert report["devices"] == 4 and report["mesh"] == {"data": 1, "fsdp": 4}
    # params, Adam's mu and nu, Adam's count
    assert report["state_elements"] == 3 * (12 * 48 + 48 + 48 * 36 + 36 + 36 + 1) + 1
    mem = report["memory_per_device"]
    assert mem["argument_size_in_bytes"] > 0 and mem["temp_size_in_bytes"] > 0
    # sharded params + opt state are smaller per device than the unsharded state
    assert mem["argument_size_in_bytes"] < 4 * report["state_elements"]
    assert report["collectives"]["all-gather"] >= 1
    assert report["collectives"]["all-reduce"] + report["collectives"]["reduce-scatter"] >= 1
    assert "collectives: all-reduce=" in proc.stdout


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_aot_lowers_a_pallas_training_step_for_an_accelerator_from_this_host(tmp_path, platform):
    """The StyleGAN2 step (its jits set their own mesh while tracing) lowers for cuda and tpu with the
    kernels inside the per-device regions, on every JAX we support (jax 0.12 needs an abstract GPU)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out_json = tmp_path / "aot.json"
    small = [f"--config.{k}=8" for k in ("data.resolution", "model.generator.img_resolution",
                                         "model.discriminator.img_resolution")]
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "aot_compile.py"), "--config", "stylegan2_synthetic",
         "--topology", "cpu:2", "--lowering-platform", platform, "--lower-only", "--json", str(out_json),
         "--config.model.generator.impl=pallas", "--config.model.discriminator.impl=pallas", *small],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert report["lowering_platform"] == platform and report["devices"] == 2
    assert report["kernel_calls"] >= 10  # G's and D's convolutions and filters, forward and backward


def test_aot_count_collectives():
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import aot_compile
    finally:
        sys.path.pop(0)
    hlo = """
      %all-reduce.1 = f32[8]{0} all-reduce(f32[8]{0} %x), replica_groups={}
      %ag = (f32[4]{0}, f32[16]{0}) all-gather-start(f32[4]{0} %y), dimensions={0}
      %ag.done = f32[16]{0} all-gather-done(%ag)
      %rs = f32[2]{0} reduce-scatter(f32[8]{0} %z), dimensions={0}
      %cp = f32[2]{0} collective-permute(f32[2]{0} %w)
      %not = f32[2]{0} add(f32[2]{0} %all-reduce.1, f32[2]{0} %w)
    """
    assert aot_compile.count_collectives(hlo) == {
        "all-reduce": 1, "all-gather": 1, "reduce-scatter": 1, "all-to-all": 0,
        "collective-permute": 1}
