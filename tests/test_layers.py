"""Tests of the default hooked layers and layer resolution."""

import pytest
import torchvision
from torch import nn

from parchgrad.layers import conv_layer_names, default_layer_names, layer_names_by_ratio, resolve_layers


def test_resnet18_default_layers():
    model = torchvision.models.resnet18(num_classes=10)
    names = default_layer_names(model, "resnet18")
    assert names == [
        f"{stage}.{block}.{conv}"
        for stage in ("layer3", "layer4")
        for block in (0, 1)
        for conv in ("conv1", "conv2")
    ]


@pytest.mark.parametrize("architecture", ["vgg16", "vgg16_bn"])
def test_vgg_default_layers_upper_half(architecture):
    model = getattr(torchvision.models, architecture)(num_classes=10)
    names = default_layer_names(model, architecture)
    start = int(0.5 * len(model.features))
    expected = [f"features.{i}" for i, m in enumerate(model.features) if i >= start and isinstance(m, nn.Conv2d)]
    assert names == expected
    assert len(names) == 6


def test_efficientnet_default_layers():
    model = torchvision.models.efficientnet_b0(num_classes=10)
    names = default_layer_names(model, "efficientnet_b0")
    modules = dict(model.named_modules())
    assert names == ["features.6.0.block.1.0", "features.7.0.block.1.0", "features.8.0"]
    assert modules[names[0]].groups == modules[names[0]].in_channels  # depthwise
    assert modules[names[2]].kernel_size == (1, 1)


def test_layer_ratio_takes_last_convolutions():
    model = torchvision.models.resnet18(num_classes=10)
    names = conv_layer_names(model)
    assert len(names) == 20
    assert layer_names_by_ratio(model, 1.0) == names
    assert layer_names_by_ratio(model, 0.3) == names[-6:]
    assert layer_names_by_ratio(model, 0.9) == names[-18:]
    with pytest.raises(ValueError, match="selects no layer"):
        layer_names_by_ratio(model, 0.01)


def test_unknown_architecture_lists_conv_names():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match=r"Conv2d layers: \['0', '2'\]"):
        resolve_layers(model, architecture="mynet")
    with pytest.raises(ValueError, match="is a ReLU"):
        resolve_layers(model, layers=["1"])
    assert resolve_layers(model, layers=["2"]) == ["2"]
    with pytest.raises(ValueError, match="not both"):
        resolve_layers(model, layers=["2"], layer_ratio=0.5)
