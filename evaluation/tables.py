"""pandas tables of the evaluation: per-site summaries, source x target matrices, Markdown, protocol labels."""
from __future__ import annotations

import math
import os
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from desam_pipeline.io.atomic import atomic_path
from desam_pipeline.utilities.metrics import METRICS

METRIC_LABELS = {"dice": "Dice", "hd95": "HD95 (mm)", "assd": "ASSD (mm)", "nsd": "NSD"}
PROTOCOLS = {
    "full": "every slice of each volume in its original geometry",
    "paper": "reference protocol of the paper: foreground slices but the last, 256x256, anti-aliased ground truth, "
             "50-px border zeroed",
}
OVERALL = "overall"
MEAN_UNSEEN = "mean unseen"
POOLED_UNSEEN = "pooled unseen"


def summarise(per_case: pd.DataFrame, metrics: Iterable[str] = METRICS, by: str = "site") -> pd.DataFrame:
    """Per-group and overall statistics in long form.

    One row per (group, metric) with columns: `by`, metric, cases (rows in the group), n (cases with a
    value), excluded (cases whose value is NaN: undefined or missing, left out of the statistics),
    mean, std (ddof 1), median. Without a `by` column there is only the overall group.
    """
    groups = []
    if by in per_case.columns:
        groups += [(str(name), frame) for name, frame in per_case.groupby(by, sort=True)]
    groups.append((OVERALL, per_case))
    rows = []
    for name, frame in groups:
        for metric in metrics:
            values = pd.to_numeric(frame[metric], errors="coerce")
            rows.append({by: name, "metric": metric, "cases": len(frame), "n": int(values.notna().sum()),
                         "excluded": int(values.isna().sum()), "mean": values.mean(), "std": values.std(),
                         "median": values.median()})
    return pd.DataFrame(rows, columns=[by, "metric", "cases", "n", "excluded", "mean", "std", "median"])


def _cell(value, floatfmt: str) -> str:
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else format(float(value), floatfmt)
    return str(value).replace("|", "\\|")


def to_markdown(frame: pd.DataFrame, floatfmt: str = ".4f", index: bool = False,
                right_align: Iterable[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table without extra dependencies; numeric columns (or those named in
    `right_align`) are right-aligned."""
    if index:
        frame = frame.reset_index()
    header = [str(c) for c in frame.columns]
    forced = set(right_align) if right_align is not None else set()
    numeric = [c in forced or (pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c]))
               for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if num else ":---" for num in numeric) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v, floatfmt) for v in row) + " |")
    return "\n".join(lines)


def protocol_caption(protocol: str) -> str:
    """One line naming the evaluation protocol and what it scores."""
    return f"protocol: {protocol} ({PROTOCOLS.get(protocol, 'custom')})"


def label_protocol(frame: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """A copy of `frame` with a first column `protocol`, so a CSV says how it was scored."""
    labelled = frame.copy()
    if "protocol" in labelled.columns:
        labelled = labelled.drop(columns="protocol")
    labelled.insert(0, "protocol", protocol)
    return labelled


def markdown_section(title: str, frame: pd.DataFrame, protocol: str | None = None,
                     floatfmt: str = ".4f", index: bool = False) -> str:
    """A Markdown heading, the protocol caption (when given) and the table."""
    parts = [f"### {title}", ""]
    if protocol is not None:
        parts += [f"*{protocol_caption(protocol)}*", ""]
    parts += [to_markdown(frame, floatfmt=floatfmt, index=index), ""]
    return "\n".join(parts)


def write_csv(frame: pd.DataFrame, target: str | os.PathLike, index: bool = False) -> None:
    """Write a CSV atomically."""
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, index=index)


def in_domain_flags(per_case: pd.DataFrame) -> pd.Series:
    """Per case whether it is in-domain, from an in_domain column written as bool, text or 0/1."""
    return per_case["in_domain"].astype(str).str.lower().isin(["true", "1"])


def cross_domain_cells(per_case_by_source: Mapping[str, pd.DataFrame],
                       metrics: Iterable[str] = METRICS) -> pd.DataFrame:
    """Long table with one row per (source, target site): in_domain, cases, and per metric the mean,
    n and excluded count. A cell is in-domain when any of its cases has in_domain true."""
    metrics = list(metrics)
    rows = []
    for source, per_case in per_case_by_source.items():
        for target, frame in per_case.groupby("site", sort=True):
            in_domain = in_domain_flags(frame).any()
            row = {"source": source, "target": str(target), "in_domain": bool(in_domain), "cases": len(frame)}
            for metric in metrics:
                values = pd.to_numeric(frame[metric], errors="coerce")
                row |= {f"{metric}_mean": values.mean(), f"{metric}_n": int(values.notna().sum()),
                        f"{metric}_excluded": int(values.isna().sum())}
            rows.append(row)
    return pd.DataFrame(rows)


def cross_domain_matrix(cells: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Source x target matrix of a metric's mean, with columns `mean unseen` (the mean of the
    per-target means over targets that are not in-domain, each target weighted equally) and
    `pooled unseen` (one mean over every case of those targets, as the reference reports); and a
    boolean matrix of the same shape marking in-domain cells."""
    values = cells.pivot(index="source", columns="target", values=f"{metric}_mean")
    in_domain = cells.pivot(index="source", columns="target", values="in_domain").fillna(False).astype(bool)
    values = values.sort_index().sort_index(axis=1)
    in_domain = in_domain.reindex_like(values).fillna(False).astype(bool)
    counts = cells.pivot(index="source", columns="target", values=f"{metric}_n").reindex_like(values)
    unseen_counts = counts.where(~in_domain & values.notna(), 0)
    values[MEAN_UNSEEN] = values.where(~in_domain).mean(axis=1)
    values[POOLED_UNSEEN] = (values.where(~in_domain, 0).fillna(0) * unseen_counts).sum(axis=1) / \
        unseen_counts.sum(axis=1).replace(0, np.nan)
    in_domain[[MEAN_UNSEEN, POOLED_UNSEEN]] = False
    values.index.name = in_domain.index.name = "source"
    values.columns.name = in_domain.columns.name = None
    return values, in_domain


def matrix_markdown(values: pd.DataFrame, in_domain: pd.DataFrame, floatfmt: str = ".4f") -> str:
    """Markdown of a source x target matrix; in-domain cells carry an asterisk."""
    text = pd.DataFrame(index=values.index, columns=values.columns, dtype=object)
    for row in values.index:
        for column in values.columns:
            cell = _cell(values.at[row, column], floatfmt)
            text.at[row, column] = f"{cell}*" if in_domain.at[row, column] else cell
    text.index.name = "source \\ target"
    return to_markdown(text, index=True, right_align=values.columns)
