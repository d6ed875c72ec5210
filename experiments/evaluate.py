"""Evaluate one attribution setting: a selection, an attribution method and ParchGrad parameters.

One run scores one setting on ``evaluation.num_images`` images, evenly spaced over a
split; sweeps go through Hydra's multirun::

    python -m experiments.evaluate model=resnet18 selection=cls attribution=grad
    python -m experiments.evaluate -m selection=cls,ins,none parchgrad.variance_conservation=true,false
    python -m experiments.evaluate -m hydra/launcher=joblib attribution=grad,ig parchgrad.quantile=0.05,0.1

Metrics, one row per image in ``results.csv``, next to the setting's columns and
``map_kind`` (``absolute``: every metric reads the non-negative map ``|a|``):

- the bounding-box energies ``mu_in``, ``mu_in_w``, ``mu_out``, ``mu_out_w``
  and their ``box_valid`` flag;
- the pointing game on the box (``pointing_hit``, ``pointing_valid``);
- on the synthetic benchmark, ``mask_mu_in`` and ``mask_mu_in_w`` on the object mask;
- MoRF and LeRF deletion (AOPC, LODDS, accuracy, fracdiff), averaged over
  ``evaluation.deletion_ratios``. The per-ratio values go to ``deletion.csv``. ``summary.json`` and ``table.md`` hold the means with 95%
confidence intervals.

This module also contains the helpers that the E2 experiment shares: loading the
model and images, building a :class:`Setting`'s controller, computing maps and
scoring them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm.auto import tqdm

from experiments.common import (
    RunContext,
    RunResult,
    absolute_path,
    markdown_table,
    run_experiment,
    seed_everything,
    summarize_table,
    to_plain,
    write_csv_atomic,
)
from parchgrad.attribution import attribute, map_kind
from parchgrad.control import ParchGrad
from parchgrad.data import denormalize
from parchgrad.layers import resolve_layers
from parchgrad.metrics import box_energy, deletion_scores, mask_energy, pointing_game
from parchgrad.selection import build_selector

log = logging.getLogger(__name__)

EXPERIMENT = "evaluate"

# Selection names of the configs mapped to parchgrad.selection's registry; "none" is the plain method.
SELECTION_REGISTRY = {"cls": "cls", "ins": "ins", "none": "all"}

DELETION_METRICS = ("aopc", "lodds", "accuracy", "fracdiff")
ENERGY_METRICS = ("mu_in", "mu_in_w", "mu_out", "mu_out_w")
SETTING_COLUMNS = ["model", "data", "attribution", "selection", "quantile", "alpha", "vc", "layers"]


# ---------------------------------------------------------------------------
# Model, data and statistics


def load_model(cfg: DictConfig) -> tuple[nn.Module, dict[str, Any]]:
    """Return the model of ``cfg.model`` for ``cfg.data``, in eval mode on ``cfg.device``, and its info dict."""
    from parchgrad.models import model_from_config

    data_config = to_plain(cfg.data)
    log.info("Loading model %s (model.architecture), weights %s (model.weights)", cfg.model.architecture, cfg.model.weights)
    model, info = model_from_config(
        to_plain(cfg.model), data_config, cache_dir=absolute_path(cfg.paths.cache_dir), progress=bool(cfg.progress)
    )
    model = model.eval().to(cfg.device)
    accuracy = info.get("test_accuracy")
    if accuracy is not None:
        log.info("Model %s: test accuracy %.4f", cfg.model.architecture, accuracy)
        chance = 1.0 / int(info.get("num_classes") or 1)
        if accuracy < 2 * chance:
            log.warning(
                "Model %s is near chance (test accuracy %.3f, chance %.3f), so its saliency maps say "
                "little; train longer (model.train.epochs) or on more images (data.num_train).",
                cfg.model.architecture, accuracy, chance,
            )
    return model, info


def build_dataset(cfg: DictConfig, split: str):
    """Return the ``split`` of the data set that ``cfg.data`` names (ImageNet has only its validation images)."""
    from parchgrad.data import build_dataset as build_data

    log.info("Loading data %s (data.name), split %s", cfg.data.name, split)
    return build_data(to_plain(cfg.data), split=split, progress=bool(cfg.progress))


def num_classes_of(cfg: DictConfig, info: dict[str, Any]) -> int:
    """Return the model's number of classes, from its info dict or ``data.num_classes``."""
    if info.get("num_classes") is not None:
        return int(info["num_classes"])
    return int(cfg.data.num_classes)


def spread_indices(size: int, count: int | None) -> list[int]:
    """Return ``count`` indices evenly spaced over ``range(size)`` (all when None or ``count >= size``).

    ImageNet validation images are ordered by class, so the first images would
    all be of the first classes; evenly spaced ones cover every part of the list.
    """
    if count is None or count >= size:
        return list(range(size))
    if count < 1:
        raise ValueError(f"The number of images must be positive or null, got {count!r}")
    return np.linspace(0, size - 1, int(count)).round().astype(int).tolist()


def load_images(cfg: DictConfig, split: str, count: int | None) -> dict[str, Tensor]:
    """Stack ``count`` items of ``split`` (all when None), evenly spaced, into tensors on ``cfg.device``.

    Returns ``image`` ``[N, 3, H, W]``, ``label`` ``[N]``, ``box`` ``[N, 4]``,
    ``box_valid`` ``[N]``, ``mask`` ``[N, H, W]`` and ``index`` ``[N]``.
    """
    dataset = build_dataset(cfg, split)
    if len(dataset) == 0:
        raise ValueError(f"Split {split!r} of data {cfg.data.name!r} has no images to evaluate.")
    if count is not None and len(dataset) < count:
        log.warning("Split %s has only %d images; evaluation.num_images requested %d", split, len(dataset), count)
    items = [dataset[i] for i in spread_indices(len(dataset), count)]
    return {
        "image": torch.stack([item["image"] for item in items]).to(cfg.device),
        "label": torch.tensor([int(item["label"]) for item in items], device=cfg.device),
        "box": torch.stack([torch.as_tensor(item["box"], dtype=torch.float32) for item in items]).to(cfg.device),
        "box_valid": torch.tensor([bool(item["box_valid"]) for item in items], device=cfg.device),
        "mask": torch.stack([torch.as_tensor(item["mask"], dtype=torch.bool) for item in items]).to(cfg.device),
        "index": torch.tensor([int(item["index"]) for item in items]),
    }


# ---------------------------------------------------------------------------
# Settings and maps


@dataclass(frozen=True)
class Setting:
    """One attribution setting: a selection and the ParchGrad parameters it uses.

    ``layers`` and ``layer_ratio`` choose the hooked convolutions as in
    :func:`parchgrad.layers.resolve_layers`; both None means the default set.
    """

    selection: str
    quantile: float | None = None
    alpha: float | None = None
    p_value_threshold: float = 0.05
    variance_conservation: bool = True
    gamma: float | None = None
    exact_variance: bool = False
    layers: tuple[str, ...] | None = None
    layer_ratio: float | None = None

    @property
    def is_plain(self) -> bool:
        """True for the plain attribution method (no hooks)."""
        return self.selection == "none"

    def layers_spec(self) -> str:
        """Return ``none`` (plain), ``default``, ``ratio=<r>`` or ``custom=<count>``."""
        if self.is_plain:
            return "none"
        if self.layers is not None:
            return f"custom={len(self.layers)}"
        if self.layer_ratio is not None:
            return f"ratio={self.layer_ratio:g}"
        return "default"

    def label(self) -> str:
        """Return a short unique name, e.g. ``plain`` or ``cls_q0.05_vc_default``."""
        if self.is_plain:
            return "plain"
        threshold = f"q{self.quantile:g}" if self.quantile is not None else f"a{self.alpha:g}"
        vc = "vc" if self.variance_conservation else "novc"
        gamma = "" if self.gamma is None else f"_g{self.gamma:g}"
        return f"{self.selection}_{threshold}_{vc}{gamma}_{self.layers_spec()}"

    def columns(self) -> dict[str, Any]:
        """Return the tidy-table columns that identify this setting (NaN where a value does not apply)."""
        return {
            "setting": self.label(),
            "selection": self.selection,
            "quantile": math.nan if self.is_plain or self.quantile is None else self.quantile,
            "alpha": math.nan if self.is_plain or self.alpha is None else self.alpha,
            "vc": None if self.is_plain else bool(self.variance_conservation),
            "layers": self.layers_spec(),
        }


def setting_from_config(selection: str, parchgrad: DictConfig) -> Setting:
    """Build a :class:`Setting` from a ``selection`` name and a ``parchgrad`` config node."""
    if selection not in SELECTION_REGISTRY:
        raise ValueError(f"Unknown selection {selection!r} (selection.name); choose one of {sorted(SELECTION_REGISTRY)}.")
    layers = parchgrad.get("layers")
    return Setting(
        selection=selection,
        quantile=parchgrad.get("quantile"),
        alpha=parchgrad.get("alpha"),
        p_value_threshold=float(parchgrad.p_value_threshold),
        variance_conservation=bool(parchgrad.variance_conservation),
        gamma=parchgrad.get("gamma"),
        exact_variance=bool(parchgrad.exact_variance),
        layers=tuple(layers) if layers is not None else None,
        layer_ratio=parchgrad.get("layer_ratio"),
    )


def make_selector(statistics, setting: Setting):
    """Return the channel selector of a ParchGrad ``setting`` (``cls`` or ``ins``)."""
    return build_selector(
        SELECTION_REGISTRY[setting.selection],
        statistics,
        quantile=setting.quantile,
        alpha=setting.alpha,
        p_value_threshold=setting.p_value_threshold,
    )


def make_controller(model: nn.Module, architecture: str, statistics, setting: Setting) -> ParchGrad | None:
    """Return the (inactive) ParchGrad controller of ``setting``, or None for the plain method."""
    if setting.is_plain:
        return None
    layers = resolve_layers(model, architecture=architecture, layers=setting.layers, layer_ratio=setting.layer_ratio)
    selector = make_selector(statistics, setting)
    return ParchGrad(
        model,
        layers,
        selector,
        variance_conservation=setting.variance_conservation,
        gamma=setting.gamma,
        exact_variance=setting.exact_variance,
    )


def compute_maps(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    method: str,
    options: dict[str, Any],
    controller: ParchGrad | None,
    batch_size: int,
    progress: bool = False,
) -> Tensor:
    """Return ``[N, H, W]`` attribution maps of ``images`` ``[N, 3, H, W]`` for ``targets`` ``[N]``, batch by batch."""
    maps = []
    for start in tqdm(range(0, images.shape[0], batch_size), desc=f"{method} maps", disable=not progress):
        batch = images[start : start + batch_size]
        batch_targets = targets[start : start + batch_size]
        if controller is None:
            maps.append(attribute(model, batch, batch_targets, method, **options).detach())
        else:
            with controller:
                maps.append(attribute(model, batch, batch_targets, method, controller, **options).detach())
    return torch.cat(maps)


def explained_targets(model: nn.Module, data: dict[str, Tensor], target: str, batch_size: int) -> Tensor:
    """Return the ``[N]`` explained classes: the labels, or the model's predictions when ``target`` is ``prediction``."""
    if target == "label":
        return data["label"]
    if target != "prediction":
        raise ValueError(f"evaluation.target must be 'label' or 'prediction', got {target!r}")
    with torch.no_grad():
        logits = [model(data["image"][start : start + batch_size]) for start in range(0, len(data["label"]), batch_size)]
    return torch.cat(logits).argmax(dim=1)


# ---------------------------------------------------------------------------
# Scores


def _numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def score_maps(
    model: nn.Module,
    data: dict[str, Tensor],
    maps: Tensor,
    ratios: Sequence[float],
    deletion: bool,
    mask_metrics: bool,
    deletion_batch_size: int,
    progress: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score ``maps`` ``[N, H, W]`` against ``data``; return the per-image table and the per-ratio deletion table.

    Deletion runs ``2 * N * (len(ratios) + 1)`` forward passes in chunks of
    ``deletion_batch_size``; with ``deletion`` False its columns are left out.
    """
    columns: dict[str, np.ndarray] = {
        "image": _numpy(data["index"]),
        "label": _numpy(data["label"]),
    }

    energy = box_energy(maps, data["box"])
    box_valid = energy["valid"] & data["box_valid"]
    for name in ENERGY_METRICS:
        columns[name] = np.where(_numpy(box_valid), _numpy(energy[name]), np.nan)
    columns["box_valid"] = _numpy(box_valid)

    pointing = pointing_game(maps, data["box"])
    pointing_valid = pointing["valid"] & data["box_valid"]
    columns["pointing_hit"] = np.where(_numpy(pointing_valid), _numpy(pointing["hit"]).astype(float), np.nan)
    columns["pointing_valid"] = _numpy(pointing_valid)

    if mask_metrics:
        mask = mask_energy(maps, data["mask"])
        columns["mask_mu_in"] = _numpy(mask["mu_in"])
        columns["mask_mu_in_w"] = _numpy(mask["mu_in_w"])
        columns["mask_valid"] = _numpy(mask["valid"])

    deletion_rows = []
    if deletion:
        for order in ("morf", "lerf"):
            scores = deletion_scores(
                model, data["image"], maps, data["label"], ratios, order, deletion_batch_size, progress
            )
            valid = _numpy(scores["valid"])
            for metric in DELETION_METRICS:
                values = _numpy(scores[metric]).astype(np.float64)  # [N, R]
                columns[f"{order}_{metric}"] = np.where(valid, values.mean(axis=1), np.nan)
                for position, ratio in enumerate(ratios):
                    deletion_rows.append(
                        pd.DataFrame(
                            {
                                "image": columns["image"],
                                "order": order,
                                "ratio": float(ratio),
                                "metric": metric,
                                "value": values[:, position],
                                "valid": valid,
                            }
                        )
                    )
            columns[f"{order}_valid"] = valid

    deletion_table = pd.concat(deletion_rows, ignore_index=True) if deletion_rows else pd.DataFrame()
    return pd.DataFrame(columns), deletion_table


def metric_columns(table: pd.DataFrame) -> list[str]:
    """Return the metric columns of a results table, in a fixed order."""
    candidates = [
        *ENERGY_METRICS,
        "pointing_hit",
        "mask_mu_in",
        "mask_mu_in_w",
        *(f"{order}_{metric}" for order in ("morf", "lerf") for metric in DELETION_METRICS),
    ]
    return [column for column in candidates if column in table.columns]


def evaluate_setting(
    cfg: DictConfig,
    model: nn.Module,
    statistics,
    data: dict[str, Tensor],
    targets: Tensor,
    setting: Setting,
    deletion: bool,
) -> tuple[pd.DataFrame, pd.DataFrame, Tensor]:
    """Compute and score the maps of one setting; return the results rows, deletion rows and ``[N, H, W]`` maps."""
    evaluation = cfg.evaluation
    options = to_plain(cfg.attribution.options) or {}
    if options.get("signed", False):
        raise ValueError(
            "attribution.options.signed=true returns [B, 3, H, W] signed attributions, but the "
            "evaluation scores [B, H, W] maps; remove attribution.options.signed."
        )
    # Recorded in every row, so a table never mixes up scores of signed and absolute maps.
    kind = map_kind(cfg.attribution.name)
    controller = make_controller(model, cfg.model.architecture, statistics, setting)
    hooked = 0 if controller is None else len(controller.layers)
    log.info(
        "Setting %s: attribution %s (attribution.name), %d hooked layers, %d images",
        setting.label(),
        cfg.attribution.name,
        hooked,
        len(targets),
    )
    # Reseed from the config, so that random maps (SmoothGrad noise) do not depend on what
    # ran before them. That may be training or statistics collection on a cold cache, an
    # earlier setting of E2, or an earlier job of a multirun in the same process.
    seed_everything(cfg.get("seed"))
    maps = compute_maps(
        model,
        data["image"],
        targets,
        cfg.attribution.name,
        options,
        controller,
        int(cfg.model.batch_size),
        bool(cfg.progress),
    )
    results, deletion_table = score_maps(
        model,
        data,
        maps,
        [float(r) for r in evaluation.deletion_ratios],
        deletion,
        mask_metrics=cfg.data.name == "synthetic",
        deletion_batch_size=int(evaluation.deletion_batch_size),
        progress=bool(cfg.progress),
    )

    identity = {
        "model": cfg.model.architecture,
        "data": cfg.data.name,
        "attribution": cfg.attribution.name,
        "map_kind": kind,
        **setting.columns(),
        "hooked_layers": hooked,
    }
    results = pd.concat([pd.DataFrame([identity] * len(results)), results], axis=1)
    if not deletion_table.empty:
        deletion_table = pd.concat(
            [pd.DataFrame([identity] * len(deletion_table)), deletion_table.reset_index(drop=True)], axis=1
        )
    return results, deletion_table, maps


def images_for_figures(data: dict[str, Tensor], count: int) -> np.ndarray:
    """Return the first ``count`` images as RGB in [0, 1], ``[n, H, W, 3]`` float32."""
    images = denormalize(data["image"][:count].detach().cpu()).clamp(0, 1)
    return images.permute(0, 2, 3, 1).numpy().astype(np.float32)


def summary_records(table: pd.DataFrame, group_columns: Sequence[str]) -> tuple[pd.DataFrame, list[dict]]:
    """Return the mean / 95% CI table per group and the same rows as JSON-ready records."""
    summary = summarize_table(table, group_columns, metric_columns(table))
    records = summary.astype(object).where(summary.notna(), None).to_dict(orient="records")
    return summary, records


# ---------------------------------------------------------------------------
# The evaluate experiment


def _body(context: RunContext) -> RunResult:
    from experiments.statistics import load_or_collect_statistics

    cfg = context.cfg
    setting = setting_from_config(cfg.selection.name, cfg.parchgrad)
    model, info = load_model(cfg)
    statistics = None if setting.is_plain else load_or_collect_statistics(cfg, model, info)

    log.info("Loading %s images of split %s (evaluation.num_images, evaluation.split)", cfg.evaluation.num_images, cfg.evaluation.split)
    data = load_images(cfg, cfg.evaluation.split, cfg.evaluation.num_images)
    targets = explained_targets(model, data, cfg.evaluation.target, int(cfg.model.batch_size))

    results, deletion_table, maps = evaluate_setting(
        cfg, model, statistics, data, targets, setting, deletion=bool(cfg.evaluation.deletion)
    )
    if not deletion_table.empty:
        write_csv_atomic(context.output_dir / "deletion.csv", deletion_table)

    saved = int(cfg.evaluation.save_maps)
    if saved > 0:
        context.save_arrays(
            "maps.npz",
            {
                "images": images_for_figures(data, saved),
                "labels": _numpy(data["label"][:saved]),
                "image_index": _numpy(data["index"][:saved]),
                "maps": _numpy(maps[:saved]),
                "setting": np.array(setting.label()),
            },
        )

    summary, records = summary_records(results, ["model", "data", "attribution", "map_kind", "setting"])
    context.save_text("table.md", markdown_table(summary, ["model", "attribution", "setting"], metric_columns(results)))
    return RunResult(
        results,
        {
            "setting": setting.label(),
            "model": cfg.model.architecture,
            "map_kind": map_kind(cfg.attribution.name),
            "test_accuracy": info.get("test_accuracy"),
            "images": int(len(results)),
            "table": records,
        },
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate the setting that ``cfg`` describes; return the run summary."""
    return run_experiment(cfg, EXPERIMENT, _body)


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    log.info("Configuration:\n%s", OmegaConf.to_yaml(cfg))
    run(cfg)


if __name__ == "__main__":
    main()
