"""What desam_evaluate writes per protocol: per_case.csv, per_site.csv, summary.json, the per-site boxplot
and the best / median / worst overlays of each site."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from desam_pipeline.data.orientation import LEGACY_ORIENTATION, from_slices, plan_orientation, to_slices
from desam_pipeline.data.preprocessing import preprocess_volume
from desam_pipeline.data.raw_dataset import image_path, label_path
from desam_pipeline.inference import predictor
from desam_pipeline.io.atomic import write_json
from desam_pipeline.io.nifti_io import read_volume, voxel_spacing
from desam_pipeline.io.safe_names import contained
from desam_pipeline.utilities.metrics import METRICS
from evaluation.evaluate_folder import foreground
from evaluation.evaluation_cases import foreground_labels, prediction_folder
from evaluation.paper_protocol import (BORDER, SLICE_SIZE, paper_volumes, reference_label_grid, slice_grid_spacing,
                                       to_slice_grid, zero_border)
from evaluation.plots import overlay_png, site_boxplot_png
from evaluation.tables import OVERALL, PROTOCOLS, label_protocol, summarise, write_csv

EVALUATION = "evaluation"
OVERLAYS = "overlays"
UNSEEN = "unseen"


def _number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _statistics(summary: pd.DataFrame, group: str, by: str = "site") -> dict:
    block = {}
    for row in summary[summary[by] == group].itertuples(index=False):
        block[row.metric] = {"mean": _number(row.mean), "std": _number(row.std), "median": _number(row.median),
                             "n": int(row.n), "excluded": int(row.excluded)}
    return block


def site_summary(per_case: pd.DataFrame) -> pd.DataFrame:
    """tables.summarise per site and overall, with an in_domain column (blank on the overall row)."""
    summary = summarise(per_case, METRICS, by="site")
    in_domain = per_case.groupby("site")["in_domain"].any().to_dict()
    summary.insert(1, "in_domain", [in_domain.get(s, "") if s != OVERALL else "" for s in summary["site"]])
    return summary


def summary_document(per_case: pd.DataFrame, per_site: pd.DataFrame, context: dict) -> dict:
    """summary.json: protocol and its description, model, folds, per-site, overall and unseen statistics."""
    protocol = context["protocol"]
    unseen = per_case[~per_case["in_domain"].astype(bool)]
    unseen_summary = summarise(unseen.assign(group=UNSEEN), METRICS, by="group") if len(unseen) else None
    document = {
        "protocol": protocol,
        "protocol_description": PROTOCOLS[protocol],
        **{k: v for k, v in context.items() if k != "protocol"},
        "cases": len(per_case),
        "in_domain_cases": int(per_case["in_domain"].astype(bool).sum()),
        "unseen_cases": len(unseen),
        "per_site": {site: {"in_domain": bool(frame["in_domain"].astype(bool).any()), "cases": len(frame),
                            **_statistics(per_site, site)}
                     for site, frame in per_case.groupby("site", sort=True)},
        "overall": _statistics(per_site, OVERALL),
        UNSEEN: _statistics(unseen_summary, UNSEEN, by="group") if unseen_summary is not None else {},
        "exclusions": "a mean leaves out cases whose value is NaN (hd95/assd when only one mask is empty; "
                      "under the paper protocol every metric of a case without foreground); 'excluded' counts them",
    }
    if protocol == "paper":
        document["paper_protocol"] = {"slice_size": SLICE_SIZE, "border_zeroed_px": BORDER,
                                      "slices": "first foreground slice up to, not including, the last one; of "
                                                "those, the ones whose resized ground truth has foreground",
                                      "ground_truth": "resized to 256x256 as the reference does (skimage order 0, "
                                                      "anti-aliased)",
                                      "prediction": "the saved mask resized to 256x256 (nearest)",
                                      "spacing": "slice spacing; in-plane spacing x original size / 256"}
    return document


def pick_overlay_cases(per_case: pd.DataFrame) -> list[tuple[str, str, str, float]]:
    """(site, tag, case, dice) for the best, median (lower) and worst Dice case of each site."""
    picked = []
    for site, frame in per_case.groupby("site", sort=True):
        ranked = frame[np.isfinite(frame["dice"].astype(float))].sort_values(["dice", "case"], kind="stable")
        if ranked.empty:
            continue
        rows = {"worst": ranked.iloc[0], "median": ranked.iloc[(len(ranked) - 1) // 2], "best": ranked.iloc[-1]}
        picked += [(site, tag, row["case"], float(row["dice"])) for tag, row in rows.items()]
    return picked


def write_overlays(per_case: pd.DataFrame, out_dir: Path, raw_dir: Path, dataset_json: dict, folder: Path,
                   plan: dict, protocol: str) -> list[Path]:
    """Contour overlays of each site's best, median and worst case; `paper` shows the scored 256x256 slices."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    labels = foreground_labels(dataset_json)
    axis = int(plan["slice_axis"])
    written = []
    for site, tag, case, dice in pick_overlay_cases(per_case):
        image, image_nii = read_volume(image_path(raw_dir, case, dataset_json))
        reference = foreground(read_volume(label_path(raw_dir, case, dataset_json))[0], labels)
        prediction = foreground(read_volume(predictor.output_path(prediction_folder(folder, site), case))[0], labels)
        spacing = voxel_spacing(image_nii)
        target = contained(out_dir, f"{site}_{tag}_{case}.png")
        if protocol == "paper":
            sam_slices = preprocess_volume(image, plan)  # back to array order, as the protocol's slices
            slices = to_slices(from_slices(sam_slices, axis, plan_orientation(plan)), axis, LEGACY_ORIENTATION)
            ref256 = reference_label_grid(reference, axis)
            pred256 = zero_border(to_slice_grid(prediction, axis)) > 0
            _, _, kept = paper_volumes(reference, prediction, axis)
            pred256[np.setdiff1d(np.arange(len(pred256)), kept)] = False
            overlay_png(slices, ref256, pred256, target, case, site, dice,
                        slice_grid_spacing(spacing, image.shape, axis), slice_axis=0)
        else:
            overlay_png(image, reference, prediction, target, case, site, dice, spacing, slice_axis=axis)
        written.append(target)
    return written


def write_evaluation(per_case: pd.DataFrame, out_dir: Path, context: dict, title: str, raw_dir: Path,
                     dataset_json: dict, folder: Path, plan: dict) -> pd.DataFrame:
    """per_case.csv, per_site.csv, summary.json, per_site_boxplot.png and overlays/ of one protocol."""
    protocol = context["protocol"]
    per_site = site_summary(per_case)
    write_csv(label_protocol(per_case, protocol), out_dir / "per_case.csv")
    write_csv(label_protocol(per_site, protocol), out_dir / "per_site.csv")
    write_json(summary_document(per_case, per_site, context), out_dir / "summary.json")
    boxes = per_case.assign(target=[f"{site}\n(in-domain)" if in_domain else site
                                    for site, in_domain in zip(per_case["site"], per_case["in_domain"])])
    site_boxplot_png(boxes, out_dir / "per_site_boxplot.png", f"{title}, protocol {protocol}", site_column="target")
    write_overlays(per_case, out_dir / OVERLAYS, raw_dir, dataset_json, folder, plan, protocol)
    return per_site
