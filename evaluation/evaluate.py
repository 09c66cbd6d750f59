"""`desam_evaluate -d DATASET --source SITE ... --mode MODE`: predict a trained model's test cases and score them.

The test cases of a model trained on the source site(s) are every case of every other site
(unseen domains) and the source cases held out by the chosen folds in `splits_final.json`
(in-domain). Unseen cases are predicted by the average of the chosen folds, each held-out source
case by the one fold that did not train on it. Predictions go through the predictor
(`desam_pipeline.inference.predictor`) into `<model folder>/predictions/<site>/<case>.nii.gz`; a prediction
is reused when its file exists and `predictions/prediction_settings.json` says it was made with
the same folds (same checkpoint files) and the same post-processing, grid and IoU threshold.

Per protocol, `<model folder>/evaluation/<protocol>/` receives per_case.csv, per_site.csv,
summary.json, per_site_boxplot.png and overlays/<site>_{best,median,worst}_<case>.png. Protocols:
`full` scores every slice in the original geometry (NIfTI spacing); `paper` is the reference
protocol of the paper (see `evaluation.paper_protocol`). Which cases are scored is decided in
`evaluation.evaluation_cases`, what is written per protocol in `evaluation.evaluation_outputs`.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
from tqdm import tqdm

from desam_pipeline.baselines.external_predictions import check_predictions, locate
from desam_pipeline.data.raw_dataset import file_ending, label_path, load_dataset_json
from desam_pipeline.inference import predictor
from desam_pipeline.inference.cli_args import prediction_parser
from desam_pipeline.inference.postprocessing import POSTPROCESSING
from desam_pipeline.inference.slice_prediction import MODES
from desam_pipeline.io.atomic import read_json, write_json
from desam_pipeline.io.nifti_io import read_volume, voxel_spacing
from desam_pipeline.io.results_layout import DEFAULT_TRAINER
from desam_pipeline.utilities.errors import DesamError, cli_entry
from desam_pipeline.utilities.metrics import check_same_geometry
from desam_pipeline.utilities.paths import Trees, add_root_arguments
from desam_pipeline.utilities.runtime import select_device, tune_malloc
from evaluation.evaluate_folder import evaluate_pair, foreground
from evaluation.evaluation_cases import (PREDICTIONS, EvalCase, check_sources, choose_folds, evaluation_cases,
                                         foreground_labels, locate_model, prediction_folder, prediction_path,
                                         train_command)
from evaluation.evaluation_outputs import EVALUATION, write_evaluation
from evaluation.paper_protocol import paper_metrics
from evaluation.tables import PROTOCOLS, markdown_section

PREDICTION_RECORD = "prediction_settings.json"
CONVERT_HINT = "convert it first (desam_convert_prostate_multisite, desam_convert_msd or desam_make_phantom)"


# ---------------------------------------------------------------- predictions
def prediction_settings(folder: Path, folds: Sequence[str], postprocess: str, grid: int,
                        iou_threshold: float, checkpoint_name: str = "final", grid_rule: str = "top1") -> dict:
    """What a saved prediction depends on: folds (with their checkpoint's name, size and mtime) and options."""
    checkpoints = {}
    for fold in folds:
        stat = (folder / f"fold_{fold}" / predictor.checkpoint_file(checkpoint_name)).stat()
        checkpoints[fold] = [stat.st_size, stat.st_mtime_ns]
    return {"folds": list(folds), "checkpoint_name": checkpoint_name, "checkpoints": checkpoints,
            "postprocess": postprocess, "grid": int(grid), "grid_rule": grid_rule,
            "iou_threshold": float(iou_threshold)}


def channel_files(raw_dir: Path, case: str, dataset_json: dict) -> tuple[Path, ...]:
    """Every channel file `imagesTr/<case>_XXXX<ending>` of a case (channel 0 first)."""
    count = max(len(dataset_json.get("channel_names", {})), 1)
    return tuple(raw_dir / "imagesTr" / f"{case}_{c:04d}{file_ending(dataset_json)}" for c in range(count))


def ensure_predictions(folder: Path, cases: list[EvalCase], raw_dir: Path, dataset_json: dict, *,
                       checkpoint: str | None = None, device: str = "auto", batch_size: int | None = None,
                       grid: int = 9, iou_threshold: float = 0.5, postprocess: str = "none",
                       preprocessed_root: str | None = None, progress: bool = True,
                       checkpoint_name: str = "final", grid_rule: str = "top1") -> dict[str, int]:
    """Predict the cases without an up-to-date saved prediction, through the predictor; returns counts."""
    record_path = folder / PREDICTIONS / PREDICTION_RECORD
    record = read_json(record_path) if record_path.is_file() else {}
    wanted = {c.case: prediction_settings(folder, c.folds, postprocess, grid, iou_threshold, checkpoint_name,
                                          grid_rule) for c in cases}
    todo = [c for c in cases if not (prediction_path(folder, c).is_file() and record.get(c.case) == wanted[c.case])]
    print(f"desam_evaluate: {len(cases) - len(todo)} saved prediction(s) reused, {len(todo)} to predict", flush=True)
    if not todo:
        return {"reused": len(cases), "predicted": 0}
    torch_device = select_device(device)
    fold_order = list(dict.fromkeys(f for c in todo for f in c.folds))
    model = predictor.load_model(folder, fold_order, torch_device, checkpoint_name)
    settings = predictor.make_settings(model.plan, torch_device, batch_size, grid=grid, iou_threshold=iou_threshold,
                                       grid_rule=grid_rule, postprocess=postprocess)
    engine = predictor.build_predictor(model, settings, checkpoint, preprocessed_root)
    groups: dict[tuple[tuple[str, ...], str], list[EvalCase]] = {}
    for case in todo:
        groups.setdefault((case.folds, case.site), []).append(case)
    failed = []
    for (folds, site), members in groups.items():
        networks = [model.networks[model.folds.index(f)] for f in folds]
        fold_model = dataclasses.replace(model, folds=list(folds), networks=networks)
        part = predictor.Predictor(fold_model, engine.encoder, settings, engine.cache_index)
        site_dir = prediction_folder(folder, site)
        print(f"desam_evaluate: {site}: {len(members)} case(s) with fold(s) {', '.join(folds)}", flush=True)
        inputs = [predictor.CaseInput(c.case, channel_files(raw_dir, c.case, dataset_json)) for c in members]
        for result in part.predict_cases(inputs, site_dir, show_progress=progress):
            if result.status == "predicted":
                record[result.case] = wanted[result.case]
            else:
                record.pop(result.case, None)
                failed.append(f"{result.case}: {result.message}")
        write_json(record, record_path)
        predictor.merge_quality(site_dir)
    if failed:
        raise DesamError(f"{len(failed)} case(s) could not be predicted ({'; '.join(failed)}); fix them and rerun "
                         "(finished predictions are kept)")
    return {"reused": len(cases) - len(todo), "predicted": len(todo)}


# ---------------------------------------------------------------- scoring
def mean_predicted_iou(folder: Path, case: EvalCase) -> float:
    """Mean over slices of PRIM's predicted IoU from the predictor's quality/<case>.csv (NaN if absent)."""
    path = predictor.quality_path(prediction_folder(folder, case.site), case.case)
    if not path.is_file():
        return float("nan")
    values = pd.read_csv(path)["predicted_iou"]
    return float(values.mean()) if len(values) else float("nan")


def score_case(reference_path: Path, prediction_file: Path, protocol: str, labels: Sequence[int],
               slice_axis: int, nsd_tolerance: float) -> dict:
    """Metrics of one prediction under a protocol."""
    if protocol == "full":
        return evaluate_pair(reference_path, prediction_file, labels, nsd_tolerance)
    reference, reference_image = read_volume(reference_path)
    prediction, prediction_image = read_volume(prediction_file)
    check_same_geometry(reference_image, prediction_image, reference_path, prediction_file)
    return paper_metrics(foreground(reference, labels), foreground(prediction, labels), voxel_spacing(reference_image),
                         slice_axis, nsd_tolerance)


def score_cases(folder: Path, cases: list[EvalCase], raw_dir: Path, dataset_json: dict, protocol: str,
                slice_axis: int, nsd_tolerance: float = 1.0, progress: bool = True) -> pd.DataFrame:
    """per_case table: case, site, in_domain, folds, dice, hd95, assd, nsd, [slices_scored], mean_predicted_iou."""
    labels = foreground_labels(dataset_json)
    rows = []
    for case in tqdm(cases, desc=f"score ({protocol})", unit="case", disable=not progress, dynamic_ncols=True):
        metrics = score_case(label_path(raw_dir, case.case, dataset_json), prediction_path(folder, case), protocol,
                             labels, slice_axis, nsd_tolerance)
        rows.append({"case": case.case, "site": case.site, "in_domain": case.in_domain,
                     "folds": "+".join(case.folds), **metrics, "mean_predicted_iou": mean_predicted_iou(folder, case)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the command
def evaluate_model(dataset: str | int, sources: Sequence[str], mode: str, protocols: Iterable[str] = ("full",),
                   folds: Sequence[str] | None = None, checkpoint: str | None = None, plans_name: str | None = None,
                   device: str = "auto", postprocess: str = "none", batch_size: int | None = None, grid: int = 9,
                   iou_threshold: float = 0.5, nsd_tolerance: float = 1.0, raw: str | None = None,
                   preprocessed: str | None = None, results: str | None = None,
                   progress: bool = True, trainer: str = DEFAULT_TRAINER, model_folder: str | None = None,
                   checkpoint_name: str = "final", grid_rule: str = "top1") -> dict[str, Path]:
    """Predict (or reuse) and score every test case of one model (of the trainer class `trainer`);
    returns protocol -> evaluation folder.

    With `model_folder` (a results folder of external predictions) the saved predictions are scored as
    they are and `mode` may be None.
    """
    protocols = list(dict.fromkeys(protocols))
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or (model_folder is None and mode not in MODES) or postprocess not in POSTPROCESSING:
        raise DesamError(f"unknown protocol {unknown}, mode {mode!r} or post-processing {postprocess!r}")
    if not sources:
        raise DesamError("--source: name the site(s) the model was trained on")
    if nsd_tolerance < 0:
        raise DesamError(f"--nsd-tolerance must be >= 0, got {nsd_tolerance}")
    sources = sorted(set(sources))
    trees = Trees(dataset, raw=raw, preprocessed=preprocessed, results=results)
    raw_dir = trees.raw
    if not raw_dir.is_dir():
        raise DesamError(f"{raw_dir}: raw dataset not found; {CONVERT_HINT}")
    dataset_json = load_dataset_json(raw_dir)
    check_sources(raw_dir, dataset_json, sources)
    external = None
    if model_folder is None:
        folder, plans = locate_model(trees, sources, mode, plans_name, trainer)
        chosen_folds = choose_folds(folder, folds, train_command(trees.dataset, sources, mode, plans, trainer=trainer),
                                    checkpoint_name)
    else:
        folder, external = locate(trees.results, model_folder, sources, folds)
        plans, mode, chosen_folds = external["plans"], external["mode"], external["folds"]
    cases = evaluation_cases(raw_dir, dataset_json, trees.preprocessed, folder, sources, chosen_folds)
    if external is None:
        counts = ensure_predictions(folder, cases, raw_dir, dataset_json, checkpoint=checkpoint, device=device,
                                    batch_size=batch_size, grid=grid, iou_threshold=iou_threshold,
                                    postprocess=postprocess, preprocessed_root=preprocessed, progress=progress,
                                    checkpoint_name=checkpoint_name, grid_rule=grid_rule)
        plan = read_json(folder / "plans.json")
        shown_trainer = "" if trainer == DEFAULT_TRAINER else f"{trainer}, "
        title = (f"{trees.dataset}: {shown_trainer}{mode} mode, trained on {'+'.join(sources)} "
                 f"(folds {', '.join(chosen_folds)})")
    else:
        counts = check_predictions(folder, cases, external)
        plan = external["scoring_plan"]
        title = f"{trees.dataset}: {external['description']}, trained on {'+'.join(sources)}"
    written = {}
    for protocol in protocols:
        per_case = score_cases(folder, cases, raw_dir, dataset_json, protocol, int(plan["slice_axis"]),
                               nsd_tolerance, progress)
        context = {"protocol": protocol, "dataset": trees.dataset, "model_folder": folder.name, "trainer": trainer, "mode": mode,
                   "source": sources, "plans_name": plans, "folds": chosen_folds,
                   "checkpoint_name": checkpoint_name, "checkpoint_file": predictor.checkpoint_file(checkpoint_name),
                   "in_domain_fold_of_case": {c.case: c.folds[0] for c in cases if c.in_domain},
                   "postprocess": postprocess, "grid": grid, "grid_rule": grid_rule, "iou_threshold": iou_threshold,
                   "nsd_tolerance_mm": nsd_tolerance, "labels": foreground_labels(dataset_json),
                   "predictions": {"folder": str(folder / PREDICTIONS), **counts}}
        if external is not None:
            context |= {"external": external["description"], "schedule": external["schedule"]}
        out_dir = folder / EVALUATION / protocol
        per_site = write_evaluation(per_case, out_dir, context, title, raw_dir, dataset_json, folder, plan)
        shown = per_site[per_site["metric"].isin(["dice", "hd95"])]
        print(markdown_section(f"{title}: per site", shown, protocol))
        print(f"desam_evaluate: {protocol} evaluation written to {out_dir}", file=sys.stderr)
        written[protocol] = out_dir
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="desam_evaluate",
        description="Predict every unseen-site case and the held-out source cases of a trained DeSAM model, "
                    "then score them per case and per site (Dice, HD95, ASSD, NSD).",
        parents=[prediction_parser()])
    parser.add_argument("-d", "--dataset", required=True, help="dataset number or DatasetNNN_Name")
    parser.add_argument("--source", nargs="+", required=True, metavar="SITE",
                        help="the source site(s) the model was trained on")
    parser.add_argument("--mode", choices=MODES, default=None, help="the model's prompt mode (required unless "
                                                                    "--model-folder names external predictions)")
    parser.add_argument("-tr", "--trainer", default=DEFAULT_TRAINER, metavar="NAME",
                        help=f"the trainer class that trained the model (default {DEFAULT_TRAINER}; e.g. "
                             "CoupledSAMTrainer, ZeroShotSAMTrainer)")
    parser.add_argument("--model-folder", default=None, metavar="NAME",
                        help="score the predictions of a results folder made outside desam (e.g. by "
                             "desam_nnunet_baseline) as they are, without desam's predictor")
    parser.add_argument("--protocol", nargs="+", choices=sorted(PROTOCOLS), default=["full"],
                        help="full: every slice in original geometry (default); paper: the reference protocol "
                             "(foreground slices only, 256x256, 50-px border zeroed); both may be given")
    parser.add_argument("-f", "--folds", nargs="+", default=None,
                        help="folds to use (default: every numbered fold with the chosen checkpoint, else 'all')")
    parser.add_argument("--plans-name", default=None, help="the model's plan (default: the dataset's only plan)")
    parser.add_argument("--nsd-tolerance", type=float, default=1.0, metavar="MM",
                        help="tolerance of the normalised surface Dice in mm (default: 1)")
    add_root_arguments(parser, "raw", "preprocessed", "results")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mode is None and args.model_folder is None:
        parser.error("--mode is required (or --model-folder for external predictions)")
    tune_malloc()
    evaluate_model(args.dataset, args.source, args.mode, protocols=args.protocol, folds=args.folds,
                   checkpoint=args.checkpoint, plans_name=args.plans_name, device=args.device,
                   postprocess=args.postprocess, batch_size=args.batch_size, grid=args.grid,
                   iou_threshold=args.iou_threshold, nsd_tolerance=args.nsd_tolerance, raw=args.raw,
                   preprocessed=args.preprocessed, results=args.results, trainer=args.trainer,
                   model_folder=args.model_folder, checkpoint_name=args.checkpoint_name, grid_rule=args.grid_rule)
    return 0


if __name__ == "__main__":
    main()
