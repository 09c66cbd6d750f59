"""What desam_evaluate writes per protocol: per_case.csv, per_slice.csv (full), per_site.csv, summary.json,
the per-site boxplot and the best / median / worst overlays of each site (a strip of slices across the volume)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from desam_pipeline.data.orientation import LEGACY_ORIENTATION, from_slices, plan_orientation, to_slices
from desam_pipeline.data.preprocessing import preprocess_volume
from desam_pipeline.data.raw_dataset import image_path, label_path, modality_of_site
from desam_pipeline.data.slice_grid import slice_grid_spacing
from desam_pipeline.inference.prediction_cache import prediction_file
from desam_pipeline.io.atomic import write_json
from desam_pipeline.io.nifti_io import read_volume, voxel_spacing
from desam_pipeline.io.safe_names import contained
from desam_pipeline.utilities.metrics import METRICS
from evaluation.detection_tables import CASE_DETECTION, PER_SLICE, POOLED_METRICS, group_detection, slices_of
from evaluation.evaluate_folder import foreground
from evaluation.evaluation_cases import foreground_labels
from evaluation.paper_protocol import (BORDER, SLICE_SIZE, reference_label_grid, reference_slice_indices, to_slice_grid,
                                       zero_border)
from evaluation.plots import overlay_png, site_boxplot_png
from evaluation.tables import (OVERALL, PROTOCOLS, in_domain_flags, label_protocol, markdown_section, summarise,
                               write_csv)

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
        if row.metric in POOLED_METRICS:
            block[row.metric]["pooled"] = _number(row.pooled)
    return block


def site_groups(per_case: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(name, cases) of each site, of the unseen sites' cases pooled (when there are any) and of all cases."""
    groups = [(str(site), frame) for site, frame in per_case.groupby("site", sort=True)]
    unseen = per_case[~in_domain_flags(per_case)]
    return groups + ([(UNSEEN, unseen)] if len(unseen) else []) + [(OVERALL, per_case)]


def site_summary(per_case: pd.DataFrame, per_slice: pd.DataFrame | None) -> pd.DataFrame:
    """Per site, unseen (every unseen case pooled) and overall: tables.summarise of each per-case metric,
    plus `pooled`, the group's value over its slices (slice counts and rates, gate_auc) or cases pooled
    (a gate_spearman row, which has no per-case statistics), NaN for metrics without one; and an in_domain
    column (blank on the overall row)."""
    metrics = [m for m in (*METRICS, *CASE_DETECTION) if m in per_case.columns]
    site_in_domain = per_case.groupby("site")["in_domain"].any().to_dict()
    blocks = []
    for name, cases in site_groups(per_case):
        statistics = group_detection(cases, None if per_slice is None else slices_of(per_slice, cases))
        block = summarise(cases.drop(columns="site"), metrics, by="site").assign(site=name)
        spearman = {"site": name, "metric": "gate_spearman", "cases": len(cases), "n": statistics["spearman_cases"],
                    "excluded": len(cases) - statistics["spearman_cases"]}
        block = pd.concat([block, pd.DataFrame([spearman])], ignore_index=True)
        block["pooled"] = block["metric"].map(lambda metric: statistics.get(metric, float("nan")))
        block.insert(1, "in_domain", "" if name == OVERALL else bool(site_in_domain.get(name, False)))
        blocks.append(block)
    return pd.concat(blocks, ignore_index=True)


def per_site_markdown(per_site: pd.DataFrame, title: str, protocol: str) -> str:
    """What desam_evaluate prints: Dice and HD95 per site and, under `full`, the detection table."""
    shown = per_site[per_site["metric"].isin(["dice", "hd95"])].drop(columns="pooled")
    text = markdown_section(f"{title}: per site", shown, protocol)
    if "fp_slices" in set(per_site["metric"]):
        text += "\n" + markdown_section(f"{title}: can it say 'no structure here'?", detection_table(per_site),
                                         protocol, floatfmt=".3f")
    return text


def detection_table(per_site: pd.DataFrame) -> pd.DataFrame:
    """One row per group of per_site.csv (full protocol): FP slices of the empty slices, pooled slice
    sensitivity and specificity, median components, pooled gate AUC and the gate Spearman."""
    pooled = per_site.pivot(index="site", columns="metric", values="pooled")
    median = per_site.pivot(index="site", columns="metric", values="median")
    order = list(dict.fromkeys(per_site["site"]))
    table = pd.DataFrame({
        "FP slices": [f"{int(pooled.at[s, 'fp_slices'])}/{int(pooled.at[s, 'empty_slices'])}" for s in order],
        "slice sensitivity": pooled.loc[order, "slice_sensitivity"].to_numpy(),
        "slice specificity": pooled.loc[order, "slice_specificity"].to_numpy(),
        "median components": median.loc[order, "components"].to_numpy(),
        "gate AUC": pooled.loc[order, "gate_auc"].to_numpy(),
        "gate Spearman": pooled.loc[order, "gate_spearman"].to_numpy()}, index=pd.Index(order, name="site"))
    return table.reset_index()


def summary_document(per_case: pd.DataFrame, per_site: pd.DataFrame, context: dict) -> dict:
    """summary.json: protocol and its description, model, folds, per-site, overall and unseen statistics."""
    protocol = context["protocol"]
    unseen = per_case[~in_domain_flags(per_case)]
    document = {
        "protocol": protocol,
        "protocol_description": PROTOCOLS[protocol],
        **{k: v for k, v in context.items() if k != "protocol"},
        "cases": len(per_case),
        "in_domain_cases": int(in_domain_flags(per_case).sum()),
        "unseen_cases": len(unseen),
        "per_site": {site: {"in_domain": bool(in_domain_flags(frame).any()), "cases": len(frame),
                            **_statistics(per_site, site)}
                     for site, frame in per_case.groupby("site", sort=True)},
        "overall": _statistics(per_site, OVERALL),
        UNSEEN: _statistics(per_site, UNSEEN),
        "exclusions": "a mean leaves out cases whose value is NaN (hd95/assd when only one mask is empty; "
                      "slice_specificity when a case has no empty slice, slice_sensitivity when it has no slice "
                      "with structure; gate_auc when it has no predicted IoU or only one kind of slice; under the "
                      "paper protocol every metric of a case without foreground); 'excluded' counts them",
        "pooled": "the group's value over all slices of its cases (slice counts, slice_sensitivity, "
                  "slice_specificity, gate_auc) or over its cases (gate_spearman: Spearman of case mean predicted "
                  "IoU against case Dice, NaN with fewer than 3 cases or constant values)",
    }
    if protocol == "paper":
        document["paper_protocol"] = {"slice_size": SLICE_SIZE, "border_zeroed_px": BORDER,
                                      "slices": "first foreground slice up to, not including, the last one; of "
                                                "those, the ones whose resized ground truth has foreground",
                                      "ground_truth": "resized to 256x256 as the reference does (skimage order 0, "
                                                      "anti-aliased)",
                                      "prediction": "the saved mask resized to 256x256 (nearest)",
                                      "spacing": "slice spacing; in-plane spacing x original size / 256",
                                      "slice_detection": "not measured: the protocol scores only slices holding "
                                                         "the structure; see the full protocol"}
    return document


def pick_overlay_cases(per_case: pd.DataFrame) -> list[tuple[str, tuple[str, ...], str, float]]:
    """(site, tags, case, dice) for the worst, median (lower) and best Dice case of each site; a case that
    is several of these (a site of one or two cases) comes once with all its tags, so it is drawn once."""
    picked = []
    for site, frame in per_case.groupby("site", sort=True):
        ranked = frame[np.isfinite(frame["dice"].astype(float))].sort_values(["dice", "case"], kind="stable")
        if ranked.empty:
            continue
        tags: dict[int, list[str]] = {}
        for tag, position in (("worst", 0), ("median", (len(ranked) - 1) // 2), ("best", len(ranked) - 1)):
            tags.setdefault(position, []).append(tag)
        picked += [(site, tuple(names), ranked.iloc[p]["case"], float(ranked.iloc[p]["dice"]))
                   for p, names in tags.items()]
    return picked


def write_overlays(per_case: pd.DataFrame, out_dir: Path, raw_dir: Path, dataset_json: dict, folder: Path,
                   plan: dict, protocol: str) -> list[Path]:
    """Overlay strips (plots.overlay_png) of each site's best, median and worst case; `paper` shows the
    256x256 slices with the prediction's border zeroed, every slice (false positives included), and names the
    slices the protocol scores."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    labels = foreground_labels(dataset_json)
    axis = int(plan["slice_axis"])
    written = []
    for site, tags, case, dice in pick_overlay_cases(per_case):
        image, image_nii = read_volume(image_path(raw_dir, case, dataset_json))
        reference = foreground(read_volume(label_path(raw_dir, case, dataset_json))[0], labels)
        prediction = foreground(read_volume(prediction_file(folder, site, case))[0], labels)
        spacing = voxel_spacing(image_nii)
        target = contained(out_dir, f"{site}_{'-'.join(tags)}_{case}.png")
        if protocol == "paper":
            # the protocol's 256x256 slices, back in array order: resized whatever the plan's in-plane rule
            sam_slices = preprocess_volume(image, {**plan, "in_plane": {"rule": "resize"}},
                                           modality=modality_of_site(dataset_json, site))
            slices = to_slices(from_slices(sam_slices, axis, plan_orientation(plan)), axis, LEGACY_ORIENTATION)
            ref256 = reference_label_grid(reference, axis)
            pred256 = zero_border(to_slice_grid(prediction, axis)) > 0
            kept = reference_slice_indices(reference, ref256, axis)
            scored = (f"{kept.size} slices ({kept[0]}-{kept[-1]})" if kept.size > 1 else
                      f"slice {kept[0]}" if kept.size else "no slice")
            overlay_png(slices, ref256, pred256, target, case, site, dice,
                        slice_grid_spacing(spacing, image.shape, axis, SLICE_SIZE), slice_axis=0,
                        caption=f"paper protocol: 256x256, border zeroed, scores {scored}")
        else:
            overlay_png(image, reference, prediction, target, case, site, dice, spacing, slice_axis=axis)
        written.append(target)
    return written


def write_evaluation(per_case: pd.DataFrame, per_slice: pd.DataFrame | None, out_dir: Path, context: dict, title: str,
                     raw_dir: Path, dataset_json: dict, folder: Path, plan: dict) -> pd.DataFrame:
    """per_case.csv, [per_slice.csv], per_site.csv, summary.json, per_site_boxplot.png and overlays/ of one
    protocol (per_slice.csv under `full`)."""
    protocol = context["protocol"]
    per_site = site_summary(per_case, per_slice)
    write_csv(label_protocol(per_case, protocol), out_dir / "per_case.csv")
    if per_slice is not None:
        write_csv(label_protocol(per_slice, protocol), out_dir / PER_SLICE)
    write_csv(label_protocol(per_site, protocol), out_dir / "per_site.csv")
    write_json(summary_document(per_case, per_site, context), out_dir / "summary.json")
    boxes = per_case.assign(target=[f"{site}\n(in-domain)" if in_domain else site
                                    for site, in_domain in zip(per_case["site"], per_case["in_domain"])])
    site_boxplot_png(boxes, out_dir / "per_site_boxplot.png", f"{title}, protocol {protocol}", site_column="target")
    write_overlays(per_case, out_dir / OVERLAYS, raw_dir, dataset_json, folder, plan, protocol)
    return per_site
