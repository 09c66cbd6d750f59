"""Metrics against MedPy and an independent nearest-neighbour computation; empty and geometry conventions."""
from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
from medpy.metric import binary as medpy_binary
from scipy.ndimage import generate_binary_structure
from scipy.spatial import cKDTree

from desam_pipeline.utilities.errors import DesamError
from desam_pipeline.utilities.metrics import (bounding_box, check_same_geometry, compute_metrics, dice, hd95, surface,
                                              surface_distances)

SPACINGS = [(0.5, 0.5, 3.0), (0.8, 1.3, 2.2), (1.0, 1.0, 1.0)]


def ellipsoids(shape, centres, radii) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    mask = np.zeros(shape, bool)
    for centre, radius in zip(centres, radii):
        mask |= sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius)) <= 1
    return mask


def random_pair(seed: int, shape=(48, 40, 12), touch_border: bool = False):
    """A reference of 2-4 ellipsoids and a prediction of jittered ones plus a stray component."""
    rng = np.random.default_rng(seed)
    count = int(rng.integers(2, 5))
    centres = rng.uniform([4, 4, 2], [s - 4 for s in shape[:2]] + [shape[2] - 2], size=(count, 3))
    if touch_border:
        centres[0] = [0.5, rng.uniform(0, shape[1]), shape[2] - 1]
    radii = rng.uniform([3, 3, 1.2], [9, 9, 3.5], size=(count, 3))
    reference = ellipsoids(shape, centres, radii)
    moved = centres + rng.normal(0, 1.5, size=centres.shape) * [1, 1, 0.5]
    prediction = ellipsoids(shape, moved[1:], radii[1:] * rng.uniform(0.8, 1.2, size=(count - 1, 3)))
    prediction |= ellipsoids(shape, [rng.uniform([0, 0, 0], shape)], [(2.5, 2.0, 1.0)])
    return reference, prediction


def kdtree_distances(reference, prediction, spacing):
    """Directed surface distances by brute nearest neighbour on voxel centres in mm (no EDT, no crop)."""
    points = [np.argwhere(surface(m)) * np.asarray(spacing) for m in (reference, prediction)]
    to_reference = cKDTree(points[0]).query(points[1])[0]
    to_prediction = cKDTree(points[1]).query(points[0])[0]
    return to_reference, to_prediction


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_matches_medpy(seed, spacing):
    reference, prediction = random_pair(seed, touch_border=seed % 2 == 1)
    assert reference.any() and prediction.any() and not np.array_equal(reference, prediction)
    got = compute_metrics(reference, prediction, spacing)
    assert got["dice"] == pytest.approx(medpy_binary.dc(prediction, reference), abs=1e-6)
    assert got["hd95"] == pytest.approx(medpy_binary.hd95(prediction, reference, voxelspacing=spacing), abs=1e-6)
    assert got["assd"] == pytest.approx(medpy_binary.assd(prediction, reference, voxelspacing=spacing), abs=1e-6)
    assert hd95(reference, prediction, spacing) == got["hd95"]
    assert dice(reference, prediction) == got["dice"]


@pytest.mark.parametrize("seed", range(3))
def test_several_components_and_border_are_exercised(seed):
    """The random shapes really have several components and touch the border (else the test above proves less)."""
    from scipy.ndimage import label

    reference, prediction = random_pair(seed, touch_border=True)
    assert label(prediction)[1] >= 2
    assert reference[0].any() or reference[:, :, -1].any()


@pytest.mark.parametrize("seed", range(4))
def test_crop_changes_nothing(seed):
    """Distances on the bounding-box crop equal those on the whole volume, incl. masks touching the border."""
    shape = (40, 36, 10)
    reference, prediction = random_pair(seed, shape, touch_border=True)
    spacing = (0.7, 0.9, 2.5)
    cropped = surface_distances(reference, prediction, spacing, crop=True)
    whole = surface_distances(reference, prediction, spacing, crop=False)
    for a, b in zip(cropped, whole):
        np.testing.assert_allclose(np.sort(a), np.sort(b), rtol=0, atol=1e-12)
    box = bounding_box(reference | prediction)
    assert any(s.start > 0 or s.stop < n for s, n in zip(box, shape)), "crop should be smaller than the volume"


def test_small_masks_far_from_border_crop_margin():
    """Tiny masks deep inside a large volume: the crop is tiny and the distances still exact."""
    shape = (60, 60, 20)
    reference = np.zeros(shape, bool)
    prediction = np.zeros(shape, bool)
    reference[20:23, 30:32, 8:10] = True
    prediction[25, 31, 12] = True
    spacing = (0.6, 0.6, 3.0)
    got = compute_metrics(reference, prediction, spacing)
    assert got["hd95"] == pytest.approx(medpy_binary.hd95(prediction, reference, voxelspacing=spacing), abs=1e-9)
    box = bounding_box(reference | prediction)
    assert [s.stop - s.start for s in box] == [8, 4, 7]


@pytest.mark.parametrize("tolerance", [0.5, 1.0, 2.5])
def test_nsd_and_distances_against_nearest_neighbours(tolerance):
    reference, prediction = random_pair(11, touch_border=True)
    spacing = (0.6, 0.9, 2.0)
    to_reference, to_prediction = kdtree_distances(reference, prediction, spacing)
    distances = np.concatenate([to_reference, to_prediction])
    got = compute_metrics(reference, prediction, spacing, nsd_tolerance=tolerance)
    assert got["nsd"] == pytest.approx(np.count_nonzero(distances <= tolerance + 1e-9) / distances.size, abs=1e-12)
    assert got["hd95"] == pytest.approx(np.percentile(distances, 95), abs=1e-9)
    assert got["assd"] == pytest.approx(distances.mean(), abs=1e-9)
    assert 0.0 < got["nsd"] < 1.0


def test_surface_uses_face_connectivity():
    """A 3x3x3 cube: 6-connected erosion keeps only the centre, so 26 surface voxels."""
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    assert surface(cube).sum() == 26
    assert not surface(cube)[2, 2, 2]
    assert generate_binary_structure(3, 1).sum() == 7


def test_identical_masks():
    reference, _ = random_pair(3)
    got = compute_metrics(reference, reference.copy(), (0.5, 0.5, 3.0))
    assert got == {"dice": 1.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0}


def test_empty_conventions():
    empty = np.zeros((10, 10, 4), bool)
    full = empty.copy()
    full[3:6, 3:6, 1:3] = True
    assert compute_metrics(empty, empty, (1, 1, 1)) == {"dice": 1.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0}
    for reference, prediction in ((empty, full), (full, empty)):
        got = compute_metrics(reference, prediction, (1, 1, 1))
        assert got["dice"] == 0.0 and got["nsd"] == 0.0
        assert math.isnan(got["hd95"]) and math.isnan(got["assd"])
        assert math.isnan(hd95(reference, prediction, (1, 1, 1)))
    assert hd95(empty, empty, (1, 1, 1)) == 0.0
    assert dice(empty, empty) == 1.0


def test_non_bool_inputs_and_bad_arguments():
    reference, prediction = random_pair(5)
    as_int = compute_metrics(reference.astype(np.uint8) * 3, prediction.astype(np.int16), (1, 1, 2))
    assert as_int == compute_metrics(reference, prediction, (1, 1, 2))
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(reference, prediction[:-1], (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        compute_metrics(reference, prediction, (1, 1))
    with pytest.raises(ValueError, match="spacing"):
        compute_metrics(reference, prediction, (1, 0, 1))


def test_geometry_check_names_both_files():
    affine = np.diag([0.5, 0.5, 3.0, 1.0])
    reference = nib.Nifti1Image(np.zeros((8, 8, 4), np.uint8), affine)
    check_same_geometry(reference, nib.Nifti1Image(np.zeros((8, 8, 4), np.uint8), affine + 5e-5), "r.nii.gz", "p.nii.gz")
    shifted = affine.copy()
    shifted[0, 3] = 0.01
    with pytest.raises(DesamError, match=r"pred/c1\.nii\.gz: affine differs from reference ref/c1\.nii\.gz"):
        check_same_geometry(reference, nib.Nifti1Image(np.zeros((8, 8, 4), np.uint8), shifted),
                            "ref/c1.nii.gz", "pred/c1.nii.gz")
    with pytest.raises(DesamError, match=r"pred/c1\.nii\.gz: shape \(8, 8, 5\) differs from reference ref/c1\.nii\.gz"):
        check_same_geometry(reference, nib.Nifti1Image(np.zeros((8, 8, 5), np.uint8), affine),
                            "ref/c1.nii.gz", "pred/c1.nii.gz")
