"""desam_nnunet_baseline's glue: nnU-Net's dataset and split from desam's, prediction placement, and
desam_evaluate / desam_report scoring the external predictions.

nnU-Net's own planning and preprocessing run for real on the exported dataset (about 30 s); its training and
prediction (minutes on CPU even for nnUNetTrainer_1epoch) are replaced by the stand-ins of nnunet_stand_in, which
write what nnU-Net writes, the prediction of each case being its ground truth or, for one case, an empty mask.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

from desam_pipeline.baselines import nnunet_baseline
from desam_pipeline.baselines.external_predictions import RECORD_FILE, read_record
from desam_pipeline.data import splits
from desam_pipeline.io.atomic import read_json
from desam_pipeline.utilities.errors import DesamError
from evaluation.evaluate import evaluate_model
from evaluation.settings import EvaluationSettings
from evaluation.report import main as report_main

from nnunet_stand_in import fake_nnunet


pytest.importorskip("nnunetv2")
DATASET = "Dataset900_Toy"
FOLDER = "nnUNetTrainer_1epoch__nnUNetPlans__2d__src-SiteA"
EMPTY_CASE = "SiteB_Case01"


@pytest.fixture
def dataset(trees):
    sys.path.insert(0, str(Path(__file__).parent))
    from toy_data import write_toy_dataset
    return write_toy_dataset(trees["raw"], sites=("SiteA", "SiteB", "SiteC"), cases_per_site=3)


@pytest.mark.slow
def test_baseline_places_predictions_that_evaluate_and_report_score(dataset, trees, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(nnunet_baseline, "run_nnunet", fake_nnunet(dataset, calls, DATASET, EMPTY_CASE))
    folder = nnunet_baseline.run_baseline(DATASET, ["SiteA"], ["0"], trainer="nnUNetTrainer_1epoch")
    assert folder == trees["results"] / DATASET / FOLDER

    # nnU-Net's trees: its own variables, under the results tree, never exported to this process
    base = trees["results"] / DATASET / "nnunet" / "src-SiteA"
    environment = calls[0][2]
    assert environment["nnUNet_raw"] == str(base / "nnUNet_raw")
    assert environment["nnUNet_preprocessed"] == str(base / "nnUNet_preprocessed")
    assert "nnUNet_raw" not in __import__("os").environ
    exported = read_json(base / "nnUNet_raw" / DATASET / "dataset.json")
    assert sorted(exported["dataset"]) == ["SiteA_Case00", "SiteA_Case01", "SiteA_Case02"]
    assert exported["numTraining"] == 3
    # nnU-Net really planned and preprocessed exactly the source cases
    nn_pre = base / "nnUNet_preprocessed" / DATASET
    assert (nn_pre / "nnUNetPlans.json").is_file()
    assert sorted(p.name.split(".")[0] for p in (nn_pre / "nnUNetPlans_2d").glob("*.pkl")) == sorted(exported["dataset"])
    # the split nnU-Net trains with is desam's
    desam_split = read_json(trees["preprocessed"] / DATASET / splits.SPLITS_FILE)["src-SiteA"]
    assert read_json(nn_pre / splits.SPLITS_FILE) == desam_split
    held = desam_split[0]["val"]

    # predictions: unseen sites with fold 0, the held-out source case(s) with fold 0, nothing else
    predicted = {p.parent.name + "/" + p.name for p in (folder / "predictions").rglob("*.nii.gz")}
    expected = {f"{s}/{s}_Case{i:02d}.nii.gz" for s in ("SiteB", "SiteC") for i in range(3)}
    assert predicted == expected | {f"SiteA/{c}.nii.gz" for c in held}
    record = read_record(folder)
    assert record["schedule"]["trainer"] == "nnUNetTrainer_1epoch" and record["schedule"]["epochs"] == 1
    assert record["in_domain_fold_of_case"] == {c: "0" for c in held}
    assert "1 epoch(s) x 250 iterations" in record["description"]

    written = evaluate_model(DATASET, ["SiteA"], None,
                             EvaluationSettings(protocols=("full", "paper"), model_folder=FOLDER), progress=False)
    for protocol, out in written.items():
        per_case = pd.read_csv(out / "per_case.csv")
        assert sorted(per_case["case"]) == sorted(c.split("/")[1][:-7] for c in predicted)
        assert per_case[["dice", "hd95", "assd", "nsd"]].columns.size == 4
        dice = per_case.set_index("case")["dice"]
        assert dice.drop(EMPTY_CASE).eq(1.0).all(), protocol
        assert dice[EMPTY_CASE] == 0.0
        assert per_case.set_index("case")["in_domain"].to_dict() == {c: c in held for c in dice.index}
        summary = read_json(out / "summary.json")
        assert "nnUNetTrainer_1epoch" in summary["external"] and summary["schedule"]["epochs"] == 1

    # desam_report tabulates it, with the schedule stated
    with pytest.raises(SystemExit) as stop:
        report_main(["-d", DATASET, "-tr", "nnUNetTrainer_1epoch", "--mode", "2d"])
    assert stop.value.code == 0
    report = (trees["results"] / DATASET / "report" / "nnUNetTrainer_1epoch__2d__full" / "report.md").read_text(encoding="utf-8")
    assert "nnUNetTrainer_1epoch: 1 epoch(s) x 250 iterations" in report

    # rerun: nothing retrained or repredicted
    calls.clear()
    nnunet_baseline.run_baseline(DATASET, ["SiteA"], ["0"], trainer="nnUNetTrainer_1epoch")
    assert [c[0] for c in calls] == []

    # another fold set: only the new fold is trained, and every prediction is made again with both folds
    nnunet_baseline.run_baseline(DATASET, ["SiteA"], ["0", "1"], trainer="nnUNetTrainer_1epoch")
    assert [(c[0], c[1][2]) for c in calls if c[0] == "nnUNetv2_train"] == [("nnUNetv2_train", "1")]
    predict_folds = sorted(tuple(c[1][c[1].index("-f") + 1:c[1].index("-device")]) for c in calls
                           if c[0] == "nnUNetv2_predict")
    assert predict_folds == [("0",), ("0", "1"), ("1",)]
    assert read_record(folder)["folds"] == ["0", "1"]


@pytest.mark.slow
def test_missing_external_prediction_is_an_error(dataset, trees, monkeypatch):
    monkeypatch.setattr(nnunet_baseline, "run_nnunet", fake_nnunet(dataset, [], DATASET, EMPTY_CASE))
    monkeypatch.setattr(nnunet_baseline, "export_dataset", lambda *a: False)
    (trees["results"] / DATASET / "nnunet" / "src-SiteA" / "nnUNet_preprocessed" / DATASET).mkdir(parents=True)
    (trees["results"] / DATASET / "nnunet" / "src-SiteA" / "nnUNet_preprocessed" / DATASET /
     "nnUNetPlans.json").write_text("{}", encoding="utf-8")
    folder = nnunet_baseline.run_baseline(DATASET, ["SiteA"], ["0"], trainer="nnUNetTrainer_1epoch")
    (folder / "predictions" / "SiteC" / "SiteC_Case02.nii.gz").unlink()
    with pytest.raises(DesamError, match="SiteC_Case02.nii.gz"):
        evaluate_model(DATASET, ["SiteA"], None, EvaluationSettings(model_folder=FOLDER), progress=False)
    (folder / RECORD_FILE).unlink()
    with pytest.raises(DesamError, match="not a folder of external predictions"):
        evaluate_model(DATASET, ["SiteA"], None, EvaluationSettings(model_folder=FOLDER), progress=False)


def test_missing_nnunet_says_how_to_install(monkeypatch):
    monkeypatch.setattr(nnunet_baseline.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DesamError, match=r"pip install -e \.\[baseline\]"):
        nnunet_baseline.nnunet_version()
