"""FID / KID: distances against closed forms and direct loops, streaming statistics, the uint8
preprocessing, the FID Inception against an independent PyTorch build of the same network (random
weights, batch-norm folded by the converter), weight-file handling and the labelled fallback."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as tnn
import torch.nn.functional as F

from viscoin_jax.convert.inception_weights import (build_with_params, convert_fid_inception,
                                                   fid_inception_params_from_torch, flatten_params,
                                                   load_fid_inception_params, load_params, save_params,
                                                   unflatten_params)
from viscoin_jax.metrics import fid as fidlib
from viscoin_jax.metrics.fid import (FeatureExtractor, FeatureStats, FIDResult, compute_fid, frechet_distance,
                                     kernel_inception_distance, make_fid_extractor)
from viscoin_jax.models.inception import (FIDInceptionV3, _avg_pool_3x3_exclude_pad, _max_pool_3x3,
                                          fid_preprocess, quantize_to_uint8_levels)


def _spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def _trace_sqrt_product(s1, s2):
    """tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), via symmetric eigendecompositions only."""
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)))


# ----------------------------------------------------------------------------- Frechet distance

def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 7
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_commuting_covariances_closed_form():
    rng = np.random.default_rng(1)
    d = 6
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_general_matches_eigen_formula_and_special_cases():
    rng = np.random.default_rng(2)
    d = 11
    s1, s2 = _spd(rng, d), _spd(rng, d, 2.0)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # identical distributions -> 0; translation only -> squared mean distance
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    assert frechet_distance(mu1, s1, mu2, s1) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-8)


def test_frechet_of_identical_samples_is_zero():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 8)) @ rng.normal(size=(8, 8))
    mu, s = x.mean(0), np.cov(x, rowvar=False)
    assert abs(frechet_distance(mu, s, mu.copy(), s.copy())) < 1e-9


def test_frechet_rank_deficient_covariances():
    # n < d sample covariances (as with few images and 2048-d features): singular, still finite and ~eigen formula
    rng = np.random.default_rng(4)
    d = 12
    x, y = rng.normal(size=(5, d)), rng.normal(size=(6, d)) + 0.5
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = frechet_distance(x.mean(0), s1, y.mean(0), s2)
    expected = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2)
    assert np.isfinite(value)
    assert value == pytest.approx(expected, rel=1e-3, abs=1e-3)


def test_frechet_eps_retry_when_sqrtm_not_finite(monkeypatch):
    rng = np.random.default_rng(5)
    d = 4
    s1, s2 = _spd(rng, d), _spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def flaky_sqrtm(a):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fidlib.scipy.linalg, "sqrtm", flaky_sqrtm)
    eps = 1e-2
    with pytest.warns(RuntimeWarning, match="singular"):
        value = frechet_distance(mu1, s1, mu2, s2, eps=eps)
    off = np.eye(d) * eps
    np.testing.assert_allclose(calls[1], (s1 + off) @ (s2 + off))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1 + off, s2 + off)
    assert value == pytest.approx(expected, rel=1e-9)


def test_frechet_bad_inputs():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="same length"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(3))
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))


# ----------------------------------------------------------------------------- KID

def _kid_loop(real, fake, num_subsets, max_subset_size, seed):
    """Direct O(m^2) loops over the subsets drawn as documented (fake rows first, then real rows)."""
    d = real.shape[1]
    m = min(len(real), len(fake), max_subset_size)
    rng = np.random.default_rng(seed)
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3  # noqa: E731
    estimates = []
    for _ in range(num_subsets):
        x = fake[rng.choice(len(fake), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
        kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
        kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
        estimates.append(kxx / (m * (m - 1)) + kyy / (m * (m - 1)) - 2 * kxy / (m * m))
    return np.mean(estimates)


@pytest.mark.parametrize("n_real,n_fake,subsets,max_size", [(7, 9, 3, 6), (8, 5, 1, 100), (13, 11, 4, 4)])
def test_kid_matches_direct_loop(n_real, n_fake, subsets, max_size):
    rng = np.random.default_rng(n_real * 100 + n_fake)
    real = rng.normal(size=(n_real, 5))
    fake = rng.normal(size=(n_fake, 5)) * 1.3 + 0.4
    got = kernel_inception_distance(real, fake, num_subsets=subsets, max_subset_size=max_size, seed=11)
    assert got == pytest.approx(_kid_loop(real, fake, subsets, max_size, 11), rel=1e-10, abs=1e-12)


def test_kid_full_set_is_permutation_invariant_and_separates():
    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(40, 3)), rng.normal(size=(40, 3)) + 2.0
    a = kernel_inception_distance(real, fake, num_subsets=1, max_subset_size=40, seed=0)
    b = kernel_inception_distance(real, fake, num_subsets=1, max_subset_size=40, seed=99)
    assert a == pytest.approx(b, rel=1e-12)  # the full sets: the draw only permutes rows
    same = kernel_inception_distance(real, rng.normal(size=(40, 3)), num_subsets=1, max_subset_size=40)
    assert a > 10 * abs(same)


def test_kid_bad_inputs():
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="same D"):
        kernel_inception_distance(np.zeros((4, 3)), np.zeros((4, 2)))


# ----------------------------------------------------------------------------- streaming statistics

def test_feature_stats_streaming_equals_batch(tmp_path):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(23, 6)) @ rng.normal(size=(6, 6)) + 1e3  # large offset: tests stable accumulation
    stats = FeatureStats(keep_features=True, extractor_name="unit")
    start = 0
    for size in (1, 7, 0, 13, 2):
        stats.update(x[start:start + size])
        start += size
    assert stats.n == 23
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-10)
    np.testing.assert_array_equal(stats.features, x)
    path = tmp_path / "stats.npz"
    stats.save(path)
    loaded = FeatureStats.load(path)
    assert loaded.n == 23 and loaded.extractor_name == "unit"
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    np.testing.assert_array_equal(loaded.features, x)


def test_feature_stats_bad_inputs(tmp_path):
    stats = FeatureStats()
    with pytest.raises(ValueError, match="no features"):
        stats.mean
    stats.update(np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        stats.cov
    with pytest.raises(ValueError, match="dimension"):
        stats.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        stats.update(np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match="not kept"):
        stats.features
    with pytest.raises(FileNotFoundError):
        FeatureStats.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="not a FeatureStats file"):
        FeatureStats.load(bad)


# ----------------------------------------------------------------------------- preprocessing

def _torch_uint8(x):
    """The usual float [-1, 1] -> uint8 conversion (StyleGAN2-ADA's), in PyTorch float32."""
    return (torch.from_numpy(x) * 127.5 + 128).clamp(0, 255).to(torch.uint8).numpy()


@pytest.mark.parametrize("jit", [False, True])
def test_quantize_like_uint8_cast(jit):
    quantize = jax.jit(quantize_to_uint8_levels) if jit else quantize_to_uint8_levels
    rng = np.random.default_rng(8)
    x = np.concatenate([rng.uniform(-1.2, 1.2, 20000), [-1.0, 1.0, 0.0, -1.0 + 1 / 127.5, 1 - 0.5 / 127.5]])
    x = x.astype(np.float32)
    ref = _torch_uint8(x).astype(np.float32)
    got = np.asarray(quantize(jnp.asarray(x)))
    # Where x * 127.5 + 128 lies within float32 rounding of an integer, a fused multiply-add (XLA may
    # contract under jit) and PyTorch's two roundings can floor to adjacent levels; nowhere else.
    exact = x.astype(np.float64) * 127.5 + 128
    at_boundary = np.abs(exact - np.round(exact)) < 1e-4
    assert np.all(got[~at_boundary] == ref[~at_boundary])
    assert np.all(np.abs(got - ref) <= 1)
    assert got.min() == 0 and got.max() == 255
    # images that came from uint8 (x = u / 127.5 - 1) get their levels back exactly
    u = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(quantize(jnp.asarray(u / np.float32(127.5) - 1))), u.astype(np.float32))
    u8 = rng.integers(0, 256, (2, 3, 3, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(quantize(jnp.asarray(u8))), u8.astype(np.float32))
    with pytest.raises(ValueError, match="dtype"):
        quantize(jnp.zeros((2, 2), jnp.int32))


@pytest.mark.parametrize("h,w", [(37, 53), (401, 333)])
def test_fid_preprocess_matches_torch_pipeline(h, w):
    rng = np.random.default_rng(h)
    x = (rng.integers(0, 256, (2, h, w, 3)) / 127.5 - 1).astype(np.float32)
    t = torch.from_numpy(_torch_uint8(x)).permute(0, 3, 1, 2).float() / 255.0
    t = 2 * F.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False) - 1
    got = np.asarray(jax.jit(fid_preprocess)(jnp.asarray(x)))
    np.testing.assert_allclose(got, t.permute(0, 2, 3, 1).numpy(), atol=2e-6)
    with pytest.raises(ValueError, match="NHWC"):
        fid_preprocess(jnp.zeros((2, 3, 8, 8)))


@pytest.mark.parametrize("h,w", [(7, 9), (8, 5)])
def test_pools_match_torch(h, w):
    x = np.random.default_rng(h).normal(size=(2, h, w, 3)).astype(np.float32)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    to_nhwc = lambda a: a.permute(0, 2, 3, 1).numpy()  # noqa: E731
    np.testing.assert_allclose(np.asarray(_avg_pool_3x3_exclude_pad(jnp.asarray(x))),
                               to_nhwc(F.avg_pool2d(t, 3, 1, 1, count_include_pad=False)), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(_max_pool_3x3(jnp.asarray(x), 1, 1)), to_nhwc(F.max_pool2d(t, 3, 1, 1)))
    np.testing.assert_array_equal(np.asarray(_max_pool_3x3(jnp.asarray(x), 2, 0)), to_nhwc(F.max_pool2d(t, 3, 2)))


# ----------------------------------------------------------------------------- the network vs PyTorch

class TConv(tnn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = tnn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = tnn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_excl(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class TA(tnn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1 = TConv(cin, 64, kernel_size=1)
        self.branch5x5_1, self.branch5x5_2 = TConv(cin, 48, kernel_size=1), TConv(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = TConv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = TConv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = TConv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = TConv(cin, pool, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_excl(x))], 1)


class TB(tnn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = TConv(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = TConv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = TConv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = TConv(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class TC(tnn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = TConv(cin, 192, kernel_size=1)
        self.branch7x7_1 = TConv(cin, c7, kernel_size=1)
        self.branch7x7_2 = TConv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = TConv(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = TConv(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = TConv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = TConv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = TConv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = TConv(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = TConv(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))))
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_excl(x))], 1)


class TD(tnn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = TConv(cin, 192, kernel_size=1), TConv(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = TConv(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = TConv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = TConv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = TConv(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class TE(tnn.Module):
    def __init__(self, cin, use_max):
        super().__init__()
        self.use_max = use_max
        self.branch1x1 = TConv(cin, 320, kernel_size=1)
        self.branch3x3_1 = TConv(cin, 384, kernel_size=1)
        self.branch3x3_2a = TConv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = TConv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = TConv(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = TConv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = TConv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = TConv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = TConv(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, 1, 1) if self.use_max else _avg_excl(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd), self.branch_pool(pooled)], 1)


class TFIDInception(tnn.Module):
    """The FID Inception in torchvision's module naming (so its state dict has the real file's keys)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = TConv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = TConv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = TConv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = TConv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = TConv(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = TA(192, 32), TA(256, 64), TA(288, 64)
        self.Mixed_6a = TB(288)
        self.Mixed_6b, self.Mixed_6c = TC(768, 128), TC(768, 160)
        self.Mixed_6d, self.Mixed_6e = TC(768, 160), TC(768, 192)
        self.Mixed_7a = TD(768)
        self.Mixed_7b, self.Mixed_7c = TE(1280, False), TE(2048, True)
        self.fc = tnn.Linear(2048, 1008)  # in the real file too; the converter must ignore it

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
        x = F.max_pool2d(x, 3, 2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        return x.mean((2, 3))


@pytest.fixture(scope="module")
def torch_inception(tmp_path_factory):
    """A random-weight torch FID Inception, its state dict as .pth, and that file converted to .npz."""
    torch.manual_seed(0)
    net = TFIDInception().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, tnn.Conv2d):
                tnn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, tnn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("inception")
    pth = folder / "pt_inception-random.pth"
    torch.save(net.state_dict(), pth)
    npz = convert_fid_inception(pth, folder / "inception.npz")
    return net, pth, npz


def test_full_fid_pipeline_matches_torch(torch_inception):
    net, _, npz = torch_inception
    extractor = make_fid_extractor(npz)
    assert extractor.comparable_with_published and extractor.name == fidlib.STANDARD_EXTRACTOR_NAME
    x = np.random.default_rng(9).uniform(-1, 1, (1, 64, 48, 3)).astype(np.float32)
    got = np.asarray(extractor(jnp.asarray(x)))
    with torch.no_grad():
        u8 = torch.from_numpy(_torch_uint8(x))
        t = F.interpolate(u8.permute(0, 3, 1, 2).float() / 255.0, size=(299, 299), mode="bilinear",
                          align_corners=False)
        ref = net(2 * t - 1).numpy()
    assert got.shape == (1, 2048) and got.dtype == np.float32
    assert np.std(ref) > 1e-2  # a non-degenerate comparison
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_pth_reading_folds_batch_norm_and_matches_converted_file(torch_inception, tmp_path):
    net, pth, npz = torch_inception
    direct = flatten_params(load_fid_inception_params(pth))  # torch.load(weights_only=True) + folding
    assert len(direct) == 2 * 94  # 94 folded convs, kernel + bias each
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    for module, ours in (("Mixed_6b.branch7x7_2", "mixed_6b/branch7x7_2"), ("Conv2d_1a_3x3", "conv2d_1a_3x3"),
                         ("Mixed_7c.branch3x3dbl_3b", "mixed_7c/branch3x3dbl_3b")):
        s = sd[module + ".bn.weight"] / np.sqrt(sd[module + ".bn.running_var"] + 1e-3)
        np.testing.assert_allclose(direct[ours + "/conv/kernel"],
                                   sd[module + ".conv.weight"].transpose(2, 3, 1, 0) * s, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(direct[ours + "/conv/bias"],
                                   sd[module + ".bn.bias"] - sd[module + ".bn.running_mean"] * s, rtol=1e-6, atol=1e-7)
    loaded = flatten_params(load_fid_inception_params(npz))
    assert loaded.keys() == direct.keys()
    for k in direct:
        np.testing.assert_array_equal(loaded[k], direct[k])
    with pytest.raises(FileExistsError):
        convert_fid_inception(pth, npz)


def test_params_save_load_roundtrip_npz_and_orbax(tmp_path):
    rng = np.random.default_rng(12)
    params = {"a": {"kernel": rng.normal(size=(3, 3, 2, 5)).astype(np.float32), "bias": np.arange(5.0)},
              "b": rng.normal(size=(7,)).astype(np.float32)}
    for out in (tmp_path / "p.npz", tmp_path / "p_orbax"):
        written = save_params(params, out)
        back = flatten_params(load_params(written))
        assert back.keys() == flatten_params(params).keys()
        for k, v in flatten_params(params).items():
            np.testing.assert_array_equal(back[k], v)
        with pytest.raises(FileExistsError):
            save_params(params, out)
        save_params({"c": np.zeros(2)}, out, overwrite=True)
        assert flatten_params(load_params(out)).keys() == {"c"}
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="Orbax"):
        load_params(tmp_path / "empty_dir")
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(ValueError, match=".npz"):
        load_params(tmp_path / "bad.npz")


def test_weight_file_errors(torch_inception, tmp_path):
    net, pth, npz = torch_inception
    with pytest.raises(FileNotFoundError):
        load_fid_inception_params(tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError):
        make_fid_extractor(tmp_path / "absent.npz")  # a missing file is an error, never a silent fallback
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="could not read"):
        load_fid_inception_params(corrupt)
    other = tmp_path / "other.pth"
    torch.save({"layer.weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not a pytorch-fid Inception"):
        load_fid_inception_params(other)
    unknown = tmp_path / "weights.h5"
    unknown.write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown weight format"):
        load_fid_inception_params(unknown)
    with pytest.raises(ValueError, match="not a pytorch-fid"):
        fid_inception_params_from_torch({})
    torchvision_like = {"fc.weight": np.zeros((1000, 2048), np.float32), "AuxLogits.fc.weight": np.zeros(1)}
    with pytest.raises(ValueError, match="not the FID Inception"):
        fid_inception_params_from_torch(torchvision_like)
    params = flatten_params(load_params(npz))
    factory = lambda: FIDInceptionV3(rngs=None)  # noqa: E731
    bias = params.pop("mixed_7c/branch_pool/conv/bias")
    with pytest.raises(ValueError, match="missing .*mixed_7c/branch_pool/conv/bias"):
        build_with_params(factory, unflatten_params(params), "test")
    params["mixed_7c/branch_pool/conv/bias"] = bias[:7]
    with pytest.raises(ValueError, match="shape"):
        build_with_params(factory, unflatten_params(params), "test")
    params["mixed_7c/branch_pool/conv/bias"] = bias
    params["extra/kernel"] = bias
    with pytest.raises(ValueError, match="unexpected .*extra/kernel"):
        build_with_params(factory, unflatten_params(params), "test")


# ----------------------------------------------------------------------------- fallback and compute_fid

def _colour_features(images):
    """A tiny deterministic 'network': per-channel mean, std and mean square of the image."""
    x = images.astype(jnp.float32)
    return jnp.concatenate([x.mean((1, 2)), x.std((1, 2)), (x ** 2).mean((1, 2))], axis=-1)


def _np_colour_features(images):
    x = np.asarray(images, np.float64)
    return np.concatenate([x.mean((1, 2)), x.std((1, 2)), (x ** 2).mean((1, 2))], axis=-1)


def test_fallback_is_labelled_and_warns():
    with pytest.warns(UserWarning, match="NOT comparable"):
        extractor = make_fid_extractor(None, fallback=jax.jit(_colour_features), fallback_name="colour-stats")
    assert extractor.name == "colour-stats" and not extractor.comparable_with_published
    with pytest.warns(UserWarning, match="random-inception-seed3"):
        random_ex = make_fid_extractor(None, seed=3)
    assert not random_ex.comparable_with_published
    with pytest.warns(UserWarning):  # feature maps from a fallback network are average-pooled
        maps_ex = make_fid_extractor(None, fallback=lambda im: jnp.stack([im, -im], -1).reshape(im.shape[:3] + (6,)))
    x = np.random.default_rng(13).uniform(-1, 1, (2, 4, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(maps_ex(x)), np.stack([x, -x], -1).reshape(2, 4, 5, 6).mean((1, 2)),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="fallback=None"):
        make_fid_extractor(None, fallback=None)
    with pytest.raises(ValueError, match="unknown fallback"):
        make_fid_extractor(None, fallback="vgg")


def test_compute_fid_with_arrays_iterables_and_generator():
    with pytest.warns(UserWarning):
        extractor = make_fid_extractor(None, fallback=jax.jit(_colour_features), fallback_name="colour-stats")
    rng = np.random.default_rng(10)
    real = rng.uniform(-1, 1, (13, 8, 8, 3)).astype(np.float32)
    fake = (0.5 * rng.uniform(-1, 1, (11, 8, 8, 3)) + 0.2).astype(np.float32)
    fr, ff = _np_colour_features(real), _np_colour_features(fake)
    expected = frechet_distance(fr.mean(0), np.cov(fr, rowvar=False), ff.mean(0), np.cov(ff, rowvar=False))
    result = compute_fid(real, fake, extractor, batch_size=4, kid=True, kid_subsets=5, kid_subset_size=6)
    assert isinstance(result, FIDResult)
    assert (result.extractor_name, result.comparable, result.n_real, result.n_fake) == ("colour-stats", False, 13, 11)
    assert result.value == pytest.approx(expected, rel=1e-4)
    assert result.kid == pytest.approx(kernel_inception_distance(fr, ff, num_subsets=5, max_subset_size=6), rel=1e-4)
    assert "NOT comparable" in str(result)

    # iterables of batch dicts, with caps on both sides
    batches = [{"image": real[i:i + 5], "label": np.zeros(5)} for i in range(0, 13, 5)]
    capped = compute_fid(batches, iter([fake[:6], fake[6:]]), extractor, n_samples=9, batch_size=4, n_real=10)
    fr10, ff9 = fr[:10], ff[:9]
    assert (capped.n_real, capped.n_fake) == (10, 9)
    assert capped.value == pytest.approx(frechet_distance(fr10.mean(0), np.cov(fr10, rowvar=False), ff9.mean(0),
                                                          np.cov(ff9, rowvar=False)), rel=1e-4)

    # a generator function: n_samples not a multiple of batch_size; reuse precomputed real stats
    def generator_fn(key, n):
        return jax.random.uniform(key, (n, 8, 8, 3), minval=-0.8, maxval=0.9)

    real_stats = fidlib.feature_stats(real, extractor, batch_size=4)
    gen = compute_fid(real_stats, generator_fn, extractor, n_samples=10, batch_size=4, seed=5)
    key = jax.random.key(5)
    imgs = np.concatenate([np.asarray(generator_fn(jax.random.fold_in(key, i), 4)) for i in range(3)])[:10]
    fg = _np_colour_features(imgs)
    assert gen.n_fake == 10 and gen.n_real == 13
    assert gen.value == pytest.approx(frechet_distance(fr.mean(0), np.cov(fr, rowvar=False), fg.mean(0),
                                                       np.cov(fg, rowvar=False)), rel=1e-4)


def test_compute_fid_bad_inputs():
    with pytest.warns(UserWarning):
        extractor = make_fid_extractor(None, fallback=_colour_features, fallback_name="colour-stats")
    real = np.zeros((4, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="n_samples is required"):
        compute_fid(real, lambda key, n: real[:n], extractor)
    other = FeatureStats(extractor_name="fid-inception-v3")
    other.update(np.ones((3, 9)))
    with pytest.raises(ValueError, match="computed with 'fid-inception-v3'"):
        compute_fid(other, real, extractor)
    with pytest.raises(ValueError, match="keep_features"):
        compute_fid(fidlib.feature_stats(real, extractor), real, extractor, kid=True)
    with pytest.raises(ValueError, match="at least 2"):
        compute_fid(real[:1], real, extractor)
    with pytest.raises(ValueError, match="'image' key"):
        compute_fid([{"img": real}], real, extractor)
    with pytest.raises(ValueError, match="NHWC"):
        extractor(jnp.zeros((2, 3, 8, 8)))
    with pytest.raises(ValueError, match="dtype"):
        extractor(jnp.zeros((2, 8, 8, 3), jnp.int32))
    bad = FeatureExtractor(lambda im: jnp.zeros((1, 4)), name="bad", comparable_with_published=False)
    with pytest.raises(ValueError, match="expected \\[N, D\\]"):
        bad(jnp.zeros((2, 8, 8, 3)))


def test_fallback_input_size_resizes_to_that_size_and_names_it():
    with pytest.warns(UserWarning, match="NOT comparable"):
        extractor = make_fid_extractor(None, seed=1, fallback_input_size=96)
    assert extractor.name == "random-inception-seed1-96px" and not extractor.comparable_with_published
    model = fidlib.random_fid_inception(1)
    x = np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    u8 = _torch_uint8(x).astype(np.float64) / 255.0
    # an independent bilinear resize (torch, half-pixel centres) to 96 px, then the network
    t = F.interpolate(torch.from_numpy(u8).permute(0, 3, 1, 2), size=(96, 96), mode="bilinear", align_corners=False)
    ref = np.asarray(model(jnp.asarray(2 * t.permute(0, 2, 3, 1).numpy() - 1, jnp.float32)))
    np.testing.assert_allclose(np.asarray(extractor(jnp.asarray(x))), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    with pytest.raises(ValueError, match="at least 75 px"):
        fidlib.inception_extractor(model, name="x", comparable_with_published=False, input_size=64)
