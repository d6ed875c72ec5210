"""Tests that the conda environment and pyproject.toml declare the same dependencies."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pip_requirements_of_environment():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    for entry in environment["dependencies"]:
        if isinstance(entry, dict) and "pip" in entry:
            return {line for line in entry["pip"] if not line.startswith("-e")}
    raise AssertionError("environment.yml has no pip section")


def test_environment_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    assert _pip_requirements_of_environment() == declared


def test_ci_script_runs_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme
    assert "make test" in ci_script
