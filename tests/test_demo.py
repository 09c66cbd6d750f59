"""The demo's closing summary (per-site Dice under both protocols, the unseen-site mean) and its encoder choice."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from evaluation import demo


def fake_model(root: Path, dice: dict[str, list[float]], hd95: list[float | None]) -> Path:
    """A model folder holding what print_results reads: per_case.csv of each protocol."""
    model = demo.model_folder(root, "DeSAMPlans_litemedsam")
    for protocol, values in dice.items():
        evaluation = model / "evaluation" / protocol
        evaluation.mkdir(parents=True)
        pd.DataFrame({"case": ["BMC_Case00", "BMC_Case01", "HK_Case00", "RUNMC_Case02"],
                      "site": ["BMC", "BMC", "HK", "RUNMC"], "dice": values, "hd95": hd95,
                      "mean_predicted_iou": [0.2, 0.3, 0.4, 0.9]}).to_csv(evaluation / "per_case.csv", index=False)
    return model


def test_table_has_both_protocols_and_the_unseen_mean(tmp_path, capsys):
    model = fake_model(tmp_path, {"paper": [0.8, 0.6, 0.9, 0.95], "full": [0.5, 0.0, 0.7, 0.9]},
                       [4.0, None, 6.0, 2.0])
    demo.print_results(model, tmp_path)
    out = capsys.readouterr().out
    assert "predicted empty" not in out
    bmc = next(line for line in out.splitlines() if line.startswith("BMC"))
    assert [float(v) for v in bmc.split()[1:5]] == [2, 0.7, 0.25, 4.0]  # cases, dice paper, dice full, hd95
    unseen = next(line for line in out.splitlines() if line.startswith(demo.UNSEEN_MEAN))
    # mean over the unseen sites (BMC, HK), the source RUNMC left out
    assert [float(v) for v in unseen.split()[2:5]] == [3, 0.8, 0.475]


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
