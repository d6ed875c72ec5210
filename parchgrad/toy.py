"""Gradient aggregation in two dimensions: why many small gradients can turn a sum.

Group H contains a few 2-D "gradients" that are large in dimension 2, and
group L contains many gradients that are small in both dimensions. Each sum of ``n``
independent zero-mean terms of standard deviation ``s`` has standard
deviation ``s * sqrt(n)``, so L's sum grows with ``|L|`` and can rival H's
sum and turn the direction of the total even though every L vector is small.

Draw distributions, with ``s`` a per-dimension scale:

- ``"normal"``: ``N(0, s^2)``, as the paper's text describes (standard
  deviation ``s``);
- ``"uniform"``: uniform on ``(-s/2, s/2)``, as the notebook
  ``labs/2d_vector/visualize.ipynb`` of the authors' code release
  v23.11.07.1 draws (standard deviation ``s / sqrt(12)``).

Analytic expectations (:func:`expected_norm_ratio`, :func:`expected_angle`)
model each group's sum as a zero-mean Gaussian with per-dimension standard
deviation ``std(term) * sqrt(n)``. This is exact for normal draws and a
central-limit approximation for uniform ones, which is poor for ``|L| = 1``.

Reference: B. Park, G. Jeon, J. Choi, "ParchGrad: Controlled Internal
Gradients for Reliable Saliency Map", 2023 (the 2-D gradient-sum figure).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import integrate, special

from .metrics import summarize

__all__ = [
    "DISTRIBUTIONS",
    "angle_degrees",
    "draw_vectors",
    "expected_angle",
    "expected_norm_ratio",
    "figure_summary",
    "monte_carlo_table",
    "released_figure_vectors",
    "simulate_aggregation",
    "sum_std",
    "term_std",
]

DISTRIBUTIONS = ("normal", "uniform")

# Draws simulated per block, so memory stays near BLOCK_ELEMENTS float64 values
# per group whatever the draw count. The block size is fixed, never derived
# from the machine, because it sets the order in which random numbers are used.
BLOCK_ELEMENTS = 2**21


def _check_distribution(distribution: str) -> None:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def _check_scales(scales: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(scales, dtype=np.float64)
    if array.shape != (2,) or not np.all(array > 0):
        raise ValueError(f"{name} must be two positive per-dimension scales, got {list(np.atleast_1d(scales))!r}")
    return array


def term_std(scales: Sequence[float], distribution: str) -> np.ndarray:
    """Return the per-dimension standard deviation ``[2]`` of one drawn vector."""
    _check_distribution(distribution)
    scales = np.asarray(scales, dtype=np.float64)
    return scales if distribution == "normal" else scales / math.sqrt(12.0)


def sum_std(count: int, scales: Sequence[float], distribution: str) -> np.ndarray:
    """Return the per-dimension standard deviation ``[2]`` of a sum of ``count`` vectors: ``std * sqrt(count)``."""
    return term_std(scales, distribution) * math.sqrt(count)


def draw_vectors(
    rng: np.random.Generator, count: int, scales: Sequence[float], distribution: str, draws: int | None = None
) -> np.ndarray:
    """Draw ``count`` 2-D vectors with independent entries, ``[count, 2]`` or ``[draws, count, 2]``."""
    _check_distribution(distribution)
    scales = _check_scales(scales, "scales")
    shape = (count, 2) if draws is None else (draws, count, 2)
    if distribution == "normal":
        return rng.normal(0.0, 1.0, size=shape) * scales
    return (rng.random(size=shape) - 0.5) * scales


def released_figure_vectors(
    seed: int = 21,
    h_count: int = 10,
    h_scales: Sequence[float] = (0.1, 1.0),
    l_count: int = 100,
    l_scales: Sequence[float] = (0.1, 0.1),
    distribution: str = "uniform",
) -> dict[str, np.ndarray]:
    """Draw the vectors of the single 2-D figure in the released notebook's order.

    The notebook seeds NumPy's legacy global generator (``RandomState``) with
    ``seed`` and draws one dimension at a time: H's first entries, H's second
    entries, L's first entries, then L's second entries. With
    ``distribution="uniform"`` each entry is ``(u - 0.5) * s`` for
    ``u ~ U[0, 1)``, as released, and ``"normal"`` draws ``N(0, s^2)`` in the
    same order, as the paper's text describes.

    Returns:
        Dict with ``h`` ``[h_count, 2]`` and ``l`` ``[l_count, 2]``.
    """
    _check_distribution(distribution)
    h_scales = _check_scales(h_scales, "h_scales")
    l_scales = _check_scales(l_scales, "l_scales")
    generator = np.random.RandomState(seed)

    def column(count: int, scale: float) -> np.ndarray:
        if distribution == "uniform":
            return (generator.random_sample(count) - 0.5) * scale
        return generator.normal(0.0, scale, size=count)

    h_first = column(h_count, h_scales[0])
    h_second = column(h_count, h_scales[1])
    l_first = column(l_count, l_scales[0])
    l_second = column(l_count, l_scales[1])
    return {"h": np.stack([h_first, h_second], axis=1), "l": np.stack([l_first, l_second], axis=1)}


def angle_degrees(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Return the unsigned angle in degrees, in [0, 180], between 2-D vectors ``[..., 2]``."""
    cross = first[..., 0] * second[..., 1] - first[..., 1] * second[..., 0]
    dot = (first * second).sum(axis=-1)
    return np.degrees(np.arctan2(np.abs(cross), dot))


def simulate_aggregation(
    rng: np.random.Generator,
    draws: int,
    h_count: int,
    h_scales: Sequence[float],
    l_count: int,
    l_scales: Sequence[float],
    distribution: str,
) -> dict[str, np.ndarray]:
    """Simulate ``draws`` independent H and L groups and measure how L changes the sum.

    Returns:
        Dict of ``[draws]`` arrays: ``angle`` (degrees between H's sum and the
        total), ``norm_ratio`` (``|sum L| / |sum H|``), ``h_norm`` and ``l_norm``.
    """
    if draws < 1 or h_count < 1 or l_count < 1:
        raise ValueError(f"draws, h_count and l_count must be positive, got {draws}, {h_count}, {l_count}")
    block = max(1, BLOCK_ELEMENTS // (2 * max(h_count, l_count)))
    h_sums, l_sums = [], []
    for start in range(0, draws, block):
        size = min(block, draws - start)
        h_sums.append(draw_vectors(rng, h_count, h_scales, distribution, draws=size).sum(axis=1))
        l_sums.append(draw_vectors(rng, l_count, l_scales, distribution, draws=size).sum(axis=1))
    h_sum = np.concatenate(h_sums)  # [draws, 2]
    l_sum = np.concatenate(l_sums)

    h_norm = np.linalg.norm(h_sum, axis=1)
    l_norm = np.linalg.norm(l_sum, axis=1)
    return {
        "angle": angle_degrees(h_sum, h_sum + l_sum),
        "norm_ratio": l_norm / h_norm,
        "h_norm": h_norm,
        "l_norm": l_norm,
    }


def _expected_gaussian_norm(stds: np.ndarray) -> float:
    """Return ``E|X|`` for ``X ~ N(0, diag(a^2, b^2))``: ``sqrt(2/pi) * b * E(1 - a^2/b^2)``, ``b >= a``.

    ``E(m)`` is the complete elliptic integral of the second kind. For
    ``a = b = s`` this is the Rayleigh mean ``s * sqrt(pi/2)``.
    """
    small, large = float(np.min(stds)), float(np.max(stds))
    return math.sqrt(2.0 / math.pi) * large * float(special.ellipe(1.0 - (small / large) ** 2))


def _expected_inverse_gaussian_norm(stds: np.ndarray) -> float:
    """Return ``E[1/|X|]`` for ``X ~ N(0, diag(a^2, b^2))``: ``sqrt(2/pi) * K(1 - a^2/b^2) / b``, ``b >= a``.

    In polar coordinates the radial integral is ``int_0^inf exp(-r^2 q / 2) dr
    = sqrt(pi / (2 q))`` with ``q = cos^2/a^2 + sin^2/b^2``, and the angular
    integral of ``q^(-1/2)`` is ``4 a b K(m) / b`` with ``K`` the complete
    elliptic integral of the first kind. For ``a = b = s`` this is
    ``sqrt(pi/2) / s``.
    """
    small, large = float(np.min(stds)), float(np.max(stds))
    return math.sqrt(2.0 / math.pi) * float(special.ellipk(1.0 - (small / large) ** 2)) / large


def expected_norm_ratio(
    h_count: int, h_scales: Sequence[float], l_count: int, l_scales: Sequence[float], distribution: str
) -> float:
    """Return the Gaussian-model expectation of ``|sum L| / |sum H|``.

    The sums are independent, so ``E[|S_L| / |S_H|] = E|S_L| * E[1 / |S_H|]``.
    With per-dimension standard deviations ``(a_H, b_H)`` of ``S_H``
    (``b_H >= a_H``) and ``(a_L, b_L)`` of ``S_L``, each from
    :func:`sum_std`:

    - ``E|S_L| = sqrt(2/pi) * b_L * E(1 - a_L^2 / b_L^2)``, which is
      ``sigma * sqrt(pi/2)`` for an isotropic ``sigma``;
    - ``E[1/|S_H|] = sqrt(2/pi) * K(1 - a_H^2 / b_H^2) / b_H``,

    so for isotropic L the ratio is ``sigma_L * K(m_H) / b_H``. This is the
    mean of the ratio, which exceeds ``E|S_L| / E|S_H|`` because ``1/|S_H|``
    is convex. ``1/|S_H|`` has infinite variance in two dimensions, so
    Monte Carlo means of the ratio converge slowly.
    """
    l_std = sum_std(l_count, l_scales, distribution)
    h_std = sum_std(h_count, h_scales, distribution)
    return _expected_gaussian_norm(l_std) * _expected_inverse_gaussian_norm(h_std)


def _expected_phase_magnitude(snr: float) -> float:
    """Return ``E|atan2(Z2, k + Z1)|`` in radians for standard normal ``Z1, Z2`` and ``k = snr >= 0``.

    The phase of a constant ``k`` plus isotropic unit Gaussian noise has the
    density ``p(phi) = [exp(-k^2/2) + sqrt(2 pi) k cos(phi)
    exp(-k^2 sin^2(phi) / 2) Phi(k cos(phi))] / (2 pi)`` on ``(-pi, pi]``,
    which is symmetric, so the mean magnitude is ``2 int_0^pi phi p(phi) dphi``.
    """

    def weighted_density(phi: float) -> float:
        cos_phi = math.cos(phi)
        density = math.exp(-0.5 * snr * snr) + math.sqrt(2.0 * math.pi) * snr * cos_phi * math.exp(
            -0.5 * (snr * math.sin(phi)) ** 2
        ) * special.ndtr(snr * cos_phi)
        return phi * density / (2.0 * math.pi)

    # For a large k the density concentrates within a few 1/k of 0, so a break point helps quad find it.
    breakpoints = [min(math.pi / 2, 6.0 / snr)] if snr > 2.0 else None
    value, _ = integrate.quad(weighted_density, 0.0, math.pi, points=breakpoints, limit=200)
    return 2.0 * value


def expected_angle(
    h_count: int, h_scales: Sequence[float], l_count: int, l_scales: Sequence[float], distribution: str
) -> float:
    """Return the Gaussian-model expectation, in degrees, of the angle between ``sum H`` and the total.

    With ``S_L`` isotropic of per-dimension standard deviation ``c``, the
    angle between ``S_H = h`` and ``h + S_L`` depends only on ``k = |h| / c``:
    it is the phase magnitude of ``k + Z`` for a standard 2-D Gaussian ``Z``
    (see :func:`_expected_phase_magnitude`). ``|S_H|``, with per-dimension
    standard deviations ``a <= b``, has the Hoyt density
    ``p(r) = r / (a b) * exp(-r^2 (1/a^2 + 1/b^2) / 4) * I0(r^2 (1/a^2 - 1/b^2) / 4)``,
    and the expectation is ``int_0^inf p(r) f(r / c) dr``, by quadrature.

    Raises:
        ValueError: if L's two scales differ, since the derivation needs an isotropic ``S_L``.
    """
    l_scales_array = _check_scales(l_scales, "l_scales")
    if not math.isclose(l_scales_array[0], l_scales_array[1]):
        raise ValueError(f"expected_angle needs equal L scales in both dimensions, got {list(l_scales)!r}")
    noise_std = float(sum_std(l_count, l_scales_array, distribution)[0])
    h_std = sum_std(h_count, h_scales, distribution)
    small, large = float(np.min(h_std)), float(np.max(h_std))
    mean_term = 0.25 * (1.0 / small**2 + 1.0 / large**2)
    difference_term = 0.25 * (1.0 / small**2 - 1.0 / large**2)

    def radial_density(radius: float) -> float:
        # exp(-r^2 mean) * I0(r^2 diff) = exp(-r^2 (mean - diff)) * i0e(r^2 diff), stable for large r.
        squared = radius * radius
        return (
            radius
            / (small * large)
            * math.exp(-squared * (mean_term - difference_term))
            * float(special.i0e(squared * difference_term))
        )

    def integrand(radius: float) -> float:
        return radial_density(radius) * _expected_phase_magnitude(radius / noise_std)

    # Beyond 12 standard deviations of the larger axis the density is below 1e-30.
    upper = 12.0 * large
    value, _ = integrate.quad(integrand, 0.0, upper, points=[small, large], limit=200)
    return math.degrees(value)


def _setting_rng(seed: int, distribution: str, l_count: int, scale_ratio: float) -> np.random.Generator:
    """Return a generator keyed by the setting's values, so adding settings never changes the others."""
    key = [seed, DISTRIBUTIONS.index(distribution), l_count, int(round(scale_ratio * 1e9))]
    return np.random.default_rng(key)


def monte_carlo_table(
    draws: int,
    seed: int,
    h_count: int,
    h_scales: Sequence[float],
    l_counts: Sequence[int],
    scale_ratios: Sequence[float],
    distributions: Sequence[str] = DISTRIBUTIONS,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Simulate every setting and return one row per setting with Monte Carlo and analytic values.

    A setting is a distribution, an L size ``|L|`` and a scale ratio ``rho``:
    every L vector has scale ``rho * h_scales[1]`` in both dimensions, so
    ``rho`` is L's scale over H's scale in dimension 2. Each setting uses its
    own generator seeded from ``(seed, distribution, |L|, rho)``.

    Columns: ``distribution``, ``h_count``, ``l_count``, ``scale_ratio``,
    ``draws``, then for ``angle`` (degrees) and ``norm_ratio`` the
    ``_mean``, ``_ci_low``, ``_ci_high`` (Student-t interval at
    ``confidence``), ``_median`` and ``_analytic`` (Gaussian-model
    expectation) columns.
    """
    h_scales = _check_scales(h_scales, "h_scales")
    rows = []
    for distribution in distributions:
        _check_distribution(distribution)
        for l_count in l_counts:
            for scale_ratio in scale_ratios:
                l_scales = (scale_ratio * h_scales[1], scale_ratio * h_scales[1])
                samples = simulate_aggregation(
                    _setting_rng(seed, distribution, int(l_count), float(scale_ratio)),
                    draws,
                    h_count,
                    h_scales,
                    int(l_count),
                    l_scales,
                    distribution,
                )
                analytic = {
                    "angle": expected_angle(h_count, h_scales, int(l_count), l_scales, distribution),
                    "norm_ratio": expected_norm_ratio(h_count, h_scales, int(l_count), l_scales, distribution),
                }
                row = {
                    "distribution": distribution,
                    "h_count": int(h_count),
                    "l_count": int(l_count),
                    "scale_ratio": float(scale_ratio),
                    "draws": int(draws),
                }
                for name in ("angle", "norm_ratio"):
                    mean, low, high, _ = summarize(samples[name], confidence=confidence)
                    row[f"{name}_mean"] = mean
                    row[f"{name}_ci_low"] = low
                    row[f"{name}_ci_high"] = high
                    row[f"{name}_median"] = float(np.median(samples[name]))
                    row[f"{name}_analytic"] = analytic[name]
                rows.append(row)
    return pd.DataFrame(rows)


def figure_summary(vectors: dict[str, np.ndarray]) -> dict[str, float | list[float]]:
    """Return the sums of one figure's vectors, the angle they make and the norm ratio."""
    h_sum = vectors["h"].sum(axis=0)
    l_sum = vectors["l"].sum(axis=0)
    total = h_sum + l_sum
    return {
        "h_sum": h_sum.tolist(),
        "l_sum": l_sum.tolist(),
        "total": total.tolist(),
        "angle": float(angle_degrees(h_sum, total)),
        "norm_ratio": float(np.linalg.norm(l_sum) / np.linalg.norm(h_sum)),
    }

