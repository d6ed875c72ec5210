"""Robustness of experiment runs: the recorded map kind, and failing jobs inside a multirun.

The end-to-end tests use a tiny synthetic benchmark (32 px, 40 train and 8 test
images), a ResNet18 trained for 2 optimizer steps and 4 explained images. Their
numbers mean nothing; the tests compare runs with each other.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from torch import nn

from experiments import evaluate
from experiments.common import COMPLETE_MARKER
from parchgrad.attribution import map_kind
from parchgrad.metrics import box_energy, mask_energy, pointing_game
from tiny_sizes import TINY_DATA_AND_MODEL

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
TINY_OVERRIDES = [
    *TINY_DATA_AND_MODEL,
    "statistics.max_images=40",
    "statistics.batch_size=20",
    "evaluation.num_images=4",
    "evaluation.deletion=false",
    "evaluation.save_maps=0",
]
# SmoothGrad draws its noise from the global torch generator, so its maps show
# whether a run was seeded from its own config.
SMOOTHGRAD = ["attribution=smoothgrad", "attribution.options.nt_samples=3"]
FIRST_JOB = [*SMOOTHGRAD, "selection=cls", "parchgrad.quantile=0.05"]
LAST_JOB = [*SMOOTHGRAD, "selection=ins", "parchgrad.quantile=0.1"]
# Fails inside `with controller:`, while the ParchGrad hooks are installed:
# Captum rejects Integrated Gradients with a single step.
FAILING_IN_HOOKS_JOB = ["attribution=ig", "attribution.options.n_steps=1", "selection=cls"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """Folder shared by the module's runs, so the benchmark, model and statistics are built once."""
    HydraConfig.instance().cfg = None
    return tmp_path_factory.mktemp("runs")


def tiny_cfg(root: Path, results: str, *overrides: str, cache: Path | None = None):
    paths = [
        f"paths.cache_dir={cache or root / 'cache'}",
        f"paths.results_dir={root / results}",
        f"paths.output_dir={root / 'outputs' / uuid.uuid4().hex[:8]}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="evaluate", overrides=[*TINY_OVERRIDES, *paths, *overrides])


def results_table(summary: dict) -> pd.DataFrame:
    return pd.read_csv(Path(summary["store_dir"]) / "results.csv")


def installed_hooks(model: nn.Module) -> list[str]:
    """Return ``module name: hook kind`` for every hook left on ``model`` or registered globally."""
    found = []
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if getattr(module, kind):
                found.append(f"{name or '<root>'}: {kind}")
    module_globals = torch.nn.modules.module
    for kind in (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    ):
        if getattr(module_globals, kind):
            found.append(f"global: {kind}")
    return found


def disturb_random_state() -> None:
    """Advance every global generator, as a previous job in the same process would."""
    random.random()
    np.random.rand(17)
    torch.rand(1000)


# ---------------------------------------------------------------------------
# Signed or absolute maps


def test_map_kind_of_methods():
    for method in ("grad", "inputgrad", "ig", "smoothgrad"):
        assert map_kind(method) == "absolute"
        assert map_kind(method, signed=True) == "signed"
    with pytest.raises(ValueError, match="Unknown attribution method 'gradcam'"):
        map_kind("gradcam")


def test_metrics_of_signed_map_equal_absolute():
    generator = torch.Generator().manual_seed(0)
    signed = torch.randn(3, 10, 12, generator=generator)
    boxes = torch.tensor([[1.0, 2.0, 6.0, 8.0], [0.0, 0.0, 5.0, 5.0], [4.0, 3.0, 12.0, 10.0]])
    masks = torch.zeros(3, 10, 12, dtype=torch.bool)
    masks[:, 2:7, 3:9] = True

    for name, value in box_energy(signed, boxes).items():
        assert torch.equal(value, box_energy(signed.abs(), boxes)[name]), name
    for name, value in mask_energy(signed, masks).items():
        assert torch.equal(value, mask_energy(signed.abs(), masks)[name]), name
    for name, value in pointing_game(signed, boxes).items():
        assert torch.equal(value, pointing_game(signed.abs(), boxes)[name]), name


@pytest.mark.slow
def test_evaluate_records_map_kind(tiny_root):
    summary = evaluate.run(tiny_cfg(tiny_root, "results-kind", "attribution=grad"))
    table = results_table(summary)
    stored = json.loads((Path(summary["store_dir"]) / "summary.json").read_text())

    assert (table["map_kind"] == "absolute").all()
    assert stored["map_kind"] == "absolute"
    assert [record["map_kind"] for record in stored["table"]] == ["absolute"]


@pytest.mark.slow
def test_evaluate_rejects_signed_maps(tiny_root):
    cfg = tiny_cfg(tiny_root, "results-kind", "attribution=grad", "+attribution.options.signed=true")
    with pytest.raises(ValueError, match="attribution.options.signed"):
        evaluate.run(cfg)


# ---------------------------------------------------------------------------
# A failing job between two others


@pytest.mark.slow
def test_runs_in_one_process_survive_failing_run(tiny_root, monkeypatch):
    # Jobs of Hydra's basic launcher share one process. Here all three runs even
    # share one model object, as they would behind a model cache, so a hook or a
    # random state left by a run would change the next run's maps.
    loaded: dict[str, tuple[nn.Module, dict]] = {}
    load_model = evaluate.load_model

    def load_model_once(cfg):
        if "model" not in loaded:
            loaded["model"] = load_model(cfg)
        return loaded["model"]

    monkeypatch.setattr(evaluate, "load_model", load_model_once)
    first = evaluate.run(tiny_cfg(tiny_root, "results-sequence", *FIRST_JOB))
    model = loaded["model"][0]
    assert installed_hooks(model) == []

    disturb_random_state()
    with pytest.raises(AssertionError, match="number of steps"):
        evaluate.run(tiny_cfg(tiny_root, "results-sequence", *FAILING_IN_HOOKS_JOB))
    assert installed_hooks(model) == []
    assert not model.training

    disturb_random_state()
    last = evaluate.run(tiny_cfg(tiny_root, "results-sequence", *LAST_JOB))
    assert installed_hooks(model) == []
    monkeypatch.undo()

    # The same configurations alone, each with a freshly loaded model.
    alone_first = evaluate.run(tiny_cfg(tiny_root, "results-alone", *FIRST_JOB))
    alone_last = evaluate.run(tiny_cfg(tiny_root, "results-alone", *LAST_JOB))
    assert alone_first["skipped"] is False
    assert alone_last["skipped"] is False
    pd.testing.assert_frame_equal(results_table(first), results_table(alone_first))
    pd.testing.assert_frame_equal(results_table(last), results_table(alone_last))


@pytest.mark.slow
def test_basic_launcher_multirun_survives_failing_job(tmp_path):
    # Hydra 1.3.8's BasicLauncher runs every job of a batch in this process, and
    # hydra.core.utils.run_job catches a job's Exception. The BasicSweeper raises
    # the first failure only once the batch is over. With the default
    # hydra.sweeper.max_batch_size (null) the whole sweep is one batch, so every
    # other job finishes and the command exits with status 1.
    launch_dir = tmp_path / "launch"
    launch_dir.mkdir()
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    # quantile=1.5 is invalid, so the middle job raises a ValueError inside its run.
    completed = subprocess.run(
        [
            sys.executable, "-m", "experiments.evaluate", "-m",
            *TINY_OVERRIDES, *SMOOTHGRAD, "selection=cls",
            "paths.cache_dir=cache", "paths.results_dir=results",
            "parchgrad.quantile=0.05,1.5,0.1",
        ],
        cwd=launch_dir,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = completed.stdout[-3000:] + completed.stderr[-3000:]
    assert completed.returncode == 1, output
    assert "quantile must be in (0, 1], got 1.5" in completed.stderr, output

    sweep_dirs = list((launch_dir / "multirun" / "evaluate").iterdir())
    assert len(sweep_dirs) == 1
    jobs = sweep_dirs[0]
    assert (jobs / "0" / "results.csv").is_file()
    assert not (jobs / "1" / "results.csv").exists()
    assert (jobs / "2" / "results.csv").is_file()
    stored = sorted(path.parent for path in (launch_dir / "results" / "evaluate").glob(f"*/{COMPLETE_MARKER}"))
    assert len(stored) == 2

    # The same configurations run alone give the same numbers.
    for job, quantile in (("0", "0.05"), ("2", "0.1")):
        cfg = tiny_cfg(
            tmp_path, "results-alone", *SMOOTHGRAD, "selection=cls", f"parchgrad.quantile={quantile}",
            cache=launch_dir / "cache",
        )
        alone = evaluate.run(cfg)
        pd.testing.assert_frame_equal(pd.read_csv(jobs / job / "results.csv"), results_table(alone))
