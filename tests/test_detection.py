"""Slice detection, connected components, gate AUC and rank correlation on hand-made masks and scores, and
their tables (per case, pooled per group, per site, source x target)."""
from __future__ import annotations

import math
from itertools import product

import numpy as np
import pandas as pd
import pytest

from desam_pipeline.utilities.detection import (calibrate_gate, components, gate_auc, rank_correlation, slice_detection,
                                                 slice_presence)
from desam_pipeline.utilities.errors import DesamError
from evaluation.detection_tables import case_detection, detection_matrix, group_detection, read_predicted_iou
from evaluation.evaluation_outputs import detection_table, per_site_markdown, site_summary
from evaluation.tables import MEAN_UNSEEN, POOLED_UNSEEN

SHAPE = (12, 10, 8)  # slices along axis 2


def gland(slices=range(2, 6)) -> np.ndarray:
    """A block on the given slices of a SHAPE volume."""
    mask = np.zeros(SHAPE, bool)
    for z in slices:
        mask[3:8, 3:7, z] = True
    return mask


# ---------------------------------------------------------------- slice detection
def test_a_mask_on_every_slice_has_specificity_zero_and_every_empty_slice_is_a_false_positive():
    reference = gland()                       # structure on slices 2-5, slices 0, 1, 6, 7 empty
    everywhere = np.zeros(SHAPE, bool)
    everywhere[5, 5, :] = True
    result = slice_detection(slice_presence(reference, 2), slice_presence(everywhere, 2))
    assert result == {"slices": 8, "reference_slices": 4, "empty_slices": 4, "slice_sensitivity": 1.0,
                      "slice_specificity": 0.0, "fp_slices": 4, "fn_slices": 0}


def test_one_missed_slice_and_one_false_positive():
    reference = gland()
    prediction = gland(range(3, 6)) | gland([7])  # misses slice 2, adds empty slice 7
    result = slice_detection(slice_presence(reference, 2), slice_presence(prediction, 2))
    assert (result["fp_slices"], result["fn_slices"]) == (1, 1)
    assert result["slice_sensitivity"] == pytest.approx(3 / 4) and result["slice_specificity"] == pytest.approx(3 / 4)


def test_undefined_rates_are_nan():
    empty = np.zeros(SHAPE, bool)
    no_structure = slice_detection(slice_presence(empty, 2), slice_presence(gland([0]), 2))
    assert math.isnan(no_structure["slice_sensitivity"]) and no_structure["slice_specificity"] == pytest.approx(7 / 8)
    assert no_structure["fn_slices"] == 0 and no_structure["fp_slices"] == 1
    full = gland(range(8))
    no_empty = slice_detection(slice_presence(full, 2), slice_presence(full, 2))
    assert math.isnan(no_empty["slice_specificity"]) and no_empty["slice_sensitivity"] == 1.0
    assert no_empty["empty_slices"] == 0
    with pytest.raises(ValueError, match="equally long"):
        slice_detection([True, False], [True])


def test_presence_follows_the_slice_axis():
    mask = np.zeros(SHAPE, bool)
    mask[4, 0, 6] = True
    assert np.flatnonzero(slice_presence(mask, 0)).tolist() == [4]
    assert np.flatnonzero(slice_presence(mask, 1)).tolist() == [0]
    assert np.flatnonzero(slice_presence(mask, 2)).tolist() == [6]
    assert slice_presence(mask.astype(np.uint8), 2).dtype == bool


# ---------------------------------------------------------------- components
def test_components_are_26_connected():
    assert components(np.zeros(SHAPE, bool)) == 0
    assert components(gland()) == 1
    corners = np.zeros(SHAPE, bool)
    corners[1, 1, 1] = corners[2, 2, 2] = corners[3, 3, 3] = True  # touching by corners only
    assert components(corners) == 1
    edges = np.zeros(SHAPE, bool)
    edges[1, 1, 1] = edges[2, 2, 1] = True                          # touching by an edge
    assert components(edges) == 1
    apart = gland(range(0, 2)) | gland(range(4, 6))                  # slice 2-3 between them
    speckle = np.zeros(SHAPE, bool)
    speckle[0, 0, 7] = speckle[11, 9, 7] = True
    assert components(apart) == 2 and components(apart | speckle) == 4


# ---------------------------------------------------------------- gate AUC
def pairwise_auc(positive, negative) -> float:
    """The definition itself: wins of a positive over a negative, ties half, over all pairs."""
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in product(positive, negative))
    return wins / (len(positive) * len(negative))


def test_gate_auc_counts_pairs_with_ties_half():
    scores = [0.9, 0.8, 0.5, 0.5, 0.1]
    labels = [True, True, True, False, False]
    assert gate_auc(scores, labels) == pytest.approx(5.5 / 6)
    rng = np.random.default_rng(3)
    scores = rng.choice([0.1, 0.4, 0.7, 0.9], size=40)  # many ties
    labels = rng.random(40) < 0.4
    assert gate_auc(scores, labels) == pytest.approx(pairwise_auc(scores[labels], scores[~labels]))


def test_gate_auc_extremes_and_degenerate_cases():
    labels = [False, True, True, False]
    assert gate_auc([0.1, 0.9, 0.8, 0.2], labels) == 1.0
    assert gate_auc([0.9, 0.1, 0.2, 0.8], labels) == 0.0
    assert gate_auc([0.974] * 4, labels) == 0.5              # a constant score carries no information
    assert math.isnan(gate_auc([0.5, 0.6], [True, True]))     # no empty slice
    assert math.isnan(gate_auc([0.5, 0.6], [False, False]))   # no slice with structure
    assert math.isnan(gate_auc([np.nan] * 4, labels))         # no predicted IoU
    assert gate_auc([0.1, 0.9, np.nan, 0.2], labels) == 1.0   # slices without a score are left out
    with pytest.raises(ValueError):
        gate_auc([0.1, 0.2], [True])


# ---------------------------------------------------------------- rank correlation
def test_calibrated_gate_sits_in_the_gap_a_ranking_head_leaves_below_a_fixed_threshold():
    """The abdominal CT right-kidney model of 2026-12-07: its held-out slices ranked (AUC 0.97) but scored about
    0.33 with the kidney and 0.09 without, so a fixed 0.5 passed none. Calibration puts the threshold in the gap."""
    scores = [0.08, 0.09, 0.10, 0.31, 0.33, 0.35]
    present = [False, False, False, True, True, True]
    calibration = calibrate_gate(scores, present)
    assert calibration["threshold"] == pytest.approx(0.205)
    assert (calibration["youden_j"], calibration["sensitivity"], calibration["specificity"]) == (1.0, 1.0, 1.0)
    assert (calibration["slices_with"], calibration["slices_without"]) == (3, 3)
    # one empty slice above one with the structure: J = 1 - 1/3 at two thresholds; the wider gap (0.10-0.31) wins
    overlap = calibrate_gate([0.08, 0.09, 0.32, 0.31, 0.33, 0.35], present)
    assert overlap["threshold"] == pytest.approx(0.2) and overlap["youden_j"] == pytest.approx(2 / 3)
    assert calibrate_gate([0.2, np.nan, 0.3], [False, False, True])["threshold"] == pytest.approx(0.25)  # NaN left out


def test_no_calibration_without_both_kinds_of_slice_or_any_separation():
    assert calibrate_gate([0.2, 0.3], [True, True]) is None
    assert calibrate_gate([0.2, 0.3], [False, False]) is None
    assert calibrate_gate([0.5, 0.5, 0.5], [False, True, True]) is None  # one score: nothing to place
    assert calibrate_gate([0.9, 0.8, 0.1], [False, False, True]) is None  # ranked backwards: J <= 0 everywhere
    with pytest.raises(ValueError, match="3 scores for 2 slices"):
        calibrate_gate([0.1, 0.2, 0.3], [True, False])


def test_rank_correlation():
    assert rank_correlation([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert rank_correlation([0.1, 0.5, 0.9], [0.2, 0.4, 0.95]) == pytest.approx(1.0)
    assert rank_correlation([0.1, 0.5, 0.9], [0.95, 0.4, 0.2]) == pytest.approx(-1.0)
    assert math.isnan(rank_correlation([0.1, 0.5], [0.2, 0.4]))               # fewer than 3 cases
    assert math.isnan(rank_correlation([0.97, 0.97, 0.97], [0.2, 0.5, 0.9]))  # constant predicted IoU
    assert math.isnan(rank_correlation([0.1, 0.5, 0.9], [0.7, 0.7, 0.7]))     # constant Dice
    assert math.isnan(rank_correlation([0.1, np.nan, 0.9, 0.3], [0.2, 0.5, np.nan, 0.1]))  # 2 finite pairs
    assert rank_correlation([0.1, np.nan, 0.9, 0.3, 0.5], [0.2, 0.5, 0.8, 0.1, 0.6]) == pytest.approx(0.8)


# ---------------------------------------------------------------- tables
def test_case_detection_joins_the_predicted_iou_by_slice(tmp_path):
    reference, prediction = gland(), gland(range(0, 6))
    quality = tmp_path / "quality.csv"
    pd.DataFrame({"case": ["a"] * 8 + ["b"] * 2, "slice": [*reversed(range(8)), 0, 1],
                  "predicted_iou": [0.1, 0.1, 0.9, 0.9, 0.9, 0.9, 0.3, 0.3, 0.5, 0.5]}).to_csv(quality, index=False)
    iou = read_predicted_iou(quality, "a")
    values, slices = case_detection(reference, prediction, 2, iou)
    assert slices["predicted_iou"].tolist() == [0.3, 0.3, 0.9, 0.9, 0.9, 0.9, 0.1, 0.1]  # by slice number
    assert slices["predicted"].tolist() == [True] * 6 + [False] * 2
    assert (values["fp_slices"], values["components"], values["gate_auc"]) == (2, 1, 1.0)
    assert read_predicted_iou(quality, "zzz") is None and read_predicted_iou(tmp_path / "none.csv") is None
    no_iou, slices = case_detection(reference, prediction, 2)
    assert math.isnan(no_iou["gate_auc"]) and slices["predicted_iou"].isna().all()
    with pytest.raises(DesamError, match=r"b\.csv: predicted IoU for 2 slice\(s\), but the volume has 8 along axis 2"):
        case_detection(reference, prediction, 2, read_predicted_iou(quality, "b"), "b.csv")


def two_cases() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Case x: IoU separates perfectly within the case, but sits at 0.9/0.95; case y at 0.2/0.3: pooled, y's
    slices with structure rank below x's empty ones. x segments every slice, y only its structure."""
    per_slice = pd.DataFrame({
        "case": ["x"] * 4 + ["y"] * 4, "site": ["S"] * 8, "in_domain": [False] * 8, "slice": [0, 1, 2, 3] * 2,
        "reference": [False, True, True, False, False, True, True, False],
        "predicted": [True, True, True, True, False, True, True, False],
        "predicted_iou": [0.9, 0.95, 0.95, 0.9, 0.2, 0.3, 0.3, 0.2]})
    per_case = pd.DataFrame({"case": ["x", "y"], "site": ["S", "S"], "in_domain": [False, False], "dice": [0.6, 0.9],
                             "components": [3, 1], "mean_predicted_iou": [0.925, 0.25]})
    return per_case, per_slice


def test_group_statistics_pool_slices_instead_of_averaging_cases():
    per_case, per_slice = two_cases()
    for case in ("x", "y"):
        rows = per_slice[per_slice["case"] == case]
        assert gate_auc(rows["predicted_iou"], rows["reference"]) == 1.0
    stats = group_detection(per_case, per_slice)
    # pooled: pairs (x structure, any empty) win 8 of 8, (y structure, x empty) lose 4, (y structure, y empty) win 4
    assert stats["gate_auc"] == pytest.approx(12 / 16)
    assert (stats["fp_slices"], stats["empty_slices"], stats["fp_slices_pct"]) == (2, 4, 50.0)
    assert stats["slice_specificity"] == 0.5 and stats["components_median"] == 2.0
    assert math.isnan(stats["gate_spearman"]) and stats["spearman_cases"] == 2  # 2 cases: no ranking
    paper_only = group_detection(per_case)
    assert set(paper_only) == {"gate_spearman", "spearman_cases"}


def test_site_summary_reports_pooled_values_the_unseen_pool_and_the_spearman():
    per_case, per_slice = two_cases()
    source = pd.DataFrame({"case": ["z"], "site": ["A"], "in_domain": [True], "dice": [0.8], "hd95": [1.0],
                           "assd": [0.5], "nsd": [0.9], "components": [1], "mean_predicted_iou": [0.5],
                           "slices": [2], "reference_slices": [1], "empty_slices": [1], "slice_sensitivity": [1.0],
                           "slice_specificity": [1.0], "fp_slices": [0], "fn_slices": [0], "gate_auc": [1.0]})
    cases = per_case.assign(hd95=[2.0, 3.0], assd=[1.0, 1.0], nsd=[0.5, 0.5], slices=4, reference_slices=2,
                            empty_slices=2, slice_sensitivity=1.0, slice_specificity=[0.0, 1.0], fp_slices=[2, 0],
                            fn_slices=0, gate_auc=1.0)
    all_cases = pd.concat([source, cases], ignore_index=True)
    slices = pd.concat([per_slice, pd.DataFrame({"case": ["z", "z"], "site": "A", "in_domain": True, "slice": [0, 1],
                                                 "reference": [True, False], "predicted": [True, False],
                                                 "predicted_iou": [0.6, 0.4]})], ignore_index=True)
    summary = site_summary(all_cases, slices)
    assert list(dict.fromkeys(summary["site"])) == ["A", "S", "unseen", "overall"]
    indexed = summary.set_index(["site", "metric"])
    assert indexed.at[("S", "slice_specificity"), "mean"] == 0.5
    assert indexed.at[("S", "slice_specificity"), "pooled"] == 0.5
    assert indexed.at[("unseen", "gate_auc"), "pooled"] == pytest.approx(12 / 16)
    assert indexed.at[("overall", "fp_slices"), "pooled"] == 2
    assert indexed.at[("overall", "empty_slices"), "pooled"] == 5
    spearman = indexed.loc[("overall", "gate_spearman")]
    assert spearman["pooled"] == pytest.approx(-1.0)  # mean IoU 0.5, 0.925, 0.25 against Dice 0.8, 0.6, 0.9
    assert (spearman["cases"], spearman["n"], spearman["excluded"]) == (3, 3, 0) and math.isnan(spearman["mean"])
    assert math.isnan(indexed.at[("S", "dice"), "pooled"])
    assert summary.groupby("site", sort=False)["in_domain"].first().to_dict() == {
        "A": True, "S": False, "unseen": False, "overall": ""}
    table = detection_table(summary).set_index("site")
    assert table.at["S", "FP slices"] == "2/4" and table.at["overall", "FP slices"] == "2/5"
    assert table.at["S", "median components"] == 2.0
    printed = per_site_markdown(summary, "T", "full")
    assert "| S | 2/4 | 1.000 | 0.500 | 2.000 | 0.750 | nan |" in printed and "pooled" not in printed
    paper = site_summary(all_cases[["case", "site", "in_domain", "dice", "hd95", "assd", "nsd", "mean_predicted_iou"]],
                         None)
    assert set(paper["metric"]) == {"dice", "hd95", "assd", "nsd", "gate_spearman"}
    assert "no structure here" not in per_site_markdown(paper, "T", "paper")


def test_detection_matrix_cells_means_and_pooled_unseen():
    per_case, per_slice = two_cases()
    other = per_case.assign(site=["T", "S"], in_domain=[True, False])
    other_slices = per_slice.assign(site=["T"] * 4 + ["S"] * 4, in_domain=[True] * 4 + [False] * 4)
    values, in_domain = detection_matrix({"A": per_case, "T": other}, {"A": per_slice, "T": other_slices}, "gate_auc")
    assert list(values.columns) == ["S", "T", MEAN_UNSEEN, POOLED_UNSEEN] and list(values.index) == ["A", "T"]
    assert values.at["A", "S"] == pytest.approx(12 / 16) and math.isnan(values.at["A", "T"])
    assert values.at["A", POOLED_UNSEEN] == pytest.approx(12 / 16)
    assert values.at["T", "T"] == 1.0 and values.at["T", "S"] == 1.0 and bool(in_domain.at["T", "T"])
    assert values.at["T", MEAN_UNSEEN] == 1.0 and not in_domain.at["T", MEAN_UNSEEN]
    fp, _ = detection_matrix({"A": per_case}, {"A": per_slice}, "fp_slices_pct")
    assert fp.at["A", "S"] == 50.0 and fp.at["A", POOLED_UNSEEN] == 50.0
