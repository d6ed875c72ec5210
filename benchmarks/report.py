"""Shared output of the benchmarks: a printed table and a JSON record."""

from __future__ import annotations

import json
import os
import platform
import resource
from pathlib import Path

import numpy as np
import scipy
import torch

from parchgrad._atomic import write_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def print_table(rows: list[dict]) -> None:
    """Print item, measured value (with its unit, if any), target and pass/fail of each row."""
    width = max(len(row["item"]) for row in rows)
    print(f"{'item':<{width}}  {'measured':>14}  {'target':>10}  result")
    for row in rows:
        verdict = {True: "pass", False: "FAIL", None: "-"}[row["passed"]]
        measured = f"{row['measured']} {row.get('unit', '')}".strip()
        print(f"{row['item']:<{width}}  {measured:>14}  {row['target']!s:>10}  {verdict}")


def save_results(name: str, rows: list[dict]) -> Path:
    """Write ``rows`` with the machine description to ``results/<name>.json`` atomically."""
    record = {
        "benchmark": name,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "scipy": scipy.__version__,
            "numpy": np.__version__,
        },
        "process_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "rows": rows,
    }
    text = json.dumps(record, indent=2, default=str)
    path = write_atomic(RESULTS_DIR / f"{name}.json", lambda file: file.write(text.encode("utf-8")))
    print(f"saved {path}")
    return path
