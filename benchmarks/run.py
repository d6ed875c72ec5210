"""Run every benchmark, print one table per benchmark and save JSON under benchmarks/results/.

Run: ``python -m benchmarks.run`` (what ``make bench`` calls). Exits with
status 1 when a target is missed.
"""

from __future__ import annotations

import importlib
import sys

from .report import print_table, save_results

BENCHMARKS = {"statistics_bench": "benchmarks.statistics_bench", "hooks_bench": "benchmarks.hooks_bench"}


def main() -> int:
    failed = []
    for name, module_name in BENCHMARKS.items():
        print(f"\n== {name} ({module_name}) ==")
        rows = importlib.import_module(module_name).run()
        print_table(rows)
        save_results(name, rows)
        # Rows with passed=None are informational (a stage time without its own target).
        failed += [row["item"] for row in rows if row["passed"] is False]
    if failed:
        print(f"\nMissed targets: {failed}")
        return 1
    print("\nAll benchmark targets met.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
