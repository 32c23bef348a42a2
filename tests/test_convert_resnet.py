"""torchvision ResNet importer: a torch model with torchvision's parameter names is the reference.

torchvision is not installed, so a minimal torchvision-layout ResNet is written here with torch.nn
(same module names, strides, paddings, eps); its parameter count at full size is checked against
torchvision's published numbers, and its outputs against the converted JAX model.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from viscoin_jax.convert.torchvision_resnet import (
    convert_resnet,
    load_resnet_checkpoint,
    load_torchvision_state_dict,
    read_resnet_config,
    save_resnet_checkpoint,
)
from viscoin_jax.models.resnet import ResNet, count_params

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class TorchBasic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
    """torchvision.models.resnet.ResNet layout (names included), with a width knob."""

    SPECS = {18: (TorchBasic, [2, 2, 2, 2]), 34: (TorchBasic, [3, 4, 6, 3]),
             50: (TorchBottleneck, [3, 4, 6, 3]), 101: (TorchBottleneck, [3, 4, 23, 3])}

    def __init__(self, depth, num_classes, width=64):
        super().__init__()
        block, layers = self.SPECS[depth]
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for s, n in enumerate(layers):
            blocks = []
            for b in range(n):
                blocks.append(block(cin, width * 2 ** s, 2 if (s > 0 and b == 0) else 1))
                cin = width * 2 ** s * block.expansion
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        """x: NCHW ImageNet-normalised. Returns logits and the stage maps."""
        feats = {}
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for s in range(1, 5):
            layer = getattr(self, f"layer{s}")
            for b, block in enumerate(layer):
                if s == 4 and b == len(layer) - 1:
                    feats["stage4_penultimate"] = x
                x = block(x)
            feats[f"stage{s}"] = x
        pooled = torch.flatten(self.avgpool(x), 1)
        feats["pooled"] = pooled
        return self.fc(pooled), feats


def _randomize(model, seed):
    """Random weights and random BN affine / running statistics (so the import of each is tested)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def _images(seed, n, size):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _torch_run(model, images_nhwc):
    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
    x = ((x + 1) / 2 - MEAN) / STD  # the normalisation the JAX model does internally
    with torch.no_grad():
        logits, feats = model(x)
    to_nhwc = lambda t: t.permute(0, 2, 3, 1).numpy() if t.ndim == 4 else t.numpy()  # noqa: E731
    return logits.numpy(), {k: to_nhwc(v) for k, v in feats.items()}


_forward = nnx.jit(lambda model, x: model(x))  # one compile per (architecture, input shape)


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


# torchvision's published parameter counts
TORCHVISION_COUNTS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160}


@pytest.mark.parametrize("depth", [18, 50])
def test_param_count_matches_torch_reference(depth):
    with torch.device("meta"):  # shapes only: no 25M-parameter init
        torch_count = sum(p.numel() for p in TorchResNet(depth, 1000).parameters())
    assert torch_count == TORCHVISION_COUNTS[depth]
    model = nnx.eval_shape(lambda: ResNet(depth, 1000, rngs=nnx.Rngs(0)))
    assert count_params(model) == torch_count


@pytest.mark.parametrize("depth,width,size,n", [(18, 4, 32, 2), (50, 4, 37, 3)])
def test_convert_matches_torch(tmp_path, depth, width, size, n):
    torch.manual_seed(0)
    tmodel = _randomize(TorchResNet(depth, 5, width=width), seed=depth)
    path = tmp_path / f"resnet{depth}.pth"
    torch.save(tmodel.state_dict(), path)

    model = convert_resnet(path, depth)
    assert model.config == {"depth": depth, "num_classes": 5, "width": width, "small_input": False}
    images = _images(depth, n, size)  # odd size 37 exercises the floor of strided convs / pools
    ref_logits, ref_feats = _torch_run(tmodel, images)
    logits, feats = _forward(model, jnp.asarray(images))
    # eval mode reads the running statistics and leaves them alone
    np.testing.assert_array_equal(model.layer1[0].bn1.var[...], tmodel.layer1[0].bn1.running_var.numpy())
    assert logits.shape == ref_logits.shape
    assert _rel(logits, ref_logits) < 1e-4
    for key in ("stage1", "stage2", "stage3", "stage4", "stage4_penultimate", "pooled"):
        assert feats[key].shape == ref_feats[key].shape, key
        assert _rel(feats[key], ref_feats[key]) < 1e-4, key


def test_convert_from_state_dict_and_checks(tmp_path):
    tmodel = _randomize(TorchResNet(18, 5, width=4), seed=3)
    sd = tmodel.state_dict()
    model = convert_resnet(sd, 18, num_classes=5)
    images = _images(1, 2, 32)
    ref_logits, _ = _torch_run(tmodel, images)
    assert _rel(_forward(model, jnp.asarray(images))[0], ref_logits) < 1e-4

    with pytest.raises(ValueError, match="num_classes=6"):
        convert_resnet(sd, 18, num_classes=6)
    # wrong depth: the layout does not match, and the offending keys are listed
    with pytest.raises(ValueError, match=r"missing keys \[.*layer1\.0\.conv3\.weight"):
        convert_resnet(sd, 50)
    with pytest.raises(ValueError, match=r"80 unexpected keys \['layer1\.2\.bn1\.bias', .*\(60 more\)\]"):
        convert_resnet(TorchResNet(34, 5, width=4).state_dict(), 18)
    bad = dict(sd)
    del bad["layer2.0.downsample.1.running_var"]
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['layer2\.0\.downsample\.1\.running_var'\].*"
                                         r"unexpected keys \['extra\.weight'\]"):
        convert_resnet(bad, 18)
    bad = dict(sd)
    bad["layer1.0.conv2.weight"] = torch.zeros(4, 4, 5, 5)
    with pytest.raises(ValueError, match="layer1.0.conv2.weight has shape"):
        convert_resnet(bad, 18)
    with pytest.raises(ValueError, match="unknown ResNet depth"):
        convert_resnet(sd, 19)

    # DataParallel prefix and a wrapped {"state_dict": ...} file are accepted
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "wrapped.pth")
    loaded = load_torchvision_state_dict(tmp_path / "wrapped.pth")
    assert set(loaded) == set(sd)
    np.testing.assert_array_equal(loaded["fc.weight"], sd["fc.weight"].numpy())


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such ResNet weight file"):
        load_torchvision_state_dict(tmp_path / "absent.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match="could not read"):
        convert_resnet(corrupt, 50)
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_torchvision_state_dict(tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a torchvision ResNet state dict"):
        convert_resnet({"foo": np.zeros(3)}, 18)


def test_checkpoint_roundtrip(tmp_path):
    tmodel = _randomize(TorchResNet(18, 5, width=4), seed=5)
    model = convert_resnet(tmodel.state_dict(), 18)
    names = ["a", "b", "c", "d", "e"]
    out = save_resnet_checkpoint(model, tmp_path / "ckpt", {"class_names": names})
    config = read_resnet_config(out)
    assert config == {"depth": 18, "num_classes": 5, "width": 4, "small_input": False, "class_names": names}
    restored = load_resnet_checkpoint(out)
    images = _images(2, 2, 32)
    ref_logits, ref_feats = _torch_run(tmodel, images)
    logits, feats = _forward(restored, jnp.asarray(images))
    assert _rel(logits, ref_logits) < 1e-4
    assert _rel(feats["stage3"], ref_feats["stage3"]) < 1e-4
    a = jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.asarray, dict(nnx_state_pure(model))))
    b = jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.asarray, dict(nnx_state_pure(restored))))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))

    with pytest.raises(FileExistsError):
        save_resnet_checkpoint(model, out)
    with pytest.raises(ValueError, match="disagrees"):
        save_resnet_checkpoint(model, tmp_path / "other", {"depth": 50})
    with pytest.raises(FileNotFoundError, match="no ResNet checkpoint"):
        load_resnet_checkpoint(tmp_path / "nothing")
    # a config that does not fit the saved weights
    (out / "config.json").write_text(json.dumps({**config, "width": 8}))
    with pytest.raises(ValueError, match="shape"):
        load_resnet_checkpoint(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_resnet_checkpoint(out)


def nnx_state_pure(model):
    return nnx.to_pure_dict(nnx.state(model))
