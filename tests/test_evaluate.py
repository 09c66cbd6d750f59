"""desam_evaluate: the paper protocol on hand-made arrays, and the whole command on a tiny model trained
for one epoch by the real trainer (predictions through the predictor, reuse, tables, PNGs, desam_report)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from skimage.transform import resize

from desam_pipeline.data.preprocessing import resize_label_slices
from desam_pipeline.data.slice_grid import slice_grid_spacing
from desam_pipeline.data.splits import SPLITS_FILE
from desam_pipeline.inference.prediction_cache import prediction_key
from desam_pipeline.inference.settings import PredictionSettings
from desam_pipeline.training.train import main as train_main
from desam_pipeline.utilities.errors import DesamError
from desam_pipeline.utilities.metrics import compute_metrics
from evaluation.detection_tables import CASE_DETECTION
from evaluation.evaluate import evaluate_model, main, score_cases
from evaluation.evaluation_cases import EvalCase
from evaluation.evaluation_outputs import pick_overlay_cases
from evaluation.paper_protocol import BORDER, paper_metrics, paper_volumes, reference_label_grid
from evaluation.report import main as report_main
from evaluation.settings import EvaluationSettings
from evaluation.tables import PROTOCOLS
from plans.plan_and_embed import plan_and_embed

from toy_data import write_toy_dataset


DATASET = "Dataset900_Toy"
MODEL = "DeSAMTrainer__DeSAMPlans_tiny__box__src-SiteA"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- paper protocol by hand
def block(shape, x, y, z) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[x[0]:x[1], y[0]:y[1], z[0]:z[1]] = True
    return mask


def test_paper_protocol_scores_foreground_slices_without_the_border_at_256():
    """128x128 slices (each pixel becomes 2x2 at 256x256); GT in slices 1-3, of which the reference scores
    1-2 (its loop stops before the last foreground slice); the prediction is shifted by 3 px and adds a
    false positive in empty slice 0 and one in the 50-px border of slice 1."""
    shape, spacing = (128, 128, 5), (1.0, 1.0, 2.0)
    reference = block(shape, (40, 80), (40, 80), (1, 4))
    shifted = block(shape, (43, 83), (40, 80), (1, 4))
    outside = block(shape, (40, 60), (40, 60), (0, 1))    # no ground truth in slice 0
    border = block(shape, (0, 10), (0, 10), (1, 2))       # 0..20 at 256x256: inside the 50-px border
    prediction = shifted | outside | border

    full = compute_metrics(reference, prediction, spacing)["dice"]
    assert full == pytest.approx(2 * 37 * 40 * 3 / (40 * 40 * 3 + 40 * 40 * 3 + 20 * 20 + 10 * 10))

    paper = paper_metrics(reference, prediction, spacing)
    assert paper["slices_scored"] == 2
    # only slices 1-2 count, the border pixels are gone, the shift doubles to 6 px at 256x256
    assert paper["dice"] == pytest.approx(2 * 74 * 80 * 2 / (80 * 80 * 2 + 80 * 80 * 2))
    assert paper["dice"] > full
    # spacing of the stack: slice spacing first, in-plane spacing halved (128 -> 256)
    assert slice_grid_spacing(spacing, shape, 2, 256) == (2.0, 0.5, 0.5)
    kept_ref = np.zeros((2, 256, 256), bool)
    kept_ref[:, 80:160, 80:160] = True
    kept_pred = np.zeros_like(kept_ref)
    kept_pred[:, 86:166, 80:160] = True
    expected = compute_metrics(kept_ref, kept_pred, (2.0, 0.5, 0.5))
    for metric in ("hd95", "assd", "nsd"):
        assert paper[metric] == pytest.approx(expected[metric], abs=1e-9)


def test_paper_border_alone_changes_dice():
    """The same slices, only a false positive in the border: zeroing it restores a perfect Dice."""
    shape = (256, 256, 3)
    reference = block(shape, (100, 150), (100, 150), (0, 3))
    prediction = reference | block(shape, (0, BORDER), (0, 256), (1, 2))
    assert compute_metrics(reference, prediction, (1, 1, 1))["dice"] < 0.7
    assert paper_metrics(reference, prediction, (1, 1, 1))["dice"] == 1.0
    inside = reference | block(shape, (BORDER, BORDER + 5), (100, 150), (1, 2))
    assert paper_metrics(reference, inside, (1, 1, 1))["dice"] < 1.0


def test_paper_ground_truth_is_resized_as_the_reference_does():
    """512x512 slices: the ground truth goes through skimage's anti-aliased order-0 resize (a 2-px line
    vanishes, a block erodes), slices from the first foreground one up to but not the last."""
    shape = (512, 512, 4)
    reference = block(shape, (100, 300), (100, 300), (0, 3)) | block(shape, (400, 402), (50, 450), (3, 4))
    prediction = block(shape, (100, 300), (100, 300), (0, 4))
    ref, pred, kept = paper_volumes(reference, prediction)
    assert kept.tolist() == [0, 1, 2]           # slice 3 is the last foreground slice: not scored
    expected = resize(reference[:, :, 0].astype(np.uint8), (256, 256), order=0, preserve_range=True,
                      mode="constant", anti_aliasing=True) > 0
    assert np.array_equal(ref[0], expected) and expected.sum() < 100 * 100
    assert np.array_equal(reference_label_grid(reference)[3],
                          resize(reference[:, :, 3].astype(np.uint8), (256, 256), order=0, preserve_range=True,
                                 mode="constant", anti_aliasing=True) > 0)
    assert not reference_label_grid(block(shape, (400, 402), (50, 450), (0, 1))).any()
    assert pred[0].sum() == 100 * 100


def test_paper_empty_reference_is_not_scored():
    shape = (64, 64, 3)
    result = paper_metrics(np.zeros(shape, bool), block(shape, (10, 20), (10, 20), (0, 3)), (1, 1, 1))
    assert result["slices_scored"] == 0
    assert all(np.isnan(result[m]) for m in ("dice", "hd95", "assd", "nsd"))


def test_overlay_cases_best_median_worst():
    frame = pd.DataFrame({"case": ["a", "b", "c", "d", "e"], "site": ["X", "X", "X", "X", "Y"],
                          "dice": [0.5, 0.9, np.nan, 0.1, 0.3]})
    picked = {(site, tags): case for site, tags, case, _ in pick_overlay_cases(frame)}
    assert picked == {("X", ("worst",)): "d", ("X", ("median",)): "a", ("X", ("best",)): "b",
                      ("Y", ("worst", "median", "best")): "e"}  # a case drawn once, with all its tags
    two = {(site, tags): case for site, tags, case, _ in pick_overlay_cases(frame[frame["case"].isin(["a", "b"])])}
    assert two == {("X", ("worst", "median")): "a", ("X", ("best",)): "b"}


# ---------------------------------------------------------------- a trained tiny model
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_checkpoint) -> dict:
    """SiteA (2 cases), SiteB and SiteC (1 case each), 6 slices per case; box-mode model trained one
    epoch on fold 0 of SiteA by the real trainer."""
    root = tmp_path_factory.mktemp("evaluate")
    raw = write_toy_dataset(root / "raw", sites=("SiteA", "SiteB", "SiteC"), cases_per_site=2, shape=(40, 36, 6))
    info = json.loads((raw / "dataset.json").read_text(encoding="utf-8"))
    for case in ("SiteB_Case01", "SiteC_Case01"):
        (raw / "imagesTr" / f"{case}_0000.nii.gz").unlink()
        (raw / "labelsTr" / f"{case}.nii.gz").unlink()
        del info["domains"][case]
    info["numTraining"] = len(info["domains"])
    (raw / "dataset.json").write_text(json.dumps(info), encoding="utf-8")
    roots = {k: root / k for k in ("raw", "preprocessed", "results")}
    plan_and_embed("900", encoder="tiny", checkpoint=str(tiny_checkpoint), slices="all", device="cpu",
                   raw=str(roots["raw"]), preprocessed=str(roots["preprocessed"]))
    with pytest.raises(SystemExit) as stop:
        train_main(["900", "0", "--source", "SiteA", "--mode", "box", "--epochs", "1", "--batch-size", "2",
                    "--num-workers", "0", "--device", "cpu", "--preprocessed", str(roots["preprocessed"]),
                    "--results", str(roots["results"])])
    assert stop.value.code == 0
    flags = [f"--{k}={v}" for k, v in roots.items()]
    return {"roots": roots, "flags": flags, "raw": raw, "model": roots["results"] / DATASET / MODEL}


def run(argv: list[str], entry=main) -> int:
    with pytest.raises(SystemExit) as stop:
        entry(argv)
    return stop.value.code


def evaluate(trained, *extra: str) -> int:
    return run(["-d", "900", "--source", "SiteA", "--mode", "box", "--device", "cpu", *extra, *trained["flags"]])


@pytest.fixture(scope="module")
def full_run(trained) -> dict:
    """The first (predicting) run, full protocol; the prediction files' mtimes right after it."""
    assert evaluate(trained, "--protocol", "full") == 0
    predictions = sorted((trained["model"] / "predictions").glob("*/*.nii.gz"))
    return {"mtimes": {p: p.stat().st_mtime_ns for p in predictions}}


def expected_cases(trained) -> dict[str, tuple[str, bool]]:
    """case -> (site, in_domain): every non-source case plus SiteA's fold-0 validation cases."""
    split = json.loads((trained["roots"]["preprocessed"] / DATASET / SPLITS_FILE).read_text(encoding="utf-8"))
    held = split["src-SiteA"][0]["val"]
    assert len(held) == 1
    return {"SiteB_Case00": ("SiteB", False), "SiteC_Case00": ("SiteC", False), held[0]: ("SiteA", True)}


def load_mask(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj) > 0


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    picture = mpimg.imread(str(path))
    assert picture.ndim == 3 and min(picture.shape[:2]) > 50


@pytest.mark.slow
def test_full_protocol_scores_every_test_case_and_writes_tables_summary_and_pngs(trained, full_run):
    model, raw = trained["model"], trained["raw"]
    expected = expected_cases(trained)
    out = model / "evaluation" / "full"
    per_case = pd.read_csv(out / "per_case.csv")
    assert list(per_case.columns) == ["protocol", "case", "site", "in_domain", "folds", "dice", "hd95", "assd",
                                      "nsd", *CASE_DETECTION, "mean_predicted_iou"]
    assert (per_case["protocol"] == "full").all()
    per_slice = pd.read_csv(out / "per_slice.csv")
    assert list(per_slice.columns) == ["protocol", "case", "site", "in_domain", "slice", "reference", "predicted",
                                       "predicted_iou"]
    assert {row.case: (row.site, bool(row.in_domain)) for row in per_case.itertuples()} == expected
    for row in per_case.itertuples():
        prediction_file = model / "predictions" / row.site / f"{row.case}.nii.gz"
        reference = load_mask(raw / "labelsTr" / f"{row.case}.nii.gz")
        prediction = load_mask(prediction_file)
        assert prediction.shape == reference.shape
        np.testing.assert_allclose(nib.load(str(prediction_file)).affine,
                                   nib.load(str(raw / "labelsTr" / f"{row.case}.nii.gz")).affine)
        overlap = 2 * np.count_nonzero(reference & prediction)
        assert row.dice == pytest.approx(overlap / (reference.sum() + prediction.sum()))
        defined = reference.any() and prediction.any()
        assert np.isfinite([row.hd95, row.assd]).all() == defined
        assert np.isfinite(row.nsd)
        quality = pd.read_csv(model / "predictions" / row.site / "quality" / f"{row.case}.csv")
        assert len(quality) == reference.shape[2]
        assert row.mean_predicted_iou == pytest.approx(quality["predicted_iou"].mean(), abs=1e-6)
        # slice detection along the plan's slice axis (2), from the very masks
        slices = per_slice[per_slice["case"] == row.case].sort_values("slice")
        has_reference, has_prediction = reference.any(axis=(0, 1)), prediction.any(axis=(0, 1))
        assert slices["slice"].tolist() == list(range(reference.shape[2]))
        assert slices["reference"].tolist() == has_reference.tolist()
        assert slices["predicted"].tolist() == has_prediction.tolist()
        np.testing.assert_allclose(slices["predicted_iou"], quality.sort_values("slice")["predicted_iou"])
        assert row.fp_slices == np.count_nonzero(has_prediction & ~has_reference)
        assert row.empty_slices == np.count_nonzero(~has_reference) and row.slices == reference.shape[2]
        assert row.components == ndimage.label(prediction, np.ones((3, 3, 3)))[1]

    per_site = pd.read_csv(out / "per_site.csv")
    assert list(per_site.columns) == ["protocol", "site", "in_domain", "metric", "cases", "n", "excluded", "mean",
                                      "std", "median", "pooled"]
    assert (per_site["protocol"] == "full").all()
    assert sorted(set(per_site["site"])) == ["SiteA", "SiteB", "SiteC", "overall", "unseen"]
    pooled = per_site.set_index(["site", "metric"])["pooled"]
    unseen_slices = per_slice[~per_slice["in_domain"]]
    assert pooled[("unseen", "fp_slices")] == (unseen_slices["predicted"] & ~unseen_slices["reference"]).sum()
    auc = pooled[("unseen", "gate_auc")]
    assert np.isnan(auc) or auc == pytest.approx(pairwise_auc(unseen_slices))
    assert (per_site["n"] + per_site["excluded"] == per_site["cases"]).all()
    dice = per_site[per_site["metric"] == "dice"].set_index("site")
    assert dice.at["overall", "cases"] == 3
    assert dice.at["overall", "mean"] == pytest.approx(per_case["dice"].mean())
    assert str(dice.at["SiteA", "in_domain"]) == "True" and str(dice.at["SiteB", "in_domain"]) == "False"

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["protocol"] == "full" and summary["protocol_description"] == PROTOCOLS["full"]
    assert summary["source"] == ["SiteA"] and summary["folds"] == ["0"] and summary["mode"] == "box"
    assert (summary["cases"], summary["in_domain_cases"], summary["unseen_cases"]) == (3, 1, 2)
    assert summary["per_site"]["SiteA"]["in_domain"] is True
    assert summary["overall"]["dice"]["mean"] == pytest.approx(per_case["dice"].mean())
    unseen = per_case[~per_case["in_domain"]]
    assert summary["unseen"]["dice"]["mean"] == pytest.approx(unseen["dice"].mean())
    assert summary["overall"]["hd95"]["excluded"] == int(per_case["hd95"].isna().sum())
    assert summary["unseen"]["fp_slices"]["pooled"] == pooled[("unseen", "fp_slices")]
    assert summary["unseen"]["gate_spearman"]["n"] == 2 and summary["unseen"]["gate_spearman"]["pooled"] is None

    assert_png(out / "per_site_boxplot.png")
    overlays = sorted(p.name for p in (out / "overlays").glob("*.png"))
    assert overlays == sorted(f"{site}_worst-median-best_{case}.png" for case, (site, _) in expected.items())
    for name in overlays:
        assert_png(out / "overlays" / name)


@pytest.mark.slow
def test_paper_protocol_reuses_predictions(trained, full_run, capsys):
    model, raw = trained["model"], trained["raw"]
    capsys.readouterr()
    assert evaluate(trained, "--protocol", "paper") == 0
    assert "3 saved prediction(s) reused, 0 to predict" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in full_run["mtimes"]} == full_run["mtimes"]

    out = model / "evaluation" / "paper"
    per_case = pd.read_csv(out / "per_case.csv")
    assert (per_case["protocol"] == "paper").all()
    # no empty slice is scored: no slice detection under this protocol, only the case ranking of the IoU
    assert list(per_case.columns)[5:] == ["dice", "hd95", "assd", "nsd", "slices_scored", "mean_predicted_iou"]
    assert not (out / "per_slice.csv").exists()
    assert set(pd.read_csv(out / "per_site.csv")["metric"]) == {"dice", "hd95", "assd", "nsd", "gate_spearman"}
    assert set(per_case["case"]) == set(expected_cases(trained))
    for row in per_case.itertuples():
        label = load_mask(raw / "labelsTr" / f"{row.case}.nii.gz")
        reference = np.stack([resize(s.astype(np.uint8), (256, 256), order=0, preserve_range=True, mode="constant",
                                     anti_aliasing=True) for s in np.moveaxis(label, 2, 0)])
        prediction = resize_label_slices(np.moveaxis(load_mask(model / "predictions" / row.site /
                                                               f"{row.case}.nii.gz"), 2, 0))
        present = np.flatnonzero(label.any(axis=(0, 1)))
        keep = reference.reshape(len(reference), -1).any(axis=1)
        keep[present[-1]:] = False
        frame = np.zeros((256, 256), bool)
        frame[BORDER:-BORDER, BORDER:-BORDER] = True
        ref, pred = reference[keep] > 0, (prediction[keep] > 0) & frame
        assert row.slices_scored == keep.sum() > 0
        total = ref.sum() + pred.sum()
        assert row.dice == pytest.approx(2 * np.count_nonzero(ref & pred) / total)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["protocol"] == "paper" and summary["protocol_description"] == PROTOCOLS["paper"]
    assert summary["paper_protocol"]["border_zeroed_px"] == BORDER
    assert summary["checkpoint_name"] == "final" and summary["checkpoint_file"] == "checkpoint_final.pth"
    assert_png(out / "per_site_boxplot.png")
    assert (pd.read_csv(out / "per_site.csv")["protocol"] == "paper").all()
    assert list((out / "overlays").glob("*.png")) or per_case["dice"].isna().all()
    for path in (out / "overlays").glob("*.png"):
        assert_png(path)


def pairwise_auc(slices: pd.DataFrame) -> float:
    """Wins (ties half) of a slice with structure over an empty one, over all such pairs."""
    positive = slices.loc[slices["reference"], "predicted_iou"].to_numpy()
    negative = slices.loc[~slices["reference"], "predicted_iou"].to_numpy()
    wins = (positive[:, None] > negative[None, :]).sum() + 0.5 * (positive[:, None] == negative[None, :]).sum()
    return wins / (positive.size * negative.size)


@pytest.mark.slow
def test_a_mask_on_every_slice_is_scored_as_segmenting_every_empty_slice(trained, full_run, tmp_path):
    """desam_evaluate's scoring of a prediction with foreground on every slice (the failure of automatic
    mode): slice specificity 0, every empty slice a false-positive slice, the stray voxels a component."""
    raw, model = trained["raw"], trained["model"]
    folder = tmp_path / model.name
    shutil.copytree(model / "predictions", folder / "predictions")
    cases = [EvalCase(case, site, in_domain, ("0",)) for case, (site, in_domain) in expected_cases(trained).items()]
    target = cases[1]
    path = folder / "predictions" / target.site / f"{target.case}.nii.gz"
    image = nib.load(str(path))
    mask = np.asarray(image.dataobj).copy()
    mask[0, 0, :] = 1                          # a line through every slice, in a corner the gland never reaches
    nib.save(nib.Nifti1Image(mask, image.affine), str(path))
    info = json.loads((raw / "dataset.json").read_text(encoding="utf-8"))
    per_case, per_slice = score_cases(folder, cases, raw, info, "full", 2, progress=False)
    row = per_case.set_index("case").loc[target.case]
    empty = np.count_nonzero(~load_mask(raw / "labelsTr" / f"{target.case}.nii.gz").any(axis=(0, 1)))
    assert empty == 4  # 6 slices, the toy gland on 2
    assert (row["slice_specificity"], row["fp_slices"], row["slice_sensitivity"]) == (0, empty, 1)
    assert row["components"] == ndimage.label(mask > 0, np.ones((3, 3, 3)))[1] >= 1
    assert per_slice.loc[per_slice["case"] == target.case, "predicted"].all()
    # the paper protocol scores the structure's slices only: the same file, no false positive to see
    paper, no_slices = score_cases(folder, cases, raw, info, "paper", 2, progress=False)
    assert no_slices is None and "fp_slices" not in paper.columns


@pytest.mark.slow
def test_report_on_the_evaluated_tree(trained, full_run):
    results = trained["roots"]["results"]
    assert run(["-d", "900", "--mode", "box", "--protocol", "full", f"--results={results}"], report_main) == 0
    out = results / DATASET / "report" / "box__full"
    for name in ("cells.csv", "dice_matrix.csv", "hd95_matrix.csv", "report.md", "dice_heatmap.png",
                 "hd95_heatmap.png"):
        assert (out / name).is_file(), name
    dice = pd.read_csv(out / "dice_matrix.csv").set_index("source")
    per_case = pd.read_csv(trained["model"] / "evaluation" / "full" / "per_case.csv")
    assert list(dice.index) == ["SiteA"]
    for site, frame in per_case.groupby("site"):
        assert dice.at["SiteA", site] == pytest.approx(frame["dice"].mean())
    assert "SiteA" in (out / "report.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_the_prediction_key_follows_checkpoint_content_and_choices_not_mtime(trained, full_run):
    """A retrained fold (other checkpoint bytes) or another choice makes a saved prediction stale; touching or
    copying a checkpoint does not."""
    model = trained["model"]
    image = trained["raw"] / "imagesTr" / "SiteB_Case00_0000.nii.gz"

    def key(settings: PredictionSettings = PredictionSettings()) -> dict:
        return prediction_key(model, ["0"], settings, [image])

    before = key()
    checkpoint = model / "fold_0" / "checkpoint_final.pth"
    saved = checkpoint.read_bytes()
    try:
        checkpoint.write_bytes(saved)  # rewritten, same bytes: a new mtime only
        assert key() == before
        checkpoint.write_bytes(saved + b"retrained")
        assert key() != before
    finally:
        checkpoint.write_bytes(saved)
    assert key() == before
    assert key(PredictionSettings(postprocess="paper")) != before
    assert key(PredictionSettings(grid_rule="top1")) != before
    assert key(PredictionSettings(device="cpu", batch_size=3)) == before  # how it runs is not what it predicts
    if (model / "fold_0" / "checkpoint_best.pth").is_file():
        best = key(PredictionSettings(checkpoint_name="best"))
        assert best != before and best["checkpoint_name"] == "best"


@pytest.mark.slow
def test_new_pixels_in_an_input_are_predicted_again(trained, full_run, tmp_path, capsys):
    """Issue #24: the same shape and affine but other pixels must not reuse the old mask."""
    root = tmp_path / "copy"
    for kind, folder in trained["roots"].items():
        shutil.copytree(folder, root / kind, symlinks=True)
    flags = [f"--{kind}={root / kind}" for kind in trained["roots"]]
    argv = ["-d", "900", "--source", "SiteA", "--mode", "box", "--device", "cpu", "--protocol", "full", *flags]
    model = root / "results" / DATASET / MODEL
    image = root / "raw" / DATASET / "imagesTr" / "SiteB_Case00_0000.nii.gz"
    capsys.readouterr()
    assert run(argv) == 0
    assert "3 saved prediction(s) reused, 0 to predict" in capsys.readouterr().out
    original = nib.load(str(image))
    changed = np.asarray(original.dataobj)[::-1].copy()  # the same shape and affine, other pixels
    nib.save(nib.Nifti1Image(changed, original.affine, original.header), str(image))
    prediction = model / "predictions" / "SiteB" / "SiteB_Case00.nii.gz"
    before = prediction.stat().st_mtime_ns
    assert run(argv) == 0
    assert "2 saved prediction(s) reused, 1 to predict" in capsys.readouterr().out
    assert prediction.stat().st_mtime_ns != before


@pytest.mark.slow
def test_errors_name_the_next_command(trained, full_run):
    roots = {k: str(v) for k, v in trained["roots"].items()}
    with pytest.raises(DesamError, match=r"no trained model; run `desam_train Dataset900_Toy FOLD --source SiteA "
                                         r"--mode grid --plans-name DeSAMPlans_tiny`"):
        evaluate_model("900", ["SiteA"], "grid", **roots)
    with pytest.raises(DesamError, match=r"fold\(s\) 1 have no checkpoint_final.pth .*desam_train Dataset900_Toy 1 "):
        evaluate_model("900", ["SiteA"], "box", EvaluationSettings(folds=("1",)), **roots)
    with pytest.raises(DesamError, match=r"Dataset901_Gone: raw dataset not found; convert it first"):
        evaluate_model("Dataset901_Gone", ["SiteA"], "box", **roots)
    with pytest.raises(DesamError, match="unknown source site"):
        evaluate_model("900", ["SiteZ"], "box", **roots)
