"""Model folders whose predictions were made outside desam (baselines such as nnU-Net v2).

Such a folder sits beside DeSAM's under `<results>/<Dataset>/` and is named like them,
`<Trainer>__<plans>__<mode>__src-<SITES>` (for nnU-Net: `nnUNetTrainer_5epochs__nnUNetPlans__2d__src-RUNMC`,
the configuration standing in for the mode). It holds `predictions/<site>/<case>.nii.gz` in each case's
original geometry and a record, `external_predictions.json`:

    made_by      "nnU-Net v2 2.8.1" (one line naming the tool)
    description  one line for tables: tool, trainer, configuration, folds and the training schedule
    plans, mode  the plans identifier and the mode part of the folder name (nnU-Net: its configuration)
    sources      the source site(s); folds: the folds the unseen sites were predicted with
    in_domain_fold_of_case   held-out source case -> the fold that predicted it
    schedule     what the run trained for (trainer, epochs, iterations per epoch, device)
    scoring_plan slice_axis, slice_size and intensity window of desam's slice grid (the paper protocol
                 and its overlays score on that grid)

`desam_evaluate --model-folder NAME` scores such a folder without running desam's predictor.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from desam_pipeline.data import splits
from desam_pipeline.data.plan_io import DEFAULT_CHOICES
from desam_pipeline.inference.prediction_cache import prediction_file
from desam_pipeline.io.atomic import read_json, write_json
from desam_pipeline.utilities.errors import DesamError

RECORD_FILE = "external_predictions.json"
REQUIRED_KEYS = ("made_by", "description", "plans", "mode", "sources", "folds", "in_domain_fold_of_case", "schedule", "scoring_plan")


def default_scoring_plan() -> dict:
    """desam's slice grid (axis, size, intensity window) for protocols and overlays that score on it."""
    return {key: DEFAULT_CHOICES[key] for key in ("slice_axis", "slice_size", "intensity")}


def is_external(folder: Path) -> bool:
    return (Path(folder) / RECORD_FILE).is_file()


def write_record(folder: Path, *, made_by: str, description: str, plans: str, mode: str, sources: Sequence[str],
                 folds: Sequence[str], in_domain_fold_of_case: dict[str, str], schedule: dict) -> Path:
    """Write the record (atomically) once every prediction is in place; returns its path."""
    record = {"made_by": made_by, "description": description, "plans": plans, "mode": mode,
              "sources": sorted(set(sources)),
              "folds": [str(f) for f in folds], "in_domain_fold_of_case": dict(sorted(in_domain_fold_of_case.items())),
              "schedule": schedule, "scoring_plan": default_scoring_plan()}
    path = Path(folder) / RECORD_FILE
    write_json(record, path)
    return path


def read_record(folder: Path) -> dict:
    """The record of an external-predictions folder, or a DesamError naming the file and what is wrong."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        raise DesamError(f"{path}: not found; {Path(folder).name} is not a folder of external predictions")
    record = read_json(path)
    missing = [k for k in REQUIRED_KEYS if not isinstance(record, dict) or k not in record]
    if missing:
        raise DesamError(f"{path}: missing key(s) {', '.join(missing)}")
    return record


def locate(results_dir: Path, name: str, sources: Sequence[str], folds: Sequence[str] | None) -> tuple[Path, dict]:
    """The results folder `name` of external predictions for these sources (and folds, when given), and its
    record."""
    folder = Path(results_dir) / name
    if not folder.is_dir():
        raise DesamError(f"{folder}: not found; make its predictions first (e.g. desam_nnunet_baseline)")
    record = read_record(folder)
    if sorted(record["sources"]) != sorted(sources):
        raise DesamError(f"{folder}: trained on {'+'.join(record['sources'])}, not {'+'.join(sources)}")
    if folds and sorted(str(splits.parse_fold(f)) for f in folds) != sorted(record["folds"]):
        raise DesamError(f"{folder}: predictions were made with fold(s) {', '.join(record['folds'])}; "
                         "rerun the baseline with the folds you want")
    return folder, record


def check_predictions(folder: Path, cases: Sequence, record: dict) -> dict:
    """Every test case (objects with case, site, in_domain, folds) has its prediction, and each held-out source
    case was predicted by the fold that holds it out in splits_final.json; returns the evaluation's counts."""
    made = record["in_domain_fold_of_case"]
    wrong = [c.case for c in cases if c.in_domain and made.get(c.case) != c.folds[0]]
    if wrong:
        raise DesamError(f"{folder}: held-out source case(s) {', '.join(wrong)} were not predicted by the fold "
                         "that holds them out in splits_final.json (split edited since?); rerun the baseline")
    missing = [str(prediction_file(folder, c.site, c.case)) for c in cases
               if not prediction_file(folder, c.site, c.case).is_file()]
    if missing:
        raise DesamError(f"{len(missing)} external prediction(s) missing ({', '.join(missing[:3])}); "
                         f"{record['made_by']} did not predict every test case, rerun it")
    return {"reused": len(cases), "predicted": 0, "made_by": record["made_by"]}
