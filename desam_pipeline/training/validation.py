"""The trainer's final validation: each held-out case predicted from the embedding cache and scored in 3D on
the plan's slice grid, its mask written as NIfTI, and `summary.json` with the prediction settings used.

Slices outside the cache hold no foreground (the plan caches foreground slices plus a margin, or all
slices), so they are background in both reference and prediction. The in-plane spacing is the original
one of the plan's slice grid (`data.preprocessing.grid_spacing`: resized, or resampled to the plan's mm per
pixel). Masks are written on that grid
(`desam_predict` writes them in the original geometry). Which cases to validate and on which ranks is
the trainer's business; this module scores one case and summarises many.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from desam_pipeline.data import cache
from desam_pipeline.data.orientation import from_slices, plan_orientation
from desam_pipeline.data.preprocessing import grid_affine, grid_spacing, in_plane
from desam_pipeline.data.slice_data import structure_target
from desam_pipeline.data.slice_grid import place_slices
from desam_pipeline.inference.postprocessing import postprocess
from desam_pipeline.inference.settings import MASK_THRESHOLD, PredictionSettings
from desam_pipeline.inference.slice_prediction import predict_slices
from desam_pipeline.io.atomic import atomic_path
from desam_pipeline.io.results_layout import CHECKPOINT_FINAL
from desam_pipeline.utilities.detection import calibrate_gate, gate_auc, slice_detection, slice_presence
from desam_pipeline.utilities.metrics import METRICS, compute_metrics

VALIDATION = "validation"  # the folder in fold_<k>/
SUMMARY = "summary.json"
SLICE_FIGURES = ("fp_slices_pct", "gate_pass_empty_pct", "gate_auc")  # per case, beside the metrics (slice_figures)
# grid mode, per case: each cached slice's best predicted IoU and whether it shows the structure (calibration data)
SLICE_SCORES = "slice_scores"
NOT_AVERAGED = ("domain", SLICE_SCORES)


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def validate_case(network: torch.nn.Module, case_dir: Path, plan: dict, mode: str, settings: PredictionSettings,
                  out_dir: Path, batch_size: int, device: torch.device, precision: str,
                  domain: str | None = None, label_value: int | None = None) -> dict:
    """Metrics of one cached case (None where undefined) and its domain (the cache's, else `domain`); the
    mask goes to `out_dir/<case>.nii.gz`. A case without cached slices is left out: no score rather than
    a free Dice of 1. `label_value`: the structure the network segments (None: label > 0)."""
    arrays = cache.open_case(case_dir)
    meta = arrays["meta"]
    domain = meta.get("domain", domain)
    if not meta["z"]:
        tqdm.write(f"validation case {case_dir.name} has no cached slices; left out of the mean", file=sys.stdout)
        return {"domain": domain, **{k: None for k in (*METRICS, *SLICE_FIGURES)}}
    axis, size, orientation = int(plan["slice_axis"]), int(plan["slice_size"]), plan_orientation(plan)
    probabilities, best_iou = predict_slices(network, arrays["neck"], [arrays[f"tap{i}"] for i in range(3)], mode, settings,
                                      batch_size=batch_size, device=device, precision=precision, size=size)
    shape = [int(s) for s in meta["shape"]]
    # slices first, in-plane axes in array order; every slice of the volume, the uncached ones empty
    prediction = place_slices(from_slices(probabilities > MASK_THRESHOLD, 0, orientation), meta["z"], shape[axis])
    prediction = postprocess(prediction, settings.postprocess, slice_axis=0) > 0
    target = structure_target(np.asarray(arrays["label"]), label_value) > 0
    reference = place_slices(from_slices(target, 0, orientation), meta["z"], shape[axis])
    spacing = grid_spacing(shape, meta["spacing"], plan)
    metrics = compute_metrics(reference, prediction, (spacing[axis], *[s for a, s in enumerate(spacing) if a != axis]))
    with atomic_path(out_dir / f"{case_dir.name}.nii.gz") as tmp:
        affine = grid_affine(meta["affine"], shape, meta["spacing"], plan)
        nib.save(nib.Nifti1Image(np.moveaxis(prediction, 0, axis).astype(np.uint8), affine), str(tmp))
    present = slice_presence(target, 0)
    scores = {SLICE_SCORES: {"best_iou": [float(v) for v in best_iou], "has_structure": present.tolist()}}
    return {"domain": domain, **{k: _finite_or_none(float(v)) for k, v in metrics.items()},
            **slice_figures(slice_presence(reference, 0), slice_presence(prediction, 0),
                            present, best_iou if mode == "grid" else None, settings.iou_threshold),
            **(scores if mode == "grid" else {})}


def slice_figures(reference: np.ndarray, predicted: np.ndarray, cached_reference: np.ndarray,
                  best_iou: np.ndarray | None, iou_threshold: float) -> dict[str, float | None]:
    """What automatic mode does on the case's empty slices: the share of the volume's slices without the object
    that got a mask (`fp_slices_pct`), and in grid mode, over the cached slices, the share of empty ones whose best
    predicted IoU passes the gate (`gate_pass_empty_pct`) and the gate's ROC AUC (None where undefined)."""
    detection = slice_detection(reference, predicted)
    figures = dict.fromkeys(SLICE_FIGURES)
    figures["fp_slices_pct"] = _finite_or_none(100 * (1 - detection["slice_specificity"]))
    if best_iou is not None:
        empty = ~np.asarray(cached_reference, bool)
        passed = np.asarray(best_iou) > iou_threshold
        figures["gate_pass_empty_pct"] = _finite_or_none(100 * passed[empty].mean()) if empty.any() else None
        figures["gate_auc"] = _finite_or_none(gate_auc(best_iou, cached_reference))
    return figures


def validate_cases(network: torch.nn.Module, case_dirs: list[Path], plan: dict, mode: str,
                   settings: PredictionSettings, out_dir: Path, batch_size: int, device: torch.device, precision: str,
                   domains: dict[str, str], label_value: int | None = None, show_progress: bool = True
                   ) -> dict[str, dict]:
    """`validate_case` of each cached case folder, with a progress bar; case id -> metrics."""
    return {case_dir.name: validate_case(network, case_dir, plan, mode, settings, out_dir, batch_size, device,
                                         precision, domains.get(case_dir.name), label_value)
            for case_dir in tqdm(case_dirs, desc="validation", unit="case", disable=not show_progress,
                                 file=sys.stdout)}


def pooled_slice_scores(cases: dict[str, dict]) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """The held-out cases' slice scores pooled: (the ids of the cases that have them, sorted; best predicted IoU
    per slice; whether the slice shows the structure, bool); None where no case has them (box mode)."""
    scored = {case: v[SLICE_SCORES] for case, v in cases.items() if v.get(SLICE_SCORES)}
    if not scored:
        return None
    return (sorted(scored), np.concatenate([v["best_iou"] for v in scored.values()]),
            np.concatenate([v["has_structure"] for v in scored.values()]).astype(bool))


def gate_calibration(cases: dict[str, dict], settings: PredictionSettings) -> dict | None:
    """The gate threshold calibrated on the held-out cases' cached slices pooled (`detection.calibrate_gate`),
    with the grid it was measured at and the cases it used; None outside grid mode or where it cannot be made."""
    pooled = pooled_slice_scores(cases)
    if pooled is None:
        return None
    scored, best, present = pooled
    calibration = calibrate_gate(best, present)
    if calibration is None:
        return None
    return {**calibration, "grid": settings.grid, "grid_rule": settings.grid_rule, "cases": scored}


def closed_gate_warning(cases: dict[str, dict], settings: PredictionSettings) -> str | None:
    """A warning when the gate passes none of the held-out slices that show the structure: automatic mode would
    then draw nothing anywhere, whatever PDMM's masks (PRIM has stopped telling points apart, so its predicted
    IoU sits at one value below the threshold). None when some such slice passes, or there are none."""
    pooled = pooled_slice_scores(cases)
    if pooled is None:
        return None
    _, best, present = pooled
    if not present.any() or (best[present] > settings.iou_threshold).any():
        return None
    return (f"the IoU gate passes none of the {int(present.sum())} held-out slices with the structure (predicted IoU "
            f"{best.min():.3f}-{best.max():.3f}, threshold {settings.iou_threshold}): this fold's automatic mode "
            f"segments nothing; predict with --iou-threshold calibrated, or retrain (another seed, --prim-lr-scale)")


def summarise(cases: dict[str, dict], fold: int | str, mode: str, plan: dict, settings: PredictionSettings) -> dict:
    """summary.json: per-case metrics, their means (with how many cases each leaves out) and how they were made."""
    metric_names = [k for k in next(iter(cases.values())) if k not in NOT_AVERAGED]
    mean = {}
    for name in metric_names:
        values = [v[name] for v in cases.values() if v[name] is not None]
        mean[name] = float(np.mean(values)) if values else None
        mean[f"{name}_cases_excluded"] = len(cases) - len(values)
    size = int(plan["slice_size"])
    return {"fold": fold, "mode": mode, "checkpoint": CHECKPOINT_FINAL,
            "grid": f"cached {size}x{size} slices; in-plane rule {in_plane(plan)}",
            "prediction": {k: v for k, v in settings.choices().items() if k != "checkpoint_name"},
            "cases": cases, "mean": mean}


def structures_summary(summaries: dict[int, dict]) -> dict:
    """summary.json of a joint network's validation: each structure's `summarise` under its label value, and
    the mean over structures of each mean metric (None where a structure has none)."""
    first = next(iter(summaries.values()))
    names = [k for k in first["mean"] if not k.endswith("_cases_excluded")]
    mean = {}
    for name in names:
        values = [s["mean"][name] for s in summaries.values()]
        mean[name] = None if any(v is None for v in values) else float(np.mean(values))
    return {**{k: first[k] for k in ("fold", "mode", "checkpoint", "grid", "prediction")},
            "structures": {str(value): summary for value, summary in summaries.items()}, "mean": mean}
