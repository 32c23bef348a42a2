"""LPIPS-VGG against an independent PyTorch implementation (random weights, 24x24 images), its
properties, weight files, use under jit/grad, and the labelled fallback perceptual loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as tnn
from flax import nnx

from viscoin_jax.convert.inception_weights import flatten_params, load_params
from viscoin_jax.convert.lpips_weights import convert_lpips_vgg, load_lpips_params
from viscoin_jax.metrics.lpips import (LPIPS, FeaturePerceptualLoss, load_lpips, lpips_distance,
                                       make_perceptual_loss, unit_normalize)
from viscoin_jax.models.vgg import VGG16Features

# torchvision's vgg16 "D" configuration: conv widths, "M" = 2x2 max-pool
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class TVGG(tnn.Module):
    """torchvision's VGG16 layout (only `features`), so the state dict has `features.{i}.*` keys."""

    def __init__(self):
        super().__init__()
        layers, cin = [], 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(tnn.MaxPool2d(2, 2))
            else:
                layers += [tnn.Conv2d(cin, v, 3, padding=1), tnn.ReLU(inplace=False)]
                cin = v
        self.features = tnn.Sequential(*layers)


class TLin(tnn.Module):
    def __init__(self, c):
        super().__init__()
        self.model = tnn.Sequential(tnn.Dropout(), tnn.Conv2d(c, 1, 1, bias=False))


class TLPIPS(tnn.Module):
    """LPIPS v0.1 written from the paper's definition: scaling layer, 5 VGG taps, unit-normalise,
    squared difference, 1x1 linear layers, spatial mean, sum over layers."""

    def __init__(self, vgg):
        super().__init__()
        self.vgg = vgg
        for k, c in enumerate((64, 128, 256, 512, 512)):
            setattr(self, f"lin{k}", TLin(c))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def taps(self, x):
        out = []
        for i, layer in enumerate(self.vgg.features[:30]):
            x = layer(x)
            if i in (3, 8, 15, 22, 29):
                out.append(x)
        return out

    def forward(self, x, y):
        fx, fy = self.taps((x - self.shift) / self.scale), self.taps((y - self.shift) / self.scale)
        total = 0
        for k, (a, b) in enumerate(zip(fx, fy)):
            a = a / (torch.sqrt((a ** 2).sum(1, keepdim=True)) + 1e-10)
            b = b / (torch.sqrt((b ** 2).sum(1, keepdim=True)) + 1e-10)
            total = total + getattr(self, f"lin{k}").model((a - b) ** 2).mean((2, 3))
        return total[:, 0]


@pytest.fixture(scope="module")
def torch_lpips(tmp_path_factory):
    torch.manual_seed(1)
    vgg = TVGG()
    with torch.no_grad():
        for m in vgg.modules():
            if isinstance(m, tnn.Conv2d):
                tnn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.bias.normal_(0, 0.05)
    net = TLPIPS(vgg).eval()
    with torch.no_grad():
        for k in range(5):
            getattr(net, f"lin{k}").model[1].weight.uniform_(0, 0.1)  # LPIPS weights are non-negative
    folder = tmp_path_factory.mktemp("lpips")
    vgg_pth, lin_pth = folder / "vgg16-random.pth", folder / "vgg.pth"
    torch.save(vgg.state_dict(), vgg_pth)
    torch.save({k: v for k, v in net.state_dict().items() if k.startswith("lin")}, lin_pth)
    return net, vgg_pth, lin_pth


def _images(seed, n=2, h=24, w=24):
    return np.random.default_rng(seed).uniform(-1, 1, (n, h, w, 3)).astype(np.float32)


def _torch_lpips(net, x, y):
    with torch.no_grad():
        return net(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y).permute(0, 3, 1, 2)).numpy()


@pytest.fixture(scope="module")
def lpips_model(torch_lpips):
    _, vgg_pth, lin_pth = torch_lpips
    return load_lpips((vgg_pth, lin_pth), precision="highest")  # straight from the two .pth files


def _lpips(model, x, y):
    """LPIPS [N] and its 5 per-layer terms in pure-functional form (nnx.split / merge inside jax.jit).
    Every test calls it with [2, 24, 24, 3] images, so it compiles once (24 px: relu4_3 is 3x3 and
    the last pool floors 3 -> 1, like PyTorch). Gradients are plain JAX autodiff; the one custom
    piece, the safe norm, is checked in test_unit_normalize_zero_vector_has_finite_gradient."""
    graphdef, state = nnx.split(model)
    return _lpips_jit(graphdef, state, jnp.asarray(x), jnp.asarray(y))


@functools.partial(jax.jit, static_argnums=0)
def _lpips_jit(graphdef, state, x, y):
    return nnx.merge(graphdef, state)(x, y, per_layer=True)


def test_lpips_matches_torch(torch_lpips, lpips_model):
    net = torch_lpips[0]
    x, y = _images(0), _images(1)
    d, layers = _lpips(lpips_model, x, y)
    ref = _torch_lpips(net, x, y)
    assert d.shape == (2,) and np.all(ref > 1e-3)
    np.testing.assert_allclose(np.asarray(d), ref, rtol=2e-4)
    assert len(layers) == 5
    np.testing.assert_allclose(np.asarray(sum(layers)), np.asarray(d), rtol=1e-6)


def test_lpips_properties(lpips_model):
    x, y = _images(2), _images(3)
    d_xy, d_yx, d_xx = (np.asarray(_lpips(lpips_model, a, b)[0]) for a, b in ((x, y), (y, x), (x, x)))
    np.testing.assert_allclose(d_xy, d_yx, rtol=1e-5)
    assert np.all(np.abs(d_xx) < 1e-12)  # both images go through one batched VGG pass: ~0, not bitwise 0
    assert np.all(d_xy > 0)
    near = np.asarray(_lpips(lpips_model, x, np.clip(x + 0.05 * (y - x), -1, 1))[0])
    assert np.all(near < d_xy)  # a smaller perturbation is closer


def test_unit_normalize_zero_vector_has_finite_gradient():
    x = jnp.array([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
    value_and_grad = jax.jit(jax.value_and_grad(lambda a: jnp.sum(unit_normalize(a) * jnp.array([1.0, 2.0, 3.0]))))
    value, g = value_and_grad(x)
    np.testing.assert_allclose(np.asarray(unit_normalize(x)), [[0, 0, 0], [0.6, 0.8, 0]], atol=1e-7)
    assert float(value) == pytest.approx(0.6 + 1.6)
    # d/da of (a . w) / (|a| + eps) at a = (3, 4, 0): (w - (a_hat . w) a_hat) / |a| (eps negligible);
    # at a = 0 the norm has a zero (not NaN) derivative, leaving w / eps -- finite, where a plain sqrt gives NaN
    a_hat, w = np.array([0.6, 0.8, 0.0]), np.array([1.0, 2.0, 3.0])
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(np.asarray(g[1]), (w - (a_hat @ w) * a_hat) / 5, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g[0]), w / 1e-10, rtol=1e-5)


def test_converted_files_give_the_same_model(torch_lpips, lpips_model, tmp_path):
    _, vgg_pth, lin_pth = torch_lpips
    direct = flatten_params(load_lpips_params((vgg_pth, lin_pth)))
    written = convert_lpips_vgg(vgg_pth, lin_pth, tmp_path / "lpips.npz")  # (Orbax output: see test_fid)
    loaded = flatten_params(load_params(written))
    assert loaded.keys() == direct.keys()
    for k in direct:
        np.testing.assert_array_equal(loaded[k], direct[k])
    with pytest.raises(FileExistsError):
        convert_lpips_vgg(vgg_pth, lin_pth, written)
    loss = make_perceptual_loss(tmp_path / "lpips.npz", precision="highest")
    assert isinstance(loss, LPIPS) and loss.is_lpips and loss.name == "lpips-vgg"
    x, y = _images(7), _images(8)
    np.testing.assert_allclose(np.asarray(_lpips(loss, x, y)[0]),
                               np.asarray(_lpips(lpips_model, x, y)[0]), rtol=1e-6)



def test_lpips_weight_errors(torch_lpips, tmp_path):
    _, vgg_pth, lin_pth = torch_lpips
    with pytest.raises(FileNotFoundError):
        make_perceptual_loss(tmp_path / "absent.npz")  # missing file: an error, not the fallback
    with pytest.raises(FileNotFoundError):
        load_lpips((tmp_path / "absent.pth", lin_pth))
    with pytest.raises(ValueError, match="pair"):
        load_lpips([vgg_pth])
    with pytest.raises(ValueError, match="not an LPIPS-VGG"):
        load_lpips((vgg_pth, vgg_pth))  # VGG file given where the lin layers belong
    with pytest.raises(ValueError, match="not a torchvision VGG16"):
        load_lpips((lin_pth, lin_pth))
    bad = tmp_path / "lin_bad.pth"
    torch.save({f"lin{k}.model.1.weight": torch.zeros(1, 3, 1, 1) for k in range(5)}, bad)
    with pytest.raises(ValueError, match="shape"):
        load_lpips((vgg_pth, bad))
    with pytest.raises(ValueError, match="same shape"):
        lpips_distance(jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16, 16, 3)), LPIPS(rngs=None))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        LPIPS(rngs=None)(jnp.zeros((1, 3, 32, 32)), jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="at least 16x16"):
        VGG16Features(rngs=None)(jnp.zeros((1, 8, 8, 3)))


def _pyramid_features(images):
    """A tiny deterministic 'network': the image and a 2x2-pooled squared image (two feature maps)."""
    n, h, w, c = images.shape
    pooled = jnp.square(images).reshape(n, h // 2, 2, w // 2, 2, c).mean((2, 4))
    return [images, pooled]


def _np_feature_loss(x, y):
    def norm(f):
        return f / (np.sqrt((f ** 2).sum(-1, keepdims=True)) + 1e-10)

    total = 0
    for fx, fy in zip(_pyramid_features(x), _pyramid_features(y)):
        fx, fy = np.asarray(fx, np.float64), np.asarray(fy, np.float64)
        total = total + ((norm(fx) - norm(fy)) ** 2).sum(-1).mean((1, 2))
    return total


class _PyramidModule(nnx.Module):
    def __init__(self):
        self.gain = nnx.Param(jnp.ones((3,)))

    def __call__(self, images):
        return _pyramid_features(images * self.gain[...])


def test_fallback_perceptual_loss_is_labelled_and_correct():
    with pytest.warns(UserWarning, match="NOT LPIPS"):
        loss = make_perceptual_loss(None, feature_fn=_pyramid_features, name="pyramid")
    assert isinstance(loss, FeaturePerceptualLoss) and not loss.is_lpips and "pyramid" in loss.name
    x, y = _images(9, n=2, h=8, w=6), _images(10, n=2, h=8, w=6)
    jitted = jax.jit(lambda a, b: loss(a, b))
    np.testing.assert_allclose(np.asarray(jitted(x, y)), _np_feature_loss(x, y), rtol=1e-5)
    assert np.all(np.abs(np.asarray(jitted(x, x))) < 1e-12)
    # an nnx.Module feature network travels as state through nnx.jit
    with pytest.warns(UserWarning):
        module_loss = make_perceptual_loss(feature_fn=_PyramidModule())
    got = nnx.jit(lambda m, a, b: m(a, b))(module_loss, jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(got), _np_feature_loss(x, y), rtol=1e-5)
    with pytest.raises(ValueError, match="feature_fn"):
        make_perceptual_loss(None)
    with pytest.warns(UserWarning):
        bad = make_perceptual_loss(feature_fn=lambda im: [im[:1]])
    with pytest.raises(ValueError, match="feature_fn must return"):
        bad(jnp.asarray(x), jnp.asarray(y))
