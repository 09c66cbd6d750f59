"""The plan's in-plane rule: `resize` (every slice to the slice size, the reference's, bit for bit what
desam did before the rule existed) and `spacing` (every slice resampled to the plan's mm per pixel and
centred on the canvas), the way back to the volume's grid, the grid's spacing and affine, and how the
planner picks the spacing from the source sites only."""
from __future__ import annotations

import numpy as np
import pytest

from desam_pipeline.data.orientation import from_slices, plan_orientation
from desam_pipeline.data.preprocessing import (from_frame, grid_affine, grid_spacing, intensity_to_uint8,
                                               preprocess_label, preprocess_volume, resize_image_slices,
                                               resize_label_slices, slice_frame, to_frame)
from desam_pipeline.data.slice_grid import slice_grid_affine, slice_grid_spacing
from desam_pipeline.utilities.errors import DesamError
from plans.planner import in_plane_choice

INTENSITY = {"low_percentile": 0.5, "high_percentile": 99.5}


def plan(rule: dict | None = None, orientation: str = "simpleitk") -> dict:
    base = {"slice_axis": 2, "slice_size": 256, "slice_orientation": orientation, "intensity": INTENSITY}
    return base if rule is None else base | {"in_plane": rule}


def volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 30, shape).astype(np.float32)


@pytest.mark.parametrize("orientation", ["simpleitk", "nibabel"])
def test_resize_rule_and_a_plan_without_the_field_are_the_plain_resize(orientation):
    image, label = volume((120, 90, 3)), np.zeros((120, 90, 3), np.uint8)
    label[30:70, 20:50, 1] = 1
    legacy, explicit = plan(None, orientation), plan({"rule": "resize"}, orientation)
    slices = preprocess_volume(image, legacy, (0.7, 0.9, 3.0))
    assert np.array_equal(slices, preprocess_volume(image, explicit, (0.3, 0.3, 1.0)))  # spacing plays no part
    transposed = (lambda v: np.transpose(v, (2, 1, 0))) if orientation == "simpleitk" else (
        lambda v: np.moveaxis(v, 2, 0))
    assert np.array_equal(slices, resize_image_slices(transposed(intensity_to_uint8(image))))
    assert np.array_equal(preprocess_label(label, legacy), resize_label_slices(transposed(label)))


def test_spacing_rule_places_the_slice_at_the_planned_scale_and_comes_back():
    rule = {"rule": "spacing", "spacing_mm": 1.0}
    frame = slice_frame((200, 100), (0.5, 2.0), plan(rule))   # 100 mm x 200 mm
    assert frame.resized == (100, 200) and frame.offset == (78, 28)
    probabilities = np.zeros((1, 256, 256), np.float32)
    probabilities[0, 78:178, 28:228] = 1.0                   # exactly where the slice landed
    back = from_frame(probabilities, frame, (200, 100))
    assert back.shape == (1, 200, 100) and np.allclose(back, 1.0)
    wide = slice_frame((400, 400), (1.0, 1.0), plan(rule))   # 400 mm: cropped to the central 256 mm
    assert wide.offset == (-72, -72)
    ones = to_frame(np.full((1, 400, 400), 255, np.uint8), wide)
    assert (ones == 255).all()
    back = from_frame(np.ones((1, 256, 256), np.float32), wide, (400, 400))
    assert back[0, 200, 200] == 1.0 and back[0, 10, 10] == 0.0  # outside the canvas: background


def test_spacing_rule_shows_every_site_at_the_same_scale():
    """Two volumes of one 40 mm disc, sampled at 0.5 and 0.25 mm: the same disc on the canvas."""
    rule = plan({"rule": "spacing", "spacing_mm": 0.5}, "nibabel")
    discs = []
    for pixel in (0.5, 0.25):
        n = int(round(128 / pixel))
        yy, xx = np.mgrid[:n, :n] * pixel - 64 + pixel / 2
        label = (np.hypot(yy, xx) < 20).astype(np.uint8)[:, :, None]
        discs.append(preprocess_label(label, rule, (pixel, pixel, 3.0))[0])
    assert abs(int(discs[0].sum()) - int(discs[1].sum())) < 0.02 * discs[0].sum()
    assert (discs[0] != discs[1]).sum() < 0.05 * discs[0].sum()


@pytest.mark.parametrize("orientation", ["simpleitk", "nibabel"])
def test_grid_spacing_and_affine_put_the_canvas_where_the_volume_is(orientation):
    affine = np.array([[0.5, 0, 0, 10.0], [0, 2.0, 0, -20.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])
    shape, spacing = (200, 100, 4), (0.5, 2.0, 3.0)
    resized = plan({"rule": "resize"}, orientation)
    assert np.allclose(grid_affine(affine, shape, spacing, resized), slice_grid_affine(affine, shape, 2, 256))
    assert np.allclose(np.roll(grid_spacing(shape, spacing, resized), 1), slice_grid_spacing(spacing, shape, 2, 256))
    spaced = plan({"rule": "spacing", "spacing_mm": 1.0}, orientation)
    assert grid_spacing(shape, spacing, spaced) == pytest.approx((1.0, 1.0, 3.0))
    label = np.zeros(shape, np.uint8)
    label[120:160, 10:30, 1:3] = 1                    # off centre, so a wrong offset or swap shows
    canvas = from_slices(preprocess_label(label, spaced, spacing), 2, plan_orientation(spaced))
    assert canvas.shape == (256, 256, 4) and canvas.any()
    world = lambda a, mask: (a @ np.append(np.argwhere(mask).mean(0), 1.0))[:3]  # noqa: E731
    assert np.allclose(world(grid_affine(affine, shape, spacing, spaced), canvas), world(affine, label), atol=0.6)


def test_planner_takes_the_median_source_field_of_view():
    fingerprint = {"cases": {
        "A0": {"spacing": [0.625, 0.625, 3.0], "shape": [384, 384, 20], "domain": "RUNMC"},   # 240 mm
        "A1": {"spacing": [0.5, 0.5, 3.0], "shape": [512, 400, 20], "domain": "RUNMC"},       # 256 mm
        "A2": {"spacing": [0.6, 0.6, 3.0], "shape": [300, 300, 20], "domain": "RUNMC"},       # 180 mm
        "B0": {"spacing": [0.25, 0.25, 3.0], "shape": [512, 512, 20], "domain": "BIDMC"}}}   # not planned on
    choice = in_plane_choice("spacing", fingerprint, ["A0", "A1", "A2"], 2, 256)
    assert choice == {"rule": "spacing", "spacing_mm": round(240 / 256, 4), "planned_on": ["RUNMC"]}
    assert in_plane_choice("resize", fingerprint, ["A0"], 2, 256) == {"rule": "resize"}
    with pytest.raises(DesamError, match="unknown in-plane rule 'zoom'"):
        in_plane_choice("zoom", fingerprint, ["A0"], 2, 256)
