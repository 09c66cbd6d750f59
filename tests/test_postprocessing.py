"""Post-processing rules on hand-made masks: the reference clean-up (against segment_anything's own
function) and the largest 3D component."""
from __future__ import annotations

import numpy as np
import pytest
from segment_anything.utils.amg import remove_small_regions

from desam_pipeline.inference.postprocessing import paper_min_area, postprocess


def test_none_only_binarises():
    mask = np.zeros((6, 5, 3), dtype=np.float32)
    mask[1, 1, 1] = 1
    mask[4, 2, 0] = 3
    out = postprocess(mask, "none")
    assert out.dtype == np.uint8 and out.shape == mask.shape
    assert np.array_equal(out, (mask > 0).astype(np.uint8))


def reference_clean(slice2d: np.ndarray, min_area: float) -> np.ndarray:
    """The reference's clean-up of one mask, called straight from segment_anything."""
    mask, _ = remove_small_regions(slice2d > 0, min_area, mode="holes")
    mask, _ = remove_small_regions(mask, min_area, mode="islands")
    return mask


def test_paper_fills_holes_and_drops_islands_per_slice():
    # 128x128 slices: the 1000 px reference threshold at 256x256 becomes 250 px.
    assert paper_min_area((128, 128)) == pytest.approx(250.0)
    mask = np.zeros((128, 128, 2), dtype=np.uint8)
    mask[10:40, 10:40, 0] = 1          # 900 px square ...
    mask[20:25, 20:25, 0] = 0          # ... with a 25 px hole: filled
    mask[50:80, 50:80, 0] = 1          # 900 px square ...
    mask[55:75, 55:75, 0] = 0          # ... with a 400 px hole: too big, stays open
    mask[100:115, 100:115, 0] = 1      # 225 px island: under 250, dropped
    mask[100:110, 10:20, 0] = 1        # 100 px ...
    mask[110:120, 20:30, 0] = 1        # ... + 100 px touching only by a corner: one 8-connected 200 px island, dropped
    mask[60:70, 60:70, 1] = 1          # the only island of its slice, 100 px: every region is small, the largest stays
    mask[20:24, 20:24, 1] = 1          # 16 px, dropped
    out = postprocess(mask, "paper")
    expected = np.zeros_like(mask)
    expected[10:40, 10:40, 0] = 1
    expected[50:80, 50:80, 0] = 1
    expected[55:75, 55:75, 0] = 0
    expected[60:70, 60:70, 1] = 1
    assert np.array_equal(out, expected)
    for k in range(mask.shape[2]):
        assert np.array_equal(out[:, :, k], reference_clean(mask[:, :, k], 250.0))


def test_paper_threshold_follows_the_slice_axis():
    # Slices along axis 0 are 64x64 (threshold 62.5 px): a 64 px blob stays, a 49 px blob beside it goes,
    # a lone 49 px blob stays (the largest of all-small regions), a 49 px hole is filled, a 64 px one is not.
    mask = np.zeros((3, 64, 64), dtype=np.uint8)
    mask[0, 0:8, 0:8] = 1
    mask[0, 20:27, 20:27] = 1
    mask[1, 0:7, 0:7] = 1
    mask[2, 10:30, 10:30] = 1
    mask[2, 12:19, 12:19] = 0
    mask[2, 20:28, 20:28] = 0
    out = postprocess(mask, "paper", slice_axis=0)
    assert out[0].sum() == 64 and out[0, 0:8, 0:8].all()
    assert out[1].sum() == 49
    assert out[2].sum() == 400 - 64 and not out[2, 20:28, 20:28].any()
    for k in range(mask.shape[0]):
        assert np.array_equal(out[k], reference_clean(mask[k], paper_min_area((64, 64))))


def test_largest_keeps_one_3d_component_with_diagonal_contacts():
    mask = np.zeros((10, 10, 4), dtype=np.uint8)
    mask[1:4, 1:4, 0:2] = 1            # 18 voxels
    mask[4, 4, 2] = 1                  # touches the block only by a corner: same component
    mask[7:10, 7:10, 3] = 1            # 9 voxels, separate
    out = postprocess(mask, "largest")
    expected = np.zeros_like(mask)
    expected[1:4, 1:4, 0:2] = 1
    expected[4, 4, 2] = 1
    assert np.array_equal(out, expected)
    assert postprocess(np.zeros((3, 3, 3)), "largest").sum() == 0


def test_largest_keeps_every_component_of_the_largest_size():
    mask = np.zeros((10, 10, 4), dtype=np.uint8)
    mask[0:2, 0:2, 0] = 1              # 4 voxels
    mask[6:8, 6:8, 3] = 1              # 4 voxels: a tie, kept too (nnU-Net's rule, no scan-order choice)
    mask[4, 0, 0] = 1                  # 1 voxel, dropped
    out = postprocess(mask, "largest")
    assert out.sum() == 8 and out[4, 0, 0] == 0 and out[0, 0, 0] == 1 and out[7, 7, 3] == 1


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown post-processing"):
        postprocess(np.zeros((2, 2, 2)), "median")


def test_min_size_drops_components_under_a_millilitre_whatever_the_voxel_size():
    mask = np.zeros((40, 40, 10), np.uint8)
    mask[2:12, 2:12, 0:5] = 1    # 500 voxels
    mask[20:30, 20:30, 0:2] = 1  # 200 voxels
    kept = postprocess(mask, "min_size", spacing=(1.0, 1.0, 3.0))   # 1.5 ml and 0.6 ml
    assert kept[5, 5, 2] and not kept[25, 25, 0]
    small_voxels = postprocess(mask, "min_size", spacing=(0.5, 0.5, 3.0))  # 0.375 ml and 0.15 ml
    assert not small_voxels.any()


def test_fill_closes_holes_per_slice_not_across_slices():
    mask = np.zeros((9, 9, 3), np.uint8)
    mask[2:7, 2:7, :] = 1
    mask[4, 4, 1] = 0            # a hole inside slice 1
    assert postprocess(mask, "fill")[4, 4, 1] == 1
    open_cup = np.zeros((9, 9, 3), np.uint8)
    open_cup[2:7, 2:7, 1:] = 1
    open_cup[3:6, 3:6, 2] = 0    # hollow in the last slice, open to the volume's top: a 3D cup, a 2D hole
    assert postprocess(open_cup, "fill")[4, 4, 2] == 1
    edge = np.zeros((9, 9, 3), np.uint8)
    edge[0:5, 0:5, :] = 1
    edge[0:3, 0:3, 1] = 0        # a notch open to the slice border is not a hole
    assert postprocess(edge, "fill")[1, 1, 1] == 0


def test_steps_run_in_order_largest_then_fill():
    mask = np.zeros((12, 12, 3), np.uint8)
    mask[1:8, 1:8, :] = 1
    mask[4, 4, :] = 0           # a hole through every slice
    mask[10, 10, 0] = 1         # a stray voxel
    out = postprocess(mask, "largest+fill")
    assert out[4, 4, :].all() and out[10, 10, 0] == 0
    assert postprocess(mask, "min_size+fill", spacing=(3.0, 3.0, 3.0))[10, 10, 0] == 0
