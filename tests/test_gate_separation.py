"""benchmarks.gate_separation: per structure and site, the gate's AUC, medians and slices passing the threshold,
read from the `full` evaluation's per-slice tables; a folder without them is refused in one line."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from benchmarks import gate_separation
from desam_pipeline.inference.model import stored_gate_thresholds
from desam_pipeline.io.results_layout import CHECKPOINT_FINAL, Checkpoint, class_folder


def write_evaluation(folder, structures: dict, tables: dict, threshold: float | str = 0.5) -> None:
    full = folder / "evaluation" / "full"
    full.mkdir(parents=True)
    (full / "summary.json").write_text(json.dumps({"iou_threshold": threshold, "structures": structures,
                                                   "folds": ["0"], "checkpoint_name": "final"}))
    for name, rows in tables.items():
        (full / name).mkdir(exist_ok=True)
        pd.DataFrame(rows, columns=["case", "site", "in_domain", "slice", "reference", "predicted", "predicted_iou"]
                     ).to_csv(full / name / "per_slice.csv", index=False)


def slices(site: str, in_domain: bool, with_iou: list[float], without_iou: list[float]) -> list[tuple]:
    return ([(f"{site}_1", site, in_domain, i, True, True, v) for i, v in enumerate(with_iou)]
            + [(f"{site}_1", site, in_domain, 10 + i, False, True, v) for i, v in enumerate(without_iou)])


def test_separation_per_structure_and_site(tmp_path):
    model = tmp_path / "model"
    # liver: ranked and calibrated at home, inverted on the target; spleen: ranked but all above the threshold
    liver = slices("CT", True, [0.9, 0.8], [0.1, 0.2, 0.3]) + slices("MR", False, [0.55], [0.6, 0.7])
    spleen = slices("CT", True, [0.9, 0.95], [0.6, 0.7]) + slices("MR", False, [0.7], [0.7])
    write_evaluation(model, {"liver": 1, "spleen": 2}, {"liver": liver, "spleen": spleen}, threshold=0.5)
    table = gate_separation.separation(model).set_index(["structure", "site"])
    assert table.at[("liver", "CT"), "gate AUC"] == 1.0 and table.at[("liver", "MR"), "gate AUC"] == 0.0
    assert table.at[("spleen", "MR"), "gate AUC"] == 0.5  # a tie counts half
    assert (table.at[("liver", "CT"), "slices with"], table.at[("liver", "CT"), "slices without"]) == (2, 3)
    assert table.at[("liver", "CT"), "median IoU without"] == pytest.approx(0.2)
    passing = table["without passing"]
    assert (table["threshold"] == 0.5).all()
    assert passing[("liver", "CT")] == 0 and passing[("liver", "MR")] == 2
    assert passing[("spleen", "CT")] == 2  # ranked (AUC 1) yet not calibrated
    assert bool(table.at[("liver", "CT"), "in_domain"]) and not bool(table.at[("liver", "MR"), "in_domain"])


def test_binary_model_and_missing_tables(tmp_path, capsys):
    binary = tmp_path / "binary"
    write_evaluation(binary, {}, {"": slices("RUNMC", True, [0.9], [0.95, 0.1])}, threshold=0.8)
    table = gate_separation.separation(binary)
    assert list(table["structure"]) == [""] and table.at[0, "gate AUC"] == 0.5
    assert table.at[0, "without passing"] == 1 and table.at[0, "with passing"] == 1 and table.at[0, "threshold"] == 0.8
    with pytest.raises(SystemExit) as done:
        gate_separation.main([str(binary), "--markdown"])
    assert done.value.code == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("| model | structure | site |") and printed[2].startswith("| binary |  | RUNMC |")
    assert "| 0.500 |" in printed[2]  # the AUC, three decimals
    (binary / "evaluation" / "full" / "per_slice.csv").unlink()
    for folder, message in ((binary, "per_slice.csv: no per-slice table"),
                            (tmp_path / "none", "summary.json: no full evaluation")):
        with pytest.raises(SystemExit) as stop:
            gate_separation.main([str(folder)])
        assert stop.value.code == 1 and message in capsys.readouterr().err


def test_calibrated_thresholds_are_read_from_each_structures_fold_checkpoint(tmp_path):
    """Under --iou-threshold calibrated each structure passes slices against its own stored threshold."""
    model = tmp_path / "model"
    liver = slices("CT", True, [0.3, 0.35], [0.1, 0.2])
    spleen = slices("CT", True, [0.9], [0.6, 0.7])
    write_evaluation(model, {"liver": 1, "spleen": 2}, {"liver": liver, "spleen": spleen}, threshold="calibrated")
    for value, threshold in ((1, 0.25), (2, 0.8)):
        (class_folder(model, value) / "fold_0").mkdir(parents=True)
        Checkpoint(network={}, network_config={}, gate_calibration={"threshold": threshold, "grid": 5}).save(
            class_folder(model, value) / "fold_0" / CHECKPOINT_FINAL)
    table = gate_separation.separation(model).set_index("structure")
    assert table.at["liver", "threshold"] == 0.25 and table.at["spleen", "threshold"] == 0.8
    assert (table.at["liver", "with passing"], table.at["liver", "without passing"]) == (2, 0)
    assert (table.at["spleen", "with passing"], table.at["spleen", "without passing"]) == (1, 0)


def test_a_binary_models_calibrated_threshold_is_its_folds_mean(tmp_path):
    model = tmp_path / "binary"
    write_evaluation(model, {}, {"": slices("RUNMC", True, [0.5, 0.6], [0.3, 0.45])}, threshold="calibrated")
    summary_file = model / "evaluation" / "full" / "summary.json"
    summary_file.write_text(json.dumps({**json.loads(summary_file.read_text()), "folds": ["0", "1"]}))
    for fold, threshold in (("0", 0.4), ("1", 0.5)):
        (model / f"fold_{fold}").mkdir()
        Checkpoint(network={}, network_config={}, gate_calibration={"threshold": threshold, "grid": 5}).save(
            model / f"fold_{fold}" / CHECKPOINT_FINAL)
    assert stored_gate_thresholds(model, ["0", "1"]) == {"": [0.4, 0.5]}
    table = gate_separation.separation(model)
    assert table.at[0, "threshold"] == pytest.approx(0.45)
    assert (table.at[0, "with passing"], table.at[0, "without passing"]) == (2, 0)
