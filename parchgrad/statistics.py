"""Per-channel activation statistics that the channel selectors read.

The statistic of a channel is, per image, the global average pool (GAP) of
``ReLU(conv output)``. As in the released ParchGrad code, ReLU is applied to
the raw convolution output, before any BatchNorm that follows it.

One streaming pass over a labelled dataset fills a :class:`StatisticsAccumulator`:

- per (class, channel): count, mean and M2 (sum of squared deviations from the
  mean), in float64, merged batch by batch with Chan et al.'s parallel update;
- a uniform random sample of at most ``reservoir_size`` dataset rows (one row
  contains every channel's GAP of one image), kept with reservoir sampling
  (algorithm R), for the Shapiro-Wilk test.

Accumulators of dataset shards merge into the same result as one pass, so a
sweep can collect shards in separate jobs (:func:`shard_dataset`,
:meth:`StatisticsAccumulator.save`, :func:`merge_statistics_files`).

:meth:`StatisticsAccumulator.finalize` turns the accumulator into
:class:`ChannelStatistics`, the per-layer tensors that
:mod:`parchgrad.selection` reads:

- ``ttest_pvalues[layer]`` ``[K, C]``: one-sided two-sample t-test p-value of
  "mean GAP of class k is greater than the mean GAP of all other images".
  Welch's test by default, or Student's (equal variances), which is what the
  released code runs. The values equal
  ``scipy.stats.ttest_ind(class, rest, alternative="greater", equal_var=...)``,
  NaN included; selectors count NaN as 1.
- ``shapiro_pvalues[layer]`` ``[C]``: Shapiro-Wilk p-value of the channel's
  GAP over the reservoir sample.
- ``mean[layer]``, ``std[layer]`` ``[C]``: GAP mean and standard deviation
  (``ddof=1``) over the whole dataset, for instance-wise selection.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import scipy.special
import scipy.stats
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from parchgrad._atomic import write_atomic
from parchgrad.layers import conv_layer_names, resolve_layers

__all__ = [
    "TESTS",
    "ChannelStatistics",
    "StatisticsAccumulator",
    "collect_statistics",
    "merge_statistics_files",
    "shard_dataset",
    "shard_indices",
    "statistics_filename",
]

TESTS = ("welch", "student")

_ACCUMULATOR_FORMAT = "parchgrad.StatisticsAccumulator"
_STATISTICS_FORMAT = "parchgrad.ChannelStatistics"
_FORMAT_VERSION = 1

# Classes per chunk when computing t-test p-values, which bounds the float64
# temporaries to about 12 arrays of [chunk, C].
_TTEST_CLASS_CHUNK = 128
# Channels per scipy.stats.shapiro call, which bounds its float64 copy of the reservoir.
_SHAPIRO_CHANNEL_CHUNK = 512
# Metadata keys that must agree between merged accumulators.
_IDENTITY_KEYS = ("model_name", "weights_id", "dataset_id")


# ---------------------------------------------------------------------------
# Files


def _atomic_torch_save(payload: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``payload`` with ``torch.save`` atomically (see :func:`parchgrad._atomic.write_atomic`)."""
    return write_atomic(path, lambda file: torch.save(dict(payload), file))


def _load_payload(path: str | os.PathLike, expected_format: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Statistics file not found: {str(path)!r}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    found = payload.get("format") if isinstance(payload, dict) else None
    if found != expected_format:
        raise ValueError(
            f"{str(path)!r} is not a {expected_format} file (format field: {found!r})."
        )
    if payload.get("format_version") != _FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has format version {payload.get('format_version')!r}; this "
            f"parchgrad reads version {_FORMAT_VERSION}. Recollect the statistics."
        )
    return payload


def statistics_filename(model_name: str, weights_id: str, dataset_id: str) -> str:
    """Return the file name of the statistics of one (model, weights, dataset).

    Characters other than letters, digits, ``.``, ``_`` and ``-`` become ``-``.
    """
    parts = []
    for label, value in (("model_name", model_name), ("weights_id", weights_id), ("dataset_id", dataset_id)):
        text = re.sub(r"[^A-Za-z0-9._-]+", "-", str(value)).strip("-")
        if not text:
            raise ValueError(f"{label} must contain a letter or digit, got {value!r}")
        parts.append(text)
    return "__".join(parts) + ".pt"


def _library_versions() -> dict[str, str]:
    try:
        parchgrad_version = importlib.metadata.version("parchgrad")
    except importlib.metadata.PackageNotFoundError:
        parchgrad_version = "unknown"
    return {
        "torch": torch.__version__,
        "scipy": scipy.__version__,
        "numpy": np.__version__,
        "parchgrad": parchgrad_version,
    }


# ---------------------------------------------------------------------------
# Shards


def shard_indices(size: int, shard_index: int, num_shards: int) -> range:
    """Return the contiguous index range of shard ``shard_index`` of ``num_shards`` over ``size`` items.

    Shard sizes differ by at most one, and the shards cover ``range(size)`` in order.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards!r}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index!r}")
    base, extra = divmod(size, num_shards)
    start = shard_index * base + min(shard_index, extra)
    stop = start + base + (1 if shard_index < extra else 0)
    return range(start, stop)


def shard_dataset(dataset: Dataset, shard_index: int, num_shards: int) -> Subset:
    """Return shard ``shard_index`` of ``num_shards`` of a map-style ``dataset`` (contiguous items)."""
    return Subset(dataset, list(shard_indices(len(dataset), shard_index, num_shards)))


def _shard_loader(loader: DataLoader, shard_index: int, num_shards: int) -> DataLoader:
    """Rebuild ``loader`` over one shard of its dataset, keeping batch size, workers and collate."""
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        raise TypeError(
            "shard_index/num_shards need a torch DataLoader with a batch_size; got "
            f"{type(loader).__name__}. Build the loader over shard_dataset(dataset, "
            "shard_index, num_shards) instead and pass num_shards=1."
        )
    # The sampler is dropped: the statistics do not depend on the order of the images.
    return DataLoader(
        shard_dataset(loader.dataset, shard_index, num_shards),
        batch_size=loader.batch_size,
        shuffle=False,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
    )


# ---------------------------------------------------------------------------
# Accumulator


class StatisticsAccumulator:
    """Streaming per-(class, channel) moments and a reservoir sample of GAP rows.

    Every image contributes to every channel, so the count is kept per class
    (``class_counts``, ``[K]``) and the means and M2 per (class, channel). All
    layers are stored side by side in ``[K, sum C]`` float64 arrays, in the
    order of ``layer_channels``.

    Args:
        layer_channels: ordered mapping from qualified layer name to its channel count C.
        num_classes: number of classes K; labels must be in ``[0, K)``.
        reservoir_size: maximum number of rows kept for the Shapiro-Wilk test.
        seed: seed of the reservoir's random generator (an int or a sequence
            of ints, passed to ``numpy.random.default_rng``). Shards collected
            in parallel need different seeds, for example ``(seed, shard_index)``.
        metadata: extra identifiers stored with the statistics, such as
            ``model_name``, ``weights_id``, ``dataset_id`` and ``model_layers``.
    """

    def __init__(
        self,
        layer_channels: Mapping[str, int],
        num_classes: int,
        reservoir_size: int = 5000,
        seed: int | Sequence[int] = 0,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if not layer_channels:
            raise ValueError("layer_channels is empty; name at least one layer.")
        for layer, channels in layer_channels.items():
            if not isinstance(channels, int) or channels < 1:
                raise ValueError(f"Layer {layer!r} needs a positive channel count, got {channels!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes!r}")
        if reservoir_size < 0:
            raise ValueError(f"reservoir_size must be >= 0, got {reservoir_size!r}")

        self.layer_channels: dict[str, int] = dict(layer_channels)
        self.num_classes = int(num_classes)
        self.reservoir_size = int(reservoir_size)
        self.seed = seed if isinstance(seed, int) else [int(value) for value in seed]
        self.metadata: dict[str, Any] = dict(metadata or {})

        self._slices: dict[str, slice] = {}
        start = 0
        for layer, channels in self.layer_channels.items():
            self._slices[layer] = slice(start, start + channels)
            start += channels
        self.total_channels = start

        self.class_counts = torch.zeros(self.num_classes, dtype=torch.int64)
        self._mean = torch.zeros(self.num_classes, self.total_channels, dtype=torch.float64)
        self._m2 = torch.zeros(self.num_classes, self.total_channels, dtype=torch.float64)
        self._reservoir = torch.zeros(self.reservoir_size, self.total_channels, dtype=torch.float32)
        self._rng = np.random.default_rng(self.seed)
        self._buffer: np.ndarray | None = None

    # -- views ---------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        """Number of rows (images) accumulated so far."""
        return int(self.class_counts.sum())

    @property
    def class_mean(self) -> dict[str, Tensor]:
        """Per-layer ``[K, C]`` float64 class means (views into the accumulator)."""
        return {layer: self._mean[:, part] for layer, part in self._slices.items()}

    @property
    def class_m2(self) -> dict[str, Tensor]:
        """Per-layer ``[K, C]`` float64 sums of squared deviations from the class mean."""
        return {layer: self._m2[:, part] for layer, part in self._slices.items()}

    @property
    def reservoir(self) -> dict[str, Tensor]:
        """Per-layer ``[R, C]`` float32 reservoir rows, ``R = min(num_samples, reservoir_size)``."""
        filled = min(self.num_samples, self.reservoir_size)
        return {layer: self._reservoir[:filled, part] for layer, part in self._slices.items()}

    # -- update --------------------------------------------------------------

    def _stack_batch(self, gaps: Mapping[str, Tensor], labels: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Check one batch and copy it into a reused ``[B, sum C]`` float64 buffer; return it and ``[B]`` int64 labels."""
        missing = [layer for layer in self.layer_channels if layer not in gaps]
        extra = [layer for layer in gaps if layer not in self.layer_channels]
        if missing or extra:
            raise ValueError(
                f"gaps must have exactly the accumulator's layers; missing {missing}, unexpected {extra}."
            )

        labels = torch.as_tensor(labels).detach().cpu()
        if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
            raise ValueError(
                f"labels must be a [B] integer tensor, got dtype {labels.dtype} shape {tuple(labels.shape)}"
            )
        labels = labels.to(torch.int64)

        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"labels must be in [0, {self.num_classes}), got min {int(labels.min())} and "
                f"max {int(labels.max())}. Check num_classes."
            )

        batch_size = labels.numel()
        for layer, channels in self.layer_channels.items():
            if gaps[layer].shape != (batch_size, channels):
                raise ValueError(
                    f"gaps[{layer!r}] must have shape [B, C] = {[batch_size, channels]}, "
                    f"got {list(gaps[layer].shape)}"
                )

        # Reusing one buffer avoids allocating (and page-faulting) a fresh
        # [B, sum C] float64 array for every batch.
        if self._buffer is None or self._buffer.shape[0] < batch_size:
            self._buffer = np.empty((batch_size, self.total_channels), dtype=np.float64)
        values = self._buffer[:batch_size]
        for layer, part in self._slices.items():
            values[:, part] = gaps[layer].detach().cpu().numpy()
        return values, labels.numpy()

    def update(self, gaps: Mapping[str, Tensor], labels: Tensor) -> None:
        """Add one batch: ``gaps[layer]`` is ``[B, C]`` (GAP per image and channel), ``labels`` is ``[B]``."""
        values, labels = self._stack_batch(gaps, labels)
        if labels.size == 0:
            return
        self._update_reservoir(values, self.num_samples)
        self._update_moments(values, labels)

    def _update_moments(self, values: np.ndarray, labels: np.ndarray) -> None:
        """Merge the ``[B, sum C]`` batch into the class moments.

        The batch is sorted by label so that per-class sums are segment sums
        (``np.add.reduceat``). NumPy runs these element-wise steps on one
        thread, which avoids the slowdown of torch's intra-op threads on a
        busy CPU.
        """
        order = np.argsort(labels, kind="stable")
        sorted_labels = labels[order]
        starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
        classes = sorted_labels[starts]
        batch_count = np.diff(np.r_[starts, len(labels)]).astype(np.float64)[:, None]

        rows = values[order]
        batch_mean = np.add.reduceat(rows, starts, axis=0)
        batch_mean /= batch_count

        # A class with one row in the batch has M2 = 0, and with 1,000 classes
        # most classes of a batch have one row, so only the others are computed.
        segment_sizes = batch_count[:, 0].astype(np.int64)
        repeated = segment_sizes > 1
        batch_m2 = np.zeros_like(batch_mean)
        if repeated.any():
            deviation = rows[np.repeat(repeated, segment_sizes)]
            deviation -= np.repeat(batch_mean[repeated], segment_sizes[repeated], axis=0)
            np.square(deviation, out=deviation)
            repeated_starts = np.r_[0, np.cumsum(segment_sizes[repeated])[:-1]]
            batch_m2[repeated] = np.add.reduceat(deviation, repeated_starts, axis=0)

        # Chan et al. (1979): combine (n_a, mean_a, M2_a) with (n_b, mean_b, M2_b):
        # delta = mean_b - mean_a, mean = mean_a + delta * n_b / n,
        # M2 = M2_a + M2_b + delta^2 * n_a * n_b / n.
        class_counts = self.class_counts.numpy()
        all_means = self._mean.numpy()
        all_m2 = self._m2.numpy()
        count_a = class_counts[classes].astype(np.float64)[:, None]
        weight_b = batch_count / (count_a + batch_count)
        mean = all_means[classes]
        delta = np.subtract(batch_mean, mean, out=batch_mean)
        all_means[classes] = mean + delta * weight_b
        np.square(delta, out=delta)
        delta *= weight_b * count_a
        delta += batch_m2
        all_m2[classes] += delta
        class_counts[classes] += batch_count[:, 0].astype(np.int64)

    def _update_reservoir(self, values: np.ndarray, seen_before: int) -> None:
        """Algorithm R over the batch's rows, vectorized: row ``t`` (0-based) enters with probability ``R / (t + 1)``."""
        if self.reservoir_size == 0:
            return
        positions = np.arange(seen_before, seen_before + values.shape[0])
        slots = positions.copy()
        late = positions >= self.reservoir_size
        slots[late] = self._rng.integers(0, positions[late] + 1)
        rows = np.flatnonzero(slots < self.reservoir_size)
        slots = slots[rows]
        # When several rows of the batch draw the same slot, the last one wins,
        # as in the sequential algorithm.
        reversed_slots = slots[::-1]
        _, first_in_reversed = np.unique(reversed_slots, return_index=True)
        keep = len(slots) - 1 - first_in_reversed
        self._reservoir.numpy()[slots[keep]] = values[rows[keep]]

    # -- merge ---------------------------------------------------------------

    def merge(self, other: StatisticsAccumulator) -> StatisticsAccumulator:
        """Add the rows accumulated by ``other`` (another shard of the same dataset) in place; return self.

        Counts, means and M2 equal a single pass over both shards up to float
        rounding. The merged reservoir is a uniform sample of the union: the
        number of rows taken from ``self`` is hypergeometric
        ``(N_self, N_other, min(N_self + N_other, R))`` and the rows are drawn
        without replacement from each reservoir.
        """
        self._check_compatible(other)
        count_a = self.num_samples
        count_b = other.num_samples
        if count_b == 0:
            return self
        self._merge_reservoir(other, count_a, count_b)

        n_a = self.class_counts.to(torch.float64)[:, None]
        n_b = other.class_counts.to(torch.float64)[:, None]
        count = n_a + n_b
        delta = other._mean - self._mean
        # A class absent from both accumulators has count 0 and keeps mean 0.
        weight_b = n_b / count.clamp(min=1)
        self._mean = self._mean + delta * weight_b
        self._m2 = self._m2 + other._m2 + delta * delta * n_a * weight_b
        self.class_counts = self.class_counts + other.class_counts
        return self

    def _merge_reservoir(self, other: StatisticsAccumulator, count_a: int, count_b: int) -> None:
        size = self.reservoir_size
        if size == 0:
            return
        target = min(count_a + count_b, size)
        from_a = int(self._rng.hypergeometric(count_a, count_b, target)) if count_a else 0
        rows_a = self._rng.choice(min(count_a, size), size=from_a, replace=False)
        rows_b = self._rng.choice(min(count_b, size), size=target - from_a, replace=False)
        merged = torch.cat(
            [self._reservoir[torch.from_numpy(rows_a)], other._reservoir[torch.from_numpy(rows_b)]]
        )
        self._reservoir[:target] = merged

    def _check_compatible(self, other: StatisticsAccumulator) -> None:
        if not isinstance(other, StatisticsAccumulator):
            raise TypeError(f"Can only merge a StatisticsAccumulator, got {type(other).__name__}")
        if list(other.layer_channels.items()) != list(self.layer_channels.items()):
            raise ValueError(
                "Cannot merge accumulators with different layers, channel counts or layer order: "
                f"{list(self.layer_channels.items())} != {list(other.layer_channels.items())}"
            )
        if other.num_classes != self.num_classes:
            raise ValueError(f"Cannot merge: num_classes {self.num_classes} != {other.num_classes}")
        if other.reservoir_size != self.reservoir_size:
            raise ValueError(
                f"Cannot merge: reservoir_size {self.reservoir_size} != {other.reservoir_size}"
            )
        for key in _IDENTITY_KEYS:
            if self.metadata.get(key) != other.metadata.get(key):
                raise ValueError(
                    f"Cannot merge statistics of different {key}: "
                    f"{self.metadata.get(key)!r} != {other.metadata.get(key)!r}"
                )

    # -- save and load -------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Return the accumulator as a dict of tensors and JSON text (loadable with ``weights_only=True``)."""
        header = {
            "layer_channels": list(self.layer_channels.items()),
            "num_classes": self.num_classes,
            "reservoir_size": self.reservoir_size,
            "seed": self.seed,
            "metadata": self.metadata,
            "rng_state": self._rng.bit_generator.state,
        }
        return {
            "format": _ACCUMULATOR_FORMAT,
            "format_version": _FORMAT_VERSION,
            "header_json": json.dumps(header),
            "class_counts": self.class_counts,
            "mean": self._mean,
            "m2": self._m2,
            "reservoir": self._reservoir[: min(self.num_samples, self.reservoir_size)].clone(),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> StatisticsAccumulator:
        """Rebuild an accumulator from :meth:`state_dict`."""
        header = json.loads(state["header_json"])
        accumulator = cls(
            dict((name, int(channels)) for name, channels in header["layer_channels"]),
            header["num_classes"],
            reservoir_size=header["reservoir_size"],
            seed=header["seed"],
            metadata=header["metadata"],
        )
        accumulator._rng.bit_generator.state = header["rng_state"]
        accumulator.class_counts = state["class_counts"].to(torch.int64).clone()
        accumulator._mean = state["mean"].to(torch.float64).clone()
        accumulator._m2 = state["m2"].to(torch.float64).clone()
        reservoir = state["reservoir"]
        accumulator._reservoir[: reservoir.shape[0]] = reservoir
        return accumulator

    def save(self, path: str | os.PathLike) -> Path:
        """Write the accumulator to ``path`` atomically (temporary file, then ``os.replace``)."""
        return _atomic_torch_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> StatisticsAccumulator:
        """Read an accumulator written by :meth:`save`."""
        return cls.from_state_dict(_load_payload(path, _ACCUMULATOR_FORMAT))

    # -- finalize ------------------------------------------------------------

    def ttest_pvalues(self, test: str = "welch") -> dict[str, Tensor]:
        """Return per-layer ``[K, C]`` float64 p-values of "class k mean > mean of the other images".

        The "rest" group statistics are the dataset totals minus the class,
        by Chan's formula run backwards. See :func:`_one_sided_ttest` for the
        NaN cases.
        """
        if test not in TESTS:
            raise ValueError(f"Unknown test {test!r}; choose one of {list(TESTS)}.")
        count = self.class_counts.numpy().astype(np.float64)
        mean = self._mean.numpy()
        m2 = self._m2.numpy()
        total_count, total_mean, total_m2 = _total_moments(count, mean, m2)

        pvalues = np.empty((self.num_classes, self.total_channels), dtype=np.float64)
        for start in range(0, self.num_classes, _TTEST_CLASS_CHUNK):
            rows = slice(start, start + _TTEST_CLASS_CHUNK)
            count_class = count[rows, None]
            count_rest = total_count - count_class
            with np.errstate(divide="ignore", invalid="ignore"):
                mean_rest = (total_count * total_mean - count_class * mean[rows]) / count_rest
                delta = mean[rows] - mean_rest
                m2_rest = total_m2 - m2[rows] - delta * delta * (count_class * count_rest / total_count)
            # Rounding can leave a tiny negative M2 for a constant rest group.
            m2_rest = np.maximum(m2_rest, 0.0)
            pvalues[rows] = _one_sided_ttest(
                count_class, mean[rows], m2[rows], count_rest, mean_rest, m2_rest, equal_var=test == "student"
            )
        tensor = torch.from_numpy(pvalues)
        return {layer: tensor[:, part].clone() for layer, part in self._slices.items()}

    def shapiro_pvalues(self) -> dict[str, Tensor]:
        """Return per-layer ``[C]`` float64 Shapiro-Wilk p-values of each channel's GAP in the reservoir.

        A channel whose reservoir values are all equal (a dead ReLU channel)
        gets p = 1, so it never passes the non-normality filter. With fewer than
        3 rows the test is undefined and every p-value is NaN, which the
        selectors also treat as "not kept" (``NaN < threshold`` is False).
        """
        filled = min(self.num_samples, self.reservoir_size)
        pvalues = np.full(self.total_channels, np.nan)
        if filled >= 3:
            sample = self._reservoir[:filled].numpy()
            constant = sample.min(axis=0) == sample.max(axis=0)
            pvalues[constant] = 1.0
            varying = np.flatnonzero(~constant)
            with warnings.catch_warnings():
                # SciPy warns that the p-value is approximate above 5,000 rows;
                # that only applies when reservoir_size is set above 5,000.
                warnings.filterwarnings("ignore", message=".*p-value may not be accurate.*")
                for start in range(0, len(varying), _SHAPIRO_CHANNEL_CHUNK):
                    columns = varying[start : start + _SHAPIRO_CHANNEL_CHUNK]
                    chunk = sample[:, columns].astype(np.float64)
                    pvalues[columns] = scipy.stats.shapiro(chunk, axis=0).pvalue
        tensor = torch.from_numpy(pvalues)
        return {layer: tensor[part].clone() for layer, part in self._slices.items()}

    def dataset_mean_std(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Return per-layer ``[C]`` float64 mean and standard deviation (``ddof=1``) over all rows."""
        count = self.class_counts.numpy().astype(np.float64)
        total_count, total_mean, total_m2 = _total_moments(count, self._mean.numpy(), self._m2.numpy())
        with np.errstate(divide="ignore", invalid="ignore"):
            std = np.sqrt(total_m2 / (total_count - 1))
        mean_tensor = torch.from_numpy(total_mean)
        std_tensor = torch.from_numpy(std)
        mean = {layer: mean_tensor[part].clone() for layer, part in self._slices.items()}
        deviation = {layer: std_tensor[part].clone() for layer, part in self._slices.items()}
        return mean, deviation

    def finalize(self, test: str = "welch") -> ChannelStatistics:
        """Compute the t-test and Shapiro-Wilk p-values and the dataset mean and std."""
        if self.num_samples == 0:
            raise ValueError("The accumulator is empty; update it with at least one batch first.")
        ttest = self.ttest_pvalues(test)
        shapiro = self.shapiro_pvalues()
        mean, std = self.dataset_mean_std()
        metadata = {
            "model_name": None,
            "weights_id": None,
            "dataset_id": None,
            **self.metadata,
            "layer_channels": list(self.layer_channels.items()),
            "num_classes": self.num_classes,
            "num_samples": self.num_samples,
            "test": test,
            "reservoir_size": self.reservoir_size,
            "reservoir_rows": min(self.num_samples, self.reservoir_size),
            "std_ddof": 1,
            "versions": _library_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        return ChannelStatistics(
            ttest_pvalues=ttest,
            shapiro_pvalues=shapiro,
            mean=mean,
            std=std,
            class_counts=self.class_counts.clone(),
            metadata=metadata,
        )


def _total_moments(count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Combine per-class ``count [K]``, ``mean [K, C]`` and ``m2 [K, C]`` into dataset totals."""
    total_count = float(count.sum())
    if total_count == 0:
        nan = np.full(mean.shape[1], np.nan)
        return 0.0, nan, nan.copy()
    total_mean = (count @ mean) / total_count
    deviation = mean - total_mean
    total_m2 = m2.sum(axis=0) + count @ (deviation * deviation)
    return total_count, total_mean, total_m2


def _one_sided_ttest(
    count_a: np.ndarray,
    mean_a: np.ndarray,
    m2_a: np.ndarray,
    count_b: np.ndarray,
    mean_b: np.ndarray,
    m2_b: np.ndarray,
    equal_var: bool,
) -> np.ndarray:
    """Return p-values of the t-test "mean a > mean b" from group counts, means and M2.

    Matches ``scipy.stats.ttest_ind(a, b, alternative="greater")`` (SciPy 1.17),
    including its NaN cases:

    - an empty group gives NaN;
    - Welch's test with a group of one sample gives NaN (its variance is
      undefined), while Student's test uses the pooled variance and is finite;
    - when both groups are constant, equal means give NaN and different means
      give p = 0 or 1 (t is +-inf).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        difference = mean_a - mean_b
        if equal_var:
            dof = count_a + count_b - 2.0
            pooled = (m2_a + m2_b) / dof
            standard_error = np.sqrt(pooled * (1.0 / count_a + 1.0 / count_b))
        else:
            share_a = m2_a / (count_a - 1.0) / count_a
            share_b = m2_b / (count_b - 1.0) / count_b
            standard_error = np.sqrt(share_a + share_b)
            dof = (share_a + share_b) ** 2 / (
                share_a * share_a / (count_a - 1.0) + share_b * share_b / (count_b - 1.0)
            )
            # Both variances zero leaves dof = 0/0. Then t is +-inf or NaN and
            # dof does not change the p-value, so use 1 as SciPy does.
            dof = np.where(np.isnan(dof), 1.0, dof)
        statistic = difference / standard_error
        empty = (count_a < 1) | (count_b < 1)
        statistic = np.where(empty, np.nan, statistic)
        # P(T > t) = stdtr(dof, -t)
        return scipy.special.stdtr(np.broadcast_to(dof, statistic.shape), -statistic)


# ---------------------------------------------------------------------------
# Finalized statistics


@dataclass
class ChannelStatistics:
    """Per-layer selection statistics of one (model, weights, dataset), keyed by qualified layer name.

    Attributes:
        ttest_pvalues: ``[K, C]`` float64 one-sided t-test p-values; NaN where
            the test is undefined (see :func:`_one_sided_ttest`), kept as NaN in
            the file. Selectors count NaN as 1.
        shapiro_pvalues: ``[C]`` float64 Shapiro-Wilk p-values over the reservoir
            sample; 1 for constant channels, NaN with fewer than 3 rows.
        mean: ``[C]`` float64 dataset mean GAP.
        std: ``[C]`` float64 dataset standard deviation of the GAP (``ddof=1``).
        class_counts: ``[K]`` int64 number of images per class.
        metadata: ``model_name``, ``weights_id``, ``dataset_id``, ``num_samples``,
            ``num_classes``, ``layer_channels`` (ordered ``[name, C]`` pairs),
            ``model_layers`` (every Conv2d of the model when collected from one),
            ``test``, ``reservoir_size``, ``reservoir_rows``, ``std_ddof``,
            ``versions`` (torch, scipy, numpy, parchgrad) and ``created`` (UTC, ISO 8601).
    """

    ttest_pvalues: dict[str, Tensor]
    shapiro_pvalues: dict[str, Tensor]
    mean: dict[str, Tensor]
    std: dict[str, Tensor]
    class_counts: Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def layer_channels(self) -> dict[str, int]:
        """Ordered mapping from layer name to channel count."""
        return {name: int(channels) for name, channels in self.metadata["layer_channels"]}

    @property
    def test(self) -> str:
        """The t-test variant, ``"welch"`` or ``"student"``."""
        return self.metadata["test"]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics to ``path`` atomically (temporary file, then ``os.replace``)."""
        payload = {
            "format": _STATISTICS_FORMAT,
            "format_version": _FORMAT_VERSION,
            "metadata_json": json.dumps(self.metadata),
            "ttest_pvalues": self.ttest_pvalues,
            "shapiro_pvalues": self.shapiro_pvalues,
            "mean": self.mean,
            "std": self.std,
            "class_counts": self.class_counts,
        }
        return _atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> ChannelStatistics:
        """Read statistics written by :meth:`save`; with ``model``, check them with :meth:`check_model`."""
        payload = _load_payload(path, _STATISTICS_FORMAT)
        statistics = cls(
            ttest_pvalues=dict(payload["ttest_pvalues"]),
            shapiro_pvalues=dict(payload["shapiro_pvalues"]),
            mean=dict(payload["mean"]),
            std=dict(payload["std"]),
            class_counts=payload["class_counts"],
            metadata=json.loads(payload["metadata_json"]),
        )
        if model is not None:
            statistics.check_model(model, source=str(path))
        return statistics

    def check_model(self, model: nn.Module, source: str = "the statistics") -> None:
        """Raise ValueError at the first Conv2d of ``model`` that does not match the metadata.

        When the statistics were collected from a model (``model_layers`` in the
        metadata), every Conv2d is compared by name, so a missing, extra or
        renamed layer and a different channel count are all caught. Otherwise
        each layer of the statistics must be a Conv2d of ``model`` with the same
        channel count.
        """
        found = _conv_channels(model)
        model_layers = self.metadata.get("model_layers")
        if model_layers:
            expected = {name: int(channels) for name, channels in model_layers}
        else:
            expected = self.layer_channels
            found = {name: channels for name, channels in found.items() if name in expected}
        problem = _first_layer_mismatch(expected, found)
        if problem:
            raise ValueError(
                f"{source} do not match this model: {problem}. Recollect statistics for this model "
                f"(statistics model_name={self.metadata.get('model_name')!r}, "
                f"weights_id={self.metadata.get('weights_id')!r})."
            )


def _conv_channels(model: nn.Module) -> dict[str, int]:
    modules = dict(model.named_modules())
    return {name: int(modules[name].out_channels) for name in conv_layer_names(model)}


def _first_layer_mismatch(expected: Mapping[str, int], found: Mapping[str, int]) -> str | None:
    """Describe the first difference between two ordered ``{layer: channels}`` maps, or return None."""
    for name, channels in expected.items():
        if name not in found:
            return f"layer {name!r} ({channels} channels) is missing from the model"
        if found[name] != channels:
            return f"layer {name!r} has {found[name]} channels, the statistics have {channels}"
    for name in found:
        if name not in expected:
            return f"layer {name!r} is in the model but not in the statistics"
    return None


def merge_statistics_files(paths: Iterable[str | os.PathLike]) -> StatisticsAccumulator:
    """Load accumulator shard files written by :meth:`StatisticsAccumulator.save` and merge them in order."""
    paths = list(paths)
    if not paths:
        raise ValueError("merge_statistics_files needs at least one path.")
    merged = StatisticsAccumulator.load(paths[0])
    for path in paths[1:]:
        merged.merge(StatisticsAccumulator.load(path))
    return merged


# ---------------------------------------------------------------------------
# Collection


def _split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Mapping):
        if "image" not in batch or "label" not in batch:
            raise ValueError(f"A dict batch needs 'image' and 'label' keys, got {sorted(batch)}")
        return batch["image"], torch.as_tensor(batch["label"])
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], torch.as_tensor(batch[1])
    raise TypeError(
        f"Batches must be dicts with 'image' and 'label' or (images, labels) tuples, got {type(batch).__name__}"
    )


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    layers: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    *,
    reservoir_size: int = 5000,
    seed: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
    model_name: str | None = None,
    weights_id: str | None = None,
    dataset_id: str | None = None,
) -> StatisticsAccumulator:
    """Run ``model`` over ``loader`` once and accumulate the GAP of ``ReLU(conv output)`` of each layer.

    Args:
        model: a model in eval mode (BatchNorm and dropout must not change during the pass).
        loader: iterable of batches, each a dict with ``"image"`` ``[B, 3, H, W]``
            and ``"label"`` ``[B]``, or an ``(images, labels)`` tuple.
        num_classes: number of classes K.
        layers: qualified Conv2d names; None means every Conv2d of the model.
        device: device that the model is on; images are moved there.
        progress: show a tqdm progress bar.
        reservoir_size: rows kept for the Shapiro-Wilk test.
        seed: reservoir seed; the generator is seeded with ``(seed, shard_index)``.
        shard_index, num_shards: with ``num_shards > 1``, ``loader`` must be a
            DataLoader over a map-style dataset, and only the contiguous shard
            ``shard_index`` of its dataset is read (see :func:`shard_dataset`).
            Save each shard's accumulator and combine them with
            :func:`merge_statistics_files`.
        model_name, weights_id, dataset_id: identifiers stored in the metadata.

    Returns:
        The accumulator; call ``finalize()`` for :class:`ChannelStatistics`.
    """
    training = [name or "<model>" for name, module in model.named_modules() if module.training]
    if training:
        raise ValueError(
            f"collect_statistics needs the model in eval mode, but {training[0]!r} is in "
            "training mode; call model.eval() first."
        )
    names = conv_layer_names(model) if layers is None else resolve_layers(model, layers=layers)
    all_channels = _conv_channels(model)
    if num_shards > 1:
        loader = _shard_loader(loader, shard_index, num_shards)
    elif shard_index != 0:
        raise ValueError(f"shard_index={shard_index} needs num_shards > shard_index, got {num_shards}")

    accumulator = StatisticsAccumulator(
        {name: all_channels[name] for name in names},
        num_classes,
        reservoir_size=reservoir_size,
        seed=(seed, shard_index),
        metadata={
            "model_name": model_name,
            "weights_id": weights_id,
            "dataset_id": dataset_id,
            "model_layers": list(all_channels.items()),
        },
    )

    gaps: dict[str, Tensor] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if name in gaps:
                raise RuntimeError(
                    f"Layer {name!r} ran twice in one forward pass; statistics need one output per layer."
                )
            gaps[name] = torch.relu(output).mean(dim=(2, 3)).cpu()

        return hook

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(make_hook(name)) for name in names]
    try:
        total = len(loader) if hasattr(loader, "__len__") else None
        for batch in tqdm(loader, total=total, disable=not progress, desc="channel statistics"):
            images, labels = _split_batch(batch)
            gaps.clear()
            model(images.to(device))
            accumulator.update(gaps, labels)
    finally:
        for handle in handles:
            handle.remove()
    return accumulator
