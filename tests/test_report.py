"""desam_report: source x target matrices (CSV, Markdown, PNG) from synthetic per_case.csv (and, under the full
protocol, per_slice.csv) files."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from evaluation.class_tables import mean_over_structures
from evaluation.report import main

DATASET = "Dataset900_Toy"
SITES = ("SiteA", "SiteB", "SiteC")


def model_folder(results, source, mode="grid", plans="DeSAMPlans_tiny"):
    return results / DATASET / f"DeSAMTrainer__{plans}__{mode}__src-{source}"


def write_per_case(results, source, seed, mode="grid", protocol="full", nan_hd95=(), structure=""):
    """Three cases per target site with random metrics (and under `full` 6 random slices each, the structure on
    slices 1-4, with their per_slice.csv), in `structure`'s folder when given; returns the per-case frame written
    (with `slices` under `full`)."""
    rng = np.random.default_rng(seed)
    rows, slices = [], []
    for site in SITES:
        for i in range(3):
            case = f"{site}_Case{i:02d}"
            rows.append({"case": case, "site": site, "dice": rng.uniform(0.3, 0.95),
                         "hd95": np.nan if case in nan_hd95 else rng.uniform(1, 30),
                         "assd": rng.uniform(0.5, 5), "nsd": rng.uniform(0.2, 0.9), "in_domain": site == source})
            if protocol == "full":
                iou = rng.uniform(0.2, 1.0, 6).round(2)
                rows[-1] |= {"components": int(rng.integers(1, 40)), "mean_predicted_iou": iou.mean()}
                slices.append(pd.DataFrame({"case": case, "site": site, "in_domain": site == source, "slice": range(6),
                                            "reference": [False, True, True, True, True, False],
                                            "predicted": rng.random(6) < 0.7, "predicted_iou": iou}))
    frame = pd.DataFrame(rows)
    target = model_folder(results, source, mode) / "evaluation" / protocol / structure / "per_case.csv"
    target.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(target, index=False)
    if protocol == "full":
        per_slice = pd.concat(slices, ignore_index=True)
        per_slice.to_csv(target.parent / "per_slice.csv", index=False)
        frame.attrs["slices"] = per_slice
    return frame


@pytest.fixture
def results(trees):
    """Two evaluated sources (SiteA with one NaN HD95) and one trained but not evaluated (SiteC)."""
    frames = {"SiteA": write_per_case(trees["results"], "SiteA", 1, nan_hd95=("SiteB_Case01",)),
              "SiteB": write_per_case(trees["results"], "SiteB", 2)}
    model_folder(trees["results"], "SiteC").mkdir(parents=True)
    return trees["results"], frames


def run(argv):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    return stop.value.code


def test_report_outputs(results, capsys):
    root, frames = results
    assert run(["-d", "900"]) == 0
    captured = capsys.readouterr()
    assert "SiteC has no full evaluation" in captured.err
    out = root / DATASET / "report" / "grid__full"
    expected = {s: f.groupby("site")[["dice", "hd95"]].mean() for s, f in frames.items()}

    dice = pd.read_csv(out / "dice_matrix.csv").set_index("source")
    assert (dice["protocol"] == "full").all()
    assert list(dice.index) == ["SiteA", "SiteB"]
    assert list(dice.columns) == ["protocol", *SITES, "mean unseen", "pooled unseen"]
    for source in ("SiteA", "SiteB"):
        for site in SITES:
            assert dice.at[source, site] == pytest.approx(expected[source].at[site, "dice"], abs=1e-12)
        unseen = [expected[source].at[s, "dice"] for s in SITES if s != source]
        assert dice.at[source, "mean unseen"] == pytest.approx(np.mean(unseen), abs=1e-12)
        pooled = frames[source].query("site != @source")
        assert dice.at[source, "pooled unseen"] == pytest.approx(pooled["dice"].mean(), abs=1e-12)

    hd95 = pd.read_csv(out / "hd95_matrix.csv").set_index("source")
    nan_free = frames["SiteA"].query("site == 'SiteB'")["hd95"].dropna()
    assert len(nan_free) == 2
    assert hd95.at["SiteA", "SiteB"] == pytest.approx(nan_free.mean(), abs=1e-12)
    pooled = frames["SiteA"].query("site != 'SiteA'")["hd95"].dropna()
    assert hd95.at["SiteA", "pooled unseen"] == pytest.approx(pooled.mean(), abs=1e-12)

    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == 6 and set(cells["mode"]) == {"grid"}
    in_domain = cells[cells["in_domain"]]
    assert sorted(zip(in_domain["source"], in_domain["target"])) == [("SiteA", "SiteA"), ("SiteB", "SiteB")]
    nan_cell = cells.query("source == 'SiteA' and target == 'SiteB'").iloc[0]
    assert (nan_cell["cases"], nan_cell["hd95_n"], nan_cell["hd95_excluded"]) == (3, 2, 1)

    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "protocol: full" in markdown and "grid mode" in markdown
    a_row = next(line for line in markdown.splitlines() if line.startswith("| SiteA |") and "*" in line)
    cells_a = [c.strip() for c in a_row.strip("|").split("|")]
    assert cells_a[1] == f"{expected['SiteA'].at['SiteA', 'dice']:.4f}*"
    assert cells_a[2] == f"{expected['SiteA'].at['SiteB', 'dice']:.4f}"
    assert "3 (1 NaN)" in markdown
    assert "SiteC" not in dice.index

    for name in ("dice_heatmap.png", "hd95_heatmap.png"):
        png = out / name
        assert png.stat().st_size > 2000 and png.read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".tmp-*"))


def pairwise_auc(slices: pd.DataFrame) -> float:
    """Wins (ties half) of a slice with structure over an empty one, over all such pairs."""
    positive = slices.loc[slices["reference"], "predicted_iou"].to_numpy()
    negative = slices.loc[~slices["reference"], "predicted_iou"].to_numpy()
    wins = (positive[:, None] > negative[None, :]).sum() + 0.5 * (positive[:, None] == negative[None, :]).sum()
    return wins / (positive.size * negative.size)


def test_detection_matrices_pool_the_slices_of_each_cell(results, capsys):
    root, frames = results
    assert run(["-d", "900"]) == 0
    out = root / DATASET / "report" / "grid__full"
    fp = pd.read_csv(out / "fp_slices_pct_matrix.csv").set_index("source")
    auc = pd.read_csv(out / "gate_auc_matrix.csv").set_index("source")
    components = pd.read_csv(out / "components_median_matrix.csv").set_index("source")
    assert list(auc.columns) == ["protocol", *SITES, "mean unseen", "pooled unseen"]
    for source, frame in frames.items():
        slices = frame.attrs["slices"]
        for site in SITES:
            cell = slices[slices["site"] == site]
            empty = cell[~cell["reference"]]
            assert fp.at[source, site] == pytest.approx(100 * empty["predicted"].sum() / len(empty))
            assert auc.at[source, site] == pytest.approx(pairwise_auc(cell))
            assert components.at[source, site] == frame.loc[frame["site"] == site, "components"].median()
        unseen = slices[slices["site"] != source]
        assert auc.at[source, "pooled unseen"] == pytest.approx(pairwise_auc(unseen))
        unseen_means = [auc.at[source, s] for s in SITES if s != source]
        assert auc.at[source, "mean unseen"] == pytest.approx(np.mean(unseen_means))
    markdown = (out / "report.md").read_text()
    assert "## Slice detection" in markdown and "### Gate AUC" in markdown and "### False-positive slices" in markdown
    assert f"{auc.at['SiteA', 'SiteA']:.3f}*" in markdown


def test_full_protocol_needs_the_slice_detection(results, capsys):
    root, _ = results
    per_slice = model_folder(root, "SiteB") / "evaluation" / "full" / "per_slice.csv"
    per_slice.unlink()
    assert run(["-d", "900"]) == 1
    assert f"{per_slice}: not found (rerun desam_evaluate for it" in capsys.readouterr().err
    per_case = model_folder(root, "SiteA") / "evaluation" / "full" / "per_case.csv"
    pd.read_csv(per_case).drop(columns=["components", "mean_predicted_iou"]).to_csv(per_case, index=False)
    assert run(["-d", "900"]) == 1
    assert (f"{per_case}: missing column(s) components, mean_predicted_iou (evaluated before slice detection; "
            "rerun desam_evaluate") in capsys.readouterr().err


def test_modes_and_protocols_are_separate(results, capsys):
    root, _ = results
    write_per_case(root, "SiteA", 3, mode="box", protocol="paper")
    assert run(["-d", DATASET, "--protocol", "paper"]) == 0
    assert (root / DATASET / "report" / "box__paper" / "dice_matrix.csv").is_file()
    assert not list((root / DATASET / "report" / "box__paper").glob("gate_auc*"))  # slice detection: full only
    assert not (root / DATASET / "report" / "grid__paper").exists()
    box = pd.read_csv(root / DATASET / "report" / "box__paper" / "dice_matrix.csv")
    assert box["source"].tolist() == ["SiteA"] and (box["protocol"] == "paper").all()


def test_nothing_evaluated_names_the_command(results, capsys):
    assert run(["-d", DATASET, "--mode", "box"]) == 1
    err = capsys.readouterr().err
    assert "desam: error: no evaluated model for mode box" in err
    assert f"desam_evaluate -d {DATASET} --source SITE --mode box --protocol full" in err


def test_no_models_at_all(trees, capsys):
    (trees["results"] / DATASET).mkdir()
    assert run(["-d", DATASET]) == 1
    assert "desam_evaluate" in capsys.readouterr().err


def test_clashing_plans_and_bad_csv(results, capsys):
    root, _ = results
    other = model_folder(root, "SiteA", plans="DeSAMPlans_vit_b") / "evaluation" / "full"
    other.mkdir(parents=True)
    pd.DataFrame({"case": ["x"], "site": ["SiteA"], "dice": [0.5]}).to_csv(other / "per_case.csv", index=False)
    assert run(["-d", DATASET]) == 1
    assert "--plans" in capsys.readouterr().err
    assert run(["-d", DATASET, "--plans", "DeSAMPlans_vit_b"]) == 1
    err = capsys.readouterr().err
    assert "per_case.csv: missing column(s) hd95, assd, nsd, in_domain" in err
    assert run(["-d", DATASET, "--plans", "DeSAMPlans_tiny"]) == 0
    assert run(["-d", DATASET, "--plans-name", "DeSAMPlans_tiny"]) == 0  # the other commands' spelling


def test_several_structures_one_report_each_and_their_mean(trees, capsys):
    """Per structure: its own report (slice detection included); the report folder: the mean over structures,
    read from the mean per_case.csv that desam_evaluate writes (no detection columns there)."""
    root = trees["results"]
    frames = {}
    for s, source in enumerate(("SiteA", "SiteB")):
        frames[source] = {name: write_per_case(root, source, 10 * s + k, structure=name)
                          for k, name in enumerate(("liver", "spleen"))}
        mean = mean_over_structures({k: pd.DataFrame(f.to_dict("list")) for k, f in frames[source].items()})
        assert "components" not in mean.columns
        mean.to_csv(model_folder(root, source) / "evaluation" / "full" / "per_case.csv", index=False)
    assert run(["-d", "900"]) == 0
    out = root / DATASET / "report" / "grid__full"
    for name in ("liver", "spleen"):
        dice = pd.read_csv(out / name / "dice_matrix.csv").set_index("source")
        expected = frames["SiteB"][name].groupby("site")["dice"].mean()
        assert dice.at["SiteB", "SiteA"] == pytest.approx(expected["SiteA"], abs=1e-12)
        assert (out / name / "gate_auc_matrix.csv").is_file()
        assert f"grid mode, {name}" in (out / name / "report.md").read_text(encoding="utf-8")
    dice = pd.read_csv(out / "dice_matrix.csv").set_index("source")
    per_structure = [f.query("site == 'SiteC'")["dice"].mean() for f in frames["SiteA"].values()]
    assert dice.at["SiteA", "SiteC"] == pytest.approx(np.mean(per_structure), abs=1e-12)
    assert not (out / "gate_auc_matrix.csv").exists()  # slice detection is per structure
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "mean over structures" in markdown and "(liver, spleen)" in markdown
    assert "report written to" in capsys.readouterr().err
