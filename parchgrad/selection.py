"""Channel selectors: which output-gradient channels of a layer form the kept group H.

Selectors read activation statistics collected once over a labelled dataset
(see :mod:`parchgrad.statistics`), where a channel's statistic is the global
average pool (GAP) of ``ReLU(conv output)``:

- ``cls`` (class-wise): per (class, channel), the p-value of a one-sided
  two-sample t-test "mean GAP of the class is greater than the mean GAP of all
  other images"; the class is the explained target. NaN p-values count as 1.
- ``ins`` (instance-wise): per channel, ``z = (gap(x) - mean) / std`` from the
  dataset, p-value ``1 - Phi(z)``.
- ``all``: every channel is kept, which leaves the gradient unchanged (the
  plain attribution method).

Threshold: either ``alpha`` (keep p <= alpha for ``cls``, p < alpha for
``ins``) or ``quantile`` q, where alpha becomes the k-th smallest p-value of
the layer with ``k = max(1, int(C * q))``. Both are combined with a normality
filter: a channel can be kept only if the Shapiro-Wilk p-value of its GAP over
the dataset is below ``p_value_threshold``. ``cls`` keeps every channel when H
would be empty.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "AllChannelsSelector",
    "ClassSelector",
    "InstanceSelector",
    "SELECTORS",
    "SelectionStatistics",
    "build_selector",
]


class SelectionStatistics(Protocol):
    """Per-layer statistics that the selectors read, keyed by qualified layer name."""

    ttest_pvalues: Mapping[str, Tensor]  # [K, C], one-sided t-test p-value per (class, channel)
    shapiro_pvalues: Mapping[str, Tensor]  # [C], Shapiro-Wilk p-value of each channel's GAP
    mean: Mapping[str, Tensor]  # [C], dataset mean GAP
    std: Mapping[str, Tensor]  # [C], dataset standard deviation of the GAP


def _check_threshold(quantile: float | None, alpha: float | None) -> None:
    if (quantile is None) == (alpha is None):
        raise ValueError(
            f"Set exactly one of quantile and alpha, got quantile={quantile!r}, alpha={alpha!r}."
        )
    if quantile is not None and not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile!r}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")


def _kth_smallest(pvalues: Tensor, quantile: float) -> Tensor:
    """Return the k-th smallest value along the last dim, ``k = max(1, int(C * quantile))``, keeping dims."""
    count = max(1, int(pvalues.shape[-1] * quantile))
    return pvalues.kthvalue(count, dim=-1, keepdim=True).values


def _missing_layer_error(layer: str, known: Mapping[str, Tensor]) -> KeyError:
    return KeyError(
        f"No statistics for layer {layer!r}; the statistics cover {sorted(known)}. "
        "Collect statistics for this model, or hook only layers they cover."
    )


class AllChannelsSelector:
    """Keep every channel: the hook returns gradients unchanged (the plain method)."""

    needs_activation = False

    def __call__(self, layer: str, targets: Tensor, activation: Tensor | None) -> None:
        # None marks H as every channel, so the controller skips all work.
        return None


def raise_if_not_1d(targets: Tensor) -> None:
    if targets.dim() != 1:
        raise ValueError(f"targets must be a [B] tensor, got shape {tuple(targets.shape)}")


class ClassSelector:
    """Class-wise (CLS) selection from one-sided t-test p-values.

    The ``[K, C]`` mask of every layer is computed once at construction, so the
    backward hook only indexes it with the targets (no host synchronization).
    """

    needs_activation = False

    def __init__(
        self,
        statistics: SelectionStatistics,
        *,
        quantile: float | None = None,
        alpha: float | None = None,
        p_value_threshold: float = 0.05,
    ) -> None:
        _check_threshold(quantile, alpha)
        self.quantile = quantile
        self.alpha = alpha
        self.p_value_threshold = p_value_threshold
        self.masks: dict[str, Tensor] = {}
        for layer, pvalues in statistics.ttest_pvalues.items():
            pvalues = torch.nan_to_num(torch.as_tensor(pvalues, dtype=torch.float64), nan=1.0)
            threshold = _kth_smallest(pvalues, quantile) if quantile is not None else alpha
            normal_filter = torch.as_tensor(statistics.shapiro_pvalues[layer]) < p_value_threshold
            mask = (pvalues <= threshold) & normal_filter[None, :]
            # An empty H falls back to keeping every channel of that class.
            empty = ~mask.any(dim=1, keepdim=True)
            self.masks[layer] = mask | empty

    def __call__(self, layer: str, targets: Tensor, activation: Tensor | None) -> Tensor:
        raise_if_not_1d(targets)
        if layer not in self.masks:
            raise _missing_layer_error(layer, self.masks)
        mask = self.masks[layer]
        if mask.device != targets.device:
            mask = mask.to(targets.device)
            self.masks[layer] = mask
        return mask[targets]


class InstanceSelector:
    """Instance-wise (INS) selection from the input's own GAP against dataset mean and std.

    As in the code release, the comparison is strict (``p < threshold``), so
    with ``quantile`` the k-th smallest p-value itself is not kept: k - 1
    channels are, one fewer than :class:`ClassSelector` keeps.

    NOTE: there is no fallback for an empty H, so a quantile with
    ``int(C * q) <= 1`` keeps no channel and leaves the gradient unchanged.
    """

    needs_activation = True

    def __init__(
        self,
        statistics: SelectionStatistics,
        *,
        quantile: float | None = None,
        alpha: float | None = None,
        p_value_threshold: float = 0.05,
    ) -> None:
        _check_threshold(quantile, alpha)
        self.quantile = quantile
        self.alpha = alpha
        self.p_value_threshold = p_value_threshold
        self.mean = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in statistics.mean.items()}
        self.std = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in statistics.std.items()}
        self.normal_filter = {
            k: torch.as_tensor(v) < p_value_threshold for k, v in statistics.shapiro_pvalues.items()
        }

    def pvalues(self, layer: str, activation: Tensor) -> Tensor:
        """Return ``1 - Phi(z)`` ``[B, C]`` for the ``[B, C]`` GAP ``activation`` of ``layer``."""
        if layer not in self.mean:
            raise _missing_layer_error(layer, self.mean)
        mean = self.mean[layer].to(activation.device)
        std = self.std[layer].to(activation.device)
        z = (activation - mean) / std
        # A zero std (a dead channel) gives NaN or inf; NaN counts as "not selected".
        return torch.nan_to_num(torch.special.ndtr(-z), nan=1.0)

    def __call__(self, layer: str, targets: Tensor, activation: Tensor | None) -> Tensor:
        if activation is None:
            raise ValueError(f"InstanceSelector needs the GAP of layer {layer!r}, got None.")
        pvalues = self.pvalues(layer, activation)
        threshold = _kth_smallest(pvalues, self.quantile) if self.quantile is not None else self.alpha
        normal_filter = self.normal_filter[layer].to(activation.device)
        return (pvalues < threshold) & normal_filter[None, :]


SELECTORS: dict[str, Callable[..., object]] = {
    "cls": ClassSelector,
    "ins": InstanceSelector,
    "all": AllChannelsSelector,
}


def build_selector(
    name: str,
    statistics: SelectionStatistics | None = None,
    **options: object,
):
    """Build the selector registered as ``name`` (``cls``, ``ins`` or ``all``).

    ``options`` are ``quantile``, ``alpha`` and ``p_value_threshold`` for
    ``cls`` and ``ins``; ``all`` takes none.
    """
    if name not in SELECTORS:
        raise ValueError(f"Unknown selection {name!r}; choose one of {sorted(SELECTORS)}.")
    if name == "all":
        return AllChannelsSelector()
    if statistics is None:
        raise ValueError(f"Selection {name!r} needs channel statistics; pass `statistics`.")
    return SELECTORS[name](statistics, **options)
