"""Draw the E2 (conserve magnitude) figures from finished runs' saved results.

Reads, from each finished E2 run in the results store, ``summary.json`` (mean
and 95% CI per setting) and ``maps.npz`` (images and maps), and writes:

- ``e2_mu_in_w.png``: mu_in_w of the plain method and of ParchGrad on the
  default hooked set, per quantile with VC on and off, one panel per model;
- ``e2_layer_ratio.png``: mu_in_w against the hooked fraction of all
  convolutions, VC on and off, one panel per model;
- ``e2_maps_<model>.png``: per model, rows of image, plain map, ParchGrad
  without VC and ParchGrad with VC.

Nothing is recomputed. For each (model, data, attribution) the most recently
finished run is used.

Usage::

    python -m scripts.plot_e2 [--results-dir results] [--figures-dir figures] [--data synthetic]
    python -m scripts.plot_e2 --runs results/e2_magnitude/<hash> ...
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.common import find_completed_runs  # noqa: E402
from scripts.figures import save_figure  # noqa: E402

log = logging.getLogger(__name__)

EXPERIMENT = "e2_magnitude"
METRIC = "mu_in_w"
VC_COLORS = {True: "tab:blue", False: "tab:orange"}
PLAIN_COLOR = "tab:gray"


def latest_runs(run_dirs: list[Path], data: str | None = None) -> dict[str, Path]:
    """Return the last run directory per model (given oldest first), keeping only ``data`` when set."""
    chosen: dict[str, Path] = {}
    for run_dir in run_dirs:
        summary = json.loads((run_dir / "summary.json").read_text())
        if data is not None and summary.get("data") != data:
            continue
        chosen[summary["model"]] = run_dir
    return chosen


def summary_table(run_dir: Path) -> pd.DataFrame:
    """Return a run's per-setting mean / CI table from its ``summary.json``."""
    records = json.loads((run_dir / "summary.json").read_text())["table"]
    return pd.DataFrame(records)


def _ratio(layers: str) -> float:
    return float(layers.split("=", 1)[1]) if layers.startswith("ratio=") else math.nan


def _error(row: pd.Series) -> tuple[float, float]:
    mean, low, high = row[f"{METRIC}_mean"], row[f"{METRIC}_ci_low"], row[f"{METRIC}_ci_high"]
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return 0.0, 0.0
    return mean - low, high - mean


def plot_bars(runs: dict[str, Path], path: Path) -> Path:
    """Draw mu_in_w bars: plain, then ParchGrad on the default set per quantile, VC on and off."""
    figure, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), squeeze=False)
    for axis, (model, run_dir) in zip(axes[0], runs.items()):
        table = summary_table(run_dir)
        plain = table[table.setting == "plain"]
        default = table[table.layers == "default"].sort_values(["quantile", "vc"], ascending=[True, False])

        labels, means, errors, colors = [], [], [], []
        for _, row in plain.iterrows():
            labels.append("plain")
            means.append(row[f"{METRIC}_mean"])
            errors.append(_error(row))
            colors.append(PLAIN_COLOR)
        for _, row in default.iterrows():
            labels.append(f"q={row['quantile']:g}\n{'VC' if row['vc'] else 'no VC'}")
            means.append(row[f"{METRIC}_mean"])
            errors.append(_error(row))
            colors.append(VC_COLORS[bool(row["vc"])])

        positions = np.arange(len(labels))
        axis.bar(positions, means, yerr=np.array(errors).T, color=colors, capsize=3)
        axis.axhline(1.0, color="black", linewidth=0.8, linestyle=":", label="uniform map")
        axis.set_xticks(positions, labels, fontsize=8)
        axis.set_title(model)
        axis.set_ylabel("mu_in_w (mean, 95% CI)")
    axes[0][0].legend(fontsize=8, loc="lower left")
    figure.suptitle("Energy inside the box, weighted by box area (default hooked layers)")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_layer_ratio(runs: dict[str, Path], path: Path) -> Path:
    """Draw mu_in_w against the hooked fraction of convolutions, one line per (quantile, VC)."""
    figure, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), squeeze=False)
    for axis, (model, run_dir) in zip(axes[0], runs.items()):
        table = summary_table(run_dir)
        table = table.assign(ratio=table.layers.map(_ratio))
        swept = table[table.ratio.notna()]
        for (quantile, vc), group in swept.groupby(["quantile", "vc"]):
            group = group.sort_values("ratio")
            errors = np.array([_error(row) for _, row in group.iterrows()]).T
            axis.errorbar(
                group.ratio,
                group[f"{METRIC}_mean"],
                yerr=errors,
                marker="o",
                capsize=3,
                color=VC_COLORS[bool(vc)],
                linestyle="-" if quantile == swept["quantile"].min() else "--",
                label=f"q={quantile:g}, {'VC' if vc else 'no VC'}",
            )
        plain = table[table.setting == "plain"]
        if not plain.empty:
            axis.axhline(plain[f"{METRIC}_mean"].iloc[0], color=PLAIN_COLOR, linestyle=":", label="plain")
        axis.set_xlabel("hooked fraction of all convolutions")
        axis.set_ylabel("mu_in_w (mean, 95% CI)")
        axis.set_title(model)
        axis.legend(fontsize=7)
    figure.tight_layout()
    return save_figure(figure, path)


def _pick_parchgrad(settings: list[str], vc: bool) -> str | None:
    """Return the first saved default-set setting with the requested VC value (lowest quantile first)."""
    suffix = "_vc_default" if vc else "_novc_default"
    matches = [name for name in settings if name.endswith(suffix)]
    return matches[0] if matches else None


def plot_maps(model: str, run_dir: Path, path: Path, max_rows: int = 6) -> Path | None:
    """Draw the qualitative grid of one model: image, plain, ParchGrad without VC, ParchGrad with VC.

    The first ``max_rows`` saved images are shown; E2 may save more for the claims report.
    """
    maps_file = run_dir / "maps.npz"
    if not maps_file.is_file():
        log.warning("No maps.npz in %s; skipping the qualitative grid of %s", run_dir, model)
        return None
    saved = np.load(maps_file)
    settings = [str(name) for name in saved["settings"]]
    columns = [("plain", "plain"), (_pick_parchgrad(settings, False), "no VC"), (_pick_parchgrad(settings, True), "VC")]
    columns = [(name, title) for name, title in columns if name is not None]
    images = saved["images"]
    rows = min(images.shape[0], max_rows)

    figure, axes = plt.subplots(rows, len(columns) + 1, figsize=(2.0 * (len(columns) + 1), 2.0 * rows), squeeze=False)
    for row in range(rows):
        axes[row][0].imshow(images[row])
        axes[row][0].set_title(f"label {int(saved['labels'][row])}", fontsize=8)
        for column, (name, title) in enumerate(columns, start=1):
            heat = saved["maps"][settings.index(name), row]
            # Each map is scaled to its own maximum: the figure compares shapes, not magnitudes.
            scale = heat.max() if heat.max() > 0 else 1.0
            axes[row][column].imshow(heat / scale, cmap="inferno", vmin=0.0, vmax=1.0)
            if row == 0:
                axes[row][column].set_title(name if title == "plain" else f"{name}\n({title})", fontsize=7)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"E2 saliency maps, {model}")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_all(runs: dict[str, Path], figures_dir: Path) -> list[Path]:
    """Write every E2 figure for ``runs`` (model to run directory) into ``figures_dir``."""
    if not runs:
        raise FileNotFoundError("No finished E2 runs to plot; run `python -m experiments.e2_magnitude` first.")
    written = [
        plot_bars(runs, figures_dir / "e2_mu_in_w.png"),
        plot_layer_ratio(runs, figures_dir / "e2_layer_ratio.png"),
    ]
    for model, run_dir in runs.items():
        grid = plot_maps(model, run_dir, figures_dir / f"e2_maps_{model}.png")
        if grid is not None:
            written.append(grid)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="results store of the experiments")
    parser.add_argument("--runs", type=Path, nargs="*", help="E2 run directories to plot, instead of the latest per model")
    parser.add_argument("--data", default="synthetic", help="plot only runs on this data set (data.name)")
    parser.add_argument("--figures-dir", type=Path, default=Path("figures"), help="folder of the PNG files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    run_dirs = args.runs if args.runs else find_completed_runs(args.results_dir, EXPERIMENT)
    runs = latest_runs(list(run_dirs), args.data)
    log.info("Plotting E2 runs: %s", {model: str(path) for model, path in runs.items()})
    return plot_all(runs, args.figures_dir)


if __name__ == "__main__":
    main()
