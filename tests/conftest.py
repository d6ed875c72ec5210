"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


# --- Synthetic benchmark ----------------------------------------------------


@pytest.fixture(scope="session")
def tiny_synthetic_config(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Return a ``data`` config of a small synthetic benchmark (48 px, 10 classes, 30/10/10 images)."""
    return {
        "name": "synthetic",
        "root": str(tmp_path_factory.mktemp("synthetic")),
        "image_size": 48,
        "num_classes": 10,
        "num_train": 30,
        "num_val": 10,
        "num_test": 10,
        "seed": 0,
    }


@pytest.fixture(scope="session")
def tiny_synthetic_root(tiny_synthetic_config: dict):
    """Return the folder of the benchmark that ``tiny_synthetic_config`` describes, built once."""
    from parchgrad.data.synthetic import build_synthetic_benchmark

    return build_synthetic_benchmark(tiny_synthetic_config, progress=False)
