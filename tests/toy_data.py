"""Small datasets written inside the tests: an nnU-Net v2 raw tree with domains, and a tiny SAM .pth."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

TINY_TAPS = [[32, 64, 64]] * 3  # tap shapes (C, H, W) of the tiny test SAM (width 32, 64x64 grid)
TINY_FRAME = 1024  # its prompt frame (the ViT family's)


def toy_volume(rng: np.random.Generator, shape=(40, 36, 8), site_gain: float = 1.0,
               empty_slices: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """An intensity volume with a bright ellipsoid blob and its binary label.

    The first and last `empty_slices` axial slices hold no foreground.
    """
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    cx, cy = shape[0] / 2 + rng.uniform(-3, 3), shape[1] / 2 + rng.uniform(-3, 3)
    cz = (shape[2] - 1) / 2
    rx, ry = shape[0] / 5, shape[1] / 5
    rz = max((shape[2] - 2 * empty_slices) / 2, 0.5)
    label = (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2) <= 1
    image = 100 * site_gain + 50 * rng.standard_normal(shape)
    image[label] += 300 * site_gain
    image[:2] = 0
    return image.astype(np.float32), label.astype(np.uint8)


def write_toy_dataset(raw_root: Path, name: str = "Dataset900_Toy", sites=("SiteA", "SiteB"),
                      cases_per_site: int | dict[str, int] = 2, shape=(40, 36, 8), seed: int = 0,
                      spacing=(0.8, 0.8, 3.0), empty_slices: int = 2) -> Path:
    """Write a raw dataset in nnU-Net v2 format plus 'domains' (`empty_slices` at each end of every volume
    without foreground; `cases_per_site` one count for every site or a count per site); return its folder."""
    rng = np.random.default_rng(seed)
    folder = Path(raw_root) / name
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    domains = {}
    for s, site in enumerate(sites):
        for i in range(cases_per_site if isinstance(cases_per_site, int) else cases_per_site[site]):
            case = f"{site}_Case{i:02d}"
            image, label = toy_volume(rng, shape, site_gain=1.0 + 0.5 * s, empty_slices=empty_slices)
            nib.save(nib.Nifti1Image(image, affine), str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
            nib.save(nib.Nifti1Image(label, affine), str(folder / "labelsTr" / f"{case}.nii.gz"))
            domains[case] = site
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2"},
        "labels": {"background": 0, "prostate": 1},
        "numTraining": len(domains),
        "file_ending": ".nii.gz",
        "domains": domains,
    }, indent=2))
    return folder
