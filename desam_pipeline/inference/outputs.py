"""What desam_predict writes per case besides the mask: `quality/<case>.csv` (PRIM's predicted IoU per
slice), the merged `quality.csv`, and optionally the fold-averaged probabilities as `<case>.npz`."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from desam_pipeline.io.atomic import atomic_path, file_lock
from desam_pipeline.io.safe_names import contained

QUALITY_FILE = "quality.csv"
QUALITY_DIR = "quality"
QUALITY_COLUMNS = ["case", "slice", "predicted_iou", "case_mean_iou"]
_QUALITY_LOCK = ".quality.lock"


def output_path(out_dir: Path, case: str) -> Path:
    return contained(out_dir, f"{case}.nii.gz")


def probabilities_path(out_dir: Path, case: str) -> Path:
    return contained(out_dir, f"{case}.npz")


def quality_path(out_dir: Path, case: str) -> Path:
    return contained(Path(out_dir) / QUALITY_DIR, f"{case}.csv")


def write_case_quality(out_dir: Path, case: str, iou: np.ndarray) -> None:
    """Per-slice predicted IoU of one case, written atomically to `quality/<case>.csv`."""
    table = pd.DataFrame({"case": case, "slice": np.arange(len(iou)), "predicted_iou": iou.astype(float)})
    with atomic_path(quality_path(out_dir, case)) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6f")


def merge_quality(out_dir: str | os.PathLike) -> pd.DataFrame:
    """Rewrite OUT/quality.csv from every finished case's `quality/<case>.csv` (all parts, all runs).

    Columns: case, slice, predicted_iou, case_mean_iou (the mean over the case's slices).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(out_dir / _QUALITY_LOCK):  # parts of a sharded run merge in turn
        parts = [pd.read_csv(path, dtype={"case": str}) for path in sorted((out_dir / QUALITY_DIR).glob("*.csv"))
                 if output_path(out_dir, path.stem).is_file()]
        if parts:
            table = pd.concat(parts, ignore_index=True)
            table["case_mean_iou"] = table.groupby("case")["predicted_iou"].transform("mean")
            table = table.sort_values(["case", "slice"], kind="stable")[QUALITY_COLUMNS]
        else:
            table = pd.DataFrame(columns=QUALITY_COLUMNS)
        with atomic_path(out_dir / QUALITY_FILE) as tmp:
            table.to_csv(tmp, index=False, float_format="%.6f")
    return table


def save_probabilities(probabilities: np.ndarray, target: Path) -> None:
    """Fold-averaged probabilities (the volume's shape, float32) as a compressed .npz, atomically."""
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, probabilities=probabilities.astype(np.float32))
