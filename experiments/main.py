"""The main job: E1, statistics, E2 for three models, sanity checks and the claims report.

Stages, each an experiment with its own resolved config, results and resume:

1. ``prepare``: build the synthetic benchmark and train the reference models
   (skipped with ``prepare=false``, e.g. on ImageNet with pretrained weights);
2. ``e1_aggregation``: the toy gradient-aggregation study and its figures;
3. ``e2_magnitude`` for each model of ``models`` (statistics are collected on
   first use) and the E2 figures;
4. ``sanity``: cascading model-parameter randomization (``sanity=false`` skips it);
5. ``claims``: the claims report, ``figures/claims.md``.

It ends by printing a summary table. Run::

    python -m experiments.main
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments import claims, e1_aggregation, e2_magnitude, prepare, sanity
from experiments.common import absolute_path

log = logging.getLogger(__name__)


def _has_key(container: dict, dotted: str) -> bool:
    node: Any = container
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _accepted_overrides(config_name: str, overrides: list[str]) -> list[str]:
    """Return the overrides that apply to ``config_name`` and log the others.

    Group overrides (``data=imagenet``) apply when the config has that group.
    They are composed first, so value overrides are checked against the chosen
    options (``data.boxes_dir`` exists only in ``data=imagenet``). A
    value override applies when its key exists, whatever its value (null and
    ``???`` included).
    """
    base = compose(config_name)
    groups, values = [], []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        is_group = "." not in key and isinstance(OmegaConf.select(base, key, default=None), DictConfig)
        (groups if is_group else values).append(override)

    accepted = [override for override in groups if override.split("=", 1)[0].lstrip("+~") in base]
    container = OmegaConf.to_container(compose(config_name, overrides=accepted), resolve=False)
    for override in values:
        key = override.split("=", 1)[0].lstrip("+~")
        if _has_key(container, key):
            accepted.append(override)
    dropped = [override for override in overrides if override not in accepted]
    if dropped:
        log.info("Stage %s does not have these keys; not applied there: %s", config_name, dropped)
    return accepted


def stage_config(
    cfg: DictConfig, config_name: str, output_dir: Path, extra: list[str], stage: str | None = None
) -> DictConfig:
    """Compose the config of one stage, writing into ``<output_dir>/<stage or config_name>``."""
    overrides = [
        f"paths.output_dir={output_dir / (stage or config_name)}",
        f"paths.results_dir={absolute_path(cfg.paths.results_dir)}",
        f"paths.figures_dir={absolute_path(cfg.paths.figures_dir)}",
        f"paths.cache_dir={absolute_path(cfg.paths.cache_dir)}",
    ]
    overrides += _accepted_overrides(config_name, list(cfg.stage_overrides))
    return compose(config_name, overrides=overrides + extra)


def _model_row(name: str, summary: dict[str, Any]) -> dict[str, Any]:
    table = pd.DataFrame(summary["table"])
    row = {"model": name, "images": summary["images"], "test acc.": summary.get("test_accuracy")}
    for setting, column in (
        ("plain", "plain"),
        ("cls_q0.1_novc_default", "ParchGrad q0.1 no VC"),
        ("cls_q0.1_vc_default", "ParchGrad q0.1 VC"),
    ):
        selected = table[table["setting"] == setting]
        if not selected.empty:
            entry = selected.iloc[0]
            row[column] = f"{entry['mu_in_w_mean']:.3f} [{entry['mu_in_w_ci_low']:.3f}, {entry['mu_in_w_ci_high']:.3f}]"
    return row


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage and return their summaries."""
    started = time.perf_counter()
    output_dir = absolute_path(cfg.paths.output_dir or HydraConfig.get().runtime.output_dir)
    log.info("Main job output directory: %s", output_dir)
    progress = [f"progress={str(bool(cfg.progress)).lower()}"]
    summaries: dict[str, Any] = {}

    # prepare and sanity list all three models; drop those that the main job does not run.
    dropped = [f"~models.{name}" for name in ("resnet18", "vgg16", "efficientnet_b0") if name not in cfg.models]
    if cfg.prepare:
        log.info("Stage prepare: benchmark and reference models (prepare)")
        summaries["prepare"] = prepare.run(stage_config(cfg, "prepare", output_dir, progress + dropped))

    log.info("Stage e1_aggregation")
    summaries["e1"] = e1_aggregation.run(stage_config(cfg, "e1_aggregation", output_dir, []))

    summaries["e2"] = {}
    for name, images in cfg.models.items():
        log.info("Stage e2_magnitude for model=%s on %s images (models.%s)", name, images, name)
        saved = min(int(images), int(cfg.max_saved_images))
        extra = [f"model={name}", f"evaluation.num_images={images}", f"e2.saved_images={saved}", *progress]
        summaries["e2"][name] = e2_magnitude.run(
            stage_config(cfg, "e2_magnitude", output_dir, extra, stage=f"e2_magnitude-{name}")
        )
    from scripts.plot_e2 import plot_all as plot_e2

    e2_runs = {summary["model"]: Path(summary["store_dir"]) for summary in summaries["e2"].values()}
    plot_e2(e2_runs, absolute_path(cfg.paths.figures_dir))

    if cfg.sanity:
        log.info("Stage sanity (sanity)")
        summaries["sanity"] = sanity.run(stage_config(cfg, "sanity", output_dir, dropped))

    log.info("Stage claims")
    claim_inputs = [f"claims.e1_dir={summaries['e1']['store_dir']}"]
    claim_inputs += [f"claims.e2_dirs.{name}={summary['store_dir']}" for name, summary in summaries["e2"].items()]
    claim_inputs.append(f"claims.models=[{','.join(cfg.models)}]")
    if "sanity" in summaries:
        claim_inputs.append(f"claims.sanity_dir={summaries['sanity']['store_dir']}")
    summaries["claims"] = claims.run(stage_config(cfg, "claims", output_dir, claim_inputs))

    rows = [_model_row(name, summary) for name, summary in summaries["e2"].items()]
    print("\nE2, mu_in_w (mean [95% CI] over images; higher is better localized):")
    print(pd.DataFrame(rows).to_string(index=False))
    print("\nClaims (figures/claims.md):")
    for claim_id, verdict in summaries["claims"]["verdicts"].items():
        print(f"  {claim_id:<22} {verdict}")
    elapsed = time.perf_counter() - started
    print(f"\nMain job finished in {elapsed:.0f} s; figures in {absolute_path(cfg.paths.figures_dir)}")
    summaries["seconds"] = elapsed
    return summaries


@hydra.main(config_path="../conf", config_name="main", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except Exception:
        log.exception("The main job failed; see the stage logged last above.")
        raise


if __name__ == "__main__":
    main()
