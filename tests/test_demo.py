"""The demo's closing summary (per-site Dice under both protocols, HD95, slice detection, the unseen row) and its
encoder choice."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from demo_calls import demo_calls, flag_value
from evaluation import demo


CASES = ["BMC_Case00", "BMC_Case01", "HK_Case00", "RUNMC_Case02"]


def fake_model(root: Path, dice: dict[str, list[float]], hd95: list[float | None]) -> Path:
    """A model folder holding what print_results reads: per_case.csv of each protocol and the full protocol's
    per_slice.csv (4 slices per case, the structure on slices 1-2; BMC_Case00 segments every slice)."""
    model = demo.model_folder(root, "DeSAMPlans_litemedsam")
    for protocol, values in dice.items():
        evaluation = model / "evaluation" / protocol
        evaluation.mkdir(parents=True)
        pd.DataFrame({"case": CASES, "site": ["BMC", "BMC", "HK", "RUNMC"], "dice": values, "hd95": hd95,
                      "components": [30, 2, 5, 1], "mean_predicted_iou": [0.2, 0.3, 0.4, 0.9]}
                     ).to_csv(evaluation / "per_case.csv", index=False)
    iou = {"BMC_Case00": [0.9, 0.8, 0.8, 0.9], "BMC_Case01": [0.1, 0.8, 0.7, 0.2], "HK_Case00": [0.5, 0.6, 0.6, 0.5],
           "RUNMC_Case02": [0.1, 0.9, 0.9, 0.1]}
    predicted = {"BMC_Case00": [True] * 4, "BMC_Case01": [False, True, True, False],
                 "HK_Case00": [True, True, True, False], "RUNMC_Case02": [False, True, True, False]}
    pd.concat([pd.DataFrame({"case": case, "slice": range(4), "reference": [False, True, True, False],
                             "predicted": predicted[case], "predicted_iou": iou[case]}) for case in CASES]
              ).to_csv(model / "evaluation" / "full" / "per_slice.csv", index=False)
    return model


def test_table_has_both_protocols_and_the_unseen_mean(tmp_path, capsys):
    model = fake_model(tmp_path, {"paper": [0.8, 0.6, 0.9, 0.95], "full": [0.5, 0.0, 0.7, 0.9]},
                       [4.0, None, 6.0, 2.0])
    demo.print_results(model, tmp_path)
    out = capsys.readouterr().out
    assert "predicted empty" not in out
    header = next(line for line in out.splitlines() if "dice_full" in line).split()
    assert header == ["cases", "dice_full", "dice_paper", "hd95_full_mm", "fp_slices_pct", "components_median",
                      "gate_auc"]
    bmc = next(line for line in out.splitlines() if line.startswith("BMC"))
    # cases, dice full, dice paper, hd95; FP slices: 2 of BMC's 4 empty slices; median of 30 and 2 components;
    # gate AUC over BMC's 8 slices: each slice with structure beats the 2 empty slices of BMC_Case01 and loses
    # to the 2 of BMC_Case00 (whose predicted IoU is high everywhere): 8 of 16 pairs
    assert [float(v) for v in bmc.split()[1:8]] == [2, 0.25, 0.7, 4.0, 50.0, 16.0, 0.5]
    unseen = next(line for line in out.splitlines() if line.startswith(demo.UNSEEN_MEAN))
    # Dice and HD95: mean over the unseen sites (BMC, HK), the source RUNMC left out; detection: their cases
    # pooled (3 of 6 empty slices predicted, components 30, 2, 5; every one of the 6 slices with structure beats
    # the 4 empty slices of BMC_Case01 and HK_Case00 only: 24 of 36 pairs)
    assert [float(v) for v in unseen.split()[2:9]] == [3, 0.475, 0.8, 5.0, 50.0, 5.0, 0.667]


def test_encoder_choice_detects_the_variant_of_the_checkpoint(tmp_path, capsys):
    assert demo.encoder_choice(demo.build_parser().parse_args([]).checkpoint) == ("litemedsam", [])
    assert "LiteMedSAM, pretrained" in capsys.readouterr().out
    # the keys detection reads, shaped as in sam_vit_b_01ec64.pth (width 768, 12 blocks)
    state = {"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}
    state.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(12)})
    checkpoint = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(state, checkpoint)
    chosen = demo.build_parser().parse_args(["--checkpoint", str(checkpoint)]).checkpoint
    assert demo.encoder_choice(chosen) == ("vit_b", ["--checkpoint", str(checkpoint)])
    assert "(vit_b)" in capsys.readouterr().out


def test_training_validates_with_the_grid_and_rule_the_demo_evaluates_with(tmp_path, monkeypatch):
    """The final validation scores what the demo's prediction does: desam_train gets desam_evaluate's grid size
    and rule (otherwise it validates with desam_predict's 9 x 9 reference rule, slower and a different mask)."""
    calls = dict(demo_calls(demo, tmp_path, monkeypatch, print_results=lambda model, results: None))
    train, evaluate = calls["desam_train"], calls["desam_evaluate"]
    assert flag_value(train, "--val-grid") == flag_value(evaluate, "--grid") == str(demo.GRID)
    assert flag_value(train, "--val-grid-rule") == flag_value(evaluate, "--grid-rule") == demo.GRID_RULE
    # PRIM trains at the paper's 1e-4 while the short run raises the rest to 1e-3
    assert float(flag_value(train, "--lr")) * float(flag_value(train, "--prim-lr-scale")) == pytest.approx(1e-4)
