"""Write a raw dataset (nnU-Net v2 format plus "domains") from source image/mask pairs.

Images are written exactly as read: same affine, same qform/sform, same stored dtype, same
stored voxel values and scaling. Masks keep their own geometry and become uint8: {0, 1}
(label > 0) by default, or classes through the case's `label_map` (source value -> class; a
value missing from the map is an error naming the file). The whole dataset folder is built
under a temporary name, checked with `verify_dataset`, and only then renamed into place, so a
failed conversion never leaves a folder that looks complete.
"""
from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import nibabel as nib
import numpy as np
from tqdm import tqdm

from dataset_conversion.folders import building_folder
from desam_pipeline.data.dataset_checks import AFFINE_TOLERANCE, verify_dataset
from desam_pipeline.data.raw_dataset import CHANNEL_SUFFIX, domains, load_dataset_json
from desam_pipeline.io.atomic import atomic_path, write_json
from desam_pipeline.io.nifti_io import load_nifti, save_like
from desam_pipeline.io.safe_names import check_name
from desam_pipeline.utilities.errors import DesamError
from desam_pipeline.utilities.paths import DATASET_PATTERN, add_root_arguments, dataset_name, get_root

FILE_ENDING = ".nii.gz"
LABELS = {"background": 0, "prostate": 1}
CHANNEL_NAMES = {"0": "T2"}


@dataclass(frozen=True)
class SourceCase:
    """One source image and its mask; `channel` picks one volume of a 4D image (MSD's T2);
    `label_map` (source value -> class) keeps classes instead of binarising."""

    case_id: str
    site: str
    image: Path
    label: Path
    channel: int | None = None
    label_map: Mapping[int, int] | None = None


def dataset_folder_name(spec: str | int, default_name: str) -> str:
    """`-d 1` -> Dataset001_<default_name>; a full DatasetNNN_Name is used as given."""
    text = str(spec)
    if DATASET_PATTERN.match(text):
        return text
    if not text.isdigit():
        raise DesamError(f"dataset {text!r} is neither a number nor a DatasetNNN_Name")
    return dataset_name(int(text), default_name)


def _read_array(image: nib.Nifti1Image, path: Path, unscaled: bool) -> np.ndarray:
    """The voxel array, stored (unscaled) or scaled, with a one-line error for corrupt data."""
    try:
        if unscaled and hasattr(image.dataobj, "get_unscaled"):
            return np.asanyarray(image.dataobj.get_unscaled())
        return np.asanyarray(image.dataobj)
    except Exception as exc:  # zlib, EOF and nibabel errors for truncated/corrupt files
        raise DesamError(f"{path}: cannot read voxel data ({type(exc).__name__}: {exc})") from exc


def _select_volume(array: np.ndarray, channel: int | None, path: Path) -> np.ndarray:
    """The 3D volume: the array itself, a squeezed singleton 4th axis, or one channel of a 4D image."""
    if channel is not None:
        if array.ndim != 4 or array.shape[3] <= channel:
            raise DesamError(f"{path}: expected a 4D image with at least {channel + 1} volumes, "
                             f"found shape {tuple(array.shape)}")
        return array[..., channel]
    if array.ndim == 4 and array.shape[3] == 1:
        return array[..., 0]
    if array.ndim != 3:
        raise DesamError(f"{path}: expected a 3D volume, found shape {tuple(array.shape)}")
    return array


def write_image(case: SourceCase, target: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Copy the image's stored voxels, dtype, scaling and orientation to `target`; return (shape, affine)."""
    source = load_nifti(case.image)
    stored = _select_volume(_read_array(source, case.image, unscaled=True), case.channel, case.image)
    slope, inter = getattr(source.dataobj, "slope", 1.0), getattr(source.dataobj, "inter", 0.0)
    out = nib.Nifti1Image(np.ascontiguousarray(stored), source.affine, source.header.copy())
    out.set_qform(source.get_qform(), int(source.header["qform_code"]))
    out.set_sform(source.get_sform(), int(source.header["sform_code"]))
    out.header.set_slope_inter(slope, inter)
    with atomic_path(target) as tmp:
        nib.save(out, str(tmp))
    return stored.shape, source.affine


def map_classes(label: np.ndarray, label_map: Mapping[int, int], path: Path) -> np.ndarray:
    """uint8 classes of a mask through `label_map`; a value the map lacks is an error naming the file."""
    values = np.unique(label).tolist()
    unknown = [v for v in values if v not in label_map]
    if unknown:
        shown = ", ".join(f"{v:g}" for v in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        raise DesamError(f"{path}: label value(s) {shown} not among the expected {sorted(label_map)}")
    classes = np.zeros(label.shape, np.uint8)
    for value in values:
        if label_map[value]:
            classes[label == value] = label_map[value]
    return classes


def write_label(case: SourceCase, image_shape: tuple[int, ...], image_affine: np.ndarray, target: Path) -> None:
    """The mask as uint8 in its own geometry (binarised, or classes through the case's label map), after
    checking it matches the image."""
    source = load_nifti(case.label)
    label = _select_volume(_read_array(source, case.label, unscaled=False), None, case.label)
    if label.shape != tuple(image_shape):
        raise DesamError(f"{case.label}: mask shape {tuple(label.shape)} differs from image shape "
                         f"{tuple(image_shape)} of {case.image.name}")
    if not np.allclose(source.affine, image_affine, atol=AFFINE_TOLERANCE):
        raise DesamError(f"{case.label}: mask affine differs from the affine of {case.image.name} "
                         f"by more than {AFFINE_TOLERANCE}")
    label = np.asarray(label)
    classes = label > 0 if case.label_map is None else map_classes(label, case.label_map, case.label)
    save_like(classes, source, target, dtype=np.uint8)


def check_cases(cases: list[SourceCase]) -> None:
    """Case ids and site names must be plain names (they become file and folder names), case ids unique."""
    if not cases:
        raise DesamError("no cases found to convert")
    seen: dict[str, Path] = {}
    for case in cases:
        check_name(case.case_id, "case id", case.image)
        check_name(case.site, "site name", case.image)
        if case.case_id in seen:
            raise DesamError(f"{case.image}: case id {case.case_id} also used by {seen[case.case_id]}")
        seen[case.case_id] = case.image


def dataset_json(cases: list[SourceCase], name: str, description: str, labels: Mapping[str, int] = LABELS,
                 channel_names: Mapping[str, str] = CHANNEL_NAMES, extra: Mapping | None = None) -> dict:
    """nnU-Net v2 dataset.json keys plus DeSAM's case -> site "domains", then any `extra` keys."""
    return {
        "name": name,
        "description": description,
        "channel_names": dict(channel_names),
        "labels": dict(labels),
        "numTraining": len(cases),
        "file_ending": FILE_ENDING,
        "domains": {c.case_id: c.site for c in sorted(cases, key=lambda c: c.case_id)},
        **(extra or {}),
    }


def write_raw_dataset(cases: list[SourceCase], raw_root: Path, name: str, description: str,
                      overwrite: bool = False, labels: Mapping[str, int] = LABELS,
                      channel_names: Mapping[str, str] = CHANNEL_NAMES, extra: Mapping | None = None) -> Path:
    """Convert all cases into `raw_root/name`, verify the result, and return the dataset folder.

    `labels`, `channel_names` and `extra` go into dataset.json (the prostate defaults when not given)."""
    check_cases(cases)
    target = Path(raw_root) / name
    with building_folder(target, overwrite) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for case in tqdm(cases, desc=f"converting {name}", unit="case"):
            shape, affine = write_image(case, tmp / "imagesTr" / f"{case.case_id}{CHANNEL_SUFFIX}{FILE_ENDING}")
            write_label(case, shape, affine, tmp / "labelsTr" / f"{case.case_id}{FILE_ENDING}")
        write_json(dataset_json(cases, name, description, labels, channel_names, extra), tmp / "dataset.json")
        problems = [p.replace(str(tmp), str(target)) for p in verify_dataset(tmp)]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise DesamError(f"converted dataset failed verification: {problems[0]}{more}")
    return target


def summary_line(folder: Path) -> str:
    """`<folder>: N cases (SITE n, ...)` for the command line tools."""
    case_sites = domains(load_dataset_json(folder))
    counts = Counter(case_sites.values())
    return f"{folder}: {len(case_sites)} cases ({', '.join(f'{s} {n}' for s, n in sorted(counts.items()))})"


def converter_parser(description: str, source_help: str, default_dataset: str,
                     nargs: str | None = None) -> argparse.ArgumentParser:
    """The arguments every converter takes: SRC (`nargs="+"`: one or more), -d/--dataset, --overwrite and the
    raw root."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("source", metavar="SRC", nargs=nargs, help=source_help)
    parser.add_argument("-d", "--dataset", default=default_dataset,
                        help=f"dataset number or DatasetNNN_Name (default {default_dataset})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    add_root_arguments(parser, "raw")
    return parser


def run_converter(convert: Callable[[str, Path, str, bool], Path], args: argparse.Namespace) -> int:
    """Run a converter on parsed `converter_parser` arguments and print the summary line of its dataset."""
    print(summary_line(convert(args.source, get_root("raw", args.raw), args.dataset, args.overwrite)))
    return 0
