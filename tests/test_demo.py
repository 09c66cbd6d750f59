"""The demo's closing summary: the per-site table, and the diagnosis printed only when every mask is empty."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from desam_pipeline import demo


def fake_model(root: Path, dice: list[float], hd95: list[float | None]) -> Path:
    """A model folder holding what print_results reads: per_case.csv and the final checkpoint's history."""
    model = demo.model_folder(root, "DeSAMPlans_tiny")
    evaluation = model / "evaluation" / "full"
    evaluation.mkdir(parents=True)
    pd.DataFrame({"case": ["BMC_Case00", "BMC_Case01", "HK_Case00"], "site": ["BMC", "BMC", "HK"],
                  "dice": dice, "hd95": hd95, "mean_predicted_iou": [0.2, 0.3, 0.4]}
                 ).to_csv(evaluation / "per_case.csv", index=False)
    fold = model / f"fold_{demo.FOLD}"
    fold.mkdir()
    torch.save({"history": {"val_dice": [0.25, 0.625]}}, fold / "checkpoint_final.pth")
    return model


def test_all_empty_predictions_are_explained(tmp_path, capsys):
    demo.print_results(fake_model(tmp_path, [0.0, 0.0, 0.0], [None, None, None]), tmp_path)
    out = capsys.readouterr().out
    assert "every volume was predicted empty" in out
    assert "rated 0.30 on average" in out and "was 0.625" in out
    bmc = next(line for line in out.splitlines() if line.startswith("BMC"))
    assert bmc.split()[:3] == ["BMC", "2", "0.0"]


def test_no_note_when_something_was_segmented(tmp_path, capsys):
    demo.print_results(fake_model(tmp_path, [0.5, 0.0, 0.7], [4.0, None, 6.0]), tmp_path)
    out = capsys.readouterr().out
    assert "predicted empty" not in out
    bmc = next(line for line in out.splitlines() if line.startswith("BMC"))
    assert bmc.split()[:4] == ["BMC", "2", "0.25", "4.0"]


def test_encoder_choice_detects_the_variant_of_desam_sam_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DESAM_SAM_CHECKPOINT", raising=False)
    assert demo.encoder_choice() == ("tiny", [])
    assert "TINY RANDOMLY INITIALISED" in capsys.readouterr().out
    # the keys detection reads, shaped as in sam_vit_b_01ec64.pth (width 768, 12 blocks)
    state = {"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}
    state.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(12)})
    checkpoint = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(state, checkpoint)
    monkeypatch.setenv("DESAM_SAM_CHECKPOINT", str(checkpoint))
    assert demo.encoder_choice() == ("vit_b", ["--checkpoint", str(checkpoint)])
    assert "(vit_b)" in capsys.readouterr().out
