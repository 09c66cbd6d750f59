"""Slice orientation: SAM sees each slice as the reference does (a SimpleITK-read array), and the way back
restores the input geometry exactly."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from desam_pipeline.data.orientation import from_slices, in_plane_shape, plan_orientation, to_slices
from desam_pipeline.data.plan_io import DEFAULT_CHOICES, plan_hash
from desam_pipeline.data.preprocessing import (intensity_to_uint8, preprocess_label, preprocess_volume,
                                               resize_image_slices, resize_label_slices)
from desam_pipeline.io.nifti_io import read_volume
from desam_pipeline.network.sam_models import build_sam
from plans.planner import make_plan


@pytest.fixture()
def nifti(tmp_path):
    """A 40 x 24 x 5 volume whose every voxel differs, and an off-diagonal label, as NIfTI files."""
    rng = np.random.default_rng(0)
    volume = rng.uniform(1, 1000, (40, 24, 5)).astype(np.float32)
    label = np.zeros((40, 24, 5), np.uint8)
    label[30:38, 2:9, 1:4] = 1
    affine = np.diag([0.7, 1.3, 3.0, 1.0])
    paths = tmp_path / "image.nii.gz", tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), str(paths[0]))
    nib.save(nib.Nifti1Image(label, affine), str(paths[1]))
    return paths


def test_slices_match_a_simpleitk_read_array(nifti):
    image_path, label_path = nifti
    volume, _ = read_volume(image_path)
    label, _ = read_volume(label_path)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path)))          # (z, y, x)
    reference_label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    assert reference.shape == (5, 24, 40)
    plan = dict(DEFAULT_CHOICES)
    assert plan_orientation(plan) == "simpleitk"
    assert np.array_equal(to_slices(volume, 2, "simpleitk"), reference)
    ours = preprocess_volume(volume, plan)
    theirs = resize_image_slices(intensity_to_uint8(reference), 256)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(preprocess_label(label, plan), resize_label_slices(reference_label, 256))
    # the old array order is the transpose, and differs
    legacy = preprocess_volume(volume, plan | {"slice_orientation": "nibabel"})
    assert np.array_equal(legacy, resize_image_slices(intensity_to_uint8(reference).swapaxes(1, 2), 256))
    assert not np.array_equal(legacy, ours)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("orientation", ["simpleitk", "nibabel"])
def test_back_to_the_input_geometry(axis, orientation):
    volume = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    slices = to_slices(volume, axis, orientation)
    assert slices.shape[1:] == in_plane_shape(volume.shape, axis, orientation)
    assert np.array_equal(from_slices(slices, axis, orientation), volume)


def test_orientation_is_a_hashed_plan_field():
    encoder = build_sam("tiny", seed=0).image_encoder
    new = make_plan("p", "tiny", "x.pth", "0" * 64, encoder)
    old = make_plan("p", "tiny", "x.pth", "0" * 64, encoder, slice_orientation="nibabel")
    assert new["slice_orientation"] == "simpleitk" and plan_hash(new) != plan_hash(old)
    legacy = {k: v for k, v in old.items() if k != "slice_orientation"}
    assert plan_orientation(legacy) == "nibabel"  # a plan written before the field keeps its slices
    assert make_plan("p", "tiny", "x.pth", "0" * 64, encoder, base=legacy)["slice_orientation"] == "simpleitk"
