"""PNG figures of the evaluation (matplotlib, Agg): per-site box plots, contour overlays, heatmaps.

Each figure says what it shows in its title and axis labels (metric, unit, site names), so it reads
without hunting for a legend. Every file is written atomically.
"""
from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from desam_pipeline.io.atomic import atomic_path  # noqa: E402
from desam_pipeline.utilities.detection import slice_presence  # noqa: E402
from evaluation.tables import MEAN_UNSEEN  # noqa: E402

AXIS_LABELS = {"dice": "Dice (0-1, higher is better)", "hd95": "HD95 (mm, lower is better)",
               "assd": "ASSD (mm, lower is better)", "nsd": "NSD (0-1, higher is better)"}
REFERENCE_COLOUR = "#00d000"
PREDICTION_COLOUR = "#ff00ff"
FALSE_POSITIVE_COLOUR = "#e00000"
STRIP_SLICES = 10     # evenly spaced slices of an overlay strip (plus the largest-foreground one)
STRIP_COLUMNS = 6
PANEL_INCHES = 2.3


def _save(figure: plt.Figure, target: str | os.PathLike) -> None:
    with atomic_path(target) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def site_boxplot_png(per_case: pd.DataFrame, target: str | os.PathLike, title: str,
                     metrics: Sequence[str] = ("dice", "hd95"), site_column: str = "site") -> None:
    """One panel per metric, one box per site (points overlaid); tick labels give n and how many
    cases were left out because their value is undefined or missing (NaN)."""
    sites = sorted(per_case[site_column].astype(str).unique()) if site_column in per_case else ["all"]
    figure, axes = plt.subplots(1, len(metrics), figsize=(max(4.0, 1.1 * len(sites) + 2) * len(metrics), 4.2),
                                squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        data, labels = [], []
        for site in sites:
            frame = per_case if site_column not in per_case else per_case[per_case[site_column].astype(str) == site]
            values = pd.to_numeric(frame[metric], errors="coerce")
            data.append(values.dropna().to_numpy())
            excluded = int(values.isna().sum())
            labels.append(f"{site}\nn={len(data[-1])}" + (f"\n({excluded} NaN)" if excluded else ""))
        positions = np.arange(1, len(sites) + 1)
        axis.boxplot([d if d.size else [np.nan] for d in data], positions=positions, widths=0.6, showfliers=False)
        for position, values in zip(positions, data):
            jitter = np.linspace(-0.12, 0.12, values.size) if values.size > 1 else np.zeros(values.size)
            axis.scatter(position + jitter, values, s=12, alpha=0.7, color="tab:blue", zorder=3)
        axis.set_xticks(positions, labels)
        axis.set_xlabel("target site")
        axis.set_ylabel(AXIS_LABELS.get(metric, metric))
        axis.set_title(AXIS_LABELS.get(metric, metric).split(" (")[0] + " per site")
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(title)
    _save(figure, target)


def largest_foreground_slice(reference: np.ndarray, prediction: np.ndarray, slice_axis: int = 2) -> int:
    """Index along `slice_axis` of the slice with the most voxels in the union of both masks."""
    union = np.asarray(reference, bool) | np.asarray(prediction, bool)
    other = tuple(a for a in range(union.ndim) if a != slice_axis)
    return int(np.argmax(union.sum(axis=other)))


def strip_slices(depth: int, largest: int, count: int = STRIP_SLICES) -> list[int]:
    """`count` evenly spaced slice indices from the first to the last slice (both always in; every slice
    of a shorter volume) plus `largest`, sorted."""
    spaced = np.linspace(0, depth - 1, min(count, depth)).round().astype(int)
    return sorted(set(spaced.tolist()) | {int(largest)})


def _plane(volume: np.ndarray, index: int, slice_axis: int) -> np.ndarray:
    """Slice `index` along `slice_axis`, transposed for imshow (rows: the later in-plane axis)."""
    return np.take(np.asarray(volume), index, axis=slice_axis).T


def _frame(axis: plt.Axes, colour: str, width: float) -> None:
    axis.set_xticks([])
    axis.set_yticks([])
    for spine in axis.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


def overlay_png(image: np.ndarray, reference: np.ndarray, prediction: np.ndarray, target: str | os.PathLike,
                case: str, site: str, dice: float, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                slice_axis: int = 2, caption: str = "") -> list[int]:
    """A strip of slices across the whole volume (strip_slices: both end slices, evenly spaced ones and the
    slice with the largest union foreground), each with ground-truth (green) and prediction (magenta)
    contours and its index; a slice predicted without ground truth (false positive) gets a red frame and
    "FP", one with ground truth but no prediction "missed". One display window for all slices, physical
    aspect ratio from `spacing`. Returns the slice indices drawn."""
    indices = strip_slices(image.shape[slice_axis], largest_foreground_slice(reference, prediction, slice_axis))
    reference_present = slice_presence(reference, slice_axis)
    predicted_present = slice_presence(prediction, slice_axis)
    plane = [s for a, s in enumerate(spacing) if a != slice_axis]
    volume = np.asarray(image, np.float32)
    low, high = np.percentile(volume, [0.5, 99.5])
    in_plane = [n for a, n in enumerate(volume.shape) if a != slice_axis]
    height_ratio = float(np.clip(in_plane[1] * plane[1] / (in_plane[0] * plane[0]), 0.4, 2.5))
    columns = min(len(indices), STRIP_COLUMNS)
    rows = -(-len(indices) // columns)
    figure, axes = plt.subplots(rows, columns, squeeze=False,
                                figsize=(PANEL_INCHES * columns, PANEL_INCHES * height_ratio * rows + 1.3))
    for axis in axes.flat[len(indices):]:
        axis.set_visible(False)
    for axis, index in zip(axes.flat, indices):
        axis.imshow(_plane(volume, index, slice_axis), cmap="gray", vmin=low, vmax=high if high > low else low + 1,
                    origin="lower", aspect=plane[1] / plane[0], interpolation="nearest")
        for mask, colour, width in ((reference, REFERENCE_COLOUR, 2.4), (prediction, PREDICTION_COLOUR, 1.0)):
            layer = _plane(mask, index, slice_axis).astype(bool)
            if layer.any() and not layer.all():  # the wider ground truth stays visible under an exact prediction
                axis.contour(layer.astype(np.float32), levels=[0.5], colors=[colour], linewidths=width,
                             origin="lower")
        false_positive = predicted_present[index] and not reference_present[index]
        missed = reference_present[index] and not predicted_present[index]
        label = f"slice {index}" + (": FP" if false_positive else ": missed" if missed else "")
        axis.set_title(label, fontsize=9, color=FALSE_POSITIVE_COLOUR if false_positive else "black",
                       fontweight="bold" if false_positive or missed else "normal")
        _frame(axis, FALSE_POSITIVE_COLOUR if false_positive else "0.6", 3.0 if false_positive else 0.6)
    empty = int((~reference_present).sum())
    false_positives = int((predicted_present & ~reference_present).sum())
    figure.legend(handles=[Line2D([], [], color=REFERENCE_COLOUR, linewidth=2.4, label="ground truth"),
                           Line2D([], [], color=PREDICTION_COLOUR, label="prediction"),
                           Rectangle((0, 0), 1, 1, fill=False, edgecolor=FALSE_POSITIVE_COLOUR, linewidth=2,
                                     label="false positive: predicted, no ground truth")],
                  loc="lower center", ncol=3, fontsize=8, frameon=False)
    figure.suptitle(f"{case} ({site}), Dice {dice:.3f}: {len(indices)} of {len(reference_present)} slices along "
                    f"axis {slice_axis}\n{false_positives} of {empty} slices without ground truth predicted"
                    + (f"; {caption}" if caption else ""), fontsize=10)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    _save(figure, target)
    return indices


def heatmap_png(values: pd.DataFrame, in_domain: pd.DataFrame, target: str | os.PathLike, title: str,
                colorbar_label: str, higher_is_better: bool = True, fmt: str = "{:.3f}") -> None:
    """Source (rows) x target (columns) heatmap with each value written in its cell and in-domain
    cells outlined in black and labelled "in-domain"; the `mean unseen` column and those after it are set apart."""
    matrix = values.to_numpy(dtype=np.float64)
    rows, columns = matrix.shape
    figure, axis = plt.subplots(figsize=(1.3 * columns + 3, 0.8 * rows + 2.2))
    image = axis.imshow(np.ma.masked_invalid(matrix), cmap="viridis" if higher_is_better else "viridis_r",
                        aspect="auto")
    colorbar = figure.colorbar(image, ax=axis)
    colorbar.set_label(colorbar_label)
    finite = matrix[np.isfinite(matrix)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for r in range(rows):
        for c in range(columns):
            value = matrix[r, c]
            bright = np.isfinite(value) and ((value > middle) == higher_is_better)
            text = "n/a" if not np.isfinite(value) else fmt.format(value)
            if in_domain.iat[r, c]:
                text += "\nin-domain"
                axis.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.5))
            axis.text(c, r, text, ha="center", va="center", fontsize=9, color="black" if bright else "white")
    if columns > 1 and MEAN_UNSEEN in values.columns:
        axis.axvline(list(values.columns).index(MEAN_UNSEEN) - 0.5, color="white", linewidth=5)
    axis.set_xticks(range(columns), [str(c) for c in values.columns], rotation=30, ha="right")
    axis.set_yticks(range(rows), [str(i) for i in values.index])
    axis.set_xlabel("target site")
    axis.set_ylabel("source site (trained on)")
    axis.set_title(title)
    _save(figure, target)
