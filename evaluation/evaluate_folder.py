"""`desam_evaluate_folder REF PRED`: Dice, HD95, ASSD, NSD and slice detection of every reference case, one row each.

A case of REF without a prediction in PRED is a row with status `missing` and NaN metrics, never
skipped. Files are `<case><file_ending>` (`.nii.gz` unless the dataset.json says otherwise). A PRED
without any prediction is an error; predicted values that are neither foreground labels nor in the
reference count as background with a warning naming the file, and NaN or fractional values are an error.

Beside the overlap metrics each row has the slice detection along `--slice-axis` (slices, reference_slices,
empty_slices, slice_sensitivity, slice_specificity, fp_slices, fn_slices), the prediction's 3D connected
components (26-connectivity) and, when the predictor's quality.csv lies in PRED, mean_predicted_iou and the
gate AUC (definitions in desam_pipeline.utilities.detection and docs/metrics.md).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from tqdm import tqdm

from desam_pipeline.data.preprocessing import SLICE_AXIS
from desam_pipeline.data.raw_dataset import domains, field_problems, file_ending, read_dataset_json
from desam_pipeline.inference.outputs import QUALITY_FILE
from desam_pipeline.io.nifti_io import read_volume, voxel_spacing
from desam_pipeline.utilities.errors import DesamError, cli_entry
from desam_pipeline.utilities.metrics import DEFAULT_NSD_TOLERANCE_MM, METRICS, check_same_geometry, compute_metrics
from evaluation.detection_tables import CASE_DETECTION, case_detection, read_predicted_iou
from evaluation.tables import summarise, to_markdown, write_csv

DEFAULT_OUTPUT = "evaluation.csv"
SUMMARY_DETECTION = ("slice_sensitivity", "slice_specificity", "fp_slices", "components", "gate_auc")


def foreground(volume: np.ndarray, labels: Iterable[int]) -> np.ndarray:
    """Voxels whose value is one of `labels`."""
    return np.isin(volume, np.asarray(list(labels), dtype=volume.dtype))


def check_prediction_values(prediction: np.ndarray, reference: np.ndarray, labels: list[int],
                            path: str | os.PathLike) -> None:
    """Label values must be finite integers; values in neither the reference nor `labels` count as
    background, and a warning line says so."""
    values = np.unique(prediction)
    odd = values[~np.isfinite(values) | (values != np.round(values))]
    if odd.size:
        raise DesamError(f"{path}: label values must be integers, found {', '.join(map(str, odd[:5].tolist()))}")
    unknown = sorted(set(values.tolist()) - {0} - set(labels) - set(np.unique(reference).tolist()))
    if unknown:
        tqdm.write(f"desam: warning: {path}: label values {[int(v) for v in unknown]} are neither in the reference "
                   f"nor in the labels {labels}; counted as background", file=sys.stderr)


def read_pair(reference_path: str | os.PathLike, prediction_path: str | os.PathLike,
              labels: Iterable[int] = (1,)) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Foreground masks of a reference file and its prediction file (same grid required, label values
    checked) and the spacing in mm from the reference header."""
    reference, reference_image = read_volume(reference_path)
    prediction, prediction_image = read_volume(prediction_path)
    check_same_geometry(reference_image, prediction_image, reference_path, prediction_path)
    labels = list(labels)
    check_prediction_values(prediction, reference, labels, prediction_path)
    return foreground(reference, labels), foreground(prediction, labels), voxel_spacing(reference_image)


def score_pair(reference_path: str | os.PathLike, prediction_path: str | os.PathLike, labels: Iterable[int] = (1,),
               nsd_tolerance: float = DEFAULT_NSD_TOLERANCE_MM, slice_axis: int = SLICE_AXIS, predicted_iou: pd.Series | None = None,
               quality_source: str = "quality CSV") -> tuple[dict, pd.DataFrame]:
    """Metrics (METRICS) and slice detection (CASE_DETECTION) of one prediction file against its reference
    file, and the case's per-slice rows; `predicted_iou` (slice -> PRIM's predicted IoU, read from
    `quality_source`) gives the gate AUC."""
    reference, prediction, spacing = read_pair(reference_path, prediction_path, labels)
    detection, slices = case_detection(reference, prediction, slice_axis, predicted_iou, quality_source)
    return compute_metrics(reference, prediction, spacing, nsd_tolerance=nsd_tolerance) | detection, slices


def _load_dataset_json(dataset_json: str | os.PathLike | dict | None) -> dict:
    """The dataset.json given (path or dict), its file_ending and domains checked for type."""
    if dataset_json is None or isinstance(dataset_json, dict):
        return dict(dataset_json or {})
    info = read_dataset_json(Path(dataset_json))
    problems = field_problems(info, Path(dataset_json), ("file_ending", "domains"))
    if problems:
        raise DesamError(problems[0])
    return info


def list_case_files(folder: Path, ending: str) -> dict[str, Path]:
    """case id -> file for every `<case><ending>` in `folder` (hidden temporaries skipped)."""
    return {p.name[: -len(ending)]: p for p in sorted(folder.iterdir())
            if p.name.endswith(ending) and not p.name.startswith(".") and p.is_file()}


def evaluate_folder(ref_dir: str | os.PathLike, pred_dir: str | os.PathLike,
                    dataset_json: str | os.PathLike | dict | None = None, labels: Iterable[int] = (1,),
                    nsd_tolerance: float = DEFAULT_NSD_TOLERANCE_MM, progress: bool = True,
                    slice_axis: int = SLICE_AXIS) -> pd.DataFrame:
    """One row per reference case: case, [site], dice, hd95, assd, nsd, the slice detection along
    `slice_axis` and components (CASE_DETECTION), [mean_predicted_iou], status (`ok` or `missing`).

    The site column appears when the dataset.json (path or dict) has "domains"; cases it does not
    list get site `unknown`. With the predictor's quality.csv in PRED, each case's predicted IoU per
    slice gives mean_predicted_iou and the gate AUC; without it gate_auc is NaN.
    """
    ref_dir, pred_dir = Path(ref_dir), Path(pred_dir)
    for folder, role in ((ref_dir, "reference"), (pred_dir, "prediction")):
        if not folder.is_dir():
            raise DesamError(f"{folder}: {role} folder not found")
    info = _load_dataset_json(dataset_json)
    ending = file_ending(info)
    references = list_case_files(ref_dir, ending)
    if not references:
        raise DesamError(f"{ref_dir}: no reference files ending in {ending}")
    predictions = list_case_files(pred_dir, ending)
    if not predictions:
        raise DesamError(f"{pred_dir}: no prediction files ending in {ending}")
    quality = pred_dir / QUALITY_FILE
    has_quality = quality.is_file()
    case_sites = domains(info)
    labels = list(labels)
    rows = []
    for case, reference_path in tqdm(references.items(), desc="evaluate", unit="case", disable=not progress):
        row: dict = {"case": case}
        if case_sites:
            row["site"] = case_sites.get(case, "unknown")
        if case in predictions:
            iou = read_predicted_iou(quality, case) if has_quality else None
            scores, _ = score_pair(reference_path, predictions[case], labels, nsd_tolerance, slice_axis, iou,
                                   str(quality))
            if has_quality:
                scores["mean_predicted_iou"] = float(iou.mean()) if iou is not None else float("nan")
            row |= scores | {"status": "ok"}
        else:
            row |= {column: float("nan") for column in (*METRICS, *CASE_DETECTION)} | {"status": "missing"}
        rows.append(row)
    columns = (["case"] + (["site"] if case_sites else []) + [*METRICS, *CASE_DETECTION]
               + (["mean_predicted_iou"] if has_quality else []) + ["status"])
    return pd.DataFrame(rows, columns=columns)


def summary_text(per_case: pd.DataFrame) -> str:
    """The per-site (and overall) summary as Markdown, with the count of missing predictions."""
    missing = int((per_case["status"] == "missing").sum())
    lines = [to_markdown(summarise(per_case, (*METRICS, *SUMMARY_DETECTION)), floatfmt=".4f")]
    lines.append(f"\n{len(per_case)} reference cases, {missing} without a prediction (status missing); "
                 "'excluded' counts cases whose value is NaN (missing, only one mask empty, no empty slice for "
                 "the specificity, no predicted IoU (quality.csv) or a single slice class for the gate AUC).")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="desam_evaluate_folder",
        description="Dice, HD95, ASSD and NSD (mm, from the NIfTI spacing), slice detection and connected "
                    "components of every case in REF against PRED.")
    parser.add_argument("ref", metavar="REF", help="folder of reference label files <case>.nii.gz")
    parser.add_argument("pred", metavar="PRED", help="folder of predicted label files <case>.nii.gz")
    parser.add_argument("-o", "--output", metavar="OUT.csv", default=None,
                        help=f"per-case CSV, or a folder to write {DEFAULT_OUTPUT} into (default: PRED/{DEFAULT_OUTPUT})")
    parser.add_argument("--dataset-json", metavar="PATH", default=None,
                        help="dataset.json giving file_ending and the 'domains' (case -> site) for a site column")
    parser.add_argument("--labels", type=int, nargs="+", default=[1],
                        help="label values counted as foreground (default: 1)")
    parser.add_argument("--nsd-tolerance", type=float, default=DEFAULT_NSD_TOLERANCE_MM, metavar="MM",
                        help="tolerance of the normalised surface Dice in mm (default: %(default)s)")
    parser.add_argument("--slice-axis", type=int, choices=(0, 1, 2), default=SLICE_AXIS,
                        help=f"array axis of the slices for slice detection (default: {SLICE_AXIS}, the NIfTI's third)")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nsd_tolerance < 0:
        raise DesamError(f"--nsd-tolerance must be >= 0, got {args.nsd_tolerance}")
    per_case = evaluate_folder(args.ref, args.pred, args.dataset_json, args.labels, args.nsd_tolerance,
                               slice_axis=args.slice_axis)
    output = Path(args.output) if args.output else Path(args.pred) / DEFAULT_OUTPUT
    if output.is_dir():  # -o FOLDER: the default file name inside it
        output = output / DEFAULT_OUTPUT
    write_csv(per_case, output)
    print(summary_text(per_case))
    print(f"per-case metrics written to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    main()
