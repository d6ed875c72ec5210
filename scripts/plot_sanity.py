"""Draw the model-parameter randomization figure and table from a finished sanity run.

Reads ``results.csv`` of :mod:`experiments.sanity` (columns ``model``,
``method``, ``step``, ``layer``, ``metric``, ``image``, ``value``) and, when
present beside it, ``summary.json`` for the flag threshold. Writes:

- ``sanity_checks.png``: mean Spearman correlation and SSIM between the
  original and the randomized maps against the randomization step, one row
  of panels per model, one line per method, with a 95% confidence band over
  images;
- ``sanity_checks.md``: per model and method, the final-step mean Spearman
  correlation and SSIM and whether the method is flagged as insensitive
  (final mean Spearman above the threshold).

Nothing is recomputed.

Usage::

    python -m scripts.plot_sanity RESULTS_DIR_OR_CSV [--figures-dir figures] [--threshold 0.5]
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
from scipy import stats  # noqa: E402

from experiments.common import write_text_atomic  # noqa: E402
from scripts.figures import save_figure  # noqa: E402

log = logging.getLogger(__name__)

RESULTS_FILE = "results.csv"
SUMMARY_FILE = "summary.json"
FIGURE_FILE = "sanity_checks.png"
TABLE_FILE = "sanity_checks.md"
DEFAULT_THRESHOLD = 0.5

METRIC_TITLES = {"spearman": "Spearman rank correlation", "ssim": "SSIM"}
METHOD_STYLES = {
    "plain": {"color": "tab:gray", "marker": "o", "label": "plain"},
    "parchgrad": {"color": "tab:blue", "marker": "s", "label": "ParchGrad"},
}
REQUIRED_COLUMNS = {"model", "method", "step", "layer", "metric", "image", "value"}


def read_results(path: str | Path) -> tuple[pd.DataFrame, float]:
    """Read the tidy table of a sanity run (a run folder or its CSV) and the flag threshold.

    The threshold is read from ``summary.json`` beside the CSV; without that
    file it is :data:`DEFAULT_THRESHOLD`.

    Raises:
        FileNotFoundError: if the CSV does not exist.
        ValueError: if the CSV lacks a required column.
    """
    path = Path(path)
    csv_path = path / RESULTS_FILE if path.is_dir() else path
    if not csv_path.is_file():
        raise FileNotFoundError(f"Results file {csv_path} not found; pass the output folder of a sanity run or its {RESULTS_FILE}.")
    table = pd.read_csv(csv_path)
    missing = REQUIRED_COLUMNS - set(table.columns)
    if missing:
        raise ValueError(
            f"{csv_path} is missing the columns {sorted(missing)}. Pass the results.csv of an experiments.sanity run."
        )

    threshold = DEFAULT_THRESHOLD
    summary_path = csv_path.parent / SUMMARY_FILE
    if summary_path.is_file():
        threshold = float(json.loads(summary_path.read_text()).get("threshold", DEFAULT_THRESHOLD))
    return table, threshold


def step_means(table: pd.DataFrame) -> pd.DataFrame:
    """Return the mean, 95% confidence half-width and count over images per model, method, metric and step.

    NaN values (constant maps) are skipped, as in :func:`parchgrad.sanity.cascading_randomization`.
    """
    rows = []
    for (model, method, metric, step), group in table.groupby(["model", "method", "metric", "step"], sort=False):
        values = group["value"].to_numpy(dtype=np.float64)
        values = values[np.isfinite(values)]
        mean = float(values.mean()) if values.size else math.nan
        half_width = math.nan
        if values.size > 1:
            half_width = float(stats.t.ppf(0.975, values.size - 1) * stats.sem(values))
        rows.append(
            {"model": model, "method": method, "metric": metric, "step": int(step),
             "layer": group["layer"].iloc[0], "mean": mean, "half_width": half_width, "n": int(values.size)}
        )
    return pd.DataFrame(rows).sort_values(["model", "method", "metric", "step"], ignore_index=True)


def plot_curves(means: pd.DataFrame, output_path: str | Path) -> Path:
    """Draw one row per model and one column per metric of the mean similarity against the step."""
    models = list(dict.fromkeys(means["model"]))
    metrics = [metric for metric in METRIC_TITLES if metric in set(means["metric"])]
    figure, axes = plt.subplots(
        len(models), len(metrics), figsize=(6.5 * len(metrics), 3.6 * len(models)), squeeze=False
    )
    for row, model in enumerate(models):
        for column, metric in enumerate(metrics):
            axis = axes[row][column]
            subset = means[(means["model"] == model) & (means["metric"] == metric)]
            # Known methods in METHOD_STYLES order, then any others by name.
            found = set(subset["method"])
            methods = [name for name in METHOD_STYLES if name in found] + sorted(found - set(METHOD_STYLES))
            for method in methods:
                curve = subset[subset["method"] == method]
                style = METHOD_STYLES.get(method, {"label": method})
                axis.plot(curve["step"], curve["mean"], markersize=4, **style)
                band = curve["half_width"].fillna(0.0)
                axis.fill_between(
                    curve["step"], curve["mean"] - band, curve["mean"] + band,
                    color=style.get("color"), alpha=0.15, linewidth=0,
                )
            labels = subset.drop_duplicates("step").sort_values("step")
            axis.set_xticks(labels["step"])
            axis.set_xticklabels(labels["layer"], rotation=60, ha="right", fontsize=7)
            axis.axhline(0.0, color="black", linewidth=0.6)
            axis.set_ylim(-0.2, 1.05)
            axis.set_title(f"{model}: {METRIC_TITLES[metric]}")
            axis.set_ylabel("similarity to the original map")
            axis.grid(alpha=0.3)
            if row == 0 and column == 0:
                axis.legend(loc="upper right")
    figure.suptitle("Cascading randomization from the logits down (step 0: trained model)")
    figure.tight_layout()
    return save_figure(figure, Path(output_path))


def final_table(means: pd.DataFrame, threshold: float) -> str:
    """Return a Markdown table of the final-step means and the insensitivity flag per model and method."""
    lines = [
        "Last step of the cascading randomization: the whole model is randomized, unless "
        "sanity.order named only part of it. A method is flagged as insensitive to the model "
        f"when its mean Spearman correlation there is above {threshold:g}.",
        "",
        "| model | method | final step | Spearman | SSIM | images | flagged |",
        "|---|---|---|---|---|---|---|",
    ]
    for (model, method), group in means.groupby(["model", "method"], sort=False):
        last_step = group["step"].max()
        final = group[group["step"] == last_step].set_index("metric")
        spearman = float(final.loc["spearman", "mean"])
        ssim = float(final.loc["ssim", "mean"]) if "ssim" in final.index else math.nan
        flagged = "yes" if spearman > threshold else "no"
        lines.append(
            f"| {model} | {method} | {last_step} ({final['layer'].iloc[0]}) | {spearman:.3f} | {ssim:.3f} "
            f"| {int(final.loc['spearman', 'n'])} | {flagged} |"
        )
    return "\n".join(lines) + "\n"


def plot_all(results: str | Path, figures_dir: str | Path = "figures", threshold: float | None = None) -> list[Path]:
    """Write the figure and the Markdown table of a sanity run into ``figures_dir``; return their paths."""
    table, saved_threshold = read_results(results)
    threshold = saved_threshold if threshold is None else threshold
    means = step_means(table)
    figures_dir = Path(figures_dir)
    figure_path = plot_curves(means, figures_dir / FIGURE_FILE)
    table_path = write_text_atomic(figures_dir / TABLE_FILE, final_table(means, threshold))
    log.info("Wrote %s", table_path)
    return [figure_path, table_path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="output folder of a sanity run, or its results.csv")
    parser.add_argument("--figures-dir", default="figures", help="folder the PNG and Markdown files are written to")
    parser.add_argument(
        "--threshold", type=float, default=None,
        help="Spearman correlation above which a method is flagged; default: the run's sanity.threshold",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in plot_all(args.results, args.figures_dir, args.threshold):
        print(path)


if __name__ == "__main__":
    main()
