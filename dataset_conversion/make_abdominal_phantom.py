"""`desam_make_abdominal_phantom`: a seeded synthetic CT + T2 MR abdominal collection in the processed layout.

The offline stand-in for the cross-modality abdominal benchmark (SLAug/CSDG processed SABSCT and
CHAOST2). Each case is drawn from its own random stream (seed, modality, case number), so a case is the
same whatever else is generated. Output: OUT/SABSCT/processed/image_<n>.nii.gz + label_<n>.nii.gz
(CT), OUT/CHAOST2/processed/... (MR), n = 1..N, labels 0 background, 1 liver, 2 right kidney, 3 left
kidney, 4 spleen, and OUT/phantom.json describing the modalities and every case; convert it with
`desam_convert_abdominal OUT`. Every volume has organ-free slices at both ends. Anatomy:
abdominal_anatomy; modality differences: abdominal_modalities.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataset_conversion.abdominal_anatomy import Anatomy, organ_labels, render_tissues, sample_anatomy
from dataset_conversion.abdominal_modalities import MODALITIES, Modality, acquire
from dataset_conversion.convert_abdominal import LABELS, PROCESSED_FOLDER, case_id
from dataset_conversion.folders import building_folder
from dataset_conversion.make_phantom import grid_affine, grid_axes, save_volume
from desam_pipeline.io.atomic import write_json
from desam_pipeline.utilities.errors import DesamError, cli_entry

DOMAIN_ORDER = tuple(MODALITIES)
DEFAULT_CASES = 6
MAX_SHIFT_MM = 10.0       # random in-plane shift of the body from the image centre


@dataclass(frozen=True)
class AbdominalCase:
    domain: str
    number: int
    image: np.ndarray     # the modality's stored dtype
    label: np.ndarray     # uint8 classes
    affine: np.ndarray
    info: dict


def slice_grid(modality: Modality, anatomy: Anatomy, rng: np.random.Generator, thickness: float) -> tuple[int, float]:
    """Slice count and centre z: every organ inside, with margin_slices organ-free slices (or more) at each end."""
    low, high = anatomy.organ_z_range()
    below, above = (int(rng.integers(modality.margin_slices[0], modality.margin_slices[1] + 1)) for _ in range(2))
    organ_slices = int(np.ceil((high - low) / thickness)) + 1
    n_slices = organ_slices + below + above
    first = low - below * thickness
    return n_slices, first + (n_slices - 1) * thickness / 2


def generate_case(domain: str, number: int, seed: int = 0) -> AbdominalCase:
    """One case of one modality, fully determined by (seed, modality, case number)."""
    modality = MODALITIES[domain]
    rng = np.random.default_rng([seed, DOMAIN_ORDER.index(domain), number])
    anatomy = sample_anatomy(rng)
    in_plane, thickness = rng.uniform(*modality.spacing_xy), rng.uniform(*modality.slice_mm)
    spacing = (float(in_plane), float(in_plane), float(thickness))
    n_slices, center_z = slice_grid(modality, anatomy, rng, thickness)
    center = (float(rng.uniform(-1, 1) * MAX_SHIFT_MM), float(rng.uniform(-1, 1) * MAX_SHIFT_MM), center_z)
    xs, ys, zs = grid_axes(spacing, modality.matrix, n_slices, center)
    tissues = render_tissues(anatomy, xs, ys, zs)
    label = organ_labels(tissues, xs)
    image, acquisition = acquire(modality, tissues, rng, spacing, xs, ys, zs)
    affine = grid_affine(spacing, xs, ys, zs, rng.uniform(-30, 30, 3))
    voxel_ml = in_plane * in_plane * thickness / 1000.0
    present = {name: np.nonzero((label == value).any(axis=(0, 1)))[0] for name, value in LABELS.items() if value}
    info = {
        "spacing": [round(s, 4) for s in spacing], "shape": list(image.shape),
        "organ_ml": {name: round(float((label == LABELS[name]).sum()) * voxel_ml, 1) for name in present},
        "organ_slices": {name: [int(k[0]), int(k[-1])] if k.size else None for name, k in present.items()},
        **acquisition,
    }
    return AbdominalCase(domain, number, image, label, affine, info)


def modality_description(modality: Modality) -> dict:
    return {"folder": f"{modality.folder}/{PROCESSED_FOLDER}", "spacing_xy_mm": list(modality.spacing_xy),
            "slice_mm": list(modality.slice_mm), "matrix": modality.matrix,
            "organ_free_slices_each_end": list(modality.margin_slices), "levels": modality.levels,
            "texture": modality.texture, "noise_sigma": list(modality.noise), "dtype": modality.dtype,
            "noise": "Rician, smooth receive bias" if modality.mr else "Gaussian"}


def make_abdominal_phantom(out_dir: str | Path, cases_per_site: int = DEFAULT_CASES, seed: int = 0,
                           domains: list[str] | tuple[str, ...] | None = None, overwrite: bool = False) -> Path:
    """Write the phantom in the processed layout into `out_dir` (built aside, renamed when complete)."""
    domains = list(domains or DOMAIN_ORDER)
    unknown = [d for d in domains if d not in MODALITIES]
    if unknown:
        raise DesamError(f"unknown phantom modality(ies) {', '.join(unknown)}; choose from {', '.join(DOMAIN_ORDER)}")
    if cases_per_site < 1:
        raise DesamError(f"--cases-per-site must be at least 1, got {cases_per_site}")
    out_dir = Path(out_dir)
    jobs = [(d, n) for d in domains for n in range(1, cases_per_site + 1)]
    cases = {}
    with building_folder(out_dir, overwrite) as tmp:
        for domain, number in tqdm(jobs, desc="abdominal phantom", unit="case"):
            case = generate_case(domain, number, seed)
            folder = tmp / MODALITIES[domain].folder / PROCESSED_FOLDER
            folder.mkdir(parents=True, exist_ok=True)
            save_volume(case.image, case.affine, folder / f"image_{number}.nii.gz")
            save_volume(case.label, case.affine, folder / f"label_{number}.nii.gz")
            cases[case_id(domain, str(number))] = {"domain": domain, "image": f"{folder.relative_to(tmp)}/"
                                                   f"image_{number}.nii.gz", **case.info}
        write_json({"generator": "desam_make_abdominal_phantom", "seed": seed, "cases_per_site": cases_per_site,
                    "labels": LABELS, "modalities": {d: modality_description(MODALITIES[d]) for d in domains},
                    "cases": cases}, tmp / "phantom.json")
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write a seeded synthetic abdominal CT + T2 MR collection (liver, "
                                                 "kidneys, spleen) in the processed SLAug layout (convert it with "
                                                 "desam_convert_abdominal).")
    parser.add_argument("out", metavar="OUT", help="output folder (must not exist or be empty)")
    parser.add_argument("--cases-per-site", type=int, default=DEFAULT_CASES,
                        help=f"cases per modality (default {DEFAULT_CASES})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--domains", nargs="+", default=None, choices=DOMAIN_ORDER, metavar="DOMAIN",
                        help=f"modalities to generate (default all: {' '.join(DOMAIN_ORDER)})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = make_abdominal_phantom(args.out, args.cases_per_site, args.seed, args.domains, args.overwrite)
    print(f"{out}: {args.cases_per_site} case(s) per modality for {' '.join(args.domains or DOMAIN_ORDER)} "
          f"(seed {args.seed})")
    return 0


if __name__ == "__main__":
    main()
