"""VisCoIN networks: extractor against a torch re-implementation, head / relevance against numpy,
translator init (zero concepts -> w_avg), routing and values, container jit / eager / gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from viscoin_jax.models.stylegan2 import SynthesisNetwork
from viscoin_jax.models.viscoin import (
    ConceptExtractor,
    ConceptTranslator,
    InterpretableHead,
    VisCoIN,
    adaptive_avg_pool,
    branch_conv_geometry,
    concept_relevance,
    default_prime_split,
)


def numpy_fill(factory, seed=0):
    """Build `factory()` abstractly and fill it with numpy random values (no jax.random compiles)."""
    graphdef, state = nnx.split(nnx.eval_shape(factory))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # dropout stream
            return jax.random.key(seed)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):  # stream counters
            return jnp.zeros(leaf.shape, leaf.dtype)
        if path[-1].key.endswith("kernel"):
            v = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        else:
            v = 0.1 * rng.standard_normal(leaf.shape)
        return jnp.asarray(v, leaf.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def _rand(seed, shape, low=-1.0, high=1.0):
    return jnp.asarray(np.random.default_rng(seed).uniform(low, high, shape), jnp.float32)


def test_branch_geometry_and_adaptive_pool():
    # ResNet-50 at 256 px: the paper's k5/s4, k3/s2, k3/s1 onto the 8x8 grid
    assert [branch_conv_geometry(s, 8) for s in (32, 16, 8)] == [(5, 4, 2), (3, 2, 1), (3, 1, 1)]
    for size, target in [(32, 8), (16, 8), (8, 8), (9, 3), (15, 3), (12, 2), (7, 7)]:
        k, s, p = branch_conv_geometry(size, target)
        assert (size + 2 * p - k) // s + 1 == target and k >= s
    with pytest.raises(ValueError, match="multiple of 3"):
        branch_conv_geometry(10, 3)
    # torch's adaptive bins (overlapping for 8 -> 3, 4 -> 3)
    x = _rand(0, (2, 8, 5, 3))
    ref = nn.functional.adaptive_avg_pool2d(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2), (3, 3))
    np.testing.assert_allclose(adaptive_avg_pool(x, (3, 3)), ref.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)


class TorchExtractor(nn.Module):
    """The extractor written with torch.nn (NCHW), weights copied from the JAX model."""

    def __init__(self, jax_model: ConceptExtractor):
        super().__init__()
        convs = []
        for conv in jax_model.branches:
            convs.append(self._conv(conv))
        self.branches = nn.ModuleList(convs)
        self.mix = self._conv(jax_model.mix)
        self.concept = self._conv(jax_model.concept_conv)
        g = jax_model.concept_grid
        self.g = g
        k1 = np.asarray(jax_model.fc1.kernel[...])  # [(h g + w) C + c, out] -> torch [out, c g g + h g + w]
        c = k1.shape[0] // (g * g)
        self.fc1 = nn.Linear(k1.shape[0], k1.shape[1])
        self.fc2 = nn.Linear(*jax_model.fc2.kernel.shape)
        with torch.no_grad():
            w1 = k1.reshape(g, g, c, -1).transpose(3, 2, 0, 1).reshape(k1.shape[1], -1)
            self.fc1.weight.copy_(torch.from_numpy(w1.copy()))
            self.fc1.bias.copy_(torch.from_numpy(np.array(jax_model.fc1.bias[...])))
            self.fc2.weight.copy_(torch.from_numpy(np.array(jax_model.fc2.kernel[...]).T))
            self.fc2.bias.copy_(torch.from_numpy(np.array(jax_model.fc2.bias[...])))

    @staticmethod
    def _conv(conv):
        k = np.asarray(conv.kernel[...])
        if isinstance(conv.padding, str):  # "SAME" on the 1x1 concept conv
            assert k.shape[:2] == (1, 1)
            pad = (0, 0)
        else:
            pad = tuple(p[0] for p in conv.padding)
            assert all(p[0] == p[1] for p in conv.padding)
        stride = conv.strides if isinstance(conv.strides, tuple) else (1, 1)
        m = nn.Conv2d(k.shape[2], k.shape[3], k.shape[:2], stride=stride, padding=pad)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
            m.bias.copy_(torch.from_numpy(np.array(conv.bias[...])))
        return m

    def forward(self, maps):
        x = torch.cat([torch.relu(conv(m)) for conv, m in zip(self.branches, maps)], 1)
        x = torch.relu(self.mix(x))
        phi = nn.functional.adaptive_avg_pool2d(torch.relu(self.concept(x)), self.g)
        pooled = nn.functional.adaptive_avg_pool2d(x, self.g).flatten(1)
        return phi, torch.relu(self.fc2(torch.relu(self.fc1(pooled))))


@pytest.mark.parametrize("sizes,grid", [((16, 8, 4), 3), (((12, 9), (6, 3), (3, 3)), 2)])
def test_extractor_matches_torch(sizes, grid):
    chans = (6, 10, 12)
    model = numpy_fill(lambda: ConceptExtractor(5, chans, sizes, branch_channels=4, concept_grid=grid,
                                                rngs=nnx.Rngs(0)), seed=1)
    sizes2 = [(s, s) if isinstance(s, int) else s for s in sizes]
    maps = [_rand(10 + i, (3, h, w, c)) for i, ((h, w), c) in enumerate(zip(sizes2, chans))]
    phi, phi_prime = model(maps)
    assert phi.shape == (3, grid, grid, 5) and phi_prime.shape == (3, grid * grid * 5)
    assert model.concept_kernel.shape == (1, 1, 12, 5)
    with torch.no_grad():
        tphi, tprime = TorchExtractor(model)([torch.from_numpy(np.array(m)).permute(0, 3, 1, 2) for m in maps])
    np.testing.assert_allclose(phi, tphi.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(phi_prime, tprime.numpy(), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(phi)) > 0 and float(jnp.max(phi_prime)) > 0  # ReLU outputs are not all dead
    # a ResNet feature dict works too
    phi2, _ = model({"stage2": maps[0], "stage3": maps[1], "stage4_penultimate": maps[2], "stage4": maps[2]})
    np.testing.assert_array_equal(phi2, phi)


def test_head_matches_numpy_and_dropout_only_in_training():
    head = numpy_fill(lambda: InterpretableHead(6, 4, dropout=0.5, rngs=nnx.Rngs(0)), seed=2)
    phi = _rand(3, (5, 3, 3, 6), 0.0, 2.0)
    w, b = np.asarray(head.weight), np.asarray(head.linear.bias[...])
    ref = np.asarray(phi, np.float64).max(axis=(1, 2)) @ w + b
    np.testing.assert_allclose(head(phi), ref, rtol=1e-5, atol=1e-6)
    with jax.threefry_partitionable(False):
        train_out = head(phi, train=True)
    assert not np.allclose(train_out, ref, atol=1e-3)
    with pytest.raises(ValueError, match="phi has 5 concepts, the head expects 6"):
        head(jnp.zeros((1, 3, 3, 5)))


def test_concept_relevance_matches_numpy():
    rng = np.random.default_rng(4)
    phi = rng.uniform(0, 1, (4, 3, 3, 7)).astype(np.float32)
    phi[2] = 0.0  # an image with no active concept: relevance 0, not NaN
    w = rng.standard_normal((7, 5)).astype(np.float32)
    classes = np.array([0, 4, 2, 3])
    r = np.asarray(concept_relevance(jnp.asarray(phi), jnp.asarray(w), jnp.asarray(classes)))
    for n in range(4):
        alpha = phi[n].max(axis=(0, 1)).astype(np.float64) * w[:, classes[n]]
        ref = alpha / np.abs(alpha).max() if np.abs(alpha).max() > 0 else np.zeros(7)
        np.testing.assert_allclose(r[n], ref, rtol=1e-5, atol=1e-7)
    assert np.all(r[2] == 0) and np.all(np.abs(r) <= 1 + 1e-6)
    assert np.allclose(np.abs(r[[0, 1, 3]]).max(axis=1), 1)
    # one class for all, and under jit
    r_all = jax.jit(concept_relevance)(jnp.asarray(phi), jnp.asarray(w), 3)
    np.testing.assert_allclose(r_all[3], r[3], rtol=1e-6)
    with pytest.raises(ValueError, match=r"lie in \[0, 5\)"):
        concept_relevance(jnp.asarray(phi), jnp.asarray(w), 5)
    with pytest.raises(ValueError, match="head_weight must be"):
        concept_relevance(jnp.asarray(phi), jnp.asarray(w.T), 0)


def test_translator_init_zero_concepts_give_w_avg_and_routing():
    k, num_ws, w_dim = 4, 8, 16
    w_avg = _rand(5, (w_dim,), -2.0, 2.0)
    with jax.threefry_partitionable(False):  # same semantics, much faster to compile on CPU
        # the real initialisation, with the paper's 256 px layout of 3 + middle + 2
        tr = ConceptTranslator(k, num_ws, w_dim, w_avg, prime_split=(3, 2), rngs=nnx.Rngs(0))
    d = 9 * k
    assert tr.routing == ("phi_prime",) * 3 + ("phi",) * 3 + ("phi_prime",) * 2
    np.testing.assert_array_equal(tr.prime_bias[...], 0)
    np.testing.assert_array_equal(tr.phi_bias[...], 0)
    std = np.std(np.concatenate([np.ravel(tr.prime_kernel[...]), np.ravel(tr.phi_kernel[...])]))
    assert 0.8 * 0.1 / np.sqrt(d) < std < 1.2 * 0.1 / np.sqrt(d)  # small weights

    ws0 = tr(jnp.zeros((2, 3, 3, k)), jnp.zeros((2, d)))
    assert ws0.shape == (2, num_ws, w_dim)
    np.testing.assert_array_equal(ws0, np.broadcast_to(np.asarray(w_avg), (2, num_ws, w_dim)))

    # values against numpy, one affine map per W+ vector
    tr.prime_bias[...] = _rand(6, tr.prime_bias.shape)
    tr.phi_bias[...] = _rand(7, tr.phi_bias.shape)
    phi, prime = _rand(8, (3, 3, 3, k), 0, 1), _rand(9, (3, d), 0, 1)
    ws = np.asarray(tr(phi, prime))
    pk, pb = np.asarray(tr.prime_kernel[...], np.float64), np.asarray(tr.prime_bias[...], np.float64)
    mk, mb = np.asarray(tr.phi_kernel[...], np.float64), np.asarray(tr.phi_bias[...], np.float64)
    flat_phi = np.asarray(phi, np.float64).reshape(3, -1)
    prime64 = np.asarray(prime, np.float64)
    for j in range(num_ws):
        if j < 3:
            ref = prime64 @ pk[j] + pb[j]
        elif j >= num_ws - 2:
            ref = prime64 @ pk[j - num_ws + 5] + pb[j - num_ws + 5]
        else:
            ref = flat_phi @ mk[j - 3] + mb[j - 3]
        np.testing.assert_allclose(ws[:, j], ref + np.asarray(w_avg), rtol=1e-5, atol=1e-5)

    # perturbing phi_prime moves only ws[0:3] and ws[-2:]; phi only the middle
    d_prime = np.abs(np.asarray(tr(phi, prime + _rand(10, prime.shape))) - ws).max(axis=(0, 2))
    d_phi = np.abs(np.asarray(tr(phi + _rand(11, phi.shape), prime)) - ws).max(axis=(0, 2))
    prime_rows = np.array([True] * 3 + [False] * 3 + [True] * 2)
    assert np.all(d_prime[prime_rows] > 1e-4) and np.all(d_prime[~prime_rows] == 0)
    assert np.all(d_phi[~prime_rows] > 1e-4) and np.all(d_phi[prime_rows] == 0)


def _ws_readers(resolution):
    """Resolutions of the layers reading each W+ vector, walked from a real synthesis network the
    way its forward pass slices ws (conv layers, then the toRGB that shares the next conv's vector)."""
    synth = nnx.eval_shape(lambda: SynthesisNetwork(8, resolution, 3, channel_base=8 * resolution, channel_max=8,
                                                    rngs=nnx.Rngs(0)))
    readers = [[] for _ in range(synth.num_ws)]
    w_idx = 0
    for res in synth.block_resolutions:
        block = getattr(synth, f"b{res}")
        for j in range(block.num_conv + block.num_torgb):
            readers[w_idx + j].append(res)
        w_idx += block.num_conv
    return synth.num_ws, readers


@pytest.mark.parametrize("resolution", [8, 16, 32, 64, 128, 256, 512, 1024])
def test_default_routing_is_the_papers_split_by_relative_resolution(resolution):
    num_ws, readers = _ws_readers(resolution)
    # the paper at 256 px: phi_prime feeds the vectors read only by layers at <= 8 px (1/32 of the side)
    # and those read only by the final block
    first = 0
    while max(readers[first]) * 32 <= resolution:
        first += 1
    last = 0
    while min(readers[num_ws - 1 - last]) == resolution:
        last += 1
    assert default_prime_split(num_ws) == (first, last)
    if resolution == 256:
        assert (first, last) == (3, 2)
    tr = nnx.eval_shape(lambda: ConceptTranslator(2, num_ws, 8, jnp.zeros(8), rngs=nnx.Rngs(0)))
    assert tr.routing == ("phi_prime",) * first + ("phi",) * (num_ws - first - last) + ("phi_prime",) * last


def test_translator_routing_errors():
    with pytest.raises(ValueError, match="besides the final block"):
        default_prime_split(2)  # a 4 px generator: both vectors belong to the final block
    with pytest.raises(ValueError, match="even number"):
        default_prime_split(7)
    tr = nnx.eval_shape(lambda: ConceptTranslator(2, 14, 8, jnp.zeros(8), prime_split=(4, 0), rngs=nnx.Rngs(0)))
    assert tr.routing == ("phi_prime",) * 4 + ("phi",) * 10
    tr = nnx.eval_shape(lambda: ConceptTranslator(2, 5, 8, jnp.zeros(8), prime_split=(1, 1), rngs=nnx.Rngs(0)))
    assert tr.routing == ("phi_prime", "phi", "phi", "phi", "phi_prime")
    with pytest.raises(ValueError, match="leaves no W\\+ vector"):
        ConceptTranslator(2, 5, 8, jnp.zeros(8), prime_split=(3, 2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="feeds no W\\+ vector from phi_prime"):
        ConceptTranslator(2, 8, 8, jnp.zeros(8), prime_split=(0, 0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"w_avg must have shape \(8,\)"):
        ConceptTranslator(2, 8, 8, jnp.zeros(7), rngs=nnx.Rngs(0))


def _small_viscoin(seed=0, dropout=0.0):
    return numpy_fill(lambda: VisCoIN(4, 3, 6, 8, jnp.zeros(8), in_channels=(6, 8, 10), feature_sizes=(16, 8, 4),
                                      branch_channels=4, dropout=dropout, rngs=nnx.Rngs(0)), seed)


def _features(seed, n=2):
    return {"stage2": _rand(seed, (n, 16, 16, 6), 0, 1), "stage3": _rand(seed + 1, (n, 8, 8, 8), 0, 1),
            "stage4_penultimate": _rand(seed + 2, (n, 4, 4, 10), 0, 1)}


def test_viscoin_container_jit_eager_and_gradients():
    model = _small_viscoin(1)
    feats = _features(20)
    out = model(feats)
    phi, phi_prime = model.extractor(feats)
    np.testing.assert_array_equal(out["phi"], phi)
    np.testing.assert_array_equal(out["logits"], model.head(phi))
    np.testing.assert_array_equal(out["ws"], model.translator(phi, phi_prime))
    assert out["ws"].shape == (2, 6, 8) and out["logits"].shape == (2, 3)

    jitted = nnx.jit(lambda m, f: m(f))(model, feats)
    for key in out:
        np.testing.assert_allclose(jitted[key], out[key], rtol=1e-5, atol=1e-6)

    def loss_fn(m):
        o = m(feats, train=True)
        return jnp.sum(o["logits"] ** 2) + jnp.sum(o["ws"] ** 2) + jnp.sum(o["phi"])

    grads = nnx.jit(lambda m: nnx.grad(loss_fn)(m))(model)
    leaves = jax.tree_util.tree_leaves(grads)
    assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
    pure = nnx.to_pure_dict(grads)
    assert np.abs(np.asarray(pure["extractor"]["concept_conv"]["kernel"])).sum() > 0
    assert "w_avg" not in pure["translator"]  # w_avg is frozen state, not a parameter


def test_viscoin_bad_inputs():
    model = _small_viscoin(2)
    feats = _features(30)
    with pytest.raises(ValueError, match="lack \\['stage3'\\]"):
        model({k: v for k, v in feats.items() if k != "stage3"})
    with pytest.raises(ValueError, match=r"feature map 1 must be \[N, 8, 8, 8\]"):
        model({**feats, "stage3": jnp.zeros((2, 8, 8, 9))})
    with pytest.raises(ValueError, match="different batch sizes"):
        model({**feats, "stage3": jnp.zeros((3, 8, 8, 8))})
    with pytest.raises(ValueError, match="multiple of 4"):
        ConceptExtractor(4, (6, 8, 10), (18, 8, 4), branch_channels=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"phi_prime must be \[2, 36\]"):
        model.translator(jnp.zeros((2, 3, 3, 4)), jnp.zeros((2, 35)))
