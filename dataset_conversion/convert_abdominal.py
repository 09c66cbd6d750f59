"""`desam_convert_abdominal`: abdominal organs on CT and MR -> Dataset003_AbdominalCTMR (cross-modality).

Classes 0 background, 1 liver, 2 right kidney, 3 left kidney, 4 spleen; domains CT and MR; case ids
<domain>_<number> with four digits (CT_0001, MR_0002). Each SRC is searched, itself and the folders
below it (3 levels), for these layouts; several may be found or given (e.g. SRC/BTCV and SRC/CHAOS):
- processed (SLAug, CSDG; desam_make_abdominal_phantom writes it): SABSCT/processed/ (domain CT) and
  CHAOST2/processed/ (MR) holding image_<id>.nii.gz + label_<id>.nii.gz, classes already 0-4;
- BTCV / Synapse multi-organ CT: img/img<NNNN>.nii.gz + label/label<NNNN>.nii.gz with 13 organs, of
  which spleen (1), right kidney (2), left kidney (3) and liver (6) are kept and the rest is background;
- CHAOS MR: MR/<patient>/T2SPIR/DICOM_anon/*.dcm + T2SPIR/Ground/*.png, staged as NIfTI in a scratch
  folder of the raw root first (chaos_dicom: how the PNGs line up with the DICOM slices).
A label value outside a layout's classes is an error naming the file.

dataset.json: "channel_names" is {"0": "CT"} or {"0": "MR"} when all cases share one modality, and
{"0": "CT/MR"} when both are present: nnU-Net picks its CT normalisation for a channel named "CT" only,
and z-scores each case otherwise, the safe choice for a channel mixing modalities. The extra key
"modalities" (domain -> modality, {"CT": "CT", "MR": "MR"}) is for planners that normalise per domain.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from dataset_conversion.chaos_dicom import SEQUENCE, convert_series
from dataset_conversion.folders import check_target, children_by_name, entries, scratch_folder
from dataset_conversion.raw_writer import (SourceCase, converter_parser, dataset_folder_name, nifti_stem, run_converter,
                                           write_raw_dataset)
from desam_pipeline.utilities.errors import DesamError, cli_entry

DEFAULT_DATASET, DEFAULT_NAME = "3", "AbdominalCTMR"
LABELS = {"background": 0, "liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
MODALITIES = {"CT": "CT", "MR": "MR"}     # domain -> modality
MIXED_CHANNEL = "CT/MR"
PROCESSED_SITES = {"SABSCT": "CT", "CHAOST2": "MR"}
PROCESSED_FOLDER = "processed"
PROCESSED_CLASSES = {value: value for value in LABELS.values()}
# BTCV: 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver, 7 stomach, 8 aorta,
# 9 inferior vena cava, 10 portal and splenic veins, 11 pancreas, 12 right adrenal, 13 left adrenal
BTCV_CLASSES = {**{value: 0 for value in range(14)}, 1: 4, 2: 2, 3: 3, 6: 1}
SEARCH_DEPTH = 3
UNDERSTOOD = ("understood layouts: (1) processed: SABSCT/processed and/or CHAOST2/processed with image_<id>.nii.gz + "
              "label_<id>.nii.gz; (2) BTCV: img/img<NNNN>.nii.gz + label/label<NNNN>.nii.gz; (3) CHAOS: "
              f"MR/<patient>/{SEQUENCE}/DICOM_anon/*.dcm + {SEQUENCE}/Ground/*.png")


def case_id(domain: str, identifier: str) -> str:
    """`CT_0007` for a numeric identifier, `CT_<identifier>` otherwise."""
    return f"{domain}_{int(identifier):04d}" if identifier.isdigit() else f"{domain}_{identifier}"


def detect_layout(folder: Path) -> str | None:
    """'processed', 'btcv', 'chaos' (a folder of patients with T2SPIR/) or None."""
    children = children_by_name(folder)
    if any(site.lower() in children for site in PROCESSED_SITES):
        return "processed"
    if "img" in children and "label" in children:
        return "btcv"
    if any(SEQUENCE.lower() in children_by_name(child) for child in children.values()):
        return "chaos"
    return None


def find_sources(source: Path) -> list[tuple[str, Path]]:
    """(layout, folder) of every layout in `source` or up to SEARCH_DEPTH levels below (not below a match)."""
    if not source.is_dir():
        raise DesamError(f"{source}: source folder not found")
    found, level = [], [source]
    for _ in range(SEARCH_DEPTH + 1):
        below = []
        for folder in level:
            layout = detect_layout(folder)
            if layout:
                found.append((layout, folder))
            else:
                below.extend(children_by_name(folder).values())
        level = below
    if not found:
        listing = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries(source)[:12]) or "nothing"
        raise DesamError(f"{source}: no abdominal layout found (searched {SEARCH_DEPTH} folder levels down); "
                         f"found: {listing}; {UNDERSTOOD}")
    return found


def numbered_files(folder: Path, prefix: str) -> dict[str, Path]:
    """number -> NIfTI file named `<prefix><number>` (any capitalisation of the prefix)."""
    pattern = re.compile(rf"^{prefix}(\d+)$", re.IGNORECASE)
    found = {}
    for path in entries(folder):
        match = pattern.match(nifti_stem(path) or "")
        if match and path.is_file():
            found[match.group(1)] = path
    return found


def pair_files(images: Path, image_prefix: str, labels: Path, label_prefix: str) -> list[tuple[str, Path, Path]]:
    """(number, image, label) of `<image_prefix><number>` images and `<label_prefix><number>` labels."""
    image_files, label_files = numbered_files(images, image_prefix), numbered_files(labels, label_prefix)
    pairs = []
    for number, image in sorted(image_files.items()):
        label = label_files.pop(number, None)
        if label is None:
            raise DesamError(f"{image}: image without label (expected {labels / label_prefix}{number}.nii.gz)")
        pairs.append((number, image, label))
    if label_files:
        raise DesamError(f"{next(iter(label_files.values()))}: label without image")
    return pairs


def processed_cases(root: Path, scratch: Path) -> list[SourceCase]:
    """SABSCT (CT) and CHAOST2 (MR) processed/image_<id> + label_<id>, classes kept as they are."""
    children = children_by_name(root)
    cases = []
    for site, domain in PROCESSED_SITES.items():
        folder = children.get(site.lower())
        if folder is None:
            continue
        processed = children_by_name(folder).get(PROCESSED_FOLDER)
        if processed is None:
            raise DesamError(f"{folder}: no {PROCESSED_FOLDER}/ folder (expected {PROCESSED_FOLDER}/image_<id>.nii.gz "
                             "+ label_<id>.nii.gz)")
        cases += [SourceCase(case_id(domain, number), domain, image, label, label_map=PROCESSED_CLASSES)
                  for number, image, label in pair_files(processed, "image_", processed, "label_")]
    return cases


def btcv_cases(root: Path, scratch: Path) -> list[SourceCase]:
    """img<NNNN> + label<NNNN>: the 13 BTCV organs mapped onto liver, kidneys and spleen."""
    children = children_by_name(root)
    return [SourceCase(case_id("CT", number), "CT", image, label, label_map=BTCV_CLASSES)
            for number, image, label in pair_files(children["img"], "img", children["label"], "label")]


def chaos_cases(root: Path, scratch: Path) -> list[SourceCase]:
    """Every patient's T2SPIR series, written into `scratch` as image_<id>/label_<id> NIfTI files."""
    series = {patient.name: children_by_name(patient).get(SEQUENCE.lower())
              for patient in children_by_name(root).values()}
    cases = []
    for patient, folder in tqdm([(p, f) for p, f in series.items() if f], desc=f"reading CHAOS {SEQUENCE}",
                                unit="patient"):
        identifier = case_id("MR", patient)
        image, label = scratch / f"image_{identifier}.nii.gz", scratch / f"label_{identifier}.nii.gz"
        convert_series(folder, image, label)
        cases.append(SourceCase(identifier, "MR", image, label, label_map=PROCESSED_CLASSES))
    return cases


SCANNERS = {"processed": processed_cases, "btcv": btcv_cases, "chaos": chaos_cases}


def dataset_keys(cases: list[SourceCase]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """channel_names (the modality, or CT/MR when mixed) and the extra "modalities" key of the domains present."""
    domains = sorted({case.site for case in cases})
    channel = MODALITIES[domains[0]] if len(domains) == 1 else MIXED_CHANNEL
    return {"0": channel}, {"modalities": {domain: MODALITIES[domain] for domain in domains}}


def convert_abdominal(sources: str | Path | Sequence[str | Path], raw_root: str | Path,
                      dataset: str | int = DEFAULT_DATASET, overwrite: bool = False) -> Path:
    """Convert every abdominal layout found in `sources` into one raw dataset; return its folder."""
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    found = [item for source in sources for item in find_sources(Path(source))]
    name = dataset_folder_name(dataset, DEFAULT_NAME)
    raw_root = Path(raw_root)
    check_target(raw_root / name, overwrite)  # before the slow CHAOS staging
    with scratch_folder(raw_root, "abdominal") as scratch:
        cases = [case for layout, folder in found for case in SCANNERS[layout](folder, scratch)]
        if not cases:
            raise DesamError(f"{', '.join(str(f) for _, f in found)}: layout recognised but no cases found")
        channel_names, extra = dataset_keys(cases)
        description = ("Abdominal organs (liver, right kidney, left kidney, spleen) converted by desam from "
                       + "; ".join(f"{layout} {folder}" for layout, folder in found))
        return write_raw_dataset(cases, raw_root, name, description, overwrite, labels=LABELS,
                                 channel_names=channel_names, extra=extra)


def build_parser() -> argparse.ArgumentParser:
    return converter_parser(
        "Convert abdominal CT and MR organ data into one desam raw dataset: classes 1 liver, 2 right kidney, "
        f"3 left kidney, 4 spleen; domains CT and MR; case ids CT_NNNN and MR_NNNN; {UNDERSTOOD}.",
        "folder(s) holding the data, searched 3 levels down; give one folder with BTCV/ and CHAOS/ inside, or "
        "several folders", DEFAULT_DATASET, nargs="+")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    return run_converter(convert_abdominal, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
