"""`desam_convert_msd`: Medical Segmentation Decathlon Task05_Prostate -> Dataset002_ProstateMSD.

MSD images are 4D (T2, ADC); only the T2 volume is kept (its index read from the task's
dataset.json "modality", 0 when absent). Labels 1 (PZ) and 2 (TZ) become whole gland = 1.
Every case's domain is "MSD". macOS `._*` files shipped in the archive are skipped.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dataset_conversion.raw_writer import (SourceCase, converter_parser, dataset_folder_name, nifti_stem, run_converter,
                                           write_raw_dataset)
from desam_pipeline.io.atomic import read_json
from desam_pipeline.utilities.errors import DesamError, cli_entry

DEFAULT_NAME = "ProstateMSD"
DOMAIN = "MSD"
TASK_FOLDER = "Task05_Prostate"


def find_task_folder(source: Path) -> Path:
    """SRC itself or SRC/Task05_Prostate, whichever holds imagesTr and labelsTr."""
    for folder in (source, source / TASK_FOLDER):
        if (folder / "imagesTr").is_dir() and (folder / "labelsTr").is_dir():
            return folder
    if not source.is_dir():
        raise DesamError(f"{source}: source folder not found")
    found = ", ".join(sorted(p.name for p in source.iterdir() if not p.name.startswith(".")))[:300]
    raise DesamError(f"{source}: not an MSD {TASK_FOLDER} folder (expected imagesTr/ and labelsTr/ with "
                     f"4D T2+ADC prostate_NN.nii.gz); found: {found or 'nothing'}")


def t2_channel(task_folder: Path) -> int:
    """Index of the T2 volume from the task's dataset.json ("modality" or "channel_names"); 0 without one."""
    path = task_folder / "dataset.json"
    if not path.is_file():
        return 0
    meta = read_json(path)
    channels = meta.get("modality") or meta.get("channel_names") or {"0": "T2"}
    for index, name in channels.items():
        if str(name).upper().startswith("T2"):
            return int(index)
    raise DesamError(f"{path}: no T2 channel among {channels}")


def msd_cases(source: str | Path) -> list[SourceCase]:
    """prostate_NN image/label pairs with the T2 channel selected."""
    folder = find_task_folder(Path(source))
    channel = t2_channel(folder)
    labels = {stem: p for p in (folder / "labelsTr").iterdir() if (stem := nifti_stem(p))}
    cases = []
    for image in sorted((folder / "imagesTr").iterdir()):
        stem = nifti_stem(image)
        if stem is None:
            continue
        label = labels.pop(stem, None)
        if label is None:
            raise DesamError(f"{image}: image without mask (expected labelsTr/{image.name})")
        cases.append(SourceCase(f"{DOMAIN}_{stem}", DOMAIN, image, label, channel=channel))
    if labels:
        raise DesamError(f"{next(iter(labels.values()))}: mask without image")
    return cases


def convert_msd(source: str | Path, raw_root: str | Path, dataset: str | int = 2, overwrite: bool = False) -> Path:
    """Convert MSD Task05_Prostate (T2 only, whole gland); return the raw dataset folder."""
    cases = msd_cases(source)
    name = dataset_folder_name(dataset, DEFAULT_NAME)
    description = (f"MSD Task05_Prostate converted by desam from {Path(source)}: T2 volume only, "
                   "PZ (1) and TZ (2) merged into whole gland = 1")
    return write_raw_dataset(cases, Path(raw_root), name, description, overwrite=overwrite)


def build_parser() -> argparse.ArgumentParser:
    return converter_parser("Convert MSD Task05_Prostate into a desam raw dataset (T2 only, whole gland, domain MSD).",
                            "the Task05_Prostate folder (or its parent)", "2")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    return run_converter(convert_msd, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
