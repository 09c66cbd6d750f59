"""The inputs of desam_predict: NIfTI files named like nnU-Net's (<case>_0000.nii.gz) or plainly, one case each.

Every problem found before reading (a missing channel, a duplicate case id, a stray name) is kept
with the case, so one bad file is reported and skipped rather than stopping the run.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from desam_pipeline.io.atomic import NAME_MAX
from desam_pipeline.io.nifti_io import nifti_stem, read_volume
from desam_pipeline.utilities.errors import DesamError

CHANNEL_NAME = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class CaseInput:
    """One case to predict: its id, its channel files (channel 0 first) and a problem found before reading."""
    case: str
    files: tuple[Path, ...]
    problem: str | None = None


def _file_problem(path: Path) -> str | None:
    """Why a NIfTI-named entry cannot be read as a file (a dangling link, a folder), None for a file."""
    if path.is_symlink() and not path.exists():
        return f"{path.name}: broken symbolic link (its target {os.readlink(path)} does not exist)"
    if not path.is_file():
        return f"{path.name}: not a file"
    return None


def _channel_problem(files: dict[int, Path], num_channels: int) -> str | None:
    if sorted(files) == list(range(num_channels)):
        return None
    expected = ", ".join(f"_{c:04d}" for c in range(num_channels))
    found = ", ".join(p.name for _, p in sorted(files.items()))
    return f"{found}: the model takes {num_channels} channel file(s) ({expected}) per case"


def discover_inputs(source: str | os.PathLike, num_channels: int = 1) -> list[CaseInput]:
    """Cases of an input folder or file, sorted by case id.

    A folder holding any `*_0000.nii.gz` uses nnU-Net naming (`<case>_XXXX.nii.gz`, one file per
    channel); otherwise every `.nii.gz`/`.nii` file is one case named after the file. Endings match in
    any case, as the converters' do. A case with the wrong channel files, a file that breaks the
    folder's naming or one that cannot be read (a dangling link) comes back with a problem.
    """
    source = Path(source)
    if source.is_file():
        stem = nifti_stem(source)
        if stem is None:
            raise DesamError(f"{source}: not a NIfTI file (.nii.gz or .nii)")
        match = CHANNEL_NAME.match(stem)
        case = match["case"] if match and match["channel"] == "0000" else stem
        return _flag_duplicates([CaseInput(case, (source,), _channel_problem({0: source}, num_channels))])
    if not source.is_dir():
        raise DesamError(f"{source}: input not found (a folder of .nii.gz files or one file)")
    stems = {p: nifti_stem(p) for p in sorted(source.iterdir())}
    stems = {p: s for p, s in stems.items() if s is not None}
    if not stems:
        raise DesamError(f"{source}: no .nii.gz or .nii files")
    if not any(s.endswith("_0000") for s in stems.values()):
        return _flag_duplicates([CaseInput(s, (p,), _file_problem(p) or _channel_problem({0: p}, num_channels))
                                 for p, s in stems.items()])
    groups: dict[str, dict[int, Path]] = {}
    cases = []
    for path, stem in stems.items():
        match = CHANNEL_NAME.match(stem)
        if match:
            groups.setdefault(match["case"], {})[int(match["channel"])] = path
        else:
            cases.append(CaseInput(stem, (path,), f"{path.name}: not named <case>_XXXX like the other "
                                                  f"files of {source} (nnU-Net naming)"))
    for case, files in groups.items():
        unreadable = [problem for path in files.values() if (problem := _file_problem(path))]
        cases.append(CaseInput(case, tuple(files[c] for c in sorted(files)),
                               unreadable[0] if unreadable else _channel_problem(files, num_channels)))
    return _flag_duplicates(cases)


def ignored_inputs(source: str | os.PathLike) -> list[str]:
    """The entries of an input folder that are no case, each with the reason (hidden files: temporaries, unlisted)."""
    source = Path(source)
    if not source.is_dir():
        return []
    return [f"{p.name}: {'a folder' if p.is_dir() else 'not a NIfTI file'} (cases are .nii.gz or .nii files)"
            for p in sorted(source.iterdir()) if not p.name.startswith(".") and nifti_stem(p) is None]


def _flag_duplicates(cases: list[CaseInput]) -> list[CaseInput]:
    """Sorted by case id; a second file mapping to an already taken case id (a.nii next to a.nii.gz) is a problem,
    and so is a case id too long for its mask's file name (a 255-byte `.nii` name)."""
    seen: set[str] = set()
    flagged = []
    for case in sorted(cases, key=lambda c: (c.case, c.files)):
        if case.case in seen:
            case = CaseInput(case.case, case.files, f"{case.files[0].name}: another input file is also case {case.case}")
        elif len(f"{case.case}.nii.gz".encode()) > NAME_MAX:
            case = CaseInput(case.case, case.files, f"{case.files[0].name}: the mask's name {case.case}.nii.gz "
                                                    f"would be longer than {NAME_MAX} bytes; shorten the file name")
        seen.add(case.case)
        flagged.append(case)
    return flagged


def read_case_volume(case: CaseInput) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Channel 0 of a case as a finite 3D float32 volume; every problem is a DesamError naming the file."""
    if case.problem:
        raise DesamError(case.problem)
    volume, image = read_volume(case.files[0])
    if not np.isfinite(volume).all():
        raise DesamError(f"{case.files[0]}: {int((~np.isfinite(volume)).sum())} NaN or infinite voxels")
    if min(volume.shape) == 0:
        raise DesamError(f"{case.files[0]}: empty volume of shape {volume.shape}")
    return volume, image
