"""Model zoo: every registered model (ViTs included once registered) builds for MNIST and CIFAR
shapes and trains; architecture facts of VGG-A, ResNet-18 CD-PreAct, ResNet-56 and the MLP."""
from __future__ import annotations

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from nnlab.errors import ConfigError
from nnlab.models import MODELS, count_parameters, create_model
from nnlab.models.mlp import MLP
from nnlab.models.resnet import AvgPoolShortcut, CifarResNet, CifarResNetConfig, pad_shortcut

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(1, 28), (3, 32)]  # (in_chans, image_size): MNIST and CIFAR
OURS = ["lenet5", "vgg-a", "vgg-a-bn", "resnet18-cdpreact", "resnet56", "mlp"]
NUM_CLASSES = 7  # not 10, so a hard-coded head would show

_CACHE: dict[tuple[str, int, int], tuple[nn.Module | None, dict | None]] = {}


@pytest.fixture(scope="module", autouse=True)
def _free_cache():
    yield
    _CACHE.clear()


def _built(name: str, in_chans: int, size: int):
    """(model, its initial state_dict) built under seed 0, or (None, None) if the shape is unsupported.
    Cached so the big models are built once per shape for the whole file."""
    key = (name, in_chans, size)
    if key not in _CACHE:
        torch.manual_seed(0)
        try:
            model = create_model(name, num_classes=NUM_CLASSES, in_chans=in_chans, image_size=size)
        except ConfigError:
            _CACHE[key] = (None, None)
        else:
            _CACHE[key] = (model, {k: v.clone() for k, v in model.state_dict().items()})
    return _CACHE[key]


def test_all_required_models_are_registered():
    assert set(OURS) <= set(MODELS.names())


@pytest.mark.parametrize("name", MODELS.names())
def test_model_builds_and_trains_on_mnist_and_cifar_shapes(name):
    supported = 0
    for in_chans, size in SHAPES:
        model, _ = _built(name, in_chans, size)
        if model is None:
            assert name not in OURS, f"{name} must support ({in_chans}, {size}, {size})"
            continue
        supported += 1
        model.train()
        model.zero_grad()
        logits = model(torch.randn(2, in_chans, size, size))
        assert logits.shape == (2, NUM_CLASSES)
        F.cross_entropy(logits, torch.tensor([0, NUM_CLASSES - 1])).backward()
        no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not no_grad, f"parameters unused in forward (breaks DDP): {no_grad[:5]}"
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert supported >= 1, f"{name} supports neither 28x28x1 nor 32x32x3"


@pytest.mark.parametrize("name", MODELS.names())
def test_init_is_deterministic_under_a_seed(name):
    shape = next((s for s in SHAPES if _built(name, *s)[0] is not None), None)
    assert shape is not None
    _, first = _built(name, *shape)
    torch.manual_seed(0)
    again = create_model(name, num_classes=NUM_CLASSES, in_chans=shape[0], image_size=shape[1]).state_dict()
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("name", OURS)
def test_init_changes_with_the_seed(name):
    _, first = _built(name, 3, 32)
    torch.manual_seed(1)
    other = create_model(name, num_classes=NUM_CLASSES, in_chans=3, image_size=32).state_dict()
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


# ---- VGG-A -------------------------------------------------------------------------------------


def _layer_sequence(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not list(m.children())]


def test_vgg_a_has_the_published_parameter_count():
    assert count_parameters(create_model("vgg-a", num_classes=10, in_chans=3, image_size=32)) == 9_750_922


@pytest.mark.parametrize("name, expected_bn", [("vgg-a", 0), ("vgg-a-bn", 10)])
def test_vgg_bn_follows_every_conv_and_the_first_two_linears(name, expected_bn):
    model, _ = _built(name, 3, 32)
    layers = _layer_sequence(model)
    bns = [m for m in layers if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert len(bns) == expected_bn
    weighted = [i for i, m in enumerate(layers) if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == 11  # 8 convs + 3 linears: VGG-A has 11 weight layers
    for i in weighted[:-1]:  # all but the output layer: [BN] then ReLU
        nxt = layers[i + 1]
        if expected_bn:
            assert isinstance(nxt, (nn.BatchNorm1d, nn.BatchNorm2d))
            assert nxt.num_features == getattr(layers[i], "out_channels", getattr(layers[i], "out_features", None))
            nxt = layers[i + 2]
        assert isinstance(nxt, nn.ReLU)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in layers[weighted[-1]:])


def test_vgg_named_layers_width_and_dropout_options():
    model = create_model("vgg-a-bn", num_classes=10, in_chans=3, image_size=32, width=0.25, dropout=0.5)
    convs = model.conv_layers()
    assert list(convs) == ["conv1", "conv2", "conv3_1", "conv3_2", "conv4_1", "conv4_2", "conv5_1", "conv5_2"]
    assert [c.out_channels for c in convs.values()] == [16, 32, 64, 64, 128, 128, 128, 128]
    assert model.classifier.fc1.out_features == 128
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2
    assert not any(isinstance(m, nn.Dropout) for m in create_model("vgg-a").modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert create_model("vgg-a", bn=True).classifier.bn_fc2.num_features == 512


# ---- ResNet-18 CD-PreAct -----------------------------------------------------------------------


def _spatial_sizes(model: nn.Module, in_chans: int, size: int) -> list[int]:
    """Input size of each stage, then the output size of the last one."""
    sizes: list[int] = []
    hooks = [s.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[-1])) for s in model.stages()]
    hooks.append(model.stages()[-1].register_forward_hook(lambda m, a, out: sizes.append(out.shape[-1])))
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, in_chans, size, size))
    for h in hooks:
        h.remove()
    return sizes


def test_resnet18_stem_keeps_resolution_on_small_inputs_and_downsamples_large_ones():
    small, _ = _built("resnet18-cdpreact", 3, 32)
    stem_convs = [m for m in small.stem if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in stem_convs] == [(3, 3)] * 3
    assert [c.stride for c in stem_convs] == [(1, 1)] * 3
    assert not any(isinstance(m, nn.MaxPool2d) for m in small.stem)
    assert _spatial_sizes(small, 3, 32) == [32, 32, 16, 8, 4]
    assert _spatial_sizes(_built("resnet18-cdpreact", 1, 28)[0], 1, 28) == [28, 28, 14, 7, 4]
    large = create_model("resnet18-cdpreact", num_classes=10, in_chans=3, image_size=96)
    assert [m.stride for m in large.stem if isinstance(m, nn.Conv2d)] == [(1, 1), (1, 1), (2, 2)]
    assert _spatial_sizes(large, 3, 96) == [24, 24, 12, 6, 3]


def test_resnet18_downsampling_shortcut_is_avgpool_then_1x1_conv():
    model, _ = _built("resnet18-cdpreact", 3, 32)
    blocks = [b for stage in model.stages() for b in stage]
    assert len(blocks) == 8  # ResNet-18: 4 stages x 2 basic blocks
    projected = [i for i, b in enumerate(blocks) if b.shortcut is not None]
    assert projected == [2, 4, 6]  # the first block of layer2, layer3, layer4
    sc = blocks[2].shortcut
    assert isinstance(sc, AvgPoolShortcut) and sc.conv.kernel_size == (1, 1) and sc.conv.stride == (1, 1)
    a = torch.randn(2, sc.conv.in_channels, 7, 7)  # odd size: ceil-mode pooling, partial windows averaged
    expected = F.conv2d(F.avg_pool2d(a, 2, ceil_mode=True), sc.conv.weight)
    torch.testing.assert_close(sc(a), expected)
    assert expected.shape[-1] == 4


def test_resnet18_blocks_are_full_preactivation():
    """With the residual branch's last conv zeroed, a full pre-activation block is exactly its
    shortcut: nothing (no BN, no ReLU) follows the addition."""
    model, _ = _built("resnet18-cdpreact", 3, 32)
    model.eval()
    identity_block, down_block = model.layer2[1], model.layer2[0]
    with torch.no_grad():
        for block in (identity_block, down_block):
            block.conv2.weight.zero_()
        x = torch.randn(2, 128, 8, 8)  # has negative values a trailing ReLU would remove
        torch.testing.assert_close(identity_block(x), x)
        x = torch.randn(2, 64, 8, 8)
        preact = F.relu(down_block.bn1(x))
        torch.testing.assert_close(down_block(x), down_block.shortcut(preact))
    assert isinstance(model.bn_final, nn.BatchNorm2d)  # the final BN-ReLU before pooling
    _CACHE.pop(("resnet18-cdpreact", 3, 32))  # weights were edited


# ---- ResNet-56 ---------------------------------------------------------------------------------


def test_resnet56_depth_parameters_and_option_a_shortcut():
    model, _ = _built("resnet56", 3, 32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 56
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [9, 9, 9]
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
            model.layer3[0].conv1.out_channels] == [16, 32, 64]
    assert count_parameters(create_model("resnet56", num_classes=10, in_chans=3, image_size=32)) == 853_018
    assert not any(p.numel() for p in model.layer2[0].shortcut.parameters())


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 7, 7)
    out = pad_shortcut(x, 32, 2)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_resnet56_option_b_projects_with_conv_and_bn():
    model = create_model("resnet56", num_classes=10, in_chans=3, image_size=32, shortcut="B")
    sc = model.layer3[0].shortcut
    assert isinstance(sc[0], nn.Conv2d) and sc[0].stride == (2, 2) and isinstance(sc[1], nn.BatchNorm2d)
    assert isinstance(model.layer3[1].shortcut, nn.Identity)
    assert count_parameters(model) == 853_018 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_cifar_resnet_rejects_a_depth_that_is_not_6n_plus_2():
    with pytest.raises(ConfigError, match="6n \\+ 2"):
        CifarResNet(CifarResNetConfig(depth=55))


# ---- MLP ---------------------------------------------------------------------------------------


def test_mlp_class_takes_in_features_directly():
    model = MLP(in_features=12, hidden=(8, 4), num_classes=3, dropout=0.1)
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [8, 4, 3]
    assert model(torch.randn(5, 12)).shape == (5, 3)
    assert model(torch.randn(5, 3, 2, 2)).shape == (5, 3)  # flattened
    assert MLP(12, (), 3)(torch.randn(5, 12)).shape == (5, 3)  # no hidden layer: linear classifier
    with pytest.raises(ConfigError, match="in_features=13"):
        model(torch.randn(5, 13))


def test_mlp_factory_computes_in_features_and_parses_hidden():
    model = create_model("mlp", num_classes=10, in_chans=3, image_size=32, hidden="64,32")
    assert model.in_features == 3 * 32 * 32 and model.hidden == (64, 32)
    assert model.net.fc1.in_features == 3072 and model.net.fc3.out_features == 10


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kwargs, message", [
    ("vgg-a", {"depth": 3}, "has no option.*depth.*valid options: bn, dropout, width"),
    ("vgg-a", {"width": 0}, "width must be a positive number"),
    ("vgg-a-bn", {"dropout": 1.5}, "dropout must be a probability"),
    ("resnet56", {"shortcut": "C"}, "shortcut must be 'A' or 'B'"),
    ("resnet18-cdpreact", {"image_size": 0}, "image_size must be an integer >= 1"),
    ("lenet5", {"image_size": 64}, "28x28 or 32x32"),
    ("lenet5", {"dropout": 0.5}, "has no option"),
    ("mlp", {"hidden": "a,b"}, "comma-separated integers"),
    ("mlp", {"hidden": [0]}, "positive integer"),
])
def test_bad_model_arguments_raise_config_error(name, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        create_model(name, **kwargs)


# ---- throughput benchmark ----------------------------------------------------------------------


def _load_benchmark():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_zoo_throughput.py"
    spec = importlib.util.spec_from_file_location("bench_zoo_throughput", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_throughput_benchmark_runs_and_counts_flops(tmp_path, capsys):
    import json

    bench = _load_benchmark()
    out = tmp_path / "zoo.json"
    assert bench.main(["--models", "mlp,lenet5", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                       "--repeats", "2", "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["model"] for r in report["results"]] == ["mlp", "lenet5"]
    assert report["machine"]["threads"] == 1 and report["reference_matmul_gflops"] > 0
    assert all(r["images_per_s"] > 0 and len(r["images_per_s_runs"]) == 2 for r in report["results"])
    # mlp on 3x32x32: 2 FLOPs per MAC forward, twice that backward, minus the unneeded input grad
    macs = 3072 * 512 + 512 * 256 + 256 * 10
    assert report["results"][0]["train_gflop_per_image"] * 1e9 == pytest.approx(6 * macs - 2 * 3072 * 512)
    assert "| lenet5" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--models", "nope"])
