"""E2, conserve magnitude: ParchGrad with and without variance conservation (VC).

For one model, the plain method and ParchGrad with class-wise selection are
compared on ``evaluation.num_images`` images, evenly spaced over the split:

- on the default hooked set, every quantile of ``e2.quantiles`` with VC on and off;
- on the last ``int(r * n)`` convolutions for every ``r`` in ``e2.layer_ratios``,
  with VC on and off at ``e2.layer_ratio_quantiles``.

Park, Jeon and Choi (2023), "ParchGrad: Controlled Internal Gradients for
Reliable Saliency Map", report that VC puts more gradient inside the boxes on
ResNet18, has no effect on VGG16 (a sequential gradient path only rescales
each sample's map) and is inconclusive on EfficientNet-B0.

Run::

    python -m experiments.e2_magnitude model=resnet18
    python -m experiments.e2_magnitude -m model=resnet18,vgg16,efficientnet_b0
    python scripts/plot_e2.py

Outputs, in the run directory and the results store:

- ``results.csv``: one row per image and setting;
- ``deletion.csv``: one row per image, setting, order, ratio and metric;
- ``summary.json`` and ``table.md``: mean and 95% CI per setting;
- ``maps.npz``: images and maps of the default-set settings, for the qualitative grid.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from experiments.common import RunContext, RunResult, markdown_table, run_experiment, write_csv_atomic
from experiments.evaluate import (
    Setting,
    evaluate_setting,
    explained_targets,
    images_for_figures,
    load_images,
    load_model,
    metric_columns,
    summary_records,
)
from parchgrad.attribution import map_kind

log = logging.getLogger(__name__)

EXPERIMENT = "e2_magnitude"
GROUP_COLUMNS = ["model", "data", "attribution", "map_kind", "setting", "selection", "quantile", "vc", "layers"]


def e2_settings(cfg: DictConfig) -> list[Setting]:
    """Return the plain setting, the default-set settings, then the layer-ratio settings, without duplicates."""
    base = cfg.parchgrad
    common = {
        "selection": cfg.e2.selection,
        "p_value_threshold": float(base.p_value_threshold),
        "gamma": base.gamma,
        "exact_variance": bool(base.exact_variance),
    }
    settings = [Setting(selection="none")]
    for quantile in cfg.e2.quantiles:
        for vc in cfg.e2.variance_conservation:
            settings.append(Setting(quantile=float(quantile), variance_conservation=bool(vc), **common))
    for ratio in cfg.e2.layer_ratios:
        for quantile in cfg.e2.layer_ratio_quantiles:
            for vc in cfg.e2.variance_conservation:
                settings.append(
                    Setting(quantile=float(quantile), variance_conservation=bool(vc), layer_ratio=float(ratio), **common)
                )
    unique = list(dict.fromkeys(settings))
    if len(unique) != len(settings):
        log.info("Dropped %d duplicate settings", len(settings) - len(unique))
    return unique


def _body(context: RunContext) -> RunResult:
    from experiments.statistics import load_or_collect_statistics

    cfg = context.cfg
    model, info = load_model(cfg)
    statistics = load_or_collect_statistics(cfg, model, info)

    log.info("Loading %s images of split %s (evaluation.num_images, evaluation.split)", cfg.evaluation.num_images, cfg.evaluation.split)
    data = load_images(cfg, cfg.evaluation.split, cfg.evaluation.num_images)
    targets = explained_targets(model, data, cfg.evaluation.target, int(cfg.model.batch_size))

    settings = e2_settings(cfg)
    log.info("Evaluating %d settings (e2.quantiles, e2.variance_conservation, e2.layer_ratios)", len(settings))
    results, deletions, saved_maps = [], [], {}
    saved_images = int(cfg.e2.saved_images)
    for setting in settings:
        deletion = bool(cfg.evaluation.deletion) and (
            setting.layer_ratio is None or bool(cfg.e2.deletion_for_layer_ratios)
        )
        rows, deletion_rows, maps = evaluate_setting(cfg, model, statistics, data, targets, setting, deletion)
        results.append(rows)
        deletions.append(deletion_rows)
        if setting.layer_ratio is None and saved_images > 0:
            saved_maps[setting.label()] = maps[:saved_images].detach().cpu().numpy()

    table = pd.concat(results, ignore_index=True)
    deletion_table = pd.concat([d for d in deletions if not d.empty], ignore_index=True) if any(
        not d.empty for d in deletions
    ) else pd.DataFrame()
    if not deletion_table.empty:
        write_csv_atomic(context.output_dir / "deletion.csv", deletion_table)

    if saved_maps:
        names = list(saved_maps)
        context.save_arrays(
            "maps.npz",
            {
                "images": images_for_figures(data, saved_images),
                "labels": data["label"][:saved_images].cpu().numpy(),
                "image_index": data["index"][:saved_images].numpy(),
                "settings": np.array(names),
                "maps": np.stack([saved_maps[name] for name in names]),
            },
        )

    summary, records = summary_records(table, GROUP_COLUMNS)
    context.save_text(
        "table.md",
        f"E2 on {cfg.model.architecture}, {cfg.data.name}, {len(data['label'])} images, "
        f"attribution {cfg.attribution.name}; mean [95% CI]\n\n"
        + markdown_table(summary, ["setting", "quantile", "vc", "layers"], metric_columns(table)),
    )
    return RunResult(
        table,
        {
            "model": cfg.model.architecture,
            "data": cfg.data.name,
            "attribution": cfg.attribution.name,
            "map_kind": map_kind(cfg.attribution.name),
            "test_accuracy": info.get("test_accuracy"),
            "images": int(len(data["label"])),
            "settings": [setting.label() for setting in settings],
            "metrics": metric_columns(table),
            "table": records,
        },
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run E2 for ``cfg.model`` on ``cfg.data``; return the run summary."""
    return run_experiment(cfg, EXPERIMENT, _body)


@hydra.main(config_path="../conf", config_name="e2_magnitude", version_base="1.3")
def main(cfg: DictConfig) -> None:
    log.info("Configuration:\n%s", OmegaConf.to_yaml(cfg))
    run(cfg)


if __name__ == "__main__":
    main()
