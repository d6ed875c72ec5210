"""Execute the tutorial notebook with a reduced benchmark; the test fails if any cell raises."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "tutorial.ipynb"


@pytest.mark.slow
def test_tutorial_notebook_runs(tmp_path, monkeypatch):
    # The kernel inherits this process's environment: a small benchmark in a fresh cache.
    monkeypatch.setenv("PARCHGRAD_TUTORIAL_SMALL", "1")
    monkeypatch.setenv("PARCHGRAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    text = "".join(output.get("text", "") for output in outputs)
    assert "test accuracy:" in text
    assert "ParchGrad, VC" in text
    assert "mu_in_w" in text
