"""desam_evaluate_folder: per-case CSV (missing cases, site column), geometry errors, summary, tables and plots."""
from __future__ import annotations

import math
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from medpy.metric import binary as medpy_binary

from desam_pipeline.utilities.errors import DesamError
from evaluation.evaluate_folder import evaluate_folder, main
from evaluation.plots import heatmap_png, largest_foreground_slice, overlay_png, site_boxplot_png, strip_slices
from evaluation.tables import label_protocol, markdown_section, summarise, to_markdown

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def folders(toy_dataset, tmp_path):
    """REF = the toy labels; PRED = shifted labels for all cases but SiteB_Case01 (missing), one empty."""
    ref = toy_dataset / "labelsTr"
    pred = tmp_path / "pred"
    pred.mkdir()
    for path in sorted(ref.glob("*.nii.gz")):
        case = path.name[: -len(".nii.gz")]
        if case == "SiteB_Case01":
            continue
        image = nib.load(str(path))
        label = np.asarray(image.dataobj)
        predicted = np.zeros_like(label) if case == "SiteA_Case01" else np.roll(label, 2, axis=0)
        nib.save(nib.Nifti1Image(predicted, image.affine), str(pred / path.name))
    return ref, pred, toy_dataset / "dataset.json"


def test_evaluate_folder_rows(folders):
    ref, pred, dataset_json = folders
    table = evaluate_folder(ref, pred, dataset_json, progress=False)
    assert list(table.columns) == ["case", "site", "dice", "hd95", "assd", "nsd", "slices", "reference_slices",
                                   "empty_slices", "slice_sensitivity", "slice_specificity", "fp_slices", "fn_slices",
                                   "components", "gate_auc", "status"]
    assert table["case"].tolist() == ["SiteA_Case00", "SiteA_Case01", "SiteB_Case00", "SiteB_Case01"]
    assert table["site"].tolist() == ["SiteA", "SiteA", "SiteB", "SiteB"]
    assert table["status"].tolist() == ["ok", "ok", "ok", "missing"]
    missing = table.iloc[3]
    assert all(math.isnan(missing[m]) for m in ("dice", "hd95", "assd", "nsd", "fp_slices", "components"))
    empty = table.iloc[1]
    assert empty["dice"] == 0.0 and math.isnan(empty["hd95"])
    # the toy gland lies on slices 2-5 of 8; the empty prediction detects none of them and no empty slice
    assert (empty["reference_slices"], empty["empty_slices"], empty["fn_slices"], empty["fp_slices"]) == (4, 4, 4, 0)
    assert (empty["slice_sensitivity"], empty["slice_specificity"], empty["components"]) == (0.0, 1.0, 0)
    first = table.iloc[0]
    image = nib.load(str(ref / "SiteA_Case00.nii.gz"))
    label = np.asarray(image.dataobj) > 0
    moved = np.roll(label, 2, axis=0)
    spacing = image.header.get_zooms()[:3]  # header zooms (float32), e.g. 0.8 -> 0.800000011920929
    assert np.allclose(spacing, (0.8, 0.8, 3.0))
    assert first["dice"] == pytest.approx(medpy_binary.dc(moved, label), abs=1e-9)
    assert first["hd95"] == pytest.approx(medpy_binary.hd95(moved, label, voxelspacing=spacing), abs=1e-9)
    assert 0 < first["dice"] < 1
    assert (first["slice_sensitivity"], first["slice_specificity"]) == (1, 1)
    assert (first["fp_slices"], first["components"]) == (0, 1)
    assert math.isnan(first["gate_auc"])  # no quality.csv in PRED: no predicted IoU


def test_every_slice_segmented_and_the_quality_csv_beside_the_predictions(folders, tmp_path):
    """A prediction with foreground on every slice: specificity 0, each empty slice a false positive, each
    stray voxel a component; PRED/quality.csv (the predictor's) gives the gate AUC along the slice axis."""
    ref, pred, dataset_json = folders
    image = nib.load(str(pred / "SiteA_Case00.nii.gz"))
    speckled = np.asarray(image.dataobj).copy()
    speckled[0, 0, :] = 1                      # one voxel on every slice, a line touching nothing else
    nib.save(nib.Nifti1Image(speckled, image.affine), str(pred / "SiteA_Case00.nii.gz"))
    iou = [0.2, 0.3, 0.9, 0.8, 0.8, 0.9, 0.3, 0.8]  # slices 2-5 hold the gland; slice 7's 0.8 ties slices 3, 4
    pd.DataFrame({"case": ["SiteA_Case00"] * 8 + ["SiteA_Case01"] * 8, "slice": list(range(8)) * 2,
                  "predicted_iou": iou + [0.5] * 8}).to_csv(pred / "quality.csv", index=False)
    table = evaluate_folder(ref, pred, dataset_json, progress=False).set_index("case")
    assert list(table.columns)[-2:] == ["mean_predicted_iou", "status"]
    row = table.loc["SiteA_Case00"]
    assert (row["slice_specificity"], row["fp_slices"], row["empty_slices"], row["slice_sensitivity"]) == (0, 4, 4, 1)
    assert row["components"] == 2
    assert row["gate_auc"] == pytest.approx((2 * 4 + 2 * 3.5) / 16)  # each 0.9 beats 4 empty slices, each 0.8 3.5
    assert row["mean_predicted_iou"] == pytest.approx(np.mean(iou))
    assert table.at["SiteA_Case01", "gate_auc"] == 0.5  # a constant predicted IoU separates nothing
    assert math.isnan(table.at["SiteB_Case00", "mean_predicted_iou"])  # not in quality.csv
    assert math.isnan(table.at["SiteB_Case00", "gate_auc"])
    with pytest.raises(DesamError, match=r"quality\.csv: predicted IoU for 8 slice\(s\), but the volume has 40 along "
                                         r"axis 0; predict the case again"):
        evaluate_folder(ref, pred, dataset_json, progress=False, slice_axis=0)
    (pred / "quality.csv").unlink()
    along_x = evaluate_folder(ref, pred, dataset_json, progress=False, slice_axis=0).set_index("case")
    assert along_x.at["SiteA_Case00", "slices"] == 40 and "mean_predicted_iou" not in along_x.columns


def test_labels_select_foreground(folders, tmp_path):
    ref, pred, _ = folders
    relabelled = tmp_path / "relabelled"
    relabelled.mkdir()
    for path in pred.glob("*.nii.gz"):
        image = nib.load(str(path))
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj) * 2, image.affine), str(relabelled / path.name))
    # predictions now hold value 2, references value 1: with labels (1,) every prediction is empty
    table = evaluate_folder(ref, relabelled, labels=(1,), progress=False)
    assert "site" not in table.columns
    assert (table.loc[table["status"] == "ok", "dice"] == 0.0).all()
    both = evaluate_folder(ref, relabelled, labels=(1, 2), progress=False)
    assert both.loc[0, "dice"] > 0.5


def test_cli_writes_csv_and_prints_summary(folders, tmp_path, capsys):
    ref, pred, dataset_json = folders
    out = tmp_path / "out" / "metrics.csv"
    with pytest.raises(SystemExit) as stop:
        main([str(ref), str(pred), "-o", str(out), "--dataset-json", str(dataset_json), "--labels", "1"])
    assert stop.value.code == 0
    written = pd.read_csv(out)
    assert written["status"].tolist() == ["ok", "ok", "ok", "missing"]
    assert not list(out.parent.glob(".tmp-*"))
    printed = capsys.readouterr().out
    assert "| SiteA | dice |" in printed and "| overall | hd95 |" in printed
    assert "1 without a prediction" in printed


def test_cli_default_output_in_pred(folders):
    ref, pred, _ = folders
    with pytest.raises(SystemExit) as stop:
        main([str(ref), str(pred)])
    assert stop.value.code == 0
    assert len(pd.read_csv(pred / "evaluation.csv")) == 4


def test_geometry_mismatch_names_both_files(folders, capsys):
    ref, pred, _ = folders
    image = nib.load(str(pred / "SiteA_Case00.nii.gz"))
    affine = image.affine.copy()
    affine[1, 1] = 0.9
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine), str(pred / "SiteA_Case00.nii.gz"))
    with pytest.raises(DesamError, match=r"pred/SiteA_Case00\.nii\.gz: affine differs from reference .*labelsTr/SiteA_Case00\.nii\.gz"):
        evaluate_folder(ref, pred, progress=False)
    with pytest.raises(SystemExit) as stop:
        main([str(ref), str(pred)])
    assert stop.value.code == 1
    assert "desam: error:" in capsys.readouterr().err


def test_bad_folders(folders, tmp_path):
    ref, pred, _ = folders
    with pytest.raises(DesamError, match="prediction folder not found"):
        evaluate_folder(ref, tmp_path / "nope", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DesamError, match="no reference files"):
        evaluate_folder(empty, pred, progress=False)
    shutil.copy(ref / "SiteA_Case00.nii.gz", empty / "SiteA_Case00.nii.gz")
    (pred / "SiteA_Case00.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DesamError, match="SiteA_Case00.nii.gz: cannot read"):
        evaluate_folder(empty, pred, progress=False)


def test_summary_counts_and_statistics():
    per_case = pd.DataFrame({"case": list("abcde"), "site": ["X", "X", "X", "Y", "Y"],
                             "dice": [0.5, 0.7, 0.9, 0.2, np.nan], "hd95": [1.0, np.nan, 3.0, 4.0, np.nan],
                             "assd": [1.0] * 5, "nsd": [0.5] * 5})
    summary = summarise(per_case).set_index(["site", "metric"])
    x_dice = summary.loc[("X", "dice")]
    assert (x_dice["cases"], x_dice["n"], x_dice["excluded"]) == (3, 3, 0)
    assert x_dice["mean"] == pytest.approx(0.7) and x_dice["median"] == pytest.approx(0.7)
    assert x_dice["std"] == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1))
    overall_hd = summary.loc[("overall", "hd95")]
    assert (overall_hd["n"], overall_hd["excluded"]) == (3, 2)
    assert overall_hd["mean"] == pytest.approx(8.0 / 3)
    assert summary.loc[("Y", "dice"), "excluded"] == 1
    no_site = summarise(per_case.drop(columns="site"))
    assert no_site["site"].unique().tolist() == ["overall"]


def test_markdown_and_protocol_labels():
    frame = pd.DataFrame({"site": ["A|B", "C"], "dice": [0.123456, np.nan], "n": [3, 4]})
    text = to_markdown(frame, floatfmt=".3f")
    lines = text.splitlines()
    assert lines[0] == "| site | dice | n |"
    assert lines[1] == "|:---|---:|---:|"
    assert lines[2] == "| A\\|B | 0.123 | 3 |" and lines[3] == "| C | nan | 4 |"
    section = markdown_section("Per site", frame, protocol="paper")
    assert section.startswith("### Per site") and "protocol: paper (reference protocol" in section
    labelled = label_protocol(frame, "full")
    assert labelled.columns[0] == "protocol" and (labelled["protocol"] == "full").all()
    assert "protocol" not in frame.columns


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 2000 and path.read_bytes()[:8] == PNG_MAGIC


def test_overlay_strip_spans_the_volume(tmp_path):
    """Both end slices, evenly spaced ones and the largest-foreground slice; a false positive on an empty
    end slice is drawn (slice 0 here)."""
    image = np.random.default_rng(0).normal(size=(30, 24, 40)).astype(np.float32)
    reference = np.zeros(image.shape, bool)
    reference[8:20, 6:16, 15:24] = True
    reference[10:18, 8:14, 19] = True
    prediction = reference.copy()
    prediction[3, 3, 0] = True                 # a false positive on the first, empty slice
    prediction[8:22, 6:16, 19] = True          # slice 19: the largest foreground
    assert largest_foreground_slice(reference, prediction) == 19
    drawn = overlay_png(image, reference, prediction, tmp_path / "overlay.png", case="X_01", site="X",
                        dice=0.71, spacing=(0.5, 0.5, 3.0))
    assert _is_png(tmp_path / "overlay.png")
    assert drawn == [0, 4, 9, 13, 17, 19, 22, 26, 30, 35, 39] == strip_slices(40, 19)
    assert strip_slices(40, 17) == [0, 4, 9, 13, 17, 22, 26, 30, 35, 39]  # already among the evenly spaced
    assert strip_slices(6, 3) == [0, 1, 2, 3, 4, 5] and strip_slices(1, 0) == [0]  # short volumes: every slice


def test_plots_write_pngs(tmp_path):
    per_case = pd.DataFrame({"case": list("abcde"), "site": ["X", "X", "X", "Y", "Y"],
                             "dice": [0.5, 0.7, 0.9, 0.2, np.nan], "hd95": [1.0, np.nan, 3.0, 4.0, np.nan]})
    site_boxplot_png(per_case, tmp_path / "box.png", title="toy: per-site metrics (protocol: full)")
    assert _is_png(tmp_path / "box.png")

    values = pd.DataFrame([[0.8, 0.6, 0.6], [np.nan, 0.9, 0.9]], index=["A", "B"], columns=["A", "B", "mean unseen"])
    in_domain = pd.DataFrame([[True, False, False], [False, True, False]], index=values.index, columns=values.columns)
    heatmap_png(values, in_domain, tmp_path / "heat.png", title="Dice", colorbar_label="mean Dice")
    assert _is_png(tmp_path / "heat.png")
    assert not list(tmp_path.glob(".tmp-*"))
