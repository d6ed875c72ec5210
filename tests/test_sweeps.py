"""Command-line runs through Hydra: a single run with chdir, then a submitit_local multirun.

Both run ``python -m experiments.evaluate`` in a fresh launch directory with
relative ``paths.cache_dir`` and ``paths.results_dir``, so they also check that
relative paths resolve against the launch directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.common import COMPLETE_MARKER
from tiny_sizes import TINY_DATA_AND_MODEL

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_OVERRIDES = [
    *TINY_DATA_AND_MODEL,
    "evaluation.num_images=4",
    "evaluation.deletion=false",
    "selection=none",
    # Relative on purpose: they must resolve against the launch directory.
    "paths.cache_dir=cache",
    "paths.results_dir=results",
]


def run_experiment_command(launch_dir: Path, *arguments: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", *arguments],
        cwd=launch_dir,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed


def completed_runs(launch_dir: Path) -> list[Path]:
    return sorted(path.parent for path in (launch_dir / "results" / "evaluate").glob(f"*/{COMPLETE_MARKER}"))


@pytest.mark.slow
def test_single_run_then_submitit_sweep(tmp_path):
    launch_dir = tmp_path / "launch"
    launch_dir.mkdir()

    # A single run whose working directory Hydra changes to the output directory.
    run_experiment_command(launch_dir, *TINY_OVERRIDES, "attribution=grad", "hydra.job.chdir=true")
    assert (launch_dir / "cache" / "models").is_dir()
    first = completed_runs(launch_dir)
    assert len(first) == 1
    first_summary = json.loads((first[0] / "summary.json").read_text())
    assert Path(first_summary["output_dir"]).is_relative_to(launch_dir / "outputs" / "evaluate")
    assert (Path(first_summary["output_dir"]) / "results.csv").is_file()
    # Relative paths read from Hydra's changed working directory would land here.
    assert not (Path(first_summary["output_dir"]) / "cache").exists()
    assert not (Path(first_summary["output_dir"]) / "results").exists()

    # A two-job sweep through submitit's local executor. The grad job repeats the single
    # run's configuration, so it is skipped; the inputgrad job computes.
    run_experiment_command(launch_dir, "-m", "hydra/launcher=submitit_local", *TINY_OVERRIDES, "attribution=grad,inputgrad")
    runs = completed_runs(launch_dir)
    assert len(runs) == 2
    attributions = sorted(json.loads((run / "summary.json").read_text())["table"][0]["attribution"] for run in runs)
    assert attributions == ["grad", "inputgrad"]

    sweep_dirs = list((launch_dir / "multirun" / "evaluate").iterdir())
    assert len(sweep_dirs) == 1
    job_dirs = sorted(path.name for path in sweep_dirs[0].iterdir() if path.is_dir() and not path.name.startswith("."))
    assert job_dirs == ["0", "1"]
    # Only the computed job writes results into its own output directory.
    assert not (sweep_dirs[0] / "0" / "results.csv").exists()
    assert (sweep_dirs[0] / "1" / "results.csv").is_file()
