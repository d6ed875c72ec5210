"""Saliency-map metrics: localization (box and mask energy, pointing game) and deletion.

All functions take batched tensors and return one value per image, with a
``valid`` flag wherever a value can be undefined. An undefined value is NaN
and its flag is False, so a NaN never appears without its flag.

Every metric reads the relevance ``R = |map|`` with NaN entries set to 0,
as the released evaluation code does.

Reference: B. Park, G. Jeon, J. Choi, "ParchGrad: Controlled Internal
Gradients for Reliable Saliency Map", 2023.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = [
    "METRICS",
    "box_energy",
    "boxes_to_masks",
    "deletion_scores",
    "mask_energy",
    "pointing_game",
    "relevance",
    "summarize",
]

DELETION_ORDERS = ("morf", "lerf")


def relevance(maps: Tensor) -> Tensor:
    """Return ``|maps|`` with NaN entries set to 0, the quantity every metric ranks and sums."""
    return torch.nan_to_num(maps.abs(), nan=0.0)


def _check_maps(maps: Tensor) -> None:
    if not isinstance(maps, Tensor):
        raise TypeError(f"maps must be a torch.Tensor of shape [B, H, W], got {type(maps).__name__}")
    if maps.dim() != 3:
        raise ValueError(
            f"maps must have shape [B, H, W], got shape {tuple(maps.shape)}. "
            "Average over colour channels before calling a metric."
        )


def _check_masks(masks: Tensor, maps: Tensor) -> None:
    if not isinstance(masks, Tensor) or masks.dtype != torch.bool:
        kind = masks.dtype if isinstance(masks, Tensor) else type(masks).__name__
        raise TypeError(f"masks must be a bool tensor of shape [B, H, W], got {kind}")
    if masks.shape != maps.shape:
        raise ValueError(f"masks shape {tuple(masks.shape)} does not match maps shape {tuple(maps.shape)}")


def boxes_to_masks(boxes: Tensor, height: int, width: int) -> Tensor:
    """Convert pixel boxes into pixel masks.

    Args:
        boxes: ``[B, 4]`` boxes ``(x0, y0, x1, y1)`` in pixels, ``x1`` and
            ``y1`` exclusive. Fractional values are allowed.
        height, width: size of the image the boxes refer to.

    Returns:
        ``[B, height, width]`` bool masks. Coordinates are first clipped to
        the image. A box whose clipped width or height is not positive, or
        that has a non-finite coordinate, gives an empty mask. Otherwise the
        mask covers every pixel that the box overlaps: columns
        ``floor(x0) .. ceil(x1) - 1`` and rows ``floor(y0) .. ceil(y1) - 1``.
        For integer boxes this is the slice ``[y0:y1, x0:x1]``.
    """
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must be a tensor of shape [B, 4] as (x0, y0, x1, y1), got {shape}")

    boxes = boxes.to(torch.float64)
    finite = torch.isfinite(boxes).all(dim=1)
    limits = torch.tensor([width, height, width, height], dtype=torch.float64, device=boxes.device)
    clipped = torch.minimum(torch.clamp(torch.nan_to_num(boxes), min=0.0), limits)
    x0, y0, x1, y1 = clipped.unbind(dim=1)
    nonempty = finite & (x1 > x0) & (y1 > y0)

    columns = torch.arange(width, device=boxes.device, dtype=torch.float64)
    rows = torch.arange(height, device=boxes.device, dtype=torch.float64)
    in_columns = (columns >= x0.floor()[:, None]) & (columns < x1.ceil()[:, None])  # [B, W]
    in_rows = (rows >= y0.floor()[:, None]) & (rows < y1.ceil()[:, None])  # [B, H]
    masks = in_rows[:, :, None] & in_columns[:, None, :]  # [B, H, W]
    return masks & nonempty[:, None, None]


def _region_masks(region: Tensor, maps: Tensor) -> Tensor:
    """Accept either ``[B, 4]`` boxes or ``[B, H, W]`` bool masks and return masks."""
    if isinstance(region, Tensor) and region.dtype == torch.bool:
        _check_masks(region, maps)
        return region.to(maps.device)
    if isinstance(region, Tensor) and region.dim() == 2 and region.shape[1] == 4:
        if region.shape[0] != maps.shape[0]:
            raise ValueError(f"boxes has {region.shape[0]} rows but maps has batch size {maps.shape[0]}")
        return boxes_to_masks(region.to(maps.device), maps.shape[1], maps.shape[2])
    shape = tuple(region.shape) if isinstance(region, Tensor) else type(region).__name__
    raise ValueError(f"region must be [B, 4] boxes or [B, H, W] bool masks, got {shape}")


def _safe_divide(numerator: Tensor, denominator: Tensor, valid: Tensor) -> Tensor:
    """Divide where ``valid`` and return NaN elsewhere, without ever dividing by zero."""
    safe_denominator = torch.where(valid, denominator, torch.ones_like(denominator))
    return torch.where(valid, numerator / safe_denominator, torch.full_like(numerator, math.nan))


def mask_energy(maps: Tensor, masks: Tensor) -> dict[str, Tensor]:
    """Compute the share of relevance inside and outside a region, per image.

    With ``R = |map|`` (NaN as 0), ``A`` the image area and ``a`` the region
    area in pixels:

    - ``mu_in = R_in / R_total`` and ``mu_out = R_out / R_total``, in [0, 1];
    - ``mu_in_w = mu_in * A / a`` and ``mu_out_w = mu_out * A / (A - a)``,
      which equal 1 for a map that is uniform over the image.

    Args:
        maps: ``[B, H, W]`` saliency maps.
        masks: ``[B, H, W]`` bool region masks (the object pixels).

    Returns:
        Dict of float64 ``[B]`` tensors ``mu_in``, ``mu_in_w``, ``mu_out``,
        ``mu_out_w`` and the bool ``[B]`` tensor ``valid``. An image is
        invalid, with NaN values, when its region is empty, covers the whole
        image, or its relevance sums to zero or to a non-finite value.

    Raises:
        TypeError, ValueError: on inputs of the wrong type or shape.
    """
    _check_maps(maps)
    _check_masks(masks, maps)

    masks = masks.to(maps.device)
    relevance_map = relevance(maps).to(torch.float64)
    total = relevance_map.sum(dim=(1, 2))
    inside = (relevance_map * masks).sum(dim=(1, 2))
    outside = total - inside

    image_area = float(maps.shape[1] * maps.shape[2])
    region_area = masks.sum(dim=(1, 2)).to(torch.float64)
    valid = (region_area > 0) & (region_area < image_area) & (total > 0) & torch.isfinite(total)

    # Clamp guards against a rounding residue pushing the shares outside [0, 1].
    mu_in = _safe_divide(inside, total, valid).clamp(0.0, 1.0)
    mu_out = _safe_divide(outside, total, valid).clamp(0.0, 1.0)
    return {
        "mu_in": mu_in,
        "mu_in_w": _safe_divide(mu_in * image_area, region_area, valid),
        "mu_out": mu_out,
        "mu_out_w": _safe_divide(mu_out * image_area, image_area - region_area, valid),
        "valid": valid,
    }


def box_energy(maps: Tensor, boxes: Tensor) -> dict[str, Tensor]:
    """Compute the bounding-box energy of each map: :func:`mask_energy` of the box's pixels.

    Args:
        maps: ``[B, H, W]`` saliency maps.
        boxes: ``[B, 4]`` boxes ``(x0, y0, x1, y1)`` in pixels of the map,
            ``x1`` and ``y1`` exclusive. Fractional boxes cover every pixel
            they overlap (see :func:`boxes_to_masks`).

    Returns:
        The dict of :func:`mask_energy`. An empty box, a box that covers the
        whole image and a map whose relevance sums to zero are invalid.
    """
    _check_maps(maps)
    if isinstance(boxes, Tensor) and boxes.dtype == torch.bool:
        raise TypeError("box_energy expects [B, 4] boxes. Pass bool masks to mask_energy instead.")
    return mask_energy(maps, _region_masks(boxes, maps))


def pointing_game(maps: Tensor, region: Tensor) -> dict[str, Tensor]:
    """Check whether each map's maximum falls inside its region.

    Args:
        maps: ``[B, H, W]`` saliency maps.
        region: ``[B, 4]`` boxes (as in :func:`box_energy`) or ``[B, H, W]``
            bool masks.

    Returns:
        Dict with bool ``[B]`` tensors ``hit`` and ``valid``. The maximum of
        ``R = |map|`` is taken at its first occurrence in row-major order, so
        ties are broken deterministically. An image whose relevance is all
        zero, or whose region is empty, is invalid and its ``hit`` is False.
    """
    _check_maps(maps)
    masks = _region_masks(region, maps)

    flat = relevance(maps).flatten(start_dim=1)  # [B, H*W]
    maximum = flat.max(dim=1, keepdim=True).values
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(flat)
    # The smallest flat index among the maxima is the first one in row-major order.
    first_max = torch.where(flat == maximum, positions, flat.shape[1]).min(dim=1).values
    hit = masks.flatten(start_dim=1).gather(1, first_max[:, None]).squeeze(1)

    valid = (maximum.squeeze(1) > 0) & masks.flatten(start_dim=1).any(dim=1)
    return {"hit": hit & valid, "valid": valid}


def _deletion_ranks(relevance_flat: Tensor, order: str) -> Tensor:
    """Return each pixel's rank ``[B, P]`` in the deletion order, ties kept in pixel-index order."""
    # A stable ascending sort of -R (MoRF) or R (LeRF) keeps tied pixels in index order.
    keys = -relevance_flat if order == "morf" else relevance_flat
    permutation = torch.sort(keys, dim=1, stable=True).indices  # [B, P], pixel index at each rank
    ranks = torch.empty_like(permutation)
    positions = torch.arange(relevance_flat.shape[1], device=relevance_flat.device).expand_as(permutation)
    ranks.scatter_(1, permutation, positions)
    return ranks


def _check_deletion_inputs(
    inputs: Tensor, maps: Tensor, labels: Tensor, ratios: Sequence[float], order: str, batch_size: int
) -> None:
    _check_maps(maps)
    if inputs.dim() != 4:
        raise ValueError(f"inputs must have shape [B, C, H, W], got {tuple(inputs.shape)}")
    if inputs.shape[0] != maps.shape[0] or inputs.shape[2:] != maps.shape[1:]:
        raise ValueError(
            f"inputs shape {tuple(inputs.shape)} does not match maps shape {tuple(maps.shape)}. "
            "The maps must have the batch size and spatial size of inputs."
        )
    if labels.shape != (inputs.shape[0],):
        raise ValueError(f"labels must have shape [{inputs.shape[0]}], got {tuple(labels.shape)}")
    if order not in DELETION_ORDERS:
        raise ValueError(f"order must be one of {DELETION_ORDERS}, got {order!r}")
    if len(ratios) == 0 or any(not 0.0 <= float(r) <= 1.0 for r in ratios):
        raise ValueError(f"ratios must be a non-empty sequence of fractions in [0, 1], got {list(ratios)!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


@torch.no_grad()
def deletion_scores(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    labels: Tensor,
    ratios: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
    order: str = "morf",
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Score maps by deleting pixels in MoRF or LeRF order and measuring the model's response.

    Pixels are ranked by ``R = |map|`` (NaN as 0): descending for ``"morf"``
    (most relevant first), ascending for ``"lerf"`` (least relevant first),
    with tied pixels kept in row-major index order. For each ratio ``r`` the
    first ``int(A * r)`` pixels (``A = H * W``, Python's ``int`` truncation
    as released) are set to 0 in every channel of the normalized input, so a
    pixel is removed in all colour channels at once.

    With ``p`` the softmax probability of the label and ``y_hat`` the
    model's prediction on the unmodified input:

    - ``aopc = p(x) - p(x_r)``;
    - ``lodds = log(p(x_r) / (p(x) + 1e-10))``, where ``log p(x_r)`` comes
      from ``log_softmax`` so that an underflowing ``p(x_r)`` stays finite;
    - ``accuracy = [argmax f(x_r) == label]`` as 0.0 or 1.0;
    - ``fracdiff = |p_yhat(x) - p_yhat(x_r)|``.

    All ``B * R`` perturbed inputs, plus the ``B`` unmodified ones, run
    through the model in chunks of ``batch_size`` under ``torch.no_grad``
    with the model in eval mode. The model's previous training mode is
    restored afterwards.

    Args:
        model: classifier returning logits ``[N, K]``, on the device of ``inputs``.
        inputs: ``[B, C, H, W]`` normalized images.
        maps: ``[B, H, W]`` saliency maps.
        labels: ``[B]`` int class indices.
        ratios: ``R`` fractions of pixels to delete, each in [0, 1].
        order: ``"morf"`` or ``"lerf"``.
        batch_size: images per forward pass.
        progress: show a progress bar over the chunks.

    Returns:
        Dict of float ``[B, R]`` tensors ``aopc``, ``lodds``, ``accuracy``,
        ``fracdiff`` and ``probability`` (``p(x_r)``), and the bool ``[B]``
        tensor ``valid``. A map whose relevance is constant (all zero
        included) is invalid, since it defines no order, but its scores are
        still computed from the index order.

    Raises:
        ValueError: on inputs of the wrong shape, an unknown order, a ratio
            outside [0, 1], or a label outside the model's classes.
    """
    _check_deletion_inputs(inputs, maps, labels, ratios, order, batch_size)
    batch, _, height, width = inputs.shape
    pixel_count = height * width
    ratio_count = len(ratios)
    labels = labels.to(device=inputs.device, dtype=torch.long)

    relevance_flat = relevance(maps).flatten(start_dim=1).to(inputs.device)  # [B, P]
    ranks = _deletion_ranks(relevance_flat, order)  # [B, P]
    valid = relevance_flat.amax(dim=1) > relevance_flat.amin(dim=1)

    # Column 0 is the unmodified input, and columns 1..R delete int(A * r) pixels.
    deleted_counts = torch.tensor(
        [0] + [int(pixel_count * float(r)) for r in ratios], device=inputs.device
    )  # [R + 1]
    job_count = batch * (ratio_count + 1)

    was_training = model.training
    model.eval()
    try:
        logits = []
        starts = range(0, job_count, batch_size)
        for start in tqdm(starts, desc="deletion", disable=not progress):
            jobs = torch.arange(start, min(start + batch_size, job_count), device=inputs.device)
            images = jobs // (ratio_count + 1)
            keep = ranks[images] >= deleted_counts[jobs % (ratio_count + 1)][:, None]  # [n, P]
            perturbed = inputs[images] * keep.view(-1, 1, height, width).to(inputs.dtype)
            logits.append(model(perturbed).float())
    finally:
        model.train(was_training)

    logits_all = torch.cat(logits).view(batch, ratio_count + 1, -1)  # [B, R + 1, K]
    class_count = logits_all.shape[-1]
    if labels.min() < 0 or labels.max() >= class_count:
        raise ValueError(f"labels must be in [0, {class_count}), got values {labels.tolist()}")

    log_probabilities = torch.log_softmax(logits_all, dim=-1)
    probabilities = log_probabilities.exp()
    label_index = labels[:, None, None].expand(batch, ratio_count + 1, 1)
    label_probability = probabilities.gather(2, label_index).squeeze(2)  # [B, R + 1]
    label_log_probability = log_probabilities.gather(2, label_index).squeeze(2)

    prediction = logits_all[:, 0].argmax(dim=1)  # y_hat on the unmodified input
    prediction_index = prediction[:, None, None].expand(batch, ratio_count + 1, 1)
    prediction_probability = probabilities.gather(2, prediction_index).squeeze(2)

    original = label_probability[:, :1]
    return {
        "aopc": original - label_probability[:, 1:],
        "lodds": label_log_probability[:, 1:] - torch.log(original + 1e-10),
        "accuracy": (logits_all[:, 1:].argmax(dim=2) == labels[:, None]).float(),
        "fracdiff": (prediction_probability[:, :1] - prediction_probability[:, 1:]).abs(),
        "probability": label_probability[:, 1:],
        "valid": valid,
    }


def summarize(values, valid=None, confidence: float = 0.95) -> tuple[float, float, float, int]:
    """Return the mean of the valid values and its Student-t confidence interval.

    Args:
        values: ``[N]`` tensor or array of per-image values.
        valid: ``[N]`` bool flags, or None to use every value.
        confidence: coverage of the interval.

    Returns:
        ``(mean, ci_low, ci_high, n)`` over the ``n`` valid values. With
        ``n == 0`` all three are NaN, and with ``n == 1`` the bounds are NaN.
        The bounds equal the mean when all values are equal.

    Raises:
        ValueError: if the shapes differ, ``values`` is not 1-D, or a value
            flagged valid is not finite.
    """
    array = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
    array = array.astype(np.float64)
    if array.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {array.shape}. Average over other axes first.")
    if valid is None:
        flags = np.ones(array.shape, dtype=bool)
    else:
        flags = valid.detach().cpu().numpy() if isinstance(valid, Tensor) else np.asarray(valid)
        flags = flags.astype(bool)
    if flags.shape != array.shape:
        raise ValueError(f"valid shape {flags.shape} does not match values shape {array.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")

    selected = array[flags]
    if not np.isfinite(selected).all():
        raise ValueError("values flagged valid contain NaN or infinity. Flag them invalid or fix the metric.")
    count = int(selected.size)
    if count == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(selected.mean())
    if count == 1:
        return mean, math.nan, math.nan, 1

    standard_error = float(selected.std(ddof=1)) / math.sqrt(count)
    half_width = float(stats.t.ppf(0.5 + confidence / 2.0, df=count - 1)) * standard_error
    return mean, mean - half_width, mean + half_width, count


METRICS: dict[str, Callable[..., dict[str, Tensor]]] = {
    "box_energy": box_energy,
    "mask_energy": mask_energy,
    "pointing_game": pointing_game,
    "deletion": deletion_scores,
}
