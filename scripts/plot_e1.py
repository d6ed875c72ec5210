"""Draw the E1 gradient-aggregation figures from a finished run's saved results.

Reads ``single_draws.json`` (the vectors of the single 2-D figure) and
``results.csv`` (the Monte Carlo table of :func:`parchgrad.toy.monte_carlo_table`)
from a results directory, and writes ``e1_aggregation.png`` and
``e1_monte_carlo.png``. Nothing is recomputed.

Usage::

    python -m scripts.plot_e1 RESULTS_DIR [--figures-dir figures]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from scripts.figures import save_figure  # noqa: E402

log = logging.getLogger(__name__)

SINGLE_DRAWS_FILE = "single_draws.json"
MONTE_CARLO_FILE = "results.csv"
AGGREGATION_FIGURE = "e1_aggregation.png"
MONTE_CARLO_FIGURE = "e1_monte_carlo.png"

H_COLOR = "tab:blue"
L_COLOR = "tab:red"
TOTAL_COLOR = "black"


def _draw_arrows(axis: plt.Axes, vectors: np.ndarray, color: str, alpha: float, width: float) -> None:
    origin = np.zeros(len(vectors))
    axis.quiver(
        origin, origin, vectors[:, 0], vectors[:, 1],
        color=color, alpha=alpha, width=width, angles="xy", scale_units="xy", scale=1.0,
    )


def _draw_panel(axis: plt.Axes, panel: dict) -> None:
    h_vectors = np.asarray(panel["h"], dtype=float)
    l_vectors = np.asarray(panel["l"], dtype=float)
    sums = {name: np.asarray(panel[name], dtype=float)[None, :] for name in ("h_sum", "l_sum", "total")}

    axis.axhline(0.0, color="gray", linestyle="--", linewidth=0.8)
    axis.axvline(0.0, color="gray", linestyle="--", linewidth=0.8)
    _draw_arrows(axis, h_vectors, H_COLOR, alpha=0.35, width=0.006)
    _draw_arrows(axis, l_vectors, L_COLOR, alpha=0.35, width=0.004)
    _draw_arrows(axis, sums["h_sum"], H_COLOR, alpha=1.0, width=0.014)
    _draw_arrows(axis, sums["l_sum"], L_COLOR, alpha=1.0, width=0.014)
    _draw_arrows(axis, sums["total"], TOTAL_COLOR, alpha=1.0, width=0.014)

    points = np.concatenate([h_vectors, l_vectors, *sums.values(), np.zeros((1, 2))])
    extent = 1.15 * np.abs(points).max()
    axis.set_xlim(-extent, extent)
    axis.set_ylim(-extent, extent)
    axis.set_aspect("equal")
    axis.set_xlabel("dimension 1")
    axis.set_ylabel("dimension 2")
    axis.set_title(
        f"{panel['title']}\nangle(H sum, total) = {panel['angle']:.1f} deg, "
        f"|L sum| / |H sum| = {panel['norm_ratio']:.2f}",
        fontsize=9,
    )
    handles = [
        Line2D([], [], color=H_COLOR, linewidth=2.5, label=f"sum of H, |H| = {len(h_vectors)}"),
        Line2D([], [], color=L_COLOR, linewidth=2.5, label=f"sum of L, |L| = {len(l_vectors)}"),
        Line2D([], [], color=TOTAL_COLOR, linewidth=2.5, label="sum of H and L"),
    ]
    axis.legend(handles=handles, loc="upper right", fontsize=8)


def plot_aggregation(single_draws_path: str | Path, output_path: str | Path) -> Path:
    """Draw one panel per saved draw (as described and as released), side by side."""
    with open(single_draws_path) as draws_file:
        panels = json.load(draws_file)["panels"]
    figure, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 5.2), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        _draw_panel(axis, panel)
    figure.tight_layout()
    return save_figure(figure, Path(output_path))


def plot_monte_carlo(table_path: str | Path, output_path: str | Path) -> Path:
    """Plot the Monte Carlo angle and norm ratio against |L|, one row per distribution.

    Markers with error bars are Monte Carlo means with their confidence
    interval, and dashed lines are the Gaussian-model expectations.
    """
    table = pd.read_csv(table_path)
    distributions = list(dict.fromkeys(table["distribution"]))
    ratios = sorted(table["scale_ratio"].unique())
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, len(ratios)))

    figure, axes = plt.subplots(len(distributions), 2, figsize=(11.0, 4.0 * len(distributions)), squeeze=False)
    for row, distribution in enumerate(distributions):
        subset = table[table["distribution"] == distribution]
        for column, (name, label) in enumerate(
            (("angle", "angle(H sum, total) [deg]"), ("norm_ratio", "|L sum| / |H sum|"))
        ):
            axis = axes[row, column]
            for color, ratio in zip(colors, ratios):
                rows = subset[subset["scale_ratio"] == ratio].sort_values("l_count")
                mean = rows[f"{name}_mean"].to_numpy()
                error = np.vstack([mean - rows[f"{name}_ci_low"], rows[f"{name}_ci_high"] - mean])
                axis.errorbar(
                    rows["l_count"], mean, yerr=error, color=color, marker="o", markersize=4,
                    linestyle="none", capsize=2, label=f"L scale / H scale = {ratio:g}",
                )
                axis.plot(rows["l_count"], rows[f"{name}_analytic"], color=color, linestyle="--", linewidth=1)
            axis.set_xscale("log")
            if name == "norm_ratio":
                axis.set_yscale("log")
                axis.axhline(1.0, color="gray", linewidth=0.8)
            axis.set_xlabel("|L| (number of small vectors)")
            axis.set_ylabel(label)
            draws = int(subset["draws"].iloc[0])
            axis.set_title(f"{distribution} draws, |H| = {int(subset['h_count'].iloc[0])}, {draws} draws per point", fontsize=9)
            axis.grid(True, which="both", alpha=0.3)
        handles, labels = axes[row, 0].get_legend_handles_labels()
        handles.append(Line2D([], [], color="gray", linestyle="--"))
        labels.append("Gaussian-model expectation")
        axes[row, 0].legend(handles, labels, fontsize=7, loc="upper left")
    figure.tight_layout()
    return save_figure(figure, Path(output_path))


def plot_all(results_dir: str | Path, figures_dir: str | Path = "figures") -> list[Path]:
    """Write both E1 figures from the files in ``results_dir`` into ``figures_dir``.

    Raises:
        FileNotFoundError: if a results file is missing.
    """
    results_dir = Path(results_dir)
    figures_dir = Path(figures_dir)
    for name in (SINGLE_DRAWS_FILE, MONTE_CARLO_FILE):
        if not (results_dir / name).is_file():
            raise FileNotFoundError(
                f"{results_dir / name} not found. Pass the output directory of a finished "
                "`python -m experiments.e1_aggregation` run."
            )
    return [
        plot_aggregation(results_dir / SINGLE_DRAWS_FILE, figures_dir / AGGREGATION_FIGURE),
        plot_monte_carlo(results_dir / MONTE_CARLO_FILE, figures_dir / MONTE_CARLO_FIGURE),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", help="output directory of an e1_aggregation run")
    parser.add_argument("--figures-dir", default="figures", help="folder the PNG files are written to")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    plot_all(arguments.results_dir, arguments.figures_dir)


if __name__ == "__main__":
    main()
