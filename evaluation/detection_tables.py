"""Slice detection in the evaluation's tables: per case, per slice, per group of cases and per source x target cell.

The metrics are `desam_pipeline.utilities.detection`'s (definitions there). A case's per-slice rows
(per_slice.csv: case, site, in_domain, slice, reference, predicted, predicted_iou) keep what pooling
needs: a group's slice sensitivity, specificity and gate AUC are computed once over all slices of its
cases, never averaged from the cases' values. Slices are indexed along the plan's slice axis in the
volume's own array order, as the predictor's quality CSV numbers them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from desam_pipeline.utilities.detection import (SLICE_DETECTION, components, gate_auc, rank_correlation,
                                                 slice_detection, slice_presence)
from desam_pipeline.utilities.errors import DesamError
from evaluation.tables import MEAN_UNSEEN, POOLED_UNSEEN, in_domain_flags

PER_SLICE = "per_slice.csv"
CASE_DETECTION = (*SLICE_DETECTION, "components", "gate_auc")
SLICE_COLUMNS = ["slice", "reference", "predicted", "predicted_iou"]
# group statistics (group_detection) that share a per_case column's name: its value pooled over the group
POOLED_METRICS = (*SLICE_DETECTION, "gate_auc", "gate_spearman")


def read_predicted_iou(path: Path, case: str | None = None) -> pd.Series | None:
    """slice -> PRIM's predicted IoU from a quality CSV (a case's own file, or a merged quality.csv
    narrowed to `case`); None when the file does not exist or has no row of the case."""
    if not path.is_file():
        return None
    table = pd.read_csv(path, dtype={"case": str})
    if case is not None:
        table = table[table["case"] == case]
    return table.set_index("slice")["predicted_iou"].astype(float) if len(table) else None


def case_detection(reference: np.ndarray, prediction: np.ndarray, slice_axis: int,
                   predicted_iou: pd.Series | None = None, source: str = "quality CSV") -> tuple[dict, pd.DataFrame]:
    """Per-case detection values (CASE_DETECTION) and the case's per-slice rows (SLICE_COLUMNS).

    `predicted_iou` (slice -> value) must number the same slices as the volume; `source` names its file
    in the error otherwise. Without it the predicted IoU and the gate AUC are NaN.
    """
    reference_present, predicted_present = slice_presence(reference, slice_axis), slice_presence(prediction, slice_axis)
    numbers = np.arange(reference_present.size)
    if predicted_iou is None:
        iou = np.full(numbers.size, np.nan)
    elif sorted(predicted_iou.index) != numbers.tolist():
        raise DesamError(f"{source}: predicted IoU for {len(predicted_iou)} slice(s), but the volume has "
                         f"{numbers.size} along axis {slice_axis}; predict the case again")
    else:
        iou = predicted_iou.reindex(numbers).to_numpy(np.float64)
    slices = pd.DataFrame({"slice": numbers, "reference": reference_present, "predicted": predicted_present,
                           "predicted_iou": iou})
    values = slice_detection(reference_present, predicted_present) | {
        "components": components(prediction), "gate_auc": gate_auc(iou, reference_present)}
    return values, slices


def group_detection(per_case: pd.DataFrame, per_slice: pd.DataFrame | None = None) -> dict[str, float]:
    """Statistics of a group of cases: gate_spearman (case mean predicted IoU against case Dice) and
    spearman_cases (the cases it ranks); with the group's per-slice rows also the pooled slice
    detection (SLICE_DETECTION over all slices), fp_slices_pct (FP slices as % of the empty slices),
    components_median (over cases) and gate_auc (over all slices)."""
    iou, dice = (pd.to_numeric(per_case[c], errors="coerce").to_numpy(np.float64)
                 for c in ("mean_predicted_iou", "dice"))
    stats = {"gate_spearman": rank_correlation(iou, dice),
             "spearman_cases": int((np.isfinite(iou) & np.isfinite(dice)).sum())}
    if per_slice is None:
        return stats
    reference, predicted = per_slice["reference"].astype(bool), per_slice["predicted"].astype(bool)
    counts = slice_detection(reference, predicted)
    empty = counts["empty_slices"]
    return stats | counts | {
        "fp_slices_pct": 100.0 * counts["fp_slices"] / empty if empty else float("nan"),
        "components_median": float(pd.to_numeric(per_case["components"], errors="coerce").median()),
        "gate_auc": gate_auc(per_slice["predicted_iou"].astype(float), reference)}


def slices_of(per_slice: pd.DataFrame, per_case: pd.DataFrame) -> pd.DataFrame:
    """The per-slice rows of the cases in `per_case`."""
    return per_slice[per_slice["case"].astype(str).isin(per_case["case"].astype(str))]


def detection_matrix(per_case_by_source: Mapping[str, pd.DataFrame], per_slice_by_source: Mapping[str, pd.DataFrame],
                     statistic: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Source x target matrix of a group_detection statistic, laid out as tables.cross_domain_matrix: each
    cell over the target's cases, `mean unseen` the mean of the unseen targets' values, `pooled unseen`
    the statistic over every case (slice) of the unseen targets together; and the in-domain marks."""
    values, marks = {}, {}
    for source, per_case in per_case_by_source.items():
        per_slice, row, flags = per_slice_by_source[source], {}, {}
        for target, cases in per_case.groupby("site", sort=True):
            row[str(target)] = group_detection(cases, slices_of(per_slice, cases))[statistic]
            flags[str(target)] = bool(in_domain_flags(cases).any())
        unseen = per_case[~in_domain_flags(per_case)]
        row[MEAN_UNSEEN] = pd.Series([v for t, v in row.items() if not flags[t]], dtype=float).mean()
        row[POOLED_UNSEEN] = (group_detection(unseen, slices_of(per_slice, unseen))[statistic] if len(unseen)
                              else float("nan"))
        values[source], marks[source] = row, flags | {MEAN_UNSEEN: False, POOLED_UNSEEN: False}
    columns = sorted({t for row in values.values() for t in row} - {MEAN_UNSEEN, POOLED_UNSEEN})
    columns += [MEAN_UNSEEN, POOLED_UNSEEN]
    matrix = pd.DataFrame.from_dict(values, orient="index").reindex(columns=columns).sort_index().astype(float)
    in_domain = (pd.DataFrame.from_dict(marks, orient="index").reindex(index=matrix.index, columns=columns)
                 .fillna(False).astype(bool))
    matrix.index.name = in_domain.index.name = "source"
    return matrix, in_domain
