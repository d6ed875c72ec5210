"""Composition tests of the Hydra configs: every primary config, group option and launcher."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

# The launcher configs share their names with the plugins' schemas; see experiments/common.py.
pytestmark = pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/.*' is validated against ConfigStore schema:UserWarning")

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
PRIMARY_CONFIGS = sorted(path.stem for path in CONF_DIR.glob("*.yaml"))
ATTRIBUTIONS = ["grad", "inputgrad", "ig", "smoothgrad"]
SELECTIONS = ["cls", "ins", "none"]
MODELS = ["resnet18", "vgg16", "efficientnet_b0"]
LAUNCHERS = {
    "joblib": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    "submitit_slurm": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
}


def compose_config(name: str, overrides: list[str] | None = None, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [], return_hydra_config=hydra)


def test_primary_configs_found():
    for name in ("statistics", "e2_magnitude", "evaluate"):
        assert name in PRIMARY_CONFIGS


@pytest.mark.parametrize("name", PRIMARY_CONFIGS)
def test_primary_config_composes(name):
    cfg = compose_config(name, hydra=True)
    assert cfg.experiment == name
    # Resolve everything but Hydra's runtime values, which exist only inside a run.
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra")
    OmegaConf.to_container(OmegaConf.create(container), resolve=True)


@pytest.mark.parametrize("name", ["statistics", "e2_magnitude", "evaluate"])
def test_experiment_config_keys(name):
    cfg = compose_config(name)
    assert cfg.seed is not None
    assert cfg.paths.results_dir
    assert cfg.paths.cache_dir
    assert cfg.statistics.split == "train"
    assert cfg.statistics.max_images == 500
    assert cfg.model.architecture == "resnet18"
    assert cfg.data.name == "synthetic"


@pytest.mark.parametrize("attribution", ATTRIBUTIONS)
def test_attribution_options_compose(attribution):
    cfg = compose_config("evaluate", [f"attribution={attribution}"])
    assert cfg.attribution.name == attribution
    assert isinstance(OmegaConf.to_container(cfg.attribution.options), dict)


def test_released_attribution_settings():
    ig = compose_config("evaluate", ["attribution=ig"]).attribution.options
    assert ig.n_steps == 26
    smoothgrad = compose_config("evaluate", ["attribution=smoothgrad"]).attribution.options
    assert smoothgrad.nt_samples == 25
    assert smoothgrad.noise_level == 0.15


@pytest.mark.parametrize("selection", SELECTIONS)
def test_selection_options_compose(selection):
    assert compose_config("evaluate", [f"selection={selection}"]).selection.name == selection


def test_parchgrad_defaults():
    parchgrad = compose_config("evaluate").parchgrad
    assert parchgrad.quantile == 0.05
    assert parchgrad.alpha is None
    assert parchgrad.p_value_threshold == 0.05
    assert parchgrad.variance_conservation is True
    assert parchgrad.gamma is None
    assert parchgrad.exact_variance is False
    assert parchgrad.layers is None
    assert parchgrad.layer_ratio is None


@pytest.mark.parametrize("model", MODELS)
def test_models_compose(model):
    cfg = compose_config("e2_magnitude", [f"model={model}"])
    assert cfg.model.architecture in {"resnet18", "vgg16_bn", "efficientnet_b0"}
    assert cfg.model.batch_size > 0


def test_e2_defaults_match_released_figures():
    e2 = compose_config("e2_magnitude").e2
    assert list(e2.quantiles) == [0.05, 0.1]
    assert list(e2.variance_conservation) == [True, False]
    assert list(e2.layer_ratios) == [1.0, 0.9, 0.5, 0.3]
    ratios = compose_config("e2_magnitude").evaluation.deletion_ratios
    assert list(ratios) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launcher_composes(launcher):
    cfg = compose_config("evaluate", [f"hydra/launcher={launcher}"], hydra=True)
    assert cfg.hydra.launcher._target_ == LAUNCHERS[launcher]


def test_joblib_runs_two_jobs():
    cfg = compose_config("evaluate", ["hydra/launcher=joblib"], hydra=True)
    assert cfg.hydra.launcher.n_jobs == 2


def test_slurm_keys_overridable():
    overrides = [
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=30",
        "hydra.launcher.gpus_per_node=2",
        "hydra.launcher.cpus_per_task=8",
        "hydra.launcher.mem_gb=32",
    ]
    launcher = compose_config("e2_magnitude", overrides, hydra=True).hydra.launcher
    assert launcher.partition == "gpu"
    assert launcher.timeout_min == 30
    assert launcher.gpus_per_node == 2
    assert launcher.cpus_per_task == 8
    assert launcher.mem_gb == 32


def test_hydra_output_dirs_per_experiment():
    cfg = compose_config("e2_magnitude", hydra=True)
    assert cfg.hydra.job.chdir is False
    raw = OmegaConf.to_container(cfg.hydra, resolve=False)
    assert raw["run"]["dir"].startswith("outputs/${experiment}")
    assert raw["sweep"]["dir"].startswith("multirun/${experiment}")


def test_shrunk_config_for_tests():
    cfg = compose_config(
        "e2_magnitude",
        ["data.image_size=32", "data.num_train=40", "evaluation.num_images=4", "e2.layer_ratios=[0.5]"],
    )
    assert cfg.data.image_size == 32
    assert cfg.evaluation.num_images == 4
    assert list(cfg.e2.layer_ratios) == [0.5]
