"""Training prompts (sampling statistics, frame convention, grid) and the loss on hand-made cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from segment_anything.utils.amg import build_point_grid

from desam_pipeline.data.prompts import grid_points, pixel_to_frame, sample_training_points, whole_box
from desam_pipeline.training.losses import LOSS_WEIGHTS, desam_loss, soft_dice_loss, squared_dice_loss


def _to_pixels(coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Invert x = c * 4, y = r * 4; the result must be whole pixel indices."""
    cols = coords[..., 0] / 4
    rows = coords[..., 1] / 4
    assert np.array_equal(cols, np.round(cols)) and np.array_equal(rows, np.round(rows))
    return rows.astype(int), cols.astype(int)


def _labels(batch: int, rng: np.random.Generator) -> np.ndarray:
    """Random rectangles of foreground of varying size, one per slice."""
    labels = np.zeros((batch, 256, 256), np.uint8)
    for b in range(batch):
        r0, c0 = rng.integers(0, 200, 2)
        h, w = rng.integers(1, 56, 2)
        labels[b, r0:r0 + h, c0:c0 + w] = 1
    return labels


def test_training_point_convention():
    # the reference's (4 col, 4 row): ProstateDataset's x_indices * image_scale, y_indices * image_scale
    assert pixel_to_frame(0, 0, 1024).tolist() == [0.0, 0.0]
    assert pixel_to_frame(255, 255, 1024).tolist() == [1020.0, 1020.0]
    assert pixel_to_frame(np.array([10]), np.array([3]), 1024).tolist() == [[12.0, 40.0]]  # (x, y) = (col, row)
    assert pixel_to_frame(np.array([10]), np.array([3]), 256).tolist() == [[3.0, 10.0]]  # LiteMedSAM's frame


@pytest.mark.parametrize("probability", [0.5, 0.8])
def test_points_are_drawn_from_the_right_class_at_the_asked_rate(probability):
    rng = np.random.default_rng(0)
    labels = _labels(500, rng)
    targets = []
    for _ in range(8):
        coords, point_labels, iou_target = sample_training_points(labels, rng, probability, frame=1024)
        assert coords.shape == (500, 1, 2) and coords.dtype == np.float32
        assert point_labels.shape == (500, 1) and (point_labels == 1).all()
        assert iou_target.dtype == np.float32 and set(np.unique(iou_target)) <= {0.0, 1.0}
        rows, cols = _to_pixels(coords[:, 0])
        on_object = labels[np.arange(500), rows, cols] > 0
        assert np.array_equal(on_object, iou_target == 1)
        targets.append(iou_target)
    rate = np.concatenate(targets).mean()  # 4000 draws: standard error 0.008
    assert abs(rate - probability) < 0.04


def test_points_are_uniform_within_the_class():
    labels = np.zeros((1000, 256, 256), np.uint8)
    labels[:, 100, 100:104] = 1  # four foreground pixels
    coords, _, iou_target = sample_training_points(labels, np.random.default_rng(1), foreground_probability=1.0, frame=1024)
    assert (iou_target == 1).all()
    rows, cols = _to_pixels(coords[:, 0])
    assert (rows == 100).all()
    counts = np.bincount(cols - 100, minlength=4)
    assert counts.sum() == 1000 and np.all(np.abs(counts - 250) < 60)  # 4.3 standard deviations


def test_slices_without_foreground_or_background():
    labels = np.zeros((50, 256, 256), np.uint8)
    labels[25:] = 1
    coords, _, iou_target = sample_training_points(labels, np.random.default_rng(2), frame=1024)
    assert (iou_target[:25] == 0).all() and (iou_target[25:] == 1).all()
    assert np.isfinite(coords).all() and coords.min() >= 2 and coords.max() <= 1022


def test_whole_box_and_grid():
    assert whole_box(3, 1024).tolist() == [[0, 0, 1024, 1024]] * 3 and whole_box(3, 256).dtype == np.float32
    for k in (1, 3, 9):
        grid = grid_points(k, 1024)
        assert grid.shape == (k * k, 2) and grid.dtype == np.float32
        np.testing.assert_allclose(grid, build_point_grid(k) * 1024, rtol=0, atol=1e-4)
    assert grid_points(2, 1024).tolist() == [[256, 256], [768, 256], [256, 768], [768, 768]]
    assert grid_points(2, 256).tolist() == [[64, 64], [192, 64], [64, 192], [192, 192]]  # LiteMedSAM's frame


def test_dice_is_per_sample_and_smooth():
    logits = torch.zeros(2, 1, 2, 2)  # probabilities 0.5 everywhere
    target = torch.tensor([[[[1.0, 0], [0, 0]]], [[[1.0, 1], [1, 1]]]])
    # sample 1: (2*0.5 + 1) / (2 + 1 + 1) = 0.5; sample 2: (2*2 + 1) / (2 + 4 + 1) = 5/7
    expected = 1 - (0.5 + 5 / 7) / 2
    assert soft_dice_loss(logits, target).item() == pytest.approx(expected, abs=1e-6)
    empty = torch.zeros(1, 1, 2, 2)
    assert soft_dice_loss(torch.full((1, 1, 2, 2), -30.0), empty).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_dice_loss(torch.zeros(1, 1, 2, 2), empty).item() == pytest.approx(1 - 1 / 3, abs=1e-6)


def test_paper_loss_on_hand_made_cases():
    """--loss paper: per-sample soft Dice (smoothing 1) + BCE + 10 x L1(IoU)."""
    logits = torch.tensor([[[[2.0, -1.0]]]], requires_grad=True)
    target = torch.tensor([[[1.0, 0.0]]])  # (B,H,W) is accepted as well as (B,1,H,W)
    p = [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))]
    dice = 1 - (2 * p[0] + 1) / (p[0] + p[1] + 1 + 1)
    bce = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))) / 2
    iou = abs(0.7 - 1.0)
    total, parts = desam_loss(logits, target, torch.tensor([[0.7]]), torch.tensor([1.0]), loss="paper")
    assert parts["dice"].item() == pytest.approx(dice, abs=1e-6)
    assert parts["bce"].item() == pytest.approx(bce, abs=1e-6)
    assert parts["iou"].item() == pytest.approx(iou, abs=1e-6)
    assert total.item() == pytest.approx(dice + bce + 10 * iou, abs=1e-5)
    total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert not parts["dice"].requires_grad

    weighted, _ = desam_loss(logits, target, torch.tensor([0.7]), torch.tensor([1.0]), weights=(2.0, 0.0, 1.0),
                             loss="paper")
    assert weighted.item() == pytest.approx(2 * dice + iou, abs=1e-5)
    box_mode, parts = desam_loss(logits, target, loss="paper")
    assert parts["iou"].item() == 0 and box_mode.item() == pytest.approx(dice + bce, abs=1e-6)


def test_reference_loss_is_squared_dice_plus_l1_iou():
    """The reference's MONAI 1.1.0 DiceCELoss(sigmoid, squared_pred) on one channel, by hand: squared
    denominator, smoothing 1e-5 top and bottom, per sample; its cross-entropy term is torch's
    CrossEntropyLoss over a single channel, which is 0 whatever the logits; IoU L1 weight 1."""
    logits = torch.tensor([[[[2.0, -1.0]]], [[[0.0, 0.0]]]], requires_grad=True)
    target = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]])
    p = [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))]
    first = (2 * p[0] + 1e-5) / (p[0] ** 2 + p[1] ** 2 + 1 + 1e-5)
    second = (2 * 1.0 + 1e-5) / (0.25 + 0.25 + 2 + 1e-5)
    dice = 1 - (first + second) / 2
    assert squared_dice_loss(logits, target).item() == pytest.approx(dice, abs=1e-6)
    assert torch.nn.CrossEntropyLoss()(logits, target).item() == 0.0   # the silent CE of one channel
    iou_pred, iou_target = torch.tensor([[0.7], [0.2]]), torch.tensor([1.0, 0.6])
    total, parts = desam_loss(logits, target, iou_pred, iou_target, LOSS_WEIGHTS["reference"], "reference")
    assert LOSS_WEIGHTS["reference"] == (1.0, 0.0, 1.0) and LOSS_WEIGHTS["paper"] == (1.0, 1.0, 10.0)
    assert parts["dice"].item() == pytest.approx(dice, abs=1e-6)
    assert total.item() == pytest.approx(dice + (0.3 + 0.4) / 2, abs=1e-5)
    paper, _ = desam_loss(logits, target, iou_pred, iou_target)
    assert paper.item() != pytest.approx(total.item(), abs=1e-3)
    with pytest.raises(ValueError, match="unknown loss"):
        desam_loss(logits, target, loss="monai")


def test_loss_of_an_empty_target_is_finite():
    total, parts = desam_loss(torch.full((2, 1, 8, 8), -30.0), torch.zeros(2, 8, 8))
    assert torch.isfinite(total) and total.item() < 1e-5


def _fp_gradient(loss: str) -> float:
    """Mean |d loss / d logit| over a 5,000-pixel false positive on an empty slice, batched with a slice
    whose object is predicted right."""
    target = torch.zeros(2, 1, 128, 128)
    target[0, 0, 30:90, 30:90] = 1
    logits = torch.full((2, 1, 128, 128), -8.0)
    logits[0, 0, 30:90, 30:90] = 8.0
    logits[1, 0, :50, :100] = 0.0  # 5,000 undecided false-positive pixels where nothing is
    logits.requires_grad_(True)
    total, _ = desam_loss(logits, target, weights=(1.0, 0.0, 0.0), loss=loss)
    total.backward()
    return float(logits.grad[1, 0, :50, :100].abs().mean())


def test_batch_dice_pushes_back_false_positives_on_an_empty_slice():
    # per sample, an empty target's Dice 1 - 1/(sum P + 1) is saturated: almost no gradient
    per_sample, pooled = _fp_gradient("paper"), _fp_gradient("batch")
    assert per_sample < 1e-7
    assert pooled > 100 * per_sample  # about 1,000x here


def test_batch_dice_pools_the_sums_over_the_batch():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logits = torch.logit(probs).reshape(2, 1, 1, 2)
    _, parts = desam_loss(logits, target.reshape(2, 1, 1, 2), weights=(1.0, 0.0, 0.0), loss="batch")
    expected = 1 - (2 * 0.9 + 1) / (probs.sum() + target.sum() + 1)
    assert float(parts["dice"]) == pytest.approx(float(expected), rel=1e-5)


def test_batch_loss_regresses_the_iou_with_squared_error():
    logits, target = torch.zeros(3, 1, 4, 4), torch.zeros(3, 1, 4, 4)
    iou_pred, iou_target = torch.tensor([0.2, 0.9, 0.5]), torch.tensor([0.0, 1.0, 1.0])
    _, batch_parts = desam_loss(logits, target, iou_pred, iou_target, loss="batch")
    _, paper_parts = desam_loss(logits, target, iou_pred, iou_target, loss="paper")
    assert float(batch_parts["iou"]) == pytest.approx((0.04 + 0.01 + 0.25) / 3)
    assert float(paper_parts["iou"]) == pytest.approx((0.2 + 0.1 + 0.5) / 3)
    assert LOSS_WEIGHTS["batch"] == (1.0, 1.0, 10.0)


def test_hard_negatives_fall_inside_the_footprint_at_the_asked_rate():
    """Clicks off the object are drawn inside `near` (the object's footprint) with `near_probability`, never on
    the object, and uniformly over the whole background otherwise (where the footprint is a small share)."""
    labels = np.zeros((2000, 256, 256), np.uint8)
    labels[1000:, 120:136, 120:136] = 1                      # half the slices show the object
    near = np.zeros_like(labels, dtype=bool)
    near[:, 110:146, 110:146] = True                         # where it lies in the case (its slices' union)
    rng = np.random.default_rng(3)
    coords, _, iou_target = sample_training_points(labels, rng, frame=1024, on_object=False, near=near,
                                                   near_probability=0.5)
    assert (iou_target == 0).all()
    rows, cols = _to_pixels(coords[:, 0])
    inside = near[np.arange(2000), rows, cols]
    assert (labels[np.arange(2000), rows, cols] == 0).all()
    share = near[0].sum() / near[0].size                    # 2% of a slice: what a uniform draw would give
    assert abs(inside.mean() - (0.5 + 0.5 * share)) < 0.04  # 2000 draws: standard error 0.011
    assert abs(inside[1000:].mean() - inside[:1000].mean()) < 0.08  # on empty slices and beside the object alike
    plain, _, _ = sample_training_points(labels, np.random.default_rng(3), frame=1024, on_object=False)
    rows, cols = _to_pixels(plain[:, 0])
    assert near[np.arange(2000), rows, cols].mean() < 0.05  # the uniform draw almost never clicks there
