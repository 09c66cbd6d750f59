"""`desam_evaluate -d DATASET --source SITE ... --mode MODE`: predict a trained model's test cases and score them.

The test cases of a model trained on the source site(s) are every case of every other site
(unseen domains) and the source cases held out by the chosen folds in `splits_final.json`
(in-domain). Unseen cases are predicted by the average of the chosen folds, each held-out source
case by the one fold that did not train on it. Predictions go through the predictor
(`desam_pipeline.predictor`) into `<model folder>/predictions/<site>/<case>.nii.gz`; a prediction
is reused when its file exists and `predictions/prediction_settings.json` says it was made with
the same folds (same checkpoint files) and the same post-processing, grid and IoU threshold.

Per protocol, `<model folder>/evaluation/<protocol>/` receives per_case.csv, per_site.csv,
summary.json, per_site_boxplot.png and overlays/<site>_{best,median,worst}_<case>.png. Protocols:
`full` scores every slice in the original geometry (NIfTI spacing); `paper` is the reference
protocol of the paper (see `evaluation.paper_protocol`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from desam_pipeline import predictor, splits
from desam_pipeline.atomic import read_json, write_json
from desam_pipeline.cli_args import prediction_parser
from desam_pipeline.embedding import preprocess_volume
from desam_pipeline.errors import DesamError, cli_entry
from desam_pipeline.external_predictions import check_predictions, locate
from desam_pipeline.inference import MODES
from desam_pipeline.metrics import METRICS, check_same_geometry
from desam_pipeline.nifti_io import read_volume, voxel_spacing
from desam_pipeline.paths import Trees, add_root_arguments
from desam_pipeline.orientation import LEGACY_ORIENTATION, from_slices, plan_orientation, to_slices
from desam_pipeline.postprocessing import POSTPROCESSING
from desam_pipeline.raw_dataset import (check_sites, domains, file_ending, image_path, label_path, list_cases,
                                         load_dataset_json)
from desam_pipeline.results_layout import DEFAULT_TRAINER, model_folder_name
from desam_pipeline.runtime import select_device, tune_malloc
from desam_pipeline.train import find_plans_name
from evaluation.evaluate_folder import evaluate_pair, foreground
from evaluation.paper_protocol import (BORDER, SLICE_SIZE, paper_metrics, paper_volumes, reference_label_grid,
                                       slice_grid_spacing, to_slice_grid, zero_border)
from evaluation.plots import overlay_png, site_boxplot_png
from evaluation.tables import OVERALL, PROTOCOLS, label_protocol, markdown_section, summarise, write_csv

PREDICTIONS = "predictions"
PREDICTION_RECORD = "prediction_settings.json"
EVALUATION = "evaluation"
OVERLAYS = "overlays"
UNSEEN = "unseen"
CONVERT_HINT = "convert it first (desam_convert_prostate_multisite, desam_convert_msd or desam_make_phantom)"


@dataclasses.dataclass(frozen=True)
class EvalCase:
    """One case to score: its site, whether it is a held-out case of the source, the fold(s) predicting it."""
    case: str
    site: str
    in_domain: bool
    folds: tuple[str, ...]


# ---------------------------------------------------------------- model folder, folds, test cases
def train_command(dataset: str, sources: Sequence[str], mode: str, plans_name: str, fold: str = "FOLD",
                  trainer: str = DEFAULT_TRAINER) -> str:
    return (f"desam_train {dataset} {fold} --source {' '.join(sorted(set(sources)))} --mode {mode} "
            f"--plans-name {plans_name}" + (f" -tr {trainer}" if trainer != DEFAULT_TRAINER else ""))


def locate_model(trees: Trees, sources: Sequence[str], mode: str, plans_name: str | None,
                 trainer: str = DEFAULT_TRAINER) -> tuple[Path, str]:
    """The model folder desam_train writes for these flags (same plan choice and folder name), and its plan name."""
    if not trees.preprocessed.is_dir():
        raise DesamError(f"{trees.preprocessed}: not found; run desam_plan_and_embed -d {trees.dataset}, "
                         "then desam_train")
    plans = find_plans_name(trees.preprocessed, plans_name)
    folder = trees.results / model_folder_name(trainer, plans, mode, list(sources))
    if not folder.is_dir():
        command = train_command(trees.dataset, sources, mode, plans, trainer=trainer)
        raise DesamError(f"{folder}: no trained model; run `{command}` for each fold 0-4 (or fold all) first")
    return folder, plans


def choose_folds(folder: Path, requested: Sequence[str] | None, hint: str, checkpoint_name: str = "final") -> list[str]:
    """The requested folds (each must have the named checkpoint), else the predictor's default folds."""
    available = predictor.available_folds(folder, checkpoint_name)
    name = predictor.checkpoint_file(checkpoint_name)
    if not available:
        raise DesamError(f"{folder}: no fold has {name}; run `{hint}` to the end first")
    if not requested:
        return predictor.default_folds(folder, checkpoint_name)
    folds = list(dict.fromkeys(str(splits.parse_fold(f)) for f in requested))
    missing = [f for f in folds if f not in available]
    if missing:
        raise DesamError(f"{folder}: fold(s) {', '.join(missing)} have no {name} (trained: "
                         f"{', '.join(available)}); run `{hint.replace('FOLD', missing[0])}` first")
    return folds


def held_out_cases(preprocessed_dir: Path, folder: Path, sources: Sequence[str], source_cases: list[str],
                   folds: Sequence[str]) -> dict[str, str]:
    """source case -> the chosen fold that held it out, from splits_final.json (never written here).

    A fold's debug.json records the cases it validated on; a split edited since is an error, as the
    fold would then be scored on cases it trained on.
    """
    key = splits.source_key(list(sources))
    split = splits.load_or_create_splits(preprocessed_dir, key, source_cases, write=False)
    held: dict[str, str] = {}
    for fold in folds:
        parsed = splits.parse_fold(fold)
        _, val = splits.fold_cases(split, parsed, source_cases, key)
        debug = folder / f"fold_{fold}" / "debug.json"
        if debug.is_file():
            trained_val = read_json(debug).get("val_cases")
            if trained_val is not None and sorted(trained_val) != sorted(val):
                raise DesamError(f"{preprocessed_dir / splits.SPLITS_FILE}: {key} fold {fold} now holds out "
                                 f"{', '.join(sorted(val)) or 'nothing'}, but the fold was trained holding out "
                                 f"{', '.join(sorted(trained_val)) or 'nothing'} ({debug}); retrain it or "
                                 "restore the split")
        for case in val:
            held.setdefault(case, fold)
    return held


def check_sources(raw_dir: Path, dataset_json: dict, sources: Sequence[str]) -> None:
    """The dataset has sites ("domains") and the source sites are among them."""
    case_sites = domains(dataset_json)
    if not case_sites:
        raise DesamError(f"{raw_dir / 'dataset.json'}: no 'domains' (case -> site); the evaluation needs sites")
    check_sites(dataset_json, sources, raw_dir.name, kind="source site")


def evaluation_cases(raw_dir: Path, dataset_json: dict, preprocessed_dir: Path, folder: Path,
                     sources: Sequence[str], folds: Sequence[str]) -> list[EvalCase]:
    """Every case of every non-source site (all folds) plus each held-out source case (its own fold)."""
    case_sites = domains(dataset_json)
    cases = [c for c in list_cases(raw_dir, dataset_json) if c in case_sites]
    source_cases = [c for c in cases if case_sites[c] in sources]
    held = held_out_cases(preprocessed_dir, folder, sources, source_cases, folds)
    chosen = []
    for case in cases:
        site = case_sites[case]
        if site not in sources:
            chosen.append(EvalCase(case, site, False, tuple(folds)))
        elif case in held:
            chosen.append(EvalCase(case, site, True, (held[case],)))
    if not chosen:
        raise DesamError(f"{raw_dir}: nothing to evaluate: no case outside {', '.join(sources)} and no held-out "
                         f"source case in folds {', '.join(folds)}")
    for case in chosen:
        if not label_path(raw_dir, case.case, dataset_json).is_file():
            raise DesamError(f"{label_path(raw_dir, case.case, dataset_json)}: ground truth not found; "
                             "evaluation needs the label of every test case")
    return chosen


# ---------------------------------------------------------------- predictions
def prediction_path(folder: Path, case: EvalCase) -> Path:
    return predictor.output_path(folder / PREDICTIONS / case.site, case.case)


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
        site_dir = folder / PREDICTIONS / site
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
def foreground_labels(dataset_json: dict) -> list[int]:
    """Every non-zero integer label of dataset.json (training targets are label > 0); (1,) if none."""
    values = [v for v in dataset_json.get("labels", {}).values() if isinstance(v, int) and v != 0]
    return sorted(values) or [1]


def mean_predicted_iou(folder: Path, case: EvalCase) -> float:
    """Mean over slices of PRIM's predicted IoU from the predictor's quality/<case>.csv (NaN if absent)."""
    path = predictor.quality_path(folder / PREDICTIONS / case.site, case.case)
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


# ---------------------------------------------------------------- outputs
def _number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _statistics(summary: pd.DataFrame, group: str, by: str = "site") -> dict:
    block = {}
    for row in summary[summary[by] == group].itertuples(index=False):
        block[row.metric] = {"mean": _number(row.mean), "std": _number(row.std), "median": _number(row.median),
                             "n": int(row.n), "excluded": int(row.excluded)}
    return block


def site_summary(per_case: pd.DataFrame) -> pd.DataFrame:
    """tables.summarise per site and overall, with an in_domain column (blank on the overall row)."""
    summary = summarise(per_case, METRICS, by="site")
    in_domain = per_case.groupby("site")["in_domain"].any().to_dict()
    summary.insert(1, "in_domain", [in_domain.get(s, "") if s != OVERALL else "" for s in summary["site"]])
    return summary


def summary_document(per_case: pd.DataFrame, per_site: pd.DataFrame, context: dict) -> dict:
    """summary.json: protocol and its description, model, folds, per-site, overall and unseen statistics."""
    protocol = context["protocol"]
    unseen = per_case[~per_case["in_domain"].astype(bool)]
    unseen_summary = summarise(unseen.assign(group=UNSEEN), METRICS, by="group") if len(unseen) else None
    document = {
        "protocol": protocol,
        "protocol_description": PROTOCOLS[protocol],
        **{k: v for k, v in context.items() if k != "protocol"},
        "cases": len(per_case),
        "in_domain_cases": int(per_case["in_domain"].astype(bool).sum()),
        "unseen_cases": len(unseen),
        "per_site": {site: {"in_domain": bool(frame["in_domain"].astype(bool).any()), "cases": len(frame),
                            **_statistics(per_site, site)}
                     for site, frame in per_case.groupby("site", sort=True)},
        "overall": _statistics(per_site, OVERALL),
        UNSEEN: _statistics(unseen_summary, UNSEEN, by="group") if unseen_summary is not None else {},
        "exclusions": "a mean leaves out cases whose value is NaN (hd95/assd when only one mask is empty; "
                      "under the paper protocol every metric of a case without foreground); 'excluded' counts them",
    }
    if protocol == "paper":
        document["paper_protocol"] = {"slice_size": SLICE_SIZE, "border_zeroed_px": BORDER,
                                      "slices": "first foreground slice up to, not including, the last one; of "
                                                "those, the ones whose resized ground truth has foreground",
                                      "ground_truth": "resized to 256x256 as the reference does (skimage order 0, "
                                                      "anti-aliased)",
                                      "prediction": "the saved mask resized to 256x256 (nearest)",
                                      "spacing": "slice spacing; in-plane spacing x original size / 256"}
    return document


def pick_overlay_cases(per_case: pd.DataFrame) -> list[tuple[str, str, str, float]]:
    """(site, tag, case, dice) for the best, median (lower) and worst Dice case of each site."""
    picked = []
    for site, frame in per_case.groupby("site", sort=True):
        ranked = frame[np.isfinite(frame["dice"].astype(float))].sort_values(["dice", "case"], kind="stable")
        if ranked.empty:
            continue
        rows = {"worst": ranked.iloc[0], "median": ranked.iloc[(len(ranked) - 1) // 2], "best": ranked.iloc[-1]}
        picked += [(site, tag, row["case"], float(row["dice"])) for tag, row in rows.items()]
    return picked


def write_overlays(per_case: pd.DataFrame, out_dir: Path, raw_dir: Path, dataset_json: dict, folder: Path,
                   plan: dict, protocol: str) -> list[Path]:
    """Contour overlays of each site's best, median and worst case; `paper` shows the scored 256x256 slices."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    labels = foreground_labels(dataset_json)
    axis = int(plan["slice_axis"])
    written = []
    for site, tag, case, dice in pick_overlay_cases(per_case):
        image, image_nii = read_volume(image_path(raw_dir, case, dataset_json))
        reference = foreground(read_volume(label_path(raw_dir, case, dataset_json))[0], labels)
        prediction = foreground(read_volume(predictor.output_path(folder / PREDICTIONS / site, case))[0], labels)
        spacing = voxel_spacing(image_nii)
        target = out_dir / f"{site}_{tag}_{case}.png"
        if protocol == "paper":
            sam_slices = preprocess_volume(image, plan)  # back to array order, as the protocol's slices
            slices = to_slices(from_slices(sam_slices, axis, plan_orientation(plan)), axis, LEGACY_ORIENTATION)
            ref256 = reference_label_grid(reference, axis)
            pred256 = zero_border(to_slice_grid(prediction, axis)) > 0
            _, _, kept = paper_volumes(reference, prediction, axis)
            pred256[np.setdiff1d(np.arange(len(pred256)), kept)] = False
            overlay_png(slices, ref256, pred256, target, case, site, dice,
                        slice_grid_spacing(spacing, image.shape, axis), slice_axis=0)
        else:
            overlay_png(image, reference, prediction, target, case, site, dice, spacing, slice_axis=axis)
        written.append(target)
    return written


def write_evaluation(per_case: pd.DataFrame, out_dir: Path, context: dict, title: str, raw_dir: Path,
                     dataset_json: dict, folder: Path, plan: dict) -> pd.DataFrame:
    """per_case.csv, per_site.csv, summary.json, per_site_boxplot.png and overlays/ of one protocol."""
    protocol = context["protocol"]
    per_site = site_summary(per_case)
    write_csv(label_protocol(per_case, protocol), out_dir / "per_case.csv")
    write_csv(label_protocol(per_site, protocol), out_dir / "per_site.csv")
    write_json(summary_document(per_case, per_site, context), out_dir / "summary.json")
    boxes = per_case.assign(target=[f"{site}\n(in-domain)" if in_domain else site
                                    for site, in_domain in zip(per_case["site"], per_case["in_domain"])])
    site_boxplot_png(boxes, out_dir / "per_site_boxplot.png", f"{title}, protocol {protocol}", site_column="target")
    write_overlays(per_case, out_dir / OVERLAYS, raw_dir, dataset_json, folder, plan, protocol)
    return per_site


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
