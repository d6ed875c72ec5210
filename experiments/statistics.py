"""Collect the channel statistics that ParchGrad's selectors read, for one (model, data) pair.

    python -m experiments.statistics model=resnet18
    # Sharded over jobs, then merged into the final file:
    python -m experiments.statistics -m model=vgg16 num_shards=4 shard_index=0,1,2,3
    python -m experiments.statistics model=vgg16 num_shards=4 merge=true

The final file is ``<paths.cache_dir>/statistics/<model>__<weights>__<dataset>.pt``
(see :func:`parchgrad.statistics.statistics_filename`), one per (architecture,
weights, dataset subset). Shards are accumulators saved under
``<paths.cache_dir>/statistics/shards/<final name>/``. A run is skipped when the
final file exists and its metadata matches the model, the weights and the
dataset subset. The E2 and evaluate experiments call :func:`load_or_collect_statistics`,
which collects the statistics in one pass when the file is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Subset

from experiments.common import RunContext, RunResult, absolute_path, run_experiment, to_plain
from parchgrad.statistics import (
    ChannelStatistics,
    StatisticsAccumulator,
    collect_statistics,
    merge_statistics_files,
    statistics_filename,
)

log = logging.getLogger(__name__)

EXPERIMENT = "statistics"


# ---------------------------------------------------------------------------
# Identity of a statistics file


def weights_id(model_cfg: DictConfig, info: dict[str, Any]) -> str:
    """Return a short identifier of the model's weights: the checkpoint's SHA-256 prefix, else the weights name."""
    if info.get("sha256"):
        return f"sha{str(info['sha256'])[:12]}"
    weights = model_cfg.get("weights")
    if weights is None:
        raise ValueError(f"Model {model_cfg.architecture!r} has neither a checkpoint hash nor `model.weights`.")
    # A local state dict path is identified by its file name; a torchvision name as is.
    return Path(str(weights)).name


def dataset_id(cfg: DictConfig) -> str:
    """Return an identifier of the statistics images: data set, split, image count and a hash of ``cfg.data``.

    The data root is left out of the hash, so moving the cache does not invalidate it.
    """
    data = to_plain(cfg.data)
    data.pop("root", None)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]
    count = cfg.statistics.max_images if cfg.statistics.max_images is not None else "all"
    return f"{cfg.data.name}-{cfg.statistics.split}-n{count}-{digest}"


def statistics_path(cfg: DictConfig, info: dict[str, Any]) -> Path:
    """Return the final statistics file of ``(cfg.model, weights, cfg.data)`` in ``paths.cache_dir``."""
    name = statistics_filename(cfg.model.architecture, weights_id(cfg.model, info), dataset_id(cfg))
    return absolute_path(cfg.paths.cache_dir) / "statistics" / name


def _shard_dir(final_path: Path) -> Path:
    return final_path.parent / "shards" / final_path.stem


def shard_path(final_path: Path, shard_index: int, num_shards: int) -> Path:
    """Return the accumulator file of one shard of ``final_path``."""
    return _shard_dir(final_path) / f"shard-{shard_index:03d}-of-{num_shards:03d}.pt"


def _expected_metadata(cfg: DictConfig, info: dict[str, Any]) -> dict[str, str]:
    return {
        "model_name": cfg.model.architecture,
        "weights_id": weights_id(cfg.model, info),
        "dataset_id": dataset_id(cfg),
    }


def _matches(statistics: ChannelStatistics, expected: dict[str, str], model: nn.Module) -> str | None:
    """Return why ``statistics`` do not fit the model and data, or None when they do."""
    for key, value in expected.items():
        if statistics.metadata.get(key) != value:
            return f"metadata {key}={statistics.metadata.get(key)!r}, expected {value!r}"
    try:
        statistics.check_model(model)
    except ValueError as error:
        return str(error)
    return None


# ---------------------------------------------------------------------------
# Collection


def statistics_loader(cfg: DictConfig, dataset) -> DataLoader:
    """Return a loader over ``statistics.max_images`` images of ``dataset``, evenly spaced, in order."""
    from experiments.evaluate import spread_indices

    count = cfg.statistics.max_images
    if count is not None and count < 1:
        raise ValueError(f"statistics.max_images must be positive or null, got {count!r}")
    dataset = Subset(dataset, spread_indices(len(dataset), count))
    return DataLoader(
        dataset,
        batch_size=int(cfg.statistics.batch_size),
        shuffle=False,
        num_workers=int(cfg.get("num_workers", 0)),
    )


def _collect(cfg: DictConfig, model: nn.Module, info: dict[str, Any], shard_index: int, num_shards: int) -> StatisticsAccumulator:
    from experiments.evaluate import build_dataset, num_classes_of

    dataset = build_dataset(cfg, cfg.statistics.split)
    loader = statistics_loader(cfg, dataset)
    log.info(
        "Collecting statistics over %d images of split %s (statistics.split, statistics.max_images), shard %d of %d",
        len(loader.dataset),
        cfg.statistics.split,
        shard_index,
        num_shards,
    )
    expected = _expected_metadata(cfg, info)
    return collect_statistics(
        model,
        loader,
        num_classes_of(cfg, info),
        layers=None,
        device=cfg.device,
        progress=bool(cfg.progress),
        reservoir_size=int(cfg.statistics.reservoir_size),
        seed=int(cfg.seed) if cfg.seed is not None else 0,
        shard_index=shard_index,
        num_shards=num_shards,
        **expected,
    )


def load_or_collect_statistics(cfg: DictConfig, model: nn.Module, info: dict[str, Any]) -> ChannelStatistics:
    """Return the statistics of ``(model, weights, data)``: loaded when the final file matches, else collected and saved.

    A file whose metadata does not match (another model, weights or data subset
    under the same name, or an older layout) is recollected with a warning.
    """
    path = statistics_path(cfg, info)
    expected = _expected_metadata(cfg, info)
    if path.is_file():
        statistics = ChannelStatistics.load(path)
        problem = _matches(statistics, expected, model)
        if problem is None:
            log.info("Loaded channel statistics from %s (paths.cache_dir)", path)
            return statistics
        log.warning("Statistics file %s does not match (%s); collecting it again", path, problem)

    statistics = _collect(cfg, model, info, 0, 1).finalize(test=cfg.statistics.test)
    statistics.save(path)
    log.info("Saved channel statistics to %s", path)
    return statistics


def _layer_table(statistics: ChannelStatistics) -> pd.DataFrame:
    """Return one row per layer: channels, images and the share of channels passing the normality filter."""
    rows = []
    for layer, channels in statistics.layer_channels.items():
        shapiro = statistics.shapiro_pvalues[layer]
        rows.append(
            {
                "layer": layer,
                "channels": channels,
                "images": statistics.metadata.get("num_samples"),
                "non_normal_share": float((shapiro < 0.05).double().mean()),
                "nan_ttest_share": float(torch.isnan(statistics.ttest_pvalues[layer]).double().mean()),
            }
        )
    return pd.DataFrame(rows)


def _body(context: RunContext) -> RunResult:
    from experiments.evaluate import load_model

    cfg = context.cfg
    shard_index, num_shards = int(cfg.shard_index), int(cfg.num_shards)
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, num_shards={num_shards}), got {shard_index}")

    model, info = load_model(cfg)
    final_path = statistics_path(cfg, info)
    expected = _expected_metadata(cfg, info)
    summary: dict[str, Any] = {"statistics_file": str(final_path), **expected}

    if final_path.is_file():
        statistics = ChannelStatistics.load(final_path)
        problem = _matches(statistics, expected, model)
        if problem is None:
            log.info("Final statistics %s exist and match; nothing to collect", final_path)
            return RunResult(_layer_table(statistics), {**summary, "action": "existing"})
        log.warning("Final statistics %s do not match (%s); collecting them again", final_path, problem)

    if cfg.merge:
        paths = [shard_path(final_path, index, num_shards) for index in range(num_shards)]
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"Cannot merge: {len(missing)} of {num_shards} shard files are missing, e.g. {missing[0]}. "
                f"Run the shards first: num_shards={num_shards} shard_index=0,...,{num_shards - 1} with -m."
            )
        log.info("Merging %d shards (merge=true, num_shards=%d) from %s", num_shards, num_shards, _shard_dir(final_path))
        statistics = merge_statistics_files(paths).finalize(test=cfg.statistics.test)
        statistics.save(final_path)
        log.info("Saved merged statistics to %s", final_path)
        return RunResult(_layer_table(statistics), {**summary, "action": "merged", "shards": num_shards})

    if num_shards > 1:
        accumulator = _collect(cfg, model, info, shard_index, num_shards)
        path = accumulator.save(shard_path(final_path, shard_index, num_shards))
        log.info("Saved shard %d of %d to %s", shard_index, num_shards, path)
        table = pd.DataFrame(
            [{"layer": layer, "channels": channels, "images": accumulator.num_samples}
             for layer, channels in accumulator.layer_channels.items()]
        )
        return RunResult(table, {**summary, "action": "shard", "shard_file": str(path)})

    statistics = _collect(cfg, model, info, 0, 1).finalize(test=cfg.statistics.test)
    statistics.save(final_path)
    log.info("Saved channel statistics to %s", final_path)
    return RunResult(_layer_table(statistics), {**summary, "action": "collected"})


def run(cfg: DictConfig) -> dict[str, Any]:
    """Collect, shard or merge the statistics that ``cfg`` describes; return the run summary."""
    return run_experiment(cfg, EXPERIMENT, _body)


@hydra.main(config_path="../conf", config_name="statistics", version_base="1.3")
def main(cfg: DictConfig) -> None:
    log.info("Configuration:\n%s", OmegaConf.to_yaml(cfg))
    run(cfg)


if __name__ == "__main__":
    main()
