import math

import numpy as np
import pytest

from parchgrad import toy


def test_sum_std_grows_with_sqrt_count():
    assert toy.sum_std(100, (0.1, 0.2), "normal") == pytest.approx([1.0, 2.0])
    assert toy.sum_std(12, (1.0, 1.0), "uniform") == pytest.approx([1.0, 1.0])


def test_draw_vectors_shapes_and_ranges():
    rng = np.random.default_rng(0)
    uniform = toy.draw_vectors(rng, 50, (0.1, 1.0), "uniform", draws=40)
    assert uniform.shape == (40, 50, 2)
    assert np.all(np.abs(uniform[..., 0]) <= 0.05)
    assert np.all(np.abs(uniform[..., 1]) <= 0.5)
    normal = toy.draw_vectors(rng, 20000, (0.1, 1.0), "normal")
    assert normal.shape == (20000, 2)
    assert normal.std(axis=0) == pytest.approx([0.1, 1.0], rel=0.03)


def test_draw_vectors_rejects_unknown_distribution():
    with pytest.raises(ValueError, match="distribution"):
        toy.draw_vectors(np.random.default_rng(0), 3, (1.0, 1.0), "laplace")


def test_released_vectors_reproducible_with_seed_21():
    first = toy.released_figure_vectors(seed=21)
    second = toy.released_figure_vectors(seed=21)
    assert first["h"].shape == (10, 2)
    assert first["l"].shape == (100, 2)
    assert np.array_equal(first["h"], second["h"])
    assert np.array_equal(first["l"], second["l"])
    other = toy.released_figure_vectors(seed=22)
    assert not np.array_equal(first["h"], other["h"])


def test_released_vectors_follow_scalar_draw_order():
    # The notebook calls the legacy generator once per entry, one dimension at a time.
    generator = np.random.RandomState(21)
    h_first = [(generator.random_sample() - 0.5) * 0.1 for _ in range(10)]
    h_second = [(generator.random_sample() - 0.5) * 1.0 for _ in range(10)]
    l_first = [(generator.random_sample() - 0.5) * 0.1 for _ in range(100)]
    l_second = [(generator.random_sample() - 0.5) * 0.1 for _ in range(100)]
    vectors = toy.released_figure_vectors(seed=21, distribution="uniform")
    assert np.allclose(vectors["h"][:, 0], h_first)
    assert np.allclose(vectors["h"][:, 1], h_second)
    assert np.allclose(vectors["l"][:, 0], l_first)
    assert np.allclose(vectors["l"][:, 1], l_second)


def test_figure_summary_values():
    vectors = {"h": np.array([[0.0, 1.0], [0.0, 1.0]]), "l": np.array([[1.0, 0.0], [1.0, 0.0]])}
    summary = toy.figure_summary(vectors)
    assert summary["h_sum"] == [0.0, 2.0]
    assert summary["total"] == [2.0, 2.0]
    assert summary["angle"] == pytest.approx(45.0)
    assert summary["norm_ratio"] == pytest.approx(1.0)


def test_angle_degrees_cases():
    first = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    second = np.array([[3.0, 0.0], [0.0, -1.0], [-2.0, 0.0], [1.0, 1.0]])
    assert toy.angle_degrees(first, second) == pytest.approx([0.0, 90.0, 180.0, 45.0])


def test_expected_norm_ratio_isotropic_closed_form():
    # Isotropic sums: E|S_L| * E[1/|S_H|] = sigma_L sqrt(pi/2) * sqrt(pi/2) / sigma_H.
    ratio = toy.expected_norm_ratio(4, (1.0, 1.0), 9, (1.0, 1.0), "normal")
    assert ratio == pytest.approx(3.0 / 2.0 * math.pi / 2.0)


def test_expected_angle_limits():
    # A tiny L barely turns the sum; an L much larger than H makes the angle uniform on [0, 180].
    assert toy.expected_angle(10, (0.1, 1.0), 1, (1e-4, 1e-4), "normal") < 0.01
    assert toy.expected_angle(10, (0.1, 1.0), 1, (1e4, 1e4), "normal") == pytest.approx(90.0, abs=0.05)


def test_expected_angle_rejects_anisotropic_l():
    with pytest.raises(ValueError, match="equal L scales"):
        toy.expected_angle(10, (0.1, 1.0), 10, (0.1, 0.2), "normal")


@pytest.mark.parametrize("l_count, scale_ratio", [(10, 0.1), (100, 0.1), (300, 1.0)])
def test_monte_carlo_mean_within_ci_of_analytic(l_count, scale_ratio):
    table = toy.monte_carlo_table(
        draws=20000,
        seed=3,
        h_count=10,
        h_scales=(0.1, 1.0),
        l_counts=[l_count],
        scale_ratios=[scale_ratio],
        distributions=["normal"],
    )
    row = table.iloc[0]
    for name in ("norm_ratio", "angle"):
        assert row[f"{name}_ci_low"] <= row[f"{name}_analytic"] <= row[f"{name}_ci_high"], name


def test_monte_carlo_table_columns_and_determinism():
    arguments = dict(
        draws=50, seed=1, h_count=10, h_scales=(0.1, 1.0), l_counts=[1, 10], scale_ratios=[0.1, 1.0]
    )
    first = toy.monte_carlo_table(**arguments)
    second = toy.monte_carlo_table(**arguments)
    assert len(first) == 2 * 2 * 2
    for name in ("angle", "norm_ratio"):
        for suffix in ("mean", "ci_low", "ci_high", "median", "analytic"):
            assert f"{name}_{suffix}" in first.columns
    assert first.equals(second)


def test_monte_carlo_setting_independent_of_other_settings():
    alone = toy.monte_carlo_table(
        draws=30, seed=1, h_count=10, h_scales=(0.1, 1.0), l_counts=[10], scale_ratios=[0.3], distributions=["normal"]
    )
    together = toy.monte_carlo_table(
        draws=30, seed=1, h_count=10, h_scales=(0.1, 1.0), l_counts=[1, 10], scale_ratios=[0.1, 0.3], distributions=["normal"]
    )
    match = together[(together["l_count"] == 10) & (together["scale_ratio"] == 0.3)]
    assert match["angle_mean"].item() == alone["angle_mean"].item()


def test_simulation_in_blocks_well_formed(monkeypatch):
    # A block size below the draw count splits the draws into several blocks.
    monkeypatch.setattr(toy, "BLOCK_ELEMENTS", 64)
    samples = toy.simulate_aggregation(np.random.default_rng(0), 25, 10, (0.1, 1.0), 7, (0.1, 0.1), "uniform")
    assert samples["angle"].shape == (25,)
    assert np.all((samples["angle"] >= 0) & (samples["angle"] <= 180))
    assert np.allclose(samples["norm_ratio"], samples["l_norm"] / samples["h_norm"])
