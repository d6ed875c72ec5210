import json
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from experiments import e1_aggregation

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture
def tiny_cfg(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            config_name="e1_aggregation",
            overrides=[
                "monte_carlo.draws=40",
                "monte_carlo.l_counts=[1,10,100]",
                "monte_carlo.scale_ratios=[0.1,1.0]",
                f"paths.output_dir={tmp_path / 'run'}",
                f"paths.results_dir={tmp_path / 'store'}",
                f"paths.figures_dir={tmp_path / 'figures'}",
            ],
        )


def test_e1_run_writes_results_and_figures(tiny_cfg, tmp_path):
    summary = e1_aggregation.run(tiny_cfg)
    run_dir = tmp_path / "run"

    for name in ("config.yaml", "results.csv", "single_draws.json", "summary.json"):
        assert (run_dir / name).is_file(), name
    table = pd.read_csv(run_dir / "results.csv")
    assert len(table) == 2 * 3 * 2  # distributions x l_counts x scale_ratios
    assert set(table["distribution"]) == {"normal", "uniform"}
    assert (table["draws"] == 40).all()

    panels = json.loads((run_dir / "single_draws.json").read_text())["panels"]
    assert [panel["distribution"] for panel in panels] == ["normal", "uniform"]
    assert len(panels[1]["h"]) == 10
    assert len(panels[1]["l"]) == 100

    for name in ("e1_aggregation.png", "e1_monte_carlo.png"):
        path = tmp_path / "figures" / name
        assert path.is_file(), name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert len(summary["figures"]) == 2
    assert summary["skipped"] is False


def test_e1_rerun_is_skipped_and_replots(tiny_cfg, tmp_path):
    e1_aggregation.run(tiny_cfg)
    (tmp_path / "figures" / "e1_monte_carlo.png").unlink()
    summary = e1_aggregation.run(tiny_cfg)
    assert summary["skipped"] is True
    assert (tmp_path / "figures" / "e1_monte_carlo.png").is_file()


def test_e1_figure_draws_match_seed_21(tiny_cfg, tmp_path):
    from parchgrad import toy

    e1_aggregation.run(tiny_cfg)
    panels = json.loads((tmp_path / "run" / "single_draws.json").read_text())["panels"]
    expected = toy.released_figure_vectors(seed=21, distribution="uniform")
    assert panels[1]["seed"] == 21
    assert panels[1]["h"] == expected["h"].tolist()
    assert panels[1]["l"] == expected["l"].tolist()


def test_plot_script_rejects_missing_results(tmp_path):
    from scripts.plot_e1 import plot_all

    with pytest.raises(FileNotFoundError, match="single_draws.json"):
        plot_all(tmp_path, tmp_path / "figures")
