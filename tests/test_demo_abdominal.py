"""The abdominal demo's tables: per organ and protocol, the evaluation's Dice of one site's cases (the unseen
modality, or the source's held-out case), read from the merged label maps' per-case tables."""
from __future__ import annotations

import pandas as pd
import pytest

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
