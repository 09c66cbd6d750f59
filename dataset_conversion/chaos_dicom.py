"""One CHAOS MR T2-SPIR series (DICOM slices + PNG ground truth) -> a NIfTI image and class label.

Layout: <patient>/T2SPIR/DICOM_anon/*.dcm and <patient>/T2SPIR/Ground/*.png, one PNG per slice.

How a PNG lines up with the DICOM data (the rule of the CHAOS evaluation code,
github.com/emrekavur/CHAOS-evaluation, Python/CHAOSmetrics.py: "the orientation of the slices is
determined by order of image names NOT by position tags in DICOM files"; its readers list each folder,
sort the names, MATLAB naturally, and stack in that order):
- slice: the k-th PNG in natural name order is the ground truth of the k-th DICOM file in natural name
  order (in the MR set they share stems, IMG-0002-00001.png <-> IMG-0002-00001.dcm). The volume is
  stacked by slice position along the slice normal (ImagePositionPatient, ImageOrientationPatient)
  and every PNG goes with its DICOM file, so file names out of position order still line up;
- pixel: PNG row r, column c is pixel row r, column c of that DICOM slice, with no flip or transpose
  (nnU-Net's CHAOS conversion, Task037_038_Chaos_Challenge.py, copies the PNG stack onto the
  dicom2nifti volume unchanged; SSL-ALPNet's png_gth_to_nii flips rows only because dcm2nii(x) stores
  the rows of its NIfTI the other way up);
- grey level: liver 55-70 (63), right kidney 110-135 (126), left kidney 175-200 (189), spleen 240-255
  (252), background 0: the bands of nnU-Net's convert_MR_seg; any other level is an error. A colour PNG
  is read by its first (red) channel, as the CHAOS evaluation code does.
Geometry (origin, spacing, direction) comes from the DICOM headers through SimpleITK's
ImageSeriesReader; slices must share one orientation and be evenly spaced (a missing file is an error).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dataset_conversion.folders import children_by_name, entries
from desam_pipeline.utilities.errors import DesamError

SEQUENCE = "T2SPIR"
DICOM_FOLDER, GROUND_FOLDER = "DICOM_anon", "Ground"
GREY_LEVELS = ((1, 55, 70), (2, 110, 135), (3, 175, 200), (4, 240, 255))  # class, lowest and highest grey level
ORIENTATION_TOLERANCE = 1e-4
SPACING_TOLERANCE = 0.1   # largest deviation of one slice gap from the mean gap, relative to it


def natural_key(path: Path) -> list:
    """Sort key that orders the numbers in a name by value (IMG-2 before IMG-10), as CHAOS's natsortfiles."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def series_files(folder: Path, suffix: str) -> list[Path]:
    """The `suffix` files of a folder in natural name order."""
    return sorted((p for p in entries(folder) if p.is_file() and p.suffix.lower() == suffix), key=natural_key)


def _sitk_message(exc: RuntimeError) -> str:
    """The informative last line of a SimpleITK exception."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _header(reader: sitk.ImageFileReader, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Origin and direction matrix (columns: along a row, down a column, slice normal) of one DICOM file."""
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DesamError(f"{path}: cannot read DICOM header ({_sitk_message(exc)})") from exc
    return np.array(reader.GetOrigin()), np.array(reader.GetDirection()).reshape(3, 3)


def position_order(dicoms: list[Path]) -> list[Path]:
    """The DICOM files sorted by position along the slice normal, after checking orientation and spacing."""
    reader = sitk.ImageFileReader()
    origin, direction = _header(reader, dicoms[0])
    positions = [float(origin @ direction[:, 2])]
    for path in dicoms[1:]:
        origin, other = _header(reader, path)
        if not np.allclose(other[:, :2], direction[:, :2], atol=ORIENTATION_TOLERANCE):
            raise DesamError(f"{path}: slice orientation differs from that of {dicoms[0].name}")
        positions.append(float(origin @ direction[:, 2]))
    order = np.argsort(positions, kind="stable")
    ordered = [dicoms[i] for i in order]
    gaps = np.diff(np.asarray(positions)[order])
    if gaps.size:
        mean = float(gaps.mean())
        worst = int(np.argmax(np.abs(gaps - mean)))
        if mean <= 0 or abs(gaps[worst] - mean) > SPACING_TOLERANCE * mean:
            raise DesamError(f"{ordered[worst + 1]}: {gaps[worst]:.3f} mm from {ordered[worst].name} where the "
                             f"slices are {mean:.3f} mm apart on average (missing or repeated slice?)")
    return ordered


def read_series(ordered: list[Path]) -> sitk.Image:
    """The volume of DICOM files given in slice order, geometry from their headers."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in ordered])
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise DesamError(f"{ordered[0].parent}: cannot read the DICOM series ({_sitk_message(exc)})") from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DesamError(f"{ordered[0].parent}: DICOM pixels are not greyscale")
    return image


def grey_to_classes(grey: np.ndarray, path: Path) -> np.ndarray:
    """uint8 classes of a ground-truth PNG's grey levels (0 background, bands of GREY_LEVELS)."""
    classes = np.zeros(grey.shape, np.uint8)
    known = grey == 0
    for value, low, high in GREY_LEVELS:
        band = (grey >= low) & (grey <= high)
        classes[band] = value
        known |= band
    if not known.all():
        stray = np.unique(grey[~known]).tolist()
        shown = ", ".join(str(v) for v in stray[:8]) + (" ..." if len(stray) > 8 else "")
        raise DesamError(f"{path}: grey level(s) {shown} match no organ (expected 0, liver 55-70, right kidney "
                         "110-135, left kidney 175-200, spleen 240-255)")
    return classes


def read_ground(path: Path, dicom: Path, rows: int, columns: int) -> np.ndarray:
    """Classes of one PNG, which must have the rows and columns of its DICOM slice."""
    try:
        grey = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as exc:
        raise DesamError(f"{path}: cannot read PNG ({_sitk_message(exc)})") from exc
    if grey.ndim == 3:
        grey = grey[..., 0]
    if grey.shape != (rows, columns):
        raise DesamError(f"{path}: {grey.shape[0]} rows x {grey.shape[1]} columns, but its DICOM slice "
                         f"{dicom.name} has {rows} x {columns}")
    return grey_to_classes(grey, path)


def series_folders(series: Path) -> tuple[Path, Path]:
    """DICOM_anon and Ground of a T2SPIR folder (any capitalisation), with one-line errors when absent."""
    children = children_by_name(series)
    dicom, ground = children.get(DICOM_FOLDER.lower()), children.get(GROUND_FOLDER.lower())
    if dicom is None:
        raise DesamError(f"{series}: no {DICOM_FOLDER}/ folder of DICOM slices")
    if ground is None:
        raise DesamError(f"{series}: no {GROUND_FOLDER}/ folder of PNG ground truth (CHAOS test sets have none; "
                         "give the training set)")
    return dicom, ground


def convert_series(series: Path, image_target: Path, label_target: Path) -> None:
    """Write the T2SPIR series `series` as a NIfTI image and its class label (same geometry)."""
    dicom_folder, ground_folder = series_folders(series)
    dicoms, pngs = series_files(dicom_folder, ".dcm"), series_files(ground_folder, ".png")
    if not dicoms:
        raise DesamError(f"{dicom_folder}: no .dcm files")
    if len(pngs) != len(dicoms):
        raise DesamError(f"{ground_folder}: {len(pngs)} PNG files for {len(dicoms)} DICOM slices in {DICOM_FOLDER}/ "
                         "(one PNG per slice expected)")
    ground_of = dict(zip(dicoms, pngs))
    ordered = position_order(dicoms)
    image = read_series(ordered)
    columns, rows = image.GetSize()[:2]
    label = np.stack([read_ground(ground_of[dicom], dicom, rows, columns) for dicom in ordered])
    label_image = sitk.GetImageFromArray(label)
    label_image.CopyInformation(image)
    sitk.WriteImage(image, str(image_target))
    sitk.WriteImage(label_image, str(label_target))
