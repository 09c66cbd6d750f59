"""Evaluation of a dataset with several structures: one evaluation per structure, and their mean.

Each structure is scored as a binary dataset of its own (label == value, in reference and prediction) into
`evaluation/<protocol>/<structure name>/`, with every table and plot of a binary evaluation. The folder
`evaluation/<protocol>/` itself holds the mean over the structures: per case, the mean of each overlap
metric over the structures (NaN when any structure's is NaN), summarised per site like a binary evaluation
(the slice detection stays per structure).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import pandas as pd

from desam_pipeline.utilities.metrics import METRICS

CASE_KEYS = ("case", "site", "in_domain", "folds")
MEAN_COLUMNS = (*METRICS, "mean_predicted_iou")
CLASS_MEAN = "mean"
PER_CASE = "per_case.csv"


def structure_names(protocol_dir: Path) -> list[str]:
    """The structures scored in one protocol folder of an evaluation (its subfolders with a per_case.csv), sorted;
    empty for a dataset with one structure."""
    if not protocol_dir.is_dir():
        return []
    return sorted(child.name for child in protocol_dir.iterdir() if (child / PER_CASE).is_file())


def structure_dataset_json(dataset_json: dict, name: str) -> dict:
    """The dataset.json a structure is scored with: its labels only background and that structure."""
    return {**dataset_json, "labels": {"background": 0, name: dataset_json["labels"][name]}}


def mean_over_structures(per_case: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per case: its identity and the mean over the structures of each metric of MEAN_COLUMNS."""
    frames = list(per_case.values())
    keys = [k for k in CASE_KEYS if k in frames[0].columns]
    metrics = [m for m in MEAN_COLUMNS if m in frames[0].columns]
    stacked = pd.concat([f[keys + metrics] for f in frames], ignore_index=True)
    for metric in metrics:
        stacked[metric] = pd.to_numeric(stacked[metric], errors="coerce")
    means = stacked.groupby(keys, sort=False)[metrics].agg(lambda values: values.mean(skipna=False))
    return means.reset_index()


def structure_table(per_site: Mapping[str, pd.DataFrame], metric: str = "dice") -> pd.DataFrame:
    """site x structure table of a metric's per-site mean (per_site.csv of each structure), with the mean over
    structures as the last column."""
    columns = {}
    for name, frame in per_site.items():
        rows = frame[frame["metric"] == metric]
        columns[name] = pd.Series(rows["mean"].to_numpy(float), index=rows["site"].astype(str).to_numpy())
    table = pd.DataFrame(columns)
    table[CLASS_MEAN] = table.mean(axis=1, skipna=False)
    table.index.name = "site"
    return table.reset_index()
