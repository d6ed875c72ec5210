"""Shared output of the benchmarks: a printed table and a JSON record."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def print_table(rows: list[dict]) -> None:
    """Print item, measured value, target and pass/fail of each row."""
    width = max(len(row["item"]) for row in rows)
    print(f"{'item':<{width}}  {'measured':>10}  {'target':>10}  result")
    for row in rows:
        verdict = {True: "pass", False: "FAIL", None: "-"}[row["passed"]]
        print(f"{row['item']:<{width}}  {row['measured']!s:>10}  {row['target']!s:>10}  {verdict}")


def save_results(name: str, rows: list[dict]) -> Path:
    """Write ``rows`` with the machine description to ``results/<name>.json`` atomically."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "rows": rows,
    }
    path = RESULTS_DIR / f"{name}.json"
    with tempfile.NamedTemporaryFile("w", dir=RESULTS_DIR, suffix=".tmp", delete=False) as handle:
        json.dump(record, handle, indent=2, default=str)
    os.replace(handle.name, path)
    print(f"saved {path}")
    return path
