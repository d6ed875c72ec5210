"""Smoke test of the command that builds the benchmark and trains the reference models."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.prepare import run

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def _tiny_config(cache_dir, data_root):
    overrides = [
        f"paths.cache_dir={cache_dir}",
        f"data.root={data_root}",
        "data.image_size=48",
        "data.num_train=16",
        "data.num_val=0",
        "data.num_test=10",
        "progress=false",
    ]
    for name in ("resnet18", "vgg16", "efficientnet_b0"):
        overrides += [f"models.{name}.train.max_steps=1", f"models.{name}.train.batch_size=8"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="prepare", overrides=overrides)


def test_prepare_config_composes():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="prepare")
    assert list(cfg.models) == ["resnet18", "vgg16", "efficientnet_b0"]
    assert cfg.models.vgg16.architecture == "vgg16_bn"
    assert cfg.data.image_size == 96


@pytest.mark.slow
def test_prepare_trains_and_caches(tmp_path, monkeypatch, capsys):
    # A relative data root resolves against the launch directory.
    monkeypatch.chdir(tmp_path)
    cfg = _tiny_config(tmp_path / "cache", "relative_data")

    result = run(cfg)
    assert Path(result["data_root"]).parent == tmp_path / "relative_data"
    assert set(result["models"]) == {"resnet18", "vgg16", "efficientnet_b0"}
    for row in result["models"].values():
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert row["cached"] is False
        assert Path(row["checkpoint"]).is_file()
    table = capsys.readouterr().out
    assert "vgg16_bn" in table

    again = run(cfg)
    assert all(row["cached"] for row in again["models"].values())
