"""Tests of the Captum-based attribution methods with and without ParchGrad."""

import pytest
import torch
from torch import nn

from parchgrad.attribution import ATTRIBUTION_METHODS, attribute
from parchgrad.control import ParchGrad


class RandomSelector:
    """Keeps a per-class random third of the channels."""

    needs_activation = False

    def __init__(self, channels, classes=5):
        generator = torch.Generator().manual_seed(0)
        self.masks = {layer: torch.rand(classes, c, generator=generator) < 0.33 for layer, c in channels.items()}

    def __call__(self, layer, targets, activation):
        return self.masks[layer][targets]


def small_resnet():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 12, 3, padding=1)
            self.conv1 = nn.Conv2d(12, 12, 3, padding=1)
            self.conv2 = nn.Conv2d(12, 12, 3, padding=1)
            self.head = nn.Linear(12, 5)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = torch.relu(x + self.conv2(torch.relu(self.conv1(x))))
            return self.head(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    return Block().eval()


LAYERS = {"conv1": 12, "conv2": 12}


@pytest.mark.parametrize("method", sorted(ATTRIBUTION_METHODS))
def test_maps_are_nonnegative_2d(method):
    model = small_resnet()
    x = torch.randn(2, 3, 10, 10)
    maps = attribute(model, x, torch.tensor([0, 3]), method, nt_samples=4)
    assert maps.shape == (2, 10, 10)
    assert (maps >= 0).all()
    assert not maps.requires_grad


@pytest.mark.parametrize("method", ["grad", "inputgrad", "ig"])
def test_batched_targets_match_single_calls(method):
    model = small_resnet()
    selector = RandomSelector(LAYERS)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    target = torch.tensor([4, 1, 2])
    with ParchGrad(model, list(LAYERS), selector) as parch:
        batched = attribute(model, x, target, method, controller=parch, internal_batch_size=7)
        single = torch.cat(
            [attribute(model, x[i : i + 1], target[i : i + 1], method, controller=parch) for i in range(3)]
        )
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-7)


def test_parchgrad_changes_map_and_keep_all_does_not():
    model = small_resnet()
    x = torch.randn(2, 3, 8, 8)
    target = torch.tensor([0, 1])
    plain = attribute(model, x, target, "grad")

    class KeepAll:
        needs_activation = False

        def __call__(self, layer, targets, activation):
            return None

    with ParchGrad(model, list(LAYERS), KeepAll()) as parch:
        torch.testing.assert_close(attribute(model, x, target, "grad", controller=parch), plain)
    with ParchGrad(model, list(LAYERS), RandomSelector(LAYERS)) as parch:
        controlled = attribute(model, x, target, "grad", controller=parch)
    assert not torch.allclose(controlled, plain)


def test_smoothgrad_noise_scales_with_input_range(monkeypatch):
    seen = []
    original = torch.normal

    def recording_normal(mean, std, *args, **kwargs):
        if isinstance(std, torch.Tensor):
            seen.append(float(std.flatten()[0]))
        return original(mean, std, *args, **kwargs)

    monkeypatch.setattr(torch, "normal", recording_normal)
    model = small_resnet()
    x = torch.rand(2, 3, 8, 8)
    x[0] = x[0] * 4.0 - 1.0  # range close to 4
    x[1] = x[1] * 0.5  # range close to 0.5
    attribute(model, x, torch.tensor([0, 1]), "smoothgrad", nt_samples=3)
    expected = [0.15 * float(x[i].max() - x[i].min()) for i in range(2)]
    assert seen == pytest.approx(expected)


def test_integrated_gradients_completeness():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).eval()
    x = torch.randn(2, 3, 6, 6)
    target = torch.tensor([0, 2])
    signed = attribute(model, x, target, "ig", signed=True, n_steps=301)
    with torch.no_grad():
        delta = model(x).gather(1, target[:, None])[:, 0] - model(torch.zeros_like(x)).gather(1, target[:, None])[:, 0]
    total = signed.flatten(1).sum(dim=1)
    assert torch.all((total - delta).abs() <= 0.01 * delta.abs()), (total, delta)


def test_training_mode_and_bad_inputs_rejected():
    model = small_resnet()
    with pytest.raises(ValueError, match="Unknown attribution method 'lrp'"):
        attribute(model, torch.randn(1, 3, 8, 8), 0, "lrp")
    with pytest.raises(ValueError, match="target must be an int or a"):
        attribute(model, torch.randn(2, 3, 8, 8), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="inputs must be"):
        attribute(model, torch.randn(3, 8, 8), 0)
    model.train()
    with pytest.raises(RuntimeError, match="training mode"):
        attribute(model, torch.randn(1, 3, 8, 8), 0)


def test_inactive_or_foreign_controller_rejected():
    model, other = small_resnet(), small_resnet()
    parch = ParchGrad(model, list(LAYERS), RandomSelector(LAYERS))
    with pytest.raises(ValueError, match="not active"):
        attribute(model, torch.randn(1, 3, 8, 8), 0, controller=parch)
    with parch:
        with pytest.raises(ValueError, match="another model"):
            attribute(other, torch.randn(1, 3, 8, 8), 0, controller=parch)


def test_smoothgrad_targets_follow_noise_copies():
    model = small_resnet()

    class RecordingSelector(RandomSelector):
        def __init__(self, channels):
            super().__init__(channels)
            self.seen = []

        def __call__(self, layer, targets, activation):
            self.seen.append(targets.clone())
            return super().__call__(layer, targets, activation)

    selector = RecordingSelector(LAYERS)
    target = torch.tensor([4, 1])
    with ParchGrad(model, list(LAYERS), selector) as parch:
        maps = attribute(model, torch.randn(2, 3, 8, 8), target, "smoothgrad", controller=parch, nt_samples=3)
    assert maps.shape == (2, 8, 8)
    # One call per image and layer, with that image's target once per noisy copy.
    expected = [torch.full((3,), 4)] * 2 + [torch.full((3,), 1)] * 2
    assert len(selector.seen) == len(expected)
    for seen, expected_targets in zip(selector.seen, expected):
        assert torch.equal(seen, expected_targets)
