"""How well a grid-mode model's gate separates slices with and without its structure, per structure and site.

Reads the `full` evaluation's per-slice table of each model folder (`evaluation/full/per_slice.csv`, or
`evaluation/full/<structure>/per_slice.csv` for several structures) and prints, per structure and site: the
slices with and without the structure, the median predicted IoU (the best grid point's) of each kind, the gate's
ROC AUC over those slices, the IoU threshold the evaluation gated with, and how many slices of each kind pass it.
The AUC says whether the head ranks slices; the medians against the threshold say whether its values are
calibrated. An evaluation with `--iou-threshold calibrated` gated each structure with its folds' thresholds stored
in their checkpoints (their mean is shown).

    python -m benchmarks.gate_separation MODEL_FOLDER [MODEL_FOLDER ...] [--markdown]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from desam_pipeline.inference.model import stored_gate_thresholds, structure_key
from desam_pipeline.inference.settings import CALIBRATED
from desam_pipeline.utilities.detection import gate_auc
from desam_pipeline.utilities.errors import DesamError, cli_entry
from evaluation.detection_tables import PER_SLICE
from evaluation.evaluation_outputs import EVALUATION
from evaluation.tables import to_markdown


def structure_thresholds(model: Path, summary: dict, names: list[str]) -> dict[str, float]:
    """The IoU threshold each structure was gated with: the summary's number, or under `calibrated` the mean of the
    thresholds stored in the structure's fold checkpoints."""
    if summary["iou_threshold"] != CALIBRATED:
        return dict.fromkeys(names, float(summary["iou_threshold"]))
    stored = stored_gate_thresholds(model, summary["folds"], summary["checkpoint_name"])
    structures = summary.get("structures") or {}
    return {name: float(np.mean([np.nan if t is None else t for t in stored[structure_key(structures.get(name))]]))
            for name in names}


def full_evaluation(model: Path) -> dict[str, tuple[float, pd.DataFrame]]:
    """{structure: (its IoU threshold, its per-slice table)} of a model folder's `full` evaluation ("" names the
    structure of a binary dataset)."""
    full = model / EVALUATION / "full"
    summary_file = full / "summary.json"
    if not summary_file.is_file():
        raise DesamError(f"{summary_file}: no full evaluation of this model folder (run desam_evaluate "
                         f"--protocol full)")
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    structures = summary.get("structures") or {}
    folders = {name: full / name for name in structures} if structures else {"": full}
    missing = [f / PER_SLICE for f in folders.values() if not (f / PER_SLICE).is_file()]
    if missing:
        raise DesamError(f"{missing[0]}: no per-slice table (evaluated before slice detection existed)")
    thresholds = structure_thresholds(model, summary, list(folders))
    return {name: (thresholds[name], pd.read_csv(folder / PER_SLICE, dtype={"site": str, "case": str}))
            for name, folder in folders.items()}


def separation(model: Path) -> pd.DataFrame:
    """One row per structure and site: slice counts, median predicted IoU, gate AUC, slices passing the gate."""
    rows = []
    for structure, (threshold, table) in full_evaluation(model).items():
        for site, part in table.groupby("site", sort=True):
            present, empty = part[part["reference"]], part[~part["reference"]]
            rows.append({"model": model.name, "structure": structure, "site": site,
                         "in_domain": bool(part["in_domain"].any()),
                         "slices with": len(present), "slices without": len(empty),
                         "median IoU with": present["predicted_iou"].median(),
                         "median IoU without": empty["predicted_iou"].median(),
                         "gate AUC": gate_auc(part["predicted_iou"], part["reference"]), "threshold": threshold,
                         "with passing": int((present["predicted_iou"] > threshold).sum()),
                         "without passing": int((empty["predicted_iou"] > threshold).sum())})
    return pd.DataFrame(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gate_separation", description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="model folders evaluated in grid mode")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    table = pd.concat([separation(model) for model in args.models], ignore_index=True)
    print(to_markdown(table, floatfmt=".3f") if args.markdown else table.round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
