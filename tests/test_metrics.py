import math

import numpy as np
import pytest
import torch
from torch import nn

from parchgrad.metrics import (
    METRICS,
    box_energy,
    boxes_to_masks,
    deletion_scores,
    mask_energy,
    pointing_game,
    summarize,
)


def _sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


class OnePixelModel(nn.Module):
    """Two-class model: logit 0 is 0, logit 1 is ``weight`` times the sum over channels of pixel ``(row, col)``."""

    def __init__(self, row: int, col: int, weight: float = 5.0):
        super().__init__()
        self.row, self.col, self.weight = row, col, weight

    def forward(self, x):
        score = self.weight * x[:, :, self.row, self.col].sum(dim=1)
        return torch.stack([torch.zeros_like(score), score], dim=1)


class RecordingModel(nn.Module):
    """Constant logits; stores every input batch so tests can see which pixels were deleted."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x):
        self.batches.append(x.clone())
        return torch.zeros(x.shape[0], 2)


# ---- boxes_to_masks -------------------------------------------------------


def test_boxes_to_masks_integer_box_is_slice():
    masks = boxes_to_masks(torch.tensor([[1.0, 2.0, 4.0, 3.0]]), height=5, width=6)
    expected = torch.zeros(1, 5, 6, dtype=torch.bool)
    expected[0, 2:3, 1:4] = True
    assert torch.equal(masks, expected)


def test_boxes_to_masks_fractional_box_covers_overlapped_pixels():
    # Columns floor(0.5)=0 .. ceil(2.5)-1=2, rows floor(1.2)=1 .. ceil(3.0)-1=2.
    masks = boxes_to_masks(torch.tensor([[0.5, 1.2, 2.5, 3.0]]), height=4, width=4)
    expected = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected[0, 1:3, 0:3] = True
    assert torch.equal(masks, expected)


def test_boxes_to_masks_clips_and_empties():
    boxes = torch.tensor(
        [
            [-3.0, -1.0, 2.0, 10.0],  # clipped to columns 0..1, all rows
            [2.0, 1.0, 2.0, 3.0],  # zero width
            [1.5, 1.0, 1.5, 3.0],  # zero width at a fractional position
            [5.0, 0.0, 9.0, 2.0],  # entirely right of the image
            [math.nan, 0.0, 2.0, 2.0],
        ]
    )
    masks = boxes_to_masks(boxes, height=3, width=4)
    assert masks[0].sum() == 6
    assert masks[0, :, :2].all()
    assert not masks[1].any()
    assert not masks[2].any()
    assert not masks[3].any()
    assert not masks[4].any()


def test_boxes_to_masks_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        boxes_to_masks(torch.zeros(2, 3), height=4, width=4)


# ---- box and mask energy ---------------------------------------------------


def test_box_energy_hand_computed():
    # 4x4 map: 1 everywhere, 5 in the 2x2 box at rows 1..2, columns 1..2.
    maps = torch.ones(1, 4, 4)
    maps[0, 1:3, 1:3] = 5.0
    result = box_energy(maps, torch.tensor([[1.0, 1.0, 3.0, 3.0]]))
    # R_in = 4 * 5 = 20, R_out = 12 * 1 = 12, R_total = 32, A = 16, a = 4.
    assert result["valid"].tolist() == [True]
    assert result["mu_in"].item() == pytest.approx(20 / 32)
    assert result["mu_out"].item() == pytest.approx(12 / 32)
    assert result["mu_in_w"].item() == pytest.approx(20 / 32 * 16 / 4)
    assert result["mu_out_w"].item() == pytest.approx(12 / 32 * 16 / 12)


def test_box_energy_uses_absolute_value_and_ignores_nan():
    maps = torch.zeros(1, 2, 2)
    maps[0, 0, 0] = -3.0
    maps[0, 0, 1] = math.nan
    maps[0, 1, 1] = 1.0
    result = box_energy(maps, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    assert result["mu_in"].item() == pytest.approx(0.75)
    assert result["mu_out"].item() == pytest.approx(0.25)


def test_box_energy_uniform_map_weighted_is_one():
    maps = torch.full((1, 8, 8), 0.3)
    result = box_energy(maps, torch.tensor([[2.0, 1.0, 5.0, 7.0]]))
    assert result["mu_in_w"].item() == pytest.approx(1.0)
    assert result["mu_out_w"].item() == pytest.approx(1.0)


def test_box_energy_invalid_cases_flagged_nan():
    maps = torch.rand(4, 6, 6) + 0.1
    maps[2] = 0.0
    boxes = torch.tensor(
        [
            [0.0, 0.0, 6.0, 6.0],  # whole image
            [3.0, 3.0, 3.0, 5.0],  # empty
            [1.0, 1.0, 3.0, 3.0],  # valid box, all-zero map
            [1.0, 1.0, 3.0, 3.0],  # valid
        ]
    )
    result = box_energy(maps, boxes)
    assert result["valid"].tolist() == [False, False, False, True]
    for key in ("mu_in", "mu_in_w", "mu_out", "mu_out_w"):
        assert torch.isnan(result[key][:3]).all(), key
        assert torch.isfinite(result[key][3]), key


def test_box_energy_no_nan_without_flag():
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(16, 7, 9, generator=generator)
    maps[::3] = 0.0
    maps[1, 2, 3] = math.nan
    corners = torch.rand(16, 2, generator=generator) * torch.tensor([9.0, 7.0])
    sizes = torch.rand(16, 2, generator=generator) * 6
    boxes = torch.cat([corners, corners + sizes], dim=1)
    result = box_energy(maps, boxes)
    for key in ("mu_in", "mu_in_w", "mu_out", "mu_out_w"):
        assert torch.equal(torch.isnan(result[key]), ~result["valid"]), key


def test_box_energy_shares_in_unit_interval():
    generator = torch.Generator().manual_seed(1)
    maps = torch.randn(32, 10, 10, generator=generator)
    boxes = torch.tensor([[1.0, 2.0, 7.5, 9.2]]).repeat(32, 1)
    result = box_energy(maps, boxes)
    assert result["valid"].all()
    assert ((result["mu_in"] >= 0) & (result["mu_in"] <= 1)).all()
    assert ((result["mu_out"] >= 0) & (result["mu_out"] <= 1)).all()
    assert torch.allclose(result["mu_in"] + result["mu_out"], torch.ones(32, dtype=torch.float64))


def test_mask_energy_hand_computed():
    maps = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    masks = torch.tensor([[[True, False], [False, True]]])
    result = mask_energy(maps, masks)
    assert result["mu_in"].item() == pytest.approx(5 / 10)
    assert result["mu_in_w"].item() == pytest.approx(5 / 10 * 4 / 2)
    assert result["valid"].item()


def test_mask_energy_empty_and_full_masks_invalid():
    maps = torch.ones(2, 3, 3)
    masks = torch.zeros(2, 3, 3, dtype=torch.bool)
    masks[1] = True
    result = mask_energy(maps, masks)
    assert result["valid"].tolist() == [False, False]
    assert torch.isnan(result["mu_in"]).all()


def test_mask_energy_rejects_float_masks():
    with pytest.raises(TypeError, match="bool"):
        mask_energy(torch.ones(1, 2, 2), torch.ones(1, 2, 2))


def test_box_energy_rejects_channel_maps():
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        box_energy(torch.ones(1, 3, 4, 4), torch.tensor([[0.0, 0.0, 2.0, 2.0]]))


# ---- pointing game ----------------------------------------------------------


def test_pointing_game_hit_and_miss():
    maps = torch.zeros(2, 4, 4)
    maps[0, 1, 1] = 2.0
    maps[1, 3, 3] = -2.0  # the absolute value counts
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]])
    result = pointing_game(maps, boxes)
    assert result["hit"].tolist() == [True, False]
    assert result["valid"].tolist() == [True, True]


def test_pointing_game_ties_first_in_row_major_order():
    maps = torch.zeros(2, 3, 3)
    maps[:, 0, 2] = 1.0
    maps[:, 2, 0] = 1.0
    masks = torch.zeros(2, 3, 3, dtype=torch.bool)
    masks[0, 0, 2] = True  # the first maximum in row-major order
    masks[1, 2, 0] = True  # the second maximum
    result = pointing_game(maps, masks)
    assert result["hit"].tolist() == [True, False]


def test_pointing_game_zero_map_and_empty_region_invalid():
    maps = torch.zeros(2, 3, 3)
    maps[1, 1, 1] = 1.0
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    result = pointing_game(maps, boxes)
    assert result["valid"].tolist() == [False, False]
    assert result["hit"].tolist() == [False, False]


# ---- deletion ---------------------------------------------------------------


def test_deletion_removes_pixel_in_all_channels():
    model = OnePixelModel(row=1, col=2, weight=5.0)
    inputs = torch.ones(1, 3, 4, 4)
    maps = torch.arange(16.0).view(1, 4, 4) / 100
    maps[0, 1, 2] = 1.0  # the dominant pixel ranks first under MoRF
    # int(16 * 0.0625) = 1 pixel deleted.
    result = deletion_scores(model, inputs, maps, torch.tensor([1]), ratios=(0.0, 0.0625))

    p_original = _sigmoid(15.0)  # logit 1 is 5 * (1 + 1 + 1)
    assert result["valid"].tolist() == [True]
    assert result["probability"][0].tolist() == pytest.approx([p_original, 0.5])
    assert result["aopc"][0].tolist() == pytest.approx([0.0, p_original - 0.5])
    assert result["lodds"][0, 1].item() == pytest.approx(math.log(0.5 / (p_original + 1e-10)))
    assert result["lodds"][0, 0].item() == pytest.approx(0.0, abs=1e-6)
    # After deletion both logits are 0; argmax returns the first index, class 0.
    assert result["accuracy"][0].tolist() == [1.0, 0.0]
    assert result["fracdiff"][0].tolist() == pytest.approx([0.0, p_original - 0.5])


def test_deletion_morf_and_lerf_delete_opposite_ends():
    model = RecordingModel()
    inputs = torch.randn(1, 3, 2, 4) + 5.0  # no pixel is zero before deletion
    maps = torch.tensor([[[0.9, 0.1, 0.5, 0.3], [0.8, 0.2, 0.7, 0.4]]])
    for order, expected in (("morf", {0, 4, 6}), ("lerf", {1, 5, 3})):
        model.batches.clear()
        deletion_scores(model, inputs, maps, torch.tensor([0]), ratios=(0.375,), order=order)
        perturbed = torch.cat(model.batches)[1]  # row 0 is the unmodified input
        zero_pixels = (perturbed == 0).all(dim=0).flatten().nonzero().flatten().tolist()
        assert set(zero_pixels) == expected, order
        assert ((perturbed == 0).any(dim=0) == (perturbed == 0).all(dim=0)).all(), order


def test_deletion_ties_follow_pixel_index_order():
    model = RecordingModel()
    inputs = torch.ones(1, 3, 3, 3)
    maps = torch.tensor([[[2.0, 1.0, 2.0], [1.0, 2.0, 1.0], [2.0, 1.0, 2.0]]])
    for order, expected in (("morf", [0, 2, 4]), ("lerf", [1, 3, 5])):
        model.batches.clear()
        deletion_scores(model, inputs, maps, torch.tensor([0]), ratios=(0.34,), order=order)
        perturbed = torch.cat(model.batches)[1]
        zero_pixels = (perturbed[0] == 0).flatten().nonzero().flatten().tolist()
        assert zero_pixels == expected, order


def test_deletion_constant_maps_invalid_but_scored():
    model = OnePixelModel(row=0, col=0)
    inputs = torch.ones(2, 3, 3, 3)
    maps = torch.zeros(2, 3, 3)
    maps[1] = 0.4
    result = deletion_scores(model, inputs, maps, torch.tensor([1, 1]), ratios=(0.0, 0.2, 0.5))
    assert result["valid"].tolist() == [False, False]
    for key in ("aopc", "lodds", "accuracy", "fracdiff"):
        assert result[key].shape == (2, 3), key
        assert torch.isfinite(result[key]).all(), key
    # Index order deletes pixel (0, 0) first, so both images score alike.
    assert torch.equal(result["aopc"][0], result["aopc"][1])


def test_deletion_chunking_does_not_change_scores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    inputs = torch.randn(3, 3, 6, 6)
    maps = torch.rand(3, 6, 6)
    labels = torch.tensor([0, 3, 4])
    whole = deletion_scores(model, inputs, maps, labels, batch_size=100)
    chunked = deletion_scores(model, inputs, maps, labels, batch_size=4)
    for key in ("aopc", "lodds", "accuracy", "fracdiff"):
        assert torch.allclose(whole[key], chunked[key], atol=1e-6), key
    assert whole["aopc"].shape == (3, 6)


def test_deletion_restores_training_mode():
    model = OnePixelModel(row=0, col=0)
    model.train()
    deletion_scores(model, torch.ones(1, 3, 2, 2), torch.rand(1, 2, 2), torch.tensor([1]), ratios=(0.5,))
    assert model.training


def test_deletion_rejects_bad_arguments():
    model = OnePixelModel(row=0, col=0)
    inputs, maps, labels = torch.ones(1, 3, 2, 2), torch.rand(1, 2, 2), torch.tensor([1])
    with pytest.raises(ValueError, match="order"):
        deletion_scores(model, inputs, maps, labels, order="random")
    with pytest.raises(ValueError, match="ratios"):
        deletion_scores(model, inputs, maps, labels, ratios=(0.1, 1.5))
    with pytest.raises(ValueError, match="labels"):
        deletion_scores(model, inputs, maps, torch.tensor([2]))
    with pytest.raises(ValueError, match="does not match"):
        deletion_scores(model, inputs, torch.rand(1, 3, 3), labels)


# ---- summarize and registry -------------------------------------------------


def test_summarize_matches_t_interval():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, math.nan])
    valid = torch.tensor([True, True, True, True, False])
    mean, low, high, count = summarize(values, valid)
    # t_{0.975, 3} = 3.182446; sd = sqrt(5/3); se = sd / 2.
    half_width = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert count == 4
    assert mean == pytest.approx(2.5)
    assert low == pytest.approx(2.5 - half_width)
    assert high == pytest.approx(2.5 + half_width)


def test_summarize_small_counts():
    nothing = summarize(np.array([math.nan]), np.array([False]))
    assert math.isnan(nothing[0])
    assert nothing[3] == 0
    single = summarize(np.array([0.7]))
    assert single[0] == pytest.approx(0.7)
    assert math.isnan(single[1])
    assert single[3] == 1


def test_summarize_rejects_nan_flagged_valid():
    with pytest.raises(ValueError, match="flagged valid"):
        summarize(np.array([1.0, math.nan]), np.array([True, True]))


def test_metrics_registry_names():
    assert set(METRICS) == {"box_energy", "mask_energy", "pointing_game", "deletion"}
