"""Model-parameter randomization checks of plain Gradient and ParchGrad.

``cfg.models`` defaults to the three reference models trained on the
synthetic benchmark. For each model, the first ``sanity.num_images`` images
of ``sanity.split`` are explained with the plain method and with ParchGrad
while the model is randomized cumulatively from the logits down
(:func:`parchgrad.sanity.cascading_randomization`). Both methods see the same
randomized weights at every step, because the re-initialization is seeded
with ``cfg.seed`` and the step index.

ParchGrad's selector is built once from the trained model's channel
statistics (:func:`experiments.statistics.load_or_collect_statistics`) and is
not rebuilt after randomization; see :func:`parchgrad.sanity.make_explainer`.

Run::

    python -m experiments.sanity
    python -m experiments.sanity sanity.granularity=layer '~models.vgg16'

Outputs in the run directory: ``config.yaml`` (resolved), ``results.csv``
(one row per model, method, step, metric and image: columns ``model``,
``method``, ``setting``, ``step``, ``layer``, ``metric``, ``image``,
``value``), ``summary.json`` (final-step means and the insensitivity flag per
model and method) and, with ``sanity.save_maps``, ``maps_<model>_<method>.npz``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from experiments.common import RunContext, RunResult, run_experiment, to_plain
from parchgrad.sanity import Explainer, cascading_randomization, flag_insensitive, long_format, make_explainer

log = logging.getLogger(__name__)

EXPERIMENT = "sanity"
METHODS = ("plain", "parchgrad")
COLUMNS = ["model", "method", "setting", "step", "layer", "metric", "image", "value"]


def model_view(cfg: DictConfig, name: str) -> DictConfig:
    """Return ``cfg`` with ``models.<name>`` mounted at ``model``, as the single-model helpers expect."""
    view = cfg.copy()
    with open_dict(view):
        view.model = cfg.models[name]
        del view["models"]
    return view


def build_explainers(cfg: DictConfig, architecture: str, statistics: Any) -> tuple[dict[str, Explainer], str]:
    """Return the plain and ParchGrad explainers of ``cfg.sanity`` and the ParchGrad setting's label."""
    from experiments.evaluate import make_selector, setting_from_config

    sanity = cfg.sanity
    options = to_plain(sanity.attribution_options) or {}
    setting = setting_from_config(sanity.selection, cfg.parchgrad)
    if setting.is_plain:
        raise ValueError("sanity.selection must be cls or ins; the plain method is always run as well.")
    selector = make_selector(statistics, setting)
    explainers = {
        "plain": make_explainer(sanity.attribution, attribution_options=options),
        "parchgrad": make_explainer(
            sanity.attribution,
            selector,
            layers=setting.layers,
            architecture=architecture,
            layer_ratio=setting.layer_ratio,
            attribution_options=options,
            variance_conservation=setting.variance_conservation,
            gamma=setting.gamma,
            exact_variance=setting.exact_variance,
        ),
    }
    return explainers, setting.label()


def check_one_model(context: RunContext, name: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Run the randomization check of ``models.<name>`` for both methods; return its rows and summary."""
    from experiments.evaluate import explained_targets, load_images, load_model
    from experiments.statistics import load_or_collect_statistics

    cfg = model_view(context.cfg, name)
    sanity = cfg.sanity
    model, info = load_model(cfg)
    statistics = load_or_collect_statistics(cfg, model, info)
    data = load_images(cfg, sanity.split, int(sanity.num_images))
    targets = explained_targets(model, data, sanity.target, int(cfg.model.batch_size))
    explainers, setting_label = build_explainers(cfg, cfg.model.architecture, statistics)
    order = to_plain(sanity.order)
    dataset_index = data["index"].tolist()

    tables = []
    summary: dict[str, Any] = {
        "architecture": cfg.model.architecture,
        "test_accuracy": info.get("test_accuracy"),
        "images": dataset_index,
        "methods": {},
    }
    for method, explain in explainers.items():
        log.info(
            "models.%s: cascading randomization of %s maps (%s, sanity.granularity=%s) on %d images",
            name, method, sanity.attribution, sanity.granularity, len(dataset_index),
        )
        rows, maps = cascading_randomization(
            model,
            data["image"],
            targets,
            explain,
            order=order,
            seed=int(cfg.seed) if cfg.seed is not None else 0,
            progress=bool(cfg.progress),
            granularity=sanity.granularity,
            keep_batchnorm_statistics=bool(sanity.keep_batchnorm_statistics),
            return_maps=True,
        )
        method_setting = "plain" if method == "plain" else setting_label
        table = pd.DataFrame(long_format(rows, model=name, method=method, setting=method_setting))
        table["image"] = [dataset_index[position] for position in table["image"]]
        tables.append(table[COLUMNS])

        summary["steps"] = [row["layer"] for row in rows if row["metric"] == "spearman"]
        summary["methods"][method] = _method_summary(rows, float(sanity.threshold), method_setting)
        log.info(
            "models.%s, %s: final mean Spearman %.3f, SSIM %.3f, flagged insensitive: %s",
            name, method,
            summary["methods"][method]["final_spearman"],
            summary["methods"][method]["final_ssim"],
            summary["methods"][method]["flagged"],
        )
        if sanity.save_maps:
            context.save_arrays(
                f"maps_{name}_{method}.npz",
                {"maps": maps.numpy().astype(np.float16), "image": np.asarray(dataset_index),
                 "steps": np.asarray(summary["steps"])},
            )
    return pd.concat(tables, ignore_index=True), summary


def _method_summary(rows: list[dict], threshold: float, setting: str) -> dict[str, Any]:
    last_step = max(row["step"] for row in rows)
    final = {row["metric"]: row["mean"] for row in rows if row["step"] == last_step}
    return {
        "setting": setting,
        "final_step": last_step,
        "final_spearman": final["spearman"],
        "final_ssim": final["ssim"],
        "flagged": flag_insensitive(rows, threshold),
    }


def _body(context: RunContext) -> RunResult:
    cfg = context.cfg
    if not cfg.models:
        raise ValueError("`models` is empty; keep at least one of the default models.")
    if cfg.sanity.order is not None and len(cfg.models) > 1:
        raise ValueError(
            "sanity.order names modules of one architecture, but several models are configured; "
            "remove the others (e.g. '~models.vgg16') or set sanity.order=null."
        )
    tables, models = [], {}
    for name in cfg.models:
        table, summary = check_one_model(context, name)
        tables.append(table)
        models[name] = summary
    return RunResult(
        table=pd.concat(tables, ignore_index=True),
        summary={"threshold": float(cfg.sanity.threshold), "models": models},
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the randomization checks and, with ``cfg.plot``, draw the figure and table from the saved results.

    Returns the summary of :func:`experiments.common.run_experiment` plus
    ``figures``, the files written (empty without ``cfg.plot``).
    """
    summary = run_experiment(cfg, EXPERIMENT, _body)
    summary["figures"] = []
    if cfg.get("plot", False):
        # Imported here so that a run without figures never loads matplotlib.
        from scripts.plot_sanity import plot_all

        figures = plot_all(Path(summary["store_dir"]), Path(cfg.paths.figures_dir))
        summary["figures"] = [str(path) for path in figures]
    return summary


@hydra.main(config_path="../conf", config_name=EXPERIMENT, version_base="1.3")
def main(cfg: DictConfig) -> None:
    log.info("Configuration:\n%s", OmegaConf.to_yaml(cfg))
    run(cfg)


if __name__ == "__main__":
    main()
