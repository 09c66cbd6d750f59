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
from evaluation.tables import MEAN_UNSEEN  # noqa: E402

AXIS_LABELS = {"dice": "Dice (0-1, higher is better)", "hd95": "HD95 (mm, lower is better)",
               "assd": "ASSD (mm, lower is better)", "nsd": "NSD (0-1, higher is better)"}
REFERENCE_COLOUR = "#00d000"
PREDICTION_COLOUR = "#ff00ff"


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


def overlay_png(image: np.ndarray, reference: np.ndarray, prediction: np.ndarray, target: str | os.PathLike,
                case: str, site: str, dice: float, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                slice_axis: int = 2) -> int:
    """Image slice with ground-truth (green) and prediction (magenta) contours, on the slice with the
    largest union foreground; physical aspect ratio from `spacing`. Returns the slice index."""
    index = largest_foreground_slice(reference, prediction, slice_axis)

    def take(volume: np.ndarray) -> np.ndarray:
        return np.take(np.asarray(volume), index, axis=slice_axis).T

    plane = [s for a, s in enumerate(spacing) if a != slice_axis]
    picture = take(image).astype(np.float32)
    low, high = np.percentile(picture, [0.5, 99.5])
    height_ratio = picture.shape[0] * plane[1] / (picture.shape[1] * plane[0])
    figure, axis = plt.subplots(figsize=(5.5, float(np.clip(5.5 * height_ratio, 3.0, 9.0))))
    axis.imshow(picture, cmap="gray", vmin=low, vmax=high if high > low else low + 1, origin="lower",
                aspect=plane[1] / plane[0], interpolation="nearest")
    for mask, colour in ((reference, REFERENCE_COLOUR), (prediction, PREDICTION_COLOUR)):
        layer = take(mask).astype(bool)
        if layer.any() and not layer.all():
            axis.contour(layer.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.4, origin="lower")
    axis.legend(handles=[Line2D([], [], color=REFERENCE_COLOUR, label="ground truth"),
                         Line2D([], [], color=PREDICTION_COLOUR, label="prediction")],
                loc="upper right", fontsize=8, framealpha=0.6)
    axis.set_axis_off()
    axis.set_title(f"{case} ({site}), slice {index} of axis {slice_axis}\nDice {dice:.3f}")
    _save(figure, target)
    return index


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
