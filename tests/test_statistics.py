"""Tests for parchgrad.statistics: streaming moments, t-tests, reservoir, collection and files."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from parchgrad.statistics import (
    ChannelStatistics,
    StatisticsAccumulator,
    collect_statistics,
    merge_statistics_files,
    shard_dataset,
    shard_indices,
    statistics_filename,
)

LAYERS = {"a": 3, "b": 2}


def make_stream(num_rows: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return ``[N, 5]`` non-normal GAP-like values and ``[N]`` labels.

    Class 0 has a single row, channel 4 is always 0 (a dead ReLU channel), and
    the other classes shift channel 0 by their index.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(1, num_classes, size=num_rows)
    labels[7] = 0
    values = np.maximum(rng.normal(size=(num_rows, 5)), 0.0) + rng.exponential(size=(num_rows, 5))
    values[:, 0] += 0.3 * labels
    values[:, 4] = 0.0
    return values, labels


def as_gaps(values: np.ndarray) -> dict[str, torch.Tensor]:
    tensor = torch.from_numpy(values)
    return {"a": tensor[:, :3], "b": tensor[:, 3:]}


def feed(accumulator: StatisticsAccumulator, values: np.ndarray, labels: np.ndarray, batch: int) -> None:
    for start in range(0, len(values), batch):
        rows = slice(start, start + batch)
        accumulator.update(as_gaps(values[rows]), torch.from_numpy(labels[rows]))


def concatenate(per_layer: dict[str, torch.Tensor]) -> np.ndarray:
    return torch.cat([per_layer[layer] for layer in LAYERS], dim=-1).numpy()


@pytest.fixture(scope="module")
def stream() -> tuple[np.ndarray, np.ndarray]:
    return make_stream(400, num_classes=6)


@pytest.fixture(scope="module")
def one_pass(stream) -> StatisticsAccumulator:
    values, labels = stream
    accumulator = StatisticsAccumulator(LAYERS, num_classes=6, reservoir_size=100)
    feed(accumulator, values, labels, batch=37)
    return accumulator


# ---------------------------------------------------------------------------
# Moments and t-tests


def test_moments_match_numpy(stream, one_pass):
    values, labels = stream
    mean = concatenate(one_pass.class_mean)
    m2 = concatenate(one_pass.class_m2)
    for k in range(6):
        rows = values[labels == k]
        assert int(one_pass.class_counts[k]) == len(rows)
        np.testing.assert_allclose(mean[k], rows.mean(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(m2[k], ((rows - rows.mean(axis=0)) ** 2).sum(axis=0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("test", ["welch", "student"])
def test_ttest_matches_scipy(stream, one_pass, test):
    values, labels = stream
    pvalues = concatenate(one_pass.ttest_pvalues(test))
    assert pvalues.shape == (6, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(6):
            for channel in range(5):
                expected = scipy.stats.ttest_ind(
                    values[labels == k, channel],
                    values[labels != k, channel],
                    alternative="greater",
                    equal_var=test == "student",
                ).pvalue
                np.testing.assert_allclose(pvalues[k, channel], expected, rtol=1e-9, atol=1e-300)


def test_ttest_nan_cases(one_pass):
    welch = concatenate(one_pass.ttest_pvalues("welch"))
    student = concatenate(one_pass.ttest_pvalues("student"))
    # Class 0 has one sample: Welch's variance is undefined, Student's pooled one is not.
    assert np.isnan(welch[0, :4]).all()
    assert np.isfinite(student[0, :4]).all()
    # The dead channel is constant with equal means: 0/0.
    assert np.isnan(welch[:, 4]).all()
    assert np.isnan(student[:, 4]).all()


def test_ttest_empty_class_is_nan():
    accumulator = StatisticsAccumulator({"a": 1}, num_classes=3, reservoir_size=0)
    accumulator.update({"a": torch.tensor([[1.0], [2.0], [4.0], [3.0]])}, torch.tensor([0, 0, 1, 1]))
    pvalues = accumulator.ttest_pvalues("welch")["a"]
    assert torch.isnan(pvalues[2]).all()
    assert torch.isfinite(pvalues[:2]).all()


def test_unknown_test_rejected(one_pass):
    with pytest.raises(ValueError, match="Unknown test 'paired'"):
        one_pass.ttest_pvalues("paired")


def test_dataset_mean_std(stream, one_pass):
    values, _ = stream
    mean, std = one_pass.dataset_mean_std()
    np.testing.assert_allclose(concatenate(mean), values.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(concatenate(std), values.std(axis=0, ddof=1), rtol=1e-10, atol=1e-12)


def test_update_rejects_bad_input():
    accumulator = StatisticsAccumulator(LAYERS, num_classes=2)
    values = torch.zeros(4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        accumulator.update(as_gaps(values.numpy()), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        accumulator.update({"a": values[:, :3]}, torch.tensor([0, 1, 1, 0]))
    with pytest.raises(ValueError, match=r"gaps\['a'\] must have shape"):
        accumulator.update({"a": values[:, :2], "b": values[:, 3:]}, torch.tensor([0, 1, 1, 0]))


# ---------------------------------------------------------------------------
# Shards and reservoir


def shard_accumulators(values, labels, num_shards, reservoir_size, seed=0):
    shards = []
    for index in range(num_shards):
        rows = list(shard_indices(len(values), index, num_shards))
        accumulator = StatisticsAccumulator(LAYERS, num_classes=6, reservoir_size=reservoir_size, seed=(seed, index))
        feed(accumulator, values[rows], labels[rows], batch=23)
        shards.append(accumulator)
    return shards


def test_three_shards_equal_one_pass(stream, one_pass):
    values, labels = stream
    merged, *rest = shard_accumulators(values, labels, 3, reservoir_size=100)
    for shard in rest:
        merged.merge(shard)

    assert torch.equal(merged.class_counts, one_pass.class_counts)
    np.testing.assert_allclose(concatenate(merged.class_mean), concatenate(one_pass.class_mean), rtol=1e-12)
    np.testing.assert_allclose(concatenate(merged.class_m2), concatenate(one_pass.class_m2), rtol=1e-10)
    for test in ("welch", "student"):
        np.testing.assert_allclose(
            concatenate(merged.ttest_pvalues(test)), concatenate(one_pass.ttest_pvalues(test)), rtol=1e-8
        )


def test_reservoir_size_and_rows(stream, one_pass):
    values, _ = stream
    reservoir = concatenate(one_pass.reservoir)
    assert reservoir.shape == (100, 5)
    observed = {tuple(row) for row in values.astype(np.float32)}
    assert all(tuple(row) in observed for row in reservoir)
    assert len({tuple(row) for row in reservoir}) == 100


def test_reservoir_smaller_than_size_keeps_all_rows():
    accumulator = StatisticsAccumulator({"a": 1}, num_classes=1, reservoir_size=50)
    accumulator.update({"a": torch.arange(30.0)[:, None]}, torch.zeros(30, dtype=torch.long))
    assert sorted(accumulator.reservoir["a"][:, 0].tolist()) == list(range(30))


def inclusion_counts(repeats: int, total: int, reservoir_size: int, sizes: list[int]) -> np.ndarray:
    """Count how often each row id ends in the (merged) reservoir over ``repeats`` seeds."""
    ids = torch.arange(float(total))[:, None]
    labels = torch.zeros(total, dtype=torch.long)
    counts = np.zeros(total)
    bounds = np.cumsum([0, *sizes])
    for repeat in range(repeats):
        shards = []
        for index in range(len(sizes)):
            accumulator = StatisticsAccumulator({"a": 1}, 1, reservoir_size=reservoir_size, seed=(repeat, index))
            for start in range(bounds[index], bounds[index + 1], 7):
                stop = min(start + 7, bounds[index + 1])
                accumulator.update({"a": ids[start:stop]}, labels[start:stop])
            shards.append(accumulator)
        merged = shards[0]
        for shard in shards[1:]:
            merged.merge(shard)
        kept_ids = merged.reservoir["a"][:, 0].numpy().astype(int)
        assert len(kept_ids) == reservoir_size
        assert len(set(kept_ids.tolist())) == reservoir_size
        counts[kept_ids] += 1
    return counts


@pytest.mark.parametrize(
    "sizes, reservoir_size",
    [([60], 10), ([20], 2), ([30, 50, 20], 10)],
    ids=["one_stream", "small_reservoir", "three_shards"],
)
def test_reservoir_inclusion_uniform(sizes, reservoir_size):
    repeats = 600
    total = sum(sizes)
    counts = inclusion_counts(repeats, total, reservoir_size, sizes)
    expected = np.full(total, repeats * reservoir_size / total)
    # Inclusion counts of a uniform sample are close to multinomial, so a
    # chi-square test at a strict level catches a skew towards a shard or
    # towards early or late rows.
    result = scipy.stats.chisquare(counts, expected)
    assert result.pvalue > 1e-3, f"inclusion counts not uniform: p={result.pvalue:.2e}, counts={counts}"
    # The first rows of a stream fill the reservoir directly; an off-by-one in
    # the replacement probability shows up as a skewed share of those rows.
    early_total = counts[:reservoir_size].sum()
    early = scipy.stats.binomtest(int(early_total), repeats * reservoir_size, reservoir_size / total)
    assert early.pvalue > 1e-3, f"first {reservoir_size} rows kept {early_total} times, expected {expected[0] * reservoir_size:.0f}"
    bounds = np.cumsum([0, *sizes])
    for index in range(len(sizes)):
        shard_total = counts[bounds[index] : bounds[index + 1]].sum()
        share = sizes[index] / total
        binomial = scipy.stats.binomtest(int(shard_total), repeats * reservoir_size, share)
        assert binomial.pvalue > 1e-3, f"shard {index} share {shard_total} off from {share:.2f}"


def test_merge_rejects_different_layers():
    first = StatisticsAccumulator({"a": 3}, num_classes=2)
    second = StatisticsAccumulator({"a": 4}, num_classes=2)
    with pytest.raises(ValueError, match="different layers"):
        first.merge(second)


def test_shard_indices_cover_range():
    parts = [shard_indices(10, index, 3) for index in range(3)]
    assert [list(part) for part in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(ValueError, match="shard_index must be in"):
        shard_indices(10, 3, 3)


# ---------------------------------------------------------------------------
# Shapiro-Wilk


def test_shapiro_matches_scipy_on_reservoir(one_pass):
    reservoir = concatenate(one_pass.reservoir)
    pvalues = concatenate(one_pass.shapiro_pvalues())
    for channel in range(4):
        expected = scipy.stats.shapiro(reservoir[:, channel].astype(np.float64)).pvalue
        np.testing.assert_allclose(pvalues[channel], expected, rtol=1e-12)
    # The dead channel is constant, so it is never taken as non-normal.
    assert pvalues[4] == 1.0


def test_shapiro_too_few_rows_is_nan():
    accumulator = StatisticsAccumulator({"a": 2}, num_classes=1)
    accumulator.update({"a": torch.tensor([[1.0, 2.0], [3.0, 5.0]])}, torch.tensor([0, 0]))
    assert torch.isnan(accumulator.shapiro_pvalues()["a"]).all()


# ---------------------------------------------------------------------------
# Collection on a model


class TinyCNN(nn.Module):
    def __init__(self, width: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.block = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2), nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.block(x)
        return self.head(x.mean(dim=(2, 3)))


def tiny_batches(num_batches: int = 3, batch: int = 5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randn(batch, 3, 8, 8, generator=generator), "label": torch.randint(0, 3, (batch,), generator=generator)}
        for _ in range(num_batches)
    ]


@pytest.fixture
def model() -> TinyCNN:
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
    return model.eval()


def direct_gaps(model: TinyCNN, images: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        stem = model.stem(images)
        block = model.block[0](torch.relu(model.bn(stem)))
    return {"stem": torch.relu(stem).mean(dim=(2, 3)), "block.0": torch.relu(block).mean(dim=(2, 3))}


def test_collect_matches_direct_gap(model):
    batches = tiny_batches()
    accumulator = collect_statistics(model, batches, num_classes=3, progress=False)
    assert accumulator.layer_channels == {"stem": 4, "block.0": 8}

    images = torch.cat([batch["image"] for batch in batches])
    labels = torch.cat([batch["label"] for batch in batches])
    expected = direct_gaps(model, images)
    for layer, values in expected.items():
        for k in range(3):
            rows = values[labels == k].double()
            torch.testing.assert_close(accumulator.class_mean[layer][k], rows.mean(dim=0), rtol=1e-6, atol=1e-7)
    assert not any(module._forward_hooks for module in model.modules())


def test_collect_accepts_tuples_and_layer_subset(model):
    batches = [(batch["image"], batch["label"]) for batch in tiny_batches()]
    accumulator = collect_statistics(model, batches, num_classes=3, layers=["block.0"], progress=False)
    assert list(accumulator.layer_channels) == ["block.0"]
    assert accumulator.num_samples == 15


def test_collect_requires_eval_mode(model):
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        collect_statistics(model, tiny_batches(), num_classes=3, progress=False)


def test_collect_shards_merge_to_one_pass(model, tmp_path):
    dataset = [
        {"image": image, "label": int(label)}
        for batch in tiny_batches(num_batches=4)
        for image, label in zip(batch["image"], batch["label"])
    ]
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    full = collect_statistics(model, loader, num_classes=3, progress=False, dataset_id="tiny")
    paths = []
    for index in range(3):
        shard = collect_statistics(
            model, loader, num_classes=3, progress=False, shard_index=index, num_shards=3, dataset_id="tiny"
        )
        paths.append(shard.save(tmp_path / f"shard{index}.pt"))
    merged = merge_statistics_files(paths)
    assert merged.num_samples == len(dataset) == len(shard_dataset(dataset, 0, 1))
    torch.testing.assert_close(merged.class_counts, full.class_counts)
    for layer in full.layer_channels:
        torch.testing.assert_close(merged.class_mean[layer], full.class_mean[layer], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(merged.class_m2[layer], full.class_m2[layer], rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------------------
# Files


def test_statistics_save_load_round_trip(model, tmp_path):
    accumulator = collect_statistics(
        model, tiny_batches(), num_classes=3, progress=False, model_name="tiny", weights_id="seed0", dataset_id="toy"
    )
    statistics = accumulator.finalize(test="student")
    path = tmp_path / statistics_filename("tiny", "seed0", "toy")
    statistics.save(path)
    loaded = ChannelStatistics.load(path, model=model)

    assert loaded.test == "student"
    assert loaded.layer_channels == {"stem": 4, "block.0": 8}
    assert loaded.metadata["num_samples"] == 15
    assert set(loaded.metadata["versions"]) == {"torch", "scipy", "numpy", "parchgrad"}
    for name in ("ttest_pvalues", "shapiro_pvalues", "mean", "std"):
        for layer, tensor in getattr(statistics, name).items():
            torch.testing.assert_close(getattr(loaded, name)[layer], tensor, equal_nan=True)
    assert os.listdir(tmp_path) == [path.name]


def test_accumulator_save_load_continues(stream, one_pass, tmp_path):
    values, labels = stream
    first = StatisticsAccumulator(LAYERS, num_classes=6, reservoir_size=100)
    feed(first, values[:200], labels[:200], batch=37)
    first.save(tmp_path / "partial.pt")
    resumed = StatisticsAccumulator.load(tmp_path / "partial.pt")
    feed(resumed, values[200:], labels[200:], batch=37)
    np.testing.assert_allclose(concatenate(resumed.class_m2), concatenate(one_pass.class_m2), rtol=1e-10)
    assert concatenate(resumed.reservoir).shape == (100, 5)


@pytest.mark.parametrize(
    "change, message",
    [
        ("rename", "layer 'stem' .* is missing from the model"),
        ("channels", "layer 'block.0' has 6 channels, the statistics have 8"),
    ],
)
def test_load_rejects_mismatched_model(model, tmp_path, change, message):
    statistics = collect_statistics(model, tiny_batches(), num_classes=3, progress=False).finalize()
    statistics.save(tmp_path / "stats.pt")
    other = TinyCNN()
    if change == "rename":
        other.first = other.stem
        del other.stem
    else:
        other.block[0] = nn.Conv2d(4, 6, 3, stride=2)
    with pytest.raises(ValueError, match=message) as error:
        ChannelStatistics.load(tmp_path / "stats.pt", model=other.eval())
    assert "Recollect statistics for this model" in str(error.value)


def test_failed_save_leaves_no_temp_file(one_pass, tmp_path, monkeypatch):
    statistics = one_pass.finalize()
    target = tmp_path / "stats.pt"
    statistics.save(target)
    before = target.read_bytes()

    def broken_save(obj, file):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        statistics.save(target)
    assert os.listdir(tmp_path) == ["stats.pt"]
    assert target.read_bytes() == before


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ChannelStatistics.load(tmp_path / "missing.pt")


def test_statistics_filename_sanitizes():
    assert statistics_filename("resnet18", "torchvision/V1", "imagenet val") == "resnet18__torchvision-V1__imagenet-val.pt"
    with pytest.raises(ValueError, match="dataset_id"):
        statistics_filename("resnet18", "v1", "//")


def test_selectors_read_finalized_statistics(one_pass):
    from parchgrad.selection import ClassSelector, InstanceSelector

    statistics = one_pass.finalize()
    selector = ClassSelector(statistics, quantile=0.5, p_value_threshold=1.0)
    mask = selector("a", torch.tensor([1, 2]), None)
    assert mask.shape == (2, 3)
    instance = InstanceSelector(statistics, alpha=0.5, p_value_threshold=1.0)
    assert instance("b", torch.tensor([0]), torch.zeros(1, 2)).shape == (1, 2)
