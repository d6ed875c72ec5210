"""Tests of the model-parameter randomization checks (parchgrad/sanity.py, experiments/sanity.py)."""

from __future__ import annotations

import importlib.util
import json
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from parchgrad.sanity import (
    cascading_randomization,
    flag_insensitive,
    independent_randomization,
    long_format,
    make_explainer,
    map_similarity,
    randomization_steps,
    randomize_modules,
)
from parchgrad.selection import ClassSelector

NUM_CLASSES = 3
LAYERS_TOP_DOWN = ["fc", "bn2", "conv2", "bn1", "conv1"]


def edge_detector_cnn() -> nn.Sequential:
    """Return a deterministic tiny CNN whose first convolution is a Sobel edge detector.

    Its Gradient maps follow the edges of the input, as a trained model's maps
    follow the object. Every BatchNorm2d has non-default weight, bias and
    running statistics, so that re-initializing it changes all of them.
    """
    generator = torch.Generator().manual_seed(0)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([sobel, -sobel, sobel.T, -sobel.T])  # [4, 3, 3]

    conv1 = nn.Conv2d(3, 4, 3, padding=1)
    bn1 = nn.BatchNorm2d(4)
    conv2 = nn.Conv2d(4, 6, 3, padding=1)
    bn2 = nn.BatchNorm2d(6)
    fc = nn.Linear(6, NUM_CLASSES)
    with torch.no_grad():
        conv1.weight.copy_(kernels[:, None].expand(4, 3, 3, 3) / 3)
        conv1.bias.zero_()
        conv2.weight.copy_(0.3 * torch.randn(conv2.weight.shape, generator=generator))
        conv2.bias.copy_(0.1 * torch.randn(6, generator=generator))
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=generator))
        fc.bias.zero_()
        for bn in (bn1, bn2):
            channels = bn.num_features
            bn.weight.copy_(1.0 + 0.5 * torch.rand(channels, generator=generator))
            bn.bias.copy_(0.1 * torch.randn(channels, generator=generator))
            bn.running_mean.copy_(0.1 * torch.randn(channels, generator=generator))
            bn.running_var.copy_(1.0 + torch.rand(channels, generator=generator))

    modules = OrderedDict(
        conv1=conv1, bn1=bn1, relu1=nn.ReLU(), conv2=conv2, bn2=bn2, relu2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=fc,
    )
    return nn.Sequential(modules).eval()


def square_images(count: int = 4, size: int = 24) -> torch.Tensor:
    """Return ``[count, 3, size, size]`` noisy images, each with a bright rectangle at its own place."""
    generator = torch.Generator().manual_seed(1)
    images = 0.05 * torch.randn(count, 3, size, size, generator=generator)
    for index in range(count):
        top, left = 3 + 2 * index, 4 + index
        images[index, :, top : top + 10, left : left + 9] += 1.0
    return images


def edge_map(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """An explainer that ignores the model: the horizontal edge strength of the input, ``[B, H, W]``."""
    difference = (inputs[..., :, 1:] - inputs[..., :, :-1]).abs().mean(dim=1)
    return nn.functional.pad(difference, (0, 1))


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def module_state_equal(model: nn.Module, snapshot: dict[str, torch.Tensor], module: str) -> bool:
    state = model.state_dict()
    keys = [key for key in snapshot if key.startswith(f"{module}.")]
    return all(torch.equal(state[key], snapshot[key]) for key in keys)


@pytest.fixture
def model() -> nn.Sequential:
    return edge_detector_cnn()


@pytest.fixture
def images() -> torch.Tensor:
    return square_images()


TARGETS = torch.tensor([0, 1, 2, 0])


# ---------------------------------------------------------------------------
# Steps


def test_layer_steps_top_down(model):
    steps = randomization_steps(model, "layer")
    assert [label for label, _ in steps] == LAYERS_TOP_DOWN
    assert [names for _, names in steps] == [[name] for name in LAYERS_TOP_DOWN]


def test_block_steps_merge_batchnorm(model):
    steps = randomization_steps(model, "block")
    assert [label for label, _ in steps] == ["fc", "conv2+bn2", "conv1+bn1"]


def test_block_steps_expand_sequential_children():
    model = nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
            stages=nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3)),
            pool=nn.AdaptiveAvgPool2d(1),
            head=nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(4, 2)),
        )
    )
    block_labels = [label for label, _ in randomization_steps(model, "block")]
    stage_labels = [label for label, _ in randomization_steps(model, "stage")]
    assert block_labels == ["head.2", "stages.3", "stages.0+stages.1", "stem.0+stem.1"]
    assert stage_labels == ["head", "stages", "stem"]


def test_explicit_order_steps(model):
    steps = randomization_steps(model, order=["fc", ["conv2", "bn2"]])
    assert steps == [("fc", ["fc"]), ("conv2+bn2", ["conv2", "bn2"])]


@pytest.mark.parametrize(
    "order, message",
    [(["missing"], "not found"), (["relu1"], "no parameters"), ([], "empty"), ([[]], "empty list")],
)
def test_explicit_order_rejects_invalid(model, order, message):
    with pytest.raises(ValueError, match=message):
        randomization_steps(model, order=order)


def test_unknown_granularity_rejected(model):
    with pytest.raises(ValueError, match="granularity"):
        randomization_steps(model, "channel")


# ---------------------------------------------------------------------------
# Re-initialization


def test_randomize_modules_resets_batchnorm(model):
    randomize_modules(model, ["bn1"], seed=0)
    assert torch.equal(model.bn1.weight, torch.ones(4))
    assert torch.equal(model.bn1.bias, torch.zeros(4))
    assert torch.equal(model.bn1.running_mean, torch.zeros(4))
    assert torch.equal(model.bn1.running_var, torch.ones(4))


def test_randomize_modules_keeps_batchnorm_statistics(model):
    running_var = model.bn1.running_var.clone()
    randomize_modules(model, ["bn1"], seed=0, keep_batchnorm_statistics=True)
    assert torch.equal(model.bn1.weight, torch.ones(4))
    assert torch.equal(model.bn1.running_var, running_var)


def test_randomize_modules_conv_within_default_bound(model):
    randomize_modules(model, ["conv2"], seed=0)
    bound = 1.0 / np.sqrt(4 * 3 * 3)
    assert model.conv2.weight.abs().max() <= bound
    assert model.conv2.bias.abs().max() <= bound
    assert model.conv2.weight.std() > bound / 4


def test_randomize_modules_seeded(model):
    other = edge_detector_cnn()
    randomize_modules(model, ["conv2", "fc"], seed=3)
    randomize_modules(other, ["conv2", "fc"], seed=3)
    assert torch.equal(model.conv2.weight, other.conv2.weight)
    assert torch.equal(model.fc.weight, other.fc.weight)
    randomize_modules(other, ["conv2"], seed=4)
    assert not torch.equal(model.conv2.weight, other.conv2.weight)


def test_randomize_modules_leaves_global_rng(model):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    randomize_modules(model, ["conv1", "conv2", "fc"], seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_randomize_modules_recurses_into_blocks():
    model = nn.Sequential(OrderedDict(block=nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))
    with torch.no_grad():
        model.block[1].weight.fill_(2.0)
    done = randomize_modules(model, ["block"], seed=0)
    assert done == ["block.0", "block.1"]
    assert torch.equal(model.block[1].weight, torch.ones(4))


# ---------------------------------------------------------------------------
# Similarity


def test_identical_maps_similarity_one():
    maps = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    similarity = map_similarity(maps, maps)
    np.testing.assert_allclose(similarity["spearman"], 1.0)
    np.testing.assert_allclose(similarity["ssim"], 1.0)


def test_similarity_uses_absolute_values():
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0))
    similarity = map_similarity(maps, -maps)
    np.testing.assert_allclose(similarity["spearman"], 1.0)
    np.testing.assert_allclose(similarity["ssim"], 1.0)


def test_similarity_of_independent_maps_low():
    generator = torch.Generator().manual_seed(0)
    first, second = torch.rand(2, 4, 32, 32, generator=generator)
    similarity = map_similarity(first, second)
    assert np.abs(similarity["spearman"]).max() < 0.2
    assert np.abs(similarity["ssim"]).max() < 0.2


def test_constant_map_spearman_nan():
    maps = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0))
    similarity = map_similarity(maps, torch.zeros_like(maps))
    assert np.isnan(similarity["spearman"][0])
    assert np.isfinite(similarity["ssim"][0])


def test_similarity_small_maps_use_smaller_window():
    maps = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(map_similarity(maps, maps)["ssim"], 1.0)


def test_similarity_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="same shape"):
        map_similarity(torch.rand(2, 8, 8), torch.rand(2, 8, 9))


# ---------------------------------------------------------------------------
# Cascading randomization


def test_cascading_leaves_original_model(model, images):
    before = state_snapshot(model)
    cascading_randomization(model, images, TARGETS, make_explainer("grad"), progress=False)
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert all(parameter.grad is None for parameter in model.parameters())


def test_cascading_randomizes_cumulatively(model, images):
    original = state_snapshot(model)
    snapshots = []

    def recording_explainer(randomized, inputs, target):
        snapshots.append(state_snapshot(randomized))
        return edge_map(randomized, inputs, target)

    cascading_randomization(model, images, TARGETS, recording_explainer, progress=False)

    assert len(snapshots) == len(LAYERS_TOP_DOWN) + 1
    for step, snapshot in enumerate(snapshots):
        probe = edge_detector_cnn()
        probe.load_state_dict(snapshot)
        for position, layer in enumerate(LAYERS_TOP_DOWN):
            unchanged = module_state_equal(probe, original, layer)
            if position < step:
                assert not unchanged, f"step {step}: {layer} should be randomized"
            else:
                assert unchanged, f"step {step}: {layer} should keep its trained values"


def test_cascading_step_zero_rows_equal_one(model, images):
    rows = cascading_randomization(model, images, TARGETS, make_explainer("grad"), progress=False)
    first = [row for row in rows if row["step"] == 0]
    assert {row["metric"] for row in first} == {"spearman", "ssim"}
    for row in first:
        assert row["layer"] == "original"
        assert row["mean"] == pytest.approx(1.0)
        np.testing.assert_allclose(row["values"], 1.0)


def test_cascading_row_fields(model, images):
    rows = cascading_randomization(model, images, TARGETS, make_explainer("grad"), progress=False)
    assert len(rows) == 2 * (len(LAYERS_TOP_DOWN) + 1)
    assert [row["layer"] for row in rows if row["metric"] == "spearman"] == ["original", *LAYERS_TOP_DOWN]
    for row in rows:
        assert len(row["values"]) == images.shape[0]
        assert row["valid"] == images.shape[0]
        assert row["mean"] == pytest.approx(np.nanmean(row["values"]))


def test_gradient_decorrelates_after_full_randomization(model, images):
    rows = cascading_randomization(model, images, TARGETS, make_explainer("grad"), progress=False)
    spearman = {row["step"]: row["mean"] for row in rows if row["metric"] == "spearman"}
    ssim = {row["step"]: row["mean"] for row in rows if row["metric"] == "ssim"}
    final = max(spearman)
    assert spearman[final] < 0.5 < spearman[0]
    assert ssim[final] < 0.5 < ssim[0]


def test_cascading_reproducible_with_seed(model, images):
    explain = make_explainer("grad")
    first = cascading_randomization(model, images, TARGETS, explain, seed=5, progress=False)
    second = cascading_randomization(model, images, TARGETS, explain, seed=5, progress=False)
    assert [row["values"] for row in first] == [row["values"] for row in second]


def test_cascading_returns_maps(model, images):
    rows, maps = cascading_randomization(
        model, images, TARGETS, make_explainer("grad"), progress=False, granularity="block", return_maps=True
    )
    assert maps.shape == (4, images.shape[0], images.shape[2], images.shape[3])
    similarity = map_similarity(maps[0], maps[-1])
    last = {row["metric"]: row["values"] for row in rows if row["step"] == 3}
    np.testing.assert_allclose(similarity["spearman"], last["spearman"])


def test_cascading_scalar_target(model, images):
    rows = cascading_randomization(model, images, 1, make_explainer("grad"), order=["fc"], progress=False)
    assert [row["step"] for row in rows] == [0, 0, 1, 1]


def test_cascading_rejects_training_mode(model, images):
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        cascading_randomization(model, images, TARGETS, make_explainer("grad"), progress=False)


def test_cascading_rejects_bad_explainer_shape(model, images):
    def flat_explainer(randomized, inputs, target):
        return inputs.mean(dim=(1, 2))

    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        cascading_randomization(model, images, TARGETS, flat_explainer, progress=False)


def test_independent_randomizes_one_step(model, images):
    original = state_snapshot(model)
    snapshots = []

    def recording_explainer(randomized, inputs, target):
        snapshots.append(state_snapshot(randomized))
        return edge_map(randomized, inputs, target)

    independent_randomization(model, images, TARGETS, recording_explainer, progress=False)
    for step, snapshot in enumerate(snapshots[1:], start=1):
        probe = edge_detector_cnn()
        probe.load_state_dict(snapshot)
        changed = [layer for layer in LAYERS_TOP_DOWN if not module_state_equal(probe, original, layer)]
        assert changed == [LAYERS_TOP_DOWN[step - 1]]


def test_long_format_rows(model, images):
    rows = cascading_randomization(model, images, TARGETS, edge_map, order=["fc"], progress=False)
    table = long_format(rows, model="tiny")
    assert len(table) == 2 * 2 * images.shape[0]
    assert set(table[0]) == {"model", "step", "layer", "metric", "image", "value"}


# ---------------------------------------------------------------------------
# Flags


def test_flag_model_independent_explainer(model, images):
    rows = cascading_randomization(model, images, TARGETS, edge_map, progress=False)
    assert flag_insensitive(rows) is True


def test_flag_spares_gradient(model, images):
    rows = cascading_randomization(model, images, TARGETS, make_explainer("grad"), progress=False)
    assert flag_insensitive(rows) is False


def test_flag_mapping_of_methods(model, images):
    results = {
        "edges": cascading_randomization(model, images, TARGETS, edge_map, progress=False),
        "grad": cascading_randomization(model, images, TARGETS, make_explainer("grad"), progress=False),
    }
    assert flag_insensitive(results) == {"edges": True, "grad": False}
    assert flag_insensitive(results, threshold=1.01) == {"edges": False, "grad": False}


def test_flag_requires_randomized_step():
    rows = [{"step": 0, "metric": "spearman", "mean": 1.0}]
    with pytest.raises(ValueError, match="no randomized step"):
        flag_insensitive(rows)


def test_flag_nan_not_flagged():
    rows = [{"step": 1, "metric": "spearman", "mean": float("nan")}]
    assert flag_insensitive(rows) is False


# ---------------------------------------------------------------------------
# ParchGrad explainer


def tiny_statistics() -> SimpleNamespace:
    """Class-wise statistics of ``conv2`` (6 channels): class k favours channels k and k + 3."""
    pvalues = torch.full((NUM_CLASSES, 6), 0.9, dtype=torch.float64)
    for label in range(NUM_CLASSES):
        pvalues[label, [label, label + 3]] = 0.001
    return SimpleNamespace(
        ttest_pvalues={"conv2": pvalues},
        shapiro_pvalues={"conv2": torch.full((6,), 0.01, dtype=torch.float64)},
        mean={"conv2": torch.zeros(6)},
        std={"conv2": torch.ones(6)},
    )


def test_parchgrad_explainer_differs_from_plain(model, images):
    selector = ClassSelector(tiny_statistics(), quantile=0.34)
    plain = make_explainer("grad")(model, images, TARGETS)
    controlled = make_explainer("grad", selector, layers=["conv2"])(model, images, TARGETS)
    assert controlled.shape == plain.shape
    assert not torch.allclose(controlled, plain)


def test_parchgrad_cascading_uses_copy(model, images):
    selector = ClassSelector(tiny_statistics(), quantile=0.34)
    explain = make_explainer("grad", selector, layers=["conv2"], variance_conservation=True)
    before = state_snapshot(model)
    rows = cascading_randomization(model, images, TARGETS, explain, progress=False)
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(not module._forward_hooks for module in model.modules())
    spearman = [row["mean"] for row in rows if row["metric"] == "spearman"]
    assert spearman[0] == pytest.approx(1.0)
    assert spearman[-1] < 0.5
    assert flag_insensitive(rows) is False


def test_explainer_rejects_parchgrad_options_without_selector():
    with pytest.raises(ValueError, match="no selector"):
        make_explainer("grad", layers=["conv2"])
    with pytest.raises(ValueError, match="no selector"):
        make_explainer("grad", variance_conservation=False)


def test_explainer_rejects_unknown_method():
    with pytest.raises(ValueError, match="Unknown attribution method"):
        make_explainer("gradcam")


# ---------------------------------------------------------------------------
# Experiment and figure

EXPERIMENT_MODULES = ("experiments.sanity", "experiments.evaluate", "experiments.statistics", "parchgrad.models")
experiments_available = all(importlib.util.find_spec(name) is not None for name in EXPERIMENT_MODULES)


@pytest.mark.skipif(not experiments_available, reason="the experiment, model or statistics modules are missing")
def test_sanity_run_end_to_end(tmp_path):
    from hydra import compose, initialize

    from experiments.sanity import run
    from parchgrad.models import build_model

    weights = tmp_path / "resnet18.pt"
    torch.manual_seed(0)
    torch.save(build_model("resnet18", num_classes=3).state_dict(), weights)
    overrides = [
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.results_dir={tmp_path / 'results'}",
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.figures_dir={tmp_path / 'figures'}",
        "~models.vgg16",
        "~models.efficientnet_b0",
        f"models.resnet18.weights={weights}",
        "data.image_size=32",
        "data.num_classes=3",
        "data.num_train=12",
        "data.num_val=0",
        "data.num_test=3",
        "statistics.max_images=12",
        "statistics.batch_size=12",
        "sanity.num_images=2",
        "sanity.granularity=stage",
        "sanity.save_maps=true",
    ]
    with initialize(config_path="../conf", version_base="1.3"):
        cfg = compose(config_name="sanity", overrides=overrides)
    summary = run(cfg)

    import pandas as pd

    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(table.columns) == ["model", "method", "setting", "step", "layer", "metric", "image", "value"]
    assert set(table["method"]) == {"plain", "parchgrad"}
    steps = ["original", "fc", "layer4", "layer3", "layer2", "layer1", "conv1+bn1"]
    assert summary["models"]["resnet18"]["steps"] == steps
    assert len(table) == 2 * len(steps) * 2 * 2  # methods x steps x metrics x images
    assert set(summary["models"]["resnet18"]["methods"]["parchgrad"]) >= {"final_spearman", "final_ssim", "flagged"}

    stored = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert stored["threshold"] == 0.5
    assert (tmp_path / "out" / "maps_resnet18_parchgrad.npz").is_file()
    assert (tmp_path / "figures" / "sanity_checks.png").is_file()
    markdown = (tmp_path / "figures" / "sanity_checks.md").read_text()
    assert "| resnet18 | parchgrad |" in markdown
