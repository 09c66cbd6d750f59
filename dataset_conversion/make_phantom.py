"""`desam_make_phantom`: a seeded synthetic multi-site prostate T2 MRI collection in the SAML layout.

The offline default dataset of the demo and the tests. Each case is drawn from its own random
stream (seed, site, case number), so a case is the same whatever other sites or how many cases
are generated. Output: OUT/<SITE>/CaseNN.nii.gz + CaseNN_segmentation.nii.gz (BMC:
_Segmentation) and OUT/phantom.json describing the sites and every case; convert it with
`desam_convert_prostate_multisite OUT`. Anatomy: phantom_anatomy; site differences: phantom_sites.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from dataset_conversion.folders import building_folder
from dataset_conversion.phantom_anatomy import gland_extent, prostate_zones, render_signal, sample_anatomy
from dataset_conversion.phantom_sites import (NOISE_SIGMA, SITES, Protocol, Site, case_numbers, receive_sensitivity,
                                              rician, store)
from desam_pipeline.io.atomic import write_json
from desam_pipeline.utilities.errors import DesamError, cli_entry

SITE_ORDER = tuple(SITES)
DEFAULT_CASES_PER_SITE = 4
PSF_SIGMA_VOXELS = 0.5
SLICE_MARGIN = 2          # slices kept free of prostate at each end of the volume
XY_MARGIN_MM = 4.0        # prostate kept this far from the in-plane border
MAX_SHIFT_MM = 8.0        # random in-plane shift of the prostate from the image centre
MAX_DRAWS = 50
COARSE_MM, FINE_MM = 5.0, 1.2


@dataclass(frozen=True)
class PhantomCase:
    site: str
    number: int
    image: np.ndarray     # stored dtype of the site
    label: np.ndarray     # zone labels or binary, the site's label dtype
    affine: np.ndarray
    info: dict


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_voxels) -> np.ndarray:
    """Unit-variance Gaussian random field with the given correlation length (voxels)."""
    field = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_voxels, mode="wrap")
    return field / max(float(field.std()), 1e-6)


def grid_axes(spacing: tuple[float, float, float], matrix: int, n_slices: int, center: tuple[float, float, float]):
    """Voxel-centre coordinates (mm, anatomy-centred) of the `matrix`^2 x `n_slices` grid centred on `center`."""
    sx, sy, sz = spacing
    index = np.arange(matrix, dtype=np.float32) - (matrix - 1) / 2
    xs = center[0] + index * sx                   # i runs from the patient's right to left
    ys = center[1] - index * sy                   # j runs from anterior to posterior
    zs = center[2] + (np.arange(n_slices, dtype=np.float32) - (n_slices - 1) / 2) * sz  # k: inferior to superior
    return xs.astype(np.float32), ys.astype(np.float32), zs.astype(np.float32)


def grid_affine(spacing: tuple[float, float, float], xs, ys, zs, table: np.ndarray) -> np.ndarray:
    """RAS affine of the grid: voxel (0,0,0) at the right-anterior-inferior corner, plus a table offset."""
    sx, sy, sz = spacing
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = np.array([-xs[0], ys[0], zs[0]]) + table
    return affine.astype(np.float32).astype(np.float64)  # exactly what the NIfTI header stores


def place_case(site: Site, protocol: Protocol, rng: np.random.Generator):
    """Draw an anatomy that fits the field of view, the slice count and the grid centre (mm, prostate-centred)."""
    sx, sy, sz = protocol.spacing
    for _ in range(MAX_DRAWS):  # small fields of view (BIDMC) take the glands that fit
        anatomy = sample_anatomy(rng, site.endorectal_coil)
        ex, ey, ez = gland_extent(anatomy)
        room_x = protocol.matrix * sx / 2 - ex - XY_MARGIN_MM
        room_y = protocol.matrix * sy / 2 - ey - XY_MARGIN_MM
        if min(room_x, room_y) >= 0:
            break
    else:
        raise DesamError(f"phantom site {site.name}: field of view too small for the prostate")
    n_slices = int(rng.integers(protocol.slices[0], protocol.slices[1] + 1))
    n_slices = max(n_slices, int(np.ceil(2 * ez / sz)) + 2 * SLICE_MARGIN + 1)
    room_z = n_slices * sz / 2 - ez - SLICE_MARGIN * sz
    center = (rng.uniform(-1, 1) * min(room_x, MAX_SHIFT_MM), rng.uniform(-1, 1) * min(room_y, MAX_SHIFT_MM),
              rng.uniform(-0.3, 1.0) * room_z)  # mostly above the prostate: the bladder shows at the top
    return anatomy, n_slices, center


def generate_case(site_name: str, number: int, seed: int = 0) -> PhantomCase:
    """One case of one site, fully determined by (seed, site, case number)."""
    site = SITES[site_name]
    rng = np.random.default_rng([seed, SITE_ORDER.index(site_name), number])
    protocol = site.protocols[int(rng.integers(len(site.protocols)))]
    sx, sy, sz = protocol.spacing
    anatomy, n_slices, center = place_case(site, protocol, rng)
    xs, ys, zs = grid_axes(protocol.spacing, protocol.matrix, n_slices, center)

    sub = 2 if sz >= 2.5 else 1  # thick slices average two sub-slices (partial volume)
    zs_sub = (zs[:, None] + ((np.arange(sub) + 0.5) / sub - 0.5)[None, :] * sz).ravel().astype(np.float32)
    shape = (xs.size, ys.size, zs_sub.size)
    spacing_sub = np.array([sx, sy, sz / sub])
    coarse = smooth_noise(rng, shape, COARSE_MM / spacing_sub)
    fine = smooth_noise(rng, shape, FINE_MM / spacing_sub)
    signal = render_signal(anatomy, xs, ys, zs_sub, coarse, fine)
    signal = signal.reshape(xs.size, ys.size, zs.size, sub).mean(axis=3)
    signal = gaussian_filter(signal, (PSF_SIGMA_VOXELS, PSF_SIGMA_VOXELS, 0.0))
    signal *= receive_sensitivity(site, anatomy, rng, xs, ys, zs)
    sigma = NOISE_SIGMA[protocol.field_tesla] * rng.uniform(0.85, 1.15)
    gain = rng.uniform(0.8, 1.25)
    image = store(rician(signal, sigma, rng), site, gain)

    zones = prostate_zones(anatomy, xs, ys, zs)
    label = (zones if site.zone_labels else (zones > 0)).astype(site.label_dtype)
    affine = grid_affine(protocol.spacing, xs, ys, zs, rng.uniform(-30, 30, 3))
    volume_ml = float((zones > 0).sum()) * sx * sy * sz / 1000.0
    info = {
        "case": f"Case{number:02d}", "field_tesla": protocol.field_tesla, "spacing": list(protocol.spacing),
        "shape": list(image.shape), "endorectal_coil": site.endorectal_coil, "noise_sigma": round(sigma, 5),
        "storage_gain": round(gain, 4), "prostate_ml": round(volume_ml, 2),
        "prostate_slices": int(np.count_nonzero(zones.any(axis=(0, 1)))),
        "lesion": anatomy.lesion is not None,
    }
    return PhantomCase(site_name, number, image, label, affine, info)


def save_volume(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """A NIfTI with the affine as both qform and sform (code 1, scanner) and mm units."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, 1)
    image.set_sform(affine, 1)
    nib.save(image, str(path))


def site_description(site: Site) -> dict:
    return {
        "protocols": [{"field_tesla": p.field_tesla, "spacing": list(p.spacing), "matrix": p.matrix,
                       "slices": list(p.slices)} for p in site.protocols],
        "endorectal_coil_gain": site.endorectal_gain, "bias": site.bias, "gamma": site.gamma, "knee": site.knee,
        "dtype": site.dtype, "scale": site.scale, "offset": site.offset,
        "labels": "1 transition zone, 2 peripheral zone" if site.zone_labels else "1 prostate",
        "mask_suffix": site.mask_suffix,
    }


def make_phantom(out_dir: str | Path, cases_per_site: int = DEFAULT_CASES_PER_SITE, seed: int = 0,
                 sites: list[str] | tuple[str, ...] | None = None, overwrite: bool = False) -> Path:
    """Write the phantom in the SAML layout into `out_dir` (built aside, renamed when complete)."""
    sites = list(sites or SITE_ORDER)
    unknown = [s for s in sites if s not in SITES]
    if unknown:
        raise DesamError(f"unknown phantom site(s) {', '.join(unknown)}; choose from {', '.join(SITE_ORDER)}")
    if cases_per_site < 1:
        raise DesamError(f"--cases-per-site must be at least 1, got {cases_per_site}")
    out_dir = Path(out_dir)
    jobs = [(s, n) for s in sites for n in case_numbers(SITES[s], cases_per_site)]
    cases = {}
    with building_folder(out_dir, overwrite) as tmp:
        for site_name, number in tqdm(jobs, desc="phantom", unit="case"):
            case = generate_case(site_name, number, seed)
            folder = tmp / site_name
            folder.mkdir(exist_ok=True)
            save_volume(case.image, case.affine, folder / f"Case{number:02d}.nii.gz")
            save_volume(case.label, case.affine, folder / f"Case{number:02d}{SITES[site_name].mask_suffix}.nii.gz")
            cases[f"{site_name}_Case{number:02d}"] = {"site": site_name, **case.info}
        write_json({"generator": "desam_make_phantom", "seed": seed, "cases_per_site": cases_per_site,
                    "sites": {s: site_description(SITES[s]) for s in sites}, "cases": cases},
                   tmp / "phantom.json")
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write a seeded synthetic multi-site prostate T2 MRI collection "
                                                 "in the SAML layout (convert it with "
                                                 "desam_convert_prostate_multisite).")
    parser.add_argument("out", metavar="OUT", help="output folder (must not exist or be empty)")
    parser.add_argument("--cases-per-site", type=int, default=DEFAULT_CASES_PER_SITE,
                        help=f"cases per site (default {DEFAULT_CASES_PER_SITE})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--sites", nargs="+", default=None, choices=SITE_ORDER, metavar="SITE",
                        help=f"sites to generate (default all: {' '.join(SITE_ORDER)})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = make_phantom(args.out, args.cases_per_site, args.seed, args.sites, args.overwrite)
    print(f"{out}: {args.cases_per_site} case(s) per site for {' '.join(args.sites or SITE_ORDER)} (seed {args.seed})")
    return 0


if __name__ == "__main__":
    main()
