"""Build the synthetic benchmark and train the three reference models.

    python -m experiments.prepare
    python -m experiments.prepare paths.cache_dir=/tmp/parchgrad models.vgg16.train.epochs=3

Models already in the checkpoint cache are verified and loaded, not retrained.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from parchgrad.data.synthetic import build_synthetic_benchmark
from parchgrad.models import load_reference_model

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build the benchmark and train or load every model of ``cfg.models``.

    Returns:
        ``{"data_root": str, "models": {name: {"architecture", "test_accuracy",
        "checkpoint", "cached", "seconds"}}, "seconds": float}``.
    """
    start = time.perf_counter()
    cache_dir = to_absolute_path(str(cfg.paths.cache_dir))
    data_config = OmegaConf.to_container(cfg.data, resolve=True)
    data_config["root"] = to_absolute_path(str(data_config["root"]))
    progress = bool(cfg.get("progress", True))

    log.info("Building the synthetic benchmark under %s (data.root)", data_config["root"])
    data_root = build_synthetic_benchmark(data_config, progress=progress)
    log.info("Benchmark ready: %s", data_root)

    results: dict[str, Any] = {}
    for name, model_cfg in cfg.models.items():
        model_start = time.perf_counter()
        log.info("Preparing models.%s (%s)", name, model_cfg.architecture)
        _, info = load_reference_model(
            model_cfg.architecture,
            data_config,
            OmegaConf.to_container(model_cfg.train, resolve=True),
            cache_dir,
            progress=progress,
        )
        results[name] = {
            "architecture": info["architecture"],
            "test_accuracy": info["test_accuracy"],
            "checkpoint": info["checkpoint"],
            "cached": info["cached"],
            "seconds": time.perf_counter() - model_start,
        }
        log.info("models.%s: test accuracy %.4f, checkpoint %s", name,
                 info["test_accuracy"], info["checkpoint"])

    total = time.perf_counter() - start
    print(_format_table(results))
    print(f"Total time: {total:.0f} s")
    return {"data_root": str(data_root), "models": results, "seconds": total}


def _format_table(results: dict[str, Any]) -> str:
    lines = [f"{'model':<16} {'architecture':<16} {'test acc.':>9} {'time (s)':>9}  source"]
    for name, row in results.items():
        source = "cache" if row["cached"] else "trained"
        lines.append(
            f"{name:<16} {row['architecture']:<16} {row['test_accuracy']:>9.4f} "
            f"{row['seconds']:>9.0f}  {source}"
        )
    return "\n".join(lines)


@hydra.main(config_path="../conf", config_name="prepare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except Exception:
        log.exception("prepare failed")
        raise


if __name__ == "__main__":
    main()
