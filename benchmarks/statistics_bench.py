"""Benchmark channel statistics on an ImageNet-sized synthetic GAP stream.

The stream has 50,000 rows (50 per class, 1,000 classes) and 4,800 channels
split like the 20 Conv2d layers of torchvision's ResNet-18, fed in batches of
256. Values are ``ReLU(normal + class offset)``, so they are not normal.

Timed stages: accumulation, Welch and Student t-tests, Shapiro-Wilk on the
5,000-row reservoir, and the dataset mean and std. Generating the stream is
timed separately and excluded from the total.

The reference is the released code's computation: one
``scipy.stats.ttest_ind(class, rest, alternative="greater")`` call per
(class, channel) pair, on arrays sliced with boolean masks. It is timed on
``REFERENCE_PAIRS`` random pairs per test and extrapolated to all 4.8 million
pairs and both tests, so it is an estimate.

Peak memory is the process resident set size (RSS), sampled every 10 ms from
``/proc/self/statm`` during the timed stages. It includes the interpreter,
torch and the benchmark's own stream buffers.

NOTE: times depend on the load of the CPU. On a shared 2-core machine at a
1-minute load average of 7 to 9, the accumulation took 11 to 18 s in
different runs, so the table records the torch thread count and the load average.

Run ``python -m benchmarks.statistics_bench``; it prints a table and writes
``benchmarks/results/statistics_bench.json``.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import warnings

import numpy as np
import scipy.stats
import torch
import torchvision

from parchgrad.layers import conv_layer_names
from parchgrad.statistics import StatisticsAccumulator

from .report import print_table, save_results

NUM_SAMPLES = 50_000
NUM_CLASSES = 1_000
BATCH_SIZE = 256
RESERVOIR_SIZE = 5_000
REFERENCE_PAIRS = 200
SEED = 0

TARGET_SECONDS = 20.0
TARGET_PEAK_BYTES = 2 * 1024**3
TARGET_SPEEDUP = 250.0



def resnet18_layer_channels() -> dict[str, int]:
    """Return the Conv2d names and output channels of torchvision's ResNet-18 (4,800 channels in all)."""
    model = torchvision.models.resnet18(weights=None)
    modules = dict(model.named_modules())
    return {name: modules[name].out_channels for name in conv_layer_names(model)}


class PeakRSS:
    """Sample the process RSS in a background thread and keep the maximum, in bytes."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page_size = os.sysconf("SC_PAGE_SIZE")

    def current(self) -> int:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * self._page_size

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def stream_batches(layer_channels: dict[str, int], generator: torch.Generator):
    """Yield ``(gaps, labels)`` batches: 50 shuffled images per class, ``ReLU(normal + class offset)`` values."""
    total_channels = sum(layer_channels.values())
    labels = torch.arange(NUM_CLASSES).repeat_interleave(NUM_SAMPLES // NUM_CLASSES)
    labels = labels[torch.randperm(NUM_SAMPLES, generator=generator)]
    class_offsets = 0.2 * torch.randn(NUM_CLASSES, total_channels, generator=generator)
    for start in range(0, NUM_SAMPLES, BATCH_SIZE):
        batch_labels = labels[start : start + BATCH_SIZE]
        values = torch.randn(len(batch_labels), total_channels, generator=generator)
        values = torch.relu(values + class_offsets[batch_labels])
        yield dict(zip(layer_channels, values.split(list(layer_channels.values()), dim=1))), batch_labels


def time_reference(columns: np.ndarray, labels: np.ndarray, pairs: np.ndarray, equal_var: bool) -> tuple[float, np.ndarray]:
    """Time one ``ttest_ind`` per (class, column) pair as the released code does; return seconds per pair and p-values."""
    pvalues = np.empty(len(pairs))
    start = time.perf_counter()
    for index, (k, column) in enumerate(pairs):
        values = columns[:, column]
        pvalues[index] = scipy.stats.ttest_ind(
            values[labels == k], values[labels != k], alternative="greater", equal_var=equal_var
        ).pvalue
    return (time.perf_counter() - start) / len(pairs), pvalues


def run(num_threads: int | None = None) -> list[dict]:
    """Run the benchmark and return one row per measured item.

    ``num_threads`` sets ``torch.set_num_threads`` for the run (restored after);
    None keeps torch's default.
    """
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _run()
    finally:
        torch.set_num_threads(previous_threads)


def _run() -> list[dict]:
    layer_channels = resnet18_layer_channels()
    total_channels = sum(layer_channels.values())
    generator = torch.Generator().manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    pair_classes = rng.integers(0, NUM_CLASSES, size=REFERENCE_PAIRS)
    pair_channels = rng.choice(total_channels, size=REFERENCE_PAIRS, replace=False)

    accumulator = StatisticsAccumulator(layer_channels, NUM_CLASSES, reservoir_size=RESERVOIR_SIZE, seed=SEED)
    kept_columns, kept_labels = [], []
    seconds = {"generate": 0.0, "accumulate": 0.0}

    with PeakRSS() as memory:
        baseline_rss = memory.peak
        batches = stream_batches(layer_channels, generator)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            seconds["generate"] += time.perf_counter() - start
            if batch is None:
                break
            gaps, labels = batch
            start = time.perf_counter()
            accumulator.update(gaps, labels)
            seconds["accumulate"] += time.perf_counter() - start
            # Columns of the reference pairs, kept for the scipy loop below.
            stacked = torch.cat(list(gaps.values()), dim=1)
            kept_columns.append(stacked[:, pair_channels].numpy().astype(np.float64))
            kept_labels.append(labels.numpy().copy())

        start = time.perf_counter()
        welch = accumulator.ttest_pvalues("welch")
        seconds["welch"] = time.perf_counter() - start
        start = time.perf_counter()
        student = accumulator.ttest_pvalues("student")
        seconds["student"] = time.perf_counter() - start
        start = time.perf_counter()
        accumulator.shapiro_pvalues()
        seconds["shapiro"] = time.perf_counter() - start
        start = time.perf_counter()
        accumulator.dataset_mean_std()
        seconds["mean_std"] = time.perf_counter() - start

    columns = np.concatenate(kept_columns)
    labels = np.concatenate(kept_labels)
    pairs = np.stack([pair_classes, np.arange(REFERENCE_PAIRS)], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        student_per_pair, student_reference = time_reference(columns, labels, pairs, equal_var=True)
        welch_per_pair, welch_reference = time_reference(columns, labels, pairs, equal_var=False)

    welch_all = torch.cat(list(welch.values()), dim=1).numpy()
    student_all = torch.cat(list(student.values()), dim=1).numpy()
    welch_error = np.max(np.abs(welch_all[pair_classes, pair_channels] - welch_reference) / np.maximum(welch_reference, 1e-300))
    student_error = np.max(
        np.abs(student_all[pair_classes, pair_channels] - student_reference) / np.maximum(student_reference, 1e-300)
    )

    num_pairs = NUM_CLASSES * total_channels
    reference_seconds = num_pairs * (student_per_pair + welch_per_pair)
    ttest_seconds = seconds["accumulate"] + seconds["welch"] + seconds["student"]
    total_seconds = ttest_seconds + seconds["shapiro"] + seconds["mean_std"]
    speedup = reference_seconds / ttest_seconds

    def row(item, measured, unit, target="", passed=None):
        return {"item": item, "measured": measured, "unit": unit, "target": target, "passed": passed}

    return [
        row("layers / channels", f"{len(layer_channels)} / {total_channels}", ""),
        row("torch threads / 1-min load average", f"{torch.get_num_threads()} / {os.getloadavg()[0]:.1f}", ""),
        row("stream generation (excluded)", round(seconds["generate"], 2), "s"),
        row("accumulate", round(seconds["accumulate"], 2), "s"),
        row("welch t-test", round(seconds["welch"], 2), "s"),
        row("student t-test", round(seconds["student"], 2), "s"),
        row("shapiro-wilk (reservoir)", round(seconds["shapiro"], 2), "s"),
        row("dataset mean/std", round(seconds["mean_std"], 3), "s"),
        row("total", round(total_seconds, 2), "s", f"<= {TARGET_SECONDS:g}", total_seconds <= TARGET_SECONDS),
        row("peak RSS", round(memory.peak / 1024**3, 3), "GiB", "<= 2", memory.peak <= TARGET_PEAK_BYTES),
        row("RSS increase over start", round((memory.peak - baseline_rss) / 1024**3, 3), "GiB"),
        row("reference per pair (student)", round(student_per_pair * 1e3, 3), "ms"),
        row("reference per pair (welch)", round(welch_per_pair * 1e3, 3), "ms"),
        row("reference estimate, 4.8M pairs x 2 tests", round(reference_seconds), "s"),
        row(
            "speed-up (accumulate + 2 t-tests)",
            round(speedup),
            "x",
            f">= {TARGET_SPEEDUP:g}",
            speedup >= TARGET_SPEEDUP,
        ),
        row("speed-up (t-test stage only)", round(reference_seconds / (seconds["welch"] + seconds["student"])), "x"),
        row("max relative p-value difference vs scipy", f"{max(welch_error, student_error):.1e}", ""),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    rows = run(parser.parse_args().threads)
    print_table(rows)
    save_results("statistics_bench", rows)


if __name__ == "__main__":
    main()
