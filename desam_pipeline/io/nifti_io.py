"""Read and write NIfTI volumes with nibabel, keeping geometry exactly and failing with one clear line."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from desam_pipeline.io.atomic import atomic_path
from desam_pipeline.utilities.errors import DesamError

NIFTI_ENDINGS = (".nii.gz", ".nii")


def nifti_stem(path: str | os.PathLike) -> str | None:
    """File name without its NIfTI ending, matched in any case (`.nii.gz`, `.NII.GZ`, `.nii`); None for other
    files and hidden ones (temporaries)."""
    name = Path(path).name
    if name.startswith("."):
        return None
    for ending in NIFTI_ENDINGS:
        if name.lower().endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return None


def load_nifti(path: str | os.PathLike) -> nib.Nifti1Image:
    """Open a NIfTI file, turning every nibabel/zlib failure into a DesamError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DesamError(f"{path}: file not found")
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise DesamError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from exc


def read_volume(path: str | os.PathLike, dtype=np.float32) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Load the voxel array of a 3D volume (a trailing singleton 4th axis is dropped) and its image.

    Only real scalar voxels are read: RGB/vector (structured) and complex types are an error naming
    the file, never a silent cast.
    """
    image = load_nifti(path)
    stored = image.get_data_dtype()
    if stored.fields is not None or stored.kind not in "biuf":
        raise DesamError(f"{path}: voxel type {stored} is not a real scalar intensity "
                         f"(RGB, vector and complex images are not supported)")
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as exc:
        raise DesamError(f"{path}: cannot read voxel data ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DesamError(f"{path}: expected a 3D volume, found shape {tuple(data.shape)}")
    check_geometry(image, path)
    return np.asarray(data, dtype=dtype), image


def check_geometry(image: nib.Nifti1Image, path: str | os.PathLike) -> None:
    """Voxel sizes finite and positive, the affine finite: distances, resampling and saving need them."""
    zooms = [float(z) for z in image.header.get_zooms()[:3]]
    if not all(np.isfinite(zooms)) or min(zooms) <= 0:
        raise DesamError(f"{path}: voxel size {zooms} (header pixdim) must be finite and positive")
    if not np.all(np.isfinite(image.affine)):
        raise DesamError(f"{path}: affine has non-finite values (NaN or inf); fix the header's qform/sform")


def save_like(array: np.ndarray, reference: nib.Nifti1Image, target: str | os.PathLike,
              dtype=np.uint8) -> None:
    """Write `array` atomically with exactly the reference's affine and header orientation."""
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    out = nib.Nifti1Image(np.asarray(array, dtype=dtype), reference.affine, header)
    out.set_qform(reference.get_qform(), int(reference.header["qform_code"]))
    out.set_sform(reference.get_sform(), int(reference.header["sform_code"]))
    with atomic_path(target) as tmp:
        nib.save(out, str(tmp))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes (checkpoints, input volumes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def voxel_spacing(image: nib.Nifti1Image) -> tuple[float, float, float]:
    """Voxel spacing in mm of the first three axes, from the header zooms."""
    return tuple(float(z) for z in image.header.get_zooms()[:3])
