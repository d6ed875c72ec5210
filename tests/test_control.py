"""Tests of ParchGrad's gradient modification and its hook lifecycle."""

import copy
import itertools

import pytest
import torch
from torch import nn

from parchgrad.control import EPSILON, ParchGrad, control, modify_output_gradient

MODES = [
    dict(gamma=None, variance_conservation=True, exact_variance=False),
    dict(gamma=None, variance_conservation=False, exact_variance=False),
    dict(gamma=0.5, variance_conservation=True, exact_variance=False),
    dict(gamma=2.0, variance_conservation=False, exact_variance=False),
    dict(gamma=0.5, variance_conservation=True, exact_variance=True),
]


def reference_modification(grad, keep, gamma, variance_conservation, exact_variance, eps=EPSILON):
    """Per-sample, per-channel loop written from the method's definition."""
    out = grad.clone()
    for b in range(grad.shape[0]):
        kept = [c for c in range(grad.shape[1]) if keep[b, c]]
        pruned = [c for c in range(grad.shape[1]) if not keep[b, c]]
        if not kept or not pruned:
            continue
        s_h = sum(grad[b, c] for c in kept)
        s_l = sum(grad[b, c] for c in pruned)

        def strength(s):
            return s.abs().reshape(()) if s.numel() == 1 else s.var()

        v_h = strength(s_h) + eps
        v_l = strength(s_l) + eps
        if gamma is None:
            beta = torch.sqrt((v_h + v_l) / v_h) if variance_conservation else torch.tensor(1.0)
            for c in kept:
                out[b, c] = grad[b, c] * beta
            for c in pruned:
                out[b, c] = 0.0
            continue
        gamma_hat = gamma * torch.sqrt(v_l / v_h)
        if exact_variance:
            new_sum = gamma_hat * s_h + s_l
            common = torch.sqrt((strength(s_h + s_l) + eps) / (strength(new_sum) + eps))
            h_scale, l_scale = gamma_hat * common, common
        else:
            beta = (
                torch.sqrt((v_h + v_l) / (v_h * gamma_hat**2 + v_l))
                if variance_conservation
                else torch.tensor(1.0)
            )
            h_scale, l_scale = gamma_hat * beta, beta
        for c in kept:
            out[b, c] = grad[b, c] * h_scale
        for c in pruned:
            out[b, c] = grad[b, c] * l_scale
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spatial", [(5, 4), (1, 1)])
def test_vectorized_matches_reference(mode, spatial):
    generator = torch.Generator().manual_seed(0)
    grad = torch.randn(6, 9, *spatial, generator=generator, dtype=torch.float64)
    keep = torch.rand(6, 9, generator=generator) < 0.4
    keep[0] = True  # empty L
    keep[1] = False  # empty H
    got = modify_output_gradient(grad, keep, **mode)
    expected = reference_modification(grad, keep, **mode)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_empty_group_leaves_sample_unchanged():
    grad = torch.randn(2, 4, 3, 3)
    keep = torch.tensor([[True] * 4, [False] * 4])
    for mode in MODES:
        torch.testing.assert_close(modify_output_gradient(grad, keep, **mode), grad)


def test_variance_conserved_gamma_infinity():
    grad = torch.randn(4, 16, 7, 7, dtype=torch.float64)
    keep = torch.zeros(4, 16, dtype=torch.bool)
    keep[:, :3] = True
    summed_kept = (grad * keep[:, :, None, None]).sum(1).flatten(1)
    summed_pruned = (grad * ~keep[:, :, None, None]).sum(1).flatten(1)
    expected = summed_kept.var(dim=1) + summed_pruned.var(dim=1)

    modified = modify_output_gradient(grad, keep, variance_conservation=True)
    got = modified.sum(1).flatten(1).var(dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_exact_variance_restores_total():
    grad = torch.randn(3, 8, 5, 5, dtype=torch.float64)
    keep = torch.zeros(3, 8, dtype=torch.bool)
    keep[:, ::3] = True
    modified = modify_output_gradient(grad, keep, gamma=3.0, exact_variance=True)
    torch.testing.assert_close(
        modified.sum(1).flatten(1).var(dim=1), grad.sum(1).flatten(1).var(dim=1), rtol=1e-9, atol=0
    )


def test_invalid_arguments_raise():
    grad = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        modify_output_gradient(grad, torch.ones(2, 3))
    with pytest.raises(ValueError, match="exact_variance requires a finite gamma"):
        modify_output_gradient(grad, torch.ones(2, 3, dtype=torch.bool), exact_variance=True)
    with pytest.raises(ValueError, match="gamma must be positive"):
        modify_output_gradient(grad, torch.ones(2, 3, dtype=torch.bool), gamma=0.0)


class FixedSelector:
    """Keeps a fixed set of channels for every layer and target."""

    needs_activation = False

    def __init__(self, kept_fraction=0.25, seed=0):
        self.kept_fraction = kept_fraction
        self.seed = seed
        self.calls = []

    def __call__(self, layer, targets, activation):
        self.calls.append((layer, targets.clone()))
        channels = self.channels[layer]
        generator = torch.Generator().manual_seed(self.seed + len(layer))
        row = torch.rand(channels, generator=generator) < self.kept_fraction
        row[0] = True
        return row.expand(targets.shape[0], channels)


class KeepAllSelector:
    needs_activation = False

    def __init__(self, channels):
        self.channels = channels

    def __call__(self, layer, targets, activation):
        return torch.ones(targets.shape[0], self.channels[layer], dtype=torch.bool)


def sequential_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).eval()


class ResidualCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.relu(self.stem(x))
        x = self.relu(x + self.conv2(self.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def input_gradient(model, x, target, controller=None):
    x = x.clone().requires_grad_()
    if controller is not None:
        controller.set_targets(target)
    model(x).gather(1, target[:, None]).sum().backward()
    return x.grad


def hook_count(model):
    return sum(
        len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
        for m in model.modules()
    )


def test_keep_all_with_vc_leaves_gradient_unchanged():
    model = sequential_cnn()
    x = torch.randn(3, 3, 12, 12)
    target = torch.tensor([0, 2, 4])
    plain = input_gradient(model, x, target)
    selector = KeepAllSelector({"0": 8, "2": 16, "4": 16})
    with ParchGrad(model, ["0", "2", "4"], selector, variance_conservation=True) as parch:
        got = input_gradient(model, x, target, parch)
    torch.testing.assert_close(got, plain)


def _normalized_maps(model, layers, variance_conservation):
    selector = FixedSelector()
    selector.channels = {name: m.out_channels for name, m in model.named_modules() if name in layers}
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2, 3])
    with ParchGrad(model, layers, selector, variance_conservation=variance_conservation) as parch:
        grad = input_gradient(model, x, target, parch)
    return grad.flatten(1)


def test_sequential_cnn_vc_maps_proportional():
    model = sequential_cnn()
    with_vc = _normalized_maps(model, ["2", "4"], True)
    without_vc = _normalized_maps(model, ["2", "4"], False)
    cosine = torch.nn.functional.cosine_similarity(with_vc.double(), without_vc.double(), dim=1)
    assert torch.all(cosine > 1 - 1e-6), cosine


def test_residual_block_vc_maps_differ():
    model = ResidualCNN().eval()
    with_vc = _normalized_maps(model, ["conv1", "conv2"], True)
    without_vc = _normalized_maps(model, ["conv1", "conv2"], False)
    cosine = torch.nn.functional.cosine_similarity(with_vc.double(), without_vc.double(), dim=1)
    assert torch.all(cosine < 1 - 1e-3), cosine


def test_inplace_relu_gives_same_gradient():
    model = sequential_cnn()
    copy_model = copy.deepcopy(model)
    for module in copy_model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    x = torch.randn(2, 3, 10, 10)
    target = torch.tensor([1, 3])
    layers = ["0", "2"]
    grads = []
    for net in (model, copy_model):
        selector = FixedSelector()
        selector.channels = {"0": 8, "2": 16}
        with ParchGrad(net, layers, selector) as parch:
            grads.append(input_gradient(net, x, target, parch))
    torch.testing.assert_close(grads[0], grads[1])
    assert [m.inplace for m in model.modules() if hasattr(m, "inplace")] == [True, True, False]


def test_hooks_removed_after_exception():
    model = sequential_cnn()
    before = hook_count(model)
    flags = [m.inplace for m in model.modules() if hasattr(m, "inplace")]

    class FailingSelector:
        needs_activation = False

        def __call__(self, layer, targets, activation):
            raise RuntimeError("selector failed")

    with pytest.raises(RuntimeError, match="selector failed"):
        with ParchGrad(model, ["2"], FailingSelector()) as parch:
            input_gradient(model, torch.randn(1, 3, 8, 8), torch.tensor([0]), parch)
    assert hook_count(model) == before
    assert not parch.active
    assert [m.inplace for m in model.modules() if hasattr(m, "inplace")] == flags
    assert not model.training

    with pytest.raises(ValueError, match="raised in the block"):
        with ParchGrad(model, ["2"], FailingSelector()):
            raise ValueError("raised in the block")
    assert hook_count(model) == before


def test_per_sample_targets_reach_selector():
    model = sequential_cnn()
    selector = FixedSelector()
    selector.channels = {"2": 16}
    target = torch.tensor([4, 0, 3])
    with ParchGrad(model, ["2"], selector) as parch:
        input_gradient(model, torch.randn(3, 3, 8, 8), target, parch)
    assert len(selector.calls) == 1
    assert selector.calls[0][0] == "2"
    assert torch.equal(selector.calls[0][1], target)


def test_missing_targets_raise():
    model = sequential_cnn()
    selector = FixedSelector()
    selector.channels = {"2": 16}
    with pytest.raises(RuntimeError, match="no targets"):
        with ParchGrad(model, ["2"], selector):
            x = torch.randn(1, 3, 8, 8, requires_grad=True)
            model(x)[:, 0].sum().backward()


def test_training_mode_rejected():
    model = sequential_cnn().train()
    with pytest.raises(RuntimeError, match="training mode"):
        with ParchGrad(model, ["2"], FixedSelector()):
            pass
    assert hook_count(model) == 0


def test_unknown_layer_lists_conv_names():
    model = sequential_cnn()
    with pytest.raises(ValueError, match=r"Layer '1' is a ReLU.*Conv2d layers: \['0', '2', '4'\]"):
        control(model, ["1"], FixedSelector())
    with pytest.raises(ValueError, match="not found"):
        control(model, ["conv9"], FixedSelector())


def test_two_controllers_keep_their_hooks():
    first, second = sequential_cnn(), sequential_cnn()
    selector = FixedSelector()
    selector.channels = {"2": 16}
    with ParchGrad(first, ["2"], selector):
        with ParchGrad(second, ["2"], selector):
            pass
        assert len(first[2]._forward_hooks) == 1
    assert hook_count(first) == 0
    assert hook_count(second) == 0


def test_modes_are_combinable_in_controller():
    model = ResidualCNN().eval()
    selector = FixedSelector()
    selector.channels = {"conv1": 16, "conv2": 16}
    x = torch.randn(2, 3, 8, 8)
    target = torch.tensor([0, 1])
    results = []
    for mode in MODES:
        with ParchGrad(model, ["conv1", "conv2"], selector, **mode) as parch:
            results.append(input_gradient(model, x, target, parch))
    for first, second in itertools.combinations(results, 2):
        assert not torch.allclose(first, second)


def test_selector_width_mismatch_names_layer():
    model = sequential_cnn()
    selector = FixedSelector()
    selector.channels = {"2": 32}  # the layer has 16 channels
    with pytest.raises(ValueError, match="for layer '2', whose output gradient has 16 channels"):
        with ParchGrad(model, ["2"], selector) as parch:
            input_gradient(model, torch.randn(1, 3, 8, 8), torch.tensor([0]), parch)
