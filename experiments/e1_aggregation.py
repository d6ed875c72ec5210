"""E1: how many small gradients add up against a few large ones, in two dimensions.

Draws the single figure twice, then quantifies the effect over many draws.
The left panel has normal entries, as the text of Park, Jeon and Choi (2023),
"ParchGrad: Controlled Internal Gradients for Reliable Saliency Map",
describes. The right panel has uniform entries with the seed and draw order
of ``labs/2d_vector/visualize.ipynb`` in their code release v23.11.07.1. The
Monte Carlo study varies |L| and the scale ratio and puts the Gaussian-model
expectation of :mod:`parchgrad.toy` beside each Monte Carlo mean.

Run::

    python -m experiments.e1_aggregation
    python -m experiments.e1_aggregation monte_carlo.draws=20000

Outputs in the run directory: ``config.yaml`` (resolved), ``results.csv``
(one row per Monte Carlo setting), ``single_draws.json`` (the figure's
vectors and sums) and ``summary.json``. The figures go to ``paths.figures_dir``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from experiments.common import RunContext, RunResult, run_experiment, to_plain
from parchgrad import toy

log = logging.getLogger(__name__)

EXPERIMENT = "e1_aggregation"
PANEL_TITLES = {
    "normal": "as described: entries N(0, s^2)",
    "uniform": "as released: entries uniform on (-s/2, s/2)",
}


def single_figure_panels(cfg: DictConfig) -> list[dict[str, Any]]:
    """Draw the single figure's vectors once per distribution in ``cfg.figure.distributions``."""
    figure = cfg.figure
    panels = []
    for distribution in figure.distributions:
        vectors = toy.released_figure_vectors(
            seed=int(figure.seed),
            h_count=int(figure.h_count),
            h_scales=to_plain(figure.h_scales),
            l_count=int(figure.l_count),
            l_scales=to_plain(figure.l_scales),
            distribution=distribution,
        )
        panels.append(
            {
                "distribution": distribution,
                "title": f"{PANEL_TITLES[distribution]}, seed {int(figure.seed)}",
                "seed": int(figure.seed),
                "h": vectors["h"].tolist(),
                "l": vectors["l"].tolist(),
                **toy.figure_summary(vectors),
            }
        )
    return panels


def _body(context: RunContext) -> RunResult:
    cfg = context.cfg
    log.info("Drawing the single figure (figure.seed=%s, figure.distributions=%s)", cfg.figure.seed, list(cfg.figure.distributions))
    panels = single_figure_panels(cfg)
    context.save_text("single_draws.json", json.dumps({"panels": panels}, indent=2) + "\n")

    mc = cfg.monte_carlo
    log.info(
        "Simulating %d draws per setting (monte_carlo.draws) over %d L sizes and %d scale ratios",
        mc.draws, len(mc.l_counts), len(mc.scale_ratios),
    )
    table = toy.monte_carlo_table(
        draws=int(mc.draws),
        seed=int(cfg.seed),
        h_count=int(mc.h_count),
        h_scales=to_plain(mc.h_scales),
        l_counts=[int(count) for count in mc.l_counts],
        scale_ratios=[float(ratio) for ratio in mc.scale_ratios],
        distributions=list(mc.distributions),
        confidence=float(mc.confidence),
    )
    summary = {
        f"figure_{panel['distribution']}": {"angle": panel["angle"], "norm_ratio": panel["norm_ratio"]}
        for panel in panels
    }
    return RunResult(table=table, summary=summary)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run E1 and, with ``cfg.plot``, draw its figures from the saved results.

    The summary is that of :func:`experiments.common.run_experiment`, plus
    ``figures``, the PNG paths written (empty without ``cfg.plot``).
    """
    summary = run_experiment(cfg, EXPERIMENT, _body)
    summary["figures"] = []
    if cfg.plot:
        # Imported here so that a run without figures never loads matplotlib.
        from scripts.plot_e1 import plot_all

        # The store contains the output directory's files, also when a rerun was skipped.
        figures = plot_all(Path(summary["store_dir"]), Path(cfg.paths.figures_dir))
        summary["figures"] = [str(path) for path in figures]
        log.info("Figures written to %s (paths.figures_dir)", cfg.paths.figures_dir)
    return summary


@hydra.main(config_path="../conf", config_name=EXPERIMENT, version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
