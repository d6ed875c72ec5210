"""Tests of the class-wise, instance-wise and keep-all channel selectors."""

from types import SimpleNamespace

import pytest
import torch
from scipy import stats

from parchgrad.selection import (
    AllChannelsSelector,
    ClassSelector,
    InstanceSelector,
    build_selector,
)


def make_statistics():
    generator = torch.Generator().manual_seed(0)
    pvalues = torch.rand(4, 10, generator=generator, dtype=torch.float64)
    pvalues[2, 5] = float("nan")
    shapiro = torch.full((10,), 0.01, dtype=torch.float64)
    shapiro[7] = 0.5  # detectably normal channel: never selected
    return SimpleNamespace(
        ttest_pvalues={"layer": pvalues},
        shapiro_pvalues={"layer": shapiro},
        mean={"layer": torch.linspace(0.0, 1.0, 10)},
        std={"layer": torch.full((10,), 0.5)},
    )


def test_class_selector_alpha():
    statistics = make_statistics()
    selector = ClassSelector(statistics, alpha=0.3)
    targets = torch.tensor([0, 2, 3])
    mask = selector("layer", targets, None)
    pvalues = torch.nan_to_num(statistics.ttest_pvalues["layer"], nan=1.0)
    for row, target in enumerate(targets.tolist()):
        expected = (pvalues[target] <= 0.3) & (statistics.shapiro_pvalues["layer"] < 0.05)
        if not expected.any():
            expected = torch.ones(10, dtype=torch.bool)
        assert torch.equal(mask[row], expected)
    assert not mask[:, 7].any() or mask[:, 7].all()


def test_class_selector_quantile_keeps_smallest():
    statistics = make_statistics()
    statistics.shapiro_pvalues["layer"][:] = 0.0
    selector = ClassSelector(statistics, quantile=0.3)
    mask = selector("layer", torch.arange(4), None)
    assert mask.sum(dim=1).tolist() == [3, 3, 3, 3]
    for target in range(4):
        smallest = torch.nan_to_num(statistics.ttest_pvalues["layer"][target], nan=1.0).argsort()[:3]
        assert mask[target, smallest].all()


def test_class_selector_empty_falls_back_to_all():
    statistics = make_statistics()
    statistics.shapiro_pvalues["layer"][:] = 1.0
    mask = ClassSelector(statistics, alpha=0.5)("layer", torch.tensor([1]), None)
    assert mask.all()


def test_instance_selector_matches_normal_survival():
    statistics = make_statistics()
    selector = InstanceSelector(statistics, alpha=0.2)
    activation = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    mask = selector("layer", torch.zeros(3, dtype=torch.long), activation)
    z = (activation - statistics.mean["layer"]) / statistics.std["layer"]
    expected_p = torch.as_tensor(stats.norm.sf(z.numpy()), dtype=torch.float32)
    torch.testing.assert_close(selector.pvalues("layer", activation), expected_p)
    expected = (expected_p < 0.2) & (statistics.shapiro_pvalues["layer"] < 0.05)
    assert torch.equal(mask, expected)


def test_instance_selector_quantile_per_sample():
    statistics = make_statistics()
    statistics.shapiro_pvalues["layer"][:] = 0.0
    selector = InstanceSelector(statistics, quantile=0.2)
    activation = torch.randn(5, 10, generator=torch.Generator().manual_seed(3))
    mask = selector("layer", torch.zeros(5, dtype=torch.long), activation)
    # The k-th smallest is the threshold and the comparison is strict: k - 1 kept.
    assert mask.sum(dim=1).tolist() == [1] * 5


def test_all_channels_selector_returns_none():
    assert AllChannelsSelector()("layer", torch.tensor([0]), None) is None


def test_threshold_arguments_validated():
    statistics = make_statistics()
    with pytest.raises(ValueError, match="exactly one of quantile and alpha"):
        ClassSelector(statistics)
    with pytest.raises(ValueError, match="exactly one of quantile and alpha"):
        InstanceSelector(statistics, quantile=0.1, alpha=0.1)
    with pytest.raises(ValueError, match="quantile must be in"):
        ClassSelector(statistics, quantile=1.5)


def test_unknown_layer_and_selection_raise():
    selector = ClassSelector(make_statistics(), alpha=0.1)
    with pytest.raises(KeyError, match="No statistics for layer 'other'"):
        selector("other", torch.tensor([0]), None)
    with pytest.raises(ValueError, match="Unknown selection 'foo'"):
        build_selector("foo")
    with pytest.raises(ValueError, match="needs channel statistics"):
        build_selector("cls", quantile=0.1)
    assert isinstance(build_selector("ins", make_statistics(), quantile=0.1), InstanceSelector)
