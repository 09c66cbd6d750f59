"""Dataset fingerprint: geometry, intensities, labels and foreground extent per case and per domain.

Written as `<preprocessed>/<Dataset>/dataset_fingerprint.json`; the per-domain summary shows at
a glance how the sites differ (spacing, size, intensity range). CT (a modality in WINDOWED_MODALITIES) also
gets nnU-Net's intensity window: the 0.5 and 99.5 percentiles of up to FOREGROUND_SAMPLES foreground voxels
drawn per case (seeded), pooled over the modality's cases (`modalities` entry; the plan stores the window).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from desam_pipeline.data import raw_dataset
from desam_pipeline.data.raw_dataset import modality_of_site
from desam_pipeline.data.preprocessing import SLICE_AXIS
from desam_pipeline.data.slice_selection import foreground_slices
from desam_pipeline.io.atomic import write_json
from desam_pipeline.io.nifti_io import read_volume, voxel_spacing

FINGERPRINT_FILE = "dataset_fingerprint.json"
PERCENTILES = (0.5, 50.0, 99.5)
PERCENTILE_KEYS = tuple(f"p{p:g}" for p in PERCENTILES)
WINDOWED_MODALITIES = ("CT",)
WINDOW_PERCENTILES = (0.5, 99.5)   # nnU-Net's CT normalisation
FOREGROUND_SAMPLES = 10000         # per case, as nnU-Net


def foreground_sample(image: np.ndarray, label: np.ndarray, case: str) -> np.ndarray:
    """Up to FOREGROUND_SAMPLES foreground intensities of one case, drawn with a generator seeded by the case id."""
    values = np.asarray(image, dtype=np.float32)[np.asarray(label) > 0]
    if len(values) <= FOREGROUND_SAMPLES:
        return values
    rng = np.random.default_rng(list(case.encode("utf-8")))
    return values[rng.choice(len(values), FOREGROUND_SAMPLES, replace=False)]


def modality_windows(samples: dict[str, list[np.ndarray]]) -> dict[str, dict]:
    """Per windowed modality: case count and the window (WINDOW_PERCENTILES of its pooled foreground samples)."""
    windows = {}
    for modality, parts in sorted(samples.items()):
        pooled = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if modality in WINDOWED_MODALITIES and pooled.size:
            low, high = np.percentile(pooled, WINDOW_PERCENTILES).tolist()
            windows[modality] = {"cases": len(parts), "foreground_window": [float(low), float(max(high, low + 1.0))]}
    return windows


def case_fingerprint(image_file: Path, label_file: Path, domain: str,
                     samples: list[np.ndarray] | None = None) -> dict:
    """Spacing, shape, intensity percentiles, label values and foreground slices of one case; appends its
    foreground intensity sample to `samples` when given."""
    image, image_nii = read_volume(image_file)
    label, _ = read_volume(label_file)
    foreground = foreground_slices(label, SLICE_AXIS)
    if samples is not None:
        samples.append(foreground_sample(image, label, image_file.name))
    return {
        "domain": domain,
        "spacing": list(voxel_spacing(image_nii)),
        "shape": list(image.shape),
        "intensity_percentiles": dict(zip(PERCENTILE_KEYS, np.percentile(image, PERCENTILES).tolist())),
        "label_values": np.unique(label).astype(int).tolist(),
        "foreground_slices": len(foreground),
        "foreground_z": foreground,
    }


def summarise_domain(cases: list[dict]) -> dict:
    """Median (and range) of the per-case figures of one domain."""
    spacing = np.array([c["spacing"] for c in cases])
    shape = np.array([c["shape"] for c in cases])
    foreground = np.array([c["foreground_slices"] for c in cases])
    return {
        "cases": len(cases),
        "spacing_median": np.median(spacing, axis=0).tolist(),
        "spacing_min": spacing.min(axis=0).tolist(),
        "spacing_max": spacing.max(axis=0).tolist(),
        "shape_median": np.median(shape, axis=0).tolist(),
        "shape_min": shape.min(axis=0).tolist(),
        "shape_max": shape.max(axis=0).tolist(),
        "intensity_percentiles_median": {
            key: float(np.median([c["intensity_percentiles"][key] for c in cases])) for key in PERCENTILE_KEYS},
        "label_values": sorted({v for c in cases for v in c["label_values"]}),
        "foreground_slices_median": float(np.median(foreground)),
        "foreground_slices_min": int(foreground.min()),
        "foreground_slices_max": int(foreground.max()),
    }


def compute_fingerprint(raw_dir: str | os.PathLike) -> dict:
    """Fingerprint of every case of a raw dataset, and its summary per domain."""
    raw_dir = Path(raw_dir)
    dataset_json = raw_dataset.load_dataset_json(raw_dir)
    sites = raw_dataset.domains(dataset_json)
    cases, samples = {}, {}
    for case in tqdm(raw_dataset.list_cases(raw_dir, dataset_json), desc="fingerprint", unit="case", leave=False):
        modality = modality_of_site(dataset_json, sites.get(case))
        cases[case] = case_fingerprint(raw_dataset.image_path(raw_dir, case, dataset_json),
                                       raw_dataset.label_path(raw_dir, case, dataset_json), sites.get(case, ""),
                                       samples.setdefault(modality, []) if modality in WINDOWED_MODALITIES else None)
    by_domain: dict[str, list[dict]] = {}
    for fingerprint in cases.values():
        by_domain.setdefault(fingerprint["domain"], []).append(fingerprint)
    fingerprint = {
        "dataset": raw_dir.name,
        "slice_axis": SLICE_AXIS,
        "domains": {site: summarise_domain(items) for site, items in sorted(by_domain.items())},
        "cases": cases,
    }
    windows = modality_windows(samples)
    if windows:
        fingerprint["modalities"] = windows
    return fingerprint


def write_fingerprint(raw_dir: str | os.PathLike, preprocessed_dataset_dir: str | os.PathLike) -> dict:
    """Compute the fingerprint and write it (atomically) into the preprocessed dataset folder."""
    fingerprint = compute_fingerprint(raw_dir)
    write_json(fingerprint, Path(preprocessed_dataset_dir) / FINGERPRINT_FILE)
    return fingerprint


def intensity_windows(fingerprint: dict) -> dict[str, list[float]]:
    """modality -> [low, high]: the plan's `intensity.windows` from the fingerprint (empty without CT)."""
    return {modality: entry["foreground_window"] for modality, entry in fingerprint.get("modalities", {}).items()}


def domain_table(fingerprint: dict):
    """The per-domain summary as a pandas DataFrame (one row per domain) for printing."""
    import pandas as pd  # only for printing; keeps the embedding command's start-up short

    def triple(values, digits):
        return " x ".join(f"{v:.{digits}f}" for v in values)

    rows = []
    for site, summary in fingerprint["domains"].items():
        intensity = summary["intensity_percentiles_median"]
        rows.append({
            "domain": site,
            "cases": summary["cases"],
            "spacing (mm, median)": triple(summary["spacing_median"], 2),
            "shape (median)": triple(summary["shape_median"], 0),
            **{f"intensity {key}": round(intensity[key], 1) for key in PERCENTILE_KEYS},
            "labels": ",".join(str(v) for v in summary["label_values"]),
            "fg slices (median)": summary["foreground_slices_median"],
            "fg slices (min-max)": f"{summary['foreground_slices_min']}-{summary['foreground_slices_max']}",
        })
    return pd.DataFrame(rows).set_index("domain")
