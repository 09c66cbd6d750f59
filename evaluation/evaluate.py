"""`desam_evaluate -d DATASET --source SITE ... --mode MODE`: predict a trained model's test cases and score them.

The test cases of a model trained on the source site(s) are every case of every other site
(unseen domains) and the source cases held out by the chosen folds in `splits_final.json`
(in-domain). Unseen cases are predicted by the average of the chosen folds, each held-out source
case by the one fold that did not train on it. Predictions go through the predictor
(`desam_pipeline.inference.predictor`) into `<model folder>/predictions/<site>/<case>.nii.gz`; a prediction
is reused when its file exists and `predictions/prediction_settings.json` says it was made with
the same folds (same checkpoint files) and the same post-processing, grid and IoU threshold.

Per protocol, `<model folder>/evaluation/<protocol>/` receives per_case.csv, per_site.csv,
summary.json, per_site_boxplot.png and overlays/<site>_<tags>_<case>.png (tags: worst, median, best;
a case that is several, e.g. `worst-median-best` at a site of one case, is drawn once). Protocols:
`full` scores every slice in the original geometry (NIfTI spacing) and also measures whether the
model can say "no structure here": slice detection, false-positive slices, connected components and
how well PRIM's predicted IoU separates slices and ranks cases (per_slice.csv holds the slices; see
`evaluation.detection_tables` and docs/metrics.md); `paper` is the reference protocol of the paper (see
`evaluation.paper_protocol`), which scores structure-holding slices only. Which cases are scored is decided in
`evaluation.evaluation_cases`, what is written per protocol in `evaluation.evaluation_outputs`. A dataset with
several structures is evaluated per structure and as the mean over them (`evaluation.class_tables`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd
from tqdm import tqdm

from desam_pipeline.baselines.external_predictions import check_predictions, locate
from desam_pipeline.data.plan_io import read_plan_file
from desam_pipeline.data.prompts import MODES
from desam_pipeline.data.raw_dataset import file_ending, label_classes, label_path, load_dataset_json
from desam_pipeline.inference.inputs import CaseInput
from desam_pipeline.inference.model import checkpoint_file, stored_gate_thresholds
from desam_pipeline.inference.outputs import quality_path
from desam_pipeline.inference.prediction_cache import PREDICTIONS, SavedCase, ensure_predictions, group_folder
from desam_pipeline.inference.settings import CALIBRATED, FILE_HANDLING, PredictionSettings
from desam_pipeline.io.results_layout import DEFAULT_TRAINER, MODEL_PLAN, class_folder
from desam_pipeline.utilities.errors import DesamError, cli_entry
from desam_pipeline.utilities.metrics import DEFAULT_NSD_TOLERANCE_MM
from desam_pipeline.utilities.paths import Trees, add_root_arguments
from desam_pipeline.utilities.runtime import tune_malloc
from desam_pipeline.utilities.setting_flags import add_setting_flags, settings_from_args
from evaluation.class_tables import mean_over_structures, structure_dataset_json, structure_table
from evaluation.detection_tables import SLICE_COLUMNS, read_predicted_iou
from evaluation.evaluate_folder import read_pair, score_pair
from evaluation.evaluation_cases import (EvalCase, check_sources, choose_folds, evaluation_cases, foreground_labels,
                                         locate_model, prediction_path, train_command)
from evaluation.evaluation_outputs import EVALUATION, per_site_markdown, write_evaluation
from evaluation.paper_protocol import paper_metrics
from evaluation.settings import EvaluationSettings
from evaluation.tables import markdown_section

CONVERT_HINT = "convert it first (desam_convert_prostate_multisite, desam_convert_msd or desam_make_phantom)"


def channel_files(raw_dir: Path, case: str, dataset_json: dict) -> tuple[Path, ...]:
    """Every channel file `imagesTr/<case>_XXXX<ending>` of a case (channel 0 first)."""
    count = max(len(dataset_json.get("channel_names", {})), 1)
    return tuple(raw_dir / "imagesTr" / f"{case}_{c:04d}{file_ending(dataset_json)}" for c in range(count))


def saved_cases(cases: list[EvalCase], raw_dir: Path, dataset_json: dict) -> list[SavedCase]:
    """The test cases as the prediction cache takes them: input files, folds, a prediction folder per site."""
    return [SavedCase(CaseInput(c.case, channel_files(raw_dir, c.case, dataset_json)), c.folds, c.site)
            for c in cases]


# ---------------------------------------------------------------- scoring
def score_case(reference_path: Path, prediction_file: Path, protocol: str, labels: Sequence[int],
               slice_axis: int, nsd_tolerance: float, quality_file: Path) -> tuple[dict, pd.DataFrame | None]:
    """Metrics of one prediction under a protocol, with mean_predicted_iou (the mean over slices of PRIM's
    predicted IoU in `quality_file`, the predictor's quality/<case>.csv; NaN without one).

    `full` adds the slice detection and components (detection_tables.CASE_DETECTION) and returns the
    case's per-slice rows; `paper` scores only slices that hold the structure, so it has no empty slice
    to detect: it adds slices_scored and returns no per-slice rows.
    """
    predicted_iou = read_predicted_iou(quality_file)
    mean_iou = {"mean_predicted_iou": float(predicted_iou.mean()) if predicted_iou is not None else float("nan")}
    if protocol == "full":
        scores, slices = score_pair(reference_path, prediction_file, labels, nsd_tolerance, slice_axis, predicted_iou,
                                    str(quality_file))
        return scores | mean_iou, slices
    reference, prediction, spacing = read_pair(reference_path, prediction_file, labels)
    return paper_metrics(reference, prediction, spacing, slice_axis, nsd_tolerance) | mean_iou, None


def score_cases(folder: Path, cases: list[EvalCase], raw_dir: Path, dataset_json: dict, protocol: str,
                slice_axis: int, nsd_tolerance: float = DEFAULT_NSD_TOLERANCE_MM,
                progress: bool = True, structure: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The per_case table (case, site, in_domain, folds, dice, hd95, assd, nsd, then `full`: CASE_DETECTION,
    `paper`: slices_scored, then mean_predicted_iou) and, under `full`, the per-slice rows of every case
    (case, site, in_domain, slice, reference, predicted, predicted_iou; None under `paper`).

    `structure`: score the structure with this label value (its predicted IoU from its own quality folder)."""
    labels = foreground_labels(dataset_json) if structure is None else [structure]
    rows, slice_rows = [], []
    for case in tqdm(cases, desc=f"score ({protocol})", unit="case", disable=not progress, dynamic_ncols=True):
        site_dir = group_folder(folder, case.site)
        quality = quality_path(site_dir if structure is None else class_folder(site_dir, structure), case.case)
        scores, slices = score_case(label_path(raw_dir, case.case, dataset_json), prediction_path(folder, case),
                                    protocol, labels, slice_axis, nsd_tolerance, quality)
        identity = {"case": case.case, "site": case.site, "in_domain": case.in_domain}
        rows.append(identity | {"folds": "+".join(case.folds), **scores})
        if slices is not None:
            slice_rows.append(slices.assign(**identity)[[*identity, *SLICE_COLUMNS]])
    per_slice = pd.concat(slice_rows, ignore_index=True) if slice_rows else None
    return pd.DataFrame(rows), per_slice


# ---------------------------------------------------------------- the command
def evaluate_model(dataset: str | int, sources: Sequence[str], mode: str | None,
                   settings: EvaluationSettings = EvaluationSettings(), raw: str | None = None,
                   preprocessed: str | None = None, results: str | None = None,
                   progress: bool = True) -> dict[str, Path]:
    """Predict (or reuse) and score every test case of one model (of the trainer class `settings.trainer`);
    returns protocol -> evaluation folder.

    With `settings.model_folder` (a results folder of external predictions) the saved predictions are
    scored as they are and `mode` may be None.
    """
    settings.validate()
    trainer, prediction = settings.trainer, settings.prediction
    if settings.model_folder is None and mode not in MODES:
        raise DesamError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if not sources:
        raise DesamError("--source: name the site(s) the model was trained on")
    sources = sorted(set(sources))
    trees = Trees(dataset, raw=raw, preprocessed=preprocessed, results=results)
    raw_dir = trees.raw
    if not raw_dir.is_dir():
        raise DesamError(f"{raw_dir}: raw dataset not found; {CONVERT_HINT}")
    dataset_json = load_dataset_json(raw_dir)
    check_sources(raw_dir, dataset_json, sources)
    external = None
    if settings.model_folder is None:
        folder, plans = locate_model(trees, sources, mode, settings.plans_name, trainer)
        chosen_folds = choose_folds(folder, settings.folds, train_command(trees.dataset, sources, mode, plans,
                                                                          trainer=trainer),
                                    prediction.checkpoint_name)
    else:
        folder, external = locate(trees.results, settings.model_folder, sources, settings.folds)
        plans, mode, chosen_folds = external["plans"], external["mode"], external["folds"]
    cases = evaluation_cases(raw_dir, dataset_json, trees.preprocessed, folder, sources, chosen_folds)
    if external is None:
        counts = ensure_predictions(folder, saved_cases(cases, raw_dir, dataset_json), prediction, preprocessed,
                                    progress)
        plan = read_plan_file(folder / MODEL_PLAN)
        shown_trainer = "" if trainer == DEFAULT_TRAINER else f"{trainer}, "
        title = (f"{trees.dataset}: {shown_trainer}{mode} mode, trained on {'+'.join(sources)} "
                 f"(folds {', '.join(chosen_folds)})")
    else:
        counts = check_predictions(folder, cases, external)
        plan = external["scoring_plan"]
        title = f"{trees.dataset}: {external['description']}, trained on {'+'.join(sources)}"
    # read from the fold checkpoints once, not per protocol
    thresholds = (stored_gate_thresholds(folder, chosen_folds, prediction.checkpoint_name)
                  if external is None and mode == "grid" and prediction.iou_threshold == CALIBRATED else None)
    written = {}
    for protocol in dict.fromkeys(settings.protocols):
        context = {"protocol": protocol, "dataset": trees.dataset, "model_folder": folder.name, "trainer": trainer,
                   "mode": mode, "source": sources, "plans_name": plans, "folds": chosen_folds,
                   **prediction.choices(), "checkpoint_file": checkpoint_file(prediction.checkpoint_name),
                   "in_domain_fold_of_case": {c.case: c.folds[0] for c in cases if c.in_domain},
                   "nsd_tolerance_mm": settings.nsd_tolerance, "labels": foreground_labels(dataset_json),
                   "predictions": {"folder": str(folder / PREDICTIONS), **counts}}
        if external is not None:
            context |= {"external": external["description"], "schedule": external["schedule"]}
        elif thresholds is not None:
            context["gate_thresholds"] = thresholds
        out_dir = folder / EVALUATION / protocol
        structures = label_classes(dataset_json)
        if structures:
            by_structure, site_tables = {}, {}
            for name, value in structures.items():
                per_case, per_slice = score_cases(folder, cases, raw_dir, dataset_json, protocol,
                                                  int(plan["slice_axis"]), settings.nsd_tolerance, progress, value)
                site_tables[name] = write_evaluation(per_case, per_slice, out_dir / name,
                                                     context | {"labels": [value], "structure": name},
                                                     f"{title}, {name}", raw_dir,
                                                     structure_dataset_json(dataset_json, name), folder, plan)
                by_structure[name] = per_case
            per_site = write_evaluation(mean_over_structures(by_structure), None, out_dir,
                                        context | {"structures": structures}, f"{title}, mean over structures",
                                        raw_dir, dataset_json, folder, plan)
            print(markdown_section(f"{title}: Dice per structure", structure_table(site_tables), protocol))
        else:
            per_case, per_slice = score_cases(folder, cases, raw_dir, dataset_json, protocol, int(plan["slice_axis"]),
                                              settings.nsd_tolerance, progress)
            per_site = write_evaluation(per_case, per_slice, out_dir, context, title, raw_dir, dataset_json, folder,
                                        plan)
        print(per_site_markdown(per_site, title, protocol))
        print(f"desam_evaluate: {protocol} evaluation written to {out_dir}", file=sys.stderr)
        written[protocol] = out_dir
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="desam_evaluate",
        description="Predict every unseen-site case and the held-out source cases of a trained DeSAM model, "
                    "then score them per case and per site (Dice, HD95, ASSD, NSD).")
    add_setting_flags(parser, PredictionSettings, exclude=FILE_HANDLING)
    parser.add_argument("-d", "--dataset", required=True, help="dataset number or DatasetNNN_Name")
    parser.add_argument("--source", nargs="+", required=True, metavar="SITE",
                        help="the source site(s) the model was trained on")
    parser.add_argument("--mode", choices=MODES, default=None, help="the model's prompt mode (required unless "
                                                                    "--model-folder names external predictions)")
    add_setting_flags(parser, EvaluationSettings)
    add_root_arguments(parser, "raw", "preprocessed", "results")
    return parser


def settings_of(args: argparse.Namespace) -> EvaluationSettings:
    """The evaluation settings the parsed flags describe."""
    return settings_from_args(EvaluationSettings, args, prediction=settings_from_args(PredictionSettings, args))


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mode is None and args.model_folder is None:
        parser.error("--mode is required (or --model-folder for external predictions)")
    tune_malloc()
    evaluate_model(args.dataset, args.source, args.mode, settings_of(args), raw=args.raw,
                   preprocessed=args.preprocessed, results=args.results)
    return 0


if __name__ == "__main__":
    main()
