"""`desam_convert_prostate_multisite`: the 6-site prostate T2 MRI collection -> Dataset001_ProstateMultiSite.

Three public packagings are recognised by their layout:
- SAML/FedDG "Processed data": site folders BIDMC BMC HK I2CVB RUNMC UCL holding CaseNN.nii.gz and
  CaseNN_segmentation.nii.gz (BMC spells it _Segmentation; the suffix is matched case-insensitively).
- MaxStyle: A-ISBI B-ISBI_1.5 C-I2CVB D-UCL E-BIDMC F-HK [G-MedicalDecathlon], each with
  patient_<n>/t2_img_clipped.nii.gz and label_clipped.nii.gz.
- The nnU-Net repackaging of the DeSAM reference code: imagesTr/<name>_0000.nii.gz, labelsTr/<name>.nii.gz
  and prostate_patientid.csv (columns patientid, center), centers named as in MaxStyle.
Case ids are `<SITE>_<source case name>`; case numbers come from names, never from character positions.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

from dataset_conversion.folders import children_by_name, entries
from dataset_conversion.raw_writer import (SourceCase, converter_parser, dataset_folder_name, nifti_stem,
                                          run_converter, write_raw_dataset)
from desam_pipeline.utilities.errors import DesamError, cli_entry

DEFAULT_NAME = "ProstateMultiSite"
SAML_SITES = ("BIDMC", "BMC", "HK", "I2CVB", "RUNMC", "UCL")
MAXSTYLE_SITES = {
    "A-ISBI": "RUNMC", "B-ISBI_1.5": "BMC", "C-I2CVB": "I2CVB", "D-UCL": "UCL",
    "E-BIDMC": "BIDMC", "F-HK": "HK", "G-MedicalDecathlon": "MSD",
}
MAXSTYLE_IMAGE, MAXSTYLE_LABEL = "t2_img_clipped.nii.gz", "label_clipped.nii.gz"
PATIENT_CSV = "prostate_patientid.csv"
SEGMENTATION_SUFFIX = "_segmentation"
WRAPPER_DEPTH = 3
UNDERSTOOD = (
    "understood layouts: (1) SAML/FedDG processed data: site folders "
    f"{' '.join(SAML_SITES)} with CaseNN.nii.gz + CaseNN_segmentation.nii.gz; "
    f"(2) MaxStyle: {' '.join(MAXSTYLE_SITES)} folders with patient_<n>/{MAXSTYLE_IMAGE} + {MAXSTYLE_LABEL}; "
    f"(3) nnU-Net repackaging: imagesTr/ labelsTr/ {PATIENT_CSV}"
)


def detect_layout(source: Path) -> str | None:
    """'saml', 'maxstyle', 'nnunet' or None."""
    children = children_by_name(source)
    if any(site.lower() in children for site in SAML_SITES):
        return "saml"
    if any(folder.lower() in children for folder in MAXSTYLE_SITES):
        return "maxstyle"
    if "imagestr" in children and "labelstr" in children and (source / PATIENT_CSV).is_file():
        return "nnunet"
    return None


def find_layout(source: Path) -> tuple[str, Path]:
    """The layout and the folder holding it, looking through single wrapper folders (as unzipped archives have)."""
    if not source.is_dir():
        raise DesamError(f"{source}: source folder not found")
    folder = source
    for _ in range(WRAPPER_DEPTH + 1):
        layout = detect_layout(folder)
        if layout:
            return layout, folder
        listing = entries(folder)
        if len(listing) != 1 or not listing[0].is_dir():
            break
        folder = listing[0]
    found = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries(folder)[:12]) or "nothing"
    hint = ""
    if {"imagestr", "labelstr"} <= set(children_by_name(folder)):
        hint = f" (imagesTr/labelsTr without {PATIENT_CSV}; for MSD Task05_Prostate use desam_convert_msd)"
    raise DesamError(f"{folder}: unrecognised layout{hint}; found: {found}; {UNDERSTOOD}")


def saml_cases(root: Path) -> list[SourceCase]:
    """Pair CaseNN images with CaseNN_segmentation masks in every site folder."""
    children = children_by_name(root)
    cases = []
    for site in SAML_SITES:
        folder = children.get(site.lower())
        if folder is None:
            continue
        images, masks = {}, {}
        for path in entries(folder):
            stem = nifti_stem(path)
            if stem is None or not path.is_file():
                continue
            if stem.lower().endswith(SEGMENTATION_SUFFIX):
                masks[stem[: -len(SEGMENTATION_SUFFIX)].lower()] = path
            else:
                images[stem] = path
        for stem, image in sorted(images.items()):
            mask = masks.pop(stem.lower(), None)
            if mask is None:
                raise DesamError(f"{image}: image without mask (expected {stem}{SEGMENTATION_SUFFIX}.nii.gz "
                                 "next to it, any capitalisation)")
            cases.append(SourceCase(f"{site}_{stem}", site, image, mask))
        if masks:
            raise DesamError(f"{next(iter(masks.values()))}: mask without image")
    return cases


def maxstyle_cases(root: Path) -> list[SourceCase]:
    """patient_<n>/t2_img_clipped.nii.gz + label_clipped.nii.gz in every lettered site folder."""
    children = children_by_name(root)
    cases = []
    for folder_name, site in MAXSTYLE_SITES.items():
        folder = children.get(folder_name.lower())
        if folder is None:
            continue
        for patient in (p for p in entries(folder) if p.is_dir()):
            image, label = patient / MAXSTYLE_IMAGE, patient / MAXSTYLE_LABEL
            if not image.is_file():
                raise DesamError(f"{patient}: no {MAXSTYLE_IMAGE}")
            if not label.is_file():
                raise DesamError(f"{image}: image without mask (expected {MAXSTYLE_LABEL} next to it)")
            cases.append(SourceCase(f"{site}_{patient.name}", site, image, label))
    return cases


def trailing_number(name: str) -> int | None:
    """The number a case name ends with (`prostate_007` -> 7), or None."""
    match = re.search(r"(\d+)$", name)
    return int(match.group(1)) if match else None


def read_patient_centers(csv_path: Path) -> dict[str, str]:
    """patientid (as text, and as a number when numeric) -> site name, from prostate_patientid.csv."""
    try:
        table = pd.read_csv(csv_path, dtype=str)
    except Exception as exc:
        raise DesamError(f"{csv_path}: cannot read CSV ({type(exc).__name__}: {exc})") from exc
    missing = {"patientid", "center"} - set(table.columns)
    if missing:
        raise DesamError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}")
    centers = {}
    for patient, center in zip(table["patientid"].str.strip(), table["center"].str.strip()):
        if center not in MAXSTYLE_SITES:
            raise DesamError(f"{csv_path}: unknown center {center!r} for patient {patient}; "
                             f"expected one of {', '.join(MAXSTYLE_SITES)}")
        key = str(int(patient)) if patient.isdigit() else patient
        centers[key] = MAXSTYLE_SITES[center]
    return centers


def nnunet_cases(root: Path) -> list[SourceCase]:
    """imagesTr/<name>_0000 + labelsTr/<name>, the site of each name looked up in prostate_patientid.csv."""
    children = children_by_name(root)
    centers = read_patient_centers(root / PATIENT_CSV)
    labels = {nifti_stem(p): p for p in entries(children["labelstr"]) if nifti_stem(p)}
    cases = []
    for image in entries(children["imagestr"]):
        stem = nifti_stem(image)
        if stem is None or not stem.endswith("_0000"):
            continue
        name = stem[: -len("_0000")]
        label = labels.pop(name, None)
        if label is None:
            raise DesamError(f"{image}: image without mask (expected labelsTr/{name}.nii.gz)")
        number = trailing_number(name)
        site = centers.get(name) or (centers.get(str(number)) if number is not None else None)
        if site is None:
            raise DesamError(f"{image}: patient {name} is not listed in {root / PATIENT_CSV}")
        cases.append(SourceCase(f"{site}_{name}", site, image, label))
    if labels:
        raise DesamError(f"{next(iter(labels.values()))}: mask without image")
    return cases


SCANNERS = {"saml": saml_cases, "maxstyle": maxstyle_cases, "nnunet": nnunet_cases}


def collect_cases(source: str | Path) -> tuple[str, list[SourceCase]]:
    """Detect the layout of `source` and list its cases."""
    layout, root = find_layout(Path(source))
    cases = SCANNERS[layout](root)
    if not cases:
        raise DesamError(f"{root}: {layout} layout recognised but no cases found")
    return layout, cases


def convert_prostate_multisite(source: str | Path, raw_root: str | Path, dataset: str | int = 1,
                               overwrite: bool = False) -> Path:
    """Convert any recognised packaging of the multi-site prostate data; return the raw dataset folder."""
    layout, cases = collect_cases(source)
    name = dataset_folder_name(dataset, DEFAULT_NAME)
    description = (f"Multi-site prostate T2 MRI converted by desam from the {layout} layout of {Path(source)}; "
                   "whole gland = 1 (zone labels merged)")
    return write_raw_dataset(cases, Path(raw_root), name, description, overwrite=overwrite)


def build_parser() -> argparse.ArgumentParser:
    return converter_parser("Convert the multi-site prostate T2 collection (SAML, MaxStyle or nnU-Net packaging) "
                            "into a desam raw dataset.", "folder of the downloaded data (layout detected)", "1")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    return run_converter(convert_prostate_multisite, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
