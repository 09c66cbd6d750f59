"""`desam_nnunet_baseline -d DATASET --source SITE -f FOLD`: the nnU-Net v2 baseline on desam's data and split.

Trains the real `nnunetv2` package (optional extra: `pip install -e .[baseline]`) on the same raw cases
of the source site(s), with the same folds as desam (`splits_final.json` of the source key), predicts every
unseen-site case (with all requested folds) and each held-out source case (with the fold that holds it out),
and places the predictions in a results folder beside DeSAM's models:

    <results>/<Dataset>/<trainer>__<plans>__<configuration>__src-<SITES>/
        predictions/<site>/<case>.nii.gz
        external_predictions.json      (see desam_pipeline.baselines.external_predictions)

so that `desam_evaluate --model-folder <that name>` scores it and `desam_report` tabulates it. nnU-Net keeps its
own trees and variables, set only for its subprocesses, under `<results>/<Dataset>/nnunet/src-<SITES>/`:
`nnUNet_raw/<Dataset>/dataset.json` lists the source cases by path (no image is copied),
`nnUNet_preprocessed/<Dataset>/splits_final.json` is desam's split, `nnUNet_results/` holds its checkpoints.
Trained folds and the preprocessing are reused when rerun. On CPU use a short trainer variant
(`nnUNetTrainer_1epoch`, `_5epochs`, ...); the schedule is recorded and shown by every table.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from desam_pipeline.baselines.external_predictions import RECORD_FILE, write_record
from desam_pipeline.inference.prediction_cache import PREDICTIONS, prediction_file
from desam_pipeline.data import splits
from desam_pipeline.data.raw_dataset import check_sites, domains, file_ending, label_path, list_cases, load_dataset_json
from desam_pipeline.io.atomic import read_json, write_json
from desam_pipeline.io.results_layout import source_key
from desam_pipeline.utilities.errors import DesamError, cli_entry
from desam_pipeline.utilities.paths import DATASET_PATTERN, Trees, add_root_arguments

INSTALL_HINT = "nnunetv2 is not installed; install the baseline extra: pip install -e .[baseline]"
NNUNET_FOLDER = "nnunet"
# The baseline's defaults (flags and `run_baseline` alike): a CPU-sized schedule of nnU-Net's 2d configuration.
NNUNET_TRAINER = "nnUNetTrainer_5epochs"
NNUNET_CONFIGURATION = "2d"
NNUNET_PLANS = "nnUNetPlans"
NNUNET_DEVICE = "cpu"
NNUNET_PROCESSES = 1
NNUNET_FOLDS = ("0",)


# ---------------------------------------------------------------- nnU-Net's side: trees, commands
def nnunet_version() -> str:
    """The installed nnunetv2 version, or a one-line error saying how to install it."""
    if importlib.util.find_spec("nnunetv2") is None:
        raise DesamError(INSTALL_HINT)
    from importlib.metadata import version
    return version("nnunetv2")


def nnunet_environment(base: Path, processes: int) -> dict[str, str]:
    """nnU-Net's three roots under `base`, and its worker counts, for its subprocesses only (OpenMP threads
    sleep rather than spin while waiting: spinning stalls nnU-Net on a busy, few-core CPU)."""
    return {"nnUNet_raw": str(base / "nnUNet_raw"), "nnUNet_preprocessed": str(base / "nnUNet_preprocessed"),
            "nnUNet_results": str(base / "nnUNet_results"), "nnUNet_n_proc_DA": str(processes),
            "nnUNet_def_n_proc": str(processes), "OMP_WAIT_POLICY": "PASSIVE",
            "nnUNet_compile": "f"}


def nnunet_command(name: str) -> str:
    """The path of an nnU-Net console script (beside this interpreter first, then on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise DesamError(f"{name}: nnU-Net's command not found; {INSTALL_HINT}")
    return found


def run_nnunet(name: str, arguments: Sequence[str], environment: dict[str, str]) -> None:
    """Run one nnU-Net command with its variables set for the call; a failure is a one-line error."""
    command = [nnunet_command(name), *map(str, arguments)]
    print(f"desam_nnunet_baseline: {' '.join(command)}", flush=True)
    result = subprocess.run(command, env={**os.environ, **environment})
    if result.returncode != 0:
        raise DesamError(f"`{' '.join(command)}` failed (exit {result.returncode}); see nnU-Net's output above")


# ---------------------------------------------------------------- desam's data, as nnU-Net sees it
def export_dataset(raw_dir: Path, dataset_json: dict, cases: list[str], target: Path) -> bool:
    """Write nnU-Net's dataset.json for `cases` (images and labels by absolute path, read with nibabel so the
    predictions keep each input's affine); returns True when it changed (the preprocessing is then stale)."""
    channels = max(len(dataset_json.get("channel_names", {})), 1)
    ending = file_ending(dataset_json)
    exported = {
        "channel_names": dataset_json["channel_names"], "labels": dataset_json["labels"],
        "numTraining": len(cases), "file_ending": ending, "overwrite_image_reader_writer": "NibabelIO",
        "dataset": {case: {"images": [str((raw_dir / "imagesTr" / f"{case}_{c:04d}{ending}").resolve())
                                      for c in range(channels)],
                           "label": str(label_path(raw_dir, case, dataset_json).resolve())} for case in cases},
    }
    path = target / "dataset.json"
    if path.is_file() and read_json(path) == exported:
        return False
    write_json(exported, path)
    return True


def export_splits(folds: list[dict], target: Path) -> bool:
    """desam's folds of the source key, as nnU-Net's splits_final.json (a list of {train, val}); returns True
    when it changed (folds trained on the old split are then stale)."""
    exported = [{"train": sorted(f["train"]), "val": sorted(f["val"])} for f in folds]
    path = target / splits.SPLITS_FILE
    if path.is_file() and read_json(path) == exported:
        return False
    write_json(exported, path)
    return True


def link_inputs(raw_dir: Path, dataset_json: dict, cases: list[str], folder: Path) -> None:
    """A folder of symbolic links `<case>_XXXX<ending>` to the raw images, as nnU-Net's predictor reads them."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    ending = file_ending(dataset_json)
    for case in cases:
        for c in range(max(len(dataset_json.get("channel_names", {})), 1)):
            name = f"{case}_{c:04d}{ending}"
            (folder / name).symlink_to((raw_dir / "imagesTr" / name).resolve())


def read_schedule(fold_dir: Path, trainer: str, device: str) -> dict:
    """Trainer, epochs and iterations of a trained fold, from the debug.json nnU-Net writes beside it."""
    debug = read_json(fold_dir / "debug.json")
    return {"trainer": trainer, "epochs": int(debug["num_epochs"]),
            "iterations_per_epoch": int(debug["num_iterations_per_epoch"]),
            "val_iterations_per_epoch": int(debug["num_val_iterations_per_epoch"]),
            "batch_size": int(debug["batch_size"]), "device": device}


def schedule_text(schedule: dict) -> str:
    return (f"{schedule['trainer']}: {schedule['epochs']} epoch(s) x {schedule['iterations_per_epoch']} iterations, "
            f"batch {schedule['batch_size']}, {schedule['device']}")


# ---------------------------------------------------------------- the command
def run_baseline(dataset: str | int, sources: Sequence[str], folds: Sequence[str], *,
                 trainer: str = NNUNET_TRAINER, configuration: str = NNUNET_CONFIGURATION, plans: str = NNUNET_PLANS,
                 device: str = NNUNET_DEVICE, processes: int = NNUNET_PROCESSES, tta: bool = True, raw: str | None = None,
                 preprocessed: str | None = None, results: str | None = None) -> Path:
    """Train (or reuse), predict and place the nnU-Net baseline; returns its results folder."""
    version = nnunet_version()
    sources = sorted(set(sources))
    trees = Trees(dataset, raw=raw, preprocessed=preprocessed, results=results)
    raw_dir = trees.raw
    if not raw_dir.is_dir():
        raise DesamError(f"{raw_dir}: raw dataset not found; convert it first")
    dataset_json = load_dataset_json(raw_dir)
    check_sites(dataset_json, sources, raw_dir.name, kind="source site")
    case_sites = domains(dataset_json)
    cases = [c for c in list_cases(raw_dir, dataset_json) if c in case_sites]
    source_cases = [c for c in cases if case_sites[c] in sources]
    key = source_key(sources)
    split = splits.load_or_create_splits(trees.preprocessed, key, source_cases)
    folds = [str(splits.parse_fold(f)) for f in dict.fromkeys(folds)]
    held = {}
    for fold in folds:
        _, val = splits.fold_cases(split, splits.parse_fold(fold), source_cases, key)
        held.update({case: fold for case in val if case not in held})

    base = trees.results / NNUNET_FOLDER / key
    environment = nnunet_environment(base, processes)
    nn_raw = base / "nnUNet_raw" / trees.dataset
    nn_preprocessed = base / "nnUNet_preprocessed" / trees.dataset
    nn_model = base / "nnUNet_results" / trees.dataset / f"{trainer}__{plans}__{configuration}"
    number = DATASET_PATTERN.match(trees.dataset).group(1)
    nn_raw.mkdir(parents=True, exist_ok=True)
    changed = export_dataset(raw_dir, dataset_json, source_cases, nn_raw)
    if changed or not (nn_preprocessed / f"{plans}.json").is_file():
        run_nnunet("nnUNetv2_plan_and_preprocess", ["-d", number, "-c", configuration, "-np", processes,
                                                    "--verify_dataset_integrity"], environment)
    changed = export_splits(split, nn_preprocessed) or changed

    folder = trees.results / f"{trainer}__{plans}__{configuration}__{key}"
    record = read_json(folder / RECORD_FILE) if (folder / RECORD_FILE).is_file() else None
    if record is None or record["folds"] != folds or record["schedule"].get("tta") != tta:
        (folder / RECORD_FILE).unlink(missing_ok=True)  # predictions of other folds or options: made anew
        shutil.rmtree(folder / PREDICTIONS, ignore_errors=True)
    for fold in folds:
        fold_dir = nn_model / f"fold_{fold}"
        if (fold_dir / "checkpoint_final.pth").is_file() and not changed:
            print(f"desam_nnunet_baseline: fold {fold} already trained ({fold_dir})", flush=True)
            continue
        resume = ["--c"] if (fold_dir / "checkpoint_latest.pth").is_file() and not changed else []
        (folder / RECORD_FILE).unlink(missing_ok=True)
        shutil.rmtree(folder / PREDICTIONS, ignore_errors=True)
        run_nnunet("nnUNetv2_train", [number, configuration, fold, "-tr", trainer, "-p", plans, "-device", device,
                                      *resume], environment)

    groups: dict[tuple[str, ...], list[str]] = {}  # one nnU-Net prediction call per fold set
    for case in cases:
        if case_sites[case] not in sources:
            groups.setdefault(tuple(folds), []).append(case)
        elif case in held:
            groups.setdefault((held[case],), []).append(case)
    for group_folds, members in groups.items():
        targets = {case: prediction_file(folder, case_sites[case], case) for case in members}
        todo = [case for case, target in targets.items() if not target.is_file()]
        if not todo:
            continue
        tag = f"folds-{'+'.join(group_folds)}"
        inputs, outputs = base / "inputs" / tag, base / "predictions" / nn_model.name / tag
        link_inputs(raw_dir, dataset_json, todo, inputs)
        shutil.rmtree(outputs, ignore_errors=True)
        run_nnunet("nnUNetv2_predict", ["-i", inputs, "-o", outputs, "-d", number, "-c", configuration, "-tr", trainer,
                                        "-p", plans, "-f", *group_folds, "-device", device, "-npp", processes,
                                        "-nps", processes, "--disable_progress_bar",
                                        *([] if tta else ["--disable_tta"])], environment)
        for case in todo:
            made = outputs / f"{case}{file_ending(dataset_json)}"
            if not made.is_file():
                raise DesamError(f"{made}: nnU-Net did not write this prediction")
            targets[case].parent.mkdir(parents=True, exist_ok=True)
            os.replace(made, targets[case])

    schedule = read_schedule(nn_model / f"fold_{folds[0]}", trainer, device) | {"tta": tta}
    description = f"nnU-Net v2 {configuration} ({schedule_text(schedule)}; folds {', '.join(folds)})"
    write_record(folder, made_by=f"nnU-Net v2 {version}", description=description, plans=plans,
                 mode=configuration, sources=sources, folds=folds, in_domain_fold_of_case=held, schedule=schedule)
    print(f"desam_nnunet_baseline: predictions in {folder / PREDICTIONS}; score them with\n"
          f"  desam_evaluate -d {trees.dataset} --source {' '.join(sources)} --model-folder {folder.name}", flush=True)
    return folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="desam_nnunet_baseline",
        description="Train nnU-Net v2 on the source site(s) with desam's split, predict the unseen sites and the "
                    "held-out source cases, and place the predictions where desam_evaluate and desam_report "
                    "find them.")
    parser.add_argument("-d", "--dataset", required=True, help="dataset number or DatasetNNN_Name")
    parser.add_argument("--source", nargs="+", required=True, metavar="SITE", help="the site(s) to train on")
    parser.add_argument("-f", "--folds", nargs="+", default=list(NNUNET_FOLDS), metavar="FOLD",
                        help="desam's folds to train (0-4 or all; default: 0); unseen sites use all of them")
    parser.add_argument("-tr", "--trainer", default=NNUNET_TRAINER,
                        help="nnU-Net trainer class (default: %(default)s, a CPU-sized schedule; "
                             "nnUNetTrainer is the full 1000 epochs)")
    parser.add_argument("-c", "--configuration", default=NNUNET_CONFIGURATION,
                        help="nnU-Net configuration (default: %(default)s)")
    parser.add_argument("-p", "--plans", default=NNUNET_PLANS, help="nnU-Net plans identifier")
    parser.add_argument("--device", choices=("cpu", "cuda", "mps"), default=NNUNET_DEVICE)
    parser.add_argument("-np", "--num-processes", type=int, default=NNUNET_PROCESSES,
                        help="nnU-Net worker processes for preprocessing, augmentation and export (default: %(default)s)")
    parser.add_argument("--disable-tta", action="store_true", help="predict without nnU-Net's mirroring")
    add_root_arguments(parser, "raw", "preprocessed", "results")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_baseline(args.dataset, args.source, args.folds, trainer=args.trainer, configuration=args.configuration,
                 plans=args.plans, device=args.device, processes=args.num_processes, tta=not args.disable_tta,
                 raw=args.raw, preprocessed=args.preprocessed, results=args.results)
    return 0


if __name__ == "__main__":
    main()
