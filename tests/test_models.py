"""Tests of model construction, training and the checkpoint cache."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import warnings

import pytest
import torch
import torchvision
from torch import nn

from parchgrad.layers import default_layer_names
from parchgrad.models import (
    ARCHITECTURES,
    build_model,
    checkpoint_paths,
    load_reference_model,
    model_from_config,
)

TINY_TRAIN = {"epochs": 1, "batch_size": 8, "max_steps": 2, "eval_batch_size": 10}


@pytest.fixture(scope="module")
def trained_cache(tiny_synthetic_config, tmp_path_factory):
    """Return a cache folder holding one tiny ResNet18 checkpoint, trained once per module."""
    cache = tmp_path_factory.mktemp("model_cache")
    load_reference_model("resnet18", tiny_synthetic_config, TINY_TRAIN, cache, progress=False)
    return cache


@pytest.fixture
def cache_copy(trained_cache, tmp_path):
    """Return a private copy of ``trained_cache`` that a test may damage."""
    copy = tmp_path / "cache"
    shutil.copytree(trained_cache, copy)
    return copy


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_build_model_shapes_and_layers(architecture):
    model = build_model(architecture, num_classes=7)
    assert not model.training
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 7)
    # The default hooked layers of parchgrad.layers exist under their ImageNet names.
    assert default_layer_names(model, architecture)


def test_vgg_global_pool_head():
    model = build_model("vgg16_bn", num_classes=10)
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    assert model.avgpool.output_size == 1
    assert isinstance(model.classifier, nn.Linear)
    assert (model.classifier.in_features, model.classifier.out_features) == (512, 10)


def test_vgg16_plain_matches_torchvision():
    model = build_model("vgg16", num_classes=1000, vgg_head="torchvision")
    reference = torchvision.models.vgg16(weights=None)
    assert [name for name, _ in model.named_modules()] == [
        name for name, _ in reference.named_modules()
    ]
    assert not any(isinstance(module, nn.BatchNorm2d) for module in model.modules())
    relus = [module for module in model.features if isinstance(module, nn.ReLU)]
    assert len(relus) == 13
    assert all(relu.inplace for relu in relus)


def test_unknown_architecture_rejected():
    with pytest.raises(ValueError, match="resnet50"):
        build_model("resnet50")


def test_local_weights_round_trip(tmp_path):
    model = build_model("resnet18", num_classes=5)
    path = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), path)
    loaded = build_model("resnet18", num_classes=5, weights=path)
    inputs = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(inputs), loaded(inputs))


def test_local_weights_wrapped_state_dict(tmp_path):
    model = build_model("resnet18", num_classes=5)
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    loaded = build_model("resnet18", num_classes=5, weights=path)
    assert torch.equal(loaded.fc.weight, model.fc.weight)


def test_vgg_head_detected_from_state_dict(tmp_path):
    torchvision_head = build_model("vgg16", num_classes=4, vgg_head="torchvision")
    path = tmp_path / "vgg16.pth"
    torch.save(torchvision_head.state_dict(), path)
    loaded = build_model("vgg16", num_classes=4, weights=path)
    assert isinstance(loaded.classifier, nn.Sequential)
    assert isinstance(loaded.avgpool, nn.AdaptiveAvgPool2d)
    assert loaded.avgpool.output_size == (7, 7)


def test_local_weights_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_model("resnet18", weights=tmp_path / "missing.pth")


def test_local_weights_other_architecture(tmp_path):
    path = tmp_path / "effnet.pth"
    torch.save(build_model("efficientnet_b0", num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match="effnet.pth") as error:
        build_model("resnet18", num_classes=10, weights=path)
    assert "architecture" in str(error.value)


def test_local_weights_other_class_count(tmp_path):
    path = tmp_path / "resnet18_10.pth"
    torch.save(build_model("resnet18", num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match="resnet18_10.pth") as error:
        build_model("resnet18", num_classes=12, weights=path)
    assert "num_classes" in str(error.value)


def test_imagenet_weights_need_1000_classes():
    with pytest.raises(ValueError, match="1000"):
        build_model("resnet18", num_classes=10, weights="IMAGENET1K_V1")


def test_unknown_weights_name():
    with pytest.raises(ValueError, match="IMAGENET9K"):
        build_model("resnet18", weights="IMAGENET9K_V9")


def test_imagenet_download_failure_names_local_option(monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__,
                        "get_state_dict", fail)
    with pytest.raises(RuntimeError) as error:
        build_model("resnet18", weights="IMAGENET1K_V1")
    assert "Could not download" in str(error.value)
    assert "model.weights=/path/to/resnet18.pth" in str(error.value)


@pytest.mark.parametrize("architecture", ["resnet18", "vgg16_bn", "efficientnet_b0"])
def test_tiny_training_run(architecture, tiny_synthetic_config, tmp_path):
    model, info = load_reference_model(
        architecture, tiny_synthetic_config, TINY_TRAIN, tmp_path, progress=False
    )
    assert not model.training
    assert info["cached"] is False
    assert info["train_steps"] == 2
    assert 0.0 <= info["test_accuracy"] <= 1.0
    assert info["num_classes"] == 10
    assert len(info["class_names"]) == 10

    with open(info["checkpoint"].replace(".pt", ".json")) as handle:
        sidecar = json.load(handle)
    assert sidecar["architecture"] == architecture
    assert sidecar["test_accuracy"] == info["test_accuracy"]
    assert len(sidecar["sha256"]) == 64


def test_checkpoint_cache_hit(tiny_synthetic_config, cache_copy):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached, info = load_reference_model(
            "resnet18", tiny_synthetic_config, TINY_TRAIN, cache_copy, progress=False
        )
    assert info["cached"] is True
    assert info["checkpoint"].startswith(str(cache_copy))
    assert not cached.training
    saved = torch.load(info["checkpoint"], weights_only=True)
    for key, tensor in saved.items():
        assert torch.equal(tensor, cached.state_dict()[key]), key


def test_changed_config_new_checkpoint(tmp_path):
    data_key = "abc"
    first, _ = checkpoint_paths("resnet18", data_key, TINY_TRAIN, tmp_path)
    second, _ = checkpoint_paths("resnet18", data_key, {**TINY_TRAIN, "max_lr": 1e-2}, tmp_path)
    third, _ = checkpoint_paths("resnet18", "other", TINY_TRAIN, tmp_path)
    assert len({first, second, third}) == 3


def _checkpoint_files(cache):
    state_path = next((cache / "models").glob("resnet18-*.pt"))
    return state_path, state_path.with_suffix(".json")


def test_corrupt_checkpoint_retrained(tiny_synthetic_config, cache_copy):
    state_path, _ = _checkpoint_files(cache_copy)
    with open(state_path, "r+b") as handle:
        handle.truncate(1000)

    with pytest.warns(UserWarning, match="corrupt or partial"):
        model, retrained = load_reference_model(
            "resnet18", tiny_synthetic_config, TINY_TRAIN, cache_copy, progress=False
        )
    assert retrained["cached"] is False
    assert not model.training
    # The retrained checkpoint verifies again.
    _, reloaded = load_reference_model(
        "resnet18", tiny_synthetic_config, TINY_TRAIN, cache_copy, progress=False
    )
    assert reloaded["cached"] is True


def test_checkpoint_without_sidecar_retrained(tiny_synthetic_config, cache_copy):
    _, sidecar_path = _checkpoint_files(cache_copy)
    os.remove(sidecar_path)
    with pytest.warns(UserWarning, match="no sidecar"):
        _, info = load_reference_model(
            "resnet18", tiny_synthetic_config, TINY_TRAIN, cache_copy, progress=False
        )
    assert info["cached"] is False
    assert sidecar_path.is_file()


@pytest.mark.parametrize(("field", "value"), [("architecture", "vgg16_bn"), ("num_classes", 12)])
def test_sidecar_mismatch_error(tiny_synthetic_config, cache_copy, field, value):
    state_path, sidecar_path = _checkpoint_files(cache_copy)
    sidecar = json.loads(sidecar_path.read_text())
    sidecar[field] = value
    sidecar_path.write_text(json.dumps(sidecar))

    with pytest.raises(ValueError, match="Delete") as error:
        load_reference_model(
            "resnet18", tiny_synthetic_config, TINY_TRAIN, cache_copy, progress=False
        )
    assert str(state_path) in str(error.value)


def test_model_from_config_local_weights(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(build_model("resnet18", num_classes=10).state_dict(), path)
    model, info = model_from_config(
        {"architecture": "resnet18", "weights": str(path), "num_classes": None},
        {"name": "synthetic", "num_classes": 10},
    )
    assert model.fc.out_features == 10
    assert info["weights"] == str(path)


def test_model_from_config_imagenet_needs_weights():
    with pytest.raises(ValueError, match="model.weights"):
        model_from_config({"architecture": "resnet18", "weights": None}, {"name": "imagenet"})


def test_unknown_train_setting_rejected(tiny_synthetic_config, tmp_path):
    with pytest.raises(ValueError, match="learning_rate"):
        load_reference_model(
            "resnet18", tiny_synthetic_config, {"learning_rate": 0.1}, tmp_path, progress=False
        )
