"""The abdominal demo's tables: per organ and protocol, the evaluation's Dice of one site's cases (the unseen
modality, or the source's held-out case), read from the merged label maps' per-case tables."""
from __future__ import annotations

import pandas as pd
import pytest

from demo_calls import demo_calls, flag_value
from evaluation import demo_abdominal
from evaluation.class_tables import CLASS_MEAN


def test_organ_dice_averages_one_sites_cases_per_organ_and_over_organs(tmp_path):
    organs = list(demo_abdominal.ORGANS)
    for protocol in demo_abdominal.PROTOCOLS:
        for index, organ in enumerate(organs):
            folder = tmp_path / "evaluation" / protocol / organ
            folder.mkdir(parents=True)
            offset = 0.1 if protocol == "paper" else 0.0
            pd.DataFrame({"case": ["CT_0001", "MR_0000", "MR_0001"], "site": ["CT", "MR", "MR"],
                          "dice": [0.9 - offset, 0.2 * index + offset, 0.2 * index + 0.1 + offset]}
                         ).to_csv(folder / "per_case.csv", index=False)
    unseen = demo_abdominal.organ_dice(tmp_path, "MR")
    assert unseen.at[organs[1], "dice_full"] == pytest.approx(0.25)  # (0.2 + 0.3) / 2, the CT row left out
    assert unseen.at[CLASS_MEAN, "dice_full"] == pytest.approx((0.05 + 0.25 + 0.45 + 0.65) / 4)
    assert unseen.at[organs[0], "dice_paper"] == pytest.approx(0.15)
    held_out = demo_abdominal.organ_dice(tmp_path, "CT")
    assert list(held_out.loc[organs, "dice_full"]) == pytest.approx([0.9] * 4)
    assert held_out.at[CLASS_MEAN, "dice_paper"] == pytest.approx(0.8)


def test_every_organ_model_trains_prim_at_the_papers_rate_and_validates_as_the_demo_evaluates(tmp_path, monkeypatch):
    """Each per-organ desam_train call: PRIM at lr x scale = 1e-4 (the rest at the short run's 1e-3), and the final
    validation with desam_evaluate's grid and rule, in both directions."""
    table = pd.DataFrame({"dice_full": [0.5], "dice_paper": [0.5]}, index=[CLASS_MEAN])
    calls = demo_calls(demo_abdominal, tmp_path, monkeypatch, organ_dice=lambda model, site: table)
    trainings = [argv for command, argv in calls if command == "desam_train"]
    evaluations = [argv for command, argv in calls if command == "desam_evaluate"]
    assert len(trainings) == len(demo_abdominal.ORGANS) * len(demo_abdominal.DIRECTIONS) and len(evaluations) == 2
    assert {flag_value(argv, "--label") for argv in trainings} == {str(v) for v in demo_abdominal.ORGANS.values()}
    grid, rule = flag_value(evaluations[0], "--grid"), flag_value(evaluations[0], "--grid-rule")
    assert (grid, rule) == (str(demo_abdominal.GRID), demo_abdominal.GRID_RULE)
    for argv in trainings:
        assert float(flag_value(argv, "--lr")) == pytest.approx(1e-3)
        assert float(flag_value(argv, "--lr")) * float(flag_value(argv, "--prim-lr-scale")) == pytest.approx(1e-4)
        assert (flag_value(argv, "--val-grid"), flag_value(argv, "--val-grid-rule")) == (grid, rule)
