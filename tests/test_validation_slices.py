"""The final validation's slice figures: what automatic mode does on the held-out case's empty slices."""
from __future__ import annotations

import numpy as np
import pytest

from desam_pipeline.inference.settings import PredictionSettings
from desam_pipeline.training.validation import (SLICE_FIGURES, SLICE_SCORES, closed_gate_warning, gate_calibration,
                                                 slice_figures, summarise)


def test_the_gate_passing_every_empty_slice_is_reported_even_when_pdmm_leaves_them_empty():
    """The demo model of 2026-12-05: every cached slice's best IoU about 0.99, so the gate passed all the empty
    slices, while PDMM drew nothing there (no false-positive slice): only the gate's pass rate shows it."""
    reference = np.array([False, True, True, False, False])
    predicted = reference.copy()
    best_iou = np.array([0.991, 0.997, 0.998, 0.993, 0.990])
    figures = slice_figures(reference, predicted, reference, best_iou, 0.5)
    assert figures == {"fp_slices_pct": 0.0, "gate_pass_empty_pct": 100.0, "gate_auc": 1.0}
    gated = slice_figures(reference, predicted | np.array([True, False, False, False, False]), reference,
                          np.array([0.2, 0.9, 0.4, 0.6, 0.1]), 0.5)
    # 1 of 3 empty slices masked; 1 of 3 passes 0.5; AUC: 0.9 beats all 3 empty, 0.4 beats 0.2 and 0.1: 5/6
    assert np.allclose([gated["fp_slices_pct"], gated["gate_pass_empty_pct"], gated["gate_auc"]],
                       [100 / 3, 100 / 3, 5 / 6], rtol=0, atol=1e-9)


def test_box_mode_has_no_gate_and_the_summary_averages_the_slice_figures():
    reference = np.array([False, True, False])
    box = slice_figures(reference, np.array([True, True, False]), reference, None, 0.5)
    assert box == {"fp_slices_pct": 50.0, "gate_pass_empty_pct": None, "gate_auc": None}
    cases = {"A": {"domain": "S", "dice": 0.8, **box}, "B": {"domain": "S", "dice": 0.6, **dict.fromkeys(SLICE_FIGURES)}}
    mean = summarise(cases, 0, "box", {"slice_size": 256, "in_plane": {"rule": "resize"}}, _Settings())["mean"]
    assert mean["fp_slices_pct"] == 50.0 and mean["fp_slices_pct_cases_excluded"] == 1
    assert mean["gate_auc"] is None and mean["gate_auc_cases_excluded"] == 2


class _Settings:
    def choices(self) -> dict:
        return {"grid": 9}


def test_the_gate_is_calibrated_on_the_held_out_cases_slices_pooled():
    """Case A alone is separated between 0.30 and 0.35. Pooled with B (an empty slice at 0.40, the structure at
    0.70) no threshold separates every slice: 0.325 passes the empty 0.40, 0.5 drops the 0.35 with the structure,
    both J = 2/3, and the wider gap (0.40 to 0.60) wins. Box cases give none."""
    cases = {"A": {"domain": "S", "dice": 0.9, SLICE_SCORES: {"best_iou": [0.05, 0.35, 0.6, 0.3],
                                                           "has_structure": [False, True, True, False]}},
             "B": {"domain": "S", "dice": 0.8, SLICE_SCORES: {"best_iou": [0.4, 0.7],
                                                           "has_structure": [False, True]}}}
    settings = PredictionSettings(grid=5, grid_rule="top1")
    alone = gate_calibration({"A": cases["A"]}, settings)
    assert alone["threshold"] == pytest.approx(0.325)
    pooled = gate_calibration(cases, settings)
    assert pooled["youden_j"] == pytest.approx(2 / 3)
    assert pooled["threshold"] == pytest.approx(0.5) and pooled["sensitivity"] == pytest.approx(2 / 3)
    assert (pooled["grid"], pooled["grid_rule"], pooled["cases"]) == (5, "top1", ["A", "B"])
    assert (pooled["slices_with"], pooled["slices_without"]) == (3, 3)
    assert gate_calibration({"C": {"domain": "S", "dice": 0.7}}, settings) is None  # box mode: no slice scores
    mean = summarise(cases, 0, "grid", {"slice_size": 256, "in_plane": {"rule": "resize"}}, _Settings())["mean"]
    assert mean["dice"] == pytest.approx(0.85) and SLICE_SCORES not in mean


def test_a_gate_closed_on_every_held_out_slice_with_the_structure_is_warned_about():
    """A fold of 2026-12-07 (RUNMC fold 1 with scale views): PRIM answered every point with the same IoU,
    0.471-0.473 on every held-out slice, so at 0.5 automatic mode drew nothing (held-out Dice 0) although the
    IoUs still ranked the slices (AUC 0.97). The final validation names it; one passing slice is enough not to."""
    closed = {"C": {SLICE_SCORES: {"best_iou": [0.471, 0.473, 0.472, 0.471],
                                   "has_structure": [False, True, True, False]}}}
    warning = closed_gate_warning(closed, PredictionSettings(grid=3))
    assert warning is not None and "none of the 2 held-out slices" in warning and "0.471-0.473" in warning
    assert "calibrated" in warning
    assert closed_gate_warning(closed, PredictionSettings(grid=3, iou_threshold=0.4)) is None
    one_open = {**closed, "D": {SLICE_SCORES: {"best_iou": [0.8], "has_structure": [True]}}}
    assert closed_gate_warning(one_open, PredictionSettings(grid=3)) is None
    empty_only = {"E": {SLICE_SCORES: {"best_iou": [0.1, 0.2], "has_structure": [False, False]}}}
    assert closed_gate_warning(empty_only, PredictionSettings(grid=3)) is None
    assert closed_gate_warning({"F": {"dice": 0.9}}, PredictionSettings(grid=3)) is None  # box mode: no scores
