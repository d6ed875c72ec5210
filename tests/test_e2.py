"""End-to-end tests of the statistics, E2 and evaluate experiments at a tiny size.

The tiny configuration: a synthetic benchmark of 32 px images (40 train, 8 test),
models trained for 2 optimizer steps, statistics over 40 images and 4 explained
images. The numbers mean nothing; the tests check the pipeline and its outputs.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from experiments import e2_magnitude, evaluate, statistics
from experiments.common import COMPLETE_MARKER
from scripts import plot_e2
from tiny_sizes import TINY_DATA_AND_MODEL

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
TINY_OVERRIDES = [
    *TINY_DATA_AND_MODEL,
    "statistics.max_images=40",
    "statistics.batch_size=20",
    "evaluation.num_images=4",
]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """Folder shared by the module's runs, so the benchmark and models are built once."""
    HydraConfig.instance().cfg = None
    return tmp_path_factory.mktemp("tiny")


def tiny_cfg(name: str, root: Path, *overrides: str):
    output = root / "outputs" / uuid.uuid4().hex[:8]
    paths = [
        f"paths.cache_dir={root / 'cache'}",
        f"paths.results_dir={root / 'results'}",
        f"paths.output_dir={output}",
    ]
    tiny = [item for item in TINY_OVERRIDES if name != "statistics" or not item.startswith("evaluation.")]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=[*tiny, *paths, *overrides])


@pytest.fixture(scope="module")
def e2_summary(tiny_root):
    cfg = tiny_cfg("e2_magnitude", tiny_root, "e2.layer_ratios=[0.5]", "e2.saved_images=2")
    return e2_magnitude.run(cfg)


def test_e2_settings_cover_released_grid(tiny_root):
    cfg = tiny_cfg("e2_magnitude", tiny_root)
    labels = [setting.label() for setting in e2_magnitude.e2_settings(cfg)]
    # plain + 2 quantiles x 2 VC on the default set + 4 ratios x 1 quantile x 2 VC
    assert len(labels) == 1 + 4 + 8
    assert len(set(labels)) == len(labels)
    assert labels[0] == "plain"
    assert "cls_q0.1_novc_default" in labels
    assert "cls_q0.05_vc_ratio=0.3" in labels


@pytest.mark.slow
def test_e2_tiny_run_outputs(e2_summary):
    store = Path(e2_summary["store_dir"])
    table = pd.read_csv(store / "results.csv")
    assert e2_summary["skipped"] is False
    assert len(e2_summary["settings"]) == 7
    assert len(table) == 7 * 4
    for column in ["image", "label", "model", "attribution", "selection", "quantile", "vc", "layers",
                   "mu_in", "mu_in_w", "box_valid", "pointing_hit", "mask_mu_in", "morf_aopc", "lerf_lodds"]:
        assert column in table.columns, column
    assert set(table.layers) == {"none", "default", "ratio=0.5"}
    # Deletion runs on the plain and default-set settings only.
    assert table.loc[table.layers == "ratio=0.5", "morf_aopc"].isna().all()
    assert table.loc[table.layers == "default", "morf_aopc"].notna().all()
    assert (store / COMPLETE_MARKER).is_file()


@pytest.mark.slow
def test_e2_tiny_run_summary_and_maps(e2_summary):
    store = Path(e2_summary["store_dir"])
    summary = json.loads((store / "summary.json").read_text())
    assert len(summary["table"]) == 7
    assert "mu_in_w_ci_low" in summary["table"][0]
    assert (store / "table.md").read_text().count("\n| ") == 7 + 1
    deletion = pd.read_csv(store / "deletion.csv")
    assert set(deletion.ratio) == {0.0, 0.1, 0.2, 0.3, 0.4, 0.5}
    assert set(deletion.order) == {"morf", "lerf"}
    maps = np.load(store / "maps.npz")
    assert maps["maps"].shape == (5, 2, 32, 32)
    assert maps["images"].shape == (2, 32, 32, 3)
    assert list(maps["settings"])[0] == "plain"


@pytest.mark.slow
def test_e2_second_run_skipped(e2_summary, tiny_root):
    cfg = tiny_cfg("e2_magnitude", tiny_root, "e2.layer_ratios=[0.5]", "e2.saved_images=2")
    again = e2_magnitude.run(cfg)
    assert again["skipped"] is True
    assert again["config_hash"] == e2_summary["config_hash"]


@pytest.mark.slow
def test_plot_e2_from_saved_results(e2_summary, tiny_root, tmp_path):
    written = plot_e2.main(["--results-dir", str(tiny_root / "results"), "--figures-dir", str(tmp_path)])
    names = sorted(path.name for path in written)
    assert names == ["e2_layer_ratio.png", "e2_maps_resnet18.png", "e2_mu_in_w.png"]
    for path in written:
        assert path.stat().st_size > 1000


@pytest.mark.slow
def test_evaluate_tiny_run(tiny_root):
    cfg = tiny_cfg("evaluate", tiny_root, "selection=ins", "attribution=inputgrad", "evaluation.save_maps=2")
    summary = evaluate.run(cfg)
    table = pd.read_csv(Path(summary["store_dir"]) / "results.csv")
    assert summary["setting"] == "ins_q0.05_vc_default"
    assert len(table) == 4
    assert (table.attribution == "inputgrad").all()
    assert (table.hooked_layers == 8).all()
    assert np.load(Path(summary["output_dir"]) / "maps.npz")["maps"].shape == (2, 32, 32)


@pytest.mark.slow
def test_evaluate_plain_installs_no_hooks(tiny_root):
    cfg = tiny_cfg("evaluate", tiny_root, "selection=none", "evaluation.deletion=false")
    summary = evaluate.run(cfg)
    table = pd.read_csv(Path(summary["store_dir"]) / "results.csv")
    assert summary["setting"] == "plain"
    assert (table.hooked_layers == 0).all()
    assert "morf_aopc" not in table.columns


@pytest.mark.slow
def test_vc_leaves_sequential_vgg_unchanged(tiny_root):
    # In a sequential network each hooked layer only scales a sample's gradient, so
    # every scale-invariant metric is the same with and without VC.
    tables = []
    for vc in ("true", "false"):
        cfg = tiny_cfg(
            "evaluate", tiny_root, "model=vgg16", "evaluation.deletion=false",
            f"parchgrad.variance_conservation={vc}", "parchgrad.quantile=0.5",
        )
        tables.append(pd.read_csv(Path(evaluate.run(cfg)["store_dir"]) / "results.csv"))
    with_vc, without_vc = tables
    assert with_vc.setting.iloc[0] != without_vc.setting.iloc[0]
    np.testing.assert_allclose(with_vc.mu_in_w, without_vc.mu_in_w, rtol=1e-4)
    np.testing.assert_allclose(with_vc.mask_mu_in, without_vc.mask_mu_in, rtol=1e-4)


@pytest.mark.slow
def test_statistics_shards_merge(tiny_root):
    # 30 images: a subset no other test collects, so the final file does not exist yet.
    subset = "statistics.max_images=30"
    shard_cfgs = [tiny_cfg("statistics", tiny_root, subset, "num_shards=2", f"shard_index={i}") for i in (0, 1)]
    shards = [statistics.run(cfg) for cfg in shard_cfgs]
    assert [shard["action"] for shard in shards] == ["shard", "shard"]
    assert all(Path(shard["shard_file"]).is_file() for shard in shards)

    merged = statistics.run(tiny_cfg("statistics", tiny_root, subset, "num_shards=2", "merge=true"))
    assert merged["action"] == "merged"
    final = Path(merged["statistics_file"])
    assert final.is_file()
    assert final.parent == tiny_root / "cache" / "statistics"
    table = pd.read_csv(Path(merged["store_dir"]) / "results.csv")
    assert (table.images == 30).all()

    # Another run configuration that names the same file finds it and collects nothing.
    again = statistics.run(tiny_cfg("statistics", tiny_root, subset, "statistics.batch_size=10"))
    assert again["action"] == "existing"
    assert again["statistics_file"] == str(final)


@pytest.mark.slow
def test_statistics_merge_reports_missing_shards(tiny_root):
    cfg = tiny_cfg("statistics", tiny_root, "statistics.max_images=20", "num_shards=3", "merge=true")
    with pytest.raises(FileNotFoundError, match="shard files are missing"):
        statistics.run(cfg)
