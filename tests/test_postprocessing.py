"""Post-processing rules on hand-made masks: hole filling, scaled island removal, largest 3D component."""
from __future__ import annotations

import numpy as np
import pytest

from desam_pipeline.postprocessing import paper_min_area, postprocess


def test_none_only_binarises():
    mask = np.zeros((6, 5, 3), dtype=np.float32)
    mask[1, 1, 1] = 1
    mask[4, 2, 0] = 3
    out = postprocess(mask, "none")
    assert out.dtype == np.uint8 and out.shape == mask.shape
    assert np.array_equal(out, (mask > 0).astype(np.uint8))


def test_paper_fills_holes_and_drops_islands_per_slice():
    # 128x128 slices: the 1000 px reference threshold at 256x256 becomes 250 px.
    assert paper_min_area((128, 128)) == pytest.approx(250.0)
    mask = np.zeros((128, 128, 2), dtype=np.uint8)
    mask[10:40, 10:40, 0] = 1          # 900 px square ...
    mask[20:25, 20:25, 0] = 0          # ... with a 25 px hole
    mask[80:95, 80:95, 0] = 1          # 225 px island: under 250, dropped
    mask[60:76, 60:76, 1] = 1          # 256 px island on the other slice: kept
    out = postprocess(mask, "paper")
    expected = np.zeros_like(mask)
    expected[10:40, 10:40, 0] = 1
    expected[60:76, 60:76, 1] = 1
    assert np.array_equal(out, expected)


def test_paper_threshold_follows_the_slice_axis():
    # Slices along axis 0 are 64x64 (threshold 62.5 px): a 64 px blob stays, a 49 px blob goes.
    mask = np.zeros((2, 64, 64), dtype=np.uint8)
    mask[0, 0:8, 0:8] = 1
    mask[1, 0:7, 0:7] = 1
    out = postprocess(mask, "paper", slice_axis=0)
    assert out[0].sum() == 64 and out[1].sum() == 0


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
