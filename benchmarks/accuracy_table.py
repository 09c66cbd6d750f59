"""The accuracy benchmark's one table (CSV + Markdown), its figure and the comparison written from the numbers.

Rows are (arm, protocol), full first; per metric (Dice, HD95) a column per unseen site, `mean unseen` (the mean
of the per-site means, each site weighted equally) and `in-domain` (the held-out source cases of fold 0); then,
on the full protocol's rows, whether the arm can say "no prostate here" over the unseen cases pooled: FP slices
(slices without ground truth that got a mask, % of all such slices), the median number of connected components
of a predicted volume and the gate AUC (PRIM's predicted IoU separating slices with and without ground truth;
NaN for arms without a predicted IoU, e.g. nnU-Net); then the arm's wall time. The paper protocol scores only
slices holding the prostate, so its rows leave these columns empty. The DeSAM-P seeds give the spread (max -
min of their mean-unseen Dice, per protocol); an arm whose mean-unseen Dice lies closer than that spread to the
seeds' mean is marked tied.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.accuracy_arms import SOURCE, Arm  # noqa: E402
from desam_pipeline.io.atomic import atomic_path  # noqa: E402
from evaluation.detection_tables import PER_SLICE, group_detection, slices_of  # noqa: E402
from evaluation.evaluate import EVALUATION  # noqa: E402
from evaluation.tables import (  # noqa: E402
    MEAN_UNSEEN,
    POOLED_UNSEEN,
    PROTOCOLS,
    cross_domain_cells,
    cross_domain_matrix,
    in_domain_flags,
    markdown_section,
    write_csv,
)

METRICS = {"dice": "Dice", "hd95": "HD95 mm"}
DETECTION = {"fp_slices_pct": f"FP slices % {POOLED_UNSEEN}", "components_median": f"median components {POOLED_UNSEEN}",
             "gate_auc": f"gate AUC {POOLED_UNSEEN}"}  # group_detection statistic -> column (full protocol)
IN_DOMAIN = "in-domain"
MEAN_DICE = f"Dice {MEAN_UNSEEN}"


def arm_rows(arm: Arm, folder: Path, wall_s: float) -> list[dict]:
    """One row per protocol from the arm's evaluation/<protocol>/per_case.csv (and full's per_slice.csv)."""
    rows = []
    for protocol in PROTOCOLS:
        per_case = pd.read_csv(folder / EVALUATION / protocol / "per_case.csv", dtype={"case": str, "site": str})
        cells = cross_domain_cells({arm.label: per_case}, list(METRICS))
        row = {"arm": arm.label, "key": arm.name, "family": arm.family, "protocol": protocol}
        for metric, name in METRICS.items():
            values, in_domain = cross_domain_matrix(cells, metric)
            for site in values.columns:
                if site in (MEAN_UNSEEN, POOLED_UNSEEN):
                    continue
                column = IN_DOMAIN if in_domain.at[arm.label, site] else site
                row[f"{name} {column}"] = float(values.at[arm.label, site])
            row[f"{name} {MEAN_UNSEEN}"] = float(values.at[arm.label, MEAN_UNSEEN])
        if protocol == "full":
            per_slice = pd.read_csv(folder / EVALUATION / protocol / PER_SLICE, dtype={"case": str})
            unseen = per_case[~in_domain_flags(per_case)]
            stats = group_detection(unseen, slices_of(per_slice, unseen))
            row |= {column: stats[statistic] for statistic, column in DETECTION.items()}
        row["wall s"] = round(wall_s, 1)
        row["note"] = arm.note
        rows.append(row)
    return rows


def order_columns(table: pd.DataFrame) -> pd.DataFrame:
    """arm, protocol, then per metric the unseen sites (sorted), mean unseen, in-domain; the detection columns;
    wall time, tied, note."""
    columns = ["arm", "protocol"]
    for name in METRICS.values():
        sites = sorted(c for c in table.columns if c.startswith(f"{name} ")
                       and c not in (f"{name} {MEAN_UNSEEN}", f"{name} {IN_DOMAIN}"))
        columns += [*sites, f"{name} {MEAN_UNSEEN}", f"{name} {IN_DOMAIN}"]
    columns += list(DETECTION.values())
    rest = [c for c in ("wall s", "tied", "note", "key", "family") if c in table.columns]
    return table[[c for c in columns if c in table.columns] + rest]


def seed_spread(table: pd.DataFrame) -> dict[str, dict]:
    """Per protocol: the DeSAM-P seeds' mean-unseen Dice values, their mean, and spread (max - min; NaN < 2 seeds)."""
    spread = {}
    for protocol, frame in table[table["family"] == "desam-p"].groupby("protocol"):
        values = frame[MEAN_DICE].astype(float).to_numpy()
        spread[protocol] = {"values": values.tolist(), "mean": float(np.mean(values)),
                            "spread": float(np.ptp(values)) if len(values) > 1 else math.nan,
                            "std": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan}
    return spread


def mark_ties(table: pd.DataFrame, spread: dict[str, dict]) -> pd.DataFrame:
    """`tied`: 'seed' on the DeSAM-P seeds; 'tied' where |mean-unseen Dice - DeSAM-P mean| < the seed spread."""
    marks = []
    for _, row in table.iterrows():
        figures = spread.get(row["protocol"])
        value = float(row[MEAN_DICE])
        if row["family"] == "desam-p":
            marks.append("seed")
        elif figures and math.isfinite(figures["spread"]) and abs(value - figures["mean"]) < figures["spread"]:
            marks.append("tied")
        else:
            marks.append("")
    return table.assign(tied=marks)


def build_table(rows: list[dict]) -> tuple[pd.DataFrame, dict]:
    table = pd.DataFrame(rows)
    spread = seed_spread(table)
    return order_columns(mark_ties(table, spread)), spread


def _family_best(table: pd.DataFrame, family: str) -> pd.Series | None:
    frame = table[table["family"] == family]
    return None if frame.empty else frame.loc[frame[MEAN_DICE].astype(float).idxmax()]


def comparison(table: pd.DataFrame, spread: dict, protocol: str) -> str:
    """One paragraph: DeSAM-P (mean of its seeds) and DeSAM-B against coupled fine-tuning, zero-shot SAM and
    nnU-Net, in mean-unseen Dice, with the seed spread as the yardstick and the sites where DeSAM-P loses."""
    frame = table[table["protocol"] == protocol]
    figures = spread.get(protocol)
    if not figures:
        return f"Under the {protocol} protocol there is no DeSAM-P row to compare with."
    mean, width = figures["mean"], figures["spread"]
    seeds = frame[frame["family"] == "desam-p"]
    sites = [c for c in frame.columns if c.startswith("Dice ") and c not in (MEAN_DICE, f"Dice {IN_DOMAIN}")]
    parts = [f"Under the {protocol} protocol, DeSAM-P reaches a mean unseen Dice of {mean:.3f} over "
             f"{len(seeds)} seed(s) (seed spread {width:.3f})."]
    for family, name in (("coupled", "coupled fine-tuning"), ("zero-shot", "zero-shot SAM"), ("nnunet", "nnU-Net")):
        other = _family_best(frame, family)
        if other is None:
            continue
        value, diff = float(other[MEAN_DICE]), mean - float(other[MEAN_DICE])
        verdict = ("is tied with it (within the seed spread)" if math.isfinite(width) and abs(diff) < width
                   else "beats it" if diff > 0 else "loses to it")
        losing = [c[len("Dice "):] for c in sites if seeds[c].astype(float).mean() < float(other[c])]
        where = (f"; DeSAM-P is below it at {', '.join(losing)}" if losing
                 else "; DeSAM-P is at least as good at every unseen site")
        parts.append(f"Against the best {name} arm ({other['arm']}, {value:.3f}) DeSAM-P {verdict}, difference "
                     f"{diff:+.3f}{where}.")
    box, coupled_box = frame[frame["family"] == "desam-b"], frame[frame["key"] == "coupled_box"]
    if not box.empty and not coupled_box.empty:
        diff = float(box[MEAN_DICE].iloc[0]) - float(coupled_box[MEAN_DICE].iloc[0])
        parts.append(f"In box mode DeSAM-B {'beats' if diff > 0 else 'does not beat'} coupled fine-tuning "
                     f"({diff:+.3f}).")
    tied = frame[frame["tied"] == "tied"]["arm"].tolist()
    parts.append(f"Tied with DeSAM-P: {'; '.join(tied)}." if tied else "No other arm is tied with DeSAM-P.")
    return " ".join(parts)


def write_markdown(table: pd.DataFrame, spread: dict, header: list[str], target: Path) -> str:
    """The Markdown document: header lines, then per protocol the table, the seed spread and the comparison."""
    sections = ["# Accuracy benchmark: single source RUNMC, unseen sites", "", *header, ""]
    for protocol in PROTOCOLS:
        frame = table[table["protocol"] == protocol].drop(columns=["protocol", "key", "family"])
        if protocol != "full":
            frame = frame.drop(columns=[c for c in DETECTION.values() if c in frame.columns])
        figures = spread.get(protocol, {})
        sections.append(markdown_section(f"protocol {protocol}", frame, protocol, floatfmt=".3f"))
        if figures:
            sections.append(f"DeSAM-P seeds: mean unseen Dice {figures['mean']:.3f}, spread (max - min) "
                            f"{figures['spread']:.3f}, std {figures['std']:.3f}; 'tied' = within the spread.")
        if protocol == "full":
            sections.append("Over the unseen cases pooled: FP slices = slices without ground truth that got a mask, "
                            "as % of all such slices; median components = connected components (26-connected) of a "
                            "predicted volume; gate AUC = PRIM's predicted IoU separating slices with and without "
                            "ground truth (0.5 = chance, nan without a predicted IoU).")
        sections += ["", comparison(table, spread, protocol), ""]
    text = "\n".join(sections)
    with atomic_path(target) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return text


def write_figure(table: pd.DataFrame, spread: dict, target: Path) -> None:
    """Mean unseen Dice per arm (bars), each unseen site's mean (points), the DeSAM-P seed range (band)."""
    protocols = list(PROTOCOLS)
    fig, axes = plt.subplots(1, len(protocols), figsize=(7 * len(protocols), 5), sharey=True, squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        frame = table[table["protocol"] == protocol].reset_index(drop=True)
        sites = [c for c in frame.columns if c.startswith("Dice ") and c not in (MEAN_DICE, f"Dice {IN_DOMAIN}")]
        x = np.arange(len(frame))
        colours = ["tab:red" if f in ("desam-p", "desam-b") else "tab:grey" if f == "ablation" else "tab:blue"
                   for f in frame["family"]]
        ax.bar(x, frame[MEAN_DICE].astype(float), color=colours, alpha=0.6, label="mean unseen")
        for k, site in enumerate(sites):
            ax.scatter(x + (k - len(sites) / 2) * 0.06, frame[site].astype(float), s=12, zorder=3,
                       label=site[len("Dice "):])
        figures = spread.get(protocol)
        if figures and len(figures["values"]) > 1:
            ax.axhspan(min(figures["values"]), max(figures["values"]), color="tab:red", alpha=0.15,
                       label="DeSAM-P seed range")
        ax.set_xticks(x, frame["arm"], rotation=60, ha="right", fontsize=8)
        ax.set_title(f"protocol {protocol}: source {SOURCE}")
        ax.set_ylabel("Dice")
        ax.set_ylim(0, 1)
    # one legend beside the last panel, where it hides no arm's points
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_outputs(table: pd.DataFrame, spread: dict, header: list[str], out: Path) -> dict[str, Path]:
    """accuracy.csv, accuracy.md and accuracy.png in OUT."""
    paths = {"csv": out / "accuracy.csv", "md": out / "accuracy.md", "png": out / "accuracy.png"}
    write_csv(table, paths["csv"])
    write_markdown(table, spread, header, paths["md"])
    write_figure(table, spread, paths["png"])
    return paths
