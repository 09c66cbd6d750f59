"""`desam_report -d DATASET`: gather every evaluated source model into source x target tables.

Reads `<results>/<Dataset>/<Trainer>__<plans>__<mode>__src-<SITES>/evaluation/<protocol>/per_case.csv`
(columns case, site, dice, hd95, assd, nsd, in_domain) of one trainer class (`-tr`, default DeSAMTrainer)
and writes, per mode, under `<results>/<Dataset>/report/<mode>__<protocol>/` (DeSAMTrainer) or
`report/<Trainer>__<mode>__<protocol>/` (any other trainer): cells.csv (one row per source and target site),
dice_matrix.csv, hd95_matrix.csv, report.md and dice_heatmap.png, hd95_heatmap.png. Under the full protocol
also the slice detection read from each model's per_slice.csv: fp_slices_pct (false-positive slices as % of the
slices without ground truth), components_median and gate_auc (PRIM's predicted IoU as a detector of the
structure), each as <statistic>_matrix.csv and a section of report.md.
A dataset with several structures (evaluation/<protocol>/<structure>/, `evaluation.class_tables`) gets one
report per structure, in `<structure>/` of the report folder (slice detection included), and the report folder
itself tabulates the mean over the structures (Dice and HD95; slice detection stays per structure).
Folders of external predictions (desam_pipeline.baselines.external_predictions, e.g. the nnU-Net baseline, whose
configuration is its mode) are tabulated the same way; report.md states how they were made (trainer, schedule).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from desam_pipeline.baselines.external_predictions import is_external, read_record
from desam_pipeline.io.atomic import atomic_path
from desam_pipeline.io.results_layout import DEFAULT_TRAINER, model_folders
from desam_pipeline.io.safe_names import contained
from desam_pipeline.utilities.errors import DesamError, cli_entry
from desam_pipeline.utilities.metrics import METRICS
from desam_pipeline.utilities.paths import Trees, add_root_arguments
from evaluation.class_tables import PER_CASE, structure_names
from evaluation.detection_tables import PER_SLICE, detection_matrix
from evaluation.plots import heatmap_png
from evaluation.tables import (MEAN_UNSEEN, METRIC_LABELS, POOLED_UNSEEN, PROTOCOLS, cross_domain_cells,
                               cross_domain_matrix, label_protocol, matrix_markdown, protocol_caption, to_markdown,
                               write_csv)

REQUIRED_COLUMNS = ("case", "site", *METRICS, "in_domain")
DETECTION_COLUMNS = ("components", "mean_predicted_iou")  # per_case.csv columns the full protocol's matrices need
SLICE_COLUMNS = ("case", "reference", "predicted", "predicted_iou")
REPORT_METRICS = {"dice": True, "hd95": False}  # metric -> higher is better
# group_detection statistic -> (heading, number format); full protocol only
DETECTION_MATRICES = {
    "fp_slices_pct": ("False-positive slices (% of the slices without ground truth)", ".1f"),
    "components_median": ("Median connected components of the prediction (26-connected)", ".0f"),
    "gate_auc": ("Gate AUC (predicted IoU separating slices with and without ground truth; 0.5 = chance)", ".3f"),
}
RERUN = "rerun desam_evaluate for it (saved predictions are reused)"


def find_models(results_dir: Path, protocol: str, trainer: str = DEFAULT_TRAINER,
                structure: str | None = None) -> list[dict]:
    """Every model folder of the dataset trained by `trainer`: source, mode, plans, folder and its
    per_case.csv (of `structure` when given; None when that protocol was not evaluated yet)."""
    models = []
    for folder, name in model_folders(results_dir):
        if name.trainer == trainer:
            per_case = folder / "evaluation" / protocol / (structure or "") / PER_CASE
            models.append({"plans": name.plans, "mode": name.mode, "source": name.sites, "folder": folder,
                           "per_case": per_case if per_case.is_file() else None})
    return models


def report_folder(results_dir: Path, mode: str, protocol: str, trainer: str = DEFAULT_TRAINER,
                  structure: str | None = None) -> Path:
    """`report/<mode>__<protocol>` for DeSAMTrainer, `report/<trainer>__<mode>__<protocol>` for any other; a
    structure's report in its subfolder."""
    prefix = "" if trainer == DEFAULT_TRAINER else f"{trainer}__"
    return contained(results_dir / "report", f"{prefix}{mode}__{protocol}", *([structure] if structure else []))


def evaluated_structures(models: list[dict], protocol: str) -> list[str]:
    """The structures any of the models was evaluated on (several-structure datasets), sorted; else empty."""
    found = {name for m in models if m["per_case"] is not None
             for name in structure_names(m["folder"] / "evaluation" / protocol)}
    return sorted(found)


def read_table(path: Path, required: tuple[str, ...], hint: str = "") -> pd.DataFrame:
    """A CSV with the `required` columns (case and site read as text), or a DesamError naming the file."""
    if not path.is_file():
        raise DesamError(f"{path}: not found{hint}")
    try:
        frame = pd.read_csv(path, dtype={"case": str, "site": str})
    except (OSError, ValueError) as exc:
        raise DesamError(f"{path}: cannot read CSV ({exc})") from exc
    absent = [c for c in required if c not in frame.columns]
    if absent:
        raise DesamError(f"{path}: missing column(s) {', '.join(absent)}{hint}")
    return frame


def read_per_case(path: Path, protocol: str = "paper", detection: bool = True) -> pd.DataFrame:
    """A per_case.csv with the columns the report needs (under `full`, with `detection`, also those of slice
    detection)."""
    if protocol == "full" and detection:
        return read_table(path, (*REQUIRED_COLUMNS, *DETECTION_COLUMNS),
                          f" (evaluated before slice detection; {RERUN})")
    return read_table(path, REQUIRED_COLUMNS)


def select_models(models: list[dict], dataset: str, mode: str, protocol: str, plans: str | None,
                  trainer: str = DEFAULT_TRAINER) -> dict[str, Path]:
    """source label -> per_case.csv for one mode; clear errors when none is evaluated or sources clash."""
    chosen = [m for m in models if m["mode"] == mode and (plans is None or m["plans"] == plans)]
    evaluated = [m for m in chosen if m["per_case"] is not None]
    if not evaluated:
        pending = ", ".join(m["folder"].name for m in chosen) or "none"
        flag = "" if trainer == DEFAULT_TRAINER else f" -tr {trainer}"
        raise DesamError(f"no evaluated model for mode {mode}, protocol {protocol}, trainer {trainer} in dataset {dataset} "
                         f"(trained model folders of that mode: {pending}); run `desam_evaluate -d {dataset} "
                         f"--source SITE --mode {mode} --protocol {protocol}{flag}` first")
    for model in chosen:
        if model["per_case"] is None:
            print(f"desam_report: note: {model['folder'].name} has no {protocol} evaluation; left out",
                  file=sys.stderr)
    sources: dict[str, Path] = {}
    for model in evaluated:
        if model["source"] in sources:
            raise DesamError(f"source {model['source']} ({mode}) is evaluated under several plans; "
                             "choose one with --plans-name")
        sources[model["source"]] = model["per_case"]
    return sources


def count_matrix(cells: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Source x target text matrix of case counts, with how many of them the metric's mean excludes."""
    text = cells.assign(label=[f"{c}" + (f" ({e} NaN)" if e else "")
                               for c, e in zip(cells["cases"], cells[f"{metric}_excluded"])])
    matrix = text.pivot(index="source", columns="target", values="label").sort_index().sort_index(axis=1)
    matrix.columns.name = None
    return matrix.fillna("-")


def detection_sections(per_case: dict[str, pd.DataFrame], per_slice: dict[str, pd.DataFrame], out: Path,
                       protocol: str) -> list[str]:
    """The Markdown sections and `<statistic>_matrix.csv` of DETECTION_MATRICES: can the models say "no
    structure here"? Cells are over the target's slices (cases), `pooled unseen` over every unseen one."""
    sections = ["## Slice detection", "",
                "Each slice either holds ground truth or not. False-positive slices: slices without ground truth "
                "on which the model predicts foreground, as % of all such slices; the gate AUC: how well PRIM's "
                f"predicted IoU ranks slices with ground truth above those without. `{POOLED_UNSEEN}` pools every "
                f"slice (case) of the unseen targets; `{MEAN_UNSEEN}` averages the targets' values.", ""]
    for statistic, (label, floatfmt) in DETECTION_MATRICES.items():
        values, in_domain = detection_matrix(per_case, per_slice, statistic)
        write_csv(label_protocol(values.reset_index(), protocol), out / f"{statistic}_matrix.csv")
        sections += [f"### {label}", "", matrix_markdown(values, in_domain, floatfmt=floatfmt), ""]
    return sections


def write_report(dataset: str, results_dir: Path, mode: str, protocol: str, plans: str | None = None,
                 trainer: str = DEFAULT_TRAINER, structure: str | None = None, mean_of: Sequence[str] = ()) -> Path:
    """Build and write one mode's report folder for one trainer class; return it. `structure`: that structure's
    report (a dataset with several); `mean_of`: the structures whose mean the models' per_case.csv hold (no slice
    detection then: it is per structure)."""
    models = find_models(results_dir, protocol, trainer, structure)
    sources = select_models(models, dataset, mode, protocol, plans, trainer)
    external = [f"- `{m['folder'].name}`: {read_record(m['folder'])['description']}" for m in models
                if m["mode"] == mode and m["per_case"] in sources.values() and is_external(m["folder"])]
    detection = protocol == "full" and not mean_of
    per_case = {source: read_per_case(path, protocol, detection) for source, path in sources.items()}
    cells = cross_domain_cells(per_case)
    out = report_folder(results_dir, mode, protocol, trainer, structure)
    write_csv(label_protocol(cells.assign(mode=mode), protocol), out / "cells.csv")
    model = f"{mode} mode" if trainer == DEFAULT_TRAINER else f"{trainer}, {mode} mode"
    if structure:
        model += f", {structure}"
    elif mean_of:
        model += ", mean over structures"
    sections = [f"# {dataset}: source x target, {model}", "", f"*{protocol_caption(protocol)}*", "",
                f"Rows: the source site(s) a model was trained on; columns: target sites. `*` marks in-domain "
                f"cells (the source's own held-out cases). `{MEAN_UNSEEN}`: mean over the targets that are not "
                f"in-domain, each target weighted equally; `{POOLED_UNSEEN}`: one mean over every case of those "
                "targets pooled together (how the reference code reports). Means leave out cases whose value is NaN "
                "(see the case counts below and cells.csv).", ""]
    if mean_of:
        sections += [f"Each cell: the mean over the structures ({', '.join(mean_of)}) of each case's metric; every "
                     "structure's own report, with its slice detection, is in its folder beside this file.", ""]
    if external:
        sections += ["Predictions made outside desam (schedule as trained):", "", *external, ""]
    for metric, higher_is_better in REPORT_METRICS.items():
        values, in_domain = cross_domain_matrix(cells, metric)
        write_csv(label_protocol(values.reset_index(), protocol), out / f"{metric}_matrix.csv")
        label = METRIC_LABELS[metric]
        sections += [f"## Mean {label}", "", matrix_markdown(values, in_domain), ""]
        heatmap_png(values, in_domain, out / f"{metric}_heatmap.png",
                    title=f"{dataset}: mean {label.split(' (')[0]}, {model}\n{protocol_caption(protocol)}",
                    colorbar_label=f"mean {label}", higher_is_better=higher_is_better,
                    fmt="{:.3f}" if metric == "dice" else "{:.2f}")
    if detection:
        per_slice = {source: read_table(path.parent / PER_SLICE, SLICE_COLUMNS, f" ({RERUN})")
                     for source, path in sources.items()}
        sections += detection_sections(per_case, per_slice, out, protocol)
    matrix = count_matrix(cells, "hd95")
    sections += ["## Cases per cell (NaN HD95 excluded from its mean)", "",
                 to_markdown(matrix, index=True, right_align=matrix.columns), ""]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(sections), encoding="utf-8")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="desam_report",
        description="Source x target tables (CSV, Markdown) and heatmaps of mean Dice and HD95 over every "
                    "evaluated source model of a dataset.")
    parser.add_argument("-d", "--dataset", required=True, help="dataset number or DatasetNNN_Name")
    parser.add_argument("--mode", nargs="+", default=None, metavar="MODE",
                        help="prompt mode(s) to report, e.g. grid box (default: every mode evaluated under the protocol)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="full",
                        help="evaluation protocol to gather (default: full)")
    parser.add_argument("--plans-name", "--plans", dest="plans", default=None,
                        help="plans name, when a source was trained under several")
    parser.add_argument("-tr", "--trainer", default=DEFAULT_TRAINER, metavar="NAME",
                        help=f"the trainer class whose models to report (default {DEFAULT_TRAINER}; e.g. "
                             "CoupledSAMTrainer, ZeroShotSAMTrainer)")
    add_root_arguments(parser, "results")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    trees = Trees.from_args(args)
    results_dir = trees.results
    models = find_models(results_dir, args.protocol, args.trainer)
    modes = args.mode or sorted({m["mode"] for m in models if m["per_case"] is not None})
    if not modes:
        trained = ", ".join(m["folder"].name for m in models) or "none"
        flag = "" if args.trainer == DEFAULT_TRAINER else f" -tr {args.trainer}"
        raise DesamError(f"{results_dir}: no {args.trainer} model evaluated under protocol {args.protocol} (trained "
                         f"model folders: {trained}); run `desam_evaluate -d {trees.dataset} --source SITE --mode grid "
                         f"--protocol {args.protocol}{flag}` first")
    structures = evaluated_structures(models, args.protocol)
    for mode in modes:
        for structure in (*structures, None):
            out = write_report(trees.dataset, results_dir, mode, args.protocol, args.plans, args.trainer, structure,
                               structures if structure is None else ())
            print((out / "report.md").read_text(encoding="utf-8"))
            print(f"report written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    main()
