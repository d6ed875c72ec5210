"""End-to-end test of the main job at a tiny size: one model, every stage, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from experiments import main

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# Each stage takes the overrides whose keys it has: prepare and sanity list models under
# `models.<name>`, E2 under `model`, so the training settings appear under both.
STAGE_OVERRIDES = [
    "data.image_size=32",
    "data.num_train=40",
    "data.num_val=0",
    "data.num_test=8",
    "models.resnet18.train.max_steps=2",
    "models.resnet18.train.epochs=1",
    "model.train.max_steps=2",
    "model.train.epochs=1",
    "statistics.max_images=40",
    "statistics.batch_size=20",
    "monte_carlo.draws=50",
    "sanity.num_images=2",
    "claims.resamples=200",
]


@pytest.mark.slow
def test_main_job_tiny(tmp_path, capsys):
    HydraConfig.instance().cfg = None
    overrides = [
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.results_dir={tmp_path / 'results'}",
        f"paths.output_dir={tmp_path / 'outputs'}",
        f"paths.figures_dir={tmp_path / 'figures'}",
        "models.resnet18=4",
        "~models.vgg16",
        "~models.efficientnet_b0",
        "progress=false",
        "stage_overrides=[" + ",".join(f"'{item}'" for item in STAGE_OVERRIDES) + "]",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("main", overrides=overrides)
        summaries = main.run(cfg)

    assert list(summaries["prepare"]["models"]) == ["resnet18"]
    assert summaries["e2"]["resnet18"]["images"] == 4
    assert list(summaries["sanity"]["models"]) == ["resnet18"]
    verdicts = summaries["claims"]["verdicts"]
    assert {"E1", "E2-resnet18", "overall"} <= set(verdicts)
    for name in ("claims.md", "claims.json", "e1_aggregation.png", "e2_mu_in_w.png", "sanity_checks.png"):
        assert (tmp_path / "figures" / name).is_file(), name
    report = json.loads((tmp_path / "figures" / "claims.json").read_text())
    assert report["inputs"]["e2"]["resnet18"] == summaries["e2"]["resnet18"]["store_dir"]
    printed = capsys.readouterr().out
    assert "E2, mu_in_w" in printed
    assert "Main job finished" in printed

    # A second run finds every stage finished and skips it.
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        again = main.run(compose("main", overrides=overrides))
    assert again["e2"]["resnet18"]["skipped"]
    assert again["claims"]["skipped"]


def test_stage_overrides_follow_chosen_groups():
    imagenet = [
        "data=imagenet",
        "data.root=/data/imagenet",
        "data.boxes_dir=/data/val_boxes",
        "model.weights=IMAGENET1K_V1",
        "device=cuda",
        "data.images_per_class=50",
        "statistics.max_images=null",
        "claims.data=imagenet",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        e2_overrides = main._accepted_overrides("e2_magnitude", imagenet)
        claims_overrides = main._accepted_overrides("claims", imagenet)
        e1_overrides = main._accepted_overrides("e1_aggregation", imagenet)
    assert e2_overrides == imagenet[:-1]
    assert claims_overrides == ["claims.data=imagenet"]
    assert e1_overrides == []
