"""Does a prediction say "no structure here"? Slice detection, connected components and how well the
predicted IoU (PRIM's quality score, the gate of grid mode) tells slices and cases apart.

Dice and HD95 of a whole volume hide a model that segments every slice: a few false-positive voxels
on the empty end slices barely move them. These counts show it:

- slice detection along the slice axis: a slice "has the structure" when the reference has
  foreground on it, "is predicted" when the prediction has. `slice_sensitivity` = predicted slices
  among those with structure, `slice_specificity` = unpredicted slices among the empty ones (NaN
  where the denominator is 0: a volume without empty slices has no specificity), `fp_slices` =
  predicted slices without structure, `fn_slices` = slices with structure left unpredicted.
- `components`: 3D connected components of the prediction with full 26-connectivity (voxels
  touching by a face, an edge or a corner belong together), so speckle counts and a single gland
  is 1.
- `gate_auc`: ROC AUC of the per-slice predicted IoU as a score for "this slice has the
  structure": the Mann-Whitney U of the slices with structure against the empty ones over
  n1 * n0 (the probability that a random slice with structure scores higher than a random empty
  one, ties counting half); NaN when either class is absent. Slices without a finite predicted IoU
  are left out.
- `calibrate_gate`: the gate threshold that best separates the slices of held-out source cases (the
  largest Youden's J = sensitivity + specificity - 1 of "predicted IoU > threshold"), placed in the middle
  of the widest gap between scores among the thresholds that reach it; None when either class is absent or
  no threshold does better than chance (J <= 0).
- `rank_correlation`: Spearman's rho (e.g. of case mean predicted IoU against case Dice); NaN with
  fewer than 3 finite pairs or when either side is constant.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.ndimage import generate_binary_structure, label
from scipy.stats import mannwhitneyu, spearmanr

SLICE_DETECTION = ("slices", "reference_slices", "empty_slices", "slice_sensitivity", "slice_specificity",
                   "fp_slices", "fn_slices")
MIN_RANKED = 3


def slice_presence(mask: np.ndarray, slice_axis: int) -> np.ndarray:
    """Per slice along `slice_axis`: whether the mask has any foreground on it (bool vector)."""
    mask = np.asarray(mask) != 0
    other = tuple(a for a in range(mask.ndim) if a != slice_axis)
    return mask.any(axis=other)


def _rate(hits: int, total: int) -> float:
    return hits / total if total else float("nan")


def slice_detection(reference_present: Sequence[bool], predicted_present: Sequence[bool]) -> dict[str, float]:
    """Slice-level detection of per-slice presence vectors (one case, or several cases concatenated)."""
    reference = np.asarray(reference_present, bool)
    predicted = np.asarray(predicted_present, bool)
    if reference.shape != predicted.shape or reference.ndim != 1:
        raise ValueError(f"presence vectors must be 1D and equally long, got {reference.shape} and {predicted.shape}")
    with_structure, empty = int(reference.sum()), int((~reference).sum())
    detected, fp = int((reference & predicted).sum()), int((~reference & predicted).sum())
    return {"slices": int(reference.size), "reference_slices": with_structure, "empty_slices": empty,
            "slice_sensitivity": _rate(detected, with_structure), "slice_specificity": _rate(empty - fp, empty),
            "fp_slices": fp, "fn_slices": with_structure - detected}


def components(mask: np.ndarray) -> int:
    """Number of connected components of a binary mask, full connectivity (26 neighbours in 3D)."""
    mask = np.asarray(mask) != 0
    return int(label(mask, structure=generate_binary_structure(mask.ndim, mask.ndim))[1])


def _finite_scores(predicted_iou: Sequence[float], has_structure: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """The slices with a finite predicted IoU: their scores (float64) and whether each shows the structure."""
    scores = np.asarray(predicted_iou, np.float64)
    positive = np.asarray(has_structure, bool)
    if scores.shape != positive.shape:
        raise ValueError(f"{scores.shape[0] if scores.ndim else 0} scores for {positive.size} slices")
    finite = np.isfinite(scores)
    return scores[finite], positive[finite]


def gate_auc(predicted_iou: Sequence[float], has_structure: Sequence[bool]) -> float:
    """ROC AUC of `predicted_iou` separating slices with structure from empty ones (ties count half);
    NaN when either class has no slice with a finite score."""
    scores, positive = _finite_scores(predicted_iou, has_structure)
    with_structure, empty = scores[positive], scores[~positive]
    if not with_structure.size or not empty.size:
        return float("nan")
    u = mannwhitneyu(with_structure, empty, alternative="two-sided").statistic
    return float(u) / (with_structure.size * empty.size)


def calibrate_gate(predicted_iou: Sequence[float], has_structure: Sequence[bool]) -> dict | None:
    """The threshold on the per-slice predicted IoU that separates slices with structure from empty ones best
    (largest Youden's J; among equal J the midpoint of the widest gap between neighbouring scores), with J, its
    sensitivity and specificity and the slice counts; None when either class has no slice with a finite score or
    no threshold separates better than chance.

    A head can rank slices (AUC near 1) yet score them all below a fixed threshold of 0.5: this places the
    threshold where the source's held-out slices say it belongs."""
    scores, positive = _finite_scores(predicted_iou, has_structure)
    if positive.all() or not positive.any():
        return None
    values = np.unique(scores)
    candidates, gaps = (values[:-1] + values[1:]) / 2, np.diff(values)  # thresholds between neighbouring scores
    passed = scores[None, :] > candidates[:, None]
    sensitivity = passed[:, positive].mean(axis=1)
    specificity = 1 - passed[:, ~positive].mean(axis=1)
    youden = sensitivity + specificity - 1
    if not candidates.size or youden.max() <= 0:
        return None
    best = np.flatnonzero(np.isclose(youden, youden.max()))
    pick = best[np.argmax(gaps[best])]
    return {"threshold": float(candidates[pick]), "youden_j": float(youden[pick]),
            "sensitivity": float(sensitivity[pick]), "specificity": float(specificity[pick]),
            "slices_with": int(positive.sum()), "slices_without": int((~positive).sum())}


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho over the pairs where both values are finite; NaN with fewer than 3 pairs or a
    constant side (no ranking to compare)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"{x.size} values against {y.size}")
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    if x.size < MIN_RANKED or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)
