"""i-ResNet: squeeze, spectral normalisation against dense operator norms, branch Lipschitz constants
estimated independently (Jacobian power iteration with jvp/vjp), exact inversion, convergence
reporting, training-mode power iteration, ActNorm data init, input checks.

Models are filled with numpy random parameters (random init through jax.random compiles one kernel
per shape, slow on CPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.sparse.linalg import svds

from viscoin_jax.models.iresnet import ActNorm, IResNet, squeeze, unsqueeze

IN_SHAPE = (8, 12, 3)  # init squeeze -> 4x6x12, padded to 16; stage 2: 2x3x64
COEFF = 0.9


def numpy_iresnet(seed=0, kernel_gain=1.0, **kwargs):
    kwargs = {"blocks_per_stage": (2, 1), "channels": 16, "coeff": COEFF, **kwargs}
    graphdef, state = nnx.split(nnx.eval_shape(lambda: IResNet(IN_SHAPE, 5, rngs=nnx.Rngs(0), **kwargs)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            v = kernel_gain * rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif name == "u":
            v = rng.standard_normal(leaf.shape)
        elif name in ("scale", "var"):
            v = 0.5 + rng.random(leaf.shape)
        else:  # biases, ActNorm log-scales, BN means
            v = 0.1 * rng.standard_normal(leaf.shape)
        return jnp.asarray(v, jnp.float32)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def _images(seed, n=3):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, *IN_SHAPE)), jnp.float32)


def dense_conv_matrix(kernel, h, w):
    """The zero-padded stride-1 "SAME" cross-correlation as an explicit [h w Cout, h w Cin] matrix."""
    kernel = np.asarray(kernel, np.float64)
    kh, kw, cin, cout = kernel.shape
    m = np.zeros((h, w, cout, h, w, cin))
    for i in range(h):
        for j in range(w):
            for di in range(kh):
                for dj in range(kw):
                    ii, jj = i + di - kh // 2, j + dj - kw // 2
                    if 0 <= ii < h and 0 <= jj < w:
                        m[i, j, :, ii, jj, :] += kernel[di, dj].T
    return m.reshape(h * w * cout, h * w * cin)


def operator_norm(kernel, h, w):
    """Largest singular value of the dense operator (Lanczos, float64; a full LAPACK SVD crawls
    when its threads compete on a busy CPU)."""
    m = dense_conv_matrix(kernel, h, w)
    return float(svds(m, k=1, return_singular_vectors=False, tol=1e-12)[0])


def _block_spatial(model):
    """(block, (h, w)) for every block."""
    out = []
    h, w = IN_SHAPE[0] // 2, IN_SHAPE[1] // 2
    for s, stage in enumerate(model.stages):
        if s > 0:
            h, w = h // 2, w // 2
        out.extend((b, (h, w)) for b in stage)
    return out


def _conv(x, kernel, bias):
    k = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((k, k), (k, k)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias


def branch_reference(params, x):
    """F written out here: ELU -> conv3x3 -> ELU -> conv1x1 -> ELU -> conv3x3 (preactivation on)."""
    (k1, b1), (k2, b2), (k3, b3) = params
    h = jax.nn.elu(_conv(jax.nn.elu(x), k1, b1))
    return _conv(jax.nn.elu(_conv(h, k2, b2)), k3, b3)


@jax.jit
def _jacobian_norm(params, x, v0):
    """Largest singular value of F's Jacobian at x by power iteration on J^T J (jvp / vjp)."""
    fn = lambda t: branch_reference(params, t)  # noqa: E731
    v = v0 / jnp.linalg.norm(v0)

    def step(_, v):
        _, jv = jax.jvp(fn, (x,), (v,))
        _, vjp = jax.vjp(fn, x)
        (jtjv,) = vjp(jv)
        return jtjv / jnp.linalg.norm(jtjv)

    v = jax.lax.fori_loop(0, 200, step, v)
    return jnp.linalg.norm(jax.jvp(fn, (x,), (v,))[1])


def test_squeeze_matches_numpy_and_inverts():
    x = np.random.default_rng(0).standard_normal((2, 6, 4, 3)).astype(np.float32)
    ref = np.zeros((2, 3, 2, 12), np.float32)
    for i in range(3):
        for j in range(2):
            for dy in range(2):
                for dx in range(2):
                    ref[:, i, j, (2 * dy + dx) * 3:(2 * dy + dx + 1) * 3] = x[:, 2 * i + dy, 2 * j + dx, :]
    np.testing.assert_array_equal(squeeze(jnp.asarray(x)), ref)
    np.testing.assert_array_equal(unsqueeze(squeeze(jnp.asarray(x))), x)
    np.testing.assert_array_equal(squeeze(unsqueeze(jnp.asarray(ref))), ref)
    with pytest.raises(ValueError, match="even height and width"):
        squeeze(jnp.zeros((1, 3, 4, 2)))
    with pytest.raises(ValueError, match="divisible by 4"):
        unsqueeze(jnp.zeros((1, 2, 2, 6)))


@pytest.fixture(scope="module")
def converged_model():
    """Kernels mostly above the bound (gain 2), one well below it, power iterations converged."""
    model = numpy_iresnet(1, kernel_gain=2.0)
    small = model.stages[0][1].conv2
    small.kernel[...] = small.kernel[...] * 0.05
    model.update_spectral_norms(300)
    return model


def test_spectral_norm_against_dense_operator_norms(converged_model):
    model = converged_model
    small = model.stages[0][1].conv2  # already well below coeff: must be left unscaled
    n_scaled = 0
    for block, (h, w) in _block_spatial(model):
        for conv in block.convs:
            true_sigma = operator_norm(conv.kernel[...], h, w)
            np.testing.assert_allclose(conv.sigma(), true_sigma, rtol=2e-3)
            applied = np.asarray(conv.normalized_kernel())
            applied_sigma = operator_norm(applied, h, w)
            if true_sigma > COEFF:
                n_scaled += 1
                np.testing.assert_allclose(applied_sigma, COEFF, rtol=2e-3)
                np.testing.assert_allclose(applied, np.asarray(conv.kernel[...]) * COEFF / conv.sigma(), rtol=1e-5)
            else:
                np.testing.assert_array_equal(applied, conv.kernel[...])
    assert n_scaled == len(model.sn_convs()) - 1
    assert operator_norm(small.kernel[...], 4, 6) < COEFF


def test_branch_lipschitz_below_one(converged_model):
    model = converged_model
    rng = np.random.default_rng(2)
    bound = COEFF ** 3  # three convs of norm <= coeff, ELU is 1-Lipschitz
    for block, (h, w) in _block_spatial(model):
        params = block.branch_params()
        c = block.conv1.kernel.shape[2]
        for _ in range(2):
            x = jnp.asarray(2 * rng.standard_normal((1, h, w, c)), jnp.float32)
            np.testing.assert_allclose(branch_reference(params, x), block.residual(x), rtol=1e-5, atol=1e-6)
            lip = float(_jacobian_norm(params, x, jnp.asarray(rng.standard_normal(x.shape), jnp.float32)))
            assert 1e-3 < lip <= bound * (1 + 1e-3)
            y = x + jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32)  # secant check
            ratio = np.linalg.norm(block.residual(x) - block.residual(y)) / np.linalg.norm(x - y)
            assert ratio <= bound * (1 + 1e-3)


_forward = nnx.jit(lambda m, x: m.forward(x))
_inverse = nnx.jit(lambda m, z, max_iter: m.inverse(z, tol=1e-5, max_iter=max_iter))


def test_inverse_reconstructs_and_reports_convergence(converged_model):
    model = converged_model
    x = _images(3, n=4)
    z = _forward(model, x)
    assert z.shape == (4, 2, 3, 64) and model.z_shape == (2, 3, 64)
    x_rec, info = _inverse(model, z, 100)
    rel = np.linalg.norm(np.asarray(x_rec) - np.asarray(x)) / np.linalg.norm(x)
    assert rel < 1e-4
    assert info["converged"].shape == (4,) and bool(np.all(info["converged"]))
    assert np.all(np.asarray(info["iterations"]) >= 3)  # at least one step per block
    assert np.all(np.asarray(info["max_residual"]) <= 1e-5)

    # one step per block cannot converge, and says so
    x1, info1 = _inverse(model, z, 1)
    assert not bool(np.any(info1["converged"]))
    np.testing.assert_array_equal(info1["iterations"], 3)
    assert np.all(np.asarray(info1["max_residual"]) > 1e-5)
    assert np.linalg.norm(np.asarray(x1) - np.asarray(x)) / np.linalg.norm(x) > 1e-3

    # head: BN (running stats) -> ReLU -> mean -> linear, against numpy
    bn = model.head_bn
    hz = (np.asarray(z) - np.asarray(bn.mean[...])) / np.sqrt(np.asarray(bn.var[...]) + 1e-5)
    hz = np.maximum(hz * np.asarray(bn.scale[...]) + np.asarray(bn.bias[...]), 0).mean(axis=(1, 2))
    ref = hz @ np.asarray(model.head_fc.kernel[...]) + np.asarray(model.head_fc.bias[...])
    np.testing.assert_allclose(model.head(z), ref, rtol=1e-4, atol=1e-5)


def test_train_mode_advances_power_iteration_and_gives_finite_grads():
    model = numpy_iresnet(4, kernel_gain=2.0)
    before = np.array([float(c.sigma()) for c in model.sn_convs()])
    u_before = np.asarray(model.stages[1][0].conv1.u[...]).copy()
    head_mean = np.asarray(model.head_bn.mean[...]).copy()
    x, y = _images(4, n=4), jnp.asarray([0, 1, 2, 3])

    @nnx.jit
    def step(m, x, y):
        def loss_fn(m):
            logits = m(x, train=True)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

        return nnx.value_and_grad(loss_fn)(m)

    loss, grads = step(model, x, y)
    after = np.array([float(c.sigma()) for c in model.sn_convs()])
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    assert np.abs(np.asarray(nnx.to_pure_dict(grads)["stages"][0][0]["conv1"]["kernel"])).sum() > 0
    # power iteration only increases the Rayleigh estimate ||A u|| towards the true norm
    assert np.all(after >= before * (1 - 1e-5)) and np.any(after > before * 1.01)
    assert not np.allclose(model.stages[1][0].conv1.u[...], u_before)
    assert not np.allclose(model.head_bn.mean[...], head_mean)
    # u is state, not a trained parameter
    assert "u" not in nnx.to_pure_dict(nnx.state(model.stages[0][0].conv1, nnx.Param))


def test_actnorm_data_init_and_inverse():
    an = ActNorm(4)
    x = jnp.asarray(np.random.default_rng(5).normal(3.0, 2.0, (8, 3, 3, 4)), jnp.float32)
    an.initialize(x)
    y = np.asarray(an(x))
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(axis=(0, 1, 2)), 1, rtol=1e-4)
    np.testing.assert_allclose(an.inverse(an(x)), x, rtol=1e-5, atol=1e-5)

    model = numpy_iresnet(6)
    x = _images(6, n=4)
    model.initialize_actnorm(x)
    h = squeeze(x)
    h = jnp.pad(h, ((0, 0), (0, 0), (0, 0), (0, 4)))
    first = np.asarray(model.stages[0][0].actnorm(h))
    np.testing.assert_allclose(first[..., :12].std(axis=(0, 1, 2)), 1, rtol=1e-3)
    np.testing.assert_allclose(first.mean(axis=(0, 1, 2)), 0, atol=1e-4)
    # the zero-padded channels have no spread: they stay 0 with scale 1 (not 1 / eps)
    np.testing.assert_array_equal(first[..., 12:], 0)
    np.testing.assert_array_equal(model.stages[0][0].actnorm.log_scale[...][12:], 0)
    # the second block's ActNorm was initialised on the first block's output
    second = np.asarray(model.stages[0][1].actnorm(model.stages[0][0](h)))
    np.testing.assert_allclose(second.std(axis=(0, 1, 2)), 1, rtol=1e-3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="divisible by 2\\*\\*2"):
        IResNet((6, 8, 3), 2, blocks_per_stage=(1, 1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="zero padding cannot shrink"):
        IResNet((8, 8, 3), 2, blocks_per_stage=(1,), channels=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="coeff"):
        IResNet((8, 8, 3), 2, blocks_per_stage=(1,), coeff=1.0, rngs=nnx.Rngs(0))
    model = numpy_iresnet(0)
    with pytest.raises(ValueError, match=r"i-ResNet input must have shape \[N, 8, 12, 3\]"):
        model.forward(jnp.zeros((1, 12, 8, 3)))
    with pytest.raises(ValueError, match=r"z must have shape \[N, 2, 3, 64\]"):
        model.inverse(jnp.zeros((1, 2, 3, 16)))
    with pytest.raises(ValueError, match="max_iter"):
        model.inverse(jnp.zeros((1, 2, 3, 64)), max_iter=0)
