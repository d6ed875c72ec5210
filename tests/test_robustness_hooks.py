"""Failure kinds of hook-based attribution: in-place ops, errors, leaks, frozen inputs, train mode."""

import copy
import gc

import pytest
import torch
import torchvision
from torch import nn

from parchgrad.attribution import attribute
from parchgrad.control import ParchGrad, modify_output_gradient
from parchgrad.layers import default_layer_names
from parchgrad.statistics import collect_statistics


class KeepAll:
    """Returns an all-True mask, so the modification runs but keeps every channel."""

    needs_activation = False

    def __call__(self, layer, targets, activation):
        return torch.ones(targets.shape[0], self.channels[layer], dtype=torch.bool)


class HalfSelector:
    needs_activation = False

    def __init__(self, channels):
        self.channels = channels
        self.calls = 0

    def __call__(self, layer, targets, activation):
        self.calls += 1
        mask = torch.zeros(targets.shape[0], self.channels[layer], dtype=torch.bool)
        mask[:, : self.channels[layer] // 2] = True
        return mask


def hook_count(model):
    return sum(
        len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def inplace_flags(model):
    return {name: m.inplace for name, m in model.named_modules() if hasattr(m, "inplace")}


def plain_vgg16():
    torch.manual_seed(0)
    return torchvision.models.vgg16(num_classes=10).eval()


def test_plain_vgg16_inplace_relu_matches_copy():
    model = plain_vgg16()
    # torchvision's plain VGG16 feeds every Conv2d into ReLU(inplace=True).
    assert all(m.inplace for m in model.features if isinstance(m, nn.ReLU))
    flags_before = inplace_flags(model)
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if hasattr(module, "inplace"):
            module.inplace = False

    layers = default_layer_names(model, "vgg16")
    x = torch.randn(2, 3, 32, 32)
    target = torch.tensor([1, 7])
    maps = []
    for net in (model, reference):
        selector = KeepAll()
        selector.channels = {name: dict(net.named_modules())[name].out_channels for name in layers}
        with ParchGrad(net, layers, selector) as parch:
            maps.append(attribute(net, x, target, "grad", controller=parch))
    plain = attribute(reference, x, target, "grad")
    torch.testing.assert_close(maps[0], maps[1])
    torch.testing.assert_close(maps[0], plain)
    assert inplace_flags(model) == flags_before


def test_selector_exception_leaves_model_clean():
    model = plain_vgg16()
    fresh = copy.deepcopy(model)
    flags_before = inplace_flags(model)
    layers = default_layer_names(model, "vgg16")
    channels = {name: dict(model.named_modules())[name].out_channels for name in layers}

    class Failing:
        needs_activation = False

        def __call__(self, layer, targets, activation):
            raise RuntimeError("selector failed in backward")

    x = torch.randn(1, 3, 32, 32)
    target = torch.tensor([3])
    with pytest.raises(RuntimeError, match="selector failed in backward"):
        with ParchGrad(model, layers, Failing()) as parch:
            attribute(model, x, target, "grad", controller=parch)
    assert hook_count(model) == 0
    assert not model.training
    assert inplace_flags(model) == flags_before

    results = []
    for net in (model, fresh):
        with ParchGrad(net, layers, HalfSelector(channels)) as parch:
            results.append(attribute(net, x, target, "grad", controller=parch))
    torch.testing.assert_close(results[0], results[1])


def test_controllers_do_not_remove_each_others_hooks():
    model = plain_vgg16()
    layers = default_layer_names(model, "vgg16")
    channels = {name: dict(model.named_modules())[name].out_channels for name in layers}
    first = ParchGrad(model, layers, HalfSelector(channels))
    second = ParchGrad(model, layers[:2], HalfSelector(channels))
    with first:
        with second:
            assert hook_count(model) == len(layers) + 2
        assert hook_count(model) == len(layers)
        assert first.active
    assert hook_count(model) == 0


def test_repeated_attributions_keep_memory_flat():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()
    selector = HalfSelector({"0": 8, "2": 8})
    x = torch.randn(2, 3, 16, 16)
    target = torch.tensor([0, 3])

    def live_tensors():
        gc.collect()
        return sum(1 for obj in gc.get_objects() if torch.is_tensor(obj))

    with ParchGrad(model, ["0", "2"], selector) as parch:
        for _ in range(20):
            attribute(model, x, target, "grad", controller=parch)
        baseline = live_tensors()
        for _ in range(200):
            attribute(model, x, target, "grad", controller=parch)
        after = live_tensors()
        assert hook_count(model) == 2
    assert after <= baseline
    assert selector.calls == 2 * 220
    assert hook_count(model) == 0


def test_first_convolution_hook_fires_without_input_gradient_module():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)
    ).eval()
    for parameter in model[0].parameters():
        parameter.requires_grad_(False)  # a frozen stem
    selector = HalfSelector({"0": 6})
    x = torch.randn(2, 3, 8, 8)
    target = torch.tensor([2, 0])
    with ParchGrad(model, ["0"], selector) as parch:
        maps = attribute(model, x, target, "grad", controller=parch, signed=True)
    assert selector.calls == 1

    # Reference: the modified output gradient pushed through conv1 by hand.
    inputs = x.clone().requires_grad_()
    output = model[0](inputs)
    output.retain_grad()
    model[1:](output).gather(1, target[:, None]).sum().backward()
    keep = torch.zeros(2, 6, dtype=torch.bool)
    keep[:, :3] = True
    modified = modify_output_gradient(output.grad, keep)
    expected = torch.nn.grad.conv2d_input(x.shape, model[0].weight, modified, padding=1)
    torch.testing.assert_close(maps, expected)


def test_batchnorm_statistics_unchanged_by_attribution():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    layers = default_layer_names(model, "resnet18")
    channels = {name: dict(model.named_modules())[name].out_channels for name in layers}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ParchGrad(model, layers, HalfSelector(channels)) as parch:
        attribute(model, torch.randn(2, 3, 64, 64), torch.tensor([0, 1]), "ig", controller=parch, n_steps=4)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_batchnorm_statistics_unchanged_by_collection():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    layers = default_layer_names(model, "resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [{"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0])} for _ in range(2)]
    collect_statistics(model, batches, num_classes=3, layers=layers, progress=False)
    assert not model.training
    assert hook_count(model) == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key

def test_training_mode_rejected_and_left_as_is():
    model = plain_vgg16().train()
    layers = default_layer_names(model, "vgg16")
    with pytest.raises(RuntimeError, match="training mode"):
        with ParchGrad(model, layers, HalfSelector({})):
            pass
    with pytest.raises(RuntimeError, match="training mode"):
        attribute(model, torch.randn(1, 3, 32, 32), 0)
    assert model.training
    assert hook_count(model) == 0
