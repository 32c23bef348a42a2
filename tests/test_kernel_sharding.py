"""The Pallas kernels under a device mesh: each device runs the kernel on its batch slice
(shard_map), values and gradients equal the unsharded XLA reference, and the sharded step lowers
for TPU (Mosaic refuses to be partitioned automatically) and GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from viscoin_jax.kernels import lowering_for, modulated_conv2d, setup_filter, upfirdn2d

FIR = setup_filter([1, 3, 3, 1])


def _mesh():
    assert jax.device_count() == 8
    return Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))


def _loss(x, w, s, impl):
    y = modulated_conv2d(x, w, s, padding=1, impl=impl)
    y = upfirdn2d(y, FIR, up=2, padding=(2, 1, 2, 1), gain=4.0, impl=impl)
    return jnp.sum(jnp.sin(y))


def _inputs(n, seed):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(n, 9, 7, 5)), jnp.float32),
            jnp.asarray(rng.normal(size=(3, 3, 5, 6)), jnp.float32),
            jnp.asarray(rng.normal(size=(n, 5)), jnp.float32))


@pytest.mark.parametrize("n", [8, 16, 6])  # 6: not divisible by the 8 devices -> replicated
def test_values_and_gradients_under_a_mesh_match_the_reference(n):
    x, w, s = _inputs(n, n)
    ref_val, ref_grads = jax.value_and_grad(_loss, argnums=(0, 1, 2))(x, w, s, "xla")
    fn = jax.jit(jax.value_and_grad(lambda x, w, s: _loss(x, w, s, "interpret"), argnums=(0, 1, 2)))
    mesh = _mesh()
    spec = NamedSharding(mesh, P(("data", "fsdp")) if n % 8 == 0 else P())
    with jax.set_mesh(mesh):
        xs, ss = jax.device_put(x, spec), jax.device_put(s, spec)
        text = fn.lower(xs, w, ss).as_text()
        val, grads = fn(xs, w, ss)
    assert "manual_computation" in text or "shard_map" in text  # the kernel ran per device
    np.testing.assert_allclose(float(val), float(ref_val), rtol=1e-5)
    for got, want in zip(grads, ref_grads):  # the weight gradient is summed over the devices
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_sharded_forward_and_backward_lower_for_accelerators(platform):
    mesh = _mesh()
    x, w, s = _inputs(16, 0)
    spec = NamedSharding(mesh, P(("data", "fsdp")))
    grad = jax.jit(jax.grad(lambda x, w, s: _loss(x, w, s, "pallas"), argnums=(0, 1, 2)),
                   in_shardings=(spec, NamedSharding(mesh, P()), spec))
    with jax.set_mesh(mesh), lowering_for(platform):
        text = grad.trace(x, w, s).lower(lowering_platforms=(platform,)).as_text()
    marker = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
    assert text.count(marker) >= 3  # forward and backward kernels, inside the per-device region


def test_nested_kernel_calls_do_not_split_the_batch_twice():
    # modulated_conv2d(up=2) runs the upfirdn2d kernel inside its own per-device region. With 8
    # images per device (divisible by the 8 devices again) a nested shard_map used to split the
    # local batch a second time, which broke the program (found by the 8-GPU AOT compile).
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(64, 4, 4, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 2)), jnp.float32)
    s = jnp.asarray(rng.normal(size=(64, 3)), jnp.float32)
    op = lambda x, w, s, impl: modulated_conv2d(x, w, s, up=2, padding=1, impl=impl)
    want = op(x, w, s, "xla")
    mesh = _mesh()
    spec = NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh):
        got = jax.jit(lambda x, w, s: op(x, w, s, "interpret"))(jax.device_put(x, spec), w, jax.device_put(s, spec))
        with lowering_for("cuda"):
            text = jax.jit(lambda x, w, s: op(x, w, s, "pallas")).trace(
                jax.device_put(x, spec), w, jax.device_put(s, spec)).lower(lowering_platforms=("cuda",)).as_text()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    assert text.count("__gpu$xla.gpu.triton") >= 2  # conv and blur kernels, both per device
